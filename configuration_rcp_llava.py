"""Configuration of RCP-LLaVA: a stock `LlavaConfig` plus the visual-token pruning fields.

This file is one of the two Hub files (`save_pretrained` copies it next to `config.json`), so it
imports only the standard library and `transformers`.
"""

import math

from transformers import LlavaConfig


# The pruning methods a config can name. "none" is the stock LLaVA forward.
PRUNING_METHODS = ("none", "rcp", "vispruner", "fastv", "random", "attention_topk")
# Methods that can drop visual tokens before the language model (`pre_llm_keep_count`).
PRE_LLM_METHODS = ("vispruner", "random")
# Training-free baselines: no plug-in, a fixed number of tokens kept at each pruning point.
BASELINE_METHODS = ("vispruner", "fastv", "random", "attention_topk")
FASTV_QUERIES = ("last", "question")

# The paper's placement for LLaVA-1.5-7B at the 64-token budget (RCP.md section 1).
DEFAULT_PRUNING_LAYERS = (2, 14, 26)
DEFAULT_REPAIR_LAYERS = (23, 30)

PRUNING_FIELDS = (
    "pruning_method", "pruning_layers", "repair_layers", "num_pruning_queries", "query_dropout",
    "gumbel_temperature", "visual_token_budget", "pruning_keep_counts", "pruner_hidden_size",
    "repair_bottleneck_size", "pruning_seed", "pre_llm_keep_count", "vispruner_important_ratio", "fastv_query",
)


