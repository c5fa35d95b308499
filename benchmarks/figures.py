"""Figures (PNG, matplotlib): representation drift (the paper's Figs. 1 and 3), pruning masks (Fig. 4) and
accuracy vs. kept tokens.

    python benchmarks/figures.py --model outputs/rcp_tiny/model --data testbed:tiny --name tiny   # drift + masks
    python benchmarks/figures.py --table benchmarks/results/table1_tiny.json --name tiny   # accuracy vs tokens

* drift_NAME.png: per decoder layer, W2 (Eq. 18) between the answer-position hidden states of the pruned model
  and of the full model, mean over `--num_samples` testbed samples, in the "mask" layout (positions line up).
  Lines: RCP with its repair adapters, RCP without them (same kept sets), and the same model without repair given
  attention top-k and random kept sets at the same counts. All at the fixed counts of `--budget`
  (`rcp_llava.schedule.rcp_keep_counts`).
* masks_NAME.png: for `--num_images` test images (fewer only when the split has fewer rows), the patches kept after
  each pruning layer (dropped patches dimmed), the answer's evidence patches outlined in red. The images are drawn
  from the first max(--num_samples, --num_images) rows, round-robin over the question families: the first row of
  each family, then the second of each, ...; shown in row order.
* accuracy_vs_tokens_NAME.png: from an `evaluate_methods.py` JSON, score vs. average visual tokens per layer,
  over all layers (left) and over the layers from the first pruning point (right).
Each run also writes figures_NAME.md (or accuracy_vs_tokens_NAME.md) with the command and the plotted numbers.
"""

import argparse
import json
import os
import sys


