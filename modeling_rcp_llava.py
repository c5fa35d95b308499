"""RCP-LLaVA: a LLaVA model that drops visual tokens inside its decoder.

Reading order (RCP.md):
  1. the plug-ins: `RcpPruner` (residual cross-attention pruner, Eqs. 1-8) and `RcpRepairAdapter`
     (delayed repair adapter, Eqs. 9-15);
  2. the decoder loop, `RcpLlavaModel.forward`: it runs the stock Llama layers itself so that, at each
     pruning layer, the dropped visual tokens are *physically* removed: later layers compute on, and
     cache keys/values for, the kept tokens only, at their original RoPE positions;
  3. the model class, `RcpLlavaForConditionalGeneration`, a drop-in `LlavaForConditionalGeneration`.

Backbone weight names are those of llava-hf; every plug-in parameter lives under the prefix
`model.rcp_plugins.` (see `PLUGIN_PREFIX`), so a state dict filters into a plug-in-only checkpoint by name.

This is one of the two Hub files: it imports only the standard library, `torch`, `transformers` and its
sibling `configuration_rcp_llava.py`.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    DynamicCache,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput, logging


try:  # loaded as a Hub module (flat folder, relative import) ...
    from .configuration_rcp_llava import RcpLlavaConfig
except ImportError:  # ... or as an installed top-level module
    from configuration_rcp_llava import RcpLlavaConfig


logger = logging.get_logger(__name__)

PLUGIN_PREFIX = "model.rcp_plugins."


def _register_llava_checkpoint_layout():
    """Read and write the llava-hf checkpoint layout (`language_model.model.*`, `vision_tower.*`, ...).

    transformers 5.x converts those keys only for `model_type="llava"`; without this, a stock llava-hf checkpoint
    would load into `rcp_llava` with a silently random backbone. Registered by name, so remote code gets it too.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for source, target in (("llava", "rcp_llava"), ("LlavaModel", "RcpLlavaModel")):
        mapping = get_checkpoint_conversion_mapping(source)
        if mapping is not None:
            register_checkpoint_conversion_mapping(target, mapping, overwrite=True)


_register_llava_checkpoint_layout()


# ------------------------------------------------------------------------------------------------
# 1. Plug-ins
# ------------------------------------------------------------------------------------------------


class RcpPruner(nn.Module):
    """Residual cross-attention pruner (Eqs. 1-5): one retention logit per visual token.

    `logits = A + S_c + S_t + bias`, where A is the frozen LLM's own question->visual attention prior
    (computed by the decoder loop and passed in), S_c a question-conditioned cross-attention score and S_t
    a per-token MLP score. `cross_scale` and the MLP's last layer start at zero, so an untrained pruner
    ranks tokens exactly by the LLM's attention prior (the paper's "Top-K attention" ablation).
    """

    def __init__(self, hidden_size, pruner_size, num_queries, query_dropout):
        super().__init__()
        self.pruner_size = pruner_size
        self.query_dropout = query_dropout
        self.queries = nn.Parameter(torch.empty(num_queries, pruner_size))  # Q_p, Eq. (1)
        self.question_proj = nn.Linear(hidden_size, pruner_size)
        self.key_proj = nn.Linear(hidden_size, pruner_size)
        self.query_weights = nn.Parameter(torch.empty(num_queries))  # Aggregate over queries, Eq. (2)
        self.cross_scale = nn.Parameter(torch.empty(()))  # maps aggregated attention to logit scale
        self.token_proj = nn.Linear(hidden_size, pruner_size)  # proj(h_v), Eq. (3)
        self.token_out = nn.Linear(pruner_size, 1)
        self.token_out._rcp_zero_init = True
        self.bias = nn.Parameter(torch.empty(()))  # Eq. (5)

    def reset_plugin_parameters(self, std=0.02):
        nn.init.normal_(self.queries, std=std)
        nn.init.zeros_(self.query_weights)
        nn.init.zeros_(self.cross_scale)
        nn.init.zeros_(self.bias)

    def forward(self, visual, visual_valid, question, question_valid, prior):
        """
        visual: (B, K, d) normalised hidden states of the K alive visual tokens (padded), visual_valid: (B, K)
        question: (B, Lq, d) normalised question hidden states, question_valid: (B, Lq)
        prior: (B, K) the centred attention prior A (Eq. 4)
        returns logits (B, K); padded entries are -inf.
        """
        q_valid = question_valid.unsqueeze(-1).to(question.dtype)  # (B, Lq, 1)
        q_mean = (question * q_valid).sum(1) / q_valid.sum(1).clamp_min(1.0)  # (B, d)
        queries = self.queries.unsqueeze(0) + self.question_proj(q_mean).unsqueeze(1)  # (B, Nq, p), Eq. (1)
        keys = self.key_proj(visual)  # (B, K, p)
        scores = queries @ keys.transpose(1, 2) / math.sqrt(self.pruner_size)  # (B, Nq, K)
        scores = scores.masked_fill(~visual_valid.unsqueeze(1), torch.finfo(scores.dtype).min)
        attn = scores.softmax(-1)  # (B, Nq, K)

        query_logits = self.query_weights.expand(visual.shape[0], -1)  # (B, Nq)
        if self.training and self.query_dropout > 0:
            # Query-wise dropout: drop whole queries, always keep at least one.
            drop = torch.rand_like(query_logits) < self.query_dropout
            drop[:, 0] &= ~drop.all(-1)
            query_logits = query_logits.masked_fill(drop, float("-inf"))
        weights = query_logits.softmax(-1)  # (B, Nq)
        aggregated = (weights.unsqueeze(1) @ attn).squeeze(1)  # (B, K), sums to 1 over valid tokens
        num_alive = visual_valid.sum(-1, keepdim=True).clamp_min(1).to(aggregated.dtype)
        cross_score = self.cross_scale * torch.log(aggregated * num_alive + 1e-6)  # S_c, 0 for uniform attention

        token_score = self.token_out(F.gelu(self.token_proj(visual))).squeeze(-1)  # S_t, (B, K)
        logits = prior + cross_score + token_score + self.bias  # Eq. (5)
        return logits.masked_fill(~visual_valid, float("-inf"))


class RcpRepairAdapter(nn.Module):
    """Delayed repair adapter (Eqs. 9-15): a FiLM-modulated bottleneck added to answer positions only.

    `gate` (alpha) starts at zero, so a fresh adapter is an exact identity; `film_gamma`/`film_beta` start at
    zero so that gamma = 1 and beta = 0 once the gate opens.
    """

    def __init__(self, hidden_size, bottleneck_size):
        super().__init__()
        self.mask_query = nn.Parameter(torch.empty(hidden_size))  # q of Eq. (9)
        self.mask_proj = nn.Linear(hidden_size, bottleneck_size)  # Proj of Eq. (9)
        self.pruned_proj = nn.Linear(hidden_size, bottleneck_size)  # Proj of Eq. (10)
        self.query_proj = nn.Linear(hidden_size, bottleneck_size)  # QueryProj of Eq. (11)
        self.film_gamma = nn.Linear(bottleneck_size, bottleneck_size)  # W_gamma, Eq. (12)
        self.film_beta = nn.Linear(bottleneck_size, bottleneck_size)  # W_beta, Eq. (13)
        self.film_gamma._rcp_zero_init = True
        self.film_beta._rcp_zero_init = True
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.gate = nn.Parameter(torch.empty(()))  # alpha, Eq. (14)

    def reset_plugin_parameters(self, std=0.02):
        nn.init.normal_(self.mask_query, std=std)
        nn.init.zeros_(self.gate)

    def context(self, positional, keep_masks, dropped_means):
        """Pruning context cached for this adapter: mean over the preceding pruning layers of e_mask + e_pruned.

        positional: (N, d) fixed 2-D sine-cosine encoding of the visual grid
        keep_masks: (B, P, N) cumulative keep mask after each preceding pruning layer
        dropped_means: (B, P, d) mean hidden state of the tokens each of those pruners dropped (0 if none)
        returns (B, b)
        """
        masked = keep_masks.unsqueeze(-1).to(positional.dtype) * positional  # m ⊙ P, (B, P, N, d)
        attn = (masked @ self.mask_query).softmax(-1)  # (B, P, N)
        pooled = (attn.unsqueeze(-2) @ masked).squeeze(-2)  # (B, P, d)
        e_mask = self.mask_proj(pooled)  # Eq. (9), (B, P, b)
        e_pruned = self.pruned_proj(dropped_means)  # Eq. (10), (B, P, b)
        return (e_mask + e_pruned).mean(1)  # (B, b)

    def forward(self, hidden, context, answer_mask):
        """hidden: (B, L, d), context: (B, b), answer_mask: (B, L) bool -> repaired hidden (B, L, d)."""
        cond = context.unsqueeze(1) + self.query_proj(hidden)  # Eq. (11), (B, L, b)
        gamma = 1 + self.film_gamma(cond)  # Eq. (12)
        beta = self.film_beta(cond)  # Eq. (13)
        delta = self.gate * self.up(gamma * F.gelu(self.down(hidden)) + beta)  # Eq. (14), (B, L, d)
        # torch.where, not g * delta: a padded row may hold NaN, and NaN * 0 stays NaN.
        return torch.where(answer_mask.unsqueeze(-1), hidden + delta, hidden)  # Eq. (15)


