"""The analytic FLOPs / KV counter (`rcp_llava.flops`) against torch's FlopCounterMode on a tiny stock
LLaVA, and against the paper's LLaVA-1.5-7B efficiency numbers (Table III, Table VI).

Which attention torch can measure: with `attn_implementation="eager"` attention is two `bmm`s, which
FlopCounterMode counts in full (the whole T x T score matrix, no causal discount). With `"sdpa"` on CPU the
call dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which has no flop formula in torch
2.13, so the attention matmuls vanish from the count. The comparisons therefore run in eager mode.

What neither side counts: softmax, RMSNorm/LayerNorm, activations, RoPE (an elementwise product in
transformers 5.23), residual adds, biases (`addmm` is counted as its matmul only), embedding look-ups.
With that, the analytic counter and torch agree *exactly*.
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from rcp_llava.flops import (
    FlopsBreakdown,
    analytic_kv_bytes,
    analytic_kv_bytes_per_layer,
    decoder_layer_flops,
    ideal_tokens_per_layer,
    keep_counts_for_budget,
    kv_cache_bytes,
    kv_cache_bytes_per_layer,
    llava_decode_flops,
    llava_flops,
    schedule_tokens_per_layer,
)


IMAGE_TOKEN = 99
NUM_TEXT = 7  # tiny prompt: 3 text tokens, 16 image tokens, 4 text tokens

# The paper's LLaVA-1.5-7B setting. A typical LLaVA-1.5 prompt (v1 system prompt ~35 tokens, "USER:",
# the question, "Answer the question using a single word or phrase.", "ASSISTANT:") is ~50-70 tokens
# besides the 576 image tokens; we use 64.
PAPER_TEXT_TOKENS = 64
PAPER_TFLOPS = 9.6e12
PAPER_KV_MB = 302.4
# Table VI: retention (of 576) after each pruner, per budget, at the pruners' layers as the paper prints them
# (counted from 1: 5, 15, 25 at 192 and 128 tokens; 2, 14, 26 at 64), here 0-based as the model takes them.
PAPER_SCHEDULES = {
    192: ([4, 14, 24], [0.6021, 0.0747, 0.0156]),
    128: ([4, 14, 24], [0.2584, 0.0413, 0.0154]),
    64: ([1, 13, 25], [0.1672, 0.0459, 0.0144]),
}


def tiny_config(attn_implementation="eager"):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )  # (16 / 4)^2 = 16 visual tokens
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        vocab_size=100,
        max_position_embeddings=128,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, attn_implementation=attn_implementation
    )


def llava_7b_config():
    vision = CLIPVisionConfig(  # CLIP ViT-L/14-336
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_config()
    model = LlavaForConditionalGeneration(config).eval()
    return config, model


def prompt_ids(batch_size=1):
    ids = [1, 2, 3] + [IMAGE_TOKEN] * 16 + [4, 5, 6, 7]
    return torch.tensor([ids] * batch_size)


def pixels(batch_size=1):
    return torch.randn(batch_size, 3, 16, 16)


def counted(fn, *args, **kwargs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def attention_flops(config, tokens):
    text = config.text_config
    return sum(4 * text.num_attention_heads * text.head_dim * t * t for t in tokens)


# ---------------------------------------------------------------------------------------------------------
# 1. Agreement with torch's FlopCounterMode


def test_decoder_prefill_matches_flop_counter(tiny):
    config, model = tiny
    seq = 16 + NUM_TEXT
    embeds = torch.randn(1, seq, config.text_config.hidden_size)
    measured, _ = counted(model.model.language_model, inputs_embeds=embeds, use_cache=False)
    assert llava_flops(config, num_text_tokens=NUM_TEXT).decoder == measured


def test_vision_tower_matches_flop_counter(tiny):
    config, model = tiny
    measured, _ = counted(model.model.vision_tower, pixels())
    assert llava_flops(config, num_text_tokens=0, vision_layers="all").vision == measured
    # vision_feature_layer=-2 needs all but the last layer; transformers still runs them all.
    needed = llava_flops(config, num_text_tokens=0, vision_layers="needed").vision
    assert needed < measured
    measured_features, _ = counted(model.model.get_image_features, pixels())
    expected = llava_flops(config, num_text_tokens=0)
    assert measured_features == expected.vision + expected.projector


@pytest.mark.parametrize("batch_size, logits_to_keep", [(1, 1), (2, 1), (2, 0)])
def test_full_forward_matches_flop_counter(tiny, batch_size, logits_to_keep):
    config, model = tiny
    measured, _ = counted(
        model, input_ids=prompt_ids(batch_size), pixel_values=pixels(batch_size), logits_to_keep=logits_to_keep
    )
    expected = llava_flops(config, num_text_tokens=NUM_TEXT, batch_size=batch_size, logits_to_keep=logits_to_keep)
    assert expected.total == measured


def test_projector_reads_every_vision_feature_layer():
    """`vision_feature_layer` as a list concatenates those layers' features: the projector's first map is that many
    times wider (FlopCounterMode on transformers' own `get_image_features`)."""
    torch.manual_seed(0)
    config = tiny_config()
    config.vision_feature_layer = [-3, -2]
    model = LlavaForConditionalGeneration(config).eval()
    measured, _ = counted(model.model.get_image_features, pixels())
    expected = llava_flops(config, num_text_tokens=0)
    assert measured == expected.vision + expected.projector
    assert expected.projector > llava_flops(tiny_config(), num_text_tokens=0).projector


def test_lm_head_scores_at_most_the_last_layers_tokens():
    config = tiny_config()
    vocab, hidden = config.text_config.vocab_size, config.text_config.hidden_size
    got = llava_flops(config, num_text_tokens=4, decoder_tokens_per_layer=[20, 10, 2], logits_to_keep=5)
    assert got.lm_head == 2 * 2 * hidden * vocab  # 2 tokens reach the head, not 5
    assert llava_flops(config, num_text_tokens=4, logits_to_keep=3, batch_size=2).lm_head == 2 * 2 * 3 * hidden * vocab


def test_decode_step_matches_flop_counter(tiny):
    config, model = tiny
    with torch.no_grad():
        out = model(input_ids=prompt_ids(), pixel_values=pixels(), use_cache=True)
    cache = out.past_key_values
    seq = 16 + NUM_TEXT
    measured, _ = counted(model, input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)
    expected = llava_decode_flops(config, [seq] * config.text_config.num_hidden_layers)
    assert expected.total == measured
    assert expected.vision == expected.projector == 0


def test_pruned_schedule_matches_layer_by_layer_run(tiny):
    """Physical discard: each layer runs on the kept tokens only, so its queries and keys are its count."""
    config, model = tiny
    lm = model.model.language_model
    tokens = schedule_tokens_per_layer(3, NUM_TEXT, 16, [1, 2], [9, 4])
    assert tokens == [23, 16, 11]

    def run():
        hidden = torch.randn(1, tokens[0], config.text_config.hidden_size)
        for layer, length in zip(lm.layers, tokens):
            hidden = hidden[:, :length]  # which tokens are kept does not change the FLOPs
            positions = torch.arange(length)[None]
            hidden = layer(hidden, position_embeddings=lm.rotary_emb(hidden, positions), position_ids=positions)
        return hidden

    measured, _ = counted(run)
    expected = llava_flops(config, num_text_tokens=NUM_TEXT, decoder_tokens_per_layer=tokens)
    assert expected.decoder == measured
    assert list(expected.decoder_per_layer) == [decoder_layer_flops(config, t) for t in tokens]


def test_sdpa_on_cpu_hides_attention_from_flop_counter():
    """Documents why the comparisons use eager: on CPU, sdpa's attention is invisible to FlopCounterMode
    (if a later torch registers a formula for it, the count becomes complete and this still passes)."""
    config = tiny_config("sdpa")
    model = LlavaForConditionalGeneration(config).eval()
    seq = 16 + NUM_TEXT
    measured, _ = counted(model.model.language_model, inputs_embeds=torch.randn(1, seq, 32), use_cache=False)
    analytic = llava_flops(config, num_text_tokens=NUM_TEXT).decoder
    assert measured in (analytic, analytic - attention_flops(config, [seq] * 3))


# ---------------------------------------------------------------------------------------------------------
# 2. LLaVA-1.5-7B against the paper's 9.6 TFLOPs


def test_llava_7b_total_near_paper():
    """Reading: 2 FLOPs per MAC; vision tower (all 24 layers) + projector + decoder over 576 + 64 tokens +
    lm_head on the last token. That gives 8.91 T, 7.2% under the paper's 9.6 T (the paper's figure is
    reached at ~115 text tokens). Counting 1 FLOP per MAC gives ~4.5 T: not the paper's convention."""
    config = llava_7b_config()
    full = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS)
    assert abs(full.total - PAPER_TFLOPS) / PAPER_TFLOPS < 0.10
    assert abs(full.total / 2 - PAPER_TFLOPS) / PAPER_TFLOPS > 0.4  # MAC counting does not fit
    assert full.vision == llava_flops(config, num_text_tokens=0).vision  # the image cost is prompt-independent
    assert full.decoder / full.total > 0.95
    assert llava_flops(config, num_text_tokens=115).total == pytest.approx(PAPER_TFLOPS, rel=0.01)
    needed = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS, vision_layers="needed")
    assert full.vision - needed.vision == (full.vision - 2 * 576 * 1024 * 3 * 14 * 14) // 24  # one CLIP layer
    text_only = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS, include_vision=False)
    assert text_only.vision == text_only.projector == 0 and text_only.decoder == full.decoder