from modeling_rcp_llava import write_text
from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, publish, refuse_existing, result_name,
                               save_figure)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_drift(curves, path, title=None):
    """curves: `{label: [W2 per decoder layer]}` -> a line plot (log y when all values are positive)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["-o", "--s", ":^", "-.v", "-x"]
    for (label, values), style in zip(curves.items(), styles * 3):
        ax.plot(range(len(values)), values, style, label=label)
    values = [v for vs in curves.values() for v in vs]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("W2 to the full model (answer positions)")
    ax.set_xticks(range(max(len(v) for v in curves.values())))
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_masks(rows, keep_masks, pruning_points, path, title=None):
    """rows: testbed rows (image, question, answer, evidence_patches, grid_size); keep_masks: (B, P, N)."""
    import numpy as np

    plt = _plt()
    from matplotlib.patches import Rectangle

    batch, num_points = len(rows), len(pruning_points)
    fig, axes = plt.subplots(batch, num_points + 1, figsize=(2.3 * (num_points + 1), 2.5 * batch), squeeze=False)
    for b, row in enumerate(rows):
        image = np.asarray(row["image"].convert("RGB"), dtype=np.float32) / 255
        grid = int(row["grid_size"])
        cell = image.shape[0] / grid
        columns = [("input", None)] + [
            (f"after {'the projector (pre-LLM)' if p == 0 else f'pruner @ layer {p}'}", keep_masks[b, i])
            for i, p in enumerate(pruning_points)]
        for c, (name, mask) in enumerate(columns):
            ax = axes[b, c]
            shown = image.copy()
            if mask is not None:
                keep = mask.reshape(grid, grid).cpu().numpy().astype(bool)
                dim = np.kron(keep, np.ones((int(cell), int(cell)), dtype=bool))[..., None]
                shown = np.where(dim, shown, 0.15 + 0.25 * shown)
                name += f": {int(keep.sum())} kept"
            ax.imshow(shown, interpolation="nearest")
            for patch in row["evidence_patches"]:
                r, col = divmod(int(patch), grid)
                ax.add_patch(Rectangle((col * cell - 0.5, r * cell - 0.5), cell, cell, fill=False, edgecolor="red",
                                       linewidth=1.2))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{row['question']}\n-> {row['answer']}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_tokens(result, path, title=None):
    """result: one `evaluate_grid` result (a dict with "rows"), or a list of them (an `evaluate_methods.py` run on
    several datasets: one row of plots each)."""
    results = [result] if isinstance(result, dict) else list(result)
    plt = _plt()
    fig, grid = plt.subplots(len(results), 2, figsize=(10, 4 * len(results)), sharey="row", squeeze=False)
    for axes, result in zip(grid, results):
        rows = result["rows"]
        for ax, key, name in ((axes[0], "avg_tokens_all_layers", "over all layers"),
                              (axes[1], "avg_tokens_from_first_point", "from the first pruning point")):
            for method in dict.fromkeys(r["label"] for r in rows):
                points = sorted(((r[key], r["score"]) for r in rows if r["label"] == method))
                if method == "none":
                    ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="full (none)")
                    continue
                marker = "*" if "adaptive" in method else "o"
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=method,
                        markersize=9 if marker == "*" else 5, linestyle="-" if len(points) > 1 else "none")
            ax.set_xlabel(f"visual tokens per decoder layer ({name})")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(result.get("metric", "score"))
        axes[1].legend(fontsize=8)
        heading = f"{result['data']}: score vs. kept visual tokens (N = {result['num_visual_tokens']})"
        if len(results) > 1:
            axes[0].set_title(heading, fontsize=9, loc="left")
    if title or len(results) == 1:
        fig.suptitle(title or heading, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


TABLE_ROW_KEYS = ("label", "budget", "score", "avg_tokens_all_layers", "avg_tokens_from_first_point")


def read_table(path):
    """The `evaluate_methods.py` JSON `path` (`{"command", "results": [{"data", "num_visual_tokens", "rows": [...]}]}`),
    checked before anything is plotted: an empty file, `{}` or another script's JSON (ablations') failed with a bare
    JSONDecodeError / KeyError."""
    expected = ("expected the JSON evaluate_methods.py writes (NAME.json: {\"command\", \"results\": [{\"data\", "
                "\"num_visual_tokens\", \"rows\": [...]}]})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--table {path!r}: no such file; {expected}.")
    try:
        with open(path) as f:
            table = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"--table {path!r}: not JSON ({error}); {expected}.") from None
    results = table.get("results") if isinstance(table, dict) else None
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise ValueError(f"--table {path!r}: no \"results\" list; {expected}.")
    for result in results:
        rows = result.get("rows")
        missing = [k for k in ("data", "num_visual_tokens") if k not in result]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            missing.append("rows")
        else:
            missing += sorted({f"rows[].{k}" for r in rows for k in TABLE_ROW_KEYS if k not in r})
        if missing:
            raise ValueError(f"--table {path!r}: a result lacks {missing}; {expected}.")
    return table


def accuracy_markdown(table, command, figure):
    """accuracy_vs_tokens_NAME.md: the figure's file name (`figure`), the command and, per dataset, the plotted
    numbers."""
    lines = [f"# {figure}", "", f"Command: `{command}` (data: `{table.get('command')}`)"]
    for result in table["results"]:
        # n per row: a score without its sample count reads as more certain than 200 samples make it
        lines += ["", f"{result['data']} (N = {result['num_visual_tokens']}), {result.get('metric', 'score')} vs. "
                      "visual tokens per decoder layer; *n*: samples scored:", "",
                  "| method | budget | tokens/layer (all layers) | tokens/layer (from the first pruning point) "
                  "| score | n |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['budget']} | {r['avg_tokens_all_layers']:.1f} | "
                  f"{r['avg_tokens_from_first_point']:.1f} | {r['score']:.3f} | "
                  f"{r.get('n', result.get('num_samples', '–'))} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def mask_examples(rows, count):
    """`count` rows (fewer only if `rows` has fewer) spread over the question families: the first row of each family
    in order of appearance, then the second of each, ... (one per family gave 5 images for `--num_images 6`)."""
    by_family = {}
    for index, row in enumerate(rows):
        by_family.setdefault(row["family"], []).append(index)
    picked = []
    for rank in range(max((len(v) for v in by_family.values()), default=0)):
        picked += [indices[rank] for indices in by_family.values() if rank < len(indices)]
    return [rows[i] for i in sorted(picked[:count])]


def drift_and_masks(base, processor, rows, budget="1/9", mask_rows=None, seed=0):
    """Compute the drift curves and the RCP masks at the fixed counts of `budget`. Returns a dict."""
    from rcp_llava.evaluation import (
        keep_masks_of,
        method_model,
        method_overrides,
        nested_random_masks,
        representation_drift,
    )
    from rcp_llava.schedule import budget_count, parse_budget

    config = base.config
    label, fraction = parse_budget(budget)
    k = budget_count(fraction, config.num_visual_tokens)
    rcp = method_model(base, **method_overrides("rcp", k, config))
    topk = method_model(base, **method_overrides("attention_topk", k, config))
    counts = rcp.config.pruning_keep_counts
    topk_masks, _ = keep_masks_of(topk, processor, rows)
    forced = {"attention top-k, no repair": topk_masks,
              "random, no repair": nested_random_masks(counts, len(rows), config.num_visual_tokens, seed)}
    drift = representation_drift(rcp, processor, rows, forced=forced)
    curves = {"RCP with repair adapters": drift["with_repair"], "RCP without repair": drift["without_repair"],
              **drift["forced"]}
    out = {"budget": label, "k": k, "counts": counts, "pruning_layers": list(rcp.config.pruning_layers),
           "repair_layers": list(rcp.config.repair_layers), "num_samples": len(rows), "curves": curves}
    if mask_rows is not None:
        masks, points = keep_masks_of(rcp, processor, mask_rows)
        out["masks"], out["mask_points"] = masks, points
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="RCP folder (drift + masks).")
    parser.add_argument("--plugins", default=None)
    parser.add_argument("--data", default="testbed",
                        help="testbed (the main job's, deep), testbed:PRESET, or a dataset folder in the testbed format.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--budget", default="1/9")
    parser.add_argument("--num_samples", type=positive_int, default=64, help="Samples the drift is averaged over.")
    parser.add_argument("--num_images", type=positive_int, default=3,
                        help="Mask examples, spread over the question families (see above).")
    parser.add_argument("--table", default=None, help="An evaluate_methods.py JSON: accuracy vs tokens.")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of the figures (default {DEFAULT_OUTPUT_DIR}; committed ones: benchmarks/results).")
    parser.add_argument("--name", type=result_name, default="figures")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing figures of NAME in --output_dir.")
    parser.add_argument("--threads", type=positive_int, default=None)
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)
    if not args.model and not args.table:
        parser.error("Give --model (drift + masks) and/or --table (accuracy vs tokens).")
    out = lambda stem: os.path.join(args.output_dir, stem)  # noqa: E731
    planned = ([out(f"drift_{args.name}.png"), out(f"masks_{args.name}.png"), out(f"figures_{args.name}.md")]
               if args.model else [])
    planned += [out(f"accuracy_vs_tokens_{args.name}.png"), out(f"accuracy_vs_tokens_{args.name}.md")] if args.table else []
    refuse_existing(planned, args.overwrite)  # before anything loads
    # The drift and the masks read testbed rows (families, evidence patches, grid size): a reader benchmark's
    # records failed after the model loaded ("'VqaRecord' object is not subscriptable").
    data = os.fspath(args.data)
    if args.model and ":" in data and not data.startswith("testbed:") and not os.path.isdir(data):
        raise ValueError(f"--data {args.data!r}: the drift and mask figures need testbed rows (evidence patches); pass "
                         "testbed, testbed:PRESET or a dataset folder in the testbed format.")
    table = read_table(args.table) if args.table else None  # before the model loads
    files = []  # (path, write(tmp)) of everything this run writes, published together at the end
    if args.model:
        import torch

        from rcp_llava.evaluation import load_base_model, load_data
        from rcp_llava.schedule import parse_budget

        # The budget and the data (its split) before the model: both failed only after it loaded, the budget
        # naming no flag.
        try:
            parse_budget(args.budget)
        except ValueError as error:
            raise ValueError(f"--budget {args.budget!r}: {error}") from None
        data = load_data(args.data, split=args.split, max_samples=max(args.num_samples, args.num_images))
        loaded = [data.rows[i] for i in range(len(data))]
        rows = loaded[:args.num_samples]  # the drift's samples; the mask examples may reach further
        picks = mask_examples(loaded, args.num_images)
        if args.threads:
            torch.set_num_threads(args.threads)
        base, processor = load_base_model(args.model, plugins=args.plugins)
        result = drift_and_masks(base, processor, rows, args.budget, mask_rows=picks)
        title = (f"{len(rows)} samples, budget {result['budget']} (k={result['k']}): keep {result['counts']} after "
                 f"layers {result['pruning_layers']}, repair after {result['repair_layers']}")
        layers = len(next(iter(result["curves"].values())))
        drift_path, masks_path = out(f"drift_{args.name}.png"), out(f"masks_{args.name}.png")

        def figures_markdown(final):  # names the PNGs as published (NAME-2 beside a run that took NAME)
            lines = [f"# Figures: {os.path.basename(final(drift_path))}, {os.path.basename(final(masks_path))}", "",
                     f"Command: `{command}`", "", f"Model `{args.model}`. {title}.", "",
                     "W2 (Eq. 18) to the full model at the answer positions, mean over samples, per decoder layer:", "",
                     "| curve | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
                     "|---|" + "---|" * layers]
            for name, values in result["curves"].items():
                lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
            lines += ["", "Mask examples: " + "; ".join(f"{r['question']} -> {r['answer']}" for r in picks)]
            return "\n".join(lines) + "\n"

        files += [(drift_path, lambda tmp, final: plot_drift(result["curves"], tmp, title=title)),
                  (masks_path, lambda tmp, final: plot_masks(
                      picks, result["masks"], result["mask_points"], tmp,
                      title=f"RCP kept patches at budget {result['budget']} (counts {result['counts']}); red: evidence")),
                  (out(f"figures_{args.name}.md"), lambda tmp, final: write_text(tmp, figures_markdown(final)))]
    if table is not None:
        figure = out(f"accuracy_vs_tokens_{args.name}.png")
        # every dataset of the run (only the first was plotted)
        files += [(figure, lambda tmp, final: plot_accuracy_vs_tokens(table["results"], tmp)),
                  (out(f"accuracy_vs_tokens_{args.name}.md"), lambda tmp, final: write_text(
                      tmp, accuracy_markdown(table, command, os.path.basename(final(figure)))))]
    # One publish: a file another run (same --name) wrote meanwhile is kept unless --overwrite, and this run's
    # files all go beside it under one numbering (the figures replaced it before).
    written = [path for path in publish(files, overwrite=args.overwrite) if path.endswith(".png")]
    print("wrote " + ", ".join(written))
    return written


if __name__ == "__main__":
    main()
