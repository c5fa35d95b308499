r"""Attention supervision of the testbed's warm-up stage: the three hops of binding a question to one object.

Trained on the answer loss alone, the small decoder stays for thousands of CPU steps on the shortcut "answer
an attribute that is visible somewhere" (tiny preset, 6-8 objects: 0.42 test accuracy after 2500 steps). The
circuit it has to find is known, so the warm-up teaches its routes directly, one head each (head 0):

1. `lookup`   (layer `hops[0]`): every attribute word of the conversation ("red", "triangle", "circles",
   "small"; in questions and in earlier answers alike) attends to the visual tokens having that attribute;
2. `referent` (layer `hops[1]`): the last word of a run of attribute words ("red triangle") attends to the
   tokens of the objects matching all of them (skipped when none does, e.g. an absent object);
3. `readout`  (layer `hops[2]`): the answer position (the `:` of `ASSISTANT:`) attends to the last such word
   before it, i.e. the question's referent.

Only the routes are supervised; what travels along them (the values) and everything else is learned from the
answer loss. Inference never sees this: the saved model is a stock LLaVA.
"""

import numpy as np
import torch
from transformers.models.llama.modeling_llama import rotate_half

from .evaluate import surviving_tokens
from .scenes import COLOURS, PLURALS, SHAPES, SIZES


HOPS = ("lookup", "referent", "readout")
WORD_ATTRIBUTES = {
    **{c: ("colour", 1 + i) for i, c in enumerate(COLOURS)},
    **{s: ("shape", 1 + i) for i, s in enumerate(SHAPES)},
    **{PLURALS[s]: ("shape", 1 + i) for i, s in enumerate(SHAPES)},
    **{s: ("size", 1 + i) for i, s in enumerate(SIZES)},
}  # word -> (patch label, value), as in `Scene.patch_labels`


def attention_targets(tokens, attention_mask, is_image, patch_labels, keep=None) -> dict:
    r"""
    Supervised attention rows of a batch, in the layout the model sees (visual tokens with `keep` False removed,
    survivors shifted left, as `rcp_llava.testbed.evaluate.pruned_inputs` does with right padding).

    Args:
        tokens (list of `T` strings per sample): the prompt's words (`tokenizer.convert_ids_to_tokens`).
        attention_mask (`(B, T)`), is_image (`(B, T)` bool): the processor's output and its image positions.
        patch_labels (list of dicts): each sample's `Scene.patch_labels` (`(N,)` arrays, 0 = background).
        keep (`(B, N)` bool, optional): visual tokens kept; `None` keeps all.

    Returns:
        `{hop: (rows (R, 2) long [sample, query position], targets (R, T') bool)}` for the three `HOPS`.
    """
    batch, length = attention_mask.shape
    token_keep = surviving_tokens(attention_mask, is_image, keep)  # (B, T)
    new_pos = (token_keep.long().cumsum(-1) - 1).numpy()  # (B, T) position in the shortened sequence
    out_len = int(token_keep.sum(-1).max())
    real, is_image = attention_mask.bool().tolist(), is_image.numpy()  # plain Python / numpy: a per-word loop
    token_keep = token_keep.numpy()
    found = {hop: ([], []) for hop in HOPS}  # hop -> ([(sample, query position)], [target positions])

    def add(hop, b, query, target_positions):
        found[hop][0].append((b, int(new_pos[b, query])))
        found[hop][1].append(target_positions)

    for b in range(batch):
        image_pos = is_image[b].nonzero()[0]  # (N,)
        visible = token_keep[b, image_pos]  # (N,)
        labels = {name: np.asarray(value) for name, value in patch_labels[b].items()}

        def patches(conditions):
            match = visible.copy()
            for name, value in conditions:
                match &= labels[name] == value
            return new_pos[b, image_pos[match]]

        phrase, last_word = [], None  # phrase: [(position, (label, value))]
        for t in range(length + 1):
            word = tokens[b][t] if t < length and real[b][t] else None
            if word == ":" and t > 0 and tokens[b][t - 1] == "ASSISTANT" and last_word is not None:
                add("readout", b, t, [int(new_pos[b, last_word])])
            if word in WORD_ATTRIBUTES:
                phrase.append((t, WORD_ATTRIBUTES[word]))
                target = patches([WORD_ATTRIBUTES[word]])
                if len(target):
                    add("lookup", b, t, target)
            elif phrase:
                target = patches([attr for _, attr in phrase])
                if len(target):
                    add("referent", b, phrase[-1][0], target)
                last_word, phrase = phrase[-1][0], []
    result = {}
    for hop, (rows, positions) in found.items():
        rows = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
        targets = np.zeros((len(positions), out_len), dtype=bool)
        for r, target_positions in enumerate(positions):
            targets[r, target_positions] = True
        result[hop] = (rows, torch.from_numpy(targets))
    return result


