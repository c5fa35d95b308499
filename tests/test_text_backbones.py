"""Text backbones other than Llama: pruning either computes what the stock model computes or refuses, naming the
backbone -- it ran silently on Granite (its forward scales the embeddings: 0.1 off stock with nothing pruned), and its
attention prior ignored Qwen3's q/k norms, Gemma2's soft-capping and Cohere's interleaved RoPE (priors 0.3-1.0 off
the layers' own attention), or crashed deep inside (Gemma3, Phi3, OLMo2, StableLM, Phi)."""

import sys

import pytest
import torch
import transformers as tf

from conftest import IMAGE_TOKEN, make_batch, make_model, stock_copy
from modeling_rcp_llava import question_attention_probs

TEXT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
BACKBONES = {
    "qwen3": lambda: tf.Qwen3Config(head_dim=8, **TEXT),  # per-head q/k RMSNorm before RoPE
    "smollm3": lambda: tf.SmolLM3Config(no_rope_layer_interval=2, **TEXT),  # NoPE every other layer
    "gemma": lambda: tf.GemmaConfig(head_dim=8, **TEXT),  # scaled embeddings
    "mistral": lambda: tf.MistralConfig(sliding_window=None, **TEXT),
    "gemma2": lambda: tf.Gemma2Config(head_dim=8, **TEXT),
    "cohere": lambda: tf.CohereConfig(**TEXT),
    "phi3": lambda: tf.Phi3Config(**TEXT),
    "olmo2": lambda: tf.Olmo2Config(**TEXT),
    "stablelm": lambda: tf.StableLmConfig(**TEXT),
    "olmo-clip": lambda: tf.OlmoConfig(clip_qkv=0.5, **TEXT),
    "olmoe": lambda: tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **TEXT),  # q/k norms over the projection
    "qwen2": lambda: tf.Qwen2Config(**TEXT),
    "gemma3": lambda: tf.Gemma3TextConfig(head_dim=8, **TEXT),
    "granite": lambda: tf.GraniteConfig(embedding_multiplier=12.0, **TEXT),
    "phi": lambda: tf.PhiConfig(**TEXT),
    "hunyuan": lambda: tf.HunYuanDenseV1Config(head_dim=8, **TEXT),  # per-head q/k RMSNorm after RoPE
    "hunyuan_moe": lambda: tf.HunYuanMoEV1Config(head_dim=8, num_experts=2, moe_topk=1, **TEXT),
    "apertus": lambda: tf.ApertusConfig(**TEXT),  # its pre-norm is `attention_layernorm`
    "diffllama": lambda: tf.DiffLlamaConfig(**TEXT),  # differential attention: two softmaxes, a groupnorm
    "qwen3_next": lambda: tf.Qwen3NextConfig(  # linear-attention layers between the attention ones
        head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, **TEXT),
}
METHODS = {
    "rcp": dict(repair_layers=[]),
    "attention_topk": dict(pruning_method="attention_topk", pruning_layers=[1, 2], repair_layers=[],
                           pruning_keep_counts=[10, 5]),
    "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[], pruning_keep_counts=[6]),
    "random": dict(pruning_method="random", pruning_layers=[1, 2], repair_layers=[], pruning_keep_counts=[10, 5],
                   pruning_seed=3),
    "vispruner": dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                      pre_llm_keep_count=6),
}
# what each unsupported backbone lacks; the first group only for the methods that read the layers' attention
ATTENTION_PROBLEMS = {
    "gemma2": r"it soft-caps its attention logits \(`attn_logit_softcapping`\)",
    "cohere": r"its rotary embedding is applied otherwise than Llama's `rotate_half` \(e\.g\. interleaved pairs\)",
    "phi3": r"its attention has no separate `q_proj` / `k_proj` \(a fused projection\)",
    "olmo2": r"its decoder layers have no `input_layernorm`, the norm before attention that selection reads \(OLMo2 "
             r"norms after attention; Apertus names its pre-norm `attention_layernorm`\)",
    "stablelm": r"its rotary embedding covers 2 of the 8 head dims \(partial rotary\)",
    "olmo-clip": r"it clips its queries, keys and values \(`clip_qkv=0\.5`\)",
    "olmoe": r"its `q_norm` normalises the whole projection, not each head \(as OLMo2's\)",
    "apertus": r"its decoder layers have no `input_layernorm`, the norm before attention that selection reads \(.*"
               r"Apertus names its pre-norm `attention_layernorm`\)",
    "diffllama": r"its attention has a norm the prior does not reproduce \(`groupnorm`, RMSNorm\)",
}
LOOP_PROBLEMS = {
    "gemma3": r"its rotary embedding is not one table for every layer \(Gemma3 and OLMo3 keep one per layer type\)",
    "granite": r"its forward scales the input embeddings \(`embedding_multiplier=12\.0`\)",
    "phi": r"its final norm is not `norm`",
    "qwen3_next": r"its decoder layers are not all attention layers \(a hybrid stack, as Qwen3-Next's linear "
                  r"attention\)",
}
READS_ATTENTION = ("rcp", "attention_topk", "fastv")