# ---------------------------------------------------------------------------------------------------------
# 3. KV cache


def test_llava_7b_visual_kv_matches_paper():
    """576 tokens x 32 layers x (K, V) x 32 heads x 128 x 2 bytes = 301,989,888 B: 302.0 MB with MB = 10^6
    (the paper rounds 0.524 MB per token to 0.525, hence 302.4), but 288.0 MiB."""
    config = llava_7b_config()
    kv = analytic_kv_bytes(config, [576] * 32, dtype_bytes=2)
    assert kv == 576 * 32 * 2 * 4096 * 2
    assert abs(kv / 1e6 - PAPER_KV_MB) / PAPER_KV_MB < 0.01
    assert abs(kv / 2**20 - PAPER_KV_MB) / PAPER_KV_MB > 0.04  # MiB does not fit
    assert analytic_kv_bytes(config, 576, dtype_bytes=torch.float16) == kv
    # The paper's pruned storage (100.8 / 67.2 / 33.6 MB) is the budget times the per-token size.
    for budget, paper_mb in [(192, 100.8), (128, 67.2), (64, 33.6)]:
        layers, rates = PAPER_SCHEDULES[budget]
        keep = keep_counts_for_budget(32, 576, layers, budget, rates)
        visual = schedule_tokens_per_layer(32, 0, 576, layers, keep)
        assert abs(analytic_kv_bytes(config, visual) / 1e6 - paper_mb) / paper_mb < 0.01


