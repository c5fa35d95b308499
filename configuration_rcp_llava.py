"""Configuration of RCP-LLaVA: a stock `LlavaConfig` plus the visual-token pruning fields.

Reading order:
  1. `PruningMethod` and the method registry `PRUNING_METHODS`: what a config must know about each pruning method
     (where it prunes, whether it has plug-ins, its default layers). The token selector of each method lives in
     `modeling_rcp_llava.py`; a new method is one selector class registered there with its `PruningMethod`
     (`modeling_rcp_llava.register_pruning_method`).
  2. `RcpLlavaConfig`: typed fields (transformers v5 dataclass style) and their validators. `validate_pruning()`
     runs on construction, on `save_pretrained` and again before every forward, so a field edited after
     construction is checked before it is used.
  3. Per-layer token accounting (`visual_tokens_per_layer`, `RcpLlavaConfig.tokens_per_layer`): the one place that
     turns a schedule into visual tokens per decoder layer.

This file is one of the two Hub files (`save_pretrained` copies it next to `config.json`), so it
imports only the standard library and `transformers`.
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from transformers import LlavaConfig, PreTrainedConfig


# ------------------------------------------------------------------------------------------------
# 1. Pruning methods
# ------------------------------------------------------------------------------------------------


# The authors' placements (0-based decoder layers; RCP.md section 1): depth -> {budget in visual tokens of 576:
# (pruners before, repair adapters after)}. The paper prints these counted from 1. Only these reproduce its
# budgets: Table VI's retention on pruners before [1, 13, 25] averages 65.8 visual tokens per layer over 32 layers.
PAPER_PLACEMENTS = {
    32: {64: ((1, 13, 25), (22, 29)), 128: ((4, 14, 24), (22, 29)), 192: ((4, 14, 24), (22, 29))},  # 7B
    40: {64: ((1, 15, 27), (23, 35)), 128: ((3, 17, 32), (23, 35)), 192: ((3, 17, 32), (23, 35))},  # 13B
}
PAPER_NUM_VISUAL_TOKENS = 576
FastvQuery = Literal["last", "question"]
FASTV_QUERIES = get_args(FastvQuery)


def paper_placement(num_layers, budget_fraction=64 / 576):
    """The paper's pruner / repair-adapter placement for a decoder of `num_layers` layers at a budget given as a
    fraction of the visual tokens (64 / 576 = 1/9, 128 / 576 = 2/9, 192 / 576 = 1/3).

    Returns `(pruning_layers, repair_layers)`, 0-based lists. The budget picks the nearest paper budget (64, 128 or
    192 of 576). 32 and 40 layers (LLaVA-1.5-7B / 13B) get the authors' tables; any other depth scales the 7B
    placement by relative depth (layer l -> round(l * num_layers / 32), half up), then keeps the pruners in
    [1, num_layers) and strictly increasing, and the adapters at or after the first pruner, strictly increasing
    (a shallow model may get fewer adapters than two, never fewer pruners than it has room for).
    """
    # numpy's scalars (a budget computed with numpy) are numbers here: nothing of them is stored
    if isinstance(num_layers, numbers.Integral) and not isinstance(num_layers, bool):
        num_layers = int(num_layers)
    if isinstance(budget_fraction, numbers.Real) and not isinstance(budget_fraction, bool):
        budget_fraction = float(budget_fraction)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"`num_layers` must be an int >= 2 (a pruner needs a layer after layer 0), got {num_layers!r}.")
    if not (_is_number(budget_fraction) and 0 < budget_fraction <= 1):
        raise ValueError(f"`budget_fraction` must be a fraction of the visual tokens in (0, 1], got {budget_fraction!r}.")
    tokens = budget_fraction * PAPER_NUM_VISUAL_TOKENS
    budget = min(PAPER_PLACEMENTS[32], key=lambda b: (abs(b - tokens), b))
    if num_layers in PAPER_PLACEMENTS:
        pruning, repair = PAPER_PLACEMENTS[num_layers][budget]
        return list(pruning), list(repair)
    pruning, repair = PAPER_PLACEMENTS[32][budget]

    def scaled(layer):
        return int(math.floor(layer * num_layers / 32 + 0.5))

    pruning_out = []
    for layer in pruning:
        layer = max(scaled(layer), 1, pruning_out[-1] + 1 if pruning_out else 1)
        if layer < num_layers:
            pruning_out.append(layer)
    repair_out = []
    for layer in repair:
        layer = min(max(scaled(layer), pruning_out[0]), num_layers - 1)
        if not repair_out or layer > repair_out[-1]:
            repair_out.append(layer)
    return pruning_out, repair_out


def _paper_layers(config):
    """RCP's default layers: the paper's placement for this depth and `visual_token_budget` (default: 64 of 576)."""
    budget = config.visual_token_budget
    fraction = budget / config.num_visual_tokens if _is_number(budget) and 0 < budget <= config.num_visual_tokens \
        else 64 / 576
    return paper_placement(_prunable_depth(config), fraction)


def _paper_pruning_layers(config):
    """Baselines that prune at several decoder layers default to RCP's pruners at 64 of 576, with no adapter."""
    return paper_placement(_prunable_depth(config))[0], []


