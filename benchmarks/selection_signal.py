r"""Which signals at RCP's pruning points point at the evidence? (issue 16: why trained RCP does not beat its prior)

    python benchmarks/selection_signal.py --model outputs/rcp_deep_a2_fixed_14_4_1/model \
        --data ~/.cache/rcp_llava/testbed/deep/dataset --max_samples 200

At every pruning point p of a trained RCP model on a testbed split (whose rows carry `evidence_patches`), over the
visual tokens still alive before p, the ROC AUC of evidence vs other patches of:

- `g_task` / `g_repair`: the straight-through gradient that trains the pruner, -dL/dM(p) of the task loss and of
  the W2 repair loss (M(p): the cumulative keep mask of the "mask" layout; the pruner's logits receive
  -g * sigmoid'(.), Eqs. 6-7), over all alive tokens and over the ones p dropped (those the gradient could bring back);
- `logits`: the pruner's retention logits (Eq. 5) and `prior`: Eq. 4's prior A alone, both on the pruned student;
- `teacher question` / `teacher answer`: the frozen full-token model's attention at the same layer from the question
  tokens (the prior, unpruned) and from the last prompt token (whose logits give the answer's first token).

0.5 = no information about the evidence; also reported: the share of evidence among the alive tokens and how much
of it p keeps. The losses are computed per batch as `train_rcp` does (Gumbel noise off, temperature 0.2).
"""

import argparse
import os

import numpy as np

from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                               write_results)


SIGNALS = ("g_task", "g_repair", "logits", "prior", "teacher question", "teacher answer")


def rank_auc(scores, positive):
    """ROC AUC of `scores` separating `positive` (bool) from the rest: the Mann-Whitney U statistic over
    n_pos * n_neg, ties counted half. NaN when one class is empty."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape:
        raise ValueError(f"`scores` has shape {scores.shape} but `positive` {positive.shape}; pass one flag per score.")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # rank - 1 of each distinct value's first occurrence
    ranks = (first + (counts + 1) / 2)[inverse]  # average 1-based rank of ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Trained RCP folder (train_rcp.py's OUT/model).")
    parser.add_argument("--data", required=True, help="Testbed dataset folder (save_to_disk, rows with evidence).")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max_samples", type=positive_int, default=200)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--name", type=result_name, default="selection_signal")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def collect(model, processor, rows, batch_size=8):
    """Per pruning layer, per alive visual token: the signals of `SIGNALS`, the evidence flag and the kept flag."""
    import torch

    import modeling_rcp_llava as M
    import train_rcp
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.losses import LayerOutputs

    collator = RcpDataCollator(processor)
    layer_outputs = LayerOutputs(model)  # what the repair loss compares, as train_rcp reads it
    config = model.config
    points = list(config.pruning_layers)
    repair_layers = sorted(config.repair_layers)
    n = config.num_visual_tokens
    decoder = model.model.language_model
    image_id = config.image_token_id
    store, scores = {}, {}
    original_prune, original_scores = M.PrunedPrefill._prune_mask, M.RcpSelector.scores

    def prune(self, layer_idx, *args, **kwargs):
        before = self.soft_alive.detach().clone()
        out = original_prune(self, layer_idx, *args, **kwargs)
        self.soft_alive.retain_grad()  # M(p), whose gradient the pruner's logits receive (straight-through)
        store[layer_idx] = (before, self.soft_alive)
        return out

    def selector_scores(self, ctx):
        logits = original_scores(self, ctx)
        prior = ctx.question_prior()
        scores[ctx.layer_idx] = (logits.detach(), prior.detach())
        return logits

    table = {p: {k: [] for k in (*SIGNALS, "evidence", "kept")} for p in points}
    M.PrunedPrefill._prune_mask, M.RcpSelector.scores = prune, selector_scores
    try:
        for start in range(0, len(rows), batch_size):
            batch_rows = [rows[i] for i in range(start, min(len(rows), start + batch_size))]
            inputs = collator(batch_rows)
            labels = inputs.pop("labels")
            with torch.no_grad(), model.plugins_disabled(), layer_outputs:
                teacher = model(**inputs, output_hidden_states=True, use_cache=False)
                teacher_states = layer_outputs.of(teacher, repair_layers)
            teacher_attention = {}
            image = inputs["input_ids"] == image_id  # (B, T)
            valid = inputs["attention_mask"].bool()
            # the position whose logits give the answer's first token (the prompt's last; the batch holds the answer)
            answer_slot = inputs["answer_mask"].long().argmax(1, keepdim=True)  # (B, 1): its first True
            queries = {"teacher question": M._first_slots(inputs["question_mask"].bool()),
                       "teacher answer": (answer_slot, torch.ones_like(answer_slot, dtype=torch.bool))}
            img_slots, _ = M._first_slots(image, n)  # (B, N) slot of each visual token, raster order
            with torch.no_grad():
                cos_sin = decoder.rotary_emb(teacher.hidden_states[0], inputs["position_ids"])
                for p in points:
                    layer = decoder.layers[p]
                    normed = layer.input_layernorm(teacher.hidden_states[p])  # layer p's input, all tokens
                    for key, (slots, ok) in queries.items():
                        probs = M.question_attention_probs(layer.self_attn, normed, *cos_sin, valid, slots)
                        w = ok.to(probs.dtype)  # (B, Lq)
                        per_key = (w[:, None, :, None] * probs).sum(2).mean(1) / w.sum(1, keepdim=True)  # (B, T)
                        teacher_attention[(p, key)] = per_key.gather(1, img_slots)  # (B, N)
            grads = {}
            for term in ("g_task", "g_repair"):
                store.clear()
                scores.clear()
                with model.pruning_layout("mask"), layer_outputs:
                    out = model(**inputs, output_hidden_states=True, use_cache=False, gumbel_temperature=0.2,
                                gumbel_noise=False)
                    states = layer_outputs.of(out, repair_layers)
                if term == "g_task":
                    loss = train_rcp.task_loss(out.logits, labels)
                else:
                    loss = train_rcp.w2_repair_loss(states, teacher_states, inputs["answer_mask"])
                loss.backward()
                grads[term] = {p: -store[p][1].grad.detach().clone() for p in points}
                model.zero_grad(set_to_none=True)
            for p in points:
                before, after = store[p]
                logits, prior = scores[p]  # (B, N): the mask layout scores every raster token
                for b, row in enumerate(batch_rows):
                    alive = before[b] > 0.5
                    evidence = torch.zeros(n, dtype=torch.bool)
                    evidence[list(row["evidence_patches"])] = True
                    values = {"g_task": grads["g_task"][p][b], "g_repair": grads["g_repair"][p][b],
                              "logits": logits[b], "prior": prior[b],
                              "teacher question": teacher_attention[(p, "teacher question")][b],
                              "teacher answer": teacher_attention[(p, "teacher answer")][b],
                              "evidence": evidence, "kept": after[b].detach() > 0.5}
                    for key, value in values.items():
                        table[p][key].extend(value[alive].float().tolist())
    finally:
        M.PrunedPrefill._prune_mask, M.RcpSelector.scores = original_prune, original_scores
    return table


def summarise(table):
    """Per pruning layer: alive tokens, evidence share / kept, and each signal's AUC (all alive; dropped only)."""
    summary = {}
    for p, columns in table.items():
        evidence = np.asarray(columns["evidence"], dtype=bool)
        kept = np.asarray(columns["kept"], dtype=bool)
        row = {"alive": int(evidence.size), "evidence_share": float(evidence.mean()),
               "evidence_kept": float(kept[evidence].mean()) if evidence.any() else float("nan")}
        for signal in SIGNALS:
            values = np.asarray(columns[signal])
            row[signal] = {"all": rank_auc(values, evidence), "dropped": rank_auc(values[~kept], evidence[~kept])}
        summary[str(p)] = row
    return summary


