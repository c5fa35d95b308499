"""One evaluation command: pruning methods x budgets, a Table-I-style markdown table + JSON.

    python benchmarks/evaluate_methods.py --model outputs/rcp_deep/model     # the main job's model and testbed
    python benchmarks/evaluate_methods.py --model outputs/rcp_tiny/model --data testbed:tiny \
        --methods none,rcp,vispruner,fastv,random,attention_topk --budgets 1/3,2/9,1/9 --name table1_tiny
    python benchmarks/evaluate_methods.py --model llava-1.5-7b-hf/ --plugins rcp_plugins/ --data vqav2:/data/vqav2 \
        --data pope:/data/pope/coco --max_samples 1000 --batch_size 8

`--model`: an RCP folder (`train_rcp.py`'s OUT/model) or a stock LLaVA folder (+ `--plugins`). It loads once;
every method is a model sharing its backbone (`rcp_llava.evaluation.method_model`). `--data` (repeatable):
`testbed` (the main job's testbed, deep), `testbed:PRESET` (e.g. `testbed:tiny` for a model trained on tiny), a
`save_to_disk` folder in the testbed format (image paths relative to `--image_folder`), or BENCHMARK:PATH (see
`rcp_llava.readers`). Every `--data` is read, and every image file it names checked, before the model loads. How
budgets become per-method counts: `rcp_llava.evaluation` (module docstring).
"""

import argparse
import os
import sys

from rcp_llava.results import DEFAULT_OUTPUT_DIR, positive_int, result_name


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="RCP folder or stock LLaVA folder (required unless --rerender).")
    parser.add_argument("--plugins", default=None, help="Plug-in folder for a stock --model (from_base).")
    parser.add_argument("--data", action="append", default=None,
                        help="testbed (the main job's, deep) | testbed:PRESET | DATASET_DIR | BENCHMARK:PATH (repeat "
                             "for several; default: testbed).")
    parser.add_argument("--split", default=None,
                        help="Split of a DatasetDict folder and of ScienceQA-IMG (default: test); refused when no "
                             "--data is read by split.")
    parser.add_argument("--image_folder", default=None,
                        help="Folder the image paths of a dataset folder's image column are relative to (as "
                             "train_rcp.py's --image_folder); a benchmark takes BENCHMARK:PATH,image_dir=DIR.")
    parser.add_argument("--methods", default="none,rcp,vispruner,fastv,random")
    parser.add_argument("--budgets", default="1/3,2/9,1/9", help="Fractions of the N visual tokens.")
    parser.add_argument("--max_samples", type=positive_int, default=None,
                        help="Evaluate at most N samples per --data: the first N rows of a dataset folder; of a "
                             "benchmark, N questions taken in turn from each family (POPE split, MME sub-task, "
                             "answer type, ...; the first N would score only the first POPE file or MME sub-task), "
                             "MME's two questions of an image together (rcp_llava.readers.spread_subset).")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_new_tokens", type=positive_int, default=16, help="Reader benchmarks (generate).")
    parser.add_argument("--fastv_layer", type=int, default=None, help="FastV's K (default 1 if <= 8 layers, else 2).")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of NAME.md / NAME.json (default {DEFAULT_OUTPUT_DIR}; the committed tables "
                             "live in benchmarks/results).")
    parser.add_argument("--name", type=result_name, default="evaluation", help="Output stem: NAME.md and NAME.json.")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads.")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace NAME.md / NAME.json in --output_dir (refused otherwise: results are not lost).")
    parser.add_argument("--flop_matched", action="store_true",
                        help="Every method at budget b averages b*N visual tokens over ALL decoder layers (equal "
                             "decoder compute); cells a placement cannot reach are listed, not run.")
    parser.add_argument("--oracle", action="store_true",
                        help="Testbed data: add an in-decoder oracle row per budget (attention_topk's layers and "
                             "counts, evidence kept first): oracle minus attention_topk is the prior's headroom.")
    parser.add_argument("--rerender", default=None, metavar="RESULTS.json",
                        help="Run no model: rebuild the paired tests and the markdown of a results JSON this script "
                             "wrote (from its rows' per-sample outcomes), written over RESULTS.json and its .md; "
                             "both keep the run's command and record this one. Takes no other flag but --overwrite "
                             "(needed when the .md holds text the JSON does not rebuild).")
    parser.add_argument("--plugins_per_budget", default=None,
                        help="One RCP plug-in set per budget, e.g. '1/3=runs/b/budget_1_3/plugins,1/9=...' (the "
                             "folders `train_rcp.py --budgets` writes): RCP's rows at that budget use that set.")
    return parser


