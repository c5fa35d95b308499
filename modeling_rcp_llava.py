"""RCP-LLaVA: a LLaVA model that drops visual tokens inside its decoder.

Reading order (RCP.md), each idea in one place:
  1. Plug-ins: `RcpPruner` (residual cross-attention pruner, Eqs. 1-8) and `RcpRepairAdapter` (delayed repair
     adapter, Eqs. 9-15).
  2. Tensor helpers: the soft key-mask attention of the training layout, the question->visual attention prior
     (Eq. 4) recomputed from q/k projections, slot gathering and compaction, top-k.
  3. Token selectors: one small class per pruning method (`RcpSelector`, `AttentionTopkSelector`, `FastvSelector`,
     `RandomSelector`, `VisPrunerSelector`) behind `TokenSelector`, in one registry (`register_pruning_method`). A
     new method is one selector class, one `register_pruning_method` call and, if it needs any, its config fields.
  4. `PrunedPrefill`: the state of one pruned prefill (which original token sits in which slot, the cumulative keep
     masks, the repair contexts); it asks the selector which tokens survive, then drops the others physically
     ("discard" layout) or by a differentiable key mask ("mask" layout, training).
  5. What a forward returns and what decoding needs: `RcpPruningInfo`, `RcpDecodeState` on `RcpDynamicCache`, the
     output dataclasses.
  6. The models: `RcpLlavaModel.forward` runs the stock Llama layers itself (`_prefill_loop` when an image is
     pruned, `_decode_loop` otherwise), so later layers compute on, and cache keys/values for, the kept tokens only,
     at their original RoPE positions; `RcpLlavaForConditionalGeneration` is a drop-in
     `LlavaForConditionalGeneration` with plug-in checkpoint I/O (`save_plugins`, `load_plugins`, `from_base`).

Backbone weight names are those of llava-hf; every plug-in parameter lives under the prefix
`model.rcp_plugins.` (see `PLUGIN_PREFIX`), so a state dict filters into a plug-in-only checkpoint by name.

This is one of the two Hub files: it imports only the standard library, `torch`, `transformers` and its
sibling `configuration_rcp_llava.py`.
"""

import collections
import contextlib
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    Cache,
    DynamicCache,
    LlavaConfig,
    PretrainedConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers import __version__ as transformers_version
from transformers.integrations.accelerate import load_offloaded_parameter  # as save_pretrained reads offloaded ones
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, find_packed_sequence_indices, flash_attention_mask, sdpa_mask,
)
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import maybe_autocast  # autocast off where it is on (as Llama's RoPE turns it off)


try:  # loaded as a Hub module (flat folder, relative import) ...
    from .configuration_rcp_llava import BUILTIN_METHODS, PRUNING_FIELDS, PRUNING_METHODS, PruningMethod, RcpLlavaConfig
    from .configuration_rcp_llava import check_gumbel_temperature, register_pruning_spec, visual_tokens_per_image
except ImportError:  # ... or as an installed top-level module
    from configuration_rcp_llava import BUILTIN_METHODS, PRUNING_FIELDS, PRUNING_METHODS, PruningMethod, RcpLlavaConfig
    from configuration_rcp_llava import check_gumbel_temperature, register_pruning_spec, visual_tokens_per_image

try:  # safetensors is a hard dependency of transformers (its modeling_utils imports it at the top); the
    # remote-code import check ignores try blocks, so the Hub files still need only torch and transformers.
    from safetensors import safe_open as _safe_open
    from safetensors.torch import load_file as _load_safetensors
    from safetensors.torch import save_file as _save_safetensors
except ImportError:  # pragma: no cover
    _load_safetensors = _save_safetensors = _safe_open = None


logger = logging.get_logger(__name__)

# The decoder loop relies on transformers internals measured on this minor release (per-layer DynamicCache lengths,
# `create_causal_mask(layer_idx=...)`, generate without `cache_position`).
# pip enforces setup.cfg's pin, but remote code (`trust_remote_code=True`) runs on whatever transformers is there --
# and these files import on 5.17 without an error -- so an untested version is named once, at import.
TESTED_TRANSFORMERS = (5, 23)


def untested_transformers(version):
    """The warning for transformers `version` (a string) when it is not the tested minor release, else None."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor == TESTED_TRANSFORMERS:
        return None
    tested = ".".join(map(str, TESTED_TRANSFORMERS))
    return (f"rcp-llava's decoder loop was measured on transformers {tested}.x and relies on its internals; this is "
            f"transformers {version}, untested: pruned outputs may differ or fail. Install "
            f"`transformers>={tested},<{TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1] + 1}`.")


_UNTESTED = untested_transformers(transformers_version)
if _UNTESTED:
    logger.warning(_UNTESTED)

PLUGIN_PREFIX = "model.rcp_plugins."
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
# What `load_plugins` returns: the fields of torch's `load_state_dict` result (and PEFT's `load_adapter`'s), a named
# tuple that unpacks as `missing, unexpected` (torch's own class is private).
IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
# Keys of rcp_config.json besides the pruning fields of the config.
_PLUGIN_META_KEYS = (
    "format", "base_model_name_or_path", "base_model_revision", "hidden_size", "num_hidden_layers", "num_visual_tokens",
    "library_version", "transformers_version",
)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# `PreTrainedModel.load_adapter`'s PEFT-only arguments (transformers 5.23): any of them set means a PEFT adapter, but
# `is_trainable` (it applies to plug-ins too) and `adapter_kwargs` of Hub arguments only that found plug-ins.
_PEFT_LOAD_ARGUMENTS = ("adapter_name", "peft_config", "adapter_state_dict", "adapter_kwargs", "is_trainable",
                        "low_cpu_mem_usage", "hotswap", "load_config")
# Forward kwargs the model consumes itself: they never reach the decoder layers.
# `generate`'s cache_implementation values whose cache grows each layer on its own (transformers 5.23's
# DYNAMIC_CACHE_IMPLEMENTATIONS): the kinds a pruned prefill can fill.
DYNAMIC_CACHE_KINDS = ("dynamic", "offloaded", "quantized")
_MODEL_ONLY_KWARGS = ("output_attentions", "return_dict", "mm_encoder_outputs")


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

    `logits = A + S_c + S_t + bias` (Eq. 5), where A is the frozen LLM's own question->visual attention prior
    (computed by the decoder loop and passed in), S_c a question-conditioned cross-attention score and S_t a
    per-token MLP score. Initialised as the authors do: the query aggregate at 1/N_q (S_c about 1/K, near inert),
    the MLP's last layer at zero (S_t = 0) and the bias at 2.0, so an untrained pruner keeps the tokens whose
    centred log prior exceeds -2 (Eq. 8), and its gradients start on the prior's scale.
    """

    bias_init = 2.0

    def __init__(self, hidden_size, pruner_size, num_heads, num_queries, query_dropout, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.query_dropout = query_dropout
        self.queries = nn.Parameter(torch.empty(num_queries, pruner_size))  # Q_p, Eq. (1)
        self.question_proj = nn.Linear(hidden_size, pruner_size)
        self.question_norm = nn.LayerNorm(pruner_size)
        self.visual_proj = nn.Linear(hidden_size, pruner_size)  # the visual tokens in the pruner's space
        self.attn_q = nn.Linear(pruner_size, pruner_size)  # multi-head cross-attention, Eq. (2)
        self.attn_k = nn.Linear(pruner_size, pruner_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.aggregate = nn.Linear(num_queries, 1)  # learned reduction over the queries, Eq. (2)
        self.token_mlp = nn.Sequential(  # S_t, Eq. (3)
            nn.Linear(pruner_size, pruner_size), nn.LayerNorm(pruner_size), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(pruner_size, 1),
        )
        self.bias = nn.Parameter(torch.empty(()))  # Eq. (5)

    def reset_plugin_parameters(self, std=0.02):
        """Runs after the leaf modules' own init (post-order), so it overrides them where the authors do."""
        nn.init.normal_(self.queries, std=std)
        nn.init.constant_(self.aggregate.weight, 1.0 / self.aggregate.in_features)
        nn.init.zeros_(self.aggregate.bias)
        nn.init.zeros_(self.token_mlp[-1].weight)
        nn.init.zeros_(self.token_mlp[-1].bias)
        nn.init.constant_(self.bias, self.bias_init)

    def forward(self, visual, visual_valid, question, question_valid, prior):
        """
        visual: (B, K, d) normalised hidden states of the K alive visual tokens (padded), visual_valid: (B, K)
        question: (B, Lq, d) normalised question hidden states, question_valid: (B, Lq)
        prior: (B, K) the centred attention prior A (Eq. 4)
        returns logits (B, K); padded entries are -inf.
        """
        bsz, k, _ = visual.shape
        # In the plug-ins' dtype: float32 plug-ins on a half-precision backbone (how `RcpTrainer` trains them).
        dtype = self.queries.dtype
        visual, question = visual.to(dtype), question.to(dtype)
        q_valid = question_valid.unsqueeze(-1).to(question.dtype)  # (B, Lq, 1)
        q_mean = (question * q_valid).sum(1) / q_valid.sum(1).clamp_min(1.0)  # (B, d)
        queries = self.queries + self.question_norm(self.question_proj(q_mean)).unsqueeze(1)  # (B, Nq, p), Eq. (1)
        if self.training and self.query_dropout > 0:
            # Query-wise dropout: zero whole query rows (no rescaling); a zeroed query attends uniformly.
            keep = torch.rand(queries.shape[:2], device=queries.device) >= self.query_dropout  # (B, Nq)
            queries = queries * keep.unsqueeze(-1).to(queries.dtype)
        tokens = self.visual_proj(visual)  # (B, K, p)
        heads = self.num_heads
        head_dim = queries.shape[-1] // heads
        q = self.attn_q(queries).view(bsz, -1, heads, head_dim).transpose(1, 2)  # (B, H, Nq, hd)
        key = self.attn_k(tokens).view(bsz, k, heads, head_dim).transpose(1, 2)  # (B, H, K, hd)
        scores = q @ key.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Nq, K)
        scores = scores.masked_fill(~visual_valid.view(bsz, 1, 1, k), torch.finfo(scores.dtype).min)
        attn = self.attn_dropout(scores.softmax(-1)).mean(1)  # heads averaged, (B, Nq, K)
        cross_score = self.aggregate(attn.transpose(1, 2)).squeeze(-1)  # S_c, (B, K)
        token_score = self.token_mlp(tokens).squeeze(-1)  # S_t, (B, K)
        logits = prior + cross_score + token_score + self.bias  # Eq. (5)
        return logits.masked_fill(~visual_valid, float("-inf"))


class RcpRepairContext(nn.Module):
    """The pruning context the repair adapters read (Eqs. 9-10), one encoder shared by every adapter.

    Computed once per pruning point and cached as one (B, b) vector per sample: `e_mask + e_pruned`, where
    e_mask attends with a learned query over a learned table of the N grid positions masked by the kept set
    (Eq. 9: m ⊙ P, the softmax over all N, a pruned position scoring 0 and adding nothing, as the authors' code
    does; so the pooled vector shrinks as fewer tokens stay, and carries the retention level), and e_pruned projects
    the mean normalised hidden state of all tokens pruned so far (Eq. 10; each token's state at the layer it was
    dropped before, so the discard and mask layouts agree). Initialised as the authors do: both projections xavier
    with gain 0.1 and zero bias (a small context at the first step).
    """

    position_dim = 64

    def __init__(self, hidden_size, bottleneck_size, num_visual_tokens):
        super().__init__()
        self.positions = nn.Parameter(torch.empty(num_visual_tokens, self.position_dim))  # P of Eq. (9)
        self.mask_query = nn.Parameter(torch.empty(self.position_dim))  # q of Eq. (9)
        self.mask_proj = nn.Linear(self.position_dim, bottleneck_size)  # Proj of Eq. (9)
        self.pruned_proj = nn.Linear(hidden_size, bottleneck_size)  # Proj of Eq. (10)

    def reset_plugin_parameters(self, std=0.02):
        nn.init.normal_(self.positions, std=std)
        nn.init.normal_(self.mask_query, std=std)
        for linear in (self.mask_proj, self.pruned_proj):
            nn.init.xavier_uniform_(linear.weight, gain=0.1)
            nn.init.zeros_(linear.bias)

    def forward(self, keep_mask, pruned_mean):
        """keep_mask: (B, N) cumulative mask M (0/1 values, straight-through gradients in training);
        pruned_mean: (B, d) mean normalised state of the tokens pruned so far (0 if none) -> (B, b)."""
        # In float64, rounded once: in float32 these small products rounded differently with the parameters' memory
        # alignment (a model loaded from safetensors vs the one that saved it: 1e-6 apart in the context, 1e-7 in the
        # logits), so a loaded model's logits were not bit-identical to its source's.
        dtype, f64 = self.positions.dtype, torch.float64
        masked = keep_mask.unsqueeze(-1).to(f64) * self.positions.to(f64)  # m ⊙ P, (B, N, p)
        scores = (masked @ self.mask_query.to(f64)) / math.sqrt(self.position_dim)  # (B, N), pruned positions: 0
        attn = scores.softmax(-1)  # over all N (Eq. 9): pruned positions take weight and add a zero row
        pooled = (attn.unsqueeze(1) @ masked).squeeze(1)  # (B, p)
        e_mask = _project_f64(self.mask_proj, pooled, dtype)  # Eq. (9), (B, b); nothing kept: Proj(0)
        e_pruned = _project_f64(self.pruned_proj, pruned_mean, dtype)  # Eq. (10), (B, b)
        return (e_mask + e_pruned).to(dtype)


def _project_f64(linear, x, dtype):
    """`linear(x)` in float64 for a plain `nn.Linear`; a wrapped one (PEFT's LoRA layer) or an offloaded one
    (`device_map` with 'cpu' / 'disk': its weight is on the meta device until its hook runs) is called as itself, in
    `dtype`, so that its own forward applies."""
    if type(linear) is nn.Linear and not linear.weight.is_meta:  # meta: offloaded, its hook loads it in its forward
        return F.linear(x.to(torch.float64), linear.weight.to(torch.float64), linear.bias.to(torch.float64))
    return linear(x.to(dtype)).to(torch.float64)


class RcpRepairAdapter(nn.Module):
    """Delayed repair adapter (Eqs. 11-15): a FiLM-modulated bottleneck added to answer positions only.

    Initialised as the authors do: the gate alpha at 0.1 and `up` / `query_proj` with xavier gain 0.1 (a small
    correction from the first step, so the adapter receives gradients on a real model at a 5e-5 learning rate);
    `film_gamma` / `film_beta` at zero, so gamma = 1 and beta = 0.
    """

    gate_init = 0.1

    def __init__(self, hidden_size, bottleneck_size):
        super().__init__()
        self.query_proj = nn.Linear(hidden_size, bottleneck_size)  # QueryProj of Eq. (11)
        self.film_gamma = nn.Linear(bottleneck_size, bottleneck_size)  # W_gamma, Eq. (12)
        self.film_beta = nn.Linear(bottleneck_size, bottleneck_size)  # W_beta, Eq. (13)
        self.film_gamma._rcp_zero_init = True
        self.film_beta._rcp_zero_init = True
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.gate = nn.Parameter(torch.empty(()))  # alpha, Eq. (14)

    def reset_plugin_parameters(self, std=0.02):
        for linear in (self.up, self.query_proj):
            nn.init.xavier_uniform_(linear.weight, gain=0.1)
            nn.init.zeros_(linear.bias)
        nn.init.constant_(self.gate, self.gate_init)

    def forward(self, hidden, context, answer_mask):
        """hidden: (B, L, d), context: (B, b), answer_mask: (B, L) bool -> repaired hidden (B, L, d).
        Computed in the adapter's dtype (float32 plug-ins on a half-precision backbone), added in the hidden's."""
        h = hidden.to(self.gate.dtype)
        cond = context.to(h.dtype).unsqueeze(1) + self.query_proj(h)  # Eq. (11), (B, L, b)
        gamma = 1 + self.film_gamma(cond)  # Eq. (12)
        beta = self.film_beta(cond)  # Eq. (13)
        delta = self.gate * self.up(gamma * F.gelu(self.down(h)) + beta)  # Eq. (14), (B, L, d)
        # torch.where, not g * delta: a padded row may hold NaN, and NaN * 0 stays NaN.
        return torch.where(answer_mask.unsqueeze(-1), hidden + delta.to(hidden.dtype), hidden)  # Eq. (15)


class RcpPlugins(nn.Module):
    """All trainable plug-ins, under one prefix: `pruners[str(layer)]`, `repair_adapters[str(layer)]` and the
    adapters' shared `repair_context` encoder (present when there is an adapter)."""

    def __init__(self, config):
        super().__init__()
        text = config.text_config
        use_plugins = config.pruning_spec.plugins
        self.pruners = nn.ModuleDict(
            {
                str(layer): RcpPruner(
                    text.hidden_size, config.pruner_hidden_size, config.pruner_num_heads, config.num_pruning_queries,
                    config.query_dropout, config.pruner_dropout,
                )
                for layer in (config.pruning_layers if use_plugins else [])
            }
        )
        self.repair_adapters = nn.ModuleDict(
            {
                str(layer): RcpRepairAdapter(text.hidden_size, config.repair_bottleneck_size)
                for layer in (config.repair_layers if use_plugins else [])
            }
        )
        self.repair_context = (
            RcpRepairContext(text.hidden_size, config.repair_bottleneck_size, config.num_visual_tokens)
            if self.repair_adapters else None
        )


# ------------------------------------------------------------------------------------------------
# 2. Tensor helpers
# ------------------------------------------------------------------------------------------------


# AttentionInterface is one registry per process, and every copy of this file a process imports registers here: the
# installed module, and each folder loaded with trust_remote_code (transformers imports it as a module of its own).
# Under one shared name the copy imported last would serve every model, so a Hub snapshot of older code would
# silently replace the installed function in training; each copy other than the installed one takes a name of its
# own (hex digits only: transformers reads "flash" / "sdpa" in an implementation's name, a folder's could hold them).
SOFT_KEY_MASK_ATTENTION = ("rcp_soft_key_mask" if __name__ == "modeling_rcp_llava"
                           else f"rcp_soft_key_mask_{hashlib.sha256(__name__.encode()).hexdigest()[:12]}")
# Floor of the renormalisation's denominator in the BACKWARD pass only (the forward stays exact). A row whose kept
# attention mass sum_j w_ij M_j falls to 1e-8 (a score gap of ~20) otherwise sends |dL/dM| ~ 1e8 into the pruners.
RENORM_GRAD_FLOOR = 1e-3


class _FlooredRenorm(torch.autograd.Function):
    """out = num / den exactly; the backward divides by max(den, floor) instead of den (issue: gradient spikes)."""

    # In at least float32: float16's smallest normal number is 6.1e-5, and a kept mass below it (a query whose
    # attention sits on dropped keys) was clamped up to it, shrinking that output by the ratio (0.4 off at 3.3e-5).
    @staticmethod
    def forward(ctx, num, den, floor):
        compute = torch.promote_types(den.dtype, torch.float32)
        out = (num.to(compute) / den.to(compute).clamp_min(torch.finfo(compute).tiny)).to(num.dtype)
        ctx.save_for_backward(num, den)
        ctx.floor = floor
        return out

    @staticmethod
    def backward(ctx, grad):
        num, den = ctx.saved_tensors
        compute = torch.promote_types(den.dtype, torch.float32)
        tiny = torch.finfo(compute).tiny
        num, den_c, grad_c = num.to(compute), den.to(compute), grad.to(compute)
        floored = den_c.clamp_min(max(ctx.floor, tiny))
        grad_num = grad_c / floored
        grad_den = -(grad_c * num).sum(-1, keepdim=True) / (floored * floored)
        # Where the forward clamped (den < tiny: a row with no kept key) no gradient reaches den, as clamp_min's own
        # backward would do; with a floor below ~1e-19 (`floor=tiny`: the division without a floor) den^2 still
        # underflows to 0 for tiny kept masses, and the gradient is inf, as it was before the floor.
        grad_den = torch.where(den_c >= tiny, grad_den, torch.zeros_like(grad_den))
        return grad_num.to(grad.dtype), grad_den.to(den.dtype), None


def floored_renorm(num, den, floor=None):
    """`num / den` (den broadcast over the last dim of num) whose backward floors `den` at `floor` (default
    `RENORM_GRAD_FLOOR`, read at call time)."""
    return _FlooredRenorm.apply(num, den, RENORM_GRAD_FLOOR if floor is None else floor)


def soft_key_mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            rcp_key_keep=None, rcp_fallback_attention="sdpa", **kwargs):
    """Attention with a multiplicative, differentiable 0/1 weight per key (training, mask layout).

    out_i = sum_j w_ij M_j v_j / sum_j w_ij M_j with w = softmax over the allowed keys: for M in {0, 1} this
    is exactly attention over the kept keys (physical discard), while dL/dM_j exists even for a dropped
    token. Computed with one sdpa call on values augmented by the weight channel M; the division's backward
    floors the kept mass at `RENORM_GRAD_FLOOR` (`floored_renorm`), the forward is exact. Without a key weight
    (`rcp_key_keep=None`: the layers before the first pruner) it is the model's configured attention
    (`rcp_fallback_attention`), so those layers equal the teacher's bit for bit. With eager configured, the
    weights are computed explicitly and returned, as eager layers return them (`output_attentions`: one entry per
    layer, 0 at the dropped keys); otherwise none are, as sdpa gives none.

    query: (B, H, L, hd); key/value: (B, Hkv, S, hd); rcp_key_keep: (B, S) -> ((B, L, H, hd), (B, H, L, S) or None)
    """
    if rcp_key_keep is None:
        fallback = _configured_attention(module, rcp_fallback_attention)
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is not None and attention_mask.dim() == 2:
        # flash attention's mask builder gives a (B, S) padding mask, causal implied (aligned to the last query);
        # sdpa needs it whole (a left-padded training batch failed with "size of tensor a (T) must match ...")
        causal = _causal_keep(query.shape[2], key.shape[2], query.device)
        attention_mask = causal[None, None] & attention_mask.to(device=query.device, dtype=torch.bool)[:, None, None]
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    if rcp_fallback_attention == "eager":
        return _soft_key_mask_eager(module, query, key, value, attention_mask, scaling, dropout, rcp_key_keep)
    keep = rcp_key_keep.to(value.dtype).view(value.shape[0], 1, -1, 1).expand(-1, value.shape[1], -1, -1)
    augmented = torch.cat([value * keep, keep], dim=-1)  # (B, H, S, hd + 1)
    is_causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, augmented, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal)  # (B, H, L, hd + 1)
    out = floored_renorm(out[..., :-1], out[..., -1:])
    return out.transpose(1, 2).contiguous(), None


def _causal_keep(q_len, kv_len, device):
    """(L, S) bool: the keys each of the last `q_len` queries may attend to (causal, aligned to the last key)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def _soft_key_mask_eager(module, query, key, value, attention_mask, scaling, dropout, key_keep):
    """`soft_key_mask_attention` with its weights: eager attention's softmax (and dropout), times M, renormalised
    (the same division as the sdpa form: `floored_renorm`). query/key/value: (B, H, L|S, hd); key_keep: (B, S)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is None and q_len > 1:
        attention_mask = _causal_keep(q_len, kv_len, query.device)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # sdpa's form; eager's is additive
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :kv_len]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, H, L, S)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    kept = weights * key_keep.to(weights.dtype)[:, None, None, :]
    weights = floored_renorm(kept, kept.sum(-1, keepdim=True))  # (B, H, L, S), 0 at the dropped keys
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _configured_attention(module, name):
    """The attention function a decoder layer picks for `config._attn_implementation == name` (its own module's
    `eager_attention_forward` for "eager", as the layer itself does)."""
    if name in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface()[name]


AttentionInterface.register(SOFT_KEY_MASK_ATTENTION, soft_key_mask_attention)


@contextlib.contextmanager
def _attention_implementation(config, name):
    """Run the decoder layers with the attention function `name` for one training forward. The layers read the
    function from `config._attn_implementation` and offer no per-call choice; the switch is scoped to the
    mask-layout loop (the masks are built before it, for the configured implementation)."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _apply_rope(x, cos, sin):
    """x: (B, H, L, hd); cos/sin: (B, L, hd) -> x rotated at its own positions: x cos + rotate_half(x) sin, where
    rotate_half(x) = (-x2, x1) for the halves x1, x2 of the head dim. Written into each half of `x cos` in place:
    the same values as building rotate_half with `cat`, which on the keys' strided (B, H, T, hd) view cost 8x
    more (issue 19)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    if (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad)) or torch.compiler.is_compiling():
        # `out=` does not support autograd; compiled (`compile_selection`), Inductor fuses the product anyway, and
        # its `out=` result kept x's strides, which a later reshape then failed to view
        out = x * cos
    else:  # contiguous (B, H, L, hd), whatever the strides of x: the scores' matmul then reads it without a copy
        out = torch.mul(x, cos, out=torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype),
                                                device=x.device))
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)  # - x2 sin
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])  # + x1 sin
    return out


_ROPE_CONVENTION = {}  # attention class -> whether its module's `apply_rotary_pos_emb` is `_apply_rope`


