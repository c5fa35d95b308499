"""Accuracy of a LLaVA model on the testbed, with optional input-level visual-token pruning.

Input-level pruning uses the stock classes only: the image features are scattered into the prompt embeddings,
the dropped visual tokens are removed from the sequence, the survivors keep their ORIGINAL position ids, and
the model gets `inputs_embeds`, those `position_ids` and a 2-D attention mask (a 2-D mask is mandatory: gapped
position ids without one are read as packed sequences by transformers).
"""

import math
from collections import defaultdict

import numpy as np
import torch
from transformers.utils import logging

from ..data import prompt_batch
from ..schedule import budget_count


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------- input-level pruning

def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens of stock LLaVA, `(B, N, D)`."""
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # (B, N, D)


def surviving_tokens(attention_mask, is_image, keep=None) -> torch.Tensor:
    """`(B, T)` bool: the real (unpadded) tokens that survive `keep (B, N)` (visual tokens in raster order; `None`
    keeps all). The pruned layout packs them in order; a survivor's index there is `surviving.cumsum(-1) - 1`."""
    token_keep = attention_mask.bool().clone()
    if keep is not None:
        keep = keep.to(attention_mask.device).bool()
        n = keep.shape[1]
        if int(is_image.sum(-1).max()) != n or int(is_image.sum(-1).min()) != n:
            raise ValueError(f"`keep` has {n} visual tokens per sample but the prompts hold "
                             f"{is_image.sum(-1).tolist()} image tokens.")
        token_keep[is_image] &= keep.reshape(-1)
    return token_keep


def pruned_inputs(model, input_ids, attention_mask, pixel_values, keep, labels=None, padding_side="left"):
    r"""
    Build the stock-LLaVA inputs of a batch in which only the visual tokens with `keep[b, j]` survive.

    Args:
        input_ids (`(B, T)`), attention_mask (`(B, T)`): the processor's output (either padding side).
        pixel_values (`(B, 3, H, W)`): the images.
        keep (`(B, N)` bool): visual tokens kept, raster order. `None` keeps all of them.
        labels (`(B, T)`, optional): gathered like the tokens.
        padding_side: where the shortened rows are padded.

    Returns:
        dict with `inputs_embeds (B, T', D)`, `attention_mask (B, T')`, `position_ids (B, T')` (original
        positions of the surviving tokens) and `labels (B, T')` if given.
    """
    image_token_id = model.config.image_token_id
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
    is_image = input_ids == image_token_id  # (B, T)
    feats = image_features(model, pixel_values).to(embeds.dtype)  # (B, N, D)
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) original positions
    token_keep = surviving_tokens(attention_mask, is_image, keep)
    lengths = token_keep.sum(-1)  # (B,)
    length = int(lengths.max())
    batch, dim = input_ids.shape[0], embeds.shape[-1]
    out_embeds = embeds.new_zeros(batch, length, dim)
    out_mask = attention_mask.new_zeros(batch, length)
    out_pos = positions.new_zeros(batch, length)
    out_labels = labels.new_full((batch, length), -100) if labels is not None else None
    for b in range(batch):
        idx = token_keep[b].nonzero(as_tuple=True)[0]  # (L_b,)
        start = length - len(idx) if padding_side == "left" else 0
        sl = slice(start, start + len(idx))
        out_embeds[b, sl] = embeds[b, idx]
        out_mask[b, sl] = 1
        out_pos[b, sl] = positions[b, idx]
        if labels is not None:
            out_labels[b, sl] = labels[b, idx]
    result = {"inputs_embeds": out_embeds, "attention_mask": out_mask, "position_ids": out_pos}
    if labels is not None:
        result["labels"] = out_labels
    return result


# ------------------------------------------------------------------------------------------ keep functions

def _budget(fraction: float, n: int) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    return budget_count(fraction, n)


def _num_tokens(row) -> int:
    return int(row["grid_size"]) ** 2


def _keep_from_order(rows, orders, fraction):
    n = _num_tokens(rows[0])
    k = _budget(fraction, n)
    keep = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, order in enumerate(orders):
        keep[b, list(order[:k])] = True
    return keep


def random_keep(fraction: float, seed: int = 0):
    """Keep a uniformly random `fraction` of the visual tokens (a fixed draw per sample id and seed)."""
    def keep_fn(rows):
        orders = [np.random.default_rng([seed, int(r["id"])]).permutation(_num_tokens(r)) for r in rows]
        return _keep_from_order(rows, orders, fraction)
    keep_fn.__name__ = f"random_keep({fraction:.3f})"
    return keep_fn