def repeated_budget(labels):
    """`(earlier, later)`: the first two of `labels` that name one budget in any spelling ('1/3' and '0.3333333' are
    both k = 21 of 64), or None."""
    from rcp_llava.schedule import parse_budget

    fractions = {}
    for label in labels:
        fraction = parse_budget(label)[1]
        same = next((b for b, f in fractions.items() if abs(f - fraction) < 1e-6), None)
        if same is not None:
            return same, label
        fractions[label] = fraction
    return None


def parse_plugins_per_budget(text):
    """'1/3=dir,1/9=dir' -> {'1/3': 'dir', '1/9': 'dir'}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        label, sep, folder = item.partition("=")
        if not sep or not label.strip() or not folder.strip():
            raise ValueError(f"--plugins_per_budget item {item!r} is not BUDGET=FOLDER (e.g. 1/9=runs/x/plugins).")
        label, folder = label.strip(), folder.strip()
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--plugins_per_budget: no plug-in folder {folder!r} for {label}.")
        repeat = repeated_budget([*out, label])  # a repeat (in any spelling) kept only the last folder, silently
        if repeat is not None:
            raise ValueError(f"--plugins_per_budget names budget {label!r} twice (as {repeat[0]!r} too): give one "
                             "plug-in folder per budget.")
        out[label] = folder
    return out


def check_grid(args):
    """`(methods, budgets)` of the command line, checked against the registered methods, the budget syntax and
    (for FastV's K) the depth of `--model` read from its config alone: a typo fails before the model loads."""
    from transformers import AutoConfig

    import rcp_llava  # noqa: F401  (registers rcp_llava with the Auto classes)
    from configuration_rcp_llava import PRUNING_METHODS
    from modeling_rcp_llava import check_model_source
    from rcp_llava.schedule import parse_budget

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PRUNING_METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown method(s) {unknown}; choose from "
                         f"{sorted(PRUNING_METHODS)}.")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise ValueError(f"--budgets {args.budgets!r} names no budget; give fractions like '1/3,2/9,1/9'.")
    for flag, given in (("--methods", methods), ("--budgets", budgets)):  # each cell ran twice, a row printed twice
        repeated = sorted({v for v in given if given.count(v) > 1})
        if repeated:
            raise ValueError(f"{flag} names {repeated} more than once; give each once.")
    repeat = repeated_budget(budgets)  # one budget in two spellings ran twice
    if repeat is not None:
        raise ValueError(f"--budgets names one budget twice, as {repeat[0]!r} and {repeat[1]!r}; give it once.")
    if args.oracle and "attention_topk" not in methods:  # was a run without the oracle rows, and exit 0
        raise ValueError(f"--oracle adds a row per attention_topk row (its layers and counts), but --methods "
                         f"{args.methods!r} has no attention_topk; add it.")
    single_layer = [m for m in methods if PRUNING_METHODS[m].max_pruning_layers == 1]  # what --fastv_layer places
    if args.fastv_layer is not None and not single_layer:  # it was recorded in the command and ignored
        raise ValueError(f"--fastv_layer sets the layer K of a single-layer method (fastv), but --methods "
                         f"{args.methods!r} has none; add fastv or drop --fastv_layer.")
    if args.plugins_per_budget and "rcp" not in methods:  # it added RCP rows nobody asked for
        raise ValueError(f"--plugins_per_budget gives RCP's plug-ins per budget, but --methods {args.methods!r} has "
                         "no rcp; add it or drop --plugins_per_budget.")
    if args.plugins_per_budget:
        asked = {parse_budget(b)[0] for b in budgets}
        for label in parse_plugins_per_budget(args.plugins_per_budget):
            if parse_budget(label)[0] not in asked:
                raise ValueError(f"--plugins_per_budget names budget {label!r}, which is not among --budgets "
                                 f"{args.budgets!r}; add it there or drop it here.")
    check_model_source(args.model, "--model")
    if args.fastv_layer is not None:
        config = AutoConfig.from_pretrained(args.model)
        layers = config.text_config.num_hidden_layers
        if isinstance(args.fastv_layer, bool) or not 1 <= args.fastv_layer < layers:
            raise ValueError(f"--fastv_layer {args.fastv_layer} is outside [1, {layers - 1}]: FastV prunes before "
                             f"decoder layer K (counted from 0) of the model's {layers} layers.")
    return methods, budgets