def _rope_matches(attn_module):
    """Whether the attention's own `apply_rotary_pos_emb` (in its modeling module) rotates as `_apply_rope` does
    (halves of the head dim, Llama's `rotate_half`); checked once per class on random float64 tensors. Cohere,
    Helium and Ernie 4.5 rotate interleaved pairs: the prior would score other keys than the layer attends to."""
    cls = type(attn_module)
    if cls not in _ROPE_CONVENTION:
        apply = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
        same = False
        if apply is not None:
            g = torch.Generator().manual_seed(0)
            x, cos, sin = (torch.randn(shape, generator=g, dtype=torch.float64)
                           for shape in ((1, 2, 3, attn_module.head_dim), (1, 3, attn_module.head_dim),
                                         (1, 3, attn_module.head_dim)))
            try:
                same = torch.allclose(apply(x, x, cos, sin)[0], _apply_rope(x, cos, sin))
            except Exception:  # another signature: not Llama's
                same = False
        _ROPE_CONVENTION[cls] = same
    return _ROPE_CONVENTION[cls]


_QK_NORMS = ("q_norm", "k_norm", "query_layernorm", "key_layernorm")  # per head: Qwen3's before RoPE, HunYuan's after
_OUTPUT_NORMS = ("v_norm", "o_norm", "attn_sub_norm")  # of the values or the attention's output (BitNet)


def attention_problem(attn_module):
    """Why `question_attention_probs` cannot compute what `attn_module` attends to (None: it can). It recomputes
    the layer's queries and keys as Llama's attention does -- `q_proj` / `k_proj`, RoPE by `rotate_half`, scaled
    dot products -- plus the per-head q/k norms of Qwen3 (before RoPE) and HunYuan (after it) and the NoPE layers
    of SmolLM3; anything else would give a prior of another attention, silently."""
    if not all(isinstance(getattr(attn_module, name, None), nn.Module) for name in ("q_proj", "k_proj")):
        return "its attention has no separate `q_proj` / `k_proj` (a fused projection)"
    head_dim = getattr(attn_module, "head_dim", None)
    for name in _QK_NORMS:
        norm = getattr(attn_module, name, None)
        weight = getattr(norm, "weight", None)
        if norm is not None and (weight is None or weight.shape[-1] != head_dim):
            return f"its `{name}` normalises the whole projection, not each head (as OLMo2's)"
    for name, child in attn_module.named_children():
        # a norm the prior does not apply changes the scores it recomputes (Differential attention's `groupnorm`
        # too, whose layer subtracts two softmaxes); norms of the values or the output do not touch the weights
        is_norm = "norm" in name.lower() or "norm" in type(child).__name__.lower()
        if is_norm and name not in _QK_NORMS + _OUTPUT_NORMS:
            return f"its attention has a norm the prior does not reproduce (`{name}`, {type(child).__name__})"
    config = getattr(attn_module, "config", None)
    if getattr(attn_module, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps its attention logits (`attn_logit_softcapping`)"
    if getattr(config, "clip_qkv", None) is not None:
        return f"it clips its queries, keys and values (`clip_qkv={config.clip_qkv}`)"
    if not _rope_matches(attn_module):
        return "its rotary embedding is applied otherwise than Llama's `rotate_half` (e.g. interleaved pairs)"
    return None


def text_backbone_problem(language_model, reads_attention):
    """Why the pruned decoder loop cannot run `language_model` as its own forward would (None: it can); with
    `reads_attention`, also why selection could not read its layers' attention (`attention_problem`) or their
    normalised input. The loop calls the layers itself, with one rotary table, then the final `norm`: a backbone
    whose forward does more (Granite scales its input embeddings) would silently differ from stock."""
    lm = language_model
    rotary = getattr(lm, "rotary_emb", None)
    if rotary is None or "layer_type" in inspect.signature(rotary.forward).parameters:
        return "its rotary embedding is not one table for every layer (Gemma3 and OLMo3 keep one per layer type)"
    if not isinstance(getattr(lm, "norm", None), nn.Module):
        return "its final norm is not `norm`"
    multiplier = getattr(lm.config, "embedding_multiplier", None)
    if multiplier not in (None, 1, 1.0):
        return f"its forward scales the input embeddings (`embedding_multiplier={multiplier}`)"
    if not all(isinstance(getattr(layer, "self_attn", None), nn.Module) for layer in lm.layers):
        # their cache layers keep a recurrent state, not one key and value per token to drop
        return "its decoder layers are not all attention layers (a hybrid stack, as Qwen3-Next's linear attention)"
    if not reads_attention:
        return None
    inv_freq = getattr(rotary, "inv_freq", None)
    head_dim = getattr(lm.layers[0].self_attn, "head_dim", None) if len(lm.layers) else None
    if torch.is_tensor(inv_freq) and head_dim is not None and 2 * inv_freq.shape[-1] != head_dim:
        return f"its rotary embedding covers {2 * inv_freq.shape[-1]} of the {head_dim} head dims (partial rotary)"
    for layer in lm.layers:
        if not isinstance(getattr(layer, "input_layernorm", None), nn.Module):
            return ("its decoder layers have no `input_layernorm`, the norm before attention that selection reads "
                    "(OLMo2 norms after attention; Apertus names its pre-norm `attention_layernorm`)")
        problem = attention_problem(layer.self_attn)
        if problem is not None:
            return problem
    return None


def question_attention_probs(attn_module, hidden_norm, cos, sin, key_valid, query_slots, keys=None, rows=None):
    """The attention that `attn_module` would compute from the given query rows, without eager attention.

    Uses the layer's own q/k projections and RoPE on its normalised input, a causal + padding mask over
    the current sequence, and a softmax over the whole key row (RCP.md, decision on Eq. 4).

    hidden_norm: (B, T, d) input of the layer after its input norm; cos/sin: (B, T, hd)
    key_valid: (B, T) bool, query_slots: (B, Lq) long slot indices of the query rows
    keys: (B, T, Hkv * hd), optional: `attn_module.k_proj(hidden_norm)`, when the caller already has it
    rows: (B, Lq, d), optional: `hidden_norm` at `query_slots`, when the caller already has it
    returns probabilities (B, H, Lq, T) in at least float32
    """
    problem = attention_problem(attn_module)
    if problem is not None:
        raise ValueError(f"The attention prior (RCP.md Eq. 4, read by RCP, attention top-k and FastV) cannot be "
                         f"computed for {type(attn_module).__name__}: {problem}. Use a method that does not read the "
                         "layers' attention (random, VisPruner) or `pruning_method='none'` with this backbone.")
    bsz, seq, _ = hidden_norm.shape
    head_dim = attn_module.head_dim
    if cos.shape[-1] != head_dim:
        raise ValueError(f"The attention prior rotates the whole head ({head_dim} dims), but this backbone's rotary "
                         f"embedding covers {cos.shape[-1]} (partial rotary): use `pruning_method='none'` with it.")
    rows = _gather_seq(hidden_norm, query_slots) if rows is None else rows  # (B, Lq, d)
    q = attn_module.q_proj(rows).view(bsz, rows.shape[1], -1, head_dim)  # (B, Lq, H, hd)
    keys = attn_module.k_proj(hidden_norm) if keys is None else keys
    k = keys.view(bsz, seq, -1, head_dim)  # (B, T, Hkv, hd)
    if getattr(attn_module, "q_norm", None) is not None:  # Qwen3: RMSNorm per head, before RoPE
        q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, Lq, hd), (B, Hkv, T, hd)
    if getattr(attn_module, "use_rope", True):  # SmolLM3's NoPE layers rotate nothing
        q = _apply_rope(q, _gather_seq(cos, query_slots), _gather_seq(sin, query_slots))
        k = _apply_rope(k, cos, sin)
    if getattr(attn_module, "query_layernorm", None) is not None:  # HunYuan: RMSNorm per head, after RoPE
        q, k = attn_module.query_layernorm(q), attn_module.key_layernorm(k)
    compute = torch.promote_types(q.dtype, torch.float32)
    # GQA without copying the keys: each kv head serves `groups` query heads, (B, Hkv, groups * Lq, hd)
    groups = q.shape[1] // k.shape[1]
    q = q.to(compute).reshape(bsz, k.shape[1], groups * q.shape[2], head_dim)
    # In `compute` under a caller's autocast too (Trainer's bf16, `torch.autocast`): it would run this product in
    # bf16, whose range the float32 mask value overflows -- and the prior is specified in at least float32.
    with maybe_autocast(q.device.type, enabled=False):
        scores = (q @ k.to(compute).transpose(-1, -2)).mul_(attn_module.scaling)  # (B, Hkv, groups * Lq, T)
    scores = scores.view(bsz, -1, query_slots.shape[1], seq)  # (B, H, Lq, T)
    allowed = key_valid.unsqueeze(1) & (
        torch.arange(seq, device=q.device).view(1, 1, seq) <= query_slots.unsqueeze(-1)
    )  # (B, Lq, T)
    return scores.masked_fill_(~allowed.unsqueeze(1), torch.finfo(compute).min).softmax(-1)


def _first_slots(flags, width=None):
    """Slots where `flags` (B, T) is set, in order, left-aligned and padded: (slots (B, K), valid (B, K)).

    `width`: the largest per-row count, when the caller knows it; otherwise it is read from the device (a host sync).
    """
    count = flags.sum(1)
    if width is None:
        width = int(count.max()) if flags.numel() else 0
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, K)
    valid = torch.arange(width, device=flags.device).unsqueeze(0) < count.unsqueeze(1)
    return order, valid


def _compact(stay, width=None):
    """Gather index that keeps the slots where `stay` (B, T) is set, right-aligned (left padding).

    `width`: the largest per-row count of `stay`, when the caller knows it (otherwise a host sync reads it).
    returns (src (B, T'), valid (B, T'), dest (B, T)): new slot t of row b reads old slot src[b, t] when valid[b, t];
    old slot s moves to new slot dest[b, s] (`width` where it is dropped).
    """
    bsz, seq = stay.shape
    count = stay.sum(1)  # (B,)
    if width is None:
        width = int(count.max())
    dest = (width - count).unsqueeze(1) + stay.long().cumsum(1) - 1  # (B, T) destination of kept slots
    # Dropped slots write to a spare column `width`, cut off below: a scatter, not boolean indexing (which syncs).
    dest = torch.where(stay, dest, width)
    src = torch.zeros(bsz, width + 1, dtype=torch.long, device=stay.device)
    src.scatter_(1, dest, torch.arange(seq, device=stay.device).unsqueeze(0).expand(bsz, seq))
    valid = torch.arange(width, device=stay.device).unsqueeze(0) >= (width - count).unsqueeze(1)
    return src[:, :width], valid, dest  # invalid (padding) slots read slot 0, as before


def _gather_seq(x, src):
    """x: (B, T, ...) gathered along dim 1 by src (B, T') -> (B, T', ...).

    Whole rows copied by `index_select` on the flattened (B * T, ...) view: the same values as `torch.gather` with an
    index expanded over the trailing dims, which reads one index per element (2-6x slower on CPU, issue 19)."""
    bsz, seq = x.shape[:2]
    flat = src if bsz == 1 else src + torch.arange(bsz, device=src.device).unsqueeze(1) * seq  # (B, T')
    return x.reshape(bsz * seq, *x.shape[2:]).index_select(0, flat.reshape(-1)).view(*src.shape, *x.shape[2:])


PRIOR_LOG_FLOOR = 1e-6  # the authors' clamp before the log: weights below it (an underflowed 0 too) count as it


def _centred_log(a, valid):
    """Eq. (4)'s prior A: log a (a clamped at `PRIOR_LOG_FLOOR`, as in the authors' code), centred over the valid
    (alive) tokens of each row."""
    log_a = torch.log(a.clamp_min(PRIOR_LOG_FLOOR))
    alive = valid.to(log_a.dtype)
    return log_a - ((log_a * alive).sum(1, keepdim=True) / alive.sum(1, keepdim=True).clamp_min(1.0))


def _top_k_mask(scores, valid, k):
    """(B, K) mask of the k highest valid scores per row; ties keep the lower index (stable)."""
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k) & valid


# ------------------------------------------------------------------------------------------------
# 3. Token selectors: one class per pruning method
# ------------------------------------------------------------------------------------------------


@dataclass
class SelectionContext:
    """Everything a selector may read at one pruning point. K = the visual tokens still alive (padded per row).

    point: index of the pruning point (0 = the pre-LLM point when the method prunes there)
    layer_idx / layer: the decoder layer the tokens are pruned before (0 and layer 0 before the LLM)
    hidden: (B, T', d) input of that layer; position_embeddings: its (cos, sin), each (B, T', hd)
    slots: (B, K) slot of each alive visual token in `hidden`; valid: (B, K); ids: (B, K) raster index 0..N-1
    keep_count: tokens to keep at this point (None: the method's own rule, e.g. RCP's adaptive threshold)
    prefill: the `PrunedPrefill` (question slots, alive keys, the previous layers' state)
    """

    point: int
    layer_idx: int
    layer: nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple
    slots: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor
    keep_count: int | None
    prefill: "PrunedPrefill"
    _hidden_norm: torch.Tensor | None = field(default=None, repr=False)
    _visual_norm: torch.Tensor | None = field(default=None, repr=False)
    _question_norm: torch.Tensor | None = field(default=None, repr=False)
    # (B, T', Hkv * hd): the pruning layer's key projection of the whole sequence, once the prior computed it; the
    # layer itself then reads its kept rows instead of projecting them again (`PrunedPrefill.given_inputs`).
    layer_keys: torch.Tensor | None = field(default=None, repr=False)

    def hidden_norm(self):
        """(B, T', d) the pruning layer's normalised input (its `input_layernorm`), computed once per point: the
        selector, the repair context and, at inference, the layer itself (its kept rows) read it."""
        if self._hidden_norm is None:
            self._hidden_norm = self.layer.input_layernorm(self.hidden)
        return self._hidden_norm

    def visual_hidden_norm(self):
        """(B, K, d) the normalised input at the alive visual tokens: gathered from `hidden_norm()` when it exists or
        the layer will reuse it, else normalised for those rows alone (training with given masks: no whole-sequence
        norm that nothing else reads). Computed once: the pruner and the repair context both read it."""
        if self._visual_norm is None:
            if self._hidden_norm is not None or self.reuse_in_layer():
                self._visual_norm = _gather_seq(self.hidden_norm(), self.slots)
            else:
                self._visual_norm = self.layer.input_layernorm(_gather_seq(self.hidden, self.slots))
        return self._visual_norm

    def question_hidden_norm(self):
        """(B, Lq, d) the normalised input at the question rows, gathered once: the prior's queries (Eq. 4) and the
        pruner's question summary (Eq. 1) both read it."""
        if self._question_norm is None:
            self._question_norm = _gather_seq(self.hidden_norm(), self.question_slots()[0])
        return self._question_norm

    def reuse_in_layer(self):
        """Whether the layer may read what selection computed (its normalised input, its keys) instead of computing
        it again: at inference only -- with gradients on, a checkpointed layer would recompute its forward in
        backward without them (a different graph)."""
        return not self.prefill.differentiable and not torch.is_grad_enabled()

    def question_slots(self):
        """(slots (B, Lq), valid (B, Lq)) of the question tokens among the current slots (`PrunedPrefill`)."""
        return self.prefill.question_slots()

    def visual_attention(self, layer, hidden_norm, q_slots, q_valid):
        """Attention (B, K) the query rows `q_slots` pay to the alive visual tokens in `layer` (whose normalised
        input is `hidden_norm`), averaged over heads and valid query rows, in at least float32."""
        cos, sin = self.position_embeddings
        keys = rows = None
        # the pruning layer's own keys, computed once -- of its own normalised input only: keys of another input
        # (a selector's own states) were handed to the layer's forward, which then attended with them
        if layer is self.layer and hidden_norm is self._hidden_norm and self.reuse_in_layer():
            if self.layer_keys is None:
                self.layer_keys = layer.self_attn.k_proj(hidden_norm)
            keys = self.layer_keys
        if hidden_norm is self._hidden_norm and q_slots is self.question_slots()[0]:
            rows = self.question_hidden_norm()
        probs = question_attention_probs(layer.self_attn, hidden_norm, cos, sin, self.prefill.key_alive(), q_slots,
                                         keys, rows)
        # Sum over the valid query rows first (one batched product), then heads, then read the visual columns.
        qw = q_valid.to(probs.dtype)  # (B, Lq)
        # in `probs`' float32 (a caller's autocast would make this product bf16)
        with maybe_autocast(probs.device.type, enabled=False):
            per_key = (qw.view(qw.shape[0], 1, 1, -1) @ probs).squeeze(2).mean(1)  # (B, T')
        return per_key.gather(1, self.slots) / qw.sum(1, keepdim=True).clamp_min(1.0)  # (B, K)

    def question_prior(self):
        """Eq. (4)'s prior A (B, K): the centred log of the question's attention to the alive visual tokens."""
        q_slots, q_valid = self.question_slots()
        return _centred_log(self.visual_attention(self.layer, self.hidden_norm(), q_slots, q_valid), self.valid)


class TokenSelector:
    """Decides which visual tokens survive each pruning point of one pruned prefill.

    Subclasses set `method` (the `PruningMethod` the config validates against) and implement `scores` (higher =
    kept, top-k at the point's keep count) or override `keep`. A selector is built per pruned prefill, so it may
    hold per-prefill state. Register it with `register_pruning_method(MySelector)`.
    """

    method: PruningMethod = None
    # Whether `scores` / `keep` read the decoder layers' attention or normalised input (`ctx.question_prior()`,
    # `ctx.visual_attention`, `ctx.hidden_norm`): the model then checks that the backbone's attention is one the
    # prior can recompute (`text_backbone_problem`) before the prefill, instead of failing deep in it.
    reads_attention: bool = False

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # hooks, called in this order
    def vision_hidden_states(self, feature_layer: int) -> list[int]:
        """Indices of extra vision-tower hidden states this method reads (besides the features)."""
        return []

    def observe_image_features(self, image_outputs, vision_feature_layer, vision_feature_select_strategy):
        """Called once with the vision tower's outputs, before the LLM (only when `pixel_values` are given)."""

    def start(self, prefill):
        """Called once the prefill knows its rows (`prefill.has_image`), before the first pruning point."""

    def observe_layer_input(self, layer_idx, hidden):
        """Called with the input of every decoder layer of the prefill, after its pruning point if any."""

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """(B, K) ranking of the alive visual tokens; the top `ctx.keep_count` survive."""
        raise NotImplementedError(f"{type(self).__name__} must implement `scores` or `keep`.")

    def keep(self, ctx: SelectionContext) -> torch.Tensor:
        """(B, K) bool: which alive visual tokens survive this point."""
        scores = self.scores(ctx)
        expected = tuple(ctx.valid.shape)
        if not torch.is_tensor(scores) or not scores.is_floating_point() or tuple(scores.shape) != expected:
            # named here: it failed deep in the top-k (an int overflow, a size mismatch) or broadcast silently
            got = f"{scores.dtype} {tuple(scores.shape)}" if torch.is_tensor(scores) else type(scores).__name__
            raise TypeError(f"{type(self).__name__}.scores must return a floating-point tensor of shape {expected} "
                            f"(batch, alive visual tokens; higher = kept), got {got}.")
        return _top_k_mask(scores, ctx.valid, ctx.keep_count)

    def exact_count(self, ctx: SelectionContext) -> int | None:
        """The number of tokens `keep` leaves every row with an image (at most its alive ones), when the method
        guarantees one; the decoder loop then sizes the pruned sequence without a host sync. None: data-dependent
        (the loop reads the counts from the device). Top-k at `ctx.keep_count` guarantees it; an overridden
        `keep` does not, unless it overrides this too. On CPU a selector of your own is checked against its `keep`
        (a ValueError names a wrong count)."""
        return ctx.keep_count if type(self).keep is TokenSelector.keep else None


SELECTORS: dict = {}


def register_pruning_method(selector_cls, overwrite=False):
    """Register a `TokenSelector` subclass under `selector_cls.method.name`: the config then accepts that
    `pruning_method` and the model prunes with the selector. Usable as a class decorator."""
    if not (isinstance(selector_cls, type) and issubclass(selector_cls, TokenSelector)):
        raise TypeError(f"`selector_cls` must be a `TokenSelector` subclass, got {selector_cls!r}.")
    method = selector_cls.method
    if not isinstance(method, PruningMethod):
        raise TypeError(f"{selector_cls.__name__}.method must be a `PruningMethod`, got {method!r}.")
    if not isinstance(method.name, str) or not method.name.strip():  # no config could name it
        raise ValueError(f"{selector_cls.__name__}.method's name is {method.name!r}: give it a non-empty string, the "
                         "`pruning_method` a config will name it by.")
    if not method.prunes:
        raise ValueError(f"{selector_cls.__name__}.method prunes nowhere: set `in_decoder` or `pre_llm`.")
    if method.name in SELECTORS and SELECTORS[method.name] is not selector_cls and not overwrite:
        raise ValueError(f"A pruning method named {method.name!r} is already registered; pass `overwrite=True`.")
    if method.name not in SELECTORS and PRUNING_METHODS.get(method.name) not in (None, method) and not overwrite:
        # a name with a spec and no selector ("none", the stock forward): not silently replaced
        raise ValueError(f"A pruning method named {method.name!r} is already registered; pass `overwrite=True`.")
    register_pruning_spec(method, overwrite=True)
    SELECTORS[method.name] = selector_cls
    return selector_cls


@register_pruning_method
class RcpSelector(TokenSelector):
    """RCP: the learned pruner's retention logits (Eqs. 4-5); kept = top-k, or logits > 0 (Eq. 8) without counts."""

    method = PRUNING_METHODS["rcp"]
    reads_attention = True

    def scores(self, ctx):
        pruner = self.model.rcp_plugins.pruners[str(ctx.layer_idx)]
        prior = ctx.question_prior().to(pruner.queries.dtype)  # A, Eq. (4), in the pruner's dtype
        if self.model.detach_prior:
            prior = prior.detach()
        q_valid = ctx.question_slots()[1]  # (B, Lq)
        visual = ctx.visual_hidden_norm()  # (B, K, d)
        question = ctx.question_hidden_norm()  # (B, Lq, d), the rows the prior's queries read
        return pruner(visual, ctx.valid, question, q_valid, prior)  # (B, K)

    def keep(self, ctx):
        logits = self.scores(ctx)
        return logits > 0 if ctx.keep_count is None else _top_k_mask(logits, ctx.valid, ctx.keep_count)  # Eq. (8)

    def exact_count(self, ctx):
        return ctx.keep_count  # None: the adaptive threshold (Eq. 8) keeps a data-dependent number


@register_pruning_method
class AttentionTopkSelector(TokenSelector):
    """Top tokens by the LLM's own question->visual attention at the pruning layer (Eq. 4's prior alone)."""

    method = PRUNING_METHODS["attention_topk"]
    reads_attention = True

    def scores(self, ctx):
        return ctx.question_prior()


@register_pruning_method
class FastvSelector(TokenSelector):
    """FastV: before layer K, the tokens most attended at layer K-1 by the last prompt token (or the question)."""

    method = PRUNING_METHODS["fastv"]
    reads_attention = True

    def __init__(self, model):
        super().__init__(model)
        self.previous_input = None  # (layer index, hidden entering it)

    def observe_layer_input(self, layer_idx, hidden):
        self.previous_input = (layer_idx, hidden)

    def scores(self, ctx):
        prev_idx, prev_hidden = self.previous_input or (None, None)
        if prev_idx != ctx.layer_idx - 1 or prev_hidden.shape[1] != ctx.hidden.shape[1]:
            raise RuntimeError("FastV needs the input of the layer before its pruning layer, unpruned.")
        prev = self.model.language_model.layers[prev_idx]
        if self.config.fastv_query == "last":
            # The last prompt token: without labels each row's last valid slot (the last slot under left padding, not
            # under right padding); with a labelled continuation (a loss, a log-likelihood) the token before it, so
            # the answer does not choose the tokens that predict it, as at generation.
            q_slots = ctx.prefill.prompt_end_slots()  # (B, 1)
            q_valid = torch.ones_like(q_slots, dtype=torch.bool)
        else:
            q_slots, q_valid = ctx.question_slots()
        return ctx.visual_attention(prev, prev.input_layernorm(prev_hidden), q_slots, q_valid)


