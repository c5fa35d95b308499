"""Where RCP's token selection spends its time, point by point, next to what it cannot avoid (issue 19).

    python benchmarks/selection_profile.py                                  # mid CPU preset, rcp-128, batch 1 and 8
    python benchmarks/selection_profile.py --preset mid-32 --budget 64

The efficiency benchmark's RCP schedule (`efficiency.method_configs`: the authors' placements, fixed keep counts)
runs `--repeats` rounds (after one warm-up): a prefill of RCP and one of the ideal (the same model given RCP's
kept sets: no selection), alternating which goes first, then a profiled RCP prefill. That one records, at each
pruning point, every parameterised module token selection calls -- the pruning layer's input norm, its key
projection over all rows and its query projection of the question rows (Eq. 4's prior), the pruner's linear maps
and norms (Eqs. 1-5) -- with its input, and before the prefill goes on times once each: the whole selection (on a
fresh `SelectionContext`), each recorded call alone on its input, and the layer's norm and key projection on the
rows it keeps. Medians over the rounds, so the points and the prefills are measured over the same stretch of time:

- *module calls*: the dense work selection does; *reused*: the part of it the layer then reads instead of computing it
  (its norm and keys on the kept rows, `PrunedPrefill.given_inputs`);
- *floor* = module calls - reused: what selection would cost if nothing but its dense maps took time -- the
  key projection of the tokens it drops, the question rows' queries and the pruner's maps;
- *other* = selection - module calls: RoPE, scores, masks, softmax, top-k, gathers and per-op dispatch.

It also counts the aten calls (every op torch dispatches, views included; `efficiency.aten_calls`) of one RCP and
one ideal prefill: per pruning point in selection and in the rest of `PrunedPrefill.prune` (finding the alive
tokens, compaction, the repair context), in all decoder layers, and outside both (vision tower, embedding, the
prefill's setup and input checks, masks, repair adapters, the final norm and head). Where a layer's host-side
dispatch outlasts its kernels -- a GPU at batch 1 -- time follows these counts, not FLOPs.

The shares are of RCP's (unprofiled) prefill; ×ideal is the median of the rounds' RCP / ideal ratios. The floor is
a property of the method and the shape (Eq. 4 needs every candidate's key), so no kernel brings selection net of
the reused work below it; a fused kernel could only shrink *other*.
"""

import argparse
import dataclasses
import os
import statistics
import time

import torch

# The efficiency benchmark's presets, schedules and input layout: its folder is `sys.path[0]` when this runs as a
# script (a test loads `efficiency` by path first).
import efficiency
from modeling_rcp_llava import RcpLlavaForConditionalGeneration, _compact, _gather_seq
from rcp_llava.results import DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, write_results


def _median_ms(times):
    return statistics.median(times) * 1e3


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_modules(*roots):
    """The leaf modules with parameters (linear maps, norms) under `roots`: selection's dense work. (A module with
    children, such as the pruner, is the sum of its maps and its own tensor ops: those count as *other*.)"""
    return [m for root in roots for m in root.modules()
            if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None]


def point_jobs(selector, ctx, original):
    """Run the real selection of this point (returned, so the prefill goes on unchanged) and set up its timing.

    returns (keep (B, K) bool, jobs {name: callable}, record dict of the point's shapes and module calls)."""
    calls = []
    layer = ctx.layer
    modules = dense_modules(layer, selector.model.rcp_plugins)
    hooks = [m.register_forward_hook(lambda module, args, output: calls.append((module, args))) for m in modules]
    try:
        keep = original(selector, ctx)
    finally:
        for hook in hooks:
            hook.remove()

    # The rows the layer runs on after this point (as `PrunedPrefill.prune` compacts them).
    src, _, _ = _compact(ctx.prefill.staying_slots(ctx.slots, ctx.valid & ~keep))
    kept_hidden = _gather_seq(ctx.hidden, src)  # (B, T'', d)
    kept_norm = layer.input_layernorm(kept_hidden)
    reused = [(layer.input_layernorm, (kept_hidden,))]
    if ctx.layer_keys is not None:  # the prior's whole-sequence keys: the layer reads their kept rows
        reused.append((layer.self_attn.k_proj, (kept_norm,)))

    def fresh_selection():  # every cache the context fills (its `_...` fields and the prior's keys) emptied
        caches = [f.name for f in dataclasses.fields(ctx) if f.name.startswith("_") or f.name == "layer_keys"]
        selector.keep(dataclasses.replace(ctx, **dict.fromkeys(caches)))

    jobs = {"selection": fresh_selection}
    jobs.update({("call", i): (lambda m=m, a=a: m(*a)) for i, (m, a) in enumerate(calls)})
    jobs.update({("reused", i): (lambda m=m, a=a: m(*a)) for i, (m, a) in enumerate(reused)})
    names = {id(m): name for name, m in selector.model.named_modules()}
    record = {"point": ctx.point, "layer": ctx.layer_idx, "rows": int(ctx.hidden.shape[1]),
              "candidates": int(ctx.slots.shape[1]), "kept": int(keep.sum(1).max()), "kept_rows": int(src.shape[1]),
              "calls": [(names.get(id(m), type(m).__name__), tuple(a[0].shape)) for m, a in calls],
              "reused_calls": len(reused)}
    return keep, jobs, record