def attention_supervision_loss(attentions, targets: dict, hop_layers, head: int = 0) -> torch.Tensor:
    r"""
    Sum over the hops of the mean over their rows of `-log(attention mass on the targets)`.

    Args:
        attentions (tuple of `(B, H, T', T')`): the decoder's attention probabilities per layer (eager's
            `output_attentions`, or `HeadAttentionProbe.attentions`: `(B, 1, T', T')` at the hop layers).
        targets: `attention_targets(...)`.
        hop_layers (3 ints): the layer of each hop in `HOPS` order.
    """
    losses = []
    for hop, layer in zip(HOPS, hop_layers):
        rows, target = targets[hop]
        if len(rows) == 0:
            continue
        attn = attentions[layer][rows[:, 0], head, rows[:, 1]]  # (R, T')
        mass = (attn * target.to(attn.dtype)).sum(-1)  # (R,)
        losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
    if not losses:
        return attentions[0].new_zeros(())
    return torch.stack(losses).sum()


class HeadAttentionProbe:
    r"""
    One head's attention probabilities at a few decoder layers, computed beside the model's own kernel from each
    layer's normalised input: what eager attention's `output_attentions` reports for that head, without running
    every layer eagerly, nor keeping every layer's `(B, H, T, T)` probabilities for the backward pass. On CPU it is
    not faster: a deep warm-up step (batch 32, 2 cores) took 0.59-0.73 s with eager attention everywhere, with this
    probe beside sdpa, and with sdpa alone, side by side (noisy machine); it saves memory, and on a GPU the fused
    kernels.

    `with probe: model(...)` captures the inputs; `probe.attentions(attention_mask, num_layers)` then returns the
    tuple `attention_supervision_loss` reads: `(B, 1, T, T)` at the probed layers (the head as head 0), None elsewhere.
    Gradients flow into the layer's `q_proj` / `k_proj` as they do through eager attention.
    """

    def __init__(self, model, layers, head: int = 0):
        self.decoder_layers = model.model.language_model.layers
        self.layers = sorted(set(layers))
        self.head = head
        self.inputs = {}
        self._handles = []

    def __enter__(self):
        self.inputs = {}
        for idx in self.layers:
            attn = self.decoder_layers[idx].self_attn

            def capture(module, args, kwargs, idx=idx):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self.inputs[idx] = (module, hidden, kwargs["position_embeddings"])

            self._handles.append(attn.register_forward_pre_hook(capture, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def attentions(self, attention_mask, num_layers):
        """attention_mask: (B, T) of the sequence the model ran on (1 = real token)."""
        out = [None] * num_layers
        for idx, (attn, hidden, (cos, sin)) in self.inputs.items():
            bsz, seq, _ = hidden.shape
            head_dim = attn.head_dim
            kv_head = self.head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
            q = attn.q_proj(hidden).view(bsz, seq, -1, head_dim)[:, :, self.head]  # (B, T, hd)
            k = attn.k_proj(hidden).view(bsz, seq, -1, head_dim)[:, :, kv_head]  # (B, T, hd)
            q, k = (x * cos + rotate_half(x) * sin for x in (q, k))  # RoPE, as Llama's eager attention
            scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, T, T)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()
            allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, T)
            probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1, dtype=torch.float32)
            out[idx] = probs.to(q.dtype).unsqueeze(1)  # (B, 1, T, T)
        return tuple(out)