def _prunable_depth(config):
    """The decoder depth a default placement is derived from; a 1-layer decoder has no layer after layer 0."""
    layers = config.text_config.num_hidden_layers
    if isinstance(layers, int) and not isinstance(layers, bool) and layers < 2:
        raise ValueError(
            f"`pruning_method={config.pruning_method!r}` prunes before a decoder layer after layer 0, but this model's "
            f"`text_config.num_hidden_layers` is {layers}: there is none. Load it with `pruning_method='none'` (the "
            "stock forward), or give a deeper decoder."
        )
    return layers


def default_fastv_layer(num_layers):
    """FastV's K: 2 as in the FastV paper, 1 on shallow models (<= 8 layers)."""
    return 1 if num_layers <= 8 else 2


def _fastv_layers(config):
    return [default_fastv_layer(_prunable_depth(config))], []


@dataclass(frozen=True)
class PruningMethod:
    """What the config knows about a pruning method (its selector is in `modeling_rcp_llava.py`).

    name: the `pruning_method` value.
    in_decoder: prunes before the decoder layers in `pruning_layers` (with `pruning_keep_counts`).
    pre_llm: can prune before the LLM instead (`pre_llm_keep_count`); with `in_decoder` too, it prunes at one
        place or the other, never both.
    plugins: has RCP's trainable plug-ins (pruners at `pruning_layers`, repair adapters at `repair_layers`); only
        such a method may leave `pruning_keep_counts=None` (the adaptive threshold, Eq. 8).
    default_layers: `default_layers(config) -> (pruning_layers, repair_layers)`, used where a field is None (given
        the depth, so a model of any depth loads with the defaults); None: no layers.
    max_pruning_layers: at most this many pruning layers (FastV prunes once).
    check: extra method-specific validation, `check(config)`, raising ValueError/TypeError naming the field.
    """

    name: str
    in_decoder: bool = True
    pre_llm: bool = False
    plugins: bool = False
    default_layers: Callable | None = _paper_pruning_layers
    max_pruning_layers: int | None = None
    check: Callable | None = None

    @property
    def prunes(self) -> bool:
        return self.in_decoder or self.pre_llm


def _check_vispruner(config):
    if config.pre_llm_keep_count is None:
        raise ValueError(
            "`pruning_method='vispruner'` prunes before the LLM and needs `pre_llm_keep_count` (the number "
            "of visual tokens to keep, e.g. 64)."
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"`pruning_method='vispruner'` needs one vision feature layer, but `vision_feature_layer` is "
            f"{config.vision_feature_layer!r}."
        )
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "`pruning_method='vispruner'` ranks the patch tokens by the [CLS] token's attention and needs "
            f"`vision_feature_select_strategy='default'`, got {config.vision_feature_select_strategy!r}."
        )


PRUNING_METHODS: dict = {}