def random_point_scores(seed, num_points, num_tokens):
    """The "random" baseline's scores (num_points, N): `torch.rand` from a CPU generator seeded with
    `pruning_seed`; at point p a row keeps the top-k alive tokens by `scores[p]`, i.e. a uniform k-subset of them
    that depends only on the seed (the same for every row, so batch == single)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_points, num_tokens, generator=g, dtype=torch.float64)


@functools.lru_cache(maxsize=32)
def _random_point_scores_on(seed, num_points, num_tokens, device):
    """`random_point_scores` on `device`, copied there once per process: a forward then copies nothing (a blocking
    copy to a GPU waits for every queued kernel, a host sync per pruning point, which CUDA's sync debug mode showed).
    Read-only: every caller gathers from it."""
    return random_point_scores(seed, num_points, num_tokens).to(device)


@register_pruning_method
class RandomSelector(TokenSelector):
    """A seeded uniform subset (before the LLM or at `pruning_layers`), the same for every row."""

    method = PRUNING_METHODS["random"]

    def start(self, prefill):
        # read here, not in `scores`: a compiled selection (`compile_selection`) cannot trace the cache's lookup
        self.point_scores = _random_point_scores_on(self.config.pruning_seed, len(self.config.pruning_points),
                                                    self.config.num_visual_tokens, prefill.slot_orig.device)

    def scores(self, ctx):
        scores = self.point_scores[ctx.point]  # (N,)
        return scores.unsqueeze(0).expand(ctx.ids.shape[0], -1).gather(1, ctx.ids)  # (B, K)


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
    with maybe_autocast(q.device.type, enabled=False):  # in `compute` under a caller's autocast too
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
        with maybe_autocast(normed.device.type, enabled=False):  # cosines in `compute`, under autocast too
            sim = normed[rows, first] @ normed[rows, second].transpose(1, 2)  # (B, R1, R2)
        best = sim.max(-1).values  # (B, R1)
        by_sim = torch.sort(best, dim=1, descending=True, stable=True).indices[:, drop:]
        residual = torch.cat([first.gather(1, by_sim), second], dim=1)
    keep = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    keep.scatter_(1, order[:, :important], True)
    keep.scatter_(1, residual, True)
    return keep


@register_pruning_method
class VisPrunerSelector(TokenSelector):
    """VisPruner: before the LLM, [CLS]-attention important patches + cosine-deduplicated diverse ones."""

    method = PRUNING_METHODS["vispruner"]

    def __init__(self, model):
        super().__init__(model)
        self.image_keep = None  # (num_images, N), from the vision tower
        self.row_keep = None  # (B, N); rows without an image keep nothing

    def vision_hidden_states(self, feature_layer):
        # The feature layer's input too: transformers keeps only the selected hidden states.
        feature = feature_layer % (self.config.vision_config.num_hidden_layers + 1)
        return sorted({feature, max(feature - 1, 0)})

    def observe_image_features(self, image_outputs, vision_feature_layer, vision_feature_select_strategy):
        if not isinstance(vision_feature_layer, int) or vision_feature_select_strategy != "default":
            raise ValueError(
                "`pruning_method='vispruner'` needs one int `vision_feature_layer` and "
                f"`vision_feature_select_strategy='default'`, got {vision_feature_layer!r} and "
                f"{vision_feature_select_strategy!r}."
            )
        tower = self.model.vision_tower
        if not hasattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers"):
            raise ValueError(
                f"`pruning_method='vispruner'` needs a CLIP-style vision tower with a [CLS] token; got "
                f"{type(tower).__name__}."
            )
        hidden_states = image_outputs.hidden_states
        # transformers keeps only the selected layer's entry (`output_hidden_states=False` gives [None, h, None]):
        # the [CLS] attention also reads the layer before it (`vision_hidden_states`)
        needed = self.vision_hidden_states(vision_feature_layer)
        if hidden_states is None or any(i >= len(hidden_states) or hidden_states[i] is None for i in needed):
            held = "none" if hidden_states is None else (
                f"those of layers {[i for i, h in enumerate(hidden_states) if h is not None]} only (it reads {needed})")
            raise ValueError(
                "`pruning_method='vispruner'` ranks patches with the vision tower's hidden states, but the image "
                f"outputs hold {held}: pass `pixel_values`, or `mm_encoder_outputs` from this model's own "
                "`model.model.get_image_features(pixel_values)`, which adds them."
            )
        cls_attention = vispruner_cls_attention(tower, hidden_states, vision_feature_layer)
        features = hidden_states[vision_feature_layer][:, 1:]  # pre-projector patch features
        keep = vispruner_keep_mask(cls_attention, features, self.config.pre_llm_keep_count,
                                   self.config.vispruner_important_ratio)  # (num_images, N)
        # `generate` expands precomputed image outputs for beams / several return sequences by repeating only their
        # features ([A, B] -> [A, B, A, B]); repeat the kept sets the same way.
        num_images = len(image_outputs.pooler_output)
        if num_images % keep.shape[0]:
            raise ValueError(
                f"`pruning_method='vispruner'`: the image outputs hold {num_images} feature sets but hidden states of "
                f"{keep.shape[0]} images; pass `pixel_values` instead of `mm_encoder_outputs`."
            )
        self.image_keep = keep.repeat(num_images // keep.shape[0], 1)

    def start(self, prefill):
        if self.image_keep is None:
            raise ValueError("`pruning_method='vispruner'` selects from the vision tower: pass `pixel_values`.")
        # The i-th row with an image reads the i-th image's kept set (a gather: boolean indexing would sync).
        has_image = prefill.has_image
        image_of_row = (has_image.long().cumsum(0) - 1).clamp_min(0)  # (B,)
        row_keep = self.image_keep.to(prefill.alive.device)[image_of_row]  # (B, N)
        self.row_keep = row_keep & has_image.unsqueeze(1)

    def keep(self, ctx):
        return self.row_keep.gather(1, ctx.ids) & ctx.valid

    def exact_count(self, ctx):
        return self.config.pre_llm_keep_count  # `vispruner_keep_mask` keeps exactly min(budget, N) per image


# The selectors this file defines: a saved folder names its method, and a fresh process runs these by that name.
BUILTIN_SELECTORS = dict(SELECTORS)
_BUILTIN_SELECTOR_CLASSES = frozenset(BUILTIN_SELECTORS.values())


def _warn_own_method(method):
    """Saving (`save_pretrained`, `save_plugins`) under a method a fresh process cannot run as this one does: a
    method of the user's own, or a selector registered over a built-in name (the folder names the built-in, which a
    fresh process would run without a word). Once per process and message (transformers' `warning_once`): a Trainer
    saving a checkpoint every few hundred steps said it at every one."""
    if method not in BUILTIN_METHODS:
        logger.warning_once(f"`pruning_method={method!r}` is a method of your own: the saved folder loads only where "
                            "its selector is registered (`register_pruning_method`) first, or with a built-in "
                            "`pruning_method=...` given to `from_pretrained`.")
    elif method in SELECTORS and SELECTORS[method] is not BUILTIN_SELECTORS.get(method):
        logger.warning_once(f"`pruning_method={method!r}` runs your own selector ({SELECTORS[method].__name__}), "
                            "registered over the built-in one: a fresh process loads the saved folder with the "
                            f"built-in {method!r} unless your selector is registered (`register_pruning_method(..., "
                            "overwrite=True)`) before loading. Register it under a name of its own to keep them apart.")


# ------------------------------------------------------------------------------------------------
# 4. The state of one pruned prefill
# ------------------------------------------------------------------------------------------------


class _GivenOutput(nn.Module):
    """Stands in for a row-wise module whose output is already known (see `PrunedPrefill.given_inputs`)."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, hidden_states):
        if hidden_states.shape[:-1] != self.output.shape[:-1]:
            raise RuntimeError(f"given output for {tuple(self.output.shape[:-1])} rows, called on "
                               f"{tuple(hidden_states.shape)}")
        return self.output


class PrunedPrefill:
    """One pruned prefill: which original token sits in which slot, and what was kept and dropped.

    Layout: slot t of row b holds original token `slot_orig[b, t]` (-1 for padding); rows are right-aligned.
    "discard" (inference): dropped tokens leave the sequence, so later layers compute on and cache the kept ones.
    "mask" (`differentiable=True`, training): every token stays in place; a dropped token's weight as a key is 0
    with straight-through gradients (Eqs. 6-7), so the student's hidden states line up with the teacher's.
    """

    def __init__(self, model, selector, hidden, key_valid, image_mask, labels, question_mask, answer_mask,
                 visual_keep_masks, layout, gumbel_temperature, gumbel_noise, cache, use_cache):
        config = model.config
        self.model, self.config, self.selector = model, config, selector
        self.differentiable = layout == "mask"
        self.gumbel_temperature = gumbel_temperature
        self.gumbel_noise = gumbel_noise
        # The mask layout keeps every token, so a cache filled now could not be decoded from.
        self.cache, self.use_cache = (None, False) if self.differentiable else (cache, use_cache)
        # Pruning points: decoder layers before which tokens are dropped; 0 = before the LLM (pre-LLM methods).
        self.points = list(config.pruning_points)
        self.keep_counts = config.point_keep_counts
        self.prefill_length = hidden.shape[1]  # layer 0's cache length after this prefill
        bsz, seq, _ = hidden.shape
        device = hidden.device
        n = config.num_visual_tokens
        per_row = image_mask.sum(1)
        self.has_image = per_row == n  # (B,)
        positions = torch.arange(seq, device=device).unsqueeze(0)
        last_valid = torch.where(key_valid, positions, -1).max(1, keepdim=True).values  # (B, 1) -1: no token
        # Without labels, an `answer_mask` ends the prompt at its first position (the token predicting the first
        # answer token): the tokens after it are answers, e.g. a draft verified together with its prompt (assisted
        # decoding), which must select as the prompt alone would.
        prompt_end = last_valid
        if labels is None and answer_mask is not None:
            first_answer = torch.where(answer_mask.bool() & key_valid, positions, seq).amin(1, keepdim=True)  # (B, 1)
            prompt_end = torch.where(first_answer < seq, first_answer, last_valid)
        self.question_mask = self._default_question_mask(question_mask, image_mask, key_valid, labels, positions,
                                                         prompt_end)
        # (B,) tokens after each row's prompt (a draft): answer positions, which no selection read and no pruner drops
        # (text after the prompt's text), so the last columns of every pruned segment too (`RcpDecodeState.crop`)
        self.draft_length = seq - 1 - prompt_end.squeeze(1)
        self._prompt_inputs = (image_mask, key_valid, labels, prompt_end)  # for `prompt_end_slots` (FastV)
        question = self.question_mask & key_valid  # (B, T)
        # The last prompt token's logits are what generation reads: a pruner must not be able to drop it.
        ends_on_image = self.has_image & image_mask.gather(1, prompt_end.clamp_min(0)).squeeze(1)  # (B,)
        # (B, N) in raster order: the visual tokens the attention mask shows. One it hides (`attention_mask` 0 on an
        # image token, a token-ablation experiment) is an invisible key for stock; here it is dead from the start,
        # like padding: no candidate, no slot, not counted among the alive (it was, and the compaction overran).
        self.vis_id = torch.where(image_mask, image_mask.long().cumsum(1) - 1, -1)  # (B, T) raster index, -1 else
        raster = torch.where(image_mask, self.vis_id, n).clamp_max(n)  # (B, T); n: not visual (a spare column)
        visible = torch.zeros(bsz, n + 1, dtype=torch.bool, device=device).scatter_(
            1, raster, image_mask & key_valid)[:, :n] & self.has_image.unsqueeze(1)
        forced = self._check_forced(visual_keep_masks, bsz, n)
        if forced is not None:
            forced = forced & visible.unsqueeze(1)
        # The prefill's one host sync: the input checks, and every row's token counts. From them the loop knows
        # each pruned sequence's length without asking the device again (pruning at fixed counts; RCP's adaptive
        # threshold reads its kept counts once per point, since they depend on the data).
        host = [per_row, ends_on_image, key_valid.sum(1), (question & ~image_mask).sum(1),
                (question & image_mask).any(1), visible.sum(1)]
        if forced is not None:
            noncumulative = (forced[:, 1:] & ~forced[:, :-1]).flatten(1).any(1)  # (B,)
            host += [noncumulative, *forced.sum(-1).unbind(1)]
        host = torch.stack([t.to(torch.long) for t in host]).tolist()
        counts, ends_on_image, self.row_length, question_text, question_on_image, shown = host[:6]
        bad = [c for c in counts if c not in (0, n)]
        if bad:
            raise ValueError(
                f"Pruning needs one image of {n} visual tokens per prompt, but a row holds {bad[0]} image tokens. "
                "Pass one image per prompt (or run with `pruning_method='none'`)."
            )
        if any(ends_on_image):
            raise ValueError(
                f"Row {ends_on_image.index(1)} of the batch ends on its image: a pruner could drop the last prompt "
                "token, whose logits the next token is read from. Put the question (or the chat template's "
                "'ASSISTANT:') after the image, e.g. with `processor.apply_chat_template(..., "
                "add_generation_prompt=True)`, or run with `pruning_method='none'`."
            )
        # Every pruning point needs a query row that no pruner can drop: a text token (not an image token).
        textless = [c == n and q == 0 for c, q in zip(counts, question_text)]
        if any(textless):
            row = textless.index(True)
            where = "`question_mask` marks" if question_mask is not None else "the prompt holds"
            raise ValueError(
                f"Row {row} of the batch has an image but {where} no text token for the pruners to condition on "
                "(they rank the visual tokens by the question's attention). Give the prompt at least one text "
                "token (e.g. BOS), mark text tokens in `question_mask`, or run with `pruning_method='none'`."
            )
        self.answer_mask = (self._default_answer_mask(answer_mask, labels, positions, last_valid)
                            & self.has_image.unsqueeze(1))
        if forced is not None and any(host[6]):
            raise ValueError(
                "`visual_keep_masks` is not cumulative: a token kept at a later pruning point was dropped at an "
                "earlier one, which physical discard cannot bring back. Make each point's mask a subset of the "
                "previous one, e.g. `torch.cumprod(masks.int(), dim=1).bool()`."
            )
        self.forced = forced
        self.forced_counts = list(zip(*host[7:])) if forced is not None else None  # per row, per point
        # Host-side per-row counts: visual tokens alive, question slots (None: a question token is an image token,
        # which a pruner may drop, so its count is read from the device).
        self.row_alive = [k if c == n else 0 for c, k in zip(counts, shown)]
        # A method's exact count assumes every visual token a candidate: VisPruner chooses from the vision tower,
        # blind to the attention mask, so with a hidden token it may keep one fewer. Read the counts then.
        self.hidden_visual = any(c == n and k < n for c, k in zip(counts, shown))
        self.question_width = None if any(question_on_image) else max(question_text, default=0)

        self.slot_orig = torch.where(key_valid, positions, -1)  # (B, T); -1 for padding, as after every prune
        self.slot_valid = key_valid  # (B, T)
        self.alive = visible  # (B, N) cumulative keep mask
        self.keep_history = []  # per pruning point, (B, N) bool
        # The repair adapters' context (Eqs. 9-10), one (B, b) vector per pruning point; only computed when the
        # model repairs. `pruned_sum` / `pruned_count`: normalised states of all tokens pruned so far.
        self.context_encoder = model._repair_context()
        self.point_contexts = []
        # float32 sums: bf16 counts past 256 tokens are not exact.
        self.pruned_sum = hidden.new_zeros(bsz, hidden.shape[-1], dtype=torch.float32)  # (B, d)
        self.pruned_count = hidden.new_zeros(bsz, 1, dtype=torch.float32)  # (B, 1)
        self.retention = []  # per decoder layer, (B,) visual tokens alive / N (differentiable in mask layout)
        self._retention_of = self._retention_now = None  # the `alive` the last recorded retention was computed from
        # Mask layout: `key_keep` (B, T) is each key's 0/1 weight in attention, and `soft_alive` (B, N) the
        # cumulative mask M with straight-through gradients.
        self.key_keep = torch.ones(bsz, seq, dtype=hidden.dtype, device=device) if self.differentiable else None
        self.soft_alive = visible.to(hidden.dtype) if self.differentiable else None
        # Mask layout: the image slots never move, (B, N) for the rows with an image.
        self.image_slots = _first_slots(image_mask, n if n in counts else 0)[0] if self.differentiable else None
        self.segment_masks = {}  # first layer of a pruned segment -> (B, T_s) key mask of its prefill tokens
        self.padded_segments = {}  # first layer of a segment -> whether a row of it is padded (known on the host)
        self._given = None  # (layer index, {module path: its output on the kept rows}), see `given_inputs`
        self._question = None  # see `question_slots`
        self.repair_contexts = {}  # repair layer -> (B, b)
        selector.start(self)

    def _default_question_mask(self, question_mask, image_mask, key_valid, labels, positions, prompt_end):
        """The question tokens the pruners condition on: default, the text after the image (label -100) up to the
        prompt's end (`prompt_end`, (B, 1): its last token, or an `answer_mask`'s first position)."""
        if question_mask is not None:
            return question_mask.bool()
        last_image = torch.where(image_mask, positions, -1).max(1).values  # (B,)
        question_mask = ((positions > last_image.unsqueeze(1)) & (positions <= prompt_end) & key_valid
                         & self.has_image.unsqueeze(1))
        if labels is not None:
            question_mask &= labels == -100
        # A prompt that ends on its image: condition on its last text token before the image (e.g. "USER:"). Its
        # last token is an image token, which the first pruner may drop, leaving later points no query row.
        empty = ~question_mask.any(1) & self.has_image  # (B,)
        before = key_valid & ~image_mask & (positions < last_image.unsqueeze(1))  # (B, T) text before the image
        last_text = torch.where(before, positions, -1).max(1).values  # (B,) -1: none (refused by the caller)
        question_mask |= empty.unsqueeze(1) & (positions == last_text.unsqueeze(1))
        return question_mask

    @staticmethod
    def _default_answer_mask(answer_mask, labels, positions, last_valid):
        """Where the repair adapters act: default, positions that predict an answer token, else the last one."""
        if answer_mask is not None:
            return answer_mask.bool()
        if labels is None:  # the last real token of each row (with right padding, not the pad column at the end)
            return positions == last_valid  # (B, T)
        answer_mask = torch.zeros_like(labels, dtype=torch.bool)
        answer_mask[:, :-1] = labels[:, 1:] != -100
        return answer_mask

    def _check_forced(self, visual_keep_masks, bsz, n):
        if visual_keep_masks is None:
            return None
        if not torch.is_tensor(visual_keep_masks) or visual_keep_masks.dtype != torch.bool:
            what = visual_keep_masks.dtype if torch.is_tensor(visual_keep_masks) else type(visual_keep_masks).__name__
            raise TypeError(
                f"`visual_keep_masks` must be a bool tensor (True = keep), got {what}; a float mask would be read "
                "as 'keep' wherever it is non-zero. Pass `masks > 0.5` or `masks.bool()`."
            )
        expected = (bsz, len(self.points), n)
        if tuple(visual_keep_masks.shape) != expected:
            raise ValueError(
                f"`visual_keep_masks` has shape {tuple(visual_keep_masks.shape)}, expected {expected} "
                "(batch, num_pruning_layers, num_visual_tokens)."
            )
        return visual_keep_masks  # cumulative: checked with the prefill's other inputs (one host sync)

    # -- slots --------------------------------------------------------------------------------------

    def slot_question(self):
        """(B, T') question tokens among the current slots."""
        return torch.where(self.slot_valid, self.question_mask.gather(1, self.slot_orig.clamp_min(0)), False)

    def prompt_end_slots(self):
        """(B, 1) current slot of each row's last prompt token: its last token from the image on that is not a
        labelled answer -- with prompt + labelled continuation (a log-likelihood) the token before the answer, the
        last image token when the answer follows the image directly (a caption) -- else, without labels, the first
        position of a given `answer_mask` (a draft verified with its prompt), else its last valid token (no labels,
        labels on every token, or no image). Independent of `question_mask`. Read at the one point of a
        method that prunes once (FastV), where no token has been dropped yet, so the token has a slot."""
        image_mask, key_valid, labels, prompt_end = self._prompt_inputs
        positions = torch.arange(key_valid.shape[1], device=key_valid.device).unsqueeze(0)  # (1, T)
        end = prompt_end.squeeze(1)  # (B,) last valid token, or an `answer_mask`'s first position
        if labels is not None:
            last_image = torch.where(image_mask, positions, -1).amax(1, keepdim=True)  # (B, 1)
            # An unlabelled image token counts: with a caption labelled right after the image, the last valid token
            # is the caption's, whose attention let the answer choose the tokens that predict it.
            prompt = key_valid & ((positions > last_image) | image_mask) & (labels == -100)
            last_prompt = torch.where(prompt, positions, -1).amax(1)
            end = torch.where(last_prompt >= 0, last_prompt, end)
        return (self.slot_orig == end.unsqueeze(1)).to(torch.int8).argmax(1, keepdim=True)  # (B, 1)

    def question_slots(self):
        """(slots (B, Lq), valid (B, Lq)) of the question tokens among the current slots. Found once, then carried
        through each compaction (`prune`): question tokens are text, which no pruner drops -- one gather instead of
        a sort per pruning point. Found again after a point where a question token is an image token
        (`question_width` None: a pruner may have dropped it). Padding entries (valid False) point at some valid slot
        -- slot 0 once carried -- and weigh 0 wherever the rows are read."""
        if self._question is None:
            self._question = _first_slots(self.slot_question(), self.question_width)
        return self._question

    def key_alive(self):
        """(B, T') keys a query may attend to: valid slots, minus the tokens dropped in the mask layout."""
        if not self.differentiable:
            return self.slot_valid
        return self.slot_valid & (self.key_keep > 0)

    def record_retention(self):
        n = self.config.num_visual_tokens
        if self.differentiable:
            self.retention.append(self.soft_alive.sum(1) / n)
            return
        # `alive` changes only at a pruning point (a new tensor, never in place): the layers between two points share
        # one (B,) value instead of three ops each, 84 fewer dispatched calls on a 32-layer model with three points
        # (where a batch-1 GPU prefill's time follows its calls).
        if self._retention_of is not self.alive:
            self._retention_of, self._retention_now = self.alive, self.alive.sum(1).to(torch.float32) / n
        self.retention.append(self._retention_now)

    def layer_kwargs(self):
        """Extra kwargs for a decoder layer in the mask layout: the differentiable key weights once a pruner ran,
        and the configured attention for the layers before it."""
        if not self.differentiable:
            return {}
        if self.keep_history:
            return {"rcp_key_keep": self.key_keep, "rcp_fallback_attention": self.configured_attention}
        return {"rcp_fallback_attention": self.configured_attention}

    def attention(self, lm_config):
        """The mask layout runs its layers with the soft key-mask attention (the configured one where no key is
        masked yet)."""
        if self.differentiable:
            self.configured_attention = lm_config._attn_implementation
            return _attention_implementation(lm_config, SOFT_KEY_MASK_ATTENTION)
        return contextlib.nullcontext()

    # -- pruning ------------------------------------------------------------------------------------

    def _context(self, layer_idx, layer, hidden, position_embeddings, slots, valid, ids):
        p = self.points.index(layer_idx)
        count = self.keep_counts[p] if self.keep_counts is not None else None
        return SelectionContext(p, layer_idx, layer, hidden, position_embeddings, slots, valid, ids, count, self)

    def prune(self, layer_idx, layer, hidden, position_embeddings, mask):
        """Decide the kept visual tokens before `layer`, then drop the others (physically, or by mask).
        Returns the layer's (hidden, position_embeddings, attention mask)."""
        if self.differentiable:
            return self._prune_mask(layer_idx, layer, hidden, position_embeddings, mask)
        slot_vis = torch.where(self.slot_valid, self.vis_id.gather(1, self.slot_orig.clamp_min(0)), -1)  # (B, T')
        vis_slots, vis_valid = _first_slots(slot_vis >= 0, max(self.row_alive))  # (B, K)
        vis_ids = slot_vis.gather(1, vis_slots).clamp_min(0)  # (B, K) raster ids of alive visual tokens
        ctx = self._context(layer_idx, layer, hidden, position_embeddings, vis_slots, vis_valid, vis_ids)
        if self.forced is not None:
            keep = self.forced[:, ctx.point].gather(1, vis_ids) & vis_valid
        else:
            keep = self.model._select_tokens(self.selector, ctx)
        keep &= vis_valid
        kept = self._kept_per_row(ctx, keep)
        self.row_length = [length - (alive - k) for length, alive, k in zip(self.row_length, self.row_alive, kept)]
        self.row_alive = kept
        # (B, N) in raster order; padded candidates carry id 0 and keep=False, so take the max over duplicates.
        keep_raster = torch.zeros(self.alive.shape, dtype=torch.int8, device=keep.device).scatter_reduce(
            1, vis_ids, keep.to(torch.int8), "amax").bool() & self.alive

        dropped = vis_valid & ~keep  # (B, K)
        if self.context_encoder is not None:
            self._add_context(ctx.visual_hidden_norm(), dropped.to(hidden.dtype),
                              keep_raster.to(hidden.dtype))
        self.alive = keep_raster
        self.keep_history.append(keep_raster)

        src, valid, dest = _compact(self.staying_slots(vis_slots, dropped), max(self.row_length))
        hidden = _gather_seq(hidden, src)
        if ctx.reuse_in_layer():  # what selection computed of the layer's own work, on the rows that stay
            given = {"input_layernorm": ctx._hidden_norm, "self_attn.k_proj": ctx.layer_keys}
            self._given = (layer_idx, {path: _gather_seq(x, src) for path, x in given.items() if x is not None})
        position_embeddings = tuple(_gather_seq(t, src) for t in position_embeddings)
        self.slot_orig = torch.where(valid, self.slot_orig.gather(1, src), -1)
        self.slot_valid = valid
        if self._question is not None and self.question_width is not None:  # no question token was dropped
            q_slots, q_valid = self._question
            self._question = (torch.where(q_valid, dest.gather(1, q_slots), 0), q_valid)
        else:
            self._question = None
        self.segment_masks[layer_idx] = valid
        if layer_idx == 0:
            self.prefill_length = valid.shape[1]
        # Whether a row is padded is known on the host (the row lengths): the mask builder need not read it.
        padded = min(self.row_length) < valid.shape[1]
        self.padded_segments[layer_idx] = padded
        return hidden, position_embeddings, self.model._layer_mask(hidden, valid, self.cache, layer_idx, padded)

    def staying_slots(self, vis_slots, dropped):
        """(B, T') the current slots that stay after a point drops `dropped` (B, K) of the visual tokens at
        `vis_slots` (B, K): every valid slot but those."""
        dropped_slots = torch.zeros_like(self.slot_valid).scatter_(1, vis_slots, dropped)  # (B, T')
        return self.slot_valid & ~dropped_slots

    @contextlib.contextmanager
    def given_inputs(self, layer_idx, layer):
        """Run `layer` with what the pruning point already computed of it, on its kept rows: its normalised input
        (`input_layernorm`) and, when the Eq. (4) prior projected the whole sequence, its keys (`self_attn.k_proj`)
        -- computing them again would do the same work twice (issue 19). Both are row-wise maps of the same
        states, so the values are the layer's own."""
        given = self._given
        if given is None or given[0] != layer_idx:
            yield
            return
        self._given = None
        swapped = []
        try:
            for path, output in given[1].items():
                parent, _, name = path.rpartition(".")
                owner = layer.get_submodule(parent) if parent else layer
                swapped.append((owner, name, getattr(owner, name)))
                setattr(owner, name, _GivenOutput(output))
            yield
        finally:
            for owner, name, module in reversed(swapped):
                setattr(owner, name, module)

    def _kept_per_row(self, ctx, keep):
        """Visual tokens each row keeps at this point, on the host: known for given masks and for methods that keep
        exactly a count (`TokenSelector.exact_count`); otherwise read from `keep` (a host sync)."""
        if self.forced is not None:
            return [counts[ctx.point] if alive else 0 for counts, alive in zip(self.forced_counts, self.row_alive)]
        count = None if self.hidden_visual else self.selector.exact_count(ctx)
        if count is None:
            return keep.sum(1).tolist()
        kept = [min(count, alive) for alive in self.row_alive]
        # A selector of the user's own is checked where reading the counts costs no device sync (the built-ins' are
        # tested; checking them would put a read into the prefill that the no-sync tests count).
        if keep.device.type == "cpu" and type(self.selector) not in _BUILTIN_SELECTOR_CLASSES:
            actual = keep.sum(1).tolist()
            if actual != kept:  # a wrong count sizes the pruned rows wrongly, without a word
                raise ValueError(
                    f"{type(self.selector).__name__}.exact_count returned {count}, but its `keep` kept {actual} "
                    f"visual tokens per row (of {self.row_alive} alive) at pruning point {ctx.point}: return the "
                    "number `keep` leaves every row with an image (at most its alive ones), or None to have the "
                    "counts read from `keep`.")
        return kept

    def _prune_mask(self, layer_idx, layer, hidden, position_embeddings, mask):
        """Training layout: sample a hard Gumbel-Sigmoid mask with straight-through gradients (Eqs. 6-7) and
        zero the dropped tokens' weight as keys; nothing moves, so the student lines up with the teacher."""
        n = self.config.num_visual_tokens
        bsz = hidden.shape[0]
        vis_slots = self.image_slots  # (B, N) for rows with an image; others are masked below
        vis_valid = self.alive & self.has_image.unsqueeze(1)  # (B, N) hard-alive tokens
        if vis_slots.shape[1] < n:  # no row has an image
            return hidden, position_embeddings, mask
        ids = torch.arange(n, device=hidden.device).unsqueeze(0).expand(bsz, -1)
        ctx = self._context(layer_idx, layer, hidden, position_embeddings, vis_slots, vis_valid, ids)
        if self.forced is not None:
            layer_mask = self.forced[:, ctx.point].to(hidden.dtype)
        else:
            selector_cls = type(self.selector)
            if selector_cls.keep not in (TokenSelector.keep, RcpSelector.keep):
                # a rule of its own cannot carry gradients: this layout samples from `scores` with the built-in rule
                logger.warning_once(
                    f"{selector_cls.__name__} overrides `keep`, but the differentiable (mask) layout selects with "
                    "its `scores` and the built-in rule (top `pruning_keep_counts`, or logits > 0 without counts, "
                    "Eqs. 6-8): the plug-ins train for that rule, not for your `keep`. Put the rule in `scores` "
                    "(as logits) to train what inference runs.")
            logits = self.selector.scores(ctx)
            if self.model.training and self.gumbel_noise:
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                logits = logits + torch.log(u) - torch.log1p(-u)  # logistic noise
            y_soft = torch.sigmoid(logits / self.gumbel_temperature)  # Eq. (6)
            # sigmoid(x / tau) > 0.5 is x > 0, which the physical discard tests (Eq. 8); testing y_soft instead
            # would drop the tokens whose logit is in (0, ~1e-7 tau), where float32's sigmoid rounds to 0.5.
            hard = (logits > 0) if ctx.keep_count is None else _top_k_mask(logits, vis_valid, ctx.keep_count)
            y_soft = torch.where(vis_valid, y_soft, torch.zeros_like(y_soft))
            layer_mask = hard.to(y_soft.dtype) - y_soft.detach() + y_soft  # Eq. (7), straight-through
        previous = self.soft_alive
        self.soft_alive = previous * layer_mask  # cumulative, M(l) = M(l-1) * m(l)
        keep_raster = (self.soft_alive > 0.5) & self.has_image.unsqueeze(1)
        if self.context_encoder is not None:
            dropped = previous - self.soft_alive  # (B, N), 1 where this pruner dropped the token
            self._add_context(ctx.visual_hidden_norm(), dropped, self.soft_alive)
        self.alive = keep_raster
        self.keep_history.append(keep_raster)
        # The image slots' key weights become M (rows without an image keep theirs: their slots are padding).
        scattered = self.key_keep.scatter(1, vis_slots, self.soft_alive.to(self.key_keep.dtype))  # (B, T)
        self.key_keep = torch.where(self.has_image.unsqueeze(1), scattered, self.key_keep)
        return hidden, position_embeddings, mask

    def _add_context(self, normed, dropped, keep_mask):
        """Cache the adapters' context of this pruning point (Eqs. 9-10).

        normed: (B, K, d) the pruning layer's normalised input at the candidate visual tokens (the states the pruner
        read); dropped: (B, K) 1 where this point dropped the token (straight-through in training); keep_mask: (B, N)
        the cumulative mask M after it.
        """
        self.pruned_sum = self.pruned_sum + (dropped.unsqueeze(-1).float() * normed.float()).sum(1)
        self.pruned_count = self.pruned_count + dropped.float().sum(1, keepdim=True)
        pruned_mean = self.pruned_sum / self.pruned_count.clamp_min(1.0)  # (B, d), 0 if nothing was pruned yet
        self.point_contexts.append(self.context_encoder(keep_mask, pruned_mean))

    def repair(self, layer_idx, adapter, hidden):
        """Apply the delayed repair adapter after `layer_idx` to the answer positions (Eqs. 11-15), conditioned on
        the context of the nearest pruning point at or before `layer_idx`."""
        preceding = [i for i, layer in enumerate(self.points) if layer <= layer_idx]
        if not preceding or not self.point_contexts:
            return hidden
        context = self.point_contexts[preceding[-1]]  # (B, b)
        self.repair_contexts[layer_idx] = context
        answer = torch.where(self.slot_valid, self.answer_mask.gather(1, self.slot_orig.clamp_min(0)), False)
        return adapter(hidden, context, answer)

    # -- results ------------------------------------------------------------------------------------

    def info(self):
        n = self.config.num_visual_tokens
        masks = (
            torch.stack(self.keep_history, dim=1)
            if self.keep_history
            else torch.zeros(self.alive.shape[0], 0, n, dtype=torch.bool, device=self.alive.device)
        )
        return RcpPruningInfo.from_masks(masks, self.has_image, self.points)

    def decode_state(self, input_length):
        return RcpDecodeState(self.prefill_length, dict(self.segment_masks), dict(self.repair_contexts),
                              self.has_image, input_length, dict(self.padded_segments), self.draft_length)


# ------------------------------------------------------------------------------------------------
# 5. What a forward returns, and what decoding needs
# ------------------------------------------------------------------------------------------------


class _KeptIndices(Sequence):
    """`kept_indices[p][b]`: raster indices (1-D LongTensor) of the tokens row b keeps after point p. Computed on
    first access: `.nonzero()` waits for the device, and a forward should not."""

    def __init__(self, keep_masks):
        self._masks = keep_masks  # (B, P, N)
        self._lists = None

    def _resolve(self):
        if self._lists is None:
            masks = self._masks
            self._lists = [[masks[b, p].nonzero().flatten() for b in range(masks.shape[0])]
                           for p in range(masks.shape[1])]
        return self._lists

    def __getitem__(self, index):
        return self._resolve()[index]

    def __len__(self):
        return self._masks.shape[1]

    def __repr__(self):
        return repr(self._resolve())


@dataclass
class RcpPruningInfo:
    """Which visual tokens (raster indices 0..N-1) survive each pruning layer, per sample."""

    kept_indices: Sequence  # one entry per pruning layer: list of per-sample 1-D LongTensors (computed lazily)
    kept_counts: torch.LongTensor  # (batch, num_pruning_layers)
    keep_masks: torch.BoolTensor  # (batch, num_pruning_layers, N), cumulative
    has_image: torch.BoolTensor  # (batch,); rows without an image are not pruned
    pruning_layers: list

    @classmethod
    def from_masks(cls, keep_masks, has_image, pruning_layers):
        return cls(_KeptIndices(keep_masks), keep_masks.sum(-1), keep_masks, has_image, list(pruning_layers))


class RcpDecodeState:
    """Per-sample state that decode steps need after a pruned prefill; lives on the cache.

    prefill_length: the prompt's length in layer 0's cache (T, or less after a pre-LLM prune).
    segment_masks: {first layer of a pruned segment (0 after a pre-LLM prune): (B, T_s) bool key mask of its
        prefill tokens}.
    repair_contexts: {repair layer: (B, b) context of Eq. 11}.
    has_image: (B,) bool.
    input_length: T, the prompt length in input tokens (positions continue from it); default prefill_length.
    padded_segments: {first layer of a segment: whether its prefill mask has padding}, as far as the host knows it
        (a segment it does not name: unknown), so that a decode step need not read the masks from the device.
    draft_length: (B,) the prefill's tokens after each row's prompt (a draft assisted decoding verified with it: no
        selection read them); default none.
    """

    def __init__(self, prefill_length, segment_masks, repair_contexts, has_image, input_length=None,
                 padded_segments=None, draft_length=None):
        self.prefill_length = prefill_length
        self.input_length = prefill_length if input_length is None else input_length
        self.segment_masks = segment_masks
        self.padded_segments = dict(padded_segments or {})
        self.repair_contexts = repair_contexts
        self.has_image = has_image
        self.draft_length = torch.zeros_like(has_image, dtype=torch.long) if draft_length is None else draft_length

    def _map(self, fn):
        self.segment_masks = {k: fn(v) for k, v in self.segment_masks.items()}
        self.repair_contexts = {k: fn(v) for k, v in self.repair_contexts.items()}
        self.has_image = fn(self.has_image)
        self.draft_length = fn(self.draft_length)

    def crop(self, tokens, decoded):
        """Follow the cache's `crop` of its last `tokens` tokens, `decoded` of which came after the prefill: the rest
        leave the prefill's draft (`draft_length`: assisted decoding verifies it in the prompt's forward), text after
        the prompt's text, so the last columns of every pruned segment. Refused past it, into the prompt whose
        tokens chose the kept sets (a ValueError, before the cache changes)."""
        cut = tokens - max(decoded, 0)
        if cut <= 0:
            return
        draft = int(self.draft_length.min()) if self.draft_length.numel() else 0
        if cut > draft:
            raise ValueError(
                f"`crop` would remove {tokens} tokens from a cache filled by a pruned prefill: {max(decoded, 0)} "
                f"decoded after it and {cut - draft} of its prompt, whose tokens chose the visual tokens it keeps "
                "(the kept sets would not be the shorter prompt's). Crop only tokens after the prompt, or run the "
                "shorter prompt again."
            )
        self.prefill_length -= cut
        self.input_length -= cut
        self.draft_length = self.draft_length - cut
        self.segment_masks = {k: v[:, :-cut] for k, v in self.segment_masks.items()}
        self._keep_unpadded()  # the columns cut were real tokens: a padded mask may have lost none of its padding

    def _keep_unpadded(self):
        """After picking rows: rows of an unpadded mask are unpadded, but the picked rows of a padded one may not be."""
        self.padded_segments = {idx: False for idx, padded in self.padded_segments.items() if not padded}

    def reorder(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        self._keep_unpadded()

    def repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))  # every row stays: padding stays as it was

    def select(self, indices):
        self._map(lambda t: t[indices])
        self._keep_unpadded()


