"""Configuration of RCP-LLaVA: a stock `LlavaConfig` plus the visual-token pruning fields.

This file is one of the two Hub files (`save_pretrained` copies it next to `config.json`), so it
imports only the standard library and `transformers`.
"""

import math

from transformers import LlavaConfig


# The pruning methods a config can name. "none" is the stock LLaVA forward.
PRUNING_METHODS = ("none", "rcp")

# The paper's placement for LLaVA-1.5-7B at the 64-token budget (RCP.md section 1).
DEFAULT_PRUNING_LAYERS = (2, 14, 26)
DEFAULT_REPAIR_LAYERS = (23, 30)

PRUNING_FIELDS = (
    "pruning_method", "pruning_layers", "repair_layers", "num_pruning_queries", "query_dropout",
    "gumbel_temperature", "visual_token_budget", "pruning_keep_counts", "pruner_hidden_size",
    "repair_bottleneck_size", "pruning_seed",
)


class RcpLlavaConfig(LlavaConfig):
    r"""
    [`LlavaConfig`] extended with the fields of the Representation Consistency Pruner (RCP).

    Args:
        pruning_method (`str`, *optional*, defaults to `"rcp"`):
            How visual tokens are dropped: `"rcp"` (learned pruners + delayed repair adapters) or `"none"`
            (the stock LLaVA forward, no plug-in is used).
        pruning_layers (`list[int]`, *optional*):
            Decoder layers *before* whose self-attention a pruner runs (0-based, strictly increasing, never 0:
            `generate` reads layer 0's cache length). Defaults to the paper's `[2, 14, 26]`.
        repair_layers (`list[int]`, *optional*):
            Decoder layers *after* which a delayed repair adapter corrects the answer positions. Each must come
            at or after the first pruning layer. `[]` disables the adapters. Defaults to the paper's `[23, 30]`.
        num_pruning_queries (`int`, *optional*, defaults to 16):
            Number of learnable pruning queries N_q of each pruner (Eq. 1).
        query_dropout (`float`, *optional*, defaults to 0.2):
            Probability of dropping a pruning query's contribution during training.
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            Temperature tau of the Gumbel-Sigmoid mask (Eq. 6). Inference thresholds the logits at 0 (Eq. 8), so
            it only matters for training.
        visual_token_budget (`float`, *optional*):
            Target average number of visual tokens per decoder layer (the paper's "64 tokens"); used by the
            training sparsity loss and reported by the evaluation. `None` = no target.
        pruning_keep_counts (`list[int]`, *optional*):
            One count per pruning layer, non-increasing: keep exactly that many visual tokens after each pruning
            layer (top-k on the pruner's logits). `None` = RCP's adaptive threshold (Eq. 8).
        pruner_hidden_size (`int`, *optional*, defaults to 448):
            Width of the pruner's reduced attention space and of its per-token MLP.
        repair_bottleneck_size (`int`, *optional*, defaults to 470):
            Bottleneck width of the repair adapters (FiLM conditioning lives in this space too).
        pruning_seed (`int`, *optional*, defaults to 0):
            Seed for the methods that draw random numbers at inference (the `"random"` baseline).

    The default plug-in sizes put the LLaVA-1.5-7B plug-ins at 16.54M (3 pruners) + 20.16M (2 adapters)
    parameters, next to the paper's 16.56M + 20.15M.
    """

    model_type = "rcp_llava"

    pruning_method: str = "rcp"
    pruning_layers: list[int] | None = None
    repair_layers: list[int] | None = None
    num_pruning_queries: int = 16
    query_dropout: float = 0.2
    gumbel_temperature: float = 1.0
    visual_token_budget: float | None = None
    pruning_keep_counts: list[int] | None = None
    pruner_hidden_size: int = 448
    repair_bottleneck_size: int = 470
    pruning_seed: int = 0

    def __post_init__(self, **kwargs):
        # A stock llava config.json carries `"model_type": "llava"`; keeping it as an instance attribute would
        # save this config as a stock LLaVA one (transformers-notes trap 6).
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if self.pruning_layers is None:
            self.pruning_layers = list(DEFAULT_PRUNING_LAYERS)
        if self.repair_layers is None:
            self.repair_layers = list(DEFAULT_REPAIR_LAYERS)
        self.pruning_layers = _as_int_list(self.pruning_layers, "pruning_layers")
        self.repair_layers = _as_int_list(self.repair_layers, "repair_layers")
        if self.pruning_keep_counts is not None:
            self.pruning_keep_counts = _as_int_list(self.pruning_keep_counts, "pruning_keep_counts")
        self._validate_pruning_fields()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(dir, pruning_layers=...)` would set the overrides only after building the config from
        # config.json, i.e. after validating the defaults against the wrong model: merge them in first.
        config_dict = dict(config_dict)
        for name in PRUNING_FIELDS:
            if name in kwargs:
                config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)

    def validate_pruning(self):
        """Re-check the pruning fields (the model calls this, so fields edited after construction are checked)."""
        self._validate_pruning_fields()

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image that reach the language model (N)."""
        vision = self.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    def _validate_pruning_fields(self):
        if self.pruning_method not in PRUNING_METHODS:
            raise ValueError(
                f"`pruning_method` is {self.pruning_method!r}, but it must be one of {list(PRUNING_METHODS)}."
            )
        num_layers = self.text_config.num_hidden_layers
        layers = self.pruning_layers
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"`pruning_layers` contains {bad}, but the text model has {num_layers} layers; use indices in "
                f"[1, {num_layers})."
            )
        if 0 in layers:
            raise ValueError(
                "`pruning_layers` contains 0, but pruning before layer 0 is not supported: `generate` reads the "
                "prompt length from layer 0's cache. Use a layer index >= 1."
            )
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"`pruning_layers` must be strictly increasing, got {layers}.")
        if self.pruning_method == "rcp" and not layers:
            raise ValueError("`pruning_layers` is empty; `pruning_method='rcp'` needs at least one pruning layer.")
        bad = [i for i in self.repair_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"`repair_layers` contains {bad}, but the text model has {num_layers} layers; use indices in "
                f"[0, {num_layers})."
            )
        if list(self.repair_layers) != sorted(set(self.repair_layers)):
            raise ValueError(f"`repair_layers` must be strictly increasing, got {self.repair_layers}.")
        if layers and self.repair_layers and self.repair_layers[0] < layers[0]:
            raise ValueError(
                f"`repair_layers` starts at {self.repair_layers[0]}, before the first pruning layer {layers[0]}: "
                "a repair adapter needs a preceding pruner. Move it to a layer >= the first pruning layer."
            )
        _check_positive_int(self.num_pruning_queries, "num_pruning_queries")
        _check_positive_int(self.pruner_hidden_size, "pruner_hidden_size")
        _check_positive_int(self.repair_bottleneck_size, "repair_bottleneck_size")
        if isinstance(self.pruning_seed, bool) or not isinstance(self.pruning_seed, int):
            raise TypeError(f"`pruning_seed` must be an int, got {self.pruning_seed!r}.")
        if not (isinstance(self.query_dropout, (int, float)) and 0.0 <= self.query_dropout < 1.0):
            raise ValueError(f"`query_dropout` must be a float in [0, 1), got {self.query_dropout!r}.")
        if not (isinstance(self.gumbel_temperature, (int, float)) and self.gumbel_temperature > 0):
            raise ValueError(f"`gumbel_temperature` must be a positive float, got {self.gumbel_temperature!r}.")
        n = self.num_visual_tokens
        if self.visual_token_budget is not None:
            budget = self.visual_token_budget
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= n:
                raise ValueError(
                    f"`visual_token_budget` is {budget!r}, but it must be a number in (0, {n}] (the image has {n} "
                    "visual tokens), or None."
                )
        counts = self.pruning_keep_counts
        if counts is not None:
            if len(counts) != len(layers):
                raise ValueError(
                    f"`pruning_keep_counts` has {len(counts)} entries but `pruning_layers` has {len(layers)}; "
                    "give one count per pruning layer."
                )
            if any(c < 0 for c in counts):
                raise ValueError(f"`pruning_keep_counts` must be >= 0, got {counts}.")
            if any(c > n for c in counts):
                raise ValueError(
                    f"`pruning_keep_counts` {counts} asks to keep more than the {n} visual tokens of an image; "
                    f"use counts <= {n}."
                )
            if any(b > a for a, b in zip(counts, counts[1:])):
                raise ValueError(
                    f"`pruning_keep_counts` must be non-increasing (masks are cumulative), got {counts}."
                )

    def pruned_average_tokens(self) -> float | None:
        """Average visual tokens per decoder layer implied by `pruning_keep_counts` (None in adaptive mode)."""
        if self.pruning_keep_counts is None:
            return None
        per_layer = visual_tokens_per_layer(
            self.text_config.num_hidden_layers, self.num_visual_tokens, self.pruning_layers, self.pruning_keep_counts
        )
        return sum(per_layer) / len(per_layer)


def visual_tokens_per_layer(num_layers, num_visual_tokens, pruning_layers, keep_counts):
    """Visual tokens each decoder layer processes when `keep_counts[i]` survive the pruner before layer
    `pruning_layers[i]` (masks are cumulative, so a layer inherits the last pruner's count)."""
    counts, current = [], num_visual_tokens
    schedule = dict(zip(pruning_layers, keep_counts))
    for layer in range(num_layers):
        current = min(current, schedule.get(layer, current))
        counts.append(current)
    return counts


def keep_counts_for_fractions(num_visual_tokens, fractions):
    """Keep counts from fractions of the visual tokens (e.g. `[1/6, 1/22, 1/70]`), rounded, at least 1."""
    return [max(1, int(math.floor(f * num_visual_tokens + 0.5))) for f in fractions]


def _as_int_list(value, name):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{name}` must be a list of ints, got {value!r}.")
    out = list(value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
        raise TypeError(f"`{name}` must be a list of ints, got {value!r}.")
    return out


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


__all__ = ["RcpLlavaConfig"]