def test_a_head_dim_other_than_hidden_over_heads_and_the_last_vision_layer_match_flop_counter():
    """`head_dim` set apart from hidden / heads (Qwen3, Gemma) was read as hidden / heads (166400 for 240640 FLOPs
    of a layer at 10 tokens), and `vision_feature_layer=-1` with `vision_layers="needed"` (every layer) was refused
    as out of range. Both against FlopCounterMode on the stock model; decode at batch 4 scores 4 rows in the head."""
    config = tiny_config()
    config.text_config.head_dim = 16  # 4 heads x 16 = 64, not 32
    config.vision_config.num_hidden_layers = 3
    config.vision_feature_layer = -1
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    seq = 16 + NUM_TEXT
    measured, _ = counted(model.model.language_model, inputs_embeds=torch.randn(1, seq, 32), use_cache=False)
    assert llava_flops(config, num_text_tokens=NUM_TEXT).decoder == measured
    measured, _ = counted(model.model.vision_tower, pixels())
    assert llava_flops(config, num_text_tokens=0, vision_layers="needed").vision == measured
    with torch.no_grad():
        cache = model(input_ids=prompt_ids(4), pixel_values=pixels(4), use_cache=True).past_key_values
    measured, _ = counted(model, input_ids=torch.full((4, 1), 8), past_key_values=cache, use_cache=True)
    step = llava_decode_flops(config, [seq] * 3, batch_size=4)
    assert step.total == measured and step.lm_head == 4 * 2 * 32 * 100