class RcpLlavaConfig(LlavaConfig):
    r"""
    [`LlavaConfig`] extended with the fields of the Representation Consistency Pruner (RCP).

    Args:
        pruning_method (`str`, *optional*, defaults to `"rcp"`):
            How visual tokens are dropped: `"rcp"` (learned pruners + delayed repair adapters), `"none"` (the
            stock LLaVA forward, no plug-in is used), or a training-free baseline (no plug-in):
            `"vispruner"` (before the LLM: [CLS]-attention important tokens + similarity-deduplicated diverse
            ones, `pre_llm_keep_count` tokens), `"fastv"` (before layer K = the single pruning layer: the tokens
            the last prompt token attends to most at layer K-1), `"random"` (a seeded uniform subset, before the
            LLM or at `pruning_layers`) or `"attention_topk"` (at each pruning layer, the top tokens by the LLM's
            own question->visual attention, Eq. 4's prior alone).
        pruning_layers (`list[int]`, *optional*):
            Decoder layers *before* whose self-attention a pruner runs (0-based, strictly increasing, never 0:
            pruning before the LLM is `pre_llm_keep_count`). Defaults to the paper's `[2, 14, 26]`; to `[]` for
            `"vispruner"` and for `"random"` with `pre_llm_keep_count`; to `[2]` for `"fastv"`.
        repair_layers (`list[int]`, *optional*):
            Decoder layers *after* which a delayed repair adapter corrects the answer positions. Each must come
            at or after the first pruning layer. `[]` disables the adapters. Defaults to the paper's `[23, 30]`
            (to `[]` for the baselines, which have no adapter and ignore this field).
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
        pre_llm_keep_count (`int`, *optional*):
            Visual tokens kept *before* the language model (`"vispruner"`, required; `"random"` with
            `pruning_layers=[]`): the LLM sees only these from layer 0. `None` for the other methods. A count
            equal to the number of visual tokens keeps them all.
        vispruner_important_ratio (`float`, *optional*, defaults to 0.5):
            VisPruner's share of "important" ([CLS]-attention) tokens: `int(pre_llm_keep_count * ratio)`; the rest
            of the budget goes to diverse tokens. In [0, 1].
        fastv_query (`str`, *optional*, defaults to `"last"`):
            FastV's ranking query at layer K-1: `"last"` (the last prompt token, as in FastV) or `"question"`
            (the mean over the question tokens).

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
    pre_llm_keep_count: int | None = None
    vispruner_important_ratio: float = 0.5
    fastv_query: str = "last"

    def __post_init__(self, **kwargs):
        # A stock llava config.json carries `"model_type": "llava"`; keeping it as an instance attribute would
        # save this config as a stock LLaVA one (transformers-notes trap 6).
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if self.pruning_layers is None:
            if self.pruning_method == "vispruner" or (
                self.pruning_method == "random" and self.pre_llm_keep_count is not None
            ):
                self.pruning_layers = []
            elif self.pruning_method == "fastv":
                self.pruning_layers = [2]
            else:
                self.pruning_layers = list(DEFAULT_PRUNING_LAYERS)
        if self.repair_layers is None:
            self.repair_layers = [] if self.pruning_method in BASELINE_METHODS else list(DEFAULT_REPAIR_LAYERS)
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
    def pruning_points(self) -> list[int]:
        """Where tokens are dropped: decoder layer indices, 0 meaning "before the LLM" (`pre_llm_keep_count`).
        `last_pruning_info` has one entry per point."""
        pre = [0] if self.pre_llm_keep_count is not None and self.pruning_method in PRE_LLM_METHODS else []
        return pre + list(self.pruning_layers)

    @property
    def point_keep_counts(self) -> list[int] | None:
        """Keep count of each pruning point (None: RCP's adaptive threshold)."""
        if self.pruning_keep_counts is None and self.pruning_layers:
            return None
        pre = [self.pre_llm_keep_count] if self.pre_llm_keep_count is not None else []
        return pre + list(self.pruning_keep_counts or [])

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
        self._validate_baseline_fields(n)
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

    def _validate_baseline_fields(self, n):
        method = self.pruning_method
        layers = self.pruning_layers
        pre = self.pre_llm_keep_count
        if pre is not None:
            if isinstance(pre, bool) or not isinstance(pre, int):
                raise TypeError(f"`pre_llm_keep_count` must be an int or None, got {pre!r}.")
            if method not in PRE_LLM_METHODS:
                raise ValueError(
                    f"`pre_llm_keep_count` is {pre}, but `pruning_method={method!r}` does not prune before the LLM; "
                    f"only {list(PRE_LLM_METHODS)} do. Set it to None."
                )
            if not 0 <= pre <= n:
                raise ValueError(
                    f"`pre_llm_keep_count` is {pre}, but it must be in [0, {n}] (the image has {n} visual tokens)."
                )
        ratio = self.vispruner_important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`vispruner_important_ratio` must be a number in [0, 1], got {ratio!r}.")
        if self.fastv_query not in FASTV_QUERIES:
            raise ValueError(f"`fastv_query` is {self.fastv_query!r}, but it must be one of {list(FASTV_QUERIES)}.")
        if method not in BASELINE_METHODS:
            return
        if method == "vispruner":
            if pre is None:
                raise ValueError(
                    "`pruning_method='vispruner'` prunes before the LLM and needs `pre_llm_keep_count` (the number "
                    "of visual tokens to keep, e.g. 64)."
                )
            if layers:
                raise ValueError(
                    f"`pruning_layers` is {layers}, but `pruning_method='vispruner'` prunes only before the LLM; "
                    "set `pruning_layers=[]`."
                )
            if not isinstance(self.vision_feature_layer, int):
                raise ValueError(
                    f"`pruning_method='vispruner'` needs one vision feature layer, but `vision_feature_layer` is "
                    f"{self.vision_feature_layer!r}."
                )
            if self.vision_feature_select_strategy != "default":
                raise ValueError(
                    "`pruning_method='vispruner'` ranks the patch tokens by the [CLS] token's attention and needs "
                    f"`vision_feature_select_strategy='default'`, got {self.vision_feature_select_strategy!r}."
                )
        elif method == "random":
            if pre is not None and layers:
                raise ValueError(
                    f"`pruning_method='random'` prunes either before the LLM (`pre_llm_keep_count`) or at "
                    f"`pruning_layers`, not both: got `pre_llm_keep_count={pre}` and `pruning_layers={layers}`."
                )
            if pre is None and not layers:
                raise ValueError(
                    "`pruning_method='random'` needs `pre_llm_keep_count` (prune before the LLM) or `pruning_layers` "
                    "with `pruning_keep_counts`."
                )
        elif not layers:
            raise ValueError(f"`pruning_layers` is empty; `pruning_method={method!r}` needs a pruning layer.")
        if method == "fastv" and len(layers) != 1:
            raise ValueError(
                f"`pruning_method='fastv'` prunes once, before layer K, using layer K-1's attention: "
                f"`pruning_layers` must hold one layer, got {layers}."
            )
        if layers and self.pruning_keep_counts is None:
            raise ValueError(
                f"`pruning_keep_counts` is None, but `pruning_method={method!r}` keeps a fixed number of tokens: "
                "give one count per pruning layer."
            )

    def pruned_average_tokens(self) -> float | None:
        """Average visual tokens per decoder layer implied by the keep counts (None in adaptive mode)."""
        counts = self.point_keep_counts
        if counts is None:
            return None
        per_layer = visual_tokens_per_layer(
            self.text_config.num_hidden_layers, self.num_visual_tokens, self.pruning_points, counts
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
