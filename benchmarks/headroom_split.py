r"""Where is the prior's headroom? Evidence-first kept sets at some pruning points, Eq. 4's prior at the others.

    python benchmarks/headroom_split.py --model outputs/deep_rcp_untrained \
        --data ~/.cache/rcp_llava/testbed/deep/dataset --layers 1,7,13 --counts 14,4,1

Issue 16. The in-decoder oracle (`rcp_llava.evaluation.oracle_keep_masks_fn`) beats attention_topk by 20 points at
the deep testbed's FLOP-matched 1/9; this splits that gap by pruning point. For every subset S of the points
(`--subsets`, default: none, each point alone, all but the first, all), the model prunes at `--layers` with
`--counts`, keeping at the points in S the tokens the oracle prefers (`rcp_llava.evaluation.oracle_order`, among
the tokens still alive) and at the others the top tokens of the LLM's own question attention (attention_topk, on
the sequence the earlier points left). S = none is attention_topk; S = all is the in-decoder oracle (the same kept
sets, token for token). Paired exact McNemar of every row against S = none, on the same samples.
"""

import argparse
import contextlib
import os
from dataclasses import replace

from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                               write_results)


def parse_ints(text, name):
    """'1,7,13' -> [1, 7, 13] by `train_rcp`'s parser of integer lists (the same syntax and error); '' -> []."""
    from train_rcp import _parse_int_list

    return _parse_int_list(text, name) or []


def default_subsets(num_points):
    """none, each point alone, all points but the first, all points."""
    subsets = [()] + [(p,) for p in range(num_points)]
    if num_points > 2:
        subsets.append(tuple(range(1, num_points)))
    if num_points > 1:
        subsets.append(tuple(range(num_points)))
    return subsets


def parse_subsets(text, num_points):
    """'none;0;1,2;0,1,2' -> [(), (0,), (1, 2), (0, 1, 2)] (pruning-point indices, 0-based)."""
    subsets = []
    for item in text.split(";"):
        item = item.strip()
        subset = () if item in ("", "none") else tuple(parse_ints(item, "--subsets"))
        bad = [p for p in subset if not 0 <= p < num_points]
        if bad:
            raise ValueError(f"--subsets names point {bad[0]}, but there are {num_points} pruning points (0-based).")
        subsets.append(tuple(sorted(set(subset))))
    return subsets


def evidence_first_selector(oracle_points, num_visual_tokens, seed=0):
    """A `TokenSelector` class (method `evidence_first`): at the point indices in `oracle_points` it ranks the
    alive tokens by each row's `oracle_order`, elsewhere by attention_topk's prior. The rows of the running batch
    are set on the class (`rows`) before each prefill."""
    import torch

    import modeling_rcp_llava as M
    from configuration_rcp_llava import PRUNING_METHODS
    from rcp_llava.evaluation import oracle_order

    class EvidenceFirstSelector(M.AttentionTopkSelector):
        method = replace(PRUNING_METHODS["attention_topk"], name="evidence_first")
        rows = []

        def scores(self, ctx):
            if ctx.point not in oracle_points:
                return super().scores(ctx)
            rank = torch.empty(len(self.rows), num_visual_tokens)  # (B, N): higher = preferred
            for b, row in enumerate(self.rows):
                order = oracle_order(row, num_visual_tokens, seed)
                rank[b, order] = torch.arange(num_visual_tokens, 0, -1, dtype=rank.dtype)
            return rank.to(ctx.ids.device).gather(1, ctx.ids)  # (B, K) over the alive tokens

    return EvidenceFirstSelector


@contextlib.contextmanager
def evidence_first_method(oracle_points, num_visual_tokens, seed=0):
    """Register `evidence_first_selector(...)` as pruning method `evidence_first` for the block, then remove it (a
    testbed-only method must not stay in the registry that every model's config validates against)."""
    import modeling_rcp_llava as M
    from configuration_rcp_llava import PRUNING_METHODS

    selector = M.register_pruning_method(evidence_first_selector(oracle_points, num_visual_tokens, seed), overwrite=True)
    try:
        yield selector
    finally:
        M.SELECTORS.pop(selector.method.name, None)
        PRUNING_METHODS.pop(selector.method.name, None)


def check_schedule(model, layers, counts):
    """Refuse `--layers` / `--counts` the model's config would refuse, from its config.json alone (before any weights
    load): they failed only after the data and the model had loaded, naming the config fields instead of the flags.
    The same checks as the run's `method_model` (attention_topk's rules: evidence_first is a copy of them)."""
    from configuration_rcp_llava import RcpLlavaConfig

    if not os.path.isfile(os.path.join(model, "config.json")):
        return  # not a model folder (or a Hub id): load_base_model's own error says so
    config = RcpLlavaConfig.from_pretrained(model)
    for key, value in dict(pruning_method="attention_topk", pruning_layers=layers, pruning_keep_counts=counts,
                           repair_layers=[]).items():
        setattr(config, key, value)
    try:
        config.validate_pruning()
    except (TypeError, ValueError) as error:
        raise ValueError(f"--layers {','.join(map(str, layers))!r} / --counts {','.join(map(str, counts))!r} do not "
                         f"fit --model {model!r} ({config.text_config.num_hidden_layers} decoder layers, "
                         f"{config.num_visual_tokens} visual tokens): {error} (`pruning_layers` is --layers, "
                         "`pruning_keep_counts` --counts).") from None