def test_a_legacy_tuple_cache_counts_keys_and_values():
    """A tuple of (key, value) per layer (the legacy cache format) counted the keys alone: 320 bytes for 640."""
    k = torch.zeros(1, 2, 5, 8, dtype=torch.float16)
    assert kv_cache_bytes(((k, k), (k, k))) == 2 * 2 * k.numel() * 2 == 640


def test_dynamic_cache_bytes_match_analytic(tiny):
    config, model = tiny
    with torch.no_grad():
        out = model(input_ids=prompt_ids(2), pixel_values=pixels(2), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache)
    seq = 16 + NUM_TEXT
    expected = analytic_kv_bytes(config, seq, dtype_bytes=torch.float32, batch_size=2)
    assert kv_cache_bytes(cache) == expected == 3 * 2 * 2 * 2 * 8 * seq * 4
    # Pruned layers hold different lengths; fp16 as in the paper.
    text = config.text_config
    tokens = [23, 16, 11]
    pruned = DynamicCache()
    for layer, length in enumerate(tokens):
        kv = torch.zeros(2, text.num_key_value_heads, length, text.head_dim, dtype=torch.float16)
        pruned.update(kv, kv.clone(), layer)
    assert kv_cache_bytes_per_layer(pruned) == analytic_kv_bytes_per_layer(config, tokens, 2, batch_size=2)
    assert kv_cache_bytes(pruned) == analytic_kv_bytes(config, tokens, 2, batch_size=2)


# ---------------------------------------------------------------------------------------------------------
# 4. Pruned schedules on LLaVA-1.5-7B


def test_paper_schedules_are_the_papers_printed_layers_counted_from_1():
    """The paper prints layer numbers counted from 1; read as 0-based, its 64-token schedule holds all 576 tokens
    through two layers and averages 83.25 visual tokens per layer, not Table VI's budget."""
    from configuration_rcp_llava import paper_placement

    printed = {192: [5, 15, 25], 128: [5, 15, 25], 64: [2, 14, 26]}
    for budget, (layers, rates) in PAPER_SCHEDULES.items():
        assert layers == [p - 1 for p in printed[budget]] == paper_placement(32, budget / 576)[0]
    layers, rates = PAPER_SCHEDULES[64]
    keep = [round(r * 576) for r in rates]
    assert sum(schedule_tokens_per_layer(32, 0, 576, layers, keep)) / 32 == 65.5
    assert sum(schedule_tokens_per_layer(32, 0, 576, printed[64], keep)) / 32 == 83.25
    assert keep_counts_for_budget(32, 576, layers, 64, rates) == [93, 25, 8]  # the docstring's example


def test_flops_docstring_examples_hold():
    import doctest

    import rcp_llava.flops

    result = doctest.testmod(rcp_llava.flops)
    assert result.attempted >= 2 and result.failed == 0


def test_paper_64_token_schedule_is_consistent():
    config = llava_7b_config()
    layers, rates = PAPER_SCHEDULES[64]
    keep = [round(r * 576) for r in rates]
    assert keep == [96, 26, 8]
    tokens = schedule_tokens_per_layer(32, PAPER_TEXT_TOKENS, 576, layers, keep)
    assert tokens[0] == 640 and tokens[1] == tokens[12] == 160 and tokens[13] == 90 and tokens[-1] == 72
    assert all(b <= a for a, b in zip(tokens, tokens[1:]))
    full = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS)
    pruned = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS, decoder_tokens_per_layer=tokens)
    assert pruned.decoder == sum(pruned.decoder_per_layer) == sum(decoder_layer_flops(config, t) for t in tokens)
    assert pruned.total == pruned.vision + pruned.projector + pruned.decoder + pruned.lm_head
    assert (pruned.vision, pruned.projector, pruned.lm_head) == (full.vision, full.projector, full.lm_head)
    per_layer = pruned.decoder_per_layer
    assert all(b <= a for a, b in zip(per_layer, per_layer[1:]))
    assert 0.2 < pruned.total / full.total < 0.3