def register_pruning_spec(method: PruningMethod, overwrite: bool = False) -> PruningMethod:
    """Make `method.name` a valid `pruning_method` of the config. Users register a whole method (selector + spec)
    with `modeling_rcp_llava.register_pruning_method`, which calls this."""
    if not isinstance(method, PruningMethod):
        raise TypeError(f"`method` must be a `PruningMethod`, got {type(method).__name__}.")
    if method.name == "none" and PRUNING_METHODS.get("none") not in (None, method):
        # the stock forward, chosen by name in the model: a spec under it would only break the config's checks
        raise ValueError("'none' is the stock forward (no pruning) and cannot be registered again; name the method "
                         "otherwise.")
    if method.name in PRUNING_METHODS and not overwrite and PRUNING_METHODS[method.name] != method:
        raise ValueError(f"A pruning method named {method.name!r} is already registered; pass `overwrite=True`.")
    PRUNING_METHODS[method.name] = method
    return method


for _method in (
    PruningMethod("none", in_decoder=False, default_layers=None),  # the stock forward: no layers
    PruningMethod("rcp", plugins=True, default_layers=_paper_layers),
    PruningMethod("vispruner", in_decoder=False, pre_llm=True, default_layers=None, check=_check_vispruner),
    PruningMethod("fastv", default_layers=_fastv_layers, max_pruning_layers=1),
    PruningMethod("random", pre_llm=True),
    PruningMethod("attention_topk"),
):
    register_pruning_spec(_method)
BUILTIN_METHODS = tuple(PRUNING_METHODS)  # the methods this file defines; others are registered by their users

PRUNING_FIELDS = (
    "pruning_method", "pruning_layers", "repair_layers", "num_pruning_queries", "query_dropout", "pruner_dropout",
    "gumbel_temperature", "visual_token_budget", "pruning_keep_counts", "pruner_hidden_size", "pruner_num_heads",
    "repair_bottleneck_size", "pruning_seed", "pre_llm_keep_count", "vispruner_important_ratio", "fastv_query",
)
# The stock fields the default placement and the pruning checks read: the decoder depth, N and (VisPruner) the one
# vision feature layer.
_PLACEMENT_INPUTS = ("text_config", "vision_config", "vision_feature_select_strategy", "vision_feature_layer")


