"""The testbed table of a built testbed folder, as markdown: test accuracy overall and per family against chance,
and input-level pruning before the LLM (random / oracle / saliency) at each budget, per family.

    python benchmarks/testbed_report.py --preset deep --output_dir benchmarks/results --name testbed_deep

Reads `metrics.json` only (written by `benchmarks/build_testbed.py`); the table carries the build's command and
the report's own (the JSON: metrics.json plus "report_command").
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rcp_llava.results import DEFAULT_OUTPUT_DIR, command_line, refuse_existing, result_name, write_results
from rcp_llava.schedule import parse_budget


# What `format_report` reads: top-level keys, and the keys inside the nested ones.
REQUIRED = {"preset": (), "command": (), "num_visual_tokens": (), "test": ("overall", "n", "families"),
            "validation": ("overall", "n")}


def read_metrics(path):
    """metrics.json at `path`, with every key the report reads (a missing one was a bare KeyError: 'test')."""
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error}); rebuild the testbed (benchmarks/build_testbed.py).") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: not a JSON object; rebuild the testbed (benchmarks/build_testbed.py).")
    for key, inner in REQUIRED.items():
        value = metrics.get(key)
        missing = [key] if key not in metrics else [f"{key}.{k}" for k in inner
                                                    if not isinstance(value, dict) or k not in value]
        if missing:
            raise ValueError(f"{path} lacks the key {missing[0]!r} (not a testbed build's metrics.json, or from an "
                             "older build); rebuild the testbed (benchmarks/build_testbed.py).")
    return metrics


def format_report(metrics, folder, report_command=None):
    families = sorted(metrics["test"]["families"])
    chance = metrics.get("chance", {})
    times = metrics.get("build_times", {})
    lines = [f"# Testbed `{metrics['preset']}`: {folder}", "",
             f"Built by: `{metrics['command']}`" + (f"; evaluated by `{metrics['evaluated_by']}`"
                                                    if metrics.get("evaluated_by") else "")
             + (f"; reported by `{report_command}`" if report_command else ""),
             (f"Build times (s): {', '.join(f'{k} {v}' for k, v in sorted(times.items()))}; total "
              f"{sum(times.values()):.0f} s." if not metrics.get("build_resumed") else
              f"Build times (s) as recorded: {', '.join(f'{k} {v}' for k, v in sorted(times.items()))}; the model's "
              "last run reused stages an earlier run trained (an interrupted build, or `model/` deleted to retrain), "
              "whose time is not counted, so they sum to no total."), "",
             f"Test accuracy **{metrics['test']['overall']:.3f}** on {metrics['test']['n']} samples (validation "
             f"{metrics['validation']['overall']:.3f} on {metrics['validation']['n']}); N = "
             f"{metrics['num_visual_tokens']} visual tokens.", "",
             "| family | " + " | ".join(families) + " |", "|---|" + "---|" * len(families),
             "| test accuracy | " + " | ".join(f"{metrics['test']['families'][f]:.3f}" for f in families) + " |",
             "| chance | " + " | ".join(f"{chance.get(f, float('nan')):.3f}" for f in families) + " |"]
    pruning = metrics.get("pruning")
    if pruning:
        lines += ["", "Input-level pruning before the LLM (overall, then per family; kept tokens per image):", "",
                  "| pruner | budget | kept | overall | " + " | ".join(families) + " |",
                  "|---|---|---|---|" + "---|" * len(families)]
        for name, rows in pruning.items():
            # each pruner's own budgets (the first pruner's were read for all: a KeyError where the sets differed)
            for budget in sorted(rows, key=lambda b: -parse_budget(b)[1]):  # 1/3, 2/9, 1/9
                r = rows[budget]
                lines.append(f"| {name} | {budget} | {r['kept_visual_tokens']:.0f} | {r['overall']:.3f} | "
                             + " | ".join(f"{r['families'][f]:.3f}" for f in families) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from rcp_llava.testbed import MAIN_PRESET, PRESETS, default_cache_dir

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=MAIN_PRESET, choices=sorted(PRESETS),
                        help=f"Read $RCP_LLAVA_CACHE/testbed/PRESET (or --folder); default {MAIN_PRESET}, the main job's.")
    parser.add_argument("--folder", default=None, help="A built testbed folder (holds metrics.json).")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--name", type=result_name, default=None, help="Output stem (default testbed_PRESET).")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else default_cache_dir(args.preset)
    path = folder / "metrics.json"
    if not path.is_file():
        # The exact command: build_testbed.py's default preset once differed from this report's.
        build = shlex.join(["python", "benchmarks/build_testbed.py", "--preset", args.preset]
                           + (["--output_dir", args.folder] if args.folder else []))
        raise FileNotFoundError(f"{path}: no metrics.json; build the testbed first: `{build}`"
                                + (", with the --preset meant for that folder." if args.folder else "."))
    metrics = read_metrics(path)
    stem = os.path.join(args.output_dir, args.name or f"testbed_{metrics['preset']}")
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)
    # The build's own command stays under "command"; this report's was recorded nowhere.
    command = command_line(__file__, argv)
    markdown = format_report(metrics, folder, report_command=command)
    write_results(stem, markdown=markdown, data={**metrics, "report_command": command}, overwrite=args.overwrite)
    print(markdown)
    return metrics


if __name__ == "__main__":
    main()