def test_budget_schedules_are_ordered():
    config = llava_7b_config()
    full = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS)
    totals = []
    for budget in (64, 128, 192):
        layers, rates = PAPER_SCHEDULES[budget]
        keep = keep_counts_for_budget(32, 576, layers, budget, rates)
        visual = schedule_tokens_per_layer(32, 0, 576, layers, keep)
        assert abs(sum(visual) / 32 - budget) < 0.1
        tokens = [t + PAPER_TEXT_TOKENS for t in visual]
        staged = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS, decoder_tokens_per_layer=tokens)
        ideal = llava_flops(
            config,
            num_text_tokens=PAPER_TEXT_TOKENS,
            decoder_tokens_per_layer=ideal_tokens_per_layer(32, PAPER_TEXT_TOKENS, budget),
        )
        # Same average: near-equal FLOPs, the uniform schedule being the lower bound (convex T^2 term).
        if sum(visual) == 32 * budget:
            assert ideal.total <= staged.total
        assert staged.total == pytest.approx(ideal.total, rel=0.02)
        totals.append(staged.total)
    assert totals == sorted(totals) and totals[-1] < full.total


def test_decode_and_breakdown_helpers():
    config = llava_7b_config()
    step = llava_decode_flops(config, 640)
    assert step.decoder == 32 * decoder_layer_flops(config, 1, 641)
    both = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS) + step
    assert isinstance(both, FlopsBreakdown) and len(both.decoder_per_layer) == 32
    assert both.as_dict()["total"] == both.total
    prefill = llava_flops(config, num_text_tokens=PAPER_TEXT_TOKENS)
    for part in ("vision", "projector", "decoder", "lm_head", "total"):  # every part of both passes
        assert getattr(both, part) == getattr(prefill, part) + getattr(step, part), part
    assert both.decoder_per_layer == tuple(a + b for a, b in zip(prefill.decoder_per_layer, step.decoder_per_layer))
    assert "TFLOPs" in str(both)


# ---------------------------------------------------------------------------------------------------------
# Errors name the argument


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: llava_flops(c, num_text_tokens=4, decoder_tokens_per_layer=[10, 10]), "decoder_tokens_per_layer"),
        (lambda c: llava_flops(c, num_text_tokens=4, decoder_tokens_per_layer=[9, -1, 5]), r"per_layer\[1\]` is -1"),
        (lambda c: llava_flops(c, num_text_tokens=4, decoder_tokens_per_layer=[30, 9, 5]), r"per_layer\[0\]` is 30"),
        (lambda c: llava_flops(c, num_text_tokens=-1), "num_text_tokens"),
        (lambda c: llava_flops(c, num_text_tokens=4, num_visual_tokens=-3), "num_visual_tokens"),
        (lambda c: llava_flops(c, num_text_tokens=4, batch_size=0), "batch_size"),
        (lambda c: llava_flops(c, num_text_tokens=4, vision_layers="some"), "vision_layers"),
        (lambda c: llava_decode_flops(c, [5, 5]), "kv_lengths_per_layer"),
        (lambda c: analytic_kv_bytes(c, [5, 5, -5]), r"tokens_per_layer\[2\]"),
        (lambda c: analytic_kv_bytes(c, 5, dtype_bytes=0), "dtype_bytes"),
        (lambda c: schedule_tokens_per_layer(3, 4, 16, [1, 2], [8]), "keep_counts"),
        (lambda c: schedule_tokens_per_layer(3, 4, 16, [1, 2], [4, 8]), "non-increasing"),
        (lambda c: schedule_tokens_per_layer(3, 4, 16, [1, 3], [8, 4]), "pruning_layers"),
        (lambda c: schedule_tokens_per_layer(3, 4, 16, [2, 1], [8, 4]), "pruning_layers"),
        (lambda c: schedule_tokens_per_layer(3, 4, 16, [1], [17]), "keep_counts"),
        (lambda c: keep_counts_for_budget(32, 576, [5, 15, 25], 64, [0.6, 0.07, 0.02]), "visual_token_budget"),
        # the branches below were reached by no test (a mutation audit): each one's input was taken silently
        (lambda c: llava_flops(c, num_text_tokens=8, decoder_tokens_per_layer=[25, 24, 24]),
         r"^`decoder_tokens_per_layer\[0\]` is 25, more than the 24 prompt tokens \(num_visual_tokens 16 \+ "
         r"num_text_tokens 8\)\.$"),
        (lambda c: llava_flops(c, num_text_tokens=8, include_vision=False, vision_layers="needd"),
         r"^`vision_layers` must be 'needed' or 'all', got 'needd'\.$"),
        (lambda c: FlopsBreakdown(vision=0, projector=0, decoder=10, lm_head=0, decoder_per_layer=(1, 2)),
         r"^`decoder` is 10 but `decoder_per_layer` sums to 3\.$"),
        (lambda c: schedule_tokens_per_layer(6, 10, 100, [2, 2], [30, 5]),
         r"^`pruning_layers` must be strictly increasing, got \[2, 2\]\.$"),
        (lambda c: ideal_tokens_per_layer(4, 10, -3), r"^`visual_token_budget` must be >= 0, got -3\.$"),
        (lambda c: keep_counts_for_budget(32, 576, [1, 13, 25], 64, [0.2, 0.05, 0.0]),
         r"^`proportions` must hold 3 positive numbers, got \[0\.2, 0\.05, 0\.0\]\.$"),
        (lambda c: keep_counts_for_budget(32, 576, [1, 13, 25], 64, [0.10, 0.11, 0.05]),
         r"^`proportions` must be non-increasing \(masks are cumulative\), got \[0\.1, 0\.11, 0\.05\]\.$"),
        # exactly the budget before the first pruner: counts [1, 1] were returned, which average 4.5
        (lambda c: keep_counts_for_budget(4, 8, [2, 3], 4, [1.0, 0.5]),
         r"^`visual_token_budget` 4 cannot be reached with pruning layers \[2, 3\] and proportions \[1\.0, 0\.5\]: "
         r"the layers before the first pruner alone average 4\.0 visual tokens\.$"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_config())