def _model(backbone, method):
    # eager: Gemma2 has no sdpa path, and the prior is compared with eager's weights
    return make_model(text_config=BACKBONES[backbone]().to_dict(), randomize_plugins=method == "rcp",
                      attn_implementation="eager", **METHODS[method])


@pytest.mark.parametrize("backbone", ["qwen3", "smollm3", "gemma", "mistral", "qwen2", "hunyuan", "hunyuan_moe"])
def test_the_prior_is_the_layers_own_attention(backbone):
    """At every layer, the prior's probabilities of the question rows equal the layer's eager attention weights,
    with the q/k weights scaled up so that the scores are O(1-10), as in a trained model."""
    model = _model(backbone, "attention_topk")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    stock = stock_copy(model)
    batch = make_batch([(2, 5, True)], seed=3)
    seq = batch["input_ids"].shape[1]
    rows = torch.arange(int((batch["input_ids"][0] == IMAGE_TOKEN).nonzero().max()) + 1, seq).unsqueeze(0)  # (1, 5)
    with torch.no_grad():
        ref = stock(**batch, output_attentions=True, output_hidden_states=True)
        lm = model.model.language_model
        cos, sin = lm.rotary_emb(ref.hidden_states[0], torch.arange(seq).unsqueeze(0))
        for idx, layer in enumerate(lm.layers):
            probs = question_attention_probs(layer.self_attn, layer.input_layernorm(ref.hidden_states[idx]), cos, sin,
                                             batch["attention_mask"].bool(), rows)
            torch.testing.assert_close(probs[0], ref.attentions[idx][0][:, rows[0]], atol=2e-6, rtol=0,
                                       msg=f"layer {idx}")
    model = _model(backbone, "rcp")  # and the pruned decoder loop, nothing pruned, is the stock forward
    with torch.no_grad(), model.plugins_disabled():
        torch.testing.assert_close(model(**batch).logits, stock_copy(model)(**batch).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", list(ATTENTION_PROBLEMS) + list(LOOP_PROBLEMS))
@pytest.mark.parametrize("method", list(METHODS))
def test_an_unsupported_backbone_is_refused_by_name(backbone, method):
    model = _model(backbone, method)
    batch = make_batch([(3, 4, True)])
    problem = LOOP_PROBLEMS.get(backbone) or (ATTENTION_PROBLEMS[backbone] if method in READS_ATTENTION else None)
    if problem is None:  # the methods that read no attention run there, the first point keeping its count
        with torch.no_grad():
            model(**batch)
        assert model.last_pruning_info.kept_counts[0, 0] == (6 if method == "vispruner" else 10)
        return
    lm = type(model.model.language_model).__name__
    with pytest.raises(ValueError, match=rf"^`pruning_method='{method}'` cannot run on this text backbone \({lm}, "
                                         rf"model_type '.*'\): {problem}\. Pruning runs its own decoder loop.* Use "
                                         r"`pruning_method='none'` \(the stock forward\) with this backbone\.$"):
        model(**batch)
    model.config.pruning_method = "none"  # the stock forward: stock's logits
    model.config.pruning_layers = model.config.repair_layers = []
    model.config.pruning_keep_counts = model.config.pre_llm_keep_count = None
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock_copy(model)(**batch).logits, atol=0, rtol=0)


def test_the_prior_itself_refuses_an_attention_it_cannot_compute():
    """A user's method that does not declare `reads_attention` reaches the prior unchecked by the model: the prior
    refuses there too, rather than score other keys than the layer attends to."""
    lm = _model("cohere", "random").model.language_model
    hidden = torch.randn(1, 5, 32)
    cos, sin = lm.rotary_emb(hidden, torch.arange(5).unsqueeze(0))
    with torch.no_grad(), pytest.raises(ValueError, match=r"^The attention prior \(RCP\.md Eq\. 4, read by RCP, "
                                                          r"attention top-k and FastV\) cannot be computed for "
                                                          r"CohereAttention: its rotary embedding is applied "):
        question_attention_probs(lm.layers[0].self_attn, hidden, cos, sin, torch.ones(1, 5, dtype=torch.bool),
                                 torch.tensor([[3, 4]]))