def summarise(record, times):
    """A point's record with the medians (ms) of its jobs' times."""
    calls = [(name, shape, _median_ms(times[("call", i)])) for i, (name, shape) in enumerate(record["calls"])]
    module_ms = sum(ms for _, _, ms in calls)
    reused_ms = sum(_median_ms(times[("reused", i)]) for i in range(record["reused_calls"]))
    selection_ms = _median_ms(times["selection"])
    return {**record, "calls": calls, "selection_ms": selection_ms, "module_calls_ms": module_ms,
            "reused_ms": reused_ms, "floor_ms": module_ms - reused_ms, "other_ms": selection_ms - module_ms}


def profile(preset, budget, bsz, repeats, seed=0):
    """One batch size: the per-point records, and RCP / ideal prefill medians (ms) with the median of their per-round
    ratio (`x_ideal`). Each round runs RCP and the ideal (alternating which goes first), then one more RCP prefill
    that times every job of every point once: the medians of both come from the same stretch of the machine's time."""
    torch.manual_seed(seed)
    overrides = efficiency.method_configs(preset, [budget], {"full", "rcp"})[f"rcp-{budget}"][0]
    config = efficiency.build_config(preset, **overrides)
    config._attn_implementation = "sdpa"
    model = RcpLlavaForConditionalGeneration(config).eval()
    inputs = dict(efficiency.make_inputs(preset, bsz), use_cache=True, logits_to_keep=1)

    original = model.model._select_tokens
    records, times = {}, {}  # per point: its record (first round), {job: [seconds per round]}

    def select_tokens(selector, ctx):
        keep, jobs, record = point_jobs(selector, ctx, original)
        records.setdefault(ctx.point, record)
        point_times = times.setdefault(ctx.point, {name: [] for name in jobs})
        for name, fn in jobs.items():
            point_times[name].append(_timed(fn))
        return keep

    with torch.no_grad():
        kept = model(**inputs).keep_masks
    prefill = {"rcp": [], "ideal": []}
    with torch.no_grad():
        for round_index in range(repeats + 1):  # round 0 is the warm-up
            for name in ("rcp", "ideal") if round_index % 2 else ("ideal", "rcp"):
                extra = {"visual_keep_masks": kept} if name == "ideal" else {}
                t = _timed(lambda: model(**inputs, **extra))
                if round_index:
                    prefill[name].append(t)
            model.model._select_tokens = select_tokens
            try:
                model(**inputs)
            finally:
                model.model._select_tokens = original
    for point_times in times.values():  # drop the warm-up round
        for samples in point_times.values():
            del samples[0]
    points = [summarise(records[p], times[p]) for p in sorted(records)]
    x_ideal = statistics.median(a / b for a, b in zip(prefill["rcp"], prefill["ideal"]))  # paired, as efficiency.py
    calls = {"rcp": efficiency.aten_calls(model, inputs),
             "ideal": efficiency.aten_calls(model, {**inputs, "visual_keep_masks": kept})}
    return points, {**{name: _median_ms(t) for name, t in prefill.items()}, "x_ideal": x_ideal}, calls