@pytest.mark.parametrize("call, match", [
    (lambda c: decoder_layer_flops(c, True), r"^`num_queries` must be an int, got True\.$"),
    (lambda c: schedule_tokens_per_layer(6, 10, 100, "", []), r"^`pruning_layers` must be a list of ints, got ''\.$"),
    (lambda c: ideal_tokens_per_layer(4, 10, 6.5), r"^`visual_token_budget` must be an int, got 6\.5\.$"),
])
def test_type_errors_name_the_argument(call, match):
    """A bool is not a count (True counted one query) and a string is not a list of layers ('' was no layers)."""
    with pytest.raises(TypeError, match=match):
        call(tiny_config())


def test_a_negative_breakdown_prints_in_its_unit():
    assert str(FlopsBreakdown(vision=-2_000_000_000_000, projector=0, decoder=0, lm_head=0)).startswith(
        "vision -2.000 TFLOPs | projector 0 FLOPs")


@pytest.mark.parametrize("value", ["np.int64(2)", "torch.tensor(2)", "2.0", "True", "'bfloat16'"])
def test_dtype_bytes_is_an_int_or_a_torch_dtype(value):
    """`np.int64(2)` and `torch.tensor(2)` were read through their `itemsize` (8, their own storage): 4x the KV
    bytes, silently."""
    import numpy as np  # noqa: F401 (used by eval)

    with pytest.raises(TypeError, match=r"^`dtype_bytes` must be a positive int \(e\.g\. 2\) or a torch\.dtype .*"
                                        r"pass int\(value\)"):
        analytic_kv_bytes(tiny_config(), 5, dtype_bytes=eval(value))
    if value in ("np.int64(2)", "torch.tensor(2)"):  # the count they hold, as an int: a bfloat16 cache's bytes
        assert analytic_kv_bytes(tiny_config(), 5, dtype_bytes=int(eval(value))) == \
            analytic_kv_bytes(tiny_config(), 5, dtype_bytes=torch.bfloat16)


