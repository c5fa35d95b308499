"""Pruned prefill of two versions of `modeling_rcp_llava.py` side by side, in one process (A/B of a refactor).

    python benchmarks/compare_prefill.py --old path/to/old/modeling_rcp_llava.py          # mid preset, batch 1, 8

Both versions get the same config (from the installed `configuration_rcp_llava`) and the same weights; for each
method (the efficiency benchmark's schedules) and batch size, the two prefills (`use_cache=True`,
`logits_to_keep=1`) alternate round by round and the medians are reported with their ratio, after checking that
both versions return the same logits and kept sets. The ratio column is the median of the per-round ratios (new
over the old run next to it), which a slow drift of the machine's speed does not bias. "select" is the time inside
`_select_tokens` per prefill (the token choice, as `efficiency.py` measures it), median over the same rounds. Only inference forwards run:
loading the old file re-registers its own attention functions in this process.

`ideal-K` (not in the default --methods) is `efficiency.py`'s ideal: RCP's model given the kept sets that the new
version's RCP chooses (`visual_keep_masks`), so that both versions time compaction without selection; the old file
must accept `visual_keep_masks`.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

from modeling_rcp_llava import RcpLlavaForConditionalGeneration, write_text
from rcp_llava.results import command_line, positive_int, publish, refuse_existing


HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the other modeling_rcp_llava.py")
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--methods", default="full,rcp-64,rcp-128,rcp-192,vispruner-64,fastv-64,random-64")
    parser.add_argument("--output", default=None, help="markdown file to write (default: print only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    efficiency = load_module("efficiency_benchmark", os.path.join(HERE, "efficiency.py"))
    # Every argument checked before the first model is built (a typo in the last method was a KeyError after the
    # others had been timed, and the file was never written).
    if not os.path.isfile(args.old):
        raise FileNotFoundError(f"--old: no file {args.old!r}; pass the other version's modeling_rcp_llava.py.")
    if args.preset not in efficiency.PRESETS:
        raise ValueError(f"--preset {args.preset!r} is unknown; use one of {sorted(efficiency.PRESETS)}.")
    if args.preset not in efficiency.CPU_PRESETS:  # two random 7B models in fp32 on the CPU: about 56 GB
        raise ValueError(f"--preset {args.preset} is efficiency.py's GPU shape; compare_prefill runs on the CPU in fp32, "
                         "where its two 7B models would take about 56 GB. Use a CPU preset: "
                         f"{', '.join(efficiency.CPU_PRESETS)}.")
    batch_sizes = efficiency.positive_ints(args.batch_sizes, "--batch_sizes")
    methods = efficiency.method_configs(args.preset, [192, 128, 64])
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in methods]
    if unknown or not names:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; use some of {list(methods)}.")
    if args.output:
        refuse_existing([args.output], args.overwrite, output_flag="--output")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    old_modeling = load_module("old_modeling_rcp_llava", args.old)
    lines = [f"# Pruned prefill, `{args.old}` (old) vs `modeling_rcp_llava.py` (new), preset `{args.preset}`", "",
             f"Command: `{command_line(__file__, argv)}`. Median of {args.repeats} runs after warm-up, old and new "
             "alternating; CPU, 2 threads, fp32, random weights (plug-ins randomised too).", "",
             "| method | batch | old ms | new ms | new / old (median of paired ratios) | old select ms | new select ms "
             "| same logits and kept sets |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        overrides, _, is_ideal, _ = methods[name]
        config = efficiency.build_config(args.preset, **overrides)
        new = RcpLlavaForConditionalGeneration(config).eval()
        with torch.no_grad():
            for p in new.model.rcp_plugins.parameters():
                p.normal_(0, 0.05)
        old = old_modeling.RcpLlavaForConditionalGeneration(config).eval()
        old.load_state_dict(new.state_dict())
        timers = {label: efficiency.SelectionTimer(torch.device("cpu")) for label in ("old", "new")}
        for label, model in (("old", old), ("new", new)):
            timers[label].wrap(model)
        for bsz in batch_sizes:
            inputs = dict(efficiency.make_inputs(args.preset, bsz), use_cache=True, logits_to_keep=1)
            if is_ideal:  # the kept sets RCP chooses, given to both versions: no selection (as efficiency.py does)
                with torch.no_grad():
                    chosen = new(**{**inputs, "use_cache": False}).keep_masks
                inputs["visual_keep_masks"] = chosen
            times = {"old": [], "new": []}
            select = {"old": [], "new": []}
            outs = {}
            with torch.no_grad():
                for round_index in range(args.repeats + 1):
                    for label, model in (("old", old), ("new", new)) if round_index % 2 else (("new", new), ("old", old)):
                        timers[label].reset()
                        start = time.perf_counter()
                        outs[label] = model(**inputs)
                        if round_index:
                            times[label].append(time.perf_counter() - start)
                            select[label].append(timers[label].totals()[0])
            same = torch.equal(outs["old"].logits, outs["new"].logits) and (
                outs["old"].keep_masks is None or torch.equal(outs["old"].keep_masks, outs["new"].keep_masks))
            o, w = statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3
            ratio = statistics.median(b / a for a, b in zip(times["old"], times["new"]))
            sel = [f"{statistics.median(select[k]) * 1e3:.2f}" if any(select[k]) else "–" for k in ("old", "new")]
            line = f"| {name} | {bsz} | {o:.1f} | {w:.1f} | {ratio:.3f} | {sel[0]} | {sel[1]} | {same} |"
            lines.append(line)
            print(line, flush=True)
    if args.output:
        # Creates the folder refuse_existing accepted; a file another run wrote there meanwhile is kept unless
        # --overwrite (this one goes beside it, as NAME-2.md)
        publish([(args.output, lambda tmp, final: write_text(tmp, "\n".join(lines) + "\n"))],
                overwrite=args.overwrite)


if __name__ == "__main__":
    main()