class RcpCacheMixin:
    """What a cache needs once a pruned prefill filled it: the per-sample pruning state (`rcp_state`) follows beam
    reordering and batch edits, and `get_seq_length` counts the input tokens seen (see below). Layers after a pruning
    layer simply hold fewer tokens: a cache's layers are independent."""

    rcp_state = None

    def get_seq_length(self, layer_idx=0):
        """Input tokens seen. After a pre-LLM prune layer 0 holds fewer tokens than the prompt had, but `generate`
        reads this to know how much of `input_ids` the cache covers (continuing from a returned cache)."""
        length = super().get_seq_length(layer_idx)
        if layer_idx == 0 and length > 0 and self.rcp_state is not None:
            length += self.rcp_state.input_length - self.rcp_state.prefill_length
        return length

    def get_query_offset(self, layer_idx=0):
        """Masks are built on what each layer holds."""
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove):
        """Stock (the last `-tokens_to_remove` tokens of every layer, its physical tail), with the pruned prefill's
        state following it (`RcpDecodeState.crop`): assisted decoding crops the rejected draft, verified in the
        prefill's forward at first."""
        if self.rcp_state is not None and isinstance(tokens_to_remove, int) and tokens_to_remove < 0:
            self.rcp_state.crop(-tokens_to_remove, _physical_length(self) - self.rcp_state.prefill_length)
        return super().crop(tokens_to_remove)

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

    def reset(self):
        """`Cache.reset` empties the layers for reuse; the pruned prefill's state goes with them (kept, it counted
        tokens a later prefill by another path never saw in `get_seq_length`)."""
        super().reset()
        self.rcp_state = None

    def __reduce_ex__(self, protocol):
        """A class `_rcp_cache_class` made at run time (`RcpQuantizedCache`) does not exist in a new process until
        that process prunes with such a cache: pickled by reference, it could not be loaded. It is remade from the
        cache class it extends, which pickles by reference (pickle and `copy.deepcopy` both read this)."""
        base = type(self).__dict__.get("_rcp_base")
        if base is None:  # RcpDynamicCache, a module-level class
            return super().__reduce_ex__(protocol)
        return _remade_cache, (base,), self.__dict__


class RcpDynamicCache(RcpCacheMixin, DynamicCache):
    """The `DynamicCache` a pruned `generate` runs on."""


_RCP_CACHE_CLASSES = {DynamicCache: RcpDynamicCache}


def _rcp_cache_class(cls):
    """`cls` with `RcpCacheMixin` (made once per class): a cache the user passed (a `QuantizedCache`, a subclass of
    `DynamicCache`, any `Cache`) takes it after the prefill filled it, keeping its own storage."""
    if issubclass(cls, RcpCacheMixin):
        return cls
    if cls not in _RCP_CACHE_CLASSES:
        _RCP_CACHE_CLASSES[cls] = type(f"Rcp{cls.__name__}", (RcpCacheMixin, cls),
                                       {"__module__": __name__, "_rcp_base": cls})
    return _RCP_CACHE_CLASSES[cls]


def _remade_cache(base):
    """An empty instance of `_rcp_cache_class(base)`, for unpickling (its state is set next)."""
    cls = _rcp_cache_class(base)
    return cls.__new__(cls)


@dataclass
class RcpLlavaModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    image_hidden_states: torch.FloatTensor | None = None
    token_positions: torch.LongTensor | None = None
    kept_indices: Sequence | None = None
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
    kept_indices: Sequence | None = None
    kept_counts: torch.LongTensor | None = None
    keep_masks: torch.BoolTensor | None = None
    hidden_state_positions: tuple | None = None
    layer_retention: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None


def _given(**kwargs):
    """The keyword arguments that are not None (stock forwards read a None flag as "off", not as "default")."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _physical_length(cache, layer_idx=0):
    """Tokens layer `layer_idx` of `cache` holds (after a pre-LLM prune, layer 0 holds fewer than were seen)."""
    if cache is None or len(cache.layers) <= layer_idx:
        return 0
    return cache.layers[layer_idx].get_seq_length()


def sliding_window_of(text_config):
    """The attention window of the text backbone's sliding-window layers, or None when every layer sees the whole
    causal past: `sliding_window` where `layer_types` has a "sliding_attention" layer (Qwen2, Gemma), or, with no
    `layer_types`, on every layer (Mistral)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(text_config, "sliding_window", None)


def _seen_tokens(cache):
    """`(input tokens the cache has seen, the pruning state of its prompt or None)`. A state left on a cache that
    is empty again belongs to an older prompt."""
    physical = _physical_length(cache)
    state = getattr(cache, "rcp_state", None) if physical > 0 else None
    return physical + (state.input_length - state.prefill_length if state is not None else 0), state


def _select(collected, which, selection):
    """The hidden states (`which=0`) or their token positions (1) that `output_hidden_states` selected: all L + 1,
    with None where an index list leaves one out (as stock models return them)."""
    if collected is None:
        return None
    states = collected[which]
    return tuple(states) if selection is True else tuple(t if i in selection else None for i, t in enumerate(states))


@contextlib.contextmanager
def _captured_attentions(layers, output_attentions, config):
    """Collect each decoder layer's attention weights (over the keys it holds: the surviving tokens) when
    `output_attentions` (the argument, else the config) asks for them; yields the list, or None. As in stock models
    (transformers' output capturing), an implementation that computes no weights (sdpa) contributes nothing, so
    the tuple is empty, with stock's warning: use `attn_implementation="eager"`."""
    if output_attentions is None:
        output_attentions = config.output_attentions or config.text_config.output_attentions
    if not output_attentions:
        yield None
        return
    weights, skipped = [], []

    def capture(module, args, out):
        (weights if out[1] is not None else skipped).append(out[1])

    hooks = [layer.self_attn.register_forward_hook(capture) for layer in layers]
    try:
        yield weights
    finally:
        for hook in hooks:
            hook.remove()
    if skipped:  # stock's message: the layers never see `output_attentions` here, so sdpa cannot give it itself
        impl = getattr(config.get_text_config(decoder=True), "_attn_implementation", None)
        logger.warning_once(f"`{impl}` attention does not support `output_attentions=True`. Please set your "
                            "attention to `eager` if you want any of these features.")


# ------------------------------------------------------------------------------------------------
# 6. The models
# ------------------------------------------------------------------------------------------------


class RcpInitMixin:
    """Plug-in initialisation for both model classes.

    `initialize_weights` dispatches each sub-`PreTrainedModel` to its own `_init_weights`, so the inner
    `RcpLlavaModel` needs this as much as the outer class. Zero-inits are keyed on the leaf modules and use
    `nn.init` (guarded by transformers), so tensors loaded from a checkpoint are never overwritten.
    """

    @classmethod
    def is_custom_code(cls):
        """Initialise like library code. transformers treats any class outside its package as custom code and then
        skips modules without direct parameters (CLIP's attention and MLP, whose init is keyed on the container),
        so a missing vision weight would start unlike stock. That guard protects `_init_weights` that write tensors
        in place; ours uses the guarded `nn.init` only. (Key conversion is registered by name, unaffected.)"""
        return False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and getattr(module, "_rcp_zero_init", False):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (RcpPruner, RcpRepairAdapter, RcpRepairContext)):
            module.reset_plugin_parameters(std=self.config.text_config.initializer_range)
        else:
            super()._init_weights(module)


def _require_rcp_config(config, model_name):
    """TypeError naming the fix for a config that is not an `RcpLlavaConfig` (a stock `LlavaConfig`, as
    `AutoConfig.from_pretrained("llava-hf/...")` returns, given as `config=`): it failed with "'LlavaConfig' object
    has no attribute 'validate_pruning'". Read by what the config can do, not its class: remote code loads the
    configuration module twice (AutoConfig's copy and this file's import), two RcpLlavaConfig classes."""
    if not callable(getattr(config, "validate_pruning", None)):
        raise TypeError(
            f"{model_name} needs an RcpLlavaConfig, got a {type(config).__name__} as `config`: load it with "
            "`RcpLlavaConfig.from_pretrained(model_id)` (pruning fields as keyword arguments; a stock LLaVA's "
            "config.json gets the defaults), or convert it with `RcpLlavaConfig.from_dict(config.to_dict())`."
        )