def check_methods_fit_model(args, methods):
    """Methods that prune at an RCP model's layers (rcp, attention_topk) on a stock `--model` without `--plugins`:
    refused from its config alone (it failed in the grid's plan, after the model -- a 7B one -- had loaded)."""
    from transformers import AutoConfig

    from configuration_rcp_llava import PRUNING_METHODS
    from rcp_llava.evaluation import uses_rcp_placement

    placed = [m for m in methods if uses_rcp_placement(PRUNING_METHODS[m])]
    if placed and not args.plugins:
        model_type = AutoConfig.from_pretrained(args.model).model_type
        if model_type != "rcp_llava":
            raise ValueError(f"--methods {placed} prune at an RCP model's layers, but --model {args.model!r} is a "
                             f"stock {model_type!r} checkpoint: give --plugins (an RCP plug-in folder), an RCP "
                             "model folder as --model, or drop those methods.")


# What a re-render changes, recorded with its command: the harness tests only fixed-count references (f75499d), and
# a FLOP-matched table shows each test's compute too (an adaptive row keeps its own number of tokens).
RERENDER_NOTE = "the harness now tests only fixed-count references and shows each test's compute"


def results_markdown(results, command, rerendered=None):
    """NAME.md of `results` (`evaluate_grid`'s, one per --data) run by `command`; `rerendered`: the JSON's record of
    the re-render that rebuilt it since (`{"command", "note"}`, `rerender`), said under the run's own."""
    from rcp_llava.evaluation import format_table

    lines = [f"# Pruning methods x budgets: {', '.join(r['data'] for r in results)}", "", f"Command: `{command}`", ""]
    if rerendered:
        lines += [f"Paired tests re-rendered from the JSON by `{rerendered['command']}` ({rerendered['note']}).", ""]
    return "\n".join(lines + [format_table(result) for result in results])


def _without_paired_tests(markdown):
    """`markdown` less its paired-test sections (a "Paired tests (" line, the blank after it and its table)."""
    out, skipping = [], False
    for line in markdown.splitlines():
        if line.startswith("Paired tests ("):
            skipping = True
        elif skipping and not (line.startswith("|") or not line.strip()):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out).rstrip("\n")


def rerender(path, argv, overwrite=False):
    """Rebuild the paired tests (`paired_tests`, from each row's per-sample "correct") and the markdown of the
    results JSON `path` that this script wrote, without running any model; write PATH and its .md beside it
    atomically. Both keep the run's command and gain the re-render's: a file written before the harness tested
    only fixed-count references (commit f75499d) showed tests against adaptive rows, at their own larger compute.

    Refused (ValueError) when the JSON is not this script's, or when its .md holds text the JSON cannot rebuild
    outside the tests (notes written by hand, another layout) unless `overwrite`: those would be lost."""
    import json

    from rcp_llava.evaluation import paired_tests
    from rcp_llava.results import command_line, write_results

    expected = ("give the NAME.json evaluate_methods.py wrote ({\"command\", \"results\": [{\"rows\": [...]}]}), "
                "its NAME.md beside it")
    if not str(path).endswith(".json") or not os.path.isfile(path):
        raise ValueError(f"--rerender {path!r}: no such .json file; {expected}.")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"--rerender {path!r}: not JSON ({error}); {expected}.") from None
    results = data.get("results") if isinstance(data, dict) else None
    if (not isinstance(results, list) or not results or "command" not in data
            or not all(isinstance(r, dict) and isinstance(r.get("rows"), list) for r in results)):
        raise ValueError(f"--rerender {path!r}: not evaluate_methods.py's results; {expected}.")
    stem = str(path)[:-len(".json")]
    previous = data.get("rerendered")
    if os.path.isfile(stem + ".md") and not overwrite:
        with open(stem + ".md") as f:
            committed = f.read()
        rebuilt = results_markdown(results, data["command"], previous)
        if _without_paired_tests(committed) != _without_paired_tests(rebuilt):
            raise ValueError(f"--rerender {path!r}: {stem}.md holds text its JSON does not rebuild outside the "
                             "paired tests (notes, another layout), which a re-render would lose; merge them by hand "
                             "or pass --overwrite to replace it.")
    command = command_line(__file__, argv)
    for result in results:
        result["paired_tests"] = paired_tests(result["rows"])
    data["rerendered"] = {"command": command, "note": RERENDER_NOTE}
    markdown = results_markdown(results, data["command"], data["rerendered"])
    write_results(stem, markdown=markdown, data=data, overwrite=True)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return data