class RcpPlugins(nn.Module):
    """All trainable plug-ins, under one prefix: `pruners[str(layer)]` and `repair_adapters[str(layer)]`."""

    def __init__(self, config):
        super().__init__()
        text = config.text_config
        use_pruners = config.pruning_method == "rcp"
        self.pruners = nn.ModuleDict(
            {
                str(layer): RcpPruner(
                    text.hidden_size, config.pruner_hidden_size, config.num_pruning_queries, config.query_dropout
                )
                for layer in (config.pruning_layers if use_pruners else [])
            }
        )
        self.repair_adapters = nn.ModuleDict(
            {
                str(layer): RcpRepairAdapter(text.hidden_size, config.repair_bottleneck_size)
                for layer in (config.repair_layers if use_pruners else [])
            }
        )


def grid_positional_encoding(num_tokens, dim, device=None, dtype=None):
    """Fixed sine-cosine encoding of the visual tokens, (N, dim): 2-D over the patch grid when N is a square,
    1-D over the raster order otherwise (e.g. the "full" strategy that keeps CLS)."""
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = [ys.flatten(), xs.flatten()]
    else:
        coords = [torch.arange(num_tokens)]
    per_axis = dim // len(coords)
    freq_dim = per_axis // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float64) / max(freq_dim, 1)))
    parts = []
    for c in coords:
        angles = c.to(torch.float64).unsqueeze(1) * inv_freq  # (N, freq_dim)
        parts += [angles.sin(), angles.cos()]
    enc = torch.cat(parts, dim=1)
    enc = F.pad(enc, (0, dim - enc.shape[1]))  # odd leftovers stay zero
    return enc.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# 2. The decoder loop
# ------------------------------------------------------------------------------------------------


SOFT_KEY_MASK_ATTENTION = "rcp_soft_key_mask"