def test_the_prior_refuses_a_rotary_table_narrower_than_the_head():
    """A partial-rotary backbone (StableLM, Phi: RoPE on a fraction of each head) is refused by the model before the
    loop; a caller who reaches the prior directly with such a cos/sin table is refused there too, by its widths --
    `_apply_rope` would otherwise fail on a shape, or rotate other dims than the layer does."""
    lm = _model("qwen2", "random").model.language_model
    attn = lm.layers[0].self_attn  # head_dim 8
    hidden = torch.randn(1, 5, 32)
    cos, sin = lm.rotary_emb(hidden, torch.arange(5).unsqueeze(0))
    key_valid, rows = torch.ones(1, 5, dtype=torch.bool), torch.tensor([[3, 4]])
    with torch.no_grad():
        assert question_attention_probs(attn, hidden, cos, sin, key_valid, rows).shape == (1, 4, 2, 5)  # whole heads
        with pytest.raises(ValueError, match=r"^The attention prior rotates the whole head \(8 dims\), but this "
                                             r"backbone's rotary embedding covers 4 \(partial rotary\): use "
                                             r"`pruning_method='none'` with it\.$"):
            question_attention_probs(attn, hidden, cos[..., :4], sin[..., :4], key_valid, rows)


def _fake_attention_module(monkeypatch, name, apply_rotary_pos_emb):
    """An attention class defined in a module of its own whose `apply_rotary_pos_emb` is the given function (None:
    the module defines none), as `_rope_matches` finds a layer's RoPE: by its class's modeling module."""
    import sys
    import types

    module = types.ModuleType(name)
    if apply_rotary_pos_emb is not None:
        module.apply_rotary_pos_emb = apply_rotary_pos_emb
    monkeypatch.setitem(sys.modules, name, module)
    cls = type("FakeAttention", (torch.nn.Module,), {"__module__": name})
    attn = cls()
    attn.head_dim = 8
    return attn


def test_rope_matches_only_llamas_rotation_and_caches_the_answer_per_class(monkeypatch):
    """`_rope_matches` compares the module's own `apply_rotary_pos_emb` with `_apply_rope` (halves of the head,
    Llama's `rotate_half`) on random tensors, once per class: Llama's matches; one that raises, has another signature
    or rotates interleaved pairs (Cohere's) does not, nor a module without one -- each is then refused rather than
    scored with another attention. The answer is kept per class in `_ROPE_CONVENTION`."""
    import modeling_rcp_llava
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    cache = {}
    monkeypatch.setattr(modeling_rcp_llava, "_ROPE_CONVENTION", cache)

    def raises(q, k, cos, sin):
        raise RuntimeError("not this layout")

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # pairs (x0, x1), (x2, x3), ... rotated, cos/sin per pair
        cos, sin = cos.unsqueeze(unsqueeze_dim)[..., ::2], sin.unsqueeze(unsqueeze_dim)[..., ::2]
        def rot(x):
            x1, x2 = x[..., ::2], x[..., 1::2]
            return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
        return rot(q), rot(k)

    cases = {"llama_like": (llama_rope, True), "raises": (raises, False),
             "other_signature": (lambda q, cos, sin: (q,), False),  # a TypeError when called as Llama's
             "interleaved": (interleaved, False), "cohere_like": (cohere_rope, False), "no_rope": (None, False)}
    attns = {}
    for name, (apply, expected) in cases.items():
        attns[name] = _fake_attention_module(monkeypatch, f"fake_rope_{name}", apply)
        assert modeling_rcp_llava._rope_matches(attns[name]) is expected, name
        assert cache[type(attns[name])] is expected, name
    assert len(cache) == len(cases)
    # cached per class: the module's function is not read again (checked once per class, not per layer or call)
    monkeypatch.setattr(sys.modules["fake_rope_llama_like"], "apply_rotary_pos_emb", raises)
    monkeypatch.setattr(sys.modules["fake_rope_raises"], "apply_rotary_pos_emb", llama_rope)
    assert modeling_rcp_llava._rope_matches(attns["llama_like"]) is True
    assert modeling_rcp_llava._rope_matches(attns["raises"]) is False
    # the real layers: Llama's (conftest's backbone) and Mistral's (Llama's rotation, copied) match; Cohere's not
    for model in (make_model(), _model("mistral", "random"), _model("cohere", "random")):
        attn = model.model.language_model.layers[0].self_attn
        assert modeling_rcp_llava._rope_matches(attn) is (type(attn).__name__ != "CohereAttention")