def oracle_keep(fraction: float, seed: int = 0):
    """Evidence patches first, then OTHER objects' patches (distractors stay), then background; random order
    inside each group. Filling with background first would delete distractors and leak the answer."""
    def keep_fn(rows):
        orders = []
        for r in rows:
            rng = np.random.default_rng([seed, int(r["id"]), 1])
            evidence = set(r["evidence_patches"])
            objects = set(r["object_patches"]) - evidence
            rest = [i for i in range(_num_tokens(r)) if i not in evidence and i not in objects]
            groups = [sorted(evidence), sorted(objects), rest]
            orders.append([i for g in groups for i in rng.permutation(np.array(g, dtype=np.int64))])
        return _keep_from_order(rows, orders, fraction)
    keep_fn.__name__ = f"oracle_keep({fraction:.3f})"
    return keep_fn


def patch_saliency(image, patch_size: int) -> np.ndarray:
    """Question-agnostic "objectness" of every patch, `(N,)`: mean colour distance of its pixels to the image's
    median colour (the background), so the most object-covered patches score highest."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
    background = np.median(x.reshape(-1, 3), axis=0)
    dist = np.sqrt(((x - background) ** 2).sum(-1))  # (H, W)
    g = x.shape[0] // patch_size
    return dist[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size).mean((1, 3)).reshape(-1)


def saliency_keep(fraction: float):
    """Keep the most object-like patches (`patch_saliency`), regardless of the question."""
    def keep_fn(rows):
        orders = []
        for r in rows:
            g = int(r["grid_size"])
            score = patch_saliency(r["image"], r["image"].size[0] // g)
            orders.append(np.argsort(-score, kind="stable"))
        return _keep_from_order(rows, orders, fraction)
    keep_fn.__name__ = f"saliency_keep({fraction:.3f})"
    return keep_fn


# ----------------------------------------------------------------------------------------------- accuracy

@torch.no_grad()
def predict(model, processor, rows, keep=None) -> list:
    """Greedy one-word answers for a list of dataset rows (left padding). The answer vocabulary is word-level,
    so the first greedy token IS the one-word answer; the next greedy token would be `</s>`."""
    tokenizer = processor.tokenizer
    batch = prompt_batch(processor, [r["question"] for r in rows], [r["image"] for r in rows])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}  # its position_ids are unused: pruned_inputs makes its own
    inputs = pruned_inputs(model, batch["input_ids"], batch["attention_mask"],
                           batch["pixel_values"].to(model.dtype), keep, padding_side="left")
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, V)
    ids = logits.argmax(-1).tolist()
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def evaluate_accuracy(model, processor, dataset, batch_size: int = 64, keep_fn=None, max_samples=None,
                      progress: bool = False) -> dict:
    r"""
    Accuracy of `model` on a testbed split (a `datasets.Dataset`).

    Args:
        keep_fn (callable, optional): `keep_fn(batch_rows) -> BoolTensor (B, N)` choosing the visual tokens each
            sample keeps (input-level pruning, see `pruned_inputs`). `None` = all tokens.
        max_samples (`int`, optional): evaluate the first `max_samples` rows only.

    Returns:
        `{"overall": acc, "n": count, "families": {family: acc}, "existence_negatives": {type: acc},
        "kept_visual_tokens": mean kept}`.
    """
    model.eval()
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    correct, per_family, per_negative, kept = [], defaultdict(list), defaultdict(list), []
    steps = math.ceil(n / batch_size)
    for s in range(steps):
        rows = [dataset[i] for i in range(s * batch_size, min(n, (s + 1) * batch_size))]
        keep = keep_fn(rows) if keep_fn is not None else None
        preds = predict(model, processor, rows, keep)
        for r, p in zip(rows, preds):
            ok = float(p == r["answer"])
            correct.append(ok)
            per_family[r["family"]].append(ok)
            if r["family"] == "existence":
                per_negative[r.get("negative_type") or "positive"].append(ok)
        n_tokens = int(rows[0]["grid_size"]) ** 2
        kept.extend(keep.sum(-1).tolist() if keep is not None else [n_tokens] * len(rows))
        if progress:
            logger.warning(f"evaluate: {s + 1}/{steps} batches, accuracy so far {np.mean(correct):.3f}")
    return {
        "overall": float(np.mean(correct)),
        "n": len(correct),
        "families": {f: float(np.mean(v)) for f, v in sorted(per_family.items())},
        "existence_negatives": {f: float(np.mean(v)) for f, v in sorted(per_negative.items())},
        "kept_visual_tokens": float(np.mean(kept)),
    }