def soft_key_mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            rcp_key_keep=None, **kwargs):
    """Attention with a multiplicative, differentiable 0/1 weight per key (training, mask mode).

    out_i = sum_j w_ij M_j v_j / sum_j w_ij M_j with w = softmax over the allowed keys: for M in {0, 1} this
    is exactly attention over the kept keys (physical discard), while dL/dM_j exists even for a dropped
    token. Computed with one sdpa call on values augmented by the weight channel M.

    query: (B, H, L, hd); key/value: (B, Hkv, S, hd); rcp_key_keep: (B, S) -> ((B, L, H, hd), None)
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    keep = rcp_key_keep.to(value.dtype).view(value.shape[0], 1, -1, 1).expand(-1, value.shape[1], -1, -1)
    augmented = torch.cat([value * keep, keep], dim=-1)  # (B, H, S, hd + 1)
    is_causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, augmented, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal)  # (B, H, L, hd + 1)
    out = out[..., :-1] / out[..., -1:].clamp_min(torch.finfo(out.dtype).tiny)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SOFT_KEY_MASK_ATTENTION, soft_key_mask_attention)


@contextlib.contextmanager
def _attention_implementation(config, name):
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old



def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x, cos, sin):
    """x: (B, H, L, hd); cos/sin: (B, L, hd) -> x rotated at its own positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def question_attention_probs(attn_module, hidden_norm, cos, sin, key_valid, query_slots):
    """The attention that `attn_module` would compute from the given query rows, without eager attention.

    Uses the layer's own q/k projections and RoPE on its normalised input, a causal + padding mask over
    the current sequence, and a softmax over the whole key row (RCP.md, decision on Eq. 4).

    hidden_norm: (B, T, d) input of the layer after its input norm; cos/sin: (B, T, hd)
    key_valid: (B, T) bool, query_slots: (B, Lq) long slot indices of the query rows
    returns probabilities (B, H, Lq, T) in at least float32
    """
    bsz, seq, _ = hidden_norm.shape
    head_dim = attn_module.head_dim
    rows = torch.gather(hidden_norm, 1, query_slots.unsqueeze(-1).expand(-1, -1, hidden_norm.shape[-1]))
    q = attn_module.q_proj(rows).view(bsz, rows.shape[1], -1, head_dim).transpose(1, 2)  # (B, H, Lq, hd)
    k = attn_module.k_proj(hidden_norm).view(bsz, seq, -1, head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
    q_cos = torch.gather(cos, 1, query_slots.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
    q_sin = torch.gather(sin, 1, query_slots.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    q = _apply_rope(q, q_cos, q_sin)
    k = _apply_rope(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA, (B, H, T, hd)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * attn_module.scaling  # (B, H, Lq, T)
    allowed = key_valid.unsqueeze(1) & (
        torch.arange(seq, device=q.device).view(1, 1, seq) <= query_slots.unsqueeze(-1)
    )  # (B, Lq, T)
    scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(compute).min)
    return scores.softmax(-1)


def _first_slots(flags):
    """Slots where `flags` (B, T) is set, in order, left-aligned and padded: (slots (B, K), valid (B, K))."""
    count = flags.sum(1)
    width = int(count.max()) if flags.numel() else 0
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, K)
    valid = torch.arange(width, device=flags.device).unsqueeze(0) < count.unsqueeze(1)
    return order, valid


def _compact(stay):
    """Gather index that keeps the slots where `stay` (B, T) is set, right-aligned (left padding).

    returns (src (B, T'), valid (B, T')): new slot t of row b reads old slot src[b, t] when valid[b, t].
    """
    bsz, seq = stay.shape
    count = stay.sum(1)  # (B,)
    width = int(count.max())
    dest = (width - count).unsqueeze(1) + stay.long().cumsum(1) - 1  # (B, T) destination of kept slots
    src = torch.zeros(bsz, width, dtype=torch.long, device=stay.device)
    rows = torch.arange(bsz, device=stay.device).unsqueeze(1).expand(bsz, seq)
    cols = torch.arange(seq, device=stay.device).unsqueeze(0).expand(bsz, seq)
    src[rows[stay], dest[stay]] = cols[stay]
    valid = torch.arange(width, device=stay.device).unsqueeze(0) >= (width - count).unsqueeze(1)
    return src, valid


def _gather_seq(x, src):
    """x: (B, T, ...) gathered along dim 1 by src (B, T') -> (B, T', ...)."""
    index = src.view(*src.shape, *([1] * (x.dim() - 2))).expand(*src.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


# -- training-free baselines: VisPruner, FastV, random, attention top-k ------------------------------


def vispruner_cls_attention(vision_tower, hidden_states, vision_feature_layer):
    """The [CLS] query's attention to the patch tokens at the vision layer whose output LLaVA reads, averaged over
    heads, from that layer's q/k projections (no eager attention needed).

    `hidden_states` is the CLIP encoder's tuple (entry i is the input of layer i; the last is the output), so the
    feature `hidden_states[f]` is the output of layer `f - 1` (for f = -2 with L layers: layer L-2, whose input
    is `hidden_states[L-2]`). The softmax runs over all keys ([CLS] included, as `output_attentions` reports);
    the [CLS] column is then dropped.

    returns (num_images, N) in at least float32
    """
    layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    num_states = len(layers) + 1
    feature = vision_feature_layer % num_states if -num_states <= vision_feature_layer < num_states else None
    if feature is None or feature == 0:
        raise ValueError(
            f"`pruning_method='vispruner'` needs the attention of the vision layer that produces the features, but "
            f"`vision_feature_layer={vision_feature_layer}` selects "
            f"{'the embeddings' if feature == 0 else 'no hidden state'} of a {len(layers)}-layer vision tower."
        )
    layer = layers[feature - 1]
    attn = layer.self_attn
    h = layer.layer_norm1(hidden_states[feature - 1])  # (B, 1 + N, c)
    bsz, seq, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(h[:, :1]).view(bsz, 1, heads, head_dim).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(h).view(bsz, seq, heads, head_dim).transpose(1, 2)  # (B, H, 1 + N, hd)
    compute = torch.promote_types(q.dtype, torch.float32)
    probs = ((q.to(compute) @ k.to(compute).transpose(-1, -2)) * attn.scale).softmax(-1)  # (B, H, 1, 1 + N)
    return probs[:, :, 0, 1:].mean(1)  # (B, N)


def vispruner_keep_mask(cls_attention, features, budget, important_ratio):
    """VisPruner's kept set (num_images, N) bool, in raster order.

    Important tokens: the `int(budget * important_ratio)` patches with the highest [CLS] attention. Diverse
    tokens: the others, ordered by attention, are repeatedly split alternately into two halves (even / odd
    positions of the list); the up to `min(8, excess)` tokens of the first half whose best cosine similarity to the
    second half is highest are dropped, the first half's survivors are re-listed by decreasing similarity before
    the second half, until `budget - important` remain. Unlike the reference, an odd list (first half one longer),
    a single remaining token (no second half: it is dropped) and more tokens to drop than the first half holds
    are handled. Ties keep the lower position (stable sorts). `budget >= N` keeps everything.

    cls_attention: (B, N); features: (B, N, c) pre-projector features of the patches
    """
    bsz, n = cls_attention.shape
    device = cls_attention.device
    if budget >= n:
        return torch.ones(bsz, n, dtype=torch.bool, device=device)
    important = int(budget * important_ratio)
    diverse = budget - important
    order = torch.sort(cls_attention, dim=1, descending=True, stable=True).indices  # (B, N)
    residual = order[:, important:]  # (B, R)
    compute = torch.promote_types(features.dtype, torch.float32)
    normed = F.normalize(features.to(compute), dim=-1)
    rows = torch.arange(bsz, device=device).unsqueeze(1)
    while True:
        size = residual.shape[1]
        excess = size - diverse
        if excess <= 0:
            break
        first, second = residual[:, 0::2], residual[:, 1::2]  # (B, ceil(R/2)), (B, floor(R/2))
        drop = min(8, excess, first.shape[1])
        if second.shape[1] == 0:
            residual = first[:, drop:]
            continue
        sim = normed[rows, first] @ normed[rows, second].transpose(1, 2)  # (B, R1, R2)
        best = sim.max(-1).values  # (B, R1)
        by_sim = torch.sort(best, dim=1, descending=True, stable=True).indices[:, drop:]
        residual = torch.cat([first.gather(1, by_sim), second], dim=1)
    keep = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    keep.scatter_(1, order[:, :important], True)
    keep.scatter_(1, residual, True)
    return keep


def random_point_scores(seed, num_points, num_tokens):
    """The "random" baseline's scores (num_points, N): `torch.rand` from a CPU generator seeded with
    `pruning_seed`; at point p a row keeps the top-k alive tokens by `scores[p]`, i.e. a uniform k-subset of them
    that depends only on the seed (the same for every row, so batch == single)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_points, num_tokens, generator=g, dtype=torch.float64)


@dataclass
class RcpPruningInfo:
    """Which visual tokens (raster indices 0..N-1) survive each pruning layer, per sample."""

    kept_indices: list  # one entry per pruning layer: list of per-sample 1-D LongTensors
    kept_counts: torch.LongTensor  # (batch, num_pruning_layers)
    keep_masks: torch.BoolTensor  # (batch, num_pruning_layers, N), cumulative
    has_image: torch.BoolTensor  # (batch,); rows without an image are not pruned
    pruning_layers: list

    @classmethod
    def from_masks(cls, keep_masks, has_image, pruning_layers):
        kept_indices = [
            [keep_masks[b, p].nonzero().flatten() for b in range(keep_masks.shape[0])]
            for p in range(keep_masks.shape[1])
        ]
        return cls(kept_indices, keep_masks.sum(-1), keep_masks, has_image, list(pruning_layers))


class RcpDecodeState:
    """Per-sample state that decode steps need after a pruned prefill; lives on the cache.

    prefill_length: the prompt's length in layer 0's cache (T, or less after a pre-LLM prune).
    segment_masks: {first layer of a pruned segment (0 after a pre-LLM prune): (B, T_s) bool key mask of its
        prefill tokens}.
    repair_contexts: {repair layer: (B, b) context of Eq. 11}.
    has_image: (B,) bool.
    input_length: T, the prompt length in input tokens (positions continue from it); default prefill_length.
    """

    def __init__(self, prefill_length, segment_masks, repair_contexts, has_image, input_length=None):
        self.prefill_length = prefill_length
        self.input_length = prefill_length if input_length is None else input_length
        self.segment_masks = segment_masks
        self.repair_contexts = repair_contexts
        self.has_image = has_image

    def _map(self, fn):
        self.segment_masks = {k: fn(v) for k, v in self.segment_masks.items()}
        self.repair_contexts = {k: fn(v) for k, v in self.repair_contexts.items()}
        self.has_image = fn(self.has_image)

    def reorder(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def select(self, indices):
        self._map(lambda t: t[indices])


class RcpDynamicCache(DynamicCache):
    """A `DynamicCache` whose per-sample pruning state follows beam reordering and batch edits.

    Layers after a pruning layer simply hold fewer tokens: `DynamicCache` layers are independent.
    """

    rcp_state = None

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        if self.rcp_state is not None:
            self.rcp_state.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        if self.rcp_state is not None:
            self.rcp_state.repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        if self.rcp_state is not None:
            self.rcp_state.select(indices)


@dataclass
class RcpLlavaModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    image_hidden_states: torch.FloatTensor | None = None
    token_positions: torch.LongTensor | None = None
    kept_indices: list | None = None
    kept_counts: torch.LongTensor | None = None
    keep_masks: torch.BoolTensor | None = None
    hidden_state_positions: tuple | None = None
    layer_retention: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None


@dataclass
class RcpLlavaCausalLMOutputWithPast(ModelOutput):
    """`LlavaCausalLMOutputWithPast` plus what the pruning did.

    token_positions: (B, T') index, in the input sequence, of each output position (-1 for padding); the
        logits of a pruned prefill cover the surviving tokens only, left-padded.
    kept_indices / kept_counts / keep_masks: see `RcpPruningInfo`.
    hidden_state_positions: with `output_hidden_states`, the `token_positions` of each hidden state.
    layer_retention: (B, num_layers) fraction of the visual tokens each decoder layer processes; carries the
        straight-through gradients in the "mask" layout (the sparsity loss reads it).
    has_image: (B,) rows with an image (the only ones pruned).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    image_hidden_states: torch.FloatTensor | None = None
    token_positions: torch.LongTensor | None = None
    kept_indices: list | None = None
    kept_counts: torch.LongTensor | None = None
    keep_masks: torch.BoolTensor | None = None
    hidden_state_positions: tuple | None = None
    layer_retention: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None


class RcpInitMixin:
    """Plug-in initialisation for both model classes.

    `initialize_weights` dispatches each sub-`PreTrainedModel` to its own `_init_weights`, so the inner
    `RcpLlavaModel` needs this as much as the outer class. Zero-inits are keyed on the leaf modules and use
    `nn.init` (guarded by transformers), so tensors loaded from a checkpoint are never overwritten.
    """

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and getattr(module, "_rcp_zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (RcpPruner, RcpRepairAdapter)):
            module.reset_plugin_parameters(std=self.config.text_config.initializer_range)
        else:
            super()._init_weights(module)


class RcpLlavaModel(RcpInitMixin, LlavaModel):
    """`LlavaModel` whose decoder loop drops visual tokens at the pruning layers."""

    config_class = RcpLlavaConfig

    def __init__(self, config):
        config.validate_pruning()
        super().__init__(config)
        self.rcp_plugins = RcpPlugins(config)
        # Runtime switches (not saved): the training teacher runs with both off.
        self.pruning_enabled = True
        self.repair_enabled = True
        # "discard" (inference), "mask" (training: tokens stay in place, differentiable masks) or None: mask
        # while `self.training`, discard otherwise.
        self.pruning_layout = None
        # Logistic noise on the training masks (Eq. 6); off makes a training step deterministic.
        self.gumbel_noise = True
        self._positional_cache = {}
        self.post_init()

    # -- helpers --------------------------------------------------------------------------------

    def _positional(self, device, dtype):
        key = (device, dtype)
        if key not in self._positional_cache:
            self._positional_cache[key] = grid_positional_encoding(
                self.config.num_visual_tokens, self.config.text_config.hidden_size, device, dtype
            )
        return self._positional_cache[key]

    def _embed(self, input_ids, pixel_values, inputs_embeds, vision_feature_layer, vision_feature_select_strategy,
               image_sizes):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = vision_keep = None
        if pixel_values is not None:
            vispruner = self._pruning_active() and self.config.pruning_method == "vispruner"
            extra = {}
            if vispruner and isinstance(vision_feature_layer, int):
                # Capture the feature layer's input too (transformers keeps only the selected hidden states).
                num_states = self.config.vision_config.num_hidden_layers + 1
                feature = vision_feature_layer % num_states
                extra["output_hidden_states"] = sorted({feature, max(feature - 1, 0)})
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **extra,
            )
            if vispruner:
                vision_keep = self._vispruner_keep(image_outputs.hidden_states, vision_feature_layer,
                                                   vision_feature_select_strategy)
            image_features = image_outputs.pooler_output
            image_features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self._image_token_mask(input_ids, inputs_embeds)
            n_tokens, n_features = int(image_mask.sum()), image_features.shape[0]
            if n_tokens != n_features:
                raise ValueError(
                    f"Image features and image tokens do not match: `input_ids` holds {n_tokens} image tokens "
                    f"(id {self.config.image_token_id}) but `pixel_values` gave {n_features} features "
                    f"({self.config.num_visual_tokens} per image). Build the inputs with the model's processor, "
                    "which expands each <image> into one token per visual feature."
                )
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        return inputs_embeds, image_features, vision_keep

    def _vispruner_keep(self, vision_hidden_states, vision_feature_layer, vision_feature_select_strategy):
        """VisPruner's kept patches (num_images, N), from the vision tower's hidden states."""
        if not isinstance(vision_feature_layer, int) or vision_feature_select_strategy != "default":
            raise ValueError(
                "`pruning_method='vispruner'` needs one int `vision_feature_layer` and "
                f"`vision_feature_select_strategy='default'`, got {vision_feature_layer!r} and "
                f"{vision_feature_select_strategy!r}."
            )
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        if not hasattr(getattr(tower, "encoder", None), "layers") or vision_hidden_states is None:
            raise ValueError(
                f"`pruning_method='vispruner'` needs a CLIP-style vision tower with a [CLS] token; got "
                f"{type(self.vision_tower).__name__}."
            )
        cls_attention = vispruner_cls_attention(self.vision_tower, vision_hidden_states, vision_feature_layer)
        features = vision_hidden_states[vision_feature_layer][:, 1:]  # pre-projector patch features
        return vispruner_keep_mask(cls_attention, features, self.config.pre_llm_keep_count,
                                   self.config.vispruner_important_ratio)

    def _image_token_mask(self, input_ids, inputs_embeds):
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    def _pruning_active(self):
        return self.config.pruning_method != "none" and self.pruning_enabled

    def _layer_mask(self, hidden, key_mask, cache, layer_idx):
        text_config = self.language_model.config
        # position_ids=None: gathered positions have gaps and would be read as packed sequences.
        return create_causal_mask(
            config=text_config,
            inputs_embeds=hidden,
            attention_mask=key_mask,
            past_key_values=cache,
            position_ids=None,
            layer_idx=layer_idx,
        )

    def _select_tokens(self, p, layer_idx, layer, hidden, position_embeddings, run, vis_slots, vis_valid, vis_ids):
        """Keep mask (B, K) over the alive visual tokens at pruning point #p: before decoder layer `layer_idx`
        (0 = before the LLM, for the methods that prune there)."""
        method = self.config.pruning_method
        count = run.keep_counts[p] if run.keep_counts is not None else None
        if method == "rcp":
            logits = self._retention_logits(layer_idx, layer, hidden, position_embeddings, run, vis_slots, vis_valid)
            if count is None:
                return logits > 0  # Eq. (8)
            return _top_k_mask(logits, vis_valid, count)
        if method == "vispruner":
            return run.vision_keep.gather(1, vis_ids) & vis_valid
        if method == "random":
            scores = random_point_scores(self.config.pruning_seed, len(run.pruning_layers), self.config.num_visual_tokens)
            scores = scores[p].to(vis_ids.device).unsqueeze(0).expand(vis_ids.shape[0], -1).gather(1, vis_ids)
            return _top_k_mask(scores, vis_valid, count)
        if method == "attention_topk":
            hidden_norm = layer.input_layernorm(hidden)
            q_slots, q_valid = _first_slots(run.slot_question())
            a = self._visual_attention(layer, hidden_norm, position_embeddings, run, vis_slots, q_slots, q_valid)
            return _top_k_mask(_centred_log(a, vis_valid), vis_valid, count)
        if method == "fastv":
            prev_idx, prev_hidden = run.previous_input
            if prev_idx != layer_idx - 1 or prev_hidden.shape[1] != hidden.shape[1]:
                raise RuntimeError("FastV needs the input of the layer before its pruning layer, unpruned.")
            prev = self.language_model.layers[prev_idx]
            if self.config.fastv_query == "last":  # rows are right-aligned: the last slot is the last prompt token
                q_slots = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1, dtype=torch.long,
                                     device=hidden.device)
                q_valid = torch.ones_like(q_slots, dtype=torch.bool)
            else:
                q_slots, q_valid = _first_slots(run.slot_question())
            a = self._visual_attention(prev, prev.input_layernorm(prev_hidden), position_embeddings, run, vis_slots,
                                       q_slots, q_valid)
            return _top_k_mask(a, vis_valid, count)
        raise ValueError(f"`pruning_method` {method!r} cannot select tokens.")

    def _visual_attention(self, layer, hidden_norm, position_embeddings, run, vis_slots, q_slots, q_valid):
        """Attention (B, K) the query rows `q_slots` pay to the visual tokens at `vis_slots` in `layer` (whose
        normalised input is `hidden_norm`), averaged over heads and valid query rows, in at least float32."""
        cos, sin = position_embeddings
        probs = question_attention_probs(layer.self_attn, hidden_norm, cos, sin, run.key_alive(), q_slots)
        to_visual = probs.gather(3, vis_slots.view(vis_slots.shape[0], 1, 1, -1).expand(
            -1, probs.shape[1], probs.shape[2], -1))  # (B, H, Lq, K)
        qw = q_valid.to(to_visual.dtype).view(q_valid.shape[0], 1, -1, 1)
        return (to_visual * qw).sum(2).mean(1) / qw.sum(2).mean(1).clamp_min(1.0)  # (B, K)

    def _retention_logits(self, layer_idx, layer, hidden, position_embeddings, run, vis_slots, vis_valid):
        """RCP's retention logits (B, K) for the alive visual tokens at `vis_slots` (Eqs. 4-5)."""
        hidden_norm = layer.input_layernorm(hidden)  # (B, T', d)
        q_slots, q_valid = _first_slots(run.slot_question())  # (B, Lq)
        a = self._visual_attention(layer, hidden_norm, position_embeddings, run, vis_slots, q_slots, q_valid)
        prior = _centred_log(a, vis_valid).to(hidden.dtype)  # A, Eq. (4)

        pruner = self.rcp_plugins.pruners[str(layer_idx)]
        visual = _gather_seq(hidden_norm, vis_slots)  # (B, K, d)
        question = _gather_seq(hidden_norm, q_slots)  # (B, Lq, d)
        return pruner(visual, vis_valid, question, q_valid, prior)  # (B, K)

    # -- the loop -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        use_cache=None,
        labels=None,
        question_mask=None,
        answer_mask=None,
        visual_keep_masks=None,
        output_hidden_states=None,
        **kwargs,
    ):
        """Arguments beyond `LlavaModel.forward`:

        question_mask: (B, T) bool, the question tokens the pruners condition on. Default: the text tokens
            after the last image token (and, with `labels`, only those whose label is -100).
        answer_mask: (B, T) bool, the positions the repair adapters modify. Default: positions whose next
            token is an answer token (`labels[t+1] != -100`), else the last prompt position; every position
            of a decode step.
        visual_keep_masks: (B, num_pruning_layers, N) bool, a cumulative keep mask per pruning layer that
            replaces the method's own choice (oracle pruning, recomputation with the same kept sets).
        """
        text_config = self.config.text_config
        vision_feature_layer = (
            vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        )
        vision_feature_select_strategy = (
            vision_feature_select_strategy
            if vision_feature_select_strategy is not None
            else self.config.vision_feature_select_strategy
        )
        use_cache = use_cache if use_cache is not None else text_config.use_cache
        if not self.training and use_cache and past_key_values is None:
            past_key_values = RcpDynamicCache(config=text_config)
        if not use_cache:
            past_key_values = None
        kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)

        inputs_embeds, image_features, vision_keep = self._embed(
            input_ids, pixel_values, inputs_embeds, vision_feature_layer, vision_feature_select_strategy, image_sizes
        )
        bsz, seq, _ = inputs_embeds.shape
        lm = self.language_model
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        # A state left on a cache that is empty again belongs to an older prompt.
        state = getattr(past_key_values, "rcp_state", None) if past_length > 0 else None
        if position_ids is None:
            # After a pre-LLM prune, layer 0's cache is shorter than the prompt: count positions in input tokens.
            offset = past_length if state is None else past_length - state.prefill_length + state.input_length
            position_ids = torch.arange(seq, device=inputs_embeds.device) + offset
            position_ids = position_ids.unsqueeze(0).expand(bsz, -1)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.expand(bsz, -1)

        image_mask = self._image_token_mask(input_ids, inputs_embeds)
        prune_now = self._pruning_active() and bool(image_mask.any()) and self.config.pruning_points
        if prune_now and past_length > 0:
            raise ValueError(
                "Pruning needs the image in a prefill that starts from an empty cache, but `past_key_values` already "
                f"holds {past_length} tokens. Start a new cache for each prompt with an image."
            )
        if prune_now and past_key_values is not None and getattr(past_key_values, "is_compileable", False):
            raise ValueError(
                f"Pruning is not supported with {type(past_key_values).__name__}: layers after a pruning layer hold "
                "fewer tokens, but a static cache pre-allocates the same length for every layer. Use the default "
                "dynamic cache (leave `cache_implementation` unset)."
            )

        hidden = inputs_embeds
        position_embeddings = lm.rotary_emb(hidden, position_ids)  # (cos, sin), each (B, T, hd)
        key_valid = (
            attention_mask.bool() if attention_mask is not None else torch.ones(bsz, seq, dtype=torch.bool,
                                                                                 device=hidden.device)
        )
        run = None
        if prune_now:
            layout = self.pruning_layout or ("mask" if self.training else "discard")
            if layout not in ("mask", "discard"):
                raise ValueError(f"`pruning_layout` is {layout!r}; use 'mask', 'discard' or None.")
            if layout == "mask" and self.config.pruning_method != "rcp" and visual_keep_masks is None:
                raise ValueError(
                    f"The differentiable ('mask') pruning layout trains RCP's plug-ins, but "
                    f"`pruning_method={self.config.pruning_method!r}` has none. Call `model.eval()` or set "
                    "`model.model.pruning_layout = 'discard'`."
                )
            if layout == "mask" and any(getattr(l, "gradient_checkpointing", False) for l in lm.layers):
                raise ValueError(
                    "Gradient checkpointing is not supported in the differentiable ('mask') pruning layout: the "
                    "recomputation in backward would run without the differentiable key mask. Disable it with "
                    "`model.gradient_checkpointing_disable()` (only the small plug-ins train)."
                )
            run = _PrunedPrefill(self, hidden, position_embeddings, key_valid, image_mask, input_ids, labels,
                                 question_mask, answer_mask, visual_keep_masks, differentiable=layout == "mask",
                                 vision_keep=vision_keep)
            if run.differentiable and past_key_values is not None:
                # The mask layout keeps every token, so a cache filled now could not be decoded from.
                past_key_values, use_cache = None, False

        all_hidden, all_positions = [], []
        slot_orig = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(bsz, -1)
        if output_hidden_states:
            all_hidden.append(hidden)
            all_positions.append(slot_orig)
        decode_answer_mask = None
        if state is not None and 0 in state.segment_masks:
            mask = None  # layer 0 is a pruned segment: its mask is built in the loop
        else:
            mask = self._layer_mask(hidden, attention_mask, past_key_values, 0)
        if run is not None:
            run.mask = mask
        for idx, layer in enumerate(lm.layers[: text_config.num_hidden_layers]):
            extra = {}
            if run is not None:
                if idx in run.pruning_layers:
                    hidden, position_embeddings, mask = run.prune(idx, layer, hidden, position_embeddings,
                                                                  past_key_values)
                run.record_retention()
                run.previous_input = (idx, hidden)  # FastV reads the input of the layer before its pruning layer
                extra = run.layer_kwargs()
            elif state is not None and idx in state.segment_masks:
                mask = self._decode_segment_mask(hidden, attention_mask, past_key_values, state, idx)
            with _attention_implementation(lm.config, SOFT_KEY_MASK_ATTENTION) if extra else contextlib.nullcontext():
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=position_embeddings,
                    position_ids=None,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    **extra,
                    **kwargs,
                )
            adapter = self.rcp_plugins.repair_adapters[str(idx)] if str(idx) in self.rcp_plugins.repair_adapters \
                else None
            if adapter is not None and self.repair_enabled:
                if run is not None:
                    hidden = run.repair(idx, adapter, hidden)
                elif state is not None and idx in state.repair_contexts and self._pruning_active():
                    if decode_answer_mask is None:
                        decode_answer_mask = state.has_image.unsqueeze(1).expand(bsz, hidden.shape[1])
                    hidden = adapter(hidden, state.repair_contexts[idx], decode_answer_mask)
            if output_hidden_states:
                all_hidden.append(hidden)
                all_positions.append(run.slot_orig if run is not None else slot_orig)
        hidden = lm.norm(hidden)

        info = None
        token_positions = slot_orig
        layer_retention = None
        if run is not None:
            info = run.info()
            token_positions = run.slot_orig
            layer_retention = torch.stack(run.retention, dim=1)  # (B, num_layers)
            if past_key_values is not None and not run.differentiable:
                past_key_values.rcp_state = run.decode_state(run.prefill_length, seq)
            self.last_pruning_info = info
        elif past_key_values is not None and past_length == 0:
            past_key_values.rcp_state = None  # a new prompt without pruning: forget an older state

        return RcpLlavaModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            image_hidden_states=image_features,
            token_positions=token_positions,
            kept_indices=info.kept_indices if info else None,
            kept_counts=info.kept_counts if info else None,
            keep_masks=info.keep_masks if info else None,
            hidden_state_positions=tuple(all_positions) if output_hidden_states else None,
            layer_retention=layer_retention,
            has_image=info.has_image if info else None,
        )

    def _decode_segment_mask(self, hidden, attention_mask, cache, state, layer_idx):
        """Key mask of a pruned segment during decoding: its stored prefill mask + the new tokens' columns."""
        prefill_mask = state.segment_masks[layer_idx]  # (B, T_s)
        new_len = cache.get_seq_length(0) + hidden.shape[1] - state.prefill_length
        if attention_mask is not None:
            new_cols = attention_mask[:, attention_mask.shape[1] - new_len:].bool()
        else:
            new_cols = torch.ones(hidden.shape[0], new_len, dtype=torch.bool, device=hidden.device)
        return self._layer_mask(hidden, torch.cat([prefill_mask, new_cols], dim=1), cache, layer_idx)