def format_markdown(summary, command, samples, model):
    lines = ["# Which signals at RCP's pruning points point at the evidence?", "",
             f"Command: `{command}`", "",
             f"Model `{model}`, {samples} samples. ROC AUC of evidence vs other patches among the visual tokens "
             "alive before each pruning point (0.5 = no information); *dropped*: among the tokens that point dropped "
             "(the ones a gradient would have to bring back). Pruning layers are 0-based.", "",
             "| layer | alive | evidence share | evidence kept | " + " | ".join(SIGNALS) + " |",
             "|---" * (4 + len(SIGNALS)) + "|"]
    for p, row in summary.items():
        cells = [f"{row[s]['all']:.3f} ({row[s]['dropped']:.3f})" for s in SIGNALS]
        lines.append(f"| {p} | {row['alive']} | {row['evidence_share']:.3f} | {row['evidence_kept']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Cells: AUC over all alive tokens (over the dropped ones)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)
    if not os.path.isdir(os.path.expanduser(args.data)):
        raise FileNotFoundError(f"--data {args.data!r} is not a folder; pass a testbed dataset folder "
                                "(e.g. ~/.cache/rcp_llava/testbed/deep/dataset).")
    import torch
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.evaluation import load_saved_dataset

    # The split before the model loads (a missing one was a bare KeyError after it).
    splits = load_saved_dataset(os.path.expanduser(args.data))
    if not hasattr(splits, "keys"):
        raise ValueError(f"--data {args.data!r} is one split's folder; pass the testbed's dataset folder (a "
                         "`save_to_disk` DatasetDict, e.g. the folder above it).")
    if args.split not in splits:
        raise ValueError(f"--split {args.split!r}: {args.data} has no such split; it has {list(splits)}.")
    data = splits[args.split]
    torch.manual_seed(0)
    model = RcpLlavaForConditionalGeneration.from_pretrained(args.model).eval()
    if model.config.pruning_method != "rcp":
        raise ValueError(f"--model {args.model!r} prunes with {model.config.pruning_method!r}; pass an RCP model.")
    processor = AutoProcessor.from_pretrained(args.model)
    rows = data.select(range(min(args.max_samples, len(data))))
    summary = summarise(collect(model, processor, rows, args.batch_size))
    command = command_line(__file__, argv)
    markdown = format_markdown(summary, command, len(rows), args.model)
    write_results(stem, markdown=markdown, overwrite=args.overwrite,
                  data={"command": command, "model": args.model, "samples": len(rows), "summary": summary})
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