class RcpHubMixin:
    """`from_pretrained` and `save_pretrained` of both Hub classes (the full model and the bare `RcpLlavaModel` that
    `AutoModel` loads): each loads safetensors only, with its plug-ins float32, and writes a self-contained Hub
    folder, atomically, refusing to lose what a folder holds."""

    def _rcp_core(self):
        """The `RcpLlavaModel` (itself, or the full model's `model`), which holds `rcp_plugins`."""
        return self if isinstance(self, RcpLlavaModel) else self.model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, safetensors only (`use_safetensors=True` unless given): a pickle file can
        run code when it is loaded. A local folder with only pickle weights, or a local-looking path that does not
        exist, is refused with a message naming the path and the fix (not transformers' "Repo id must be ...").

        From a stock LLaVA checkpoint the plug-ins are new by construction: they are left out of transformers' load
        report (`_keys_to_ignore_on_load_missing`), built float32 on a half-precision backbone, and one line says
        so; from an RCP checkpoint a missing plug-in tensor is reported like any other. (The bare `RcpLlavaModel`,
        which `AutoModel` loads, had none of this: it read pickle weights and built new plug-ins in bfloat16.)"""
        check_model_source(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        kwargs.setdefault("use_safetensors", True)
        plugins_follow = kwargs.pop("_rcp_plugins_follow", False)  # from_base loads them right after
        stock = _is_stock_checkpoint(pretrained_model_name_or_path, kwargs)
        previous = cls._keys_to_ignore_on_load_missing
        cls._keys_to_ignore_on_load_missing = [r"(^|\.)rcp_plugins\."] if stock else previous
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            cls._keys_to_ignore_on_load_missing = previous
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        plugins = model._rcp_core().rcp_plugins
        if stock and any(p.is_meta for p in plugins.parameters()):
            model._plugins_on_execution_device()
        elif any(p.dtype in (torch.float16, torch.bfloat16) for p in plugins.parameters()):
            # Plug-ins the checkpoint does not hold (a stock one's) were initialised in the backbone's dtype:
            # transformers' float32 plan (`_keep_in_fp32_modules_strict`) covers loaded tensors only.
            plugins.float()
        if stock and not plugins_follow and model.config.pruning_spec.plugins:
            count = sum(p.numel() for p in plugins.parameters())
            logger.warning(
                f"RCP plug-ins are new ({count / 1e6:.2f}M parameters at pruning layers "
                f"{list(model.config.pruning_layers)}, repair layers {list(model.config.repair_layers)}): "
                f"{pretrained_model_name_or_path!r} is a stock LLaVA checkpoint. Train them (`train_rcp.py`) or load "
                "trained ones with `from_base(base, plugins=...)`."
            )
        return loaded

    def _plugins_on_execution_device(self):
        """A `device_map` that offloads the plug-ins ('cpu' / 'disk') of a stock checkpoint offloads tensors the
        checkpoint does not hold: the first forward failed on the missing offloaded weights. The plug-ins (a few MB)
        are built instead, initialised, on the device the offloaded modules run on, without offload hooks."""
        core = self._rcp_core()
        hooks = [m._hf_hook for m in core.rcp_plugins.modules() if hasattr(m, "_hf_hook")]
        device = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), "cpu")
        # in the model's mode: `from_pretrained` had put the offloaded plug-ins in eval mode before this swap
        core.rcp_plugins = fresh_plugins(self, device, self.dtype).train(self.training)
        device_map = getattr(self, "hf_device_map", None)
        if device_map is not None:
            name = "rcp_plugins" if core is self else PLUGIN_PREFIX.rstrip(".")
            self.hf_device_map = {**{k: v for k, v in device_map.items() if not k.startswith(name)}, name: device}

    def save_pretrained(self, save_directory, *args, overwrite=False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus what makes the folder a self-contained Hub repo: the two Hub files
        (`configuration_rcp_llava.py`, `modeling_rcp_llava.py`) and `config.auto_map` = `RCP_AUTO_MAP`, so that
        `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` / `AutoModelForImageTextToText`
        `.from_pretrained(folder, trust_remote_code=True)` load it where rcp-llava is not installed.

        Nothing saved is lost: the model is written into a staging folder inside `save_directory` first (the same
        filesystem, also when the folder is a mount point or a link to another disk) and its files are then renamed
        into place one by one (weights before `config.json`), so an interrupted save never leaves a config describing
        half-written weights. Other files in the folder stay: a processor saved there, and weights of another name
        or variant (`model_ema.safetensors`, `model.fp16.safetensors`); only the earlier files of the weights this
        save writes (other shards, an index) are removed. A folder holding the weights of another model (another
        shape, or weights without a config), or weights (any variant) whose trained RCP plug-ins this save would
        replace with others (another placement, size or head count, or a method without plug-ins), is refused with
        `FileExistsError` unless `overwrite=True`; a plug-in checkpoint beside them (`save_plugins`) stays. With
        `push_to_hub=True` the upload (named after `save_directory` unless `repo_id` is given) follows the local
        save, as transformers' does, so a failed upload keeps the saved folder."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **RCP_AUTO_MAP}
        # transformers' own handling: not the main process, a file in the way, or a PEFT adapter attached with
        # `add_adapter` / `load_adapter` (then only the adapter is written, as for stock: no model files)
        if (not kwargs.get("is_main_process", True) or os.path.isfile(save_directory)
                or getattr(self, "_hf_peft_config_loaded", False)):
            return super().save_pretrained(save_directory, *args, **kwargs)
        save_directory = os.fspath(save_directory)
        # an edited field the plug-ins were not built for: refused before anything is written
        self._rcp_core()._check_config()
        _warn_own_method(self.config.pruning_method)
        _refuse_other_model(save_directory, self.config, overwrite, _plugin_names(self.state_dict()))
        push = kwargs.pop("push_to_hub", False)
        # transformers passes its unnamed kwargs to `create_repo` when pushing; they must not reach the local save
        named = set(inspect.signature(LlavaPreTrainedModel.save_pretrained).parameters) - {"self", "kwargs"}
        push_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in named}
        created = not os.path.isdir(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        timestamps = self._get_files_timestamps(save_directory) if push else None  # what the upload sends: changes
        _remove_dead_staging(save_directory)
        staging = os.path.join(save_directory, f"{SAVE_STAGING_PREFIX}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.makedirs(staging)
            # this file, whatever class the instance is (a user's subclass lives in the user's script, which was
            # copied instead: the folder's auto_map names this file)
            for source in (__file__, sys.modules[RcpLlavaConfig.__module__].__file__):
                shutil.copyfile(source, os.path.join(staging, os.path.basename(source)))
            result = super().save_pretrained(staging, *args, **kwargs)
            _move_saved_folder(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not os.listdir(save_directory):  # a failed first save leaves no empty folder behind
                os.rmdir(save_directory)
        if push:
            self._push_saved_folder(save_directory, timestamps, kwargs.get("token"), push_kwargs)
        return result

    def _push_saved_folder(self, folder, timestamps, token, push_kwargs):
        """Upload the files a save changed in `folder`, as `PreTrainedModel.save_pretrained(push_to_hub=True)` does
        at its end (transformers 5.23: repo, model card, `_upload_modified_files`), after the folder is in place."""
        import transformers.modeling_utils as hf_modeling

        commit_message = push_kwargs.pop("commit_message", None)
        repo_id = push_kwargs.pop("repo_id", os.path.basename(os.path.normpath(folder)))
        create_pr = push_kwargs.pop("create_pr", False)
        repo_id = hf_modeling.hf_api().create_repo(repo_id, exist_ok=True, token=token, **push_kwargs).repo_id
        card_path = os.path.join(folder, "README.md")
        if os.path.isfile(card_path):
            # A card in the folder (an RCP model card, `rcp_llava.hub.build_model_card`) is the user's: kept, and
            # uploaded with the model. Stock would replace it with the Hub's card or transformers' template.
            timestamps = {k: v for k, v in timestamps.items() if k != "README.md"}
        else:
            hf_modeling.create_and_tag_model_card(repo_id, self.model_tags, token=token).save(card_path)
        self._upload_modified_files(folder, repo_id, timestamps, commit_message=commit_message, token=token,
                                    create_pr=create_pr)


class RcpLlavaModel(RcpInitMixin, RcpHubMixin, LlavaModel):
    """`LlavaModel` whose decoder loop drops visual tokens at the pruning layers.

    `forward` takes the stock arguments plus:
        question_mask: (B, T) bool, the question tokens the pruners condition on. Default: the text tokens
            after the last image token (and, with `labels`, only those whose label is -100).
        answer_mask: (B, T) bool, the positions the repair adapters modify. Default: positions whose next
            token is an answer token (`labels[t+1] != -100`), else the last prompt position; every position
            of a decode step. Without labels, its first position ends the prompt: the tokens after it (a draft
            verified with the prompt) are no question tokens, and FastV reads that position's attention.
        visual_keep_masks: (B, num_pruning_layers, N) bool, a cumulative keep mask per pruning layer that
            replaces the method's own choice (oracle pruning, recomputation with the same kept sets).
        gumbel_temperature: tau of the training masks (Eq. 6) for this call; default `config.gumbel_temperature`
            (a trainer anneals its own tau and passes it here, so the config keeps the user's value).
        gumbel_noise: logistic noise on the training masks for this call (default `model.gumbel_noise`, True); a
            trainer turns it off for the last part of training, which then runs on the inference rule (Eq. 8).
    A prefill whose prompt holds an image runs `_prefill_loop` (pruning); everything else `_decode_loop`.
    """

    config_class = RcpLlavaConfig

    def __init__(self, config):
        _require_rcp_config(config, type(self).__name__)
        config.validate_pruning()
        super().__init__(config)
        self.rcp_plugins = RcpPlugins(config)
        # The plug-ins stay float32 on a float16 / bfloat16 backbone, as PEFT's adapters (`autocast_adapter_dtype`):
        # they train in float32 (`train_rcp.upcast_plugins`) and are saved so, and a half-precision load rounded them
        # (the trained model's logits came back 2.4e-3 off). Each plug-in casts at its boundaries. Only where there
        # are plug-ins: transformers checks that the name matches parameters (`pruning_method="none"` has none).
        if any(True for _ in self.rcp_plugins.parameters()):
            self._keep_in_fp32_modules_strict = ["rcp_plugins"]
        # Runtime switches (not saved): the training teacher runs with both off.
        self.pruning_enabled = True
        self.repair_enabled = True
        # "discard" (inference), "mask" (training: tokens stay in place, differentiable masks) or None: mask
        # while `self.training`, discard otherwise.
        self.pruning_layout = None
        # Logistic noise on the training masks (Eq. 6); off makes a training step deterministic.
        self.gumbel_noise = True
        # Stop the gradient through the attention prior A (Eq. 4) into earlier pruners' masks (a training choice).
        self.detach_prior = False
        self.last_pruning_info = None
        self._generate_prefill = None  # while `generate` runs: a list that receives its prompt's pruning info
        self._backbone_checked = set()  # pruning methods `_check_text_backbone` passed on this model's backbone
        # `compile_selection`: whether on, with which torch.compile options, and {selector class: its compiled `keep`}
        # (kept while off: switching back on with the same options recompiles nothing)
        self.selection_compiled = False
        self._selection_compile_kwargs = None
        self._compiled_selection = {}
        self.post_init()

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
        mm_encoder_outputs=None,
        use_cache=None,
        labels=None,
        question_mask=None,
        answer_mask=None,
        visual_keep_masks=None,
        gumbel_temperature=None,
        gumbel_noise=None,
        output_hidden_states=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        """`LlavaModel.forward`, pruning the image of a prefill (arguments beyond the stock ones: class docstring)."""
        if self.config.pruning_method == "none":  # the stock forward: compile, static caches, every output flag
            self.last_pruning_info = None  # nothing pruned (a model switched to "none" keeps no older run's info)
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
                mm_encoder_outputs=mm_encoder_outputs, **_given(use_cache=use_cache, output_hidden_states=output_hidden_states),
                **kwargs)
        return self._pruned_forward(
            _compiling=torch.compiler.is_compiling(),  # said there, eagerly: Dynamo would trace the warning's call
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, labels=labels, question_mask=question_mask,
            answer_mask=answer_mask, visual_keep_masks=visual_keep_masks, gumbel_temperature=gumbel_temperature,
            gumbel_noise=gumbel_noise, output_hidden_states=output_hidden_states, **kwargs)

    # Under `torch.compile` the pruned forward runs eagerly (a graph break at this call; the head and anything around
    # the model stay compiled): its sequence lengths follow the kept sets, and its prefill state -- the selector, the
    # pruning points' compaction, the layers' borrowed inputs -- lives in Python objects that Dynamo traced into wrong
    # shapes (FastV: a size mismatch) or an Inductor failure (RCP's prior) in torch 2.13. Eager is what is tested.
    # (No `reason=`: setup.cfg allows torch 2.4, whose `disable` takes none.)
    @torch.compiler.disable
    def _pruned_forward(self, input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds,
                        vision_feature_layer, vision_feature_select_strategy, image_sizes, mm_encoder_outputs,
                        use_cache, labels, question_mask, answer_mask, visual_keep_masks, gumbel_temperature,
                        gumbel_noise, output_hidden_states, _compiling=False, **kwargs):
        if _compiling:
            logger.warning_once(
                f"torch.compile: `pruning_method={self.config.pruning_method!r}` runs the pruned forward eagerly (its "
                "shapes follow the kept sets), so compiling it gives the same outputs and no speed-up there; "
                "`pruning_method='none'` is the stock forward and compiles."
            )
        self._check_config()
        self._check_text_backbone()
        return_dict = kwargs.pop("return_dict", None)
        layer_kwargs = {k: v for k, v in kwargs.items() if k not in _MODEL_ONLY_KWARGS}
        cache_asked = use_cache is True  # by the caller, not the config's default (a training forward's)
        cache_given = past_key_values is not None
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if use_cache and self.training and getattr(self.language_model, "gradient_checkpointing", False):
            # as stock's text model decides (`merge_with_config_defaults`): its checkpointed layers fill no cache
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`.")
            use_cache = False
        if use_cache and past_key_values is None:  # in train mode too, as stock (RCP's training layout fills none)
            past_key_values = RcpDynamicCache(config=self.config.text_config)
        # A cache the caller passed is read and filled whatever `use_cache` says, as stock's text model does (a decode
        # step given its cache with `use_cache=False`, or a config saved with `use_cache: false`, ran without it).
        selector = SELECTORS[self.config.pruning_method](self) if self._pruning_active() else None
        inputs_embeds, image_features, image_mask = self._embed(
            input_ids, pixel_values, inputs_embeds, vision_feature_layer, vision_feature_select_strategy, image_sizes,
            mm_encoder_outputs, selector)
        past_length, state = _seen_tokens(past_key_values)  # in input tokens; the state of a pruned prefill or None
        window = sliding_window_of(self.config.text_config)
        if window is not None and past_length + inputs_embeds.shape[1] > window:
            # Up to the window a sliding-window mask is the causal mask, which the loops build; past it, stock masks
            # out the older keys by position, which a pruned sequence no longer has (its slots are not positions).
            raise ValueError(
                f"This text backbone uses sliding-window attention (window {window} tokens), and this forward spans "
                f"{past_length + inputs_embeds.shape[1]} tokens ({past_length} cached + {inputs_embeds.shape[1]} "
                f"new): `pruning_method={self.config.pruning_method!r}` runs its own decoder loop, which does not "
                f"build windowed masks, so past the window its outputs would differ from the stock model's. Keep "
                f"prompt + generated tokens within {window}, or use `pruning_method='none'` (the stock forward)."
            )
        if position_ids is not None and attention_mask is None and past_key_values is None:
            # Stock reads packed sequences (positions that restart inside a row: padding-free training) from the
            # positions under these conditions and keeps them apart; this loop builds one causal mask per row.
            packed = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1))
            if packed is not None:
                raise ValueError(
                    "`position_ids` restart inside a row (packed sequences, as padding-free training packs them): "
                    f"`pruning_method={self.config.pruning_method!r}` runs its own decoder loop, which builds one "
                    "causal mask per row, so the packed sequences would attend to each other. Pad the batch instead "
                    "(one sequence per row, with `attention_mask`), or use `pruning_method='none'`."
                )
        position_ids = self._position_ids(position_ids, inputs_embeds, past_length)
        position_embeddings = self.language_model.rotary_emb(inputs_embeds, position_ids)  # (cos, sin), (B, T, hd)
        hidden_states = self._hidden_state_selection(output_hidden_states)

        output_attentions = kwargs.get("output_attentions")
        with _captured_attentions(self.language_model.layers, output_attentions, self.config) as attentions:
            if selector is not None and image_mask is not None:  # a prefill that carries an image: prune it
                run = self._start_prefill(selector, inputs_embeds, attention_mask, image_mask, labels, question_mask,
                                          answer_mask, visual_keep_masks, gumbel_temperature, gumbel_noise,
                                          past_key_values, past_length, use_cache, cache_given)
                if run.differentiable and cache_asked:
                    logger.warning_once(
                        "`use_cache=True` is ignored by the differentiable ('mask') pruning layout (RCP's plug-ins "
                        "training in train mode, or `model.pruning_layout('mask')`): it keeps every token in place "
                        "behind soft key weights, so `past_key_values` is None. To decode on, run outside "
                        "`pruning_layout('mask')`; in train mode, pass a cache (`past_key_values=DynamicCache()`, as "
                        "`generate` does) or call `model.eval()`."
                    )
                output = self._prefill_loop(run, inputs_embeds, position_embeddings, attention_mask, image_features,
                                            hidden_states, layer_kwargs)
            else:
                output = self._decode_loop(state, inputs_embeds, position_embeddings, attention_mask, image_features,
                                           past_key_values, past_length, use_cache, hidden_states, layer_kwargs)
        if attentions is not None:
            output["attentions"] = tuple(attentions)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    # -- the two loops ----------------------------------------------------------------------------

    def _prefill_loop(self, run, hidden, position_embeddings, attention_mask, image_features, hidden_states,
                      layer_kwargs):
        """The decoder over a prompt with an image: prune before each pruning layer, repair after each repair
        layer; the kept sets go to the output, `last_pruning_info` and (for decoding) the cache."""
        lm = self.language_model
        collected = ([hidden], [run.slot_orig]) if hidden_states is not None else None
        input_length = hidden.shape[1]
        # The prefill read every row's length once (PrunedPrefill): whether the prompt is padded is known here.
        padded = None if attention_mask is None else min(run.row_length) < input_length
        mask = self._layer_mask(hidden, attention_mask, run.cache, 0, padded)
        with run.attention(lm.config):
            for idx, layer in enumerate(lm.layers[: self.config.text_config.num_hidden_layers]):
                if idx in run.points:
                    hidden, position_embeddings, mask = run.prune(idx, layer, hidden, position_embeddings, mask)
                run.record_retention()
                run.selector.observe_layer_input(idx, hidden)
                with run.given_inputs(idx, layer):
                    hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                   position_ids=None, past_key_values=run.cache, use_cache=run.use_cache,
                                   **run.layer_kwargs(), **layer_kwargs)
                adapter = self._repair_adapter(idx)
                if adapter is not None:
                    hidden = run.repair(idx, adapter, hidden)
                if collected:
                    collected[0].append(hidden)
                    collected[1].append(run.slot_orig)
        hidden = lm.norm(hidden)
        if collected:  # the last entry is the final norm's output, as stock's (transformers 5 swaps it in)
            collected[0][-1] = hidden
        info = self.last_pruning_info = run.info()
        if self._generate_prefill is not None and not self._generate_prefill:
            self._generate_prefill.append(info)  # the first pruned forward of a `generate` call: its prompt's
        if run.cache is not None:
            # A cache passed by the user (a plain or a quantized one): make it report the input tokens it has seen
            # (after a pre-LLM prune layer 0 holds fewer), or continuing generation from it would feed the last ones
            # again at later positions (a `QuantizedCache` continuation was 0.06 off in its logits).
            run.cache.__class__ = _rcp_cache_class(type(run.cache))
            run.cache.rcp_state = run.decode_state(input_length)
        return RcpLlavaModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=run.cache,
            hidden_states=_select(collected, 0, hidden_states),
            image_hidden_states=image_features,
            token_positions=run.slot_orig,
            kept_indices=info.kept_indices,
            kept_counts=info.kept_counts,
            keep_masks=info.keep_masks,
            hidden_state_positions=_select(collected, 1, hidden_states),
            layer_retention=torch.stack(run.retention, dim=1),  # (B, num_layers)
            has_image=info.has_image,
        )

    def _decode_loop(self, state, hidden, position_embeddings, attention_mask, image_features, cache, past_length,
                     use_cache, hidden_states, layer_kwargs):
        """The decoder without pruning: a plain forward (state None) or a step after a pruned prefill, whose
        pruned segments read their stored key masks and whose repair layers their stored contexts."""
        lm = self.language_model
        bsz, seq = hidden.shape[:2]
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(bsz, -1)
        if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and attention_mask.shape[1] >= seq:
            # -1 for padding, as a pruned prefill's: a batch's padding read the same with or without an image row
            positions = torch.where(attention_mask[:, -seq:].bool(), positions, -1)
        collected = ([hidden], [positions]) if hidden_states is not None else None
        if state is None or not state.segment_masks:
            masks = {0: self._layer_mask(hidden, attention_mask, cache, 0)}
        else:
            masks = self._decode_segment_masks(hidden, attention_mask, cache, state)
        repair = state is not None and self._pruning_active()
        answer = state.has_image.unsqueeze(1).expand(bsz, seq) if repair else None  # every decoded position
        mask = masks[0]
        for idx, layer in enumerate(lm.layers[: self.config.text_config.num_hidden_layers]):
            mask = masks.get(idx, mask)  # a new key segment starts at idx
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=None,
                           past_key_values=cache, use_cache=use_cache, **layer_kwargs)
            adapter = self._repair_adapter(idx)
            if adapter is not None and repair and idx in state.repair_contexts:
                hidden = adapter(hidden, state.repair_contexts[idx], answer)
            if collected:
                collected[0].append(hidden)
                collected[1].append(positions)
        hidden = lm.norm(hidden)
        if collected:  # the last entry is the final norm's output, as stock's
            collected[0][-1] = hidden
        if state is None:  # a decode step keeps its prefill's info; anything else has none
            self.last_pruning_info = None
        if cache is not None and past_length == 0:
            cache.rcp_state = None  # a new prompt without pruning: forget an older state
        unpruned = {}
        if state is None and past_length == 0 and self._pruning_active():
            # A prompt batch without an image, under a pruning method: the pruning fields a mixed batch gives its
            # text rows (nothing kept, no image), so that every batch has the same outputs (`Trainer.predict`
            # concatenates them field by field: a text-only batch shifted `token_positions` into another's place).
            points, n = len(self.config.pruning_points), self.config.num_visual_tokens
            unpruned = dict(kept_counts=hidden.new_zeros(bsz, points, dtype=torch.long),
                            keep_masks=hidden.new_zeros(bsz, points, n, dtype=torch.bool),
                            layer_retention=hidden.new_zeros(bsz, self.config.text_config.num_hidden_layers,
                                                             dtype=torch.float32),  # as `record_retention`'s
                            has_image=hidden.new_zeros(bsz, dtype=torch.bool))
        return RcpLlavaModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=_select(collected, 0, hidden_states),
            image_hidden_states=image_features,
            token_positions=positions,
            hidden_state_positions=_select(collected, 1, hidden_states),
            **unpruned,
        )

    # -- before the loops ---------------------------------------------------------------------------

    def _check_config(self):
        """Re-validate the config (a field may have been edited since construction) and check that the plug-ins
        built with the model match it."""
        config = self.config
        config.validate_pruning()
        if config.pruning_spec.prunes and config.pruning_method not in SELECTORS:
            raise ValueError(
                f"`pruning_method={config.pruning_method!r}` has a config spec but no token selector: register the "
                "method with `modeling_rcp_llava.register_pruning_method(MySelector)`."
            )
        if not config.pruning_spec.plugins:
            return
        plugins = self.rcp_plugins
        modules = [(f"pruners.{k}", m, RcpPruner) for k, m in plugins.pruners.items()]
        modules += [(f"repair_adapters.{k}", m, RcpRepairAdapter) for k, m in plugins.repair_adapters.items()]
        if plugins.repair_context is not None:
            modules.append(("repair_context", plugins.repair_context, RcpRepairContext))
        wrapped = [(name, module) for name, module, cls in modules if not isinstance(module, cls)]
        if wrapped:  # PEFT's `target_parameters` puts a wrapper in the module's place: its parameters are read by name
            raise TypeError(
                f"The plug-in module(s) {[name for name, _ in wrapped]} were replaced by "
                f"{type(wrapped[0][1]).__name__} (PEFT's `target_parameters`?): the pruned forward reads their "
                "parameters directly. Target the plug-ins' linear layers (`target_modules`), train them whole "
                "(`modules_to_save=['rcp_plugins']`), or train them without PEFT (only the plug-ins train by default)."
            )
        for name, built in (("pruning_layers", self.rcp_plugins.pruners),
                             ("repair_layers", self.rcp_plugins.repair_adapters)):
            if [int(k) for k in built] != list(getattr(config, name)):
                raise ValueError(
                    f"`{name}` is {getattr(config, name)}, but this model's plug-ins were built for "
                    f"{[int(k) for k in built]}: plug-ins are created with the model. Build a new model with these "
                    f"fields (e.g. `from_pretrained(..., {name}=...)`) instead of editing the config."
                )
        built = {}
        pruner = next(iter(self.rcp_plugins.pruners.values()), None)
        if pruner is not None:
            built.update(pruner_hidden_size=pruner.queries.shape[1], num_pruning_queries=pruner.queries.shape[0],
                         pruner_num_heads=pruner.num_heads)
        adapter = next(iter(self.rcp_plugins.repair_adapters.values()), None)
        if adapter is not None:
            built["repair_bottleneck_size"] = adapter.down.out_features
        edited = {name: size for name, size in built.items() if getattr(config, name) != size}
        if edited:  # the plug-ins keep their built sizes: a save would write a config its weights do not fit
            name, size = next(iter(edited.items()))
            raise ValueError(
                f"`{name}` is {getattr(config, name)}, but this model's plug-ins were built with {size}: plug-in sizes "
                f"are fixed when the model is built. Build a new model with it (e.g. `from_pretrained(..., "
                f"{name}={getattr(config, name)})`) instead of editing the config, or set it back to {size}."
            )
        context = self.rcp_plugins.repair_context
        if context is not None and context.positions.shape[0] != config.num_visual_tokens:
            # Eq. 9's position table has a row per visual token: N is fixed with it (an edited
            # `vision_feature_select_strategy` or vision tower would fail deep in the repair context).
            raise ValueError(
                f"The config gives {config.num_visual_tokens} visual tokens per image (from `vision_config` and "
                f"`vision_feature_select_strategy={config.vision_feature_select_strategy!r}`), but this model's repair "
                f"context was built for {context.positions.shape[0]} (one position row per token, Eq. 9). Build a new "
                "model with these fields instead of editing the config, or set them back."
            )

    def _check_text_backbone(self):
        """ValueError naming the backbone when the pruned forward cannot run it as stock would
        (`text_backbone_problem`); checked once per method (the layers do not change)."""
        method = self.config.pruning_method
        if method in self._backbone_checked:
            return
        selector = SELECTORS.get(method)
        reads = bool(getattr(selector, "reads_attention", False)) or self.config.pruning_spec.plugins
        problem = text_backbone_problem(self.language_model, reads)
        if problem is not None:
            text = self.config.text_config
            raise ValueError(
                f"`pruning_method={method!r}` cannot run on this text backbone ({type(self.language_model).__name__}, "
                f"model_type {getattr(text, 'model_type', None)!r}): {problem}. Pruning runs its own decoder loop"
                f"{' and recomputes their attention' if reads else ''}, written for Llama-like decoders "
                "(Llama, Mistral, Qwen2, Qwen3, Gemma). Use `pruning_method='none'` (the stock forward) with this "
                "backbone."
            )
        self._backbone_checked.add(method)

    def _pruning_active(self):
        return self.config.pruning_spec.prunes and self.pruning_enabled

    def _plugins_train(self):
        return self.config.pruning_spec.plugins and any(p.requires_grad for p in self.rcp_plugins.parameters())

    def _repair_adapter(self, layer_idx):
        if not self.repair_enabled:
            return None
        return self.rcp_plugins.repair_adapters[str(layer_idx)] if str(layer_idx) in \
            self.rcp_plugins.repair_adapters else None

    def compile_selection(self, enabled=True, **compile_kwargs):
        """Compile each pruning method's token choice -- its selector's `keep`, some 180 small ops per pruning point
        for RCP -- with `torch.compile(**compile_kwargs)` (defaults `fullgraph=True`: a graph break fails the compile
        rather than run part of it eagerly; `dynamic=False`: a graph per shape, whose integers -- the layer, the keep
        count -- stay constants), in inference forwards (gradients off); `enabled=False` goes back to eager, and its
        keyword arguments are ignored. Returns the model.

        Why a method of its own: the rest of the pruned forward runs eagerly whatever `torch.compile(model)` does
        (its shapes follow the kept sets: `_pruned_forward`), and on a GPU at small batch sizes the host's dispatch
        of the selection's ops takes longer than their kernels (issue 19); fused, they are a few kernels. The kept
        sets are eager selection's up to the fused kernels' rounding, which can break a near tie.

        Each new shape -- prompt length, batch size, and with RCP's adaptive threshold the kept counts -- compiles
        one graph per pruning point, and a method whose `keep` cannot be compiled (a graph break in a selector of
        your own, Dynamo's recompile limit reached: 8 graphs per function by default,
        `torch._dynamo.config.recompile_limit`) selects eagerly from then on, with a warning naming it: the outputs
        stay eager's. Forward hooks on the modules selection calls are traced once (those added later do not run
        inside the compiled selection, and removed ones still do)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"`enabled` must be True or False, got {enabled!r}; torch.compile's options go as "
                            "keyword arguments (e.g. `compile_selection(backend='inductor', mode='max-autotune')`).")
        if enabled:
            kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
            if kwargs != self._selection_compile_kwargs:  # a compiled function is bound to its options
                self._selection_compile_kwargs, self._compiled_selection = kwargs, {}
        self.selection_compiled = enabled
        return self

    def _compiled_keep(self, selector, ctx):
        """`selector.keep(ctx)` through its compiled function (`compile_selection`); eagerly, with a warning, once
        the method cannot be compiled (then never tried again: each failed attempt costs a trace)."""
        import torch._dynamo  # noqa: F401 -- the exception classes below

        compiled, cls = self._compiled_selection, type(selector)
        if cls not in compiled:  # compiled once per method; Dynamo keeps a graph per shape under it
            compiled[cls] = torch.compile(cls.keep, **self._selection_compile_kwargs)
        if compiled[cls] is None:
            return selector.keep(ctx)
        if ctx.prefill.question_width is None:
            # a question token among the image tokens: its slots are counted on the host (a graph break), so here
            ctx.question_slots()
        errors = tuple(getattr(torch._dynamo.exc, name) for name in ("TorchDynamoException", "FailOnRecompileLimitHit")
                       if hasattr(torch._dynamo.exc, name))
        try:
            return compiled[cls](selector, ctx)
        except errors as err:
            compiled[cls] = None
            logger.warning(f"compile_selection: {cls.__name__}.keep could not be compiled ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0][:200]}); this model selects with it eagerly from now "
                           "on (the same outputs, without the speed-up).")
            return selector.keep(ctx)

    def _select_tokens(self, selector, ctx):
        """The one call of every selection decision (profilers wrap it): (B, K) bool, the tokens kept. A selector
        of the user's that returns something else is named here (metadata only: no host sync), not deep in the
        compaction."""
        if self.selection_compiled and not ctx.prefill.differentiable and not torch.is_grad_enabled():
            keep = self._compiled_keep(selector, ctx)
        else:
            keep = selector.keep(ctx)
        expected = tuple(ctx.valid.shape)
        if not torch.is_tensor(keep) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
            got = f"{keep.dtype} {tuple(keep.shape)}" if torch.is_tensor(keep) else type(keep).__name__
            raise TypeError(f"{type(selector).__name__}.keep must return a bool tensor of shape {expected} (batch, "
                            f"alive visual tokens), got {got}; from `scores`, return one score per alive token.")
        return keep

    def _embed(self, input_ids, pixel_values, inputs_embeds, vision_feature_layer, vision_feature_select_strategy,
               image_sizes, mm_encoder_outputs, selector):
        """Token embeddings with the projected image features scattered in, as stock LLaVA does. Returns
        `(inputs_embeds, image_features, image_mask)`: the mask (B, T) of the image tokens, taken before the features
        are scattered in (so the `inputs_embeds` path finds them too), or None when no image came with the call
        (`pixel_values` or precomputed `mm_encoder_outputs`): image-token ids without an image are plain text."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both `pixel_values` and `mm_encoder_outputs` at the same time.")
        if pixel_values is not None:
            _check_pixel_values(pixel_values, self.config.vision_config)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is None:
            return inputs_embeds, None, None
        vision_feature_layer = (
            vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        )
        vision_feature_select_strategy = (
            vision_feature_select_strategy
            if vision_feature_select_strategy is not None
            else self.config.vision_feature_select_strategy
        )
        if selector is not None and vision_feature_select_strategy != self.config.vision_feature_select_strategy:
            # The image's token count follows the strategy ('full' keeps CLS): the processor, the plug-ins and
            # every count were sized by the config's. It failed below as "a row holds 17 image tokens".
            raise ValueError(
                f"`vision_feature_select_strategy={vision_feature_select_strategy!r}` differs from the config's "
                f"{self.config.vision_feature_select_strategy!r}, whose {self.config.num_visual_tokens} visual tokens "
                "the pruning is sized for. Set it in the config when the model is built (`from_pretrained(..., "
                f"vision_feature_select_strategy={vision_feature_select_strategy!r})`: RCP's plug-ins are sized by "
                "it, so trained plug-ins need the strategy they were trained with), or run with "
                "`pruning_method='none'`."
            )
        if image_outputs is None:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
            )
        if selector is not None:
            selector.observe_image_features(image_outputs, vision_feature_layer, vision_feature_select_strategy)
        image_features = torch.cat(image_outputs.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = self._image_token_mask(input_ids, inputs_embeds)
        n_tokens, n_features = int(image_mask.sum()), image_features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: `input_ids` holds {n_tokens} image tokens "
                f"(id {self.config.image_token_id}) but the image gave {n_features} features "
                f"({self.config.num_visual_tokens} per image). Build the inputs with the model's processor, "
                "which expands each <image> into one token per visual feature."
            )
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features), image_features, image_mask

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           image_sizes=None, **kwargs):
        """`LlavaModel.get_image_features`, plus the vision hidden states the pruning method reads (VisPruner: the
        feature layer and its input). `generate` calls this itself before the prefill (`mm_encoder_outputs`), passing
        only the arguments this signature names: `image_sizes` is one (a Pixtral tower reads it)."""
        if image_sizes is not None:
            kwargs["image_sizes"] = image_sizes
        layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        if "output_hidden_states" not in kwargs and self._pruning_active() and isinstance(layer, int):
            wanted = SELECTORS[self.config.pruning_method](self).vision_hidden_states(layer)
            if wanted:
                kwargs["output_hidden_states"] = wanted
        return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                          vision_feature_select_strategy=vision_feature_select_strategy, **kwargs)

    def _image_token_mask(self, input_ids, inputs_embeds):
        """(B, T) image-token positions, from the ids or, for `inputs_embeds`, from the image token's embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embed = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embed).all(-1)

    def _hidden_state_selection(self, output_hidden_states):
        """None (no hidden states), True (all) or the selected indices into the L + 1 hidden states, from the argument
        or the config, as stock models read `output_hidden_states`."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states or self.config.text_config.output_hidden_states
        if output_hidden_states is None or output_hidden_states is False:
            return None
        if output_hidden_states is True:
            return True
        total = self.config.text_config.num_hidden_layers + 1
        selected = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        return [i % total for i in selected if -total <= i < total]

    def _position_ids(self, position_ids, inputs_embeds, past_length):
        """RoPE positions: given, or continuing from the input tokens the cache has seen."""
        bsz, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_length).unsqueeze(0)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        return position_ids.expand(bsz, -1)

    def _start_prefill(self, selector, inputs_embeds, attention_mask, image_mask, labels, question_mask, answer_mask,
                       visual_keep_masks, gumbel_temperature, gumbel_noise, cache, past_length, use_cache,
                       cache_given=False):
        """Check that this prompt can be pruned, pick the layout, and build its `PrunedPrefill`. `cache_given`: the
        caller passed `past_key_values` (to decode on from it), rather than this forward making one for `use_cache`."""
        if past_length > 0:
            raise ValueError(
                "Pruning needs the image in a prefill that starts from an empty cache, but `past_key_values` already "
                f"holds {past_length} tokens. Start a new cache for each prompt with an image (PEFT's prefix tuning "
                "puts its virtual tokens there: use `pruning_method='none'` with it, or prompt tuning, which prepends "
                "them to the input)."
            )
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"Pruning is not supported with {type(cache).__name__}: layers after a pruning layer hold "
                "fewer tokens, but a static cache pre-allocates the same length for every layer. Use the default "
                "dynamic cache (leave `cache_implementation` unset)."
            )
        # The differentiable layout only where RCP's plug-ins train; anything else (baselines, a frozen pruner,
        # fine-tuning the backbone of a pruned model) prunes physically, in train mode too. So does a prefill given a
        # cache to fill (`generate`, or a caller who decodes on): the mask layout keeps every token in place behind
        # soft key weights and fills no cache, so decoding on would forget the prompt.
        layout = self.pruning_layout
        if layout is None and self.training and self._plugins_train():
            layout = "discard" if cache_given else "mask"
            if cache_given and torch.is_grad_enabled():
                raise ValueError(
                    "`past_key_values` was given to a training forward (train mode, RCP's plug-ins training, "
                    "gradients on): the differentiable layout fills no cache, and the physical one gives the pruners "
                    "no gradient. Drop `past_key_values` to train, or run under `torch.no_grad()` (as `generate` "
                    "does) or after `model.eval()` to decode."
                )
            if cache_given:
                logger.warning_once(
                    "RCP's plug-ins are in train mode, but this prefill fills a KV cache (`generate`, or a given "
                    "`past_key_values`), which the differentiable training layout cannot: it prunes physically, as "
                    "at inference, with the plug-ins' dropout on. Call `model.eval()` before generating for "
                    "deterministic pruning."
                )
        layout = layout or "discard"
        if layout not in ("mask", "discard"):
            raise ValueError(f"`pruning_layout` is {layout!r}; use 'mask', 'discard' or None.")
        if layout == "mask" and cache_given:
            raise ValueError(
                "A KV cache was given (`generate`, or `past_key_values`) to a prefill in the differentiable ('mask') "
                "pruning layout, which `model.pruning_layout('mask')` asked for: it keeps every token in place behind "
                "soft key weights and fills no cache, so decoding on would forget the prompt. Generate outside "
                "`pruning_layout('mask')`, or with `use_cache=False` (each step then runs the whole sequence)."
            )
        if layout == "mask" and not self.config.pruning_spec.plugins and visual_keep_masks is None:
            raise ValueError(
                f"The differentiable ('mask') pruning layout trains RCP's plug-ins, but "
                f"`pruning_method={self.config.pruning_method!r}` has none. Call `model.eval()` or set "
                "`model.model.pruning_layout = 'discard'`."
            )
        if layout == "mask" and any(getattr(l, "gradient_checkpointing", False) for l in self.language_model.layers):
            raise ValueError(
                "Gradient checkpointing is not supported in the differentiable ('mask') pruning layout: the "
                "recomputation in backward would run without the differentiable key mask. Disable it with "
                "`model.activation_checkpointing_disable()` (only the small plug-ins train)."
            )
        tau = self.config.gumbel_temperature  # checked with the config
        if gumbel_temperature is not None:
            check_gumbel_temperature(gumbel_temperature, "The `gumbel_temperature` argument")
            tau = gumbel_temperature
        if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2):
            shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            raise ValueError(
                f"`attention_mask` has shape {shape}; pruning reads the 2-D padding mask (batch, sequence) to know "
                "which tokens exist, and cannot follow a custom 4-D mask. Pass the 2-D mask, or run with "
                "`pruning_method='none'` (the stock forward takes 4-D masks)."
            )
        for name, mask in (("question_mask", question_mask), ("answer_mask", answer_mask)):
            if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != tuple(image_mask.shape)):
                shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
                raise ValueError(f"`{name}` has shape {shape}; it marks tokens of this input, so it must be "
                                 f"{tuple(image_mask.shape)} (batch, sequence) like `input_ids`.")
        key_valid = (attention_mask.bool() if attention_mask is not None
                     else torch.ones(image_mask.shape, dtype=torch.bool, device=inputs_embeds.device))
        noise = self.gumbel_noise if gumbel_noise is None else bool(gumbel_noise)
        return PrunedPrefill(self, selector, inputs_embeds, key_valid, image_mask, labels, question_mask, answer_mask,
                             visual_keep_masks, layout, tau, noise, cache, use_cache)

    def _layer_mask(self, hidden, key_mask, cache, layer_idx, padded=None):
        """The attention mask `create_causal_mask` builds for `key_mask` (B, kv) at `layer_idx`.

        `padded`: whether `key_mask` has a False, when the host knows it. transformers' sdpa and flash-attention
        builders read the mask from the device to find out (a host sync), sdpa to use its plain causal kernel where
        nothing is padded, flash to need no mask: given the answer, the same mask is built without reading it."""
        # position_ids=None: gathered positions have gaps and would be read as packed sequences.
        build = functools.partial(create_causal_mask, config=self.language_model.config, inputs_embeds=hidden,
                                  past_key_values=cache, position_ids=None, layer_idx=layer_idx)
        reader = self._mask_reader(hidden, key_mask, cache, layer_idx)
        if padded is None or reader is None:
            return build(attention_mask=key_mask)  # unknown, or no read to save
        if not padded:
            return build(attention_mask=None)  # all True: the mask of no key mask at all
        if reader is flash_attention_mask:
            return key_mask.to(device=hidden.device, dtype=torch.bool)  # what flash's builder returns for it
        return build(attention_mask=key_mask, allow_is_causal_skip=False)  # sdpa's, without the check

    def _mask_reader(self, hidden, key_mask, cache, layer_idx):
        """transformers' mask builder for this model's attention when it reads `key_mask` from the device (sdpa's,
        flash attention's; picked as `create_causal_mask` picks it: registered globally) and takes the mask as it
        is (2-D, spanning the layer's keys from the first: it would cut or pad another one first); else None."""
        name = self.language_model.config._attn_implementation
        if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping or key_mask is None or key_mask.dim() != 2:
            return None
        builder = ALL_MASK_ATTENTION_FUNCTIONS[name]
        if builder not in (sdpa_mask, flash_attention_mask):
            return None
        q_len = hidden.shape[1]
        length, offset = (q_len, 0) if cache is None else cache.get_mask_sizes(q_len, layer_idx)
        return builder if (length, offset) == (key_mask.shape[1], 0) else None

    def _decode_segment_masks(self, hidden, attention_mask, cache, state):
        """{layer: attention mask} of a decode step after a pruned prefill, for each layer that starts a key segment:
        layer 0 (unless a pre-LLM prune made it one) and each pruned segment, whose keys are its stored prefill mask
        followed by the new tokens' columns.

        Whether each key mask is padded is answered on the host where the prefill told it (`state.padded_segments`;
        the new columns are all True without an attention mask) and the other masks are read in one go where the
        builder would read them (sdpa, flash attention: `_layer_mask`): a step waits for the device at most once, as
        a stock step with an attention mask does, and not at all where the stock step does not (no attention mask,
        as `generate` passes for an unpadded prompt) -- except after a beam reorder of segments the prefill padded,
        which must be read again (the picked rows may all be full)."""
        q_len = hidden.shape[1]
        new_len = _physical_length(cache) + q_len - state.prefill_length
        if attention_mask is not None:
            new_cols = attention_mask[:, attention_mask.shape[1] - new_len:].bool()
        else:
            new_cols = torch.ones(hidden.shape[0], new_len, dtype=torch.bool, device=hidden.device)
        key_masks = {} if 0 in state.segment_masks else {0: attention_mask}
        for idx, prefill_mask in state.segment_masks.items():
            key_masks[idx] = torch.cat([prefill_mask, new_cols], dim=1)  # (B, T_s + new)
        padded = {}
        for idx in state.segment_masks:
            known = state.padded_segments.get(idx)
            if known is not None and (known or attention_mask is None):  # a padded prefill part stays padded
                padded[idx] = known
        # The masks the builder would read itself, read at once: one host sync for all of them.
        read = [idx for idx, key_mask in key_masks.items()
                if idx not in padded and self._mask_reader(hidden, key_mask, cache, idx) is not None]
        if read:
            padded.update(zip(read, (~torch.stack([key_masks[idx].all() for idx in read])).tolist()))
        return {idx: self._layer_mask(hidden, key_mask, cache, idx, padded.get(idx))
                for idx, key_mask in key_masks.items()}

    def _repair_context(self):
        """The adapters' shared context encoder, when this forward repairs (None otherwise: no context is built)."""
        plugins = self.rcp_plugins
        if not (self.repair_enabled and self.config.pruning_spec.plugins and plugins.repair_adapters):
            return None
        return plugins.repair_context


# -- plug-in-only checkpoints: file helpers ---------------------------------------------------------


def _resolve_plugin_file(path_or_repo_id, filename, hub_kwargs):
    """Local folder or Hub repo id -> local path of `filename` (the Hub is only contacted for a repo id)."""
    if os.path.isdir(path_or_repo_id):
        subfolder = hub_kwargs.get("subfolder") or ""
        path = os.path.join(path_or_repo_id, subfolder, filename)
        if not os.path.isfile(path):
            # the folder looked in: with `subfolder`, the root named alone sent the user to a folder never read
            where = (f"{path_or_repo_id!r} (subfolder {subfolder!r}: {os.path.dirname(path)!r})" if subfolder
                     else repr(path_or_repo_id))
            raise FileNotFoundError(
                f"{where} has no {filename}: it is not an RCP plug-in folder (written by "
                "`model.save_plugins(folder)`)."
            )
        return path
    check_model_source(path_or_repo_id, "plugins")  # a mistyped local path: named, not "Repo id must be ..."
    from transformers.utils import cached_file

    return cached_file(path_or_repo_id, filename, **hub_kwargs)


def check_safetensors_file(path):
    """ValueError naming `path` unless its safetensors header is whole and covers the file (a truncated download
    or an interrupted copy), read from the header alone, before any weight is loaded."""
    if _safe_open is None:  # pragma: no cover
        return
    try:
        with _safe_open(path, framework="pt"):
            pass
    except Exception as err:  # SafetensorError is not importable by name across safetensors versions
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt. Download "
                         "or save it again.") from None


# What a plug-in checkpoint's rcp_config.json says about its tensors: fingerprinted in the weights' metadata. The base
# model's name, its revision and the versions stay out (editing them by hand, for a moved base folder, is no
# mismatch); the names hashed are recorded beside the digest, so another release's field list reads it the same.
_DIGEST_FIELDS = (*PRUNING_FIELDS, "hidden_size", "num_hidden_layers", "num_visual_tokens")


def _config_digest(record, names=_DIGEST_FIELDS):
    """The fingerprint of `record`'s fields `names` (JSON, sorted keys)."""
    fields = {k: record.get(k) for k in names}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def check_plugin_files(plugins, hub_kwargs):
    """The weights file of plug-in checkpoint `plugins`, checked before any weight is read: its safetensors header
    (`check_safetensors_file`), and that it was saved with the rcp_config.json beside it. The two are renamed into
    place one after the other, so a `save_plugins` interrupted between them (or files mixed by hand) paired new
    weights with the previous config, and they loaded silently under the wrong placement or counts. Checkpoints
    saved before the fingerprint was recorded are taken as they are."""
    weights = _resolve_plugin_file(plugins, RCP_PLUGINS_NAME, hub_kwargs)
    check_safetensors_file(weights)
    if _safe_open is None:  # pragma: no cover
        return weights
    with _safe_open(weights, framework="pt") as f:
        metadata = f.metadata() or {}
    recorded = metadata.get("rcp_config_sha256")
    if recorded is not None:
        config = _resolve_plugin_file(plugins, RCP_CONFIG_NAME, hub_kwargs)
        names = metadata.get("rcp_config_fields")
        names = names.split(",") if names else _DIGEST_FIELDS
        if _config_digest(read_json_file(config), names) != recorded:
            raise ValueError(
                f"{weights} was saved with another {RCP_CONFIG_NAME} than {config} beside it (its pruning fields or "
                "sizes differ: an interrupted `save_plugins`, or files of two checkpoints mixed): save the plug-ins "
                "again."
            )
    return weights


def read_json_file(path):
    """`json.load` of `path`; invalid JSON raises a ValueError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it is truncated or was edited by hand. Write it again "
                         "(`model.save_plugins(folder)`).") from None


def read_plugin_config(path_or_repo_id, **hub_kwargs):
    """The rcp_config.json of a plug-in checkpoint as a dict; unknown keys are reported with a warning."""
    path = _resolve_plugin_file(path_or_repo_id, RCP_CONFIG_NAME, hub_kwargs)
    plugin_config = read_json_file(path)
    if not isinstance(plugin_config, dict):
        raise ValueError(f"{path} holds a JSON {type(plugin_config).__name__}, not the object `save_plugins` writes: "
                         "it was edited or replaced. Write it again (`model.save_plugins(folder)`).")
    if plugin_config.get("format", RCP_PLUGINS_FORMAT) != RCP_PLUGINS_FORMAT:
        raise ValueError(f"{path} has `format` {plugin_config['format']!r}, expected {RCP_PLUGINS_FORMAT!r}.")
    unknown = sorted(set(plugin_config) - set(PRUNING_FIELDS) - set(_PLUGIN_META_KEYS))
    if unknown:
        logger.warning(f"{RCP_CONFIG_NAME} of {path_or_repo_id!r} has unknown keys {unknown}; they are ignored.")
    return plugin_config


def _check_pixel_values(pixel_values, vision_config):
    """ValueError unless `pixel_values` is (num_images, channels, height, width) with the vision tower's channels."""
    channels = getattr(vision_config, "num_channels", 3)
    if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
        raise ValueError(
            f"`pixel_values` must be (num_images, {channels}, height, width), got {shape}. Use the processor's output "
            "(`processor(images=..., text=..., return_tensors='pt')`); add a batch dimension to a single image with "
            "`.unsqueeze(0)`."
        )


def looks_like_local_path(path):
    """Whether `path` reads as a local path rather than a Hub repo id ('name' or 'user/name'): absolute, ./, ../, ~
    or more than one '/'."""
    path = os.fspath(path)
    return os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1


def check_model_source(name_or_path, argument):
    """Refuse a local folder whose weights are pickle files only (ValueError) and a local-looking path that does not
    exist (FileNotFoundError: absolute, ./, ../, ~ or more than one '/'); Hub repo ids pass through."""
    if name_or_path is None or not isinstance(name_or_path, (str, os.PathLike)):
        return
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        files = os.listdir(path)
        for name in sorted(f for f in files if f.endswith(".safetensors")):
            check_safetensors_file(os.path.join(path, name))  # headers only: truncation named before loading
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(
                f"`{argument}` {path!r} holds only pickle weights ({', '.join(pickles)}); rcp-llava loads safetensors "
                "only, since a pickle file can run code when it is loaded. Convert it once, in an environment you "
                "trust: `LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=False)"
                ".save_pretrained(new_path)`."
            )
    elif os.path.isfile(path):
        raise ValueError(f"`{argument}` {path!r} is a file; pass the folder that holds it "
                         f"({os.path.dirname(path) or '.'!r}).")
    elif looks_like_local_path(path):
        raise FileNotFoundError(
            f"`{argument}` {path!r}: no such folder (and it is not a Hub repo id of the form 'user/name'). Check the "
            "path."
        )


# The config fields that decide the plug-in tensors and how they compute: saving plug-ins (`save_plugins`) or a model
# (`save_pretrained`) over a folder whose trained plug-ins differ in one of them would lose those plug-ins.
_PLUGIN_LAYOUT = ("pruning_layers", "repair_layers", "pruner_hidden_size", "num_pruning_queries", "pruner_num_heads",
                  "repair_bottleneck_size")
# ... and, for a plug-in-only checkpoint, the model and method they were trained for.
_PLUGIN_IDENTITY = ("base_model_name_or_path", "hidden_size", "num_hidden_layers", "num_visual_tokens", "pruning_method",
                    *_PLUGIN_LAYOUT)


def _refuse_other_plugins(config_path, record):
    """FileExistsError if `config_path` describes plug-ins of another model than `record` (or cannot be read)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            existing = json.load(f)
    except (OSError, ValueError) as err:
        existing = {"unreadable": str(err)}
    else:
        if not isinstance(existing, dict):
            existing = {"unreadable": f"a JSON {type(existing).__name__}, not an object"}
        else:  # a field an older release did not write reads as the default it was built with, not as None
            existing = {**{k: getattr(RcpLlavaConfig, k) for k in _PLUGIN_LAYOUT if k not in existing}, **existing}
    folder = os.path.dirname(config_path)
    if "unreadable" in existing:
        raise FileExistsError(
            f"{folder!r} holds a {RCP_CONFIG_NAME} that cannot be read ({existing['unreadable']}), so this save cannot "
            "tell whether it would replace other plug-ins. Fix or remove it, save elsewhere, or pass `overwrite=True`."
        )
    differs = [k for k in _PLUGIN_IDENTITY if existing.get(k) != record.get(k)]
    if differs:
        changes = ", ".join(f"{k}: {existing.get(k)!r} -> {record.get(k)!r}" for k in differs)
        raise FileExistsError(
            f"{folder!r} already holds plug-ins of another model ({changes}). Save them elsewhere, or pass "
            "`overwrite=True` to replace them."
        )


def _model_identity(config_dict):
    """What makes two saved LLaVA models "the same model" for `save_pretrained`'s refusal: the architecture's
    shape (re-saving a model after more training replaces it; saving another model over it needs `overwrite`)."""
    text, vision = config_dict.get("text_config") or {}, config_dict.get("vision_config") or {}
    return {
        "text hidden_size": text.get("hidden_size"), "text num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"), "vision hidden_size": vision.get("hidden_size"),
        "vision num_hidden_layers": vision.get("num_hidden_layers"), "image_size": vision.get("image_size"),
        "patch_size": vision.get("patch_size"),
    }


_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def _saved_plugin_keys(folder):
    """{weights family: its plug-in tensor names (from `rcp_plugins.` on)} of the model weights saved in `folder`
    (`model`, and each variant such as `model.fp16`), read from the safetensors headers or the shards' index;
    families without plug-ins (a stock model's) are left out."""
    families = {}
    for name in sorted(os.listdir(folder)):
        family, path = _weight_family(name), os.path.join(folder, name)
        if family is None or not family.startswith("model") or name == RCP_PLUGINS_NAME:
            continue
        try:
            if name.endswith(".index.json"):
                keys = list((read_json_file(path).get("weight_map") or {}).keys())
            elif name.endswith(".safetensors") and _safe_open is not None:
                with _safe_open(path, framework="pt") as f:
                    keys = list(f.keys())
            else:
                continue
        except Exception as err:  # a git-lfs pointer, a half download: SafetensorError is not importable by name
            raise FileExistsError(f"{folder!r}: {name} cannot be read ({err}), so this save cannot tell whether it "
                                  "would replace trained RCP plug-ins in it. Fix or remove the file, save elsewhere, "
                                  "or pass `overwrite=True`.") from None
        families.setdefault(family, set()).update(_plugin_names(keys))
    return {family: keys for family, keys in families.items() if keys}


def _plugin_names(keys):
    """The plug-in names among state-dict `keys`, from "rcp_plugins." on: the outer model saves them under
    `PLUGIN_PREFIX`, the bare `RcpLlavaModel` (`AutoModel`) without its "model."."""
    marker = PLUGIN_PREFIX[len("model."):]
    return {k[k.index(marker):] for k in keys if marker in k}


def _refuse_other_model(folder, config, overwrite, plugin_keys=None):
    """FileExistsError if `folder` holds the weights of another model than `config` (or weights without a config),
    or trained plug-ins that this save would replace with others (`plugin_keys`: the names this model saves, from
    `rcp_plugins.` on): another placement, size or head count. A plug-in-only checkpoint in the folder
    (`save_plugins`) is no model weights: it stays, untouched."""
    if overwrite or not os.path.isdir(folder):
        return
    weights = sorted(f for f in os.listdir(folder) if f.endswith(_WEIGHT_SUFFIXES) and f != RCP_PLUGINS_NAME)
    if not weights:
        return
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            existing_dict = json.load(f)
        existing = _model_identity(existing_dict)
    except (OSError, ValueError, AttributeError):
        existing = None
    new_dict = config.to_dict()
    new = _model_identity(new_dict)
    if existing == new:
        saved = _saved_plugin_keys(folder) if plugin_keys is not None else {}
        if not saved:
            return
        try:  # fields an older release did not write read as their defaults, not as None
            existing_dict = RcpLlavaConfig.from_dict(existing_dict).to_dict()
        except (TypeError, ValueError):
            pass
        layout = [k for k in _PLUGIN_LAYOUT if existing_dict.get(k) != new_dict.get(k)]
        differ = {family: keys for family, keys in saved.items() if keys != set(plugin_keys)}
        if not differ and not layout:
            return
        lost = max((len(keys - set(plugin_keys)) for keys in differ.values()), default=0)
        changes = ", ".join(f"{k}: {existing_dict.get(k)!r} -> {new_dict.get(k)!r}" for k in layout) or (
            f"{lost} of its plug-in tensors would go" if lost else "other plug-in tensors")
        raise FileExistsError(
            f"{folder!r} already holds the weights of a model with other trained RCP plug-ins ({changes}); this save "
            "would replace them. Save elsewhere, keep them with `save_plugins` first, or pass `overwrite=True`."
        )
    changes = ("no readable config.json describes them" if existing is None else ", ".join(
        f"{k}: {existing[k]!r} -> {new[k]!r}" for k in new if existing[k] != new[k]))
    raise FileExistsError(
        f"{folder!r} already holds the weights of another model ({', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''}; "
        f"{changes}). Save elsewhere, or pass `overwrite=True` to replace them."
    )


# A weight file's family: its name without shard number and extension (`model`, `model.fp16`), and an index's the
# weights it indexes (`model.safetensors.index.fp16.json` -> `model.fp16`), as transformers names them.
_SHARD_NAME = re.compile(r"(?P<stem>.+?)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)")
_INDEX_NAME = re.compile(r"(?P<stem>.+?)\.(?:safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json")


def _weight_family(name):
    index = _INDEX_NAME.fullmatch(name)
    if index:
        return index["stem"] + (f".{index['variant']}" if index["variant"] else "")
    shard = _SHARD_NAME.fullmatch(name)
    return shard["stem"] if shard else None


SAVE_STAGING_PREFIX = ".rcp-save-"  # + pid: `save_pretrained`'s staging folder, inside the target folder


def _remove_dead_staging(folder):
    """Remove staging folders that a killed `save_pretrained` (SIGKILL, out of memory) left in `folder`: partial
    weights that an upload of the folder would send. One whose process still runs is another save in progress."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        pid = name[len(SAVE_STAGING_PREFIX):]
        if not (name.startswith(SAVE_STAGING_PREFIX) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        except OSError:  # alive under another user (PermissionError): not ours to remove
            continue


def _move_saved_folder(staging, folder):
    """Move every file of a finished `save_pretrained` in `staging` into `folder`, each with an atomic rename,
    weights first and `config.json` last (a crash in between leaves weights that no config describes yet, never
    a config describing missing weights), then remove the stale files of the weights just written (other shards
    or index of an earlier save of the same name and variant; weights of another name or variant stay)."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda f: (not f.endswith(_WEIGHT_SUFFIXES), f == "config.json", f))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    written = {_weight_family(n) for n in names} - {None}
    for name in os.listdir(folder):
        if name not in names and name.endswith(_WEIGHT_SUFFIXES) and _weight_family(name) in written:
            os.remove(os.path.join(folder, name))


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write(path, write):
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path` (removed on failure): the one
    atomic write of the project (plug-ins here; metrics and results in `train_rcp.py` and the testbed builder)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _holds_peft_adapter(module):
    """Whether `module` is a PEFT tuner layer that still holds an adapter (a deleted adapter leaves an empty wrapper,
    which computes its base layer)."""
    return hasattr(module, "base_layer") and any(len(getattr(module, name, ()))
                                                 for name in getattr(module, "adapter_layer_names", ()))


def share_backbone(target, source):
    """Give `target` (a LLaVA built on the meta device) `source`'s vision tower, projector, language model, LM head
    and generation config: the same modules, no copy (one backbone under several configs). Adapters transformers'
    PEFT integration put in those modules (`add_adapter`, `load_adapter`) come with their state (`peft_config`):
    without it the target held the LoRA layers but no adapter, `active_adapters()` said none was loaded, and
    `save_pretrained` wrote PEFT-named full weights that reloaded with random q/v projections. Adapter layers a
    `PeftModel` injected (no such state on the model) are refused: no save of the target could restore them."""
    if getattr(source, "_hf_peft_config_loaded", False):
        target._hf_peft_config_loaded = True
        target.peft_config = source.peft_config
    elif any(_holds_peft_adapter(m) for m in source.modules()):
        raise TypeError(
            f"The {type(source).__name__} holds PEFT adapter layers that a `PeftModel` injected (e.g. the model of "
            "`peft_model.get_base_model()`): merge them first (`peft_model.merge_and_unload()`), or build the RCP "
            "model on the plain base and wrap it with PEFT afterwards."
        )
    for attr in ("vision_tower", "multi_modal_projector", "language_model"):
        setattr(target.model, attr, getattr(source.model, attr))
    target.lm_head = source.lm_head
    target.generation_config = copy.deepcopy(source.generation_config)


def _own_name(model):
    """`model.name_or_path`, unless `from_base` set it to the plug-in folder the model was built from (which names no
    base model: `from_pretrained` rebuilds from it, but plug-ins saved with it as their base could not load)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return None if not name or name == getattr(model, "rcp_plugins_name_or_path", None) else name


def fresh_plugins(model, device, dtype):
    """`model.config`'s plug-ins, initialised as `from_pretrained(stock LLaVA)` initialises them: built on the meta
    device and given values by `model._init_weights` alone. No constructor draws from the global RNG first, so the
    values equal an in-place re-initialisation of existing plug-ins from the same RNG state."""
    with torch.device("meta"):
        plugins = RcpPlugins(model.config)
    plugins = plugins.to_empty(device=device).to(dtype)
    with torch.no_grad():
        plugins.apply(model._init_weights)
    # float32 on a half-precision backbone (`_keep_in_fp32_modules_strict`), cast after the init as `from_pretrained`
    # casts the plug-ins a stock checkpoint lacks: both ways give the same values
    return plugins.float() if dtype in (torch.float16, torch.bfloat16) else plugins


def _is_stock_checkpoint(name_or_path, kwargs):
    """True if `name_or_path`'s config.json is a stock LLaVA's (model_type 'llava'), read with the load's Hub kwargs."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, **hub)
    except (OSError, ValueError):
        return False  # from_pretrained itself reports an unreadable source
    return config_dict.get("model_type") == "llava"


def _check_plugin_shape(plugin_config, hidden_size, num_layers, base_name, plugins_name, num_visual_tokens=None):
    """ValueError unless plug-ins built for (hidden_size, num_layers, N visual tokens) fit; called before any tensor
    is read (another N failed after the base loaded, blaming the plug-in sizes: the repair context's position table
    is N wide)."""
    problems = []
    for key, actual in (("hidden_size", hidden_size), ("num_hidden_layers", num_layers),
                        ("num_visual_tokens", num_visual_tokens)):
        if actual is None:
            continue
        expected = plugin_config.get(key)
        if expected is not None and expected != actual:
            problems.append(f"`{key}` {expected} (plug-ins) != {actual} (base)")
    if problems:
        this = repr(base_name) if base_name else "this one (built in code, no name)"  # `name_or_path` is '' then
        raise ValueError(
            f"The RCP plug-ins {plugins_name!r} were trained for another model than {this}: "
            f"{'; '.join(problems)}. Use the base model named in its {RCP_CONFIG_NAME} "
            f"(`base_model_name_or_path`: {plugin_config.get('base_model_name_or_path')!r})."
        )


class RcpLlavaForConditionalGeneration(RcpInitMixin, RcpHubMixin, LlavaForConditionalGeneration):
    """A drop-in `LlavaForConditionalGeneration` that prunes visual tokens inside its decoder.

    ```python
    model = RcpLlavaForConditionalGeneration.from_pretrained(
        "llava-hf/llava-1.5-7b-hf", pruning_layers=[1, 13, 25], pruning_keep_counts=[96, 26, 8]
    )
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=16)
    model.last_pruning_info.kept_counts  # (batch, 3)
    ```
    """

    config_class = RcpLlavaConfig

    def __init__(self, config):
        _require_rcp_config(config, type(self).__name__)
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

    @contextlib.contextmanager
    def disable_adapter(self):
        """PEFT's `with peft_model.disable_adapter():` -- the base model's outputs inside the block -- on the RCP model:
        the plug-ins off (`plugins_disabled()`: pruning and repair), and the LoRA adapters added with transformers'
        `add_adapter` / `load_adapter` too (its `disable_adapters()`), back on after the block as they were. (A
        `PeftModel` wrapping this model has its own `disable_adapter`, which turns off its LoRA only.)"""
        # PEFT's tuner layers say `disable_adapters` (a bool) is False while on; read by name, since a Hub file
        # imports nothing but torch and transformers (on a model, `disable_adapters` is the method)
        lora_on = getattr(self, "_hf_peft_config_loaded", False) and any(
            getattr(m, "disable_adapters", None) is False for m in self.modules())
        if lora_on:
            self.disable_adapters()
        try:
            with self.plugins_disabled():
                yield self
        finally:
            if lora_on:
                self.enable_adapters()

    def compile_selection(self, enabled=True, **compile_kwargs):
        """`RcpLlavaModel.compile_selection`: the token choice of pruned inference forwards compiled with
        `torch.compile(**compile_kwargs)` (`enabled=False`: eager again). Returns the model."""
        self.model.compile_selection(enabled, **compile_kwargs)
        return self

    @contextlib.contextmanager
    def pruning_layout(self, layout):
        """Run pruned forwards in `layout` ("discard", "mask" or None = by `training`) inside the block, then
        restore the previous layout: `with model.pruning_layout("discard"): model(**inputs)`."""
        if layout not in ("discard", "mask", None):
            raise ValueError(f"`layout` is {layout!r}; use 'discard', 'mask' or None.")
        old = self.model.pruning_layout
        self.model.pruning_layout = layout
        try:
            yield self
        finally:
            self.model.pruning_layout = old

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
        gumbel_temperature=None,
        gumbel_noise=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        """`LlavaForConditionalGeneration.forward`; with pruning, the logits cover the surviving tokens (see the
        output's `token_positions`). `pruning_method="none"` runs the stock forward itself.

        `mm_encoder_outputs` (precomputed image features) is accepted through `**kwargs`, not named: `generate`
        pre-encodes images for models that name it and then expands only their `pooler_output` for beams and
        `num_return_sequences`, while VisPruner also reads the vision hidden states; unnamed, `generate` passes
        `pixel_values`, which it expands whole."""
        mm_encoder_outputs = kwargs.pop("mm_encoder_outputs", None)
        if self.config.pruning_method == "none":
            outputs = super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, labels=labels,
                logits_to_keep=logits_to_keep, image_sizes=image_sizes, mm_encoder_outputs=mm_encoder_outputs,
                **_given(use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=return_dict),
                **kwargs)
            # The same fields (the pruning ones stay None), so code written for pruned outputs runs unchanged.
            return outputs if isinstance(outputs, tuple) else RcpLlavaCausalLMOutputWithPast(**outputs)
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
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            labels=labels,
            question_mask=question_mask,
            answer_mask=answer_mask,
            visual_keep_masks=visual_keep_masks,
            gumbel_temperature=gumbel_temperature,
            gumbel_noise=gumbel_noise,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if torch.is_tensor(slice_indices) and slice_indices.numel():
            low, high = (int(v) for v in torch.aminmax(slice_indices))
            if high >= hidden.shape[1] or low < -hidden.shape[1]:
                bad = high if high >= hidden.shape[1] else low
                raise ValueError(f"`logits_to_keep` holds position {bad}, but this forward's output has "
                                 f"{hidden.shape[1]} positions (valid {-hidden.shape[1]}..{hidden.shape[1] - 1}): with "
                                 "pruning they index the surviving tokens (`token_positions` maps them to the input), "
                                 "not the input sequence.")
        logits = self.lm_head(hidden[:, slice_indices, :])
        token_positions = outputs.token_positions
        if token_positions is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            token_positions = token_positions[:, slice_indices]  # the positions of the logits kept
        loss = None
        if labels is not None:
            if logits.shape[1] != hidden.shape[1]:
                # Stock fails here deep in the loss (logits of fewer positions than labels); with pruning the kept
                # labels would be sliced too, and a loss over the last positions alone is nan or silently partial.
                raise ValueError(
                    f"`labels` need the logits of every position, but `logits_to_keep={logits_to_keep!r}` keeps "
                    f"{logits.shape[1]} of {hidden.shape[1]}. Leave `logits_to_keep=0` (the default) when passing "
                    "`labels`."
                )
            # Labels follow the tokens that survived: discarded visual tokens never carry an answer. Nothing pruned
            # (no image): the positions are the input's, and the labels are taken as stock takes them (padding too).
            # Pruned (an image in the batch): a row's first surviving token is no target, as when the row runs
            # alone (nothing precedes it there): compaction right-aligns every row, which puts it behind padding
            # slots whose last would "predict" it. Nothing pruned: the labels as stock takes them (padding too).
            positions = outputs.token_positions
            if outputs.kept_indices is None:
                kept_labels = labels
            else:
                preceded = F.pad(positions[:, :-1] >= 0, (1, 0), value=False)  # (B, T') a kept token before it
                kept_labels = torch.where((positions >= 0) & preceded, labels.gather(1, positions.clamp_min(0)), -100)
            kept_labels = kept_labels[:, slice_indices]
            loss = self.loss_function(
                logits=logits, labels=kept_labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        output = RcpLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            token_positions=token_positions,
            kept_indices=outputs.kept_indices,
            kept_counts=outputs.kept_counts,
            keep_masks=outputs.keep_masks,
            hidden_state_positions=outputs.hidden_state_positions,
            layer_retention=outputs.layer_retention,
            has_image=outputs.has_image,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    # -- generate -------------------------------------------------------------------------------

    def _pruning_active(self):
        return self.model._pruning_active()

    def generate(self, *args, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        generation_config = kwargs.get("generation_config")

        def setting(name):  # as `generate` resolves it: the call's keyword, its generation_config, the model's
            value = kwargs.get(name)
            if value is None:
                value = getattr(generation_config, name, None)
            return getattr(self.generation_config, name, None) if value is None else value

        positional = args[0] if args and torch.is_tensor(args[0]) else None
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", positional))
        pad = setting("pad_token_id")
        if attention_mask is None and input_ids is not None and input_ids.dim() == 2 and isinstance(pad, int):
            eos = setting("eos_token_id")
            if pad not in (eos if isinstance(eos, (list, tuple)) else [eos]) and bool((input_ids == pad).any()):
                attention_mask = input_ids.ne(pad).long()  # the mask `generate` infers, checked as a given one
        image = (kwargs.get("pixel_values") is not None
                 or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None)  # as `_embed` reads them
        if self._pruning_active() and image and setting("prefill_chunk_size"):
            raise ValueError(
                f"`prefill_chunk_size` is not supported with `pruning_method={self.config.pruning_method!r}`: the "
                "first chunk would be pruned as the whole prompt (the pruners' question cut short) and the rest fed "
                "as decoded tokens. Generate without `prefill_chunk_size`, or use `pruning_method='none'`."
            )
        if self._pruning_active() and attention_mask is not None and attention_mask.dim() == 2:
            empty = (attention_mask == 0).all(-1)
            if bool(empty.any()):
                raise ValueError(
                    f"`attention_mask` row(s) {empty.nonzero().flatten().tolist()} are all zeros: the prompt has no "
                    "token to attend to. Drop those rows or give them at least one token."
                )
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError(
                    "Right padding is not supported by `generate` with pruning: the next token would be predicted "
                    "from a padding position. Pad on the left (`processor.tokenizer.padding_side = 'left'`)."
                )
        embeds = kwargs.get("inputs_embeds")
        prompt = input_ids if input_ids is not None and input_ids.dim() == 2 else embeds
        window = sliding_window_of(self.config.text_config)
        if window is not None and self.config.pruning_method != "none" and torch.is_tensor(prompt):
            # The forward refuses a sequence past the window (see `RcpLlavaModel._pruned_forward`): say so before
            # the prompt is run and some tokens are generated (`inputs_embeds` too: 8 tokens came, then the error).
            length = prompt.shape[1]
            new = setting("max_new_tokens")
            total = length + new if new is not None else setting("max_length")
            if total is not None and total > window:
                raise ValueError(
                    f"This text backbone uses sliding-window attention (window {window} tokens), and this generation "
                    f"may span {total} tokens (prompt {length} + up to {total - length} "
                    f"new): `pruning_method={self.config.pruning_method!r}` runs its own decoder loop, which does not "
                    f"build windowed masks. Lower `max_new_tokens` to {max(window - length, 0)} or less, "
                    "or use `pruning_method='none'` (the stock forward)."
                )
        cache = kwargs.get("past_key_values")
        if self._pruning_active() and cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"Pruning is not supported with {type(cache).__name__}: layers after a pruning layer hold fewer "
                "tokens. Use the default dynamic cache."
            )
        impl = setting("cache_implementation")
        # The dynamic kinds (layers that grow independently) hold pruned segments as the same cache objects passed by
        # the user do; the static ones pre-allocate equal lengths.
        if self._pruning_active() and impl not in (None, *DYNAMIC_CACHE_KINDS):
            raise ValueError(
                f"`cache_implementation={impl!r}` is not supported with pruning: layers after a pruning layer hold "
                "fewer tokens, which a static cache cannot. Leave `cache_implementation` unset (or use 'dynamic', "
                "'offloaded' or 'quantized')."
            )
        training = self.training and self._pruning_active() and image
        # `generate` turns the cache back on for an `inputs_embeds` prompt (it cannot re-embed generated ids)
        cached = setting("use_cache") is not False or (input_ids is None and embeds is not None)
        if training and cached and getattr(self.model.language_model, "gradient_checkpointing", False):
            # transformers' checkpointed layers fill no cache in train mode (they drop it, with a warning), so the
            # second step ran on a cache-less model with the whole mask: a shape error deep in the decoder loop
            # (stock generates on silently from nothing, other tokens than in eval mode)
            raise ValueError(
                "`generate` in train mode with gradient checkpointing on needs `use_cache=False` (as TRL passes it "
                "then): the checkpointed layers fill no KV cache. Pass `use_cache=False` (with `input_ids`: an "
                "`inputs_embeds` prompt always generates with a cache), or call `model.eval()` (or "
                "`gradient_checkpointing_disable()`) before generating."
            )
        layout = contextlib.nullcontext()
        if (training and setting("use_cache") is False and self.model.pruning_layout is None
                and self.model._plugins_train()):
            # Without a cache the prefill would run RCP's training layout (Gumbel noise, soft masks; the next steps
            # reuse its kept sets): different kept sets per call. It prunes physically, as the cached generate does.
            logger.warning_once(
                "RCP's plug-ins are in train mode: `generate(use_cache=False)` prunes physically, as at inference, "
                "with the plug-ins' dropout on. Call `model.eval()` before generating for deterministic pruning."
            )
            layout = self.pruning_layout("discard")
        if (self._pruning_active() and image and setting("use_cache") is False and kwargs.get("answer_mask") is None
                and torch.is_tensor(prompt)):
            # Without a cache each step runs the whole sequence: the repair adapters act on the prompt's last token
            # (the default of a forward without labels) and then on each generated one, as a cached decode does --
            # not on the newest token alone (`_update_model_kwargs_for_generation` grows the mask).
            answer = torch.zeros(prompt.shape[:2], dtype=torch.bool, device=prompt.device)
            answer[:, -1] = True  # left padding (refused otherwise): the last token of every row
            kwargs["answer_mask"] = answer
        prefill, outer = [], self.model._generate_prefill
        self.model._generate_prefill = prefill
        try:
            with layout:
                output = super().generate(*args, **kwargs)
        finally:
            self.model._generate_prefill = outer
        if prefill:
            # Forwards of other prompts inside `generate` (classifier-free guidance runs the model on the
            # unconditional ids, with a cache of its own, at every step) left the record of their unpruned prompt:
            # `last_pruning_info` is the generation's own prefill, as documented.
            self.model.last_pruning_info = prefill[0]
        return output

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, num_new_tokens=1, **kwargs):
        """Stock, and what keeps `generate(use_cache=False)` a slower cached `generate`: without a cache every step
        runs the whole sequence again, so after the prompt's forward the next ones get its kept sets
        (`visual_keep_masks`; re-selecting would read the generated tokens as question text, and FastV's last
        prompt token would move onto them) and its repaired position (`answer_mask`: the prompt's last token). The
        per-token masks then grow with the sequence: a generated token is no question token; it is an answer
        position, as every position of a cached decode step is for the repair adapters."""
        info = self.last_pruning_info
        if (outputs.get("past_key_values") is None and info is not None and self._pruning_active()
                and model_kwargs.get("visual_keep_masks") is None):
            model_kwargs["visual_keep_masks"] = info.keep_masks  # (B, P, N), cumulative
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args,
                                                                   num_new_tokens=num_new_tokens, **kwargs)
        for name, value in (("question_mask", False), ("answer_mask", True)):
            mask = model_kwargs.get(name)
            if torch.is_tensor(mask) and mask.dim() == 2:
                grown = torch.full((mask.shape[0], num_new_tokens), value, dtype=mask.dtype, device=mask.device)
                model_kwargs[name] = torch.cat([mask, grown], dim=-1)
        return model_kwargs

    def _assisted_decoding(self, input_ids, *args, inputs_tensor=None, **kwargs):
        """Assisted and prompt-lookup decoding verify the draft in the same forward as the prompt. That forward
        selects as the prompt alone does: its `answer_mask` (the prompt's last token, grown over the draft by
        `prepare_inputs_for_generation`) ends the prompt there, so the pruners read no drafted token as question text
        and FastV reads the prompt's last token; the rejected draft is then cropped off the prefill's text tail
        (`RcpCacheMixin.crop`). Greedy assisted decoding gives greedy decoding's tokens, as on a stock model."""
        image = (kwargs.get("pixel_values") is not None
                 or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None)  # as `_embed` reads them
        if self._pruning_active() and image and kwargs.get("answer_mask") is None and input_ids.shape[1] > 0:
            answer = torch.zeros(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
            answer[:, -1] = True  # the prompt's last token predicts the first answer token (batch 1: no padding)
            kwargs["answer_mask"] = answer
        # named, so that `generate` passes it (it looks for the name in the signature), as to stock
        return super()._assisted_decoding(input_ids, *args, inputs_tensor=inputs_tensor, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """Stock, with the per-token masks (`question_mask`, `answer_mask`) grown to the sequence the step runs:
        assisted decoding's first forward runs the prompt with the draft appended, and a drafted token is no
        question token but an answer position, as `_update_model_kwargs_for_generation` grows them per token."""
        length = input_ids.shape[1] if torch.is_tensor(input_ids) and input_ids.dim() == 2 else None
        for name, value in (("question_mask", False), ("answer_mask", True)):
            mask = kwargs.get(name)
            if length is not None and torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] < length:
                grown = torch.full((mask.shape[0], length - mask.shape[1]), value, dtype=mask.dtype, device=mask.device)
                kwargs[name] = torch.cat([mask, grown], dim=-1)
        # the stock signature, which `generate` inspects (`inputs_embeds` among its parameters: an embeddings prompt)
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)

    def _supports_mm_encoder_outputs(self):
        """`generate` pre-encodes images (and chunked prefill needs it) for `none`, as for stock LLaVA; with pruning
        it passes `pixel_values`, which it expands whole for beams (see `forward`)."""
        return self.config.pruning_method == "none"

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if (self.config.pruning_method != "none" and isinstance(cache, Cache) and not cache.is_compileable
                and not getattr(cache, "_is_user_defined", False)):
            # The cache generate made ("dynamic", "offloaded", "quantized") with the pruning state's mixin, in place:
            # a new RcpDynamicCache would drop its offloading or quantization.
            cache.__class__ = _rcp_cache_class(type(cache))
        return result

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        state = getattr(past_key_values, "rcp_state", None)
        if state is not None and not isinstance(past_key_values, RcpCacheMixin):
            state.reorder(beam_idx)  # a plain cache passed by the user: carry the state along ourselves
        return past_key_values

    # -- Hub folders and plug-in-only checkpoints (save_pretrained: RcpHubMixin) -------------

    def save_plugins(self, save_directory, base_model_name_or_path=None, overwrite=False):
        """Write a plug-in-only checkpoint (PEFT-style) to `save_directory`: `rcp_config.json` (the pruning fields
        of the config, the base model, its hidden size and layer count, the library versions) and
        `rcp_plugins.safetensors` (the tensors of `plugin_state_dict()`). Load it with
        `RcpLlavaForConditionalGeneration.from_base(base, plugins=save_directory)`. Returns the two paths.

        `base_model_name_or_path` defaults to the checkpoint this model was built from. Each file is written to a
        temporary name and renamed over the target, the weights before the config that describes them; the weights
        record the config's fingerprint, so a save interrupted between the two renames is refused at load
        (`check_plugin_files`) instead of pairing new weights with the old config. A folder that holds plug-ins of
        another model (another base, size, placement, head or query count) is refused with `FileExistsError` unless
        `overwrite=True`.
        """
        if _save_safetensors is None:  # pragma: no cover
            raise ImportError("Saving RCP plug-ins needs `safetensors` (`pip install safetensors`).")
        self.model._check_config()
        _warn_own_method(self.config.pruning_method)
        config, text = self.config, self.config.text_config
        base = (
            base_model_name_or_path
            or getattr(self, "rcp_base_model_name_or_path", None)
            or _own_name(self)  # a model `from_base` named by its plug-in folder: not its base
            or None
        )
        record = {name: getattr(config, name) for name in PRUNING_FIELDS}
        record.update(
            format=RCP_PLUGINS_FORMAT,
            base_model_name_or_path=str(base) if base is not None else None,
            base_model_revision=getattr(self, "rcp_base_model_revision", None),
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_visual_tokens=config.num_visual_tokens,
            library_version=RCP_LLAVA_VERSION,
            transformers_version=transformers_version,
        )
        self._check_plugins_unwrapped("save_plugins")  # before the folder exists: a refused save leaves nothing
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            # `os.makedirs` raised a bare "[Errno 17] File exists", which read like the refusal `overwrite` lifts
            raise NotADirectoryError(f"`save_plugins`: save_directory {os.fspath(save_directory)!r} is a file, not a "
                                     "folder; pass a folder path (`overwrite=True` replaces plug-ins in a folder, "
                                     "never a file).")
        os.makedirs(save_directory, exist_ok=True)
        config_path = os.path.join(save_directory, RCP_CONFIG_NAME)
        weights_path = os.path.join(save_directory, RCP_PLUGINS_NAME)
        if not overwrite and os.path.exists(config_path):
            _refuse_other_plugins(config_path, record)
        # Offloaded tensors (`device_map` with 'cpu' / 'disk': on the meta device) read from where they were
        # offloaded, as `save_pretrained` reads them.
        tensors = {k: (load_offloaded_parameter(self, k) if v.is_meta else v).detach().to("cpu").contiguous()
                   for k, v in self.plugin_state_dict().items()}
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        metadata = {"format": "pt", "rcp_config_sha256": _config_digest(record),  # pairs them (`check_plugin_files`)
                    "rcp_config_fields": ",".join(_DIGEST_FIELDS)}
        atomic_write(weights_path, lambda tmp: _save_safetensors(tensors, tmp, metadata=metadata))
        atomic_write(config_path, lambda tmp: write_text(tmp, text))
        return [config_path, weights_path]

    def load_plugins(self, plugins, strict=True, **hub_kwargs):
        """Copy the tensors of a plug-in checkpoint (folder or Hub repo id) into this model's plug-ins.

        A checkpoint built for another hidden size, layer count or pruner head count (`pruner_num_heads`: no tensor
        shape shows it), or holding a tensor of another shape, raises a `ValueError` before any tensor is copied.
        Missing plug-in keys and unexpected keys (plug-ins trained with other `pruning_layers` / `repair_layers`)
        raise a `ValueError` before any tensor is copied (`strict=True`, the default); `strict=False` only warns, and
        the missing ones keep their initial values. Unknown config keys are reported with a warning.
        Returns `(missing_keys, unexpected_keys)` as torch's `load_state_dict` and PEFT's `load_adapter` do (a named
        tuple: `result.missing_keys`, or unpack it).
        """
        if _load_safetensors is None:  # pragma: no cover
            raise ImportError("Loading RCP plug-ins needs `safetensors` (`pip install safetensors`).")
        self._check_plugins_unwrapped("load_plugins")
        if not self.config.pruning_spec.plugins:  # every tensor was "unexpected", blamed on the plug-ins' layers
            raise ValueError(
                f"This model runs `pruning_method={self.config.pruning_method!r}`, which has no plug-ins, so the RCP "
                f"plug-ins {plugins!r} have nowhere to go. Load them into an RCP model: `from_base(base, "
                f"plugins={plugins!r})`; to run another method at their layers, build it from that model "
                "(`rcp_llava.evaluation.method_model(model, pruning_method=...)`)."
            )
        plugin_config = read_plugin_config(plugins, **hub_kwargs)
        text = self.config.text_config
        _check_plugin_shape(plugin_config, text.hidden_size, text.num_hidden_layers,
                            getattr(self, "rcp_base_model_name_or_path", None) or self.name_or_path, plugins,
                            self.config.num_visual_tokens)
        heads = plugin_config.get("pruner_num_heads")
        if heads is not None and heads != self.config.pruner_num_heads:  # same tensor shapes, another computation
            raise ValueError(
                f"The RCP plug-ins {plugins!r} were trained with `pruner_num_heads={heads}`; this model's pruners "
                f"split their attention into {self.config.pruner_num_heads} heads, so the same tensors would score "
                f"other tokens. Load them with `RcpLlavaForConditionalGeneration.from_base(base, plugins={plugins!r})`"
                f", which builds the pruners from their {RCP_CONFIG_NAME}, or build this model with "
                f"`pruner_num_heads={heads}`."
            )
        weights = check_plugin_files(plugins, hub_kwargs)
        tensors = _load_safetensors(weights)
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
        if strict and (missing or unexpected):
            raise ValueError(
                f"The RCP plug-ins {plugins!r} do not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Were they trained with other `pruning_layers` / `repair_layers`?"
            )
        if missing:
            logger.warning(
                f"The RCP plug-ins {plugins!r} have no tensor for {len(missing)} plug-in parameter(s), which keep their "
                f"initial values (check `pruning_layers` / `repair_layers`): {missing}"
            )
        if unexpected:
            logger.warning(f"The RCP plug-ins {plugins!r} hold tensors this model has no use for: {unexpected}")
        offloaded = sorted(k for k in set(tensors) & set(own) if own[k].is_meta)
        if offloaded:  # a copy into a meta tensor does nothing: the model would run its old plug-ins
            raise ValueError(
                f"This model's plug-ins are offloaded by its `device_map` ({offloaded[0]} is on the meta device), so "
                f"{plugins!r} cannot be copied into them. Load the model with the plug-ins on a device: "
                "`from_base(base, plugins=..., device_map=...)` keeps them there, or give `device_map` an entry "
                f"'{PLUGIN_PREFIX.rstrip('.')}' on a device."
            )
        with torch.no_grad():
            for k in sorted(set(tensors) & set(own)):
                own[k].copy_(tensors[k])
        return IncompatibleKeys(missing, unexpected)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`RcpHubMixin.from_pretrained` (safetensors only; a stock checkpoint's new plug-ins float32 and out of the
        load report).

        A local plug-in-only folder (`save_plugins`: `rcp_config.json` and no `config.json`; also in `subfolder`)
        loads as `from_base(<its recorded base model, at its recorded revision>, plugins=folder)`, as PEFT's
        `AutoPeftModel.from_pretrained(adapter)` does."""
        root, subfolder = str(pretrained_model_name_or_path), kwargs.get("subfolder") or ""
        folder = os.path.join(root, subfolder) if subfolder else root  # a set in a subfolder too, as `from_base` reads
        if (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, RCP_CONFIG_NAME))
                and not os.path.isfile(os.path.join(folder, "config.json"))):
            record = read_plugin_config(folder)
            base = record.get("base_model_name_or_path")
            if not base:
                raise ValueError(
                    f"{folder!r} is an RCP plug-in folder that records no base model "
                    f"(`base_model_name_or_path` in {RCP_CONFIG_NAME}): load it with "
                    "`RcpLlavaForConditionalGeneration.from_base(base_model, plugins=folder)`."
                )
            try:  # the user named the plug-in folder, not the base: a moved base is reported as the record's
                check_model_source(base, "base_model")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{folder!r} is an RCP plug-in folder whose {RCP_CONFIG_NAME} records the base model {base!r} "
                    "(`base_model_name_or_path`), and there is no such folder (moved or deleted?): load it with "
                    f"`RcpLlavaForConditionalGeneration.from_base(new_base, plugins={root!r}"
                    f"{f', subfolder={subfolder!r}' if subfolder else ''})`, or edit "
                    f"`base_model_name_or_path` in {RCP_CONFIG_NAME}."
                ) from None
            if record.get("base_model_revision") and "revision" not in kwargs:
                kwargs["revision"] = record["base_model_revision"]
            kwargs.pop("subfolder", None)  # the plug-ins', not the base's
            return cls.from_base(base, plugins=root, subfolder=subfolder or None, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_base(cls, base_model, plugins=None, subfolder=None, revision=None, plugins_revision=None, token=None,
                  strict=True, is_trainable=None, **kwargs):
        """A full RCP model from a stock LLaVA (a checkpoint, or a loaded model as `PeftModel.from_pretrained(model,
        id)` takes it) plus, optionally, a plug-in-only checkpoint.

        ```python
        model = RcpLlavaForConditionalGeneration.from_base("llava-hf/llava-1.5-7b-hf", plugins="user/rcp-plugins")
        model = RcpLlavaForConditionalGeneration.from_base(llava, plugins="user/repo", subfolder="rcp-64")
        ```

        Args:
            base_model: a stock LLaVA checkpoint (Hub id or folder) or a loaded `LlavaForConditionalGeneration`,
                whose modules the RCP model then shares (no copy: as PEFT wraps a model).
            plugins: a plug-in folder or Hub repo (`save_plugins` / `train_rcp.py`'s OUT/plugins).
            subfolder: where the plug-ins live inside `plugins` (as PEFT's `subfolder`).
            revision / plugins_revision: the base's and the plug-ins' Hub revisions; the base's is recorded in
                saved plug-ins (`base_model_revision`).
            token: for both.
            strict: plug-ins that miss a tensor of this placement, or hold one it has no use for, raise (default);
                `strict=False` warns and keeps the missing ones at their initial values.
            is_trainable: PEFT's: False freezes every parameter and puts the model in eval mode (inference, as
                PEFT's `from_pretrained`), True trains the plug-ins alone (the backbone frozen). Not given, every
                parameter trains, as after transformers' `from_pretrained` (`train_rcp.py` freezes the backbone
                itself). A loaded base's modules are shared, so they are frozen
                in it too, as PEFT wraps a model in place.

        The pruning fields (layers, sizes, budget) come from the plug-ins' `rcp_config.json`; a kwarg named like a
        pruning field of `RcpLlavaConfig` overrides it (e.g. `pruning_keep_counts=[96, 26, 8]`), every other kwarg
        goes to `from_pretrained` (`dtype`, `device_map`, ...; a loaded base is shared as it is and takes none).
        Plug-ins built for another hidden size, layer count or number of visual tokens raise a `ValueError` before
        any weight is read.
        """
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in PRUNING_FIELDS}
        base_hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
        base_hub.update({k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k not in ("subfolder", "revision")})
        plugin_hub = {k: v for k, v in (("revision", plugins_revision), ("token", token), ("subfolder", subfolder))
                      if v is not None}
        plugin_hub.update({k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only") if k in kwargs})
        loaded = isinstance(base_model, LlavaForConditionalGeneration)
        if loaded and set(kwargs) - set(_HUB_KWARGS):
            # `from_pretrained`'s arguments (dtype, device_map, attn_implementation) were dropped silently: the
            # loaded model is shared as it is.
            raise TypeError(
                f"`from_base` shares a loaded `base_model` as it is, so {sorted(set(kwargs) - set(_HUB_KWARGS))} would "
                "be ignored: cast or move the base first (`base.to(dtype)`, `base.set_attn_implementation(...)`), or "
                "pass its folder / Hub id to load it with them."
            )
        if loaded:  # an RCP model given as the base: the stock checkpoint under it, not its plug-in folder
            base_name = getattr(base_model, "rcp_base_model_name_or_path", None) or _own_name(base_model) or ""
            base_dict = base_model.config.to_dict()
        elif isinstance(base_model, (str, os.PathLike)):
            check_model_source(base_model, "base_model")
            base_name = str(base_model)
            base_dict, _ = RcpLlavaConfig.get_config_dict(base_model, **base_hub)
        elif hasattr(base_model, "get_base_model") and hasattr(base_model, "peft_config"):  # a PeftModel (duck-typed:
            # this file imports no peft) or its tuner
            raise TypeError(
                f"`base_model` is a PEFT {type(base_model).__name__}: the RCP model cannot hold its adapter layers. "
                "Merge them first (`from_base(peft_model.merge_and_unload(), ...)`), or build the RCP model on the "
                "plain base and wrap it with PEFT afterwards."
            )
        else:
            raise TypeError(f"`base_model` must be a Hub id, a folder or a loaded LlavaForConditionalGeneration, got "
                            f"{type(base_model).__name__}.")
        drop = set(PRUNING_FIELDS) | {"model_type", "auto_map", "architectures", "transformers_version"}
        stock = {k: v for k, v in base_dict.items() if k not in drop}
        stock_config = LlavaConfig.from_dict(stock)
        stock_text = stock_config.text_config
        plugin_config = read_plugin_config(plugins, **plugin_hub) if plugins is not None else {}
        if plugins is not None:
            _check_plugin_shape(plugin_config, stock_text.hidden_size, stock_text.num_hidden_layers, base_name, plugins,
                                visual_tokens_per_image(stock_config))
            # A truncated plug-in file is named now, not after the whole base model has loaded.
            check_plugin_files(plugins, plugin_hub)
        fields = {k: plugin_config[k] for k in PRUNING_FIELDS if k in plugin_config}
        fields.update(overrides)
        if loaded:
            model = cls._wrap_loaded(base_model, RcpLlavaConfig(**stock, **fields))
        else:
            config = RcpLlavaConfig.from_pretrained(base_model, **fields, **base_hub)
            # transformers reports the base weights itself; the plug-ins are left out of that report (they are
            # loaded next, strictly).
            rest = {k: v for k, v in kwargs.items() if k not in base_hub}  # `cache_dir` & co. are in both
            model = cls.from_pretrained(base_model, config=config, _rcp_plugins_follow=plugins is not None,
                                        **base_hub, **rest)
        model.rcp_base_model_name_or_path = base_name
        model.rcp_base_model_revision = revision
        if plugins is not None:
            model.load_plugins(plugins, strict=strict, **plugin_hub)
            if os.path.isdir(plugins):
                # what rebuilds this model (`from_pretrained(local plug-in folder)`), as PEFT records `name_or_path`
                # for an adapter trained on it: the stock base, recorded before, rebuilt it with new plug-ins. (A Hub
                # plug-in repo has no config.json for `from_pretrained`: the stock base stays.)
                where = os.path.join(plugins, subfolder) if subfolder else plugins
                model.name_or_path = model.config.name_or_path = model.rcp_plugins_name_or_path = os.fspath(where)
        if is_trainable is not None:  # PEFT's `is_trainable` went on to `__init__` ("unexpected keyword argument")
            for name, param in model.named_parameters():
                param.requires_grad_(bool(is_trainable) and name.startswith(PLUGIN_PREFIX))
            if not is_trainable:  # a loaded base in training mode kept dropout on (PEFT: `if not is_trainable: eval()`)
                model.eval()
        return model

    @classmethod
    def _wrap_loaded(cls, base, config):
        """An RCP model over the modules of a loaded stock LLaVA (shared, not copied), with fresh plug-ins on the
        base's device, in its dtype (float32 on a half-precision one), initialised as `from_pretrained` initialises
        them."""
        config._attn_implementation = base.config._attn_implementation
        with torch.device("meta"):
            model = cls(config)
        share_backbone(model, base)
        param = next(base.parameters())
        model.model.rcp_plugins = fresh_plugins(model, param.device, param.dtype)
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise RuntimeError(f"from_base left tensors on the meta device: {leftover[:5]}")
        return model.eval() if not base.training else model

    def unload(self):
        """The stock `LlavaForConditionalGeneration` under the plug-ins (PEFT's `unload`): same modules, no copy,
        no plug-ins; its forward and generate are transformers' own."""
        config = LlavaConfig.from_dict({k: v for k, v in self.config.to_dict().items()
                                        if k not in set(PRUNING_FIELDS) | {"model_type", "auto_map", "architectures"}})
        config._attn_implementation = self.config._attn_implementation
        with torch.device("meta"):
            stock = LlavaForConditionalGeneration(config)
        share_backbone(stock, self)
        if getattr(self, "rcp_plugins_name_or_path", None) is not None:  # named by its plug-in folder (`from_base`):
            # the stock model is the checkpoint under it (unnamed when the base had no name)
            stock.name_or_path = stock.config.name_or_path = getattr(self, "rcp_base_model_name_or_path", None) or ""
        return stock.train(self.training)

    def get_nb_trainable_parameters(self):
        """PEFT's `(trainable parameters, all parameters)`."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self):
        """PEFT's one line: trainable parameters, all parameters and the share (the plug-ins train, the backbone is
        frozen by `train_rcp.py`)."""
        trainable, total = self.get_nb_trainable_parameters()
        plugins = sum(p.numel() for p in self.model.rcp_plugins.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
              f" || plug-in params: {plugins:,d}")

    def _check_plugins_unwrapped(self, action):
        """ValueError when PEFT wrapped plug-in modules (LoRA on their linear maps: `target_modules="all-linear"`, or
        `modules_to_save=["rcp_plugins"]`): their tensors then live under PEFT's names (`base_layer`, `lora_A`,
        `modules_to_save.default`), so a plug-in checkpoint would hold, or be copied into, the wrong tensors."""
        wrapped = [k for k in self.state_dict() if k.startswith(PLUGIN_PREFIX) and any(
            part in ("base_layer", "modules_to_save", "original_module") or part.startswith("lora_")
            for part in k.split("."))]
        if wrapped:
            fix = {"save_plugins": "call it on `peft_model.merge_and_unload()` (the trained values in place), or "
                                   "save the adapter with PEFT's `save_pretrained`",
                   "load_plugins": "load the plug-ins before wrapping the model with PEFT"}.get(
                action, "merge them first (`merge_and_unload()`) or wrap the backbone only")
            raise ValueError(
                f"`{action}`: PEFT wrapped {len(wrapped)} plug-in tensor(s) (e.g. {wrapped[0]!r}), so they are no "
                f"longer the plug-ins' own parameters; {fix}."
            )

    def load_adapter(self, peft_model_id=None, *args, strict=True, **kwargs):
        """`load_plugins` for an RCP plug-in checkpoint, under the name transformers' PEFT integration uses. A PEFT
        adapter -- a local folder with `adapter_config.json` and no `rcp_config.json` (also in `subfolder`, or
        `adapter_kwargs={"subfolder": ...}`), or a call with any of PEFT's own arguments (`adapter_name`,
        `peft_config`, `adapter_state_dict`, `adapter_kwargs` beyond Hub arguments such as `subfolder`, ...) -- goes
        to that integration, as on a stock model
        (e.g. LoRA on the backbone saved by `save_pretrained` after `add_adapter`). A Hub id without them is read as
        plug-ins: pass `adapter_name=` to load a Hub PEFT adapter. `is_trainable` applies to whichever loads, as in
        PEFT: for plug-ins, False freezes them and puts the model in eval mode (inference, as PEFT's and
        transformers' `load_adapter`), True makes them trainable; not given, their `requires_grad` and the model's
        mode stay as they were."""
        subfolder = kwargs.get("subfolder") or (kwargs.get("adapter_kwargs") or {}).get("subfolder") or ""
        folder = (os.path.join(os.fspath(peft_model_id), subfolder)
                  if isinstance(peft_model_id, (str, os.PathLike)) and os.path.isdir(peft_model_id) else None)
        plugins = folder is not None and os.path.isfile(os.path.join(folder, RCP_CONFIG_NAME))
        adapter = folder is not None and os.path.isfile(os.path.join(folder, "adapter_config.json"))
        # `is_trainable` applies to whichever loads: it was ignored (False) or refused as an adapter name (True) for
        # plug-ins. The other PEFT arguments mean a PEFT adapter.
        trainable = kwargs.pop("is_trainable", None)
        adapter_kwargs = kwargs.get("adapter_kwargs") or {}
        if plugins and not adapter and set(adapter_kwargs) <= set(_HUB_KWARGS):
            # `adapter_kwargs={"subfolder": ...}` that found plug-ins: where to read them, not a PEFT adapter
            kwargs = {**{k: v for k, v in kwargs.items() if k != "adapter_kwargs"}, **adapter_kwargs}
        peft_args = bool(args) or any(kwargs.get(k) not in (None, False, "auto") for k in _PEFT_LOAD_ARGUMENTS)
        if peft_model_id is None or (adapter and not plugins) or (peft_args and not (plugins and not adapter)):
            # a PEFT adapter folder, PEFT's arguments on a Hub id, or both kinds in one folder (save_pretrained after
            # add_adapter, then save_plugins)
            given = {} if trainable is None else {"is_trainable": trainable}
            return super().load_adapter(peft_model_id, *args, **kwargs, **given)
        if peft_args:
            raise TypeError("RCP plug-ins have no adapter names: call `load_adapter(plugins_folder_or_repo)`.")
        if adapter:
            logger.warning(f"{peft_model_id} holds RCP plug-ins and a PEFT adapter (adapter_config.json): the plug-ins "
                           "are loaded; load the adapter too with `load_adapter(folder, adapter_name=...)`.")
        result = self.load_plugins(peft_model_id, strict=strict, **kwargs)
        if trainable is not None:
            for param in self.plugin_parameters():
                param.requires_grad_(bool(trainable))
            if not trainable:  # inference, as PEFT's `load_adapter` (`if not is_trainable: self.eval()`)
                self.eval()
        return result


__all__ = [
    "RcpLlavaForConditionalGeneration",
    "RcpLlavaModel",
    "RcpPruner",
    "RcpRepairAdapter",
    "RcpRepairContext",
    "check_model_source",
    "RcpDynamicCache",
    "fresh_plugins",
    "share_backbone",
    "RcpPruningInfo",
    "TokenSelector",
    "SelectionContext",
    "register_pruning_method",
]
