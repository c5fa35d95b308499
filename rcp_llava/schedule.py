"""Budgets and token schedules: the one place that turns a budget into keep counts and counts visual tokens.

    from rcp_llava.schedule import parse_budget, budget_count, rcp_keep_counts, scheduled_tokens_per_layer
    label, fraction = parse_budget("1/9")
    k = budget_count(fraction, 144)                     # 16 kept visual tokens
    counts = rcp_keep_counts(k, [1, 2, 3], 4, 144)      # [35, 10, 3]: RCP's fixed counts averaging k

* A budget is a fraction of the N visual tokens of an image ("1/3", "0.25"). It becomes a count with ONE rule,
  `budget_count`: round half up, at least 1 (`round_count`). Python's `round` rounds half to even, so two callers
  using it and `floor(x + 0.5)` could disagree by one token on the same budget; every caller uses this module.
* `rcp_keep_counts` spreads a budget k over RCP's pruning layers with the proportions of the paper's Table VI,
  so that the average over the layers from the first pruner is k.
* Tokens per layer: `configuration_rcp_llava.visual_tokens_per_layer` is the single source of truth (the config
  uses it too); the helpers here apply it to a config or to measured kept counts, and average the result.

`rcp_llava.flops.keep_counts_for_budget` is a different solver on purpose (an average over ALL layers, given
proportions, exhaustive search near the real solution): it reproduces the paper's FLOPs/KV schedules.
"""

import math
from fractions import Fraction

from configuration_rcp_llava import visual_tokens_per_layer
from rcp_llava.flops import check_pruning_layers


# Table VI of the paper: % of the 576 visual tokens kept after the pruners at layers 2 / 14 / 26 (64-token budget).
# Its proportions serve every budget here; the table's 128- and 192-token rows (25.84 / 4.13 / 1.54 and
# 60.21 / 7.47 / 1.56) put more of the budget in the first stage.
TABLE_VI_RETENTION = (16.72, 4.59, 1.44)


# ------------------------------------------------------------------------------------------------
# Budget -> count
# ------------------------------------------------------------------------------------------------


def parse_budget(text):
    """`"1/3"`, `"0.25"` -> a fraction in (0, 1]. Returns `(label, fraction)`."""
    label = str(text).strip()
    try:
        value = float(Fraction(label))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"Budget {text!r} is not a fraction like '1/3' or '0.25'.") from None
    if not 0 < value <= 1:
        raise ValueError(f"Budget {text!r} must be a fraction of the visual tokens in (0, 1].")
    return label, value


def round_count(value):
    """A real number of tokens as a count: round half up (not Python's half-to-even `round`), at least 1."""
    return max(1, int(math.floor(value + 0.5)))


def budget_count(fraction, num_visual_tokens):
    """k = round(fraction * N), half up, at least 1 (1/3, 2/9, 1/9 of 144 -> 48, 32, 16). In exact arithmetic on the
    fraction the float stands for (`parse_budget`'s "0.29" is the float 0.28999...: read as 29/100, 0.29 of 50 is
    14.5 and rounds to 15, where the float's product rounded to 14)."""
    try:
        exact = Fraction(fraction)
    except TypeError:  # a numpy scalar: its float
        exact = Fraction(float(fraction))
    exact = exact.limit_denominator(10**9) * num_visual_tokens
    return max(1, math.floor(exact + Fraction(1, 2)))


# ------------------------------------------------------------------------------------------------
# RCP's fixed keep counts
# ------------------------------------------------------------------------------------------------


def stage_proportions(num_pruning_layers):
    """Relative retention after each pruner: Table VI's three values, log-linearly interpolated over the relative
    pruner index t = i / (P - 1) (P = 1: the first value; P = 3: Table VI itself)."""
    if num_pruning_layers < 1:
        raise ValueError("At least one pruning layer is needed.")
    logs = [math.log(v) for v in TABLE_VI_RETENTION]
    out = []
    for i in range(num_pruning_layers):
        t = 0.0 if num_pruning_layers == 1 else i / (num_pruning_layers - 1)
        x = t * (len(logs) - 1)
        lo = min(int(math.floor(x)), len(logs) - 2)
        frac = x - lo
        out.append(math.exp(logs[lo] * (1 - frac) + logs[lo + 1] * frac))
    return out


