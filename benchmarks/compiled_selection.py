"""Would fusing token selection's small ops reach issue 19's 5%? RCP's selection timed inside the prefill eagerly and
with the selector's `keep` compiled by `torch.compile` (Inductor: fused C++ kernels on a CPU), in one process.

    python benchmarks/compiled_selection.py                    # mid preset, rcp-128, batch 1 and 8
    python benchmarks/compiled_selection.py --backend eager    # Dynamo's tracing only, no Inductor: the plumbing, fast

One model (plug-ins randomised), switched by its own `compile_selection`, and the efficiency benchmark's prompt
(`efficiency.make_inputs`) for both; RCP at the efficiency table's schedule (`efficiency.method_configs`). Per
batch size, a warm-up of each (the compiled one
compiles there: one graph per pruning point, whose shapes differ), then `--repeats` rounds of one eager and one
compiled prefill (`use_cache=True`, `logits_to_keep=1`), their order alternating. Medians of the time inside
`_select_tokens` (the token choice, as `efficiency.py` measures it, gross of the work the layer reuses), its share of
the same prefill, and the prefill; the kept sets must be the same (the logits may differ by the compiled kernels'
summation order: their largest difference is reported).

The rest of the pruned forward runs eagerly (`torch.compile` of the model does not reach it, see
`RcpLlavaModel._pruned_forward`), and a compiled selector recompiles for each new sequence length and batch size.
"""

import argparse
import os
import statistics
import time

import torch

# The efficiency benchmark's presets, schedules and prompt: its folder is `sys.path[0]` when this runs as a script
# (a test loads `efficiency` by path first).
import efficiency
from modeling_rcp_llava import RcpLlavaForConditionalGeneration
from rcp_llava.results import DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, write_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", choices=efficiency.CPU_PRESETS)
    parser.add_argument("--budget", type=int, default=128, choices=[192, 128, 64], help="RCP's schedule")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (the machines have 2 cores)")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                        help="torch.compile's backend: inductor fuses; eager only traces (a check of this script)")
    parser.add_argument("--output_dir", default=os.path.join(DEFAULT_OUTPUT_DIR, "benchmarks"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result of the same name")
    args = parser.parse_args(argv)
    batch_sizes = efficiency.positive_ints(args.batch_sizes, "--batch_sizes")
    stem = os.path.join(args.output_dir, f"compiled_selection_{args.preset}_rcp-{args.budget}_{args.backend}")
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite, choose="--output_dir")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = efficiency.method_configs(args.preset, [args.budget], families=("rcp",))[f"rcp-{args.budget}"][0]
    model = RcpLlavaForConditionalGeneration(efficiency.build_config(args.preset, **overrides)).eval()
    with torch.no_grad():
        for p in model.model.rcp_plugins.parameters():
            p.normal_(0, 0.05)
    original = model.model._select_tokens
    spans = []

    def select_tokens(selector, ctx):
        start = time.perf_counter()
        keep = original(selector, ctx)
        spans.append(time.perf_counter() - start)
        return keep

    model.model._select_tokens = select_tokens

    def prefill(inputs, use_compiled):
        # the library's switch (whole graphs, static shapes: a graph break raises instead of timing eager ops as
        # compiled); its compiled functions are kept while off, so switching back recompiles nothing
        if use_compiled:
            model.compile_selection(backend=args.backend)
        else:
            model.compile_selection(False)
        spans.clear()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        return out, time.perf_counter() - start, sum(spans)

    rows = []
    for bsz in batch_sizes:
        inputs = dict(efficiency.make_inputs(args.preset, bsz), use_cache=True, logits_to_keep=1)
        eager_out, _, _ = prefill(inputs, False)
        # Each batch size compiles afresh (one graph per pruning point): Dynamo's recompile limit (8 per function)
        # would otherwise send a later batch size's points back to eager, silently.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled_out, compile_s, _ = prefill(inputs, True)  # compiles here
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs = {False: [], True: []}  # (prefill s, selection s) per round
        for round_index in range(args.repeats):
            for use_compiled in ((False, True) if round_index % 2 else (True, False)):
                _, total, selection = prefill(inputs, use_compiled)
                runs[use_compiled].append((total, selection))
        med = {k: (statistics.median(t for t, _ in v) * 1e3, statistics.median(s for _, s in v) * 1e3,
                   statistics.median(s / t for t, s in v)) for k, v in runs.items()}
        rows.append({
            "batch_size": bsz, "eager_prefill_ms": med[False][0], "compiled_prefill_ms": med[True][0],
            "eager_selection_ms": med[False][1], "compiled_selection_ms": med[True][1],
            "eager_selection_share": med[False][2], "compiled_selection_share": med[True][2],
            "compiled_over_eager_selection": statistics.median(
                c[1] / e[1] for e, c in zip(runs[False], runs[True])),
            "same_kept_sets": bool(torch.equal(eager_out.keep_masks, compiled_out.keep_masks)),
            "logits_max_abs_diff": (eager_out.logits - compiled_out.logits).abs().max().item(),
            "first_compiled_prefill_s": compile_s, "compiled_graphs": graphs,
        })
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:  # a recompile while timing
            raise RuntimeError(f"batch {bsz}: the compiled selector recompiled after its warm-up "
                               f"({graphs} -> {torch._dynamo.utils.counters['stats']['unique_graphs']} graphs); its "
                               "timings would include compilation.")
        print(rows[-1], flush=True)

    command = command_line(__file__, argv)
    lines = [f"# RCP's token selection, eager and compiled (`rcp-{args.budget}`, preset `{args.preset}`, CPU)", "",
             f"Command: `{command}`. torch {torch.__version__}, backend `{args.backend}`; median of {args.repeats} "
             "rounds after a warm-up (which compiles), eager and compiled alternating; CPU, 2 threads, fp32, random "
             "weights (plug-ins randomised). *select*: the time inside `_select_tokens`, gross of the work the layer "
             "reuses (as `efficiency.py`'s *select* column); its share is the median of the per-prefill shares, "
             "*compiled / eager* the median of the rounds' ratios. *graphs*: compiled at the warm-up (one per "
             "pruning point, none after it); its time includes Inductor's on-disk cache, warm after a first run.", "",
             "| batch | prefill ms, eager / compiled | select ms, eager (% prefill) | select ms, compiled (% prefill) "
             "| compiled / eager select | same kept sets | logits max abs diff | first compiled prefill s (graphs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['eager_prefill_ms']:.1f} / {r['compiled_prefill_ms']:.1f} | "
            f"{r['eager_selection_ms']:.2f} ({r['eager_selection_share']:.1%}) | "
            f"{r['compiled_selection_ms']:.2f} ({r['compiled_selection_share']:.1%}) | "
            f"{r['compiled_over_eager_selection']:.2f} | {r['same_kept_sets']} | {r['logits_max_abs_diff']:.1e} | "
            f"{r['first_compiled_prefill_s']:.1f} ({r['compiled_graphs']}) |")
    written = write_results(stem, "\n".join(lines) + "\n",
                            {"command": command, "torch": torch.__version__, "backend": args.backend,
                             "results": rows}, overwrite=args.overwrite)
    print(f"wrote {written}.md / .json")


if __name__ == "__main__":
    main()
