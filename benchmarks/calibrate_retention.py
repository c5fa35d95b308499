"""Calibrate a trained RCP model's inference retention to its target, and show the test accuracy before and after.

    python benchmarks/calibrate_retention.py --model outputs/rcp_tiny/model --name calibration_tiny

Shifts every pruner's bias by one common amount (`train_rcp.calibrate_retention`: bisection on the validation split,
until the mean inference retention is within 5% of `visual_token_budget / N`), then evaluates the adaptive threshold
on the test split. Writes NAME.json / NAME.md into --output_dir (default: outputs/benchmarks; pass
benchmarks/results to commit the table). The retention is averaged over the layers the model was trained to
average over: the `sparsity_layers` in the metrics.json train_rcp.py wrote beside OUTPUT_DIR/model ('all' for the
main job on the deep testbed, 'from_first_pruner' for the tiny one); --all_layers / --from_first_pruner choose
(needed for a model without that record).
"""

import argparse
import os
import sys


def main(argv=None):
    import train_rcp
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.evaluation import EvalData, data_folder, evaluate_model, load_base_model, load_saved_dataset
    from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                                   write_results)

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A trained RCP folder (train_rcp.py's OUTPUT_DIR/model).")
    parser.add_argument("--data", default="testbed",
                        help="Dataset folder, or testbed (the main job's, deep) / testbed:PRESET (default: testbed).")
    parser.add_argument("--max_samples", type=positive_int, default=None, help="Test samples (default: all).")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--all_layers", action="store_true",
                        help="Retention over all decoder layers (default: as the model was trained, from "
                             "OUTPUT_DIR/metrics.json).")
    layers.add_argument("--from_first_pruner", action="store_true",
                        help="Retention over the decoder layers from the first pruner on.")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of NAME.md / NAME.json (default {DEFAULT_OUTPUT_DIR}; committed tables: "
                             "benchmarks/results).")
    parser.add_argument("--name", type=result_name, default="calibration")
    parser.add_argument("--overwrite", action="store_true", help="Replace NAME.md / NAME.json in --output_dir.")
    args = parser.parse_args(argv)
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)  # before anything loads
    # The data's layout before the model loads: a BENCHMARK:PATH was datasets' "Directory not found" after it, and
    # one split's folder (not the DatasetDict) "Column 'test' doesn't exist".
    layout = ("pass testbed, testbed:PRESET or a `save_to_disk` DatasetDict folder with a 'test' split and a "
              "'validation' (or 'train') split to calibrate on")
    data_dir = data_folder(args.data)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data {args.data!r} is not a dataset folder; {layout}.")
    splits = load_saved_dataset(data_dir)
    if not hasattr(splits, "keys"):
        raise ValueError(f"--data {args.data!r} is one split's folder, not a DatasetDict; {layout} (e.g. the "
                         "folder above it).")
    job = train_rcp.RcpJobArguments()
    missing = [s for s in ("test",) if s not in splits] + (
        [] if job.eval_split in splits or job.train_split in splits else [f"{job.eval_split} or {job.train_split}"])
    if missing:
        raise ValueError(f"--data {args.data!r} has the splits {list(splits)}, not {missing}; {layout}.")
    first = trained_from_first_pruner(args) if not (args.all_layers or args.from_first_pruner) \
        else args.from_first_pruner
    model, processor = load_base_model(args.model)
    if model.config.pruning_method != "rcp" or not model.config.pruning_layers:  # was KeyError 'retention_...'
        raise ValueError(f"--model {args.model!r} prunes with {model.config.pruning_method!r} at layers "
                         f"{list(model.config.pruning_layers)}: calibration shifts RCP's pruner biases; pass a "
                         "trained RCP folder (train_rcp.py's OUTPUT_DIR/model).")
    test = splits["test"]
    if args.max_samples is not None:  # 0 meant "all"; it is refused at parsing now
        test = test.select(range(min(args.max_samples, len(test))))
    collator = RcpDataCollator(processor)
    data = EvalData("testbed", test, "test")

    def measure():
        result = evaluate_model(model, processor, data)
        key = "retention_from_first_point" if first else "retention_all_layers"
        return {"accuracy": result["score"], "families": result["groups"], "retention": result[key],
                "kept_per_pruning_layer": result["kept_per_point"]}

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
    write_results(stem, markdown="\n".join(lines) + "\n", data=out, overwrite=args.overwrite)
    print("\n".join(lines))
    return out


def trained_from_first_pruner(args):
    """Whether the run that trained --model averaged its retention from the first pruner: `sparsity_layers` in
    train_rcp.py's OUTPUT_DIR/metrics.json beside OUTPUT_DIR/model. (The script assumed it always did: on the main
    job's deep testbed, trained over all layers, it calibrated to 1.5x the budget the model was trained to.)"""
    import json

    record = os.path.join(os.path.dirname(os.path.abspath(args.model)), "metrics.json")
    layers = None
    if os.path.isfile(record):
        try:
            with open(record, encoding="utf-8") as f:
                layers = json.load(f).get("sparsity_layers")
        except (OSError, ValueError, AttributeError):
            layers = None
    if layers not in ("all", "from_first_pruner"):
        raise ValueError(f"--model {args.model!r}: no train_rcp.py record beside it ({record}, with "
                         "`sparsity_layers`) says which layers its retention was trained over; pass --all_layers "
                         "or --from_first_pruner.")
    return layers == "from_first_pruner"


if __name__ == "__main__":
    main()