def markdown(results, command):
    lines = [f"# Token selection, point by point (`{results[0]['method']}`, preset `{results[0]['preset']}`, CPU)", "",
             f"Command: `{command}`. {results[0]['repeats']} rounds per number, medians; random weights, fixed keep "
             "counts; CPU, {threads} threads, fp32. *module calls*: every parameterised module selection ran, each "
             "timed alone on its own input; *reused*: the pruning layer's norm and key projection on the rows it "
             "keeps (it reads them from selection); *floor* = module calls - reused; *other* = selection - module "
             "calls (RoPE, scores, masks, softmax, top-k, gathers, dispatch). Shares are of RCP's prefill.".format(
                 threads=torch.get_num_threads()), ""]
    for r in results:
        prefill, ideal = r["prefill_ms"]["rcp"], r["prefill_ms"]["ideal"]
        lines += [f"## Batch size {r['batch_size']}: RCP prefill {prefill:.1f} ms, ideal {ideal:.1f} ms "
                  f"(×ideal {r['prefill_ms']['x_ideal']:.2f}, median of the rounds' ratios)", "",
                  "| point | layer | rows | candidates | kept | kept rows | selection ms | module calls ms | reused ms "
                  "| floor ms | other ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in r["points"]:
            lines.append(f"| {p['point']} | {p['layer']} | {p['rows']} | {p['candidates']} | {p['kept']} | "
                         f"{p['kept_rows']} | {p['selection_ms']:.2f} | {p['module_calls_ms']:.2f} | "
                         f"{p['reused_ms']:.2f} | {p['floor_ms']:.2f} | {p['other_ms']:.2f} |")
        total = {k: sum(p[k] for p in r["points"]) for k in
                 ("selection_ms", "module_calls_ms", "reused_ms", "floor_ms", "other_ms")}
        share = {k: 100 * v / prefill for k, v in total.items()}
        lines += [f"| all | | | | | | {total['selection_ms']:.2f} ({share['selection_ms']:.1f}%) | "
                  f"{total['module_calls_ms']:.2f} ({share['module_calls_ms']:.1f}%) | "
                  f"{total['reused_ms']:.2f} ({share['reused_ms']:.1f}%) | "
                  f"**{total['floor_ms']:.2f} ({share['floor_ms']:.1f}%)** | "
                  f"{total['other_ms']:.2f} ({share['other_ms']:.1f}%) |", "",
                  "Module calls (ms, summed over the points): " + ", ".join(
                      f"{name} {ms:.2f}" for name, ms in sorted(_by_module(r["points"]).items(),
                                                              key=lambda kv: -kv[1])), ""]
        rcp, ideal = r["aten_calls"]["rcp"], r["aten_calls"]["ideal"]
        lines += ["Aten calls of one prefill (views included): RCP {}, ideal {} ({:+d}: {:.1f} decoder layers' worth at "
                  "{:.0f} per layer). Per pruning point, selection / rest of `prune`: RCP {}; ideal {}. In all decoder "
                  "layers: RCP {}, ideal {} (RCP's pruning layers read their keys from the prior); outside "
                  "layers and pruning: {} and {}.".format(
                      rcp["total"], ideal["total"], rcp["total"] - ideal["total"],
                      (rcp["total"] - ideal["total"]) / ideal["per_layer"], ideal["per_layer"],
                      ", ".join(f"{p['selection']} / {p['prune']}" for p in rcp["points"]),
                      ", ".join(f"{p['selection'] or 0} / {p['prune']}" for p in ideal["points"]),
                      rcp["layers"], ideal["layers"], rcp["outside"], ideal["outside"]), ""]
    return "\n".join(lines)


def _by_module(points):
    """Module calls summed over points, by the module's role (the pruning layer's modules under one name)."""
    totals = {}
    for p in points:
        for name, _, ms in p["calls"]:
            parts = name.split(".")
            if "layers" in parts:  # language_model.layers.4.self_attn.k_proj -> layer.self_attn.k_proj
                name = "layer." + ".".join(parts[parts.index("layers") + 2:])
            elif "pruners" in parts:  # rcp_plugins.pruners.4.visual_proj -> pruner.visual_proj
                name = "pruner." + ".".join(parts[parts.index("pruners") + 2:])
            totals[name] = totals.get(name, 0.0) + ms
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", choices=efficiency.CPU_PRESETS,
                        help="a CPU preset of benchmarks/efficiency.py")
    parser.add_argument("--budget", type=int, default=128, choices=[192, 128, 64],
                        help="the RCP schedule (visual tokens of 576, the paper's three)")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing profile in --output_dir.")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--batch_sizes: {args.batch_sizes!r} is not a comma-separated list of integers, "
                         "e.g. 1,8.") from None
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"--batch_sizes ({args.batch_sizes}) must be >= 1.")
    stem = os.path.join(args.output_dir, f"selection_profile_{args.preset}_cpu_rcp-{args.budget}")
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite, choose="--output_dir")  # it has no --name
    torch.set_num_threads(args.threads)
    results = []
    for bsz in batch_sizes:
        points, prefill, calls = profile(args.preset, args.budget, bsz, args.repeats)
        results.append({"method": f"rcp-{args.budget}", "preset": args.preset, "batch_size": bsz,
                        "repeats": args.repeats, "points": points, "prefill_ms": prefill, "aten_calls": calls})
    command = command_line(__file__, argv)
    text = markdown(results, command)
    write_results(stem, text, {"command": command, "results": results}, overwrite=args.overwrite)
    print(text)
    return results


if __name__ == "__main__":
    main()