def rcp_keep_counts(k, pruning_layers, num_layers, num_visual_tokens):
    """Fixed per-pruner counts whose average over the layers from the first pruner is k.

    The proportions between stages are `stage_proportions` (Table VI). The real-valued solution c_i = a * w_i is
    capped at N (the excess goes to the other stages), rounded (`round_count`), made non-increasing (masks are
    cumulative), then nudged by +-1 while that brings the average closer to k.
    """
    layers = check_pruning_layers(pruning_layers, num_layers)
    n = num_visual_tokens
    if not 0 < k <= n:
        raise ValueError(f"Keep count {k} is outside (0, {n}].")
    spans = [b - a for a, b in zip(layers, layers[1:] + [num_layers])]  # layers each stage's count holds for
    weights = stage_proportions(len(layers))
    target = k * sum(spans)
    capped = set()
    while True:
        free = [i for i in range(len(layers)) if i not in capped]
        rest = target - sum(spans[i] * n for i in capped)
        if not free:
            real = [float(n)] * len(layers)
            break
        scale = rest / sum(spans[i] * weights[i] for i in free)
        real = [float(n) if i in capped else scale * weights[i] for i in range(len(layers))]
        over = [i for i in free if real[i] > n]
        if not over:
            break
        capped.update(over)
    counts = [min(n, round_count(c)) for c in real]
    for i in range(1, len(counts)):
        counts[i] = min(counts[i], counts[i - 1])

    def error(c):
        return abs(sum(s * x for s, x in zip(spans, c)) - target)

    improved = True
    while improved:
        improved = False
        for i in range(len(counts)):
            for step in (1, -1):
                trial = list(counts)
                trial[i] += step
                if not 1 <= trial[i] <= n or any(b > a for a, b in zip(trial, trial[1:])):
                    continue
                if error(trial) < error(counts) - 1e-9:
                    counts, improved = trial, True
    return counts


# ------------------------------------------------------------------------------------------------
# Tokens per layer
# ------------------------------------------------------------------------------------------------


def scheduled_tokens_per_layer(config):
    """Visual tokens per decoder layer that `config`'s fixed counts give (None for the adaptive threshold): the
    config's own accounting, `RcpLlavaConfig.tokens_per_layer`."""
    return config.tokens_per_layer()


def kept_tokens_per_layer(config, kept_counts, batch_size, has_image=None):
    """Per-sample visual tokens per decoder layer from measured kept counts `(B, P)` at `config`'s pruning points
    (None: nothing was pruned, every layer sees all N). `has_image` (B,) bools, e.g. `last_pruning_info.has_image`:
    a row without an image sees 0 at every layer (without it, its layers before the first pruner read N, which it
    never had). Returns B lists of `num_layers` ints."""
    num_layers, n = config.text_config.num_hidden_layers, config.num_visual_tokens
    if kept_counts is None:
        rows = [[n] * num_layers for _ in range(batch_size)]
    else:
        points = config.pruning_points
        rows = [visual_tokens_per_layer(num_layers, n, points, [int(c) for c in row]) for row in kept_counts.tolist()]
    if has_image is not None:
        rows = [row if bool(image) else [0] * num_layers for row, image in zip(rows, has_image)]
    return rows


def average_tokens(per_layer, first_layer=0):
    """Mean of a per-layer token list over the layers from `first_layer` on."""
    layers = per_layer[first_layer:]
    return sum(layers) / len(layers)


__all__ = [
    "TABLE_VI_RETENTION", "average_tokens", "budget_count", "kept_tokens_per_layer", "parse_budget",
    "rcp_keep_counts", "round_count", "scheduled_tokens_per_layer", "stage_proportions", "visual_tokens_per_layer",
]