def main(argv=None):
    import torch

    from rcp_llava.evaluation import (check_split_used, evaluate_grid, is_benchmark_spec, load_base_model, load_data,
                                      name_uniquely)
    from rcp_llava.results import command_line, refuse_existing, write_results

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rerender is not None:  # no model, no data: the JSON's per-sample outcomes are the input
        defaults = vars(parser.parse_args([]))
        given = sorted(f"--{k}" for k, v in vars(args).items()
                       if k not in ("rerender", "overwrite") and v != defaults[k])
        if given:  # they would be ignored: the JSON is the run
            parser.error(f"argument --rerender: {', '.join(given)} cannot be used with it (it runs nothing; the "
                         "JSON holds the run); drop them")
        return rerender(args.rerender, argv, overwrite=args.overwrite)
    if args.model is None:
        parser.error("the following arguments are required: --model (or --rerender RESULTS.json)")
    command = command_line(__file__, argv)
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)  # before anything loads
    plugins_per_budget = parse_plugins_per_budget(args.plugins_per_budget)
    methods, budgets = check_grid(args)  # before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    # The data before the model: a reader's error (an empty file, a bad answer, a missing image) comes before a 7B
    # load, and before earlier datasets were evaluated for nothing.
    specs = args.data or ["testbed"]
    folders = [spec for spec in specs if not is_benchmark_spec(spec)]
    if args.image_folder is not None and not folders:  # it would be ignored
        raise ValueError(f"--image_folder is for dataset folders, but every --data ({specs}) is a benchmark: give "
                         "each its image folder as BENCHMARK:PATH,image_dir=DIR instead.")
    split = "test" if args.split is None else args.split
    datasets = [load_data(spec, split=split, max_samples=args.max_samples,
                          image_folder=None if is_benchmark_spec(spec) else args.image_folder) for spec in specs]
    check_split_used(args.split, datasets, specs)  # it would be ignored
    name_uniquely(datasets, specs)  # two POPE files were both "pope" in the table and the JSON
    others = [spec for spec, data in zip(specs, datasets) if data.kind != "testbed"]
    if args.oracle and others:  # it failed after the model loaded and the earlier datasets were evaluated
        raise ValueError(f"--oracle needs testbed data (its evidence patches), but --data {others} are not testbed "
                         "datasets; drop --oracle or evaluate those without it.")
    check_methods_fit_model(args, methods)
    base, processor = load_base_model(args.model, plugins=args.plugins)
    results = []
    for data in datasets:
        results.append(evaluate_grid(base, processor, data, methods, budgets, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, fastv_layer=args.fastv_layer,
                                     progress=not args.no_progress,
                                     plugins_per_budget=plugins_per_budget, flop_matched=args.flop_matched,
                                     oracle=args.oracle))
    markdown = results_markdown(results, command)
    for result in results:  # predictions stay out of the JSON; rows hold scores and counts only
        for row in result["rows"]:
            row.pop("predictions", None)
    # Re-checked at the write: another run given the same --name may have written there since the start-up check.
    written = write_results(stem, markdown=markdown, overwrite=args.overwrite,
                            data={"command": command, "methods": methods, "budgets": budgets, "results": results})
    print(markdown)
    if written != stem:
        print(f"{stem}.md / {stem}.json appeared while this run ran (another run's, kept): this run's results are "
              f"in {written}.md and {written}.json")
    print(f"wrote {written}.md and {written}.json")
    return results


if __name__ == "__main__":
    main()