class _PrunedPrefill:
    """Bookkeeping of one pruned prefill: which original token sits in which slot after each discard.

    Layout: slot t of row b holds original token `slot_orig[b, t]` (-1 for padding); rows are right-aligned.
    """

    def __init__(self, model, hidden, position_embeddings, key_valid, image_mask, input_ids, labels,
                 question_mask, answer_mask, visual_keep_masks, differentiable=False, vision_keep=None):
        config = model.config
        self.model = model
        self.differentiable = differentiable
        self.config = config
        # Pruning points: decoder layers before which tokens are dropped; 0 = before the LLM (pre-LLM methods).
        self.pruning_layers = list(config.pruning_points)
        self.keep_counts = config.point_keep_counts
        self.prefill_length = hidden.shape[1]  # layer 0's cache length after this prefill
        self.previous_input = None  # (layer index, hidden entering it), for FastV
        bsz, seq, _ = hidden.shape
        device = hidden.device
        n = config.num_visual_tokens
        per_row = image_mask.sum(1)
        bad = [int(c) for c in per_row if int(c) not in (0, n)]
        if bad:
            raise ValueError(
                f"Pruning needs one image of {n} visual tokens per prompt, but a row holds {bad[0]} image tokens. "
                "Pass one image per prompt (or run with `pruning_method='none'`)."
            )
        self.has_image = per_row == n  # (B,)
        self.vision_keep = None  # (B, N) VisPruner's choice per row (rows without an image: all False)
        if vision_keep is not None:
            self.vision_keep = torch.zeros(bsz, n, dtype=torch.bool, device=device)
            self.vision_keep[self.has_image] = vision_keep.to(device)
        # Raster index of each original visual token, -1 elsewhere.
        self.vis_id = torch.where(image_mask, image_mask.long().cumsum(1) - 1, -1)  # (B, T)

        positions = torch.arange(seq, device=device).unsqueeze(0)
        if question_mask is None:
            last_image = torch.where(image_mask, positions, -1).max(1).values  # (B,)
            question_mask = (positions > last_image.unsqueeze(1)) & key_valid & self.has_image.unsqueeze(1)
            if labels is not None:
                question_mask &= labels == -100
            # A prompt that ends on its image: condition on its last token.
            empty = ~question_mask.any(1) & self.has_image
            question_mask[empty, seq - 1] = True
        if answer_mask is None:
            if labels is not None:
                answer_mask = torch.zeros_like(key_valid)
                answer_mask[:, :-1] = labels[:, 1:] != -100
            else:
                answer_mask = torch.zeros_like(key_valid)
                answer_mask[:, -1] = True
        self.question_mask = question_mask.bool()
        self.answer_mask = answer_mask.bool() & self.has_image.unsqueeze(1)

        if visual_keep_masks is not None:
            expected = (bsz, len(self.pruning_layers), n)
            if tuple(visual_keep_masks.shape) != expected:
                raise ValueError(
                    f"`visual_keep_masks` has shape {tuple(visual_keep_masks.shape)}, expected {expected} "
                    "(batch, num_pruning_layers, num_visual_tokens)."
                )
            visual_keep_masks = visual_keep_masks.bool()
        self.forced = visual_keep_masks

        self.slot_orig = positions.expand(bsz, -1)  # (B, T)
        self.slot_valid = key_valid  # (B, T)
        self.alive = self.has_image.unsqueeze(1).expand(bsz, n).clone()  # (B, N) cumulative keep mask
        self.keep_history = []  # per pruning layer, (B, N) bool
        self.context_masks = []  # per pruning layer, (B, N) float: the cumulative mask M the adapters read
        self.dropped_means = []  # per pruning layer, (B, d)
        self.retention = []  # per decoder layer, (B,) visual tokens alive / N (differentiable in mask mode)
        # Mask mode: every token stays in place; `key_keep` (B, T) is each key's 0/1 weight in attention, and
        # `soft_alive` (B, N) the cumulative mask M with straight-through gradients (Eqs. 6-7).
        self.key_keep = torch.ones(bsz, seq, dtype=hidden.dtype, device=device) if differentiable else None
        self.soft_alive = self.has_image.unsqueeze(1).expand(bsz, n).to(hidden.dtype) if differentiable else None
        self.segment_masks = {}
        self.repair_contexts = {}
        self.position_embeddings = position_embeddings

    def slot_question(self):
        """(B, T') question tokens among the current slots."""
        return torch.where(self.slot_valid, self.question_mask.gather(1, self.slot_orig.clamp_min(0)), False)

    def _slot_vis(self):
        return torch.where(self.slot_valid, self.vis_id.gather(1, self.slot_orig.clamp_min(0)), -1)  # (B, T')

    def key_alive(self):
        """(B, T') keys a query may attend to: valid slots, minus the tokens dropped in mask mode."""
        if not self.differentiable:
            return self.slot_valid
        return self.slot_valid & (self.key_keep > 0)

    def record_retention(self):
        n = self.config.num_visual_tokens
        if self.differentiable:
            self.retention.append(self.soft_alive.sum(1) / n)
        else:
            self.retention.append(self.alive.sum(1).to(torch.float32) / n)

    def prune(self, layer_idx, layer, hidden, position_embeddings, cache):
        """Decide the kept visual tokens before `layer`, then drop the others (physically, or by mask)."""
        if self.differentiable:
            return self._prune_mask(layer_idx, layer, hidden, position_embeddings, cache)
        p = self.pruning_layers.index(layer_idx)
        slot_vis = self._slot_vis()  # (B, T')
        vis_slots, vis_valid = _first_slots(slot_vis >= 0)  # (B, K)
        vis_ids = slot_vis.gather(1, vis_slots).clamp_min(0)  # (B, K) raster ids of alive visual tokens

        if self.forced is not None:
            keep = self.forced[:, p].gather(1, vis_ids) & vis_valid
        else:
            keep = self.model._select_tokens(p, layer_idx, layer, hidden, position_embeddings, self, vis_slots,
                                             vis_valid, vis_ids)
        keep &= vis_valid
        rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)
        keep_raster = torch.zeros_like(self.alive)
        keep_raster[rows[keep], vis_ids[keep]] = True  # (B, N); index only real tokens (padding ids are 0)
        keep_raster &= self.alive

        dropped_slots = torch.zeros_like(self.slot_valid)
        dropped_slots.scatter_(1, vis_slots, vis_valid & ~keep)  # (B, T')
        dropped_slots &= self.slot_valid
        w = dropped_slots.unsqueeze(-1).to(hidden.dtype)
        self.dropped_means.append((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))  # (B, d), 0 if none dropped
        self.alive = keep_raster
        self.keep_history.append(keep_raster)
        self.context_masks.append(keep_raster.to(hidden.dtype))

        stay = self.slot_valid & ~dropped_slots
        src, valid = _compact(stay)
        hidden = _gather_seq(hidden, src)
        position_embeddings = tuple(_gather_seq(t, src) for t in position_embeddings)
        self.slot_orig = torch.where(valid, self.slot_orig.gather(1, src), -1)
        self.slot_valid = valid
        self.segment_masks[layer_idx] = valid
        if layer_idx == 0:
            self.prefill_length = valid.shape[1]
        mask = self.model._layer_mask(hidden, valid, cache, layer_idx)
        return hidden, position_embeddings, mask

    def _prune_mask(self, layer_idx, layer, hidden, position_embeddings, cache):
        """Training layout: sample a hard Gumbel-Sigmoid mask with straight-through gradients (Eqs. 6-7) and
        zero the dropped tokens' weight as keys; nothing moves, so the student lines up with the teacher."""
        p = self.pruning_layers.index(layer_idx)
        n = self.config.num_visual_tokens
        bsz = hidden.shape[0]
        image_slots = self.vis_id >= 0  # (B, T): mask mode keeps the original layout
        vis_slots, _ = _first_slots(image_slots)  # (B, N) for rows with an image; others are masked below
        vis_valid = self.alive & self.has_image.unsqueeze(1)  # (B, N) hard-alive tokens
        if vis_slots.shape[1] < n:  # no row has an image
            return hidden, position_embeddings, self.mask
        if self.forced is not None:
            layer_mask = self.forced[:, p].to(hidden.dtype)
        else:
            logits = self.model._retention_logits(layer_idx, layer, hidden, position_embeddings, self, vis_slots,
                                                  vis_valid)
            tau = self.config.gumbel_temperature
            if self.model.training and self.model.gumbel_noise:
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                logits = logits + torch.log(u) - torch.log1p(-u)  # logistic noise
            y_soft = torch.sigmoid(logits / tau)  # Eq. (6)
            counts = self.config.pruning_keep_counts
            hard = (y_soft > 0.5) if counts is None else _top_k_mask(logits, vis_valid, counts[p])
            y_soft = torch.where(vis_valid, y_soft, torch.zeros_like(y_soft))
            layer_mask = hard.to(y_soft.dtype) - y_soft.detach() + y_soft  # Eq. (7), straight-through
        previous = self.soft_alive
        self.soft_alive = previous * layer_mask  # cumulative, M(l) = M(l-1) * m(l)
        keep_raster = (self.soft_alive > 0.5) & self.has_image.unsqueeze(1)
        dropped = previous - self.soft_alive  # (B, N), 1 where this pruner dropped the token
        visual_hidden = _gather_seq(hidden, vis_slots)  # (B, N, d)
        self.dropped_means.append(
            (dropped.unsqueeze(-1) * visual_hidden).sum(1) / dropped.sum(1, keepdim=True).clamp_min(1.0)
        )
        self.alive = keep_raster
        self.keep_history.append(keep_raster)
        self.context_masks.append(self.soft_alive)
        rows = torch.arange(bsz, device=hidden.device).unsqueeze(1).expand(-1, n)
        key_keep = self.key_keep.clone()
        key_keep[rows[self.has_image], vis_slots[self.has_image]] = self.soft_alive[self.has_image].to(key_keep.dtype)
        self.key_keep = key_keep
        return hidden, position_embeddings, self.mask

    def layer_kwargs(self):
        """Extra kwargs for a decoder layer: the differentiable key weights in mask mode."""
        if self.differentiable and self.keep_history:
            return {"rcp_key_keep": self.key_keep}
        return {}

    def repair(self, layer_idx, adapter, hidden):
        preceding = [i for i, layer in enumerate(self.pruning_layers) if layer <= layer_idx]
        if not preceding:
            return hidden
        keep = torch.stack([self.context_masks[i] for i in preceding], dim=1)  # (B, P', N)
        dropped = torch.stack([self.dropped_means[i] for i in preceding], dim=1)  # (B, P', d)
        context = adapter.context(self.model._positional(hidden.device, hidden.dtype), keep, dropped)
        self.repair_contexts[layer_idx] = context
        answer = torch.where(self.slot_valid, self.answer_mask.gather(1, self.slot_orig.clamp_min(0)), False)
        return adapter(hidden, context, answer)

    def info(self):
        n = self.config.num_visual_tokens
        masks = (
            torch.stack(self.keep_history, dim=1)
            if self.keep_history
            else torch.zeros(self.alive.shape[0], 0, n, dtype=torch.bool, device=self.alive.device)
        )
        return RcpPruningInfo.from_masks(masks, self.has_image, self.pruning_layers)

    def decode_state(self, prefill_length, input_length=None):
        return RcpDecodeState(prefill_length, dict(self.segment_masks), dict(self.repair_contexts), self.has_image,
                              input_length)