# ------------------------------------------------------------------------------------------------
# 2. The config
# ------------------------------------------------------------------------------------------------


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
            own question->visual attention, Eq. 4's prior alone). Any name in `PRUNING_METHODS`.
        pruning_layers (`list[int]`, *optional*):
            Decoder layers *before* whose self-attention a pruner runs (0-based, strictly increasing, never 0:
            pruning before the LLM is `pre_llm_keep_count`). Defaults to the paper's placement for this depth and
            `visual_token_budget` (`paper_placement`): `[1, 13, 25]` on a 32-layer decoder at 64 of 576 tokens (the
            paper prints 2, 14, 26: it counts from 1), `[4, 14, 24]` at 128 or 192, scaled by relative depth for
            other depths; `[]` for `"vispruner"`, `"none"` and `"random"` with `pre_llm_keep_count`; `[2]` for
            `"fastv"` (`[1]` up to 8 layers). The other baselines default to RCP's pruners at 64 of 576.
        repair_layers (`list[int]`, *optional*):
            Decoder layers *after* which a delayed repair adapter corrects the answer positions. Each must come
            at or after the first pruning layer, and reads the nearest pruner before it. `[]` disables the adapters.
            Defaults to the paper's placement for `"rcp"` (`[22, 29]` on 32 layers, printed 23, 30), `[]` for
            `"none"` and the baselines, which have no adapter.
        num_pruning_queries (`int`, *optional*, defaults to 16):
            Number of learnable pruning queries N_q of each pruner (Eq. 1).
        query_dropout (`float`, *optional*, defaults to 0.2):
            Probability of zeroing a pruning query (a whole row, no rescaling) during training.
        pruner_dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the pruner's cross-attention probabilities and inside its per-token MLP (training only).
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            Temperature tau of the Gumbel-Sigmoid mask (Eq. 6). Inference thresholds the logits at 0 (Eq. 8), so
            it only matters for training; a trainer anneals its own copy and passes it to `forward`
            (`gumbel_temperature=`), so this field stays what the user chose.
        visual_token_budget (`float`, *optional*):
            Target average number of visual tokens per decoder layer (the paper's "64 tokens"); used by the
            training sparsity loss and reported by the evaluation. `None` = no target.
        pruning_keep_counts (`list[int]`, *optional*):
            One count per pruning layer, non-increasing: keep exactly that many visual tokens after each pruning
            layer (top-k on the pruner's logits). `None` = RCP's adaptive threshold (Eq. 8).
        pruner_hidden_size (`int`, *optional*, defaults to 512):
            Width of the pruner's cross-attention and of its per-token MLP (the authors' 512).
        pruner_num_heads (`int`, *optional*, defaults to 4):
            Heads of the pruner's cross-attention (averaged); must divide `pruner_hidden_size`.
        repair_bottleneck_size (`int`, *optional*, defaults to 512):
            Bottleneck width of the repair adapters and of their shared pruning-context encoder (FiLM conditioning
            lives in this space too).
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

    At the default (the authors') widths the LLaVA-1.5-7B plug-ins hold 14.98M (3 pruners) + 15.81M (2 adapters
    and their shared context encoder) parameters. The paper's 16.56M + 20.15M also count parameters the authors'
    code allocates but never uses in the final method (each pruner's attention value and output projections, each
    adapter's own mask encoder and pruned-token projection, which the shared encoder replaces); adding those gives
    exactly 16.558M + 20.147M (`benchmarks/plugin_params.py`).
    """

    model_type = "rcp_llava"
    # What `Trainer.prediction_step` leaves out of the predictions: the cache (as for stock, the default) and the
    # per-sample lists of kept indices, which are no tensor to gather or pad across batches; `token_positions` and
    # `keep_masks` (tensors) carry the same information.
    # Left out of `Trainer.predict`'s outputs: the cache, the per-sample kept lists, and the image features, which a
    # batch without an image lacks (as stock's), so that every batch gives the same fields in the same places.
    keys_to_ignore_at_inference = ["past_key_values", "kept_indices", "image_hidden_states"]

    pruning_method: str = "rcp"
    pruning_layers: list[int] | None = None
    repair_layers: list[int] | None = None
    num_pruning_queries: int = 16
    query_dropout: float = 0.2
    pruner_dropout: float = 0.2
    gumbel_temperature: float = 1.0
    visual_token_budget: float | None = None
    pruning_keep_counts: list[int] | None = None
    pruner_hidden_size: int = 512
    pruner_num_heads: int = 4
    repair_bottleneck_size: int = 512
    pruning_seed: int = 0
    pre_llm_keep_count: int | None = None
    vispruner_important_ratio: float = 0.5
    fastv_query: FastvQuery = "last"

    def __post_init__(self, **kwargs):
        # A stock llava config.json carries `"model_type": "llava"`; keeping it as an instance attribute would
        # save this config as a stock LLaVA one (transformers-notes trap 6).
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        self._coerce_budget()  # before the default placement reads it
        method = PRUNING_METHODS.get(self.pruning_method) if isinstance(self.pruning_method, str) else None
        if method is not None:  # an unknown name (or not a name) is reported by the validators below
            pre_only = not method.in_decoder or (method.pre_llm and self.pre_llm_keep_count is not None)
            if pre_only or method.default_layers is None:
                defaults = ([], [])
            elif self.pruning_layers is None or self.repair_layers is None:
                defaults = method.default_layers(self)
            if self.pruning_layers is None:
                self.pruning_layers = list(defaults[0])
            if self.repair_layers is None:
                first = self.pruning_layers[0] if self.pruning_layers else None
                self.repair_layers = [r for r in defaults[1] if first is not None and r >= first]
        self.validate_pruning()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(dir, pruning_layers=...)` would set the overrides only after building the config from
        # config.json, i.e. after validating the defaults against the wrong model: merge them in first.
        # The same holds for the fields the defaults and checks read (`text_config`'s depth, the vision tower's N):
        # `from_pretrained(dir, text_config={"num_hidden_layers": 8})` must place the pruners on 8 layers. A
        # sub-config dict updates the saved one, as transformers' `from_dict` does after construction.
        config_dict = dict(config_dict)
        for name in PRUNING_FIELDS + _PLACEMENT_INPUTS:
            if name not in kwargs:
                continue
            value = kwargs.pop(name)
            saved = config_dict.get(name)
            if name in cls.sub_configs and isinstance(value, dict) and saved is not None:
                saved = saved.to_dict() if isinstance(saved, PreTrainedConfig) else dict(saved)
                value = {**saved, **value}
            config_dict[name] = value
        _warn_misspelt_fields(config_dict)
        return super().from_dict(config_dict, **kwargs)

    def validate(self):
        """transformers' `@strict` validators (also run by `save_pretrained`), then the pruning fields'."""
        super().validate()
        self.validate_pruning()

    def validate_pruning(self):
        """Check every pruning field; raises ValueError/TypeError naming the field and the fix.

        Runs on construction, on save and before every forward (fields edited after construction are checked
        before they are used). Lists given as tuples are normalised to lists.
        """
        for check in (
            self._validate_method, self._validate_layers, self._validate_plugin_sizes, self._validate_training,
            self._validate_budget, self._validate_pre_llm, self._validate_method_rules, self._validate_keep_counts,
        ):
            check()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """A stock LLaVA config (model_type 'llava') is read as 'rcp_llava' (the pruning fields take their defaults:
        RCP at the paper's placement for its depth, with new plug-ins), so that loading a llava-hf checkpoint does
        not warn about instantiating one model type from another."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "llava":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @staticmethod
    def paper_placement(num_layers, budget_fraction=64 / 576):
        """The paper's `(pruning_layers, repair_layers)` for a depth and a budget fraction (`paper_placement`):
        `RcpLlavaConfig.paper_placement(32, 64 / 576) == ([1, 13, 25], [22, 29])`."""
        return paper_placement(num_layers, budget_fraction)

    @property
    def pruning_spec(self) -> PruningMethod:
        """The registered `PruningMethod` of `pruning_method`."""
        self._validate_method()
        return PRUNING_METHODS[self.pruning_method]

    @pruning_spec.setter
    def pruning_spec(self, value):
        _refuse_derived("pruning_spec", value, "`pruning_method` (the registered method of that name): set it")

    # -- validators (in the order they run; the first problem found is reported) ---------------------

    def _validate_method(self):
        if not isinstance(self.pruning_method, str):
            raise TypeError(f"`pruning_method` must be a method's name (a str, one of {list(PRUNING_METHODS)}), got "
                            f"{self.pruning_method!r}.")
        if self.pruning_method not in PRUNING_METHODS:
            raise ValueError(
                f"`pruning_method` is {self.pruning_method!r}, but it must be one of {list(PRUNING_METHODS)}. If it is "
                "a method of your own, register its selector before building or loading the model "
                "(`modeling_rcp_llava.register_pruning_method`, after `import rcp_llava` for the Auto classes: "
                "remote code reads its own copy of this file); or load it with a built-in `pruning_method=...`."
            )

    def _validate_layers(self):
        num_layers = self.text_config.num_hidden_layers
        for name in ("pruning_layers", "repair_layers"):
            if getattr(self, name) is None:  # None means the default only where the config is built
                raise TypeError(
                    f"`{name}` is None: the default placement is filled in when the config is built, not after. Set "
                    f"both lists, e.g. `config.pruning_layers, config.repair_layers = "
                    f"RcpLlavaConfig.paper_placement({num_layers})`, or build a new config with `{name}=None`."
                )
        self.pruning_layers = layers = _as_int_list(self.pruning_layers, "pruning_layers")
        self.repair_layers = repair = _as_int_list(self.repair_layers, "repair_layers")
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
        if layers != sorted(set(layers)):
            raise ValueError(f"`pruning_layers` must be strictly increasing, got {layers}.")
        if self.pruning_spec.plugins and not layers:
            raise ValueError(
                f"`pruning_layers` is empty; `pruning_method={self.pruning_method!r}` needs at least one pruning "
                "layer."
            )
        bad = [i for i in repair if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"`repair_layers` contains {bad}, but the text model has {num_layers} layers; use indices in "
                f"[0, {num_layers})."
            )
        if repair != sorted(set(repair)):
            raise ValueError(f"`repair_layers` must be strictly increasing, got {repair}.")
        if layers and repair and repair[0] < layers[0]:
            raise ValueError(
                f"`repair_layers` starts at {repair[0]}, before the first pruning layer {layers[0]}: "
                "a repair adapter needs a preceding pruner. Move it to a layer >= the first pruning layer."
            )

    def _validate_plugin_sizes(self):
        for name in ("num_pruning_queries", "pruner_hidden_size", "pruner_num_heads", "repair_bottleneck_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}{_not_builtin(value)}.")
        if self.pruner_hidden_size % self.pruner_num_heads:
            raise ValueError(
                f"`pruner_num_heads` ({self.pruner_num_heads}) must divide `pruner_hidden_size` "
                f"({self.pruner_hidden_size}); e.g. 4 heads of a 512-wide pruner."
            )
        if isinstance(self.pruning_seed, bool) or not isinstance(self.pruning_seed, int):
            seed = self.pruning_seed
            raise TypeError(f"`pruning_seed` must be an int, got {seed!r}{_not_builtin(seed)}.")

    def _validate_training(self):
        for name in ("query_dropout", "pruner_dropout"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value < 1.0):
                raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}{_not_builtin(value)}.")
        check_gumbel_temperature(self.gumbel_temperature, "`gumbel_temperature`")

    def _coerce_budget(self):
        budget = self.visual_token_budget
        if isinstance(budget, numbers.Real) and not isinstance(budget, (bool, int, float)):
            self.visual_token_budget = float(budget)  # numpy's scalars: a number, and JSON-serialisable

    def _validate_budget(self):
        self._coerce_budget()
        n = self.num_visual_tokens
        budget = self.visual_token_budget
        if budget is not None and not (_is_number(budget) and 0 < budget <= n):
            raise ValueError(
                f"`visual_token_budget` is {budget!r}, but it must be a number in (0, {n}] (the image has {n} "
                "visual tokens), or None."
            )
        layers = self.text_config.num_hidden_layers
        if budget is not None and budget < 1 <= n / layers:
            # An in-decoder method keeps all n tokens in layer 0, so its mean over the layers is at least n / L
            # (>= 1 here), and a pre-LLM method keeps a whole number of tokens in every layer (a mean of 0 or >= 1):
            # a value below 1 is a fraction given where a count is meant.
            raise ValueError(
                f"`visual_token_budget` is {budget!r}, but it counts visual tokens per decoder layer (e.g. 64 of 576), "
                f"not a fraction: for {budget:g} of the {n} visual tokens give {budget * n:g}."
            )

    def _validate_pre_llm(self):
        n = self.num_visual_tokens
        pre, method = self.pre_llm_keep_count, self.pruning_spec
        if pre is not None:
            if isinstance(pre, bool) or not isinstance(pre, int):
                raise TypeError(f"`pre_llm_keep_count` must be an int or None, got {pre!r}{_not_builtin(pre)}.")
            if not method.pre_llm:
                pre_methods = [name for name, m in PRUNING_METHODS.items() if m.pre_llm]
                raise ValueError(
                    f"`pre_llm_keep_count` is {pre}, but `pruning_method={method.name!r}` does not prune before the "
                    f"LLM; only {pre_methods} do. Set it to None."
                )
            if not 0 <= pre <= n:
                raise ValueError(
                    f"`pre_llm_keep_count` is {pre}, but it must be in [0, {n}] (the image has {n} visual tokens)."
                )
        ratio = self.vispruner_important_ratio
        if not (_is_number(ratio) and 0.0 <= ratio <= 1.0):
            raise ValueError(f"`vispruner_important_ratio` must be a number in [0, 1], got "
                             f"{ratio!r}{_not_builtin(ratio)}.")
        if self.fastv_query not in FASTV_QUERIES:
            raise ValueError(f"`fastv_query` is {self.fastv_query!r}, but it must be one of {list(FASTV_QUERIES)}.")

    def _validate_method_rules(self):
        """Where the method prunes and how many tokens it keeps ("none" and plug-in methods: nothing to check)."""
        method, layers, pre = self.pruning_spec, self.pruning_layers, self.pre_llm_keep_count
        if method.check is not None:
            method.check(self)
        if method.plugins or not method.prunes:
            return
        name = method.name
        if not method.in_decoder and pre is None:
            raise ValueError(
                f"`pruning_method={name!r}` prunes before the LLM and needs `pre_llm_keep_count` (the number of "
                "visual tokens to keep)."
            )
        if layers and not method.in_decoder:
            raise ValueError(
                f"`pruning_layers` is {layers}, but `pruning_method={name!r}` prunes only before the LLM; "
                "set `pruning_layers=[]`."
            )
        if method.in_decoder and method.pre_llm:
            if pre is not None and layers:
                raise ValueError(
                    f"`pruning_method={name!r}` prunes either before the LLM (`pre_llm_keep_count`) or at "
                    f"`pruning_layers`, not both: got `pre_llm_keep_count={pre}` and `pruning_layers={layers}`."
                )
            if pre is None and not layers:
                raise ValueError(
                    f"`pruning_method={name!r}` needs `pre_llm_keep_count` (prune before the LLM) or "
                    "`pruning_layers` with `pruning_keep_counts`."
                )
        elif method.in_decoder and not layers:
            raise ValueError(f"`pruning_layers` is empty; `pruning_method={name!r}` needs a pruning layer.")
        if method.max_pruning_layers is not None and len(layers) > method.max_pruning_layers:
            what = "one layer" if method.max_pruning_layers == 1 else f"at most {method.max_pruning_layers} layers"
            raise ValueError(
                f"`pruning_method={name!r}` prunes at {what}: `pruning_layers` must hold {what}, got {layers}."
            )
        if layers and self.pruning_keep_counts is None:
            raise ValueError(
                f"`pruning_keep_counts` is None, but `pruning_method={name!r}` keeps a fixed number of tokens: "
                "give one count per pruning layer."
            )

    def _validate_keep_counts(self):
        if self.pruning_keep_counts is None:
            return
        n, layers = self.num_visual_tokens, self.pruning_layers
        self.pruning_keep_counts = counts = _as_int_list(self.pruning_keep_counts, "pruning_keep_counts")
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
            raise ValueError(f"`pruning_keep_counts` must be non-increasing (masks are cumulative), got {counts}.")

    # -- derived quantities -------------------------------------------------------------------------

    @property
    def pruning_points(self) -> list[int]:
        """Where tokens are dropped: decoder layer indices, 0 meaning "before the LLM" (`pre_llm_keep_count`).
        `last_pruning_info` has one entry per point."""
        pre = [0] if self.pre_llm_keep_count is not None and self.pruning_spec.pre_llm else []
        return pre + list(self.pruning_layers)

    @pruning_points.setter
    def pruning_points(self, value):
        _refuse_derived("pruning_points", value, "`pruning_layers` (and `pre_llm_keep_count` for the point before "
                                                 "the LLM): set those")

    @property
    def point_keep_counts(self) -> list[int] | None:
        """Keep count of each pruning point (None: RCP's adaptive threshold)."""
        self.validate_pruning()  # fields edited after construction: a count list of the wrong length would zip short
        if self.pruning_keep_counts is None and self.pruning_layers:
            return None
        pre = [self.pre_llm_keep_count] if self.pre_llm_keep_count is not None else []
        return pre + list(self.pruning_keep_counts or [])

    @point_keep_counts.setter
    def point_keep_counts(self, value):
        _refuse_derived("point_keep_counts", value, "`pruning_keep_counts` (and `pre_llm_keep_count`): set those")

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image that reach the language model (N): `visual_tokens_per_image`."""
        return visual_tokens_per_image(self)

    @num_visual_tokens.setter
    def num_visual_tokens(self, value):
        _refuse_derived("num_visual_tokens", value, "the vision tower's patch grid, `(vision_config.image_size // "
                                                    "vision_config.patch_size) ** 2`, plus its CLS token under "
                                                    "`vision_feature_select_strategy='full'`: set those")

    def tokens_per_layer(self) -> list[int] | None:
        """Visual tokens each decoder layer processes under this config's fixed counts (all N for "none"; None for
        RCP's adaptive threshold, which keeps a number that depends on the input)."""
        self.validate_pruning()  # as `point_keep_counts`: never count from an invalid edit
        num_layers, n = self.text_config.num_hidden_layers, self.num_visual_tokens
        if not self.pruning_spec.prunes:
            return [n] * num_layers
        counts = self.point_keep_counts
        if counts is None:
            return None
        return visual_tokens_per_layer(num_layers, n, self.pruning_points, counts)

    def pruned_average_tokens(self) -> float | None:
        """Average visual tokens per decoder layer implied by the keep counts (None in adaptive mode)."""
        per_layer = self.tokens_per_layer()
        return None if per_layer is None else sum(per_layer) / len(per_layer)


# A config saved alone (`config.save_pretrained(folder)`) writes this file beside it and `auto_map["AutoConfig"]`, as
# transformers does for a registered custom config, so `AutoConfig.from_pretrained(folder, trust_remote_code=True)`
# reads it where rcp-llava is not installed (the model's `save_pretrained` adds the model classes to the map).
RcpLlavaConfig.register_for_auto_class()


# ------------------------------------------------------------------------------------------------
# 3. Per-layer token accounting
# ------------------------------------------------------------------------------------------------


def visual_tokens_per_image(config) -> int:
    """N, the visual tokens per image that reach the language model, of any LLaVA config (a stock `LlavaConfig`
    too): the patch grid, plus the CLS token with `vision_feature_select_strategy="full"`."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if config.vision_feature_select_strategy == "full" else n


def visual_tokens_per_layer(num_layers, num_visual_tokens, pruning_layers, keep_counts):
    """Visual tokens each decoder layer processes when `keep_counts[i]` survive the pruner before layer
    `pruning_layers[i]` (masks are cumulative, so a layer inherits the last pruner's count; 0 = before the LLM)."""
    counts, current = [], num_visual_tokens
    schedule = dict(zip(pruning_layers, keep_counts))
    for layer in range(num_layers):
        current = min(current, schedule.get(layer, current))
        counts.append(current)
    return counts


def _warn_misspelt_fields(config_dict):
    """A saved key that is not a pruning field but reads like one (`pruning_layer`, `repair_layer`) would be kept
    as a stray attribute while the real field takes its default: warn, naming the field it resembles."""
    import difflib
    import warnings

    for key in config_dict:
        if key in PRUNING_FIELDS:
            continue
        close = difflib.get_close_matches(key, PRUNING_FIELDS, n=1, cutoff=0.85)
        if close:
            warnings.warn(
                f"The config has an unknown key {key!r}: did you mean {close[0]!r}? It is ignored, and {close[0]!r} "
                "keeps its value.", UserWarning, stacklevel=3,
            )


def _refuse_derived(name, value, source):
    """A derived property given a value (a config kwarg, `update`, `from_pretrained(..., name=...)`, which transformers
    all apply with `setattr`): a ValueError naming where it comes from, not "property has no setter"."""
    raise ValueError(f"`{name}` is derived from {source}; it cannot be set (got {value!r}).")


def check_gumbel_temperature(value, name):
    """ValueError unless `value` is a finite temperature > 0 (Eq. 6); `name` says where it came from."""
    if not (_is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive float, got {value!r}{_not_builtin(value)}.")


def _not_builtin(value):
    """The end of a type error's message for a numpy (or other non-builtin) number: its type and the fix, so that
    "must be a positive int, got np.int64(8)" does not read as a contradiction (config fields are saved as JSON)."""
    if isinstance(value, numbers.Number) and type(value) not in (int, float, bool):
        kind = "int" if isinstance(value, numbers.Integral) else "float"
        return f" ({type(value).__name__}, not a Python {kind}: pass {kind}(value))"
    return ""


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _as_int_list(value, name):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"`{name}` must be a list of ints, got {value!r}.")
    out = list(value)
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise TypeError(f"`{name}` must be a list of ints, got {value!r}{_not_builtin(bad[0])}.")
    return out


__all__ = ["RcpLlavaConfig", "PruningMethod", "PRUNING_METHODS", "PAPER_PLACEMENTS", "default_fastv_layer", "paper_placement",
           "register_pruning_spec", "visual_tokens_per_image"]