@pytest.mark.parametrize("layers", [[13, 1, 25], [1, 1, 25], [1, 13, 32], [-1, 13], []])
def test_rcp_keep_counts_refuses_layers_no_schedule_has(layers):
    """Unsorted, repeated or out-of-range pruning layers gave counts from negative spans ([13, 1, 25] -> counts for a
    stage that holds for -12 layers), where `keep_counts_for_budget` refused the same list."""
    from rcp_llava.schedule import rcp_keep_counts

    with pytest.raises(ValueError, match=r"^`pruning_layers` must be a non-empty, strictly increasing list in "
                                         r"\[0, 32\), got "):
        rcp_keep_counts(64, layers, 32, 576)
    with pytest.raises(ValueError, match=r"^`pruning_layers` must be"):
        keep_counts_for_budget(32, 576, layers, 64, [0.6, 0.07, 0.02][:max(len(layers), 1)])


def test_keep_counts_for_budget_is_the_exhaustive_choice_without_trying_every_combination():
    """The solver tried every combination within +-2 of the real solution (6^P): 11.7 s at ten pruning layers, hours at
    twelve. Stage by stage it returns the same counts as that search (here beside a direct one, on random cases up to
    four layers) and twelve layers meet the budget exactly."""
    import itertools
    import random

    def exhaustive(num_layers, n, layers, budget, props, ideal):
        spans = [b - a for a, b in zip(layers, layers[1:] + [num_layers])]
        target = budget * num_layers - layers[0] * n
        candidates = itertools.product(*[range(max(1, math.floor(x) - 2), min(n, math.ceil(x) + 2) + 1)
                                         for x in ideal])
        return list(min((c for c in candidates if all(b <= a for a, b in zip(c, c[1:]))),
                        key=lambda c: (abs(sum(k * s for k, s in zip(c, spans)) - target),
                                       sum((k - x) ** 2 for k, x in zip(c, ideal)))))

    rng = random.Random(0)
    for _ in range(300):
        num_layers, n = rng.randint(4, 40), rng.choice([16, 144, 576])
        layers = sorted(rng.sample(range(1, num_layers), rng.randint(1, min(4, num_layers - 1))))
        props = sorted((rng.uniform(0.01, 1) for _ in layers), reverse=True)
        budget = rng.uniform(layers[0] * n / num_layers + 1, n)
        spans = [b - a for a, b in zip(layers, layers[1:] + [num_layers])]
        scale = (budget * num_layers - layers[0] * n) / sum(p * s for p, s in zip(props, spans))
        if scale * props[0] > n:  # a capped stage: covered by the test below
            continue
        ideal = [scale * p for p in props]
        assert keep_counts_for_budget(num_layers, n, layers, budget, props) == exhaustive(
            num_layers, n, layers, budget, props, ideal), (num_layers, n, layers, budget, props)
    counts = keep_counts_for_budget(48, 576, list(range(1, 48, 4)), 64, [0.7 ** i for i in range(12)])
    assert counts == [190, 133, 93, 65, 46, 32, 22, 16, 11, 8, 5, 4]
    assert 576 + sum(4 * c for c in counts[:-1]) + 3 * counts[-1] == 64 * 48  # the budget, exactly


def test_keep_counts_for_a_high_budget_cap_the_first_stage_at_n():
    """A budget whose first stage would exceed N was refused as unreachable: on the 7B placement everything above
    about 0.53 N (384 of 576 -> 'budgets in (18.0, 306.9] are reachable'), on a 12-layer model 43 of 64. The stage
    keeps N and the later stages share the rest in their Table VI ratio, as `rcp_keep_counts` caps them."""
    from rcp_llava.schedule import stage_proportions

    for layers, n, placement, budget, expected in [(32, 576, [1, 13, 25], 384, [575, 338, 108]),
                                                   (12, 64, [2, 5, 8], 43, [63, 45, 16])]:
        counts = keep_counts_for_budget(layers, n, placement, budget, stage_proportions(3))
        assert counts == expected
        per_layer = [n] * placement[0] + [c for c, s in zip(counts, [b - a for a, b in zip(
            placement, placement[1:] + [layers])]) for _ in range(s)]
        assert sum(per_layer) / layers == budget  # exactly the budget
    assert keep_counts_for_budget(32, 576, [4, 14, 24], 576, stage_proportions(3)) == [576, 576, 576]
    # below what the layers before the first pruner already hold: still refused
    with pytest.raises(ValueError, match=r"the layers before the first pruner alone average 90.0 visual tokens\.$"):
        keep_counts_for_budget(32, 576, [5, 15, 25], 64, stage_proportions(3))