def split_headroom(base, processor, data, layers, counts, subsets, batch_size=50):
    """`{subset: per-sample 0/1 correctness}` for each subset of point indices (see the module docstring)."""
    from rcp_llava.evaluation import first_token_predictions, method_model

    n = base.config.num_visual_tokens
    out = {}
    for subset in subsets:
        with evidence_first_method(subset, n) as selector:
            model = method_model(base, pruning_method="evidence_first", pruning_layers=layers,
                                 pruning_keep_counts=counts, repair_layers=[])
            correct = []
            for start in range(0, len(data.rows), batch_size):
                chunk = [data.rows[i] for i in range(start, min(len(data.rows), start + batch_size))]
                selector.rows = chunk
                predictions, _, _ = first_token_predictions(model, processor, chunk)
                correct += [int(p == str(r["answer"]).strip()) for p, r in zip(predictions, chunk)]
        out[subset] = correct
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="RCP or stock-in-RCP folder (only its backbone is used).")
    parser.add_argument("--data", required=True, help="Testbed dataset folder (rows with evidence / object patches).")
    parser.add_argument("--split", default=None,
                        help="Split of a DatasetDict --data (default: test); refused when --data is not read by split "
                             "(a folder of one split is read whole).")
    parser.add_argument("--layers", default="1,7,13", help="Pruning layers (0-based).")
    parser.add_argument("--counts", default="14,4,1", help="Tokens kept after each pruning layer.")
    parser.add_argument("--subsets", default=None,
                        help="Point-index subsets given the oracle, ';'-separated, e.g. 'none;0;1,2;0,1,2' (default: "
                             "none, each alone, all but the first, all).")
    parser.add_argument("--max_samples", type=positive_int, default=None)
    parser.add_argument("--batch_size", type=positive_int, default=50)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--name", type=result_name, default="headroom_split")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    layers, counts = parse_ints(args.layers, "--layers"), parse_ints(args.counts, "--counts")
    if not layers:  # '' parsed as no points: a run that prunes nothing
        parser.error("argument --layers: give at least one pruning layer, e.g. 1,7,13")
    if len(layers) != len(counts):
        raise ValueError(f"--layers has {len(layers)} entries but --counts {len(counts)}; give one count per layer.")
    subsets = parse_subsets(args.subsets, len(layers)) if args.subsets else default_subsets(len(layers))
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)

    from rcp_llava.evaluation import check_split_used, load_base_model, load_data, mcnemar, split_read

    spec = os.path.expanduser(args.data)
    data = load_data(spec, split="test" if args.split is None else args.split,
                     max_samples=args.max_samples)  # before the model
    check_split_used(args.split, [data], [spec])  # a folder of one split was read whole, and labelled --split
    check_schedule(args.model, layers, counts)  # its config.json only, before the weights
    base, processor = load_base_model(args.model)
    results = split_headroom(base, processor, data, layers, counts, subsets, args.batch_size)
    reference = results.get(())
    command = command_line(__file__, argv)
    lines = ["# Where is the prior's headroom? Evidence-first kept sets at some pruning points", "",
             f"Command: `{command}`", "",
             f"Model `{args.model}`, {len(data.rows)} samples of `{args.data}` ({split_read(data)}); pruning layers "
             f"{layers} (0-based), kept {counts}. *oracle at*: the layers where the kept sets are evidence first "
             "(`oracle_order`); elsewhere attention_topk's prior. McNemar against the prior everywhere: "
             "samples only this row / only the prior gets right, exact two-sided p.", "",
             "| oracle at layers | accuracy | vs prior: a/b | p |", "|---|---|---|---|"]
    rows = []
    for subset, correct in results.items():
        where = ", ".join(str(layers[p]) for p in subset) or "none (attention_topk)"
        test = mcnemar(correct, reference) if reference is not None else None
        accuracy = sum(correct) / len(correct)
        rows.append({"oracle_points": list(subset), "oracle_layers": [layers[p] for p in subset], "accuracy": accuracy,
                     "correct": correct, "mcnemar_vs_prior": test})
        cells = f"{test['a_only']}/{test['b_only']} | {test['p_value']:.2g}" if test else "– | –"
        lines.append(f"| {where} | {accuracy:.3f} | {cells} |")
    markdown = "\n".join(lines) + "\n"
    write_results(stem, markdown=markdown, overwrite=args.overwrite,
                  data={"command": command, "layers": layers, "counts": counts, "samples": len(data.rows),
                        "split": data.split, "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
