"""Calibrate a trained RCP model's inference retention to its target, and show the test accuracy before and after.

    python benchmarks/calibrate_retention.py --model outputs/rcp_tiny/model --name calibration_tiny

Shifts every pruner's bias by one common amount (`train_rcp.calibrate_retention`: bisection on the validation split,
until the mean inference retention is within 5% of `visual_token_budget / N`), then evaluates the adaptive threshold
on the test split. Writes NAME.json / NAME.md into --output_dir (default: outputs/benchmarks; pass
benchmarks/results to commit the table). The retention is averaged the way the testbed job trains it (over the
layers from the first pruner) unless --all_layers.
"""

import argparse
import os
import sys


def main(argv=None):
    from datasets import load_from_disk

    import train_rcp
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.evaluation import EvalData, data_folder, evaluate_model, load_base_model
    from rcp_llava.results import DEFAULT_OUTPUT_DIR, command_line, refuse_existing, write_results

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained RCP folder (train_rcp.py's OUTPUT_DIR/model).")
    parser.add_argument("--data", default="testbed",
                        help="Dataset folder, or testbed (the main job's, deep) / testbed:PRESET (default: testbed).")
    parser.add_argument("--max_samples", type=int, default=None, help="Test samples (default: all).")
    parser.add_argument("--all_layers", action="store_true", help="Retention over all decoder layers.")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of NAME.md / NAME.json (default {DEFAULT_OUTPUT_DIR}; committed tables: "
                             "benchmarks/results).")
    parser.add_argument("--name", default="calibration")
    parser.add_argument("--overwrite", action="store_true", help="Replace NAME.md / NAME.json in --output_dir.")
    args = parser.parse_args(argv)
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)  # before anything loads
    args.data = data_folder(args.data)
    model, processor = load_base_model(args.model)
    splits = load_from_disk(args.data)
    test = splits["test"]
    if args.max_samples:
        test = test.select(range(min(args.max_samples, len(test))))
    collator = RcpDataCollator(processor)
    data = EvalData("testbed", test, "test")
    first = not args.all_layers

    def measure():
        result = evaluate_model(model, processor, data)
        key = "retention_from_first_point" if first else "retention_all_layers"
        return {"accuracy": result["score"], "families": result["groups"], "retention": result[key],
                "kept_per_pruning_layer": result["kept_per_point"]}

    job = train_rcp.RcpJobArguments()
    before = measure()
    calibration = train_rcp.calibrate_retention(model, processor, splits, collator, job, from_first_pruner=first)
    after = measure()
    command = command_line(__file__, argv)
    out = {"command": command, "model": args.model, "test_samples": len(test), "calibration": calibration,
           "before": before, "after": after}
    target = calibration["target"]
    lines = [f"# Retention calibration: {args.model}", "", f"Command: `{command}`", "",
             f"Bias shift {calibration['bias_shift']:+.3f} (bisection on {calibration['n']} "
             f"{calibration['split']!r} rows); target retention {target:.3f} "
             f"({'from the first pruner' if first else 'all layers'}); {len(test)} test samples.", "",
             "| | test accuracy | test retention | retention / target | kept per pruning layer |", "|---|---|---|---|---|"]
    for name, r in (("before", before), ("after", after)):
        kept = ", ".join(f"{c:.1f}" for c in r["kept_per_pruning_layer"])
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['retention']:.3f} | {r['retention'] / target:.2f} | {kept} |")
    write_results(stem, markdown="\n".join(lines) + "\n", data=out)
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
