"""Would fusing token selection's small ops reach issue 19's targets? RCP's prefill with its selection eager, with it
compiled (`model.compile_selection()`: the selector's `keep` through `torch.compile`), and the ideal (the same model
given the kept sets: no selection), timed in the same rounds.

    python benchmarks/compiled_selection.py                    # mid preset on the CPU, rcp-128, batch 1 and 8
    python benchmarks/compiled_selection.py --backend eager    # Dynamo's tracing only, no Inductor: the plumbing, fast
    python benchmarks/compiled_selection.py --preset llava-1.5-7b --device cuda --budget 64   # a lent GPU, bf16

One model (plug-ins randomised), switched by its own `compile_selection`, and the efficiency benchmark's prompt
(`efficiency.make_inputs`); RCP at the efficiency table's schedule (`efficiency.method_configs`), in the preset's
dtype on a GPU (bf16 for LLaVA-1.5-7B's shape, built on the device: nothing is downloaded) and float32 on the CPU.
Per batch size, a warm-up of each variant (the compiled one compiles there: one graph per pruning point, whose
shapes differ; Dynamo's caches are reset first, so no batch size runs into its recompile limit), then `--repeats`
rounds of the three prefills (`use_cache=True`, `logits_to_keep=1`), in reverse order every other round. Medians of
the prefill, of the time inside `_select_tokens` (CUDA events on a GPU, gross of the work the layer reuses, as
`efficiency.py`'s *select* column) and of its per-prefill share, and the medians of the rounds' ratios to the ideal
(issue 19's RCP <= 1.10x ideal) and of compiled over eager selection. The compiled variant must keep eager's kept
sets (its logits may differ by the fused kernels' summation order: the largest difference is reported).
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

VARIANTS = ("eager", "compiled", "ideal")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", choices=sorted(efficiency.PRESETS))
    parser.add_argument("--budget", type=int, default=128, choices=[192, 128, 64], help="RCP's schedule")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                        help="torch.compile's backend: inductor fuses; eager only traces (a check of this script)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (the machines have 2 cores)")
    parser.add_argument("--output_dir", default=os.path.join(DEFAULT_OUTPUT_DIR, "benchmarks"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier result of the same name")
    args = parser.parse_args(argv)
    batch_sizes = efficiency.positive_ints(args.batch_sizes, "--batch_sizes")
    if args.device == "cpu" and args.preset not in efficiency.CPU_PRESETS:
        raise ValueError(f"--preset {args.preset} is efficiency.py's GPU shape (a 7B model): run it with --device "
                         f"cuda, or use a CPU preset: {', '.join(efficiency.CPU_PRESETS)}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: CUDA is not available here (torch {torch.__version__}); use --device cpu.")
    stem = os.path.join(args.output_dir,
                        f"compiled_selection_{args.preset}_{args.device}_rcp-{args.budget}_{args.backend}")
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite, choose="--output_dir")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, efficiency.PRESETS[args.preset]["dtype"]) if device.type == "cuda" else torch.float32
    overrides = efficiency.method_configs(args.preset, [args.budget], families=("rcp",))[f"rcp-{args.budget}"][0]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built on the device in its dtype, as efficiency.py builds the 7B shape
    try:
        with torch.device(device):
            model = RcpLlavaForConditionalGeneration(efficiency.build_config(args.preset, **overrides)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        for p in model.model.rcp_plugins.parameters():
            p.normal_(0, 0.05)
    original = model.model._select_tokens
    spans = []

    now, seconds = efficiency.device_clock(device)  # CUDA events on a GPU: no wait inside the prefill

    def select_tokens(selector, ctx):
        start = now()
        keep = original(selector, ctx)
        spans.append((start, now()))
        return keep

    model.model._select_tokens = select_tokens

    def prefill(inputs, variant):
        # the library's switch (whole graphs, static shapes: a graph break raises instead of timing eager ops as
        # compiled); its compiled functions are kept while off, so switching back recompiles nothing
        if variant == "compiled":
            model.compile_selection(backend=args.backend)
        else:
            model.compile_selection(False)
        spans.clear()
        efficiency.sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs)
        efficiency.sync(device)
        return out, time.perf_counter() - start, sum(seconds(s, e) for s, e in spans)

    rows = []
    for bsz in batch_sizes:
        prompt = dict(efficiency.make_inputs(args.preset, bsz, device, dtype), use_cache=True, logits_to_keep=1)
        eager_out, _, _ = prefill(prompt, "eager")
        inputs = {"eager": prompt, "compiled": prompt, "ideal": {**prompt, "visual_keep_masks": eager_out.keep_masks}}
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled_out, compile_s, _ = prefill(prompt, "compiled")  # compiles here
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        prefill(inputs["ideal"], "ideal")
        runs = {v: [] for v in VARIANTS}  # (prefill s, selection s) per round
        for round_index in range(args.repeats):
            for variant in (VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]):
                _, total, selection = prefill(inputs[variant], variant)
                runs[variant].append((total, selection))
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:  # a recompile while timing
            raise RuntimeError(f"batch {bsz}: the compiled selection recompiled after its warm-up ({graphs} -> "
                               f"{torch._dynamo.utils.counters['stats']['unique_graphs']} graphs); its timings "
                               "would include compilation.")

        def median_ms(variant, which):
            return statistics.median(run[which] for run in runs[variant]) * 1e3

        def paired(a, b, which=0):  # median over rounds of a / b in the same round
            return statistics.median(x[which] / y[which] for x, y in zip(runs[a], runs[b]))

        rows.append({
            "batch_size": bsz,
            **{f"{v}_prefill_ms": median_ms(v, 0) for v in VARIANTS},
            **{f"{v}_selection_ms": median_ms(v, 1) for v in ("eager", "compiled")},
            **{f"{v}_selection_share": statistics.median(s / t for t, s in runs[v]) for v in ("eager", "compiled")},
            "eager_x_ideal": paired("eager", "ideal"), "compiled_x_ideal": paired("compiled", "ideal"),
            "compiled_over_eager_selection": paired("compiled", "eager", which=1),
            "same_kept_sets": bool(torch.equal(eager_out.keep_masks, compiled_out.keep_masks)),
            "logits_max_abs_diff": (eager_out.logits.float() - compiled_out.logits.float()).abs().max().item(),
            "first_compiled_prefill_s": compile_s, "compiled_graphs": graphs,
        })
        print(rows[-1], flush=True)

    command = command_line(__file__, argv)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    lines = [f"# RCP's token selection, eager and compiled (`rcp-{args.budget}`, preset `{args.preset}`, {where})", "",
             f"Command: `{command}`. torch {torch.__version__}, backend `{args.backend}`, "
             f"{str(dtype).removeprefix('torch.')}; median of {args.repeats} rounds after a warm-up (which compiles), "
             "RCP with eager selection, RCP with compiled selection and the ideal (RCP's kept sets given: no "
             "selection) in each, every other round reversed; random weights (plug-ins randomised). *select*: the "
             "time inside `_select_tokens`, gross of the work the layer reuses (as `efficiency.py`'s *select* "
             "column); its share is the median of the per-prefill shares, *×ideal* and *compiled / eager* medians "
             "of the rounds' ratios. *graphs*: compiled at the warm-up (one per pruning point, none after it); its "
             "time includes Inductor's on-disk cache, warm after a first run.", "",
             "| batch | prefill ms, eager / compiled / ideal | ×ideal, eager / compiled | select ms, eager (% prefill) "
             "| select ms, compiled (% prefill) | compiled / eager select | same kept sets | logits max abs diff "
             "| first compiled prefill s (graphs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['eager_prefill_ms']:.1f} / {r['compiled_prefill_ms']:.1f} / "
            f"{r['ideal_prefill_ms']:.1f} | {r['eager_x_ideal']:.3f} / {r['compiled_x_ideal']:.3f} | "
            f"{r['eager_selection_ms']:.2f} ({r['eager_selection_share']:.1%}) | "
            f"{r['compiled_selection_ms']:.2f} ({r['compiled_selection_share']:.1%}) | "
            f"{r['compiled_over_eager_selection']:.2f} | {r['same_kept_sets']} | {r['logits_max_abs_diff']:.1e} | "
            f"{r['first_compiled_prefill_s']:.1f} ({r['compiled_graphs']}) |")
    written = write_results(stem, "\n".join(lines) + "\n",
                            {"command": command, "torch": torch.__version__, "backend": args.backend,
                             "device": where, "dtype": str(dtype).removeprefix("torch."), "results": rows},
                            overwrite=args.overwrite)
    print(f"wrote {written}.md / .json")


if __name__ == "__main__":
    main()