# ------------------------------------------------------------------------------------------------
# Hub files and plug-in-only checkpoints (used by the model class below)
# ------------------------------------------------------------------------------------------------

import json  # noqa: E402  (kept next to their only users)
import os  # noqa: E402


try:  # loaded as a Hub module (flat folder, relative import) ...
    from .configuration_rcp_llava import PRUNING_FIELDS
except ImportError:  # ... or as an installed top-level module
    from configuration_rcp_llava import PRUNING_FIELDS

try:  # safetensors is a hard dependency of transformers (its modeling_utils imports it at the top); the
    # remote-code import check ignores try blocks, so the Hub files still need only torch and transformers.
    from safetensors.torch import load_file as _load_safetensors
    from safetensors.torch import save_file as _save_safetensors
except ImportError:  # pragma: no cover
    _load_safetensors = _save_safetensors = None

RCP_LLAVA_VERSION = "0.1.0"
# A plug-in-only checkpoint (PEFT-style): these two files, nothing else.
RCP_CONFIG_NAME = "rcp_config.json"
RCP_PLUGINS_NAME = "rcp_plugins.safetensors"
RCP_PLUGINS_FORMAT = "rcp_plugins"
# What `save_pretrained` writes into config.json: the classes each Auto class resolves to with
# `trust_remote_code=True`. AutoModel gives the bare decoder (last_hidden_state), the other two the LM.
RCP_AUTO_MAP = {
    "AutoConfig": "configuration_rcp_llava.RcpLlavaConfig",
    "AutoModel": "modeling_rcp_llava.RcpLlavaModel",
    "AutoModelForCausalLM": "modeling_rcp_llava.RcpLlavaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_rcp_llava.RcpLlavaForConditionalGeneration",
}
# Keys of rcp_config.json besides the pruning fields of the config.
_PLUGIN_META_KEYS = (
    "format", "base_model_name_or_path", "hidden_size", "num_hidden_layers", "num_visual_tokens",
    "library_version", "transformers_version",
)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _resolve_plugin_file(path_or_repo_id, filename, hub_kwargs):
    """Local folder or Hub repo id -> local path of `filename` (the Hub is only contacted for a repo id)."""
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, hub_kwargs.get("subfolder") or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path_or_repo_id!r} has no {filename}: it is not an RCP plug-in folder (written by "
                "`model.save_plugins(folder)`)."
            )
        return path
    from transformers.utils import cached_file

    return cached_file(path_or_repo_id, filename, **hub_kwargs)


