"""One evaluation command: pruning methods x budgets, a Table-I-style markdown table + JSON.

    python benchmarks/evaluate_methods.py --model outputs/rcp_tiny/model                 # tiny testbed, test split
    python benchmarks/evaluate_methods.py --model DIR --data testbed --max_samples 500 \
        --methods none,rcp,vispruner,fastv,random --budgets 1/3,2/9,1/9 --name table1_tiny
    python benchmarks/evaluate_methods.py --model llava-1.5-7b-hf/ --plugins rcp_plugins/ --data vqav2:/data/vqav2 \
        --data pope:/data/pope/coco --max_samples 1000 --batch_size 8

`--model`: an RCP folder (`train_rcp.py`'s OUT/model) or a stock LLaVA folder (+ `--plugins`). It loads once;
every method is a model sharing its backbone (`rcp_llava.evaluation.method_model`). `--data` (repeatable):
`testbed` (the tiny testbed), a `save_to_disk` folder in the testbed format, or BENCHMARK:PATH (see
`rcp_llava.readers`). How budgets become per-method counts: `rcp_llava.evaluation` (module docstring).
"""

import argparse
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="RCP folder or stock LLaVA folder.")
    parser.add_argument("--plugins", default=None, help="Plug-in folder for a stock --model (from_base).")
    parser.add_argument("--data", action="append", default=None,
                        help="testbed | DATASET_DIR | BENCHMARK:PATH (repeat for several; default: testbed).")
    parser.add_argument("--split", default="test", help="Split of a DatasetDict folder.")
    parser.add_argument("--methods", default="none,rcp,vispruner,fastv,random")
    parser.add_argument("--budgets", default="1/3,2/9,1/9", help="Fractions of the N visual tokens.")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Reader benchmarks (generate).")
    parser.add_argument("--fastv_layer", type=int, default=None, help="FastV's K (default 1 if <= 8 layers, else 2).")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default="evaluation", help="Output stem: NAME.md and NAME.json.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace NAME.md / NAME.json in --output_dir (refused otherwise: results are not lost).")
    parser.add_argument("--plugins_per_budget", default=None,
                        help="One RCP plug-in set per budget, e.g. '1/3=runs/b/budget_1_3/plugins,1/9=...' (the "
                             "folders `train_rcp.py --budgets` writes): RCP's rows at that budget use that set.")
    return parser


def parse_plugins_per_budget(text):
    """'1/3=dir,1/9=dir' -> {'1/3': 'dir', '1/9': 'dir'}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        label, sep, folder = item.partition("=")
        if not sep or not label.strip() or not folder.strip():
            raise ValueError(f"--plugins_per_budget item {item!r} is not BUDGET=FOLDER (e.g. 1/9=runs/x/plugins).")
        if not os.path.isdir(folder.strip()):
            raise FileNotFoundError(f"--plugins_per_budget: no plug-in folder {folder.strip()!r} for {label.strip()}.")
        out[label.strip()] = folder.strip()
    return out


def main(argv=None):
    import torch

    from rcp_llava.evaluation import evaluate_grid, format_table, load_base_model, load_data

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/evaluate_methods.py " + " ".join(argv)
    for flag, value in (("--batch_size", args.batch_size), ("--max_samples", args.max_samples),
                        ("--max_new_tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} is {value}; it must be a positive number.")
    existing = [p for p in (os.path.join(args.output_dir, args.name + ext) for ext in (".md", ".json"))
                if os.path.exists(p)]
    if existing and not args.overwrite:  # before anything loads
        raise FileExistsError(f"{', '.join(existing)} already exist: choose another --name or pass --overwrite.")
    plugins_per_budget = parse_plugins_per_budget(args.plugins_per_budget)
    base, processor = load_base_model(args.model, plugins=args.plugins)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    results = []
    for spec in args.data or ["testbed"]:
        data = load_data(spec, split=args.split, max_samples=args.max_samples)
        results.append(evaluate_grid(base, processor, data, methods, budgets, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, fastv_layer=args.fastv_layer,
                                     progress=not args.no_progress,
                                     plugins_per_budget=plugins_per_budget))
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, args.name)
    markdown = [f"# Pruning methods x budgets: {', '.join(r['data'] for r in results)}", "",
                f"Command: `{command}`", ""]
    for result in results:
        markdown.append(format_table(result))
    with open(stem + ".md", "w") as f:
        f.write("\n".join(markdown))
    for result in results:  # predictions stay out of the JSON; rows hold scores and counts only
        for row in result["rows"]:
            row.pop("predictions", None)
    with open(stem + ".json", "w") as f:
        json.dump({"command": command, "methods": methods, "budgets": budgets, "results": results}, f, indent=2)
    print("\n".join(markdown))
    print(f"wrote {stem}.md and {stem}.json")
    return results


if __name__ == "__main__":
    main()