def read_plugin_config(path_or_repo_id, **hub_kwargs):
    """The rcp_config.json of a plug-in checkpoint as a dict; unknown keys are reported with a warning."""
    path = _resolve_plugin_file(path_or_repo_id, RCP_CONFIG_NAME, hub_kwargs)
    with open(path, encoding="utf-8") as f:
        plugin_config = json.load(f)
    if plugin_config.get("format", RCP_PLUGINS_FORMAT) != RCP_PLUGINS_FORMAT:
        raise ValueError(f"{path} has `format` {plugin_config['format']!r}, expected {RCP_PLUGINS_FORMAT!r}.")
    unknown = sorted(set(plugin_config) - set(PRUNING_FIELDS) - set(_PLUGIN_META_KEYS))
    if unknown:
        logger.warning(f"{RCP_CONFIG_NAME} of {path_or_repo_id!r} has unknown keys {unknown}; they are ignored.")
    return plugin_config


@contextlib.contextmanager
def _quiet_logger(name):
    """Raise logger `name` to ERROR for the duration of the block."""
    target = logging.get_logger(name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _check_plugin_shape(plugin_config, hidden_size, num_layers, base_name, plugins_name):
    """ValueError unless plug-ins built for (hidden_size, num_layers) fit; called before any tensor is read."""
    problems = []
    for key, actual in (("hidden_size", hidden_size), ("num_hidden_layers", num_layers)):
        expected = plugin_config.get(key)
        if expected is not None and expected != actual:
            problems.append(f"`{key}` {expected} (plug-ins) != {actual} (base)")
    if problems:
        raise ValueError(
            f"The RCP plug-ins {plugins_name!r} were trained for another text model than {base_name!r}: "
            f"{'; '.join(problems)}. Use the base model named in its {RCP_CONFIG_NAME} "
            f"(`base_model_name_or_path`: {plugin_config.get('base_model_name_or_path')!r})."
        )


# ------------------------------------------------------------------------------------------------
# 3. The model class
# ------------------------------------------------------------------------------------------------


class RcpLlavaForConditionalGeneration(RcpInitMixin, LlavaForConditionalGeneration):
    """A drop-in `LlavaForConditionalGeneration` that prunes visual tokens inside its decoder.

    ```python
    model = RcpLlavaForConditionalGeneration.from_pretrained(
        "llava-hf/llava-1.5-7b-hf", pruning_layers=[2, 14, 26], pruning_keep_counts=[96, 26, 8]
    )
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=16)
    model.last_pruning_info.kept_counts  # (batch, 3)
    ```
    """

    config_class = RcpLlavaConfig

    def __init__(self, config):
        # Skip LlavaForConditionalGeneration.__init__: it would build (and throw away) a stock LlavaModel.
        LlavaPreTrainedModel.__init__(self, config)
        self.model = RcpLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # -- weights --------------------------------------------------------------------------------

    def plugin_state_dict(self):
        """Only the plug-in tensors (the keys start with `PLUGIN_PREFIX`)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(PLUGIN_PREFIX)}

    def plugin_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith(PLUGIN_PREFIX)]

    @property
    def last_pruning_info(self):
        """`RcpPruningInfo` of the last pruned forward (for `generate`: its prefill), or None."""
        return getattr(self.model, "last_pruning_info", None)

    @contextlib.contextmanager
    def plugins_disabled(self, pruning=True, repair=True):
        """Run the stock backbone: `with model.plugins_disabled(): model(**inputs)` (the training teacher)."""
        old = (self.model.pruning_enabled, self.model.repair_enabled)
        self.model.pruning_enabled = old[0] and not pruning
        self.model.repair_enabled = old[1] and not repair
        try:
            yield self
        finally:
            self.model.pruning_enabled, self.model.repair_enabled = old

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        use_cache=None,
        question_mask=None,
        answer_mask=None,
        visual_keep_masks=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            use_cache=use_cache,
            labels=labels,
            question_mask=question_mask,
            answer_mask=answer_mask,
            visual_keep_masks=visual_keep_masks,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])

        loss = None
        if labels is not None:
            # Labels follow the tokens that survived: discarded visual tokens never carry an answer.
            positions = outputs.token_positions
            kept_labels = torch.where(positions >= 0, labels.gather(1, positions.clamp_min(0)), -100)
            kept_labels = kept_labels[:, slice_indices]
            loss = self.loss_function(
                logits=logits, labels=kept_labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return RcpLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
            token_positions=outputs.token_positions,
            kept_indices=outputs.kept_indices,
            kept_counts=outputs.kept_counts,
            keep_masks=outputs.keep_masks,
            hidden_state_positions=outputs.hidden_state_positions,
            layer_retention=outputs.layer_retention,
            has_image=outputs.has_image,
        )

    # -- generate -------------------------------------------------------------------------------

    def _pruning_active(self):
        return self.model._pruning_active()

    def generate(self, *args, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        if self._pruning_active() and attention_mask is not None and attention_mask.dim() == 2:
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError(
                    "Right padding is not supported by `generate` with pruning: the next token would be predicted "
                    "from a padding position. Pad on the left (`processor.tokenizer.padding_side = 'left'`)."
                )
        cache = kwargs.get("past_key_values")
        if self._pruning_active() and cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"Pruning is not supported with {type(cache).__name__}: layers after a pruning layer hold fewer "
                "tokens. Use the default dynamic cache."
            )
        generation_config = kwargs.get("generation_config")
        impl = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
        if impl is None:
            impl = getattr(self.generation_config, "cache_implementation", None)
        if self._pruning_active() and impl not in (None, "dynamic"):
            raise ValueError(
                f"`cache_implementation={impl!r}` is not supported with pruning: layers after a pruning layer hold "
                "fewer tokens, which only the dynamic cache allows. Leave `cache_implementation` unset."
            )
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = RcpDynamicCache(config=self.config.get_text_config(decoder=True))
        return result

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        state = getattr(past_key_values, "rcp_state", None)
        if state is not None and not isinstance(past_key_values, RcpDynamicCache):
            state.reorder(beam_idx)  # a plain cache passed by the user: carry the state along ourselves
        return past_key_values

    # -- Hub folders and plug-in-only checkpoints -----------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus what makes the folder a self-contained Hub repo: the two Hub files
        (`configuration_rcp_llava.py`, `modeling_rcp_llava.py`) and `config.auto_map` = `RCP_AUTO_MAP`, so that
        `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` / `AutoModelForImageTextToText`
        `.from_pretrained(folder, trust_remote_code=True)` load it where rcp-llava is not installed."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **RCP_AUTO_MAP}
        owner = type(self)
        if owner._auto_class is not None:  # loaded as remote code: transformers already copies the module files
            return super().save_pretrained(save_directory, *args, **kwargs)
        owner._auto_class = "AutoModelForImageTextToText"  # what makes `save_pretrained` copy the module files
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del owner._auto_class

    def save_plugins(self, save_directory, base_model_name_or_path=None):
        """Write a plug-in-only checkpoint (PEFT-style) to `save_directory`: `rcp_config.json` (the pruning fields
        of the config, the base model, its hidden size and layer count, the library versions) and
        `rcp_plugins.safetensors` (the tensors of `plugin_state_dict()`). Load it with
        `RcpLlavaForConditionalGeneration.from_base(base, plugins=save_directory)`. Returns the two paths.

        `base_model_name_or_path` defaults to the checkpoint this model was built from.
        """
        if _save_safetensors is None:  # pragma: no cover
            raise ImportError("Saving RCP plug-ins needs `safetensors` (`pip install safetensors`).")
        from transformers import __version__ as transformers_version

        config, text = self.config, self.config.text_config
        base = (
            base_model_name_or_path
            or getattr(self, "rcp_base_model_name_or_path", None)
            or getattr(config, "_name_or_path", None)
            or None
        )
        record = {name: getattr(config, name) for name in PRUNING_FIELDS}
        record.update(
            format=RCP_PLUGINS_FORMAT,
            base_model_name_or_path=str(base) if base is not None else None,
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_visual_tokens=config.num_visual_tokens,
            library_version=RCP_LLAVA_VERSION,
            transformers_version=transformers_version,
        )
        os.makedirs(save_directory, exist_ok=True)
        config_path = os.path.join(save_directory, RCP_CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        weights_path = os.path.join(save_directory, RCP_PLUGINS_NAME)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.plugin_state_dict().items()}
        _save_safetensors(tensors, weights_path, metadata={"format": "pt"})
        return [config_path, weights_path]

    def load_plugins(self, plugins, **hub_kwargs):
        """Copy the tensors of a plug-in checkpoint (folder or Hub repo id) into this model's plug-ins.

        A checkpoint built for another hidden size or layer count, or holding a tensor of another shape, raises a
        `ValueError` before any tensor is copied; unknown config keys, missing plug-in keys (they keep their
        initial values) and unexpected keys are reported with a warning. Returns `(missing, unexpected)`.
        """
        if _load_safetensors is None:  # pragma: no cover
            raise ImportError("Loading RCP plug-ins needs `safetensors` (`pip install safetensors`).")
        plugin_config = read_plugin_config(plugins, **hub_kwargs)
        text = self.config.text_config
        _check_plugin_shape(plugin_config, text.hidden_size, text.num_hidden_layers, self.name_or_path, plugins)
        tensors = _load_safetensors(_resolve_plugin_file(plugins, RCP_PLUGINS_NAME, hub_kwargs))
        own = self.plugin_state_dict()
        mismatched = [
            f"{k}: {tuple(tensors[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
            for k in sorted(set(tensors) & set(own))
            if tensors[k].shape != own[k].shape
        ]
        if mismatched:
            raise ValueError(
                f"The RCP plug-ins {plugins!r} do not fit this model's plug-in sizes (check `pruner_hidden_size`, "
                f"`num_pruning_queries`, `repair_bottleneck_size`): " + "; ".join(mismatched)
            )
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing:
            logger.warning(
                f"The RCP plug-ins {plugins!r} have no tensor for {len(missing)} plug-in parameter(s), which keep their "
                f"initial values (check `pruning_layers` / `repair_layers`): {missing}"
            )
        if unexpected:
            logger.warning(f"The RCP plug-ins {plugins!r} hold tensors this model has no use for: {unexpected}")
        with torch.no_grad():
            for k in sorted(set(tensors) & set(own)):
                own[k].copy_(tensors[k])
        return missing, unexpected

    @classmethod
    def from_base(cls, base_model_name_or_path, plugins=None, **kwargs):
        """A full RCP model from a stock LLaVA checkpoint plus, optionally, a plug-in-only checkpoint.

        ```python
        model = RcpLlavaForConditionalGeneration.from_base("llava-hf/llava-1.5-7b-hf", plugins="user/rcp-plugins")
        ```

        The pruning fields (layers, sizes, budget) come from the plug-ins' `rcp_config.json`; a kwarg named like a
        pruning field of `RcpLlavaConfig` overrides it (e.g. `pruning_keep_counts=[96, 26, 8]`), every other kwarg
        goes to `from_pretrained` (`dtype`, `device_map`, `revision`, `token`, ...). Plug-ins built for another
        hidden size or layer count raise a `ValueError` before any weight is read.
        """
        from transformers import LlavaConfig

        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in PRUNING_FIELDS}
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k != "subfolder"}
        plugin_config = read_plugin_config(plugins, **hub_kwargs) if plugins is not None else {}
        base_dict, _ = RcpLlavaConfig.get_config_dict(base_model_name_or_path, **hub_kwargs)
        drop = set(PRUNING_FIELDS) | {"model_type", "auto_map", "architectures"}
        stock_text = LlavaConfig.from_dict({k: v for k, v in base_dict.items() if k not in drop}).text_config
        if plugins is not None:
            _check_plugin_shape(
                plugin_config, stock_text.hidden_size, stock_text.num_hidden_layers, base_model_name_or_path, plugins
            )
        fields = {k: plugin_config[k] for k in PRUNING_FIELDS if k in plugin_config}
        fields.update(overrides)
        config = RcpLlavaConfig.from_pretrained(base_model_name_or_path, **fields, **hub_kwargs)
        if plugins is None:
            model = cls.from_pretrained(base_model_name_or_path, config=config, **kwargs)
        else:
            # The stock load report would list every plug-in tensor as "newly initialised" just before they are
            # loaded: quiet it and report only what concerns the base weights.
            kwargs.pop("output_loading_info", None)
            with _quiet_logger("transformers.modeling_utils"):
                model, info = cls.from_pretrained(
                    base_model_name_or_path, config=config, output_loading_info=True, **kwargs
                )
            missing = [k for k in info["missing_keys"] if not k.startswith(PLUGIN_PREFIX)]
            if missing or info["unexpected_keys"] or info["mismatched_keys"]:
                logger.warning(
                    f"Loading the base {base_model_name_or_path!r}: missing {missing}, unexpected "
                    f"{info['unexpected_keys']}, mismatched {info['mismatched_keys']}."
                )
        model.rcp_base_model_name_or_path = str(base_model_name_or_path)
        if plugins is not None:
            model.load_plugins(plugins, **hub_kwargs)
        return model


def _centred_log(a, valid):
    """Eq. (4)'s prior A: log a, centred over the valid (alive) tokens of each row."""
    log_a = torch.log(a.clamp_min(1e-30))
    alive = valid.to(log_a.dtype)
    return log_a - ((log_a * alive).sum(1, keepdim=True) / alive.sum(1, keepdim=True).clamp_min(1.0))


def _top_k_mask(scores, valid, k):
    """(B, K) mask of the k highest valid scores per row; ties keep the lower index (stable)."""
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k) & valid



__all__ = [
    "RcpLlavaForConditionalGeneration",
    "RcpLlavaModel",
    "RcpPruner",
    "RcpRepairAdapter",
    "RcpDynamicCache",
    "RcpPruningInfo",
]
