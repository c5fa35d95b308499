"""The differentiable ("mask") layout used in training equals physical discard, and trains the plug-ins."""

import re
import sys

import pytest
import torch
from conftest import NUM_VISUAL, make_batch, make_model

PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]


@pytest.mark.parametrize("counts", [[10, 5], None], ids=["fixed", "adaptive"])
def test_mask_layout_forward_equals_physical_discard(counts):
    model = make_model(randomize_plugins=True, pruning_keep_counts=counts)
    batch = make_batch(PADDED)
    with torch.no_grad():
        discard = model(**batch)
        model.model.pruning_layout = "mask"
        masked = model(**batch)
    assert torch.equal(masked.keep_masks, discard.keep_masks)
    assert masked.logits.shape[1] == batch["input_ids"].shape[1]  # nothing moved
    positions = discard.token_positions
    valid = positions >= 0
    ref = masked.logits.gather(1, positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, masked.logits.shape[-1]))
    assert (discard.logits[valid] - ref[valid]).abs().max() <= 1e-4
    # Retention per layer is the kept fraction, exactly 0/1 masks in the forward pass.
    counts_per_layer = masked.layer_retention * NUM_VISUAL
    assert torch.equal(counts_per_layer, counts_per_layer.round())
    assert torch.equal(masked.layer_retention, discard.layer_retention)


def test_mask_layout_with_forced_masks_equals_discard_with_the_same_masks():
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(3, NUM_VISUAL, generator=g) < 0.6
    forced = torch.stack([first, first & (torch.rand(3, NUM_VISUAL, generator=g) < 0.5)], dim=1)
    with torch.no_grad():
        discard = model(**batch, visual_keep_masks=forced)
        model.model.pruning_layout = "mask"
        masked = model(**batch, visual_keep_masks=forced)
    positions = discard.token_positions
    valid = positions >= 0
    ref = masked.logits.gather(1, positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, masked.logits.shape[-1]))
    assert (discard.logits[valid] - ref[valid]).abs().max() <= 1e-4


def test_training_forward_samples_masks_and_sends_gradients_to_the_plugins_only():
    model = make_model(randomize_plugins=True, pruning_keep_counts=None)
    for name, p in model.named_parameters():
        p.requires_grad_(".rcp_plugins." in name)
    model.train()
    batch = make_batch(PADDED)
    labels = batch["input_ids"].clone()
    labels[:, :-2] = -100
    torch.manual_seed(0)
    out = model(**batch, labels=labels)
    torch.manual_seed(1)
    other = model(**batch, labels=labels)
    assert not torch.equal(out.keep_masks, other.keep_masks)  # Gumbel noise
    (out.loss + out.layer_retention.mean()).backward()
    for layer, pruner in model.model.rcp_plugins.pruners.items():
        assert pruner.bias.grad is not None and pruner.bias.grad.abs() > 0, layer
        assert pruner.token_mlp[-1].weight.grad.abs().max() > 0, layer
    for layer, adapter in model.model.rcp_plugins.repair_adapters.items():
        assert adapter.gate.grad.abs() > 0, layer
    context = model.model.rcp_plugins.repair_context  # shared by the adapters
    assert context.pruned_proj.weight.grad.abs().max() > 0 and context.positions.grad.abs().max() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".rcp_plugins." not in n)


def test_dropped_tokens_receive_task_gradient_through_the_soft_key_mask():
    """The multiplicative key mask gives dL/dM_j != 0 even where M_j = 0 (a dropped token)."""
    from modeling_rcp_llava import soft_key_mask_attention

    torch.manual_seed(0)

    class Module:
        num_key_value_groups = 1

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    out, _ = soft_key_mask_attention(Module(), q, k, v, None, scaling=8 ** -0.5, rcp_key_keep=keep)
    # Forward: attention over the kept keys only. Without a mask, a 4-query, 6-key call is causal with the keys aligned to the top-left (torch's rule).
    top_left = torch.tril(torch.ones(4, 6, dtype=torch.bool)) & keep.detach().bool().view(1, 6)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=top_left, scale=8 ** -0.5)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    out.sum().backward()
    assert keep.grad[0, 1] != 0  # dropped token 1 is visible to queries 1..3 causally


# -- the soft key mask with fewer queries than keys (decode-like), in every mask form it is given ------------------


def _kept_key_attention(query, key, value, allowed, keep, scale):
    """Reference by hand: plain attention of each query over the keys it may see AND that are kept (the physical
    discard), kv head h // groups serving query head h. allowed: (B, 1, L, S) bool; keep: (B, S) 0/1."""
    groups = query.shape[1] // key.shape[1]
    heads = torch.arange(query.shape[1]) // groups
    key, value = key[:, heads], value[:, heads]
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~(allowed & keep.bool()[:, None, None, :]), float("-inf"))
    weights = scores.softmax(-1)  # (B, H, L, S)
    return (weights @ value).transpose(1, 2), weights


@pytest.mark.parametrize("fallback", ["sdpa", "eager"])
@pytest.mark.parametrize("mask_form", ["none-one-query", "bool", "additive", "padding-2d"])
def test_soft_key_mask_with_fewer_queries_than_keys_is_attention_over_the_kept_keys(fallback, mask_form):
    """q_len < kv_len (a decoded token, or a continued prefill): the queries are the LAST positions, query i seeing
    keys 0 .. S - L + i. Whatever the mask's form -- none (one query: every key), sdpa's bool (B, 1, L, S), eager's
    additive float, or flash attention's (B, S) padding mask (causal implied, aligned to the last query) -- and with
    either configured attention (`rcp_fallback_attention`; eager's bool branch is sdpa's mask given to eager), the
    output is attention over the kept keys alone. GQA (4 query heads on 2 kv heads), left padding in row 1."""
    from modeling_rcp_llava import soft_key_mask_attention

    g = torch.Generator().manual_seed(0)
    bsz, heads, kv_heads, q_len, kv_len, head_dim = 2, 4, 2, 3, 7, 8
    if mask_form == "none-one-query":
        q_len = 1
    query = torch.randn(bsz, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    key = torch.randn(bsz, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    value = torch.randn(bsz, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    # keys 1, 3, 5 dropped in row 0; 2, 6 in row 1 (key 4 is kept in both: every query keeps a visible key)
    keep = torch.tensor([[1, 0, 1, 0, 1, 0, 1], [1, 1, 0, 1, 1, 1, 0]], dtype=torch.float64)
    padding = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)  # row 1 left-padded by 2
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)  # aligned to the last key
    allowed = causal[None, None] & padding[:, None, None, :]  # (B, 1, L, S)
    if mask_form == "none-one-query":
        allowed = torch.ones(bsz, 1, 1, kv_len, dtype=torch.bool)
        mask = None
    elif mask_form == "bool":
        mask = allowed
    elif mask_form == "additive":
        mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    else:
        mask = padding.long()  # as flash attention's mask builder gives it (0/1 ints)
    scale = head_dim ** -0.5
    ref_out, ref_weights = _kept_key_attention(query, key, value, allowed, keep, scale)
    out, weights = soft_key_mask_attention(torch.nn.Module().eval(), query, key, value, mask, scaling=scale,
                                           rcp_key_keep=keep, rcp_fallback_attention=fallback)
    assert out.shape == (bsz, q_len, heads, head_dim)
    # eager's softmax runs in float32 (as transformers' eager attention): 1e-6; sdpa's form stays in float64
    tol = 1e-6 if fallback == "eager" else 1e-12
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=0)
    if fallback == "eager":  # its weights are returned, 0 at the dropped keys (as output_attentions reports them)
        torch.testing.assert_close(weights, ref_weights, atol=tol, rtol=0)
        assert (weights[..., keep[0] == 0][0] == 0).all() and (weights[..., keep[1] == 0][1] == 0).all()
    else:
        assert weights is None


def test_a_copy_loaded_with_trust_remote_code_registers_its_own_soft_key_mask(tmp_path):
    """Loading an RCP folder with trust_remote_code imports its modeling file as a module of its own, which registers
    its soft-key-mask attention on import. Under the shared name it replaced the installed one for every model in
    the process (a Hub snapshot of older code would then run in the installed model's training); now each copy has
    its name, both stay registered, and the installed model's training forward runs the installed function."""
    from transformers import AttentionInterface
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    import modeling_rcp_llava

    make_model().save_pretrained(tmp_path)
    # what `from_pretrained(folder, trust_remote_code=True)` does to find the class (the Auto classes may hand back
    # the installed class instead, where a test in the same process registered it with them)
    remote = get_class_from_dynamic_module("modeling_rcp_llava.RcpLlavaForConditionalGeneration", str(tmp_path))
    copy = sys.modules[remote.__module__]
    assert copy is not modeling_rcp_llava and copy.__name__.startswith("transformers_modules.")
    assert copy.SOFT_KEY_MASK_ATTENTION != modeling_rcp_llava.SOFT_KEY_MASK_ATTENTION == "rcp_soft_key_mask"
    assert re.fullmatch(r"rcp_soft_key_mask_[0-9a-f]{12}", copy.SOFT_KEY_MASK_ATTENTION)
    registry = AttentionInterface()
    assert registry[modeling_rcp_llava.SOFT_KEY_MASK_ATTENTION] is modeling_rcp_llava.soft_key_mask_attention
    assert registry[copy.SOFT_KEY_MASK_ATTENTION] is copy.soft_key_mask_attention
    # the installed model's mask-layout (training) forward calls its own module's function, not the copy's
    calls = []
    for module in (modeling_rcp_llava, copy):
        original = registry[module.SOFT_KEY_MASK_ATTENTION]

        def counting(*args, _name=module.__name__, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        AttentionInterface.register(module.SOFT_KEY_MASK_ATTENTION, counting)
    try:
        model = make_model().train()
        batch = make_batch(PADDED)
        model(**batch, labels=batch["input_ids"])
    finally:
        for module in (modeling_rcp_llava, copy):
            AttentionInterface.register(module.SOFT_KEY_MASK_ATTENTION, module.soft_key_mask_attention)
    assert calls and set(calls) == {"modeling_rcp_llava"}


def test_the_configured_attention_without_a_name_is_the_modules_own_eager():
    """The layers before the first pruner run `rcp_fallback_attention` (the model's configured attention), so they
    equal the teacher's bit for bit. No name (a config that never set `_attn_implementation`) is eager, as the layer
    itself does: the eager function of the attention's OWN modeling module (Qwen2's, not Llama's, for a Qwen2
    layer); any other name is the function AttentionInterface registered for it."""
    import sys

    from transformers import AttentionInterface, LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from modeling_rcp_llava import SOFT_KEY_MASK_ATTENTION, _configured_attention, soft_key_mask_attention

    small = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    for cls, config in ((LlamaAttention, LlamaConfig(**small)), (Qwen2Attention, Qwen2Config(**small))):
        module = cls(config, layer_idx=0)
        own = sys.modules[cls.__module__].eager_attention_forward
        assert _configured_attention(module, None) is own, cls.__name__
        assert _configured_attention(module, "eager") is own, cls.__name__
    # two modules, two functions: a fixed `modeling_llama.eager_attention_forward` would pass the loop above for Llama
    assert sys.modules[Qwen2Attention.__module__].eager_attention_forward \
        is not sys.modules[LlamaAttention.__module__].eager_attention_forward
    assert _configured_attention(module, "sdpa") is AttentionInterface()["sdpa"]
    # registered on import, under a name no copy of this file loaded with trust_remote_code takes (test below)
    assert _configured_attention(module, SOFT_KEY_MASK_ATTENTION) is soft_key_mask_attention
    # and the fallback itself, with no key weight: the configured function's output (eager: its weights too)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 3, 8, generator=g) for h in (4, 2, 2))
    module = LlamaAttention(LlamaConfig(**small), layer_idx=0).eval()
    mask = torch.zeros(1, 1, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), torch.finfo().min)
    out, weights = soft_key_mask_attention(module, q, k, v, mask, scaling=0.5, rcp_fallback_attention=None)
    ref_out, ref_weights = sys.modules[LlamaAttention.__module__].eager_attention_forward(module, q, k, v, mask,
                                                                                          scaling=0.5)
    assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)


def test_gradient_checkpointing_is_refused_in_mask_layout():
    model = make_model()
    model.activation_checkpointing_enable()
    model.train()
    # the fix named `gradient_checkpointing_disable`, which transformers 5.23 deprecates (a FutureWarning)
    with pytest.raises(ValueError, match=r"Gradient checkpointing is not supported in the differentiable .* Disable it "
                                         r"with `model\.activation_checkpointing_disable\(\)`"):
        model(**make_batch(PADDED))
    model.activation_checkpointing_disable()
    model(**make_batch(PADDED))  # the named fix works


def test_adaptive_mask_layout_keeps_the_tokens_discard_keeps_at_tiny_positive_logits(monkeypatch):
    # Eq. 8 keeps logit > 0. float32's sigmoid rounds logits in (0, ~1e-7) to exactly 0.5, so a training-layout
    # threshold on sigmoid(logit / tau) > 0.5 dropped tokens the physical discard keeps.
    from modeling_rcp_llava import RcpSelector

    def tiny_logits(self, ctx):  # (B, K): +1e-9 on even raster indices, -1 on odd ones, in either layout
        return torch.where(ctx.ids % 2 == 0, 1e-9, -1.0)

    monkeypatch.setattr(RcpSelector, "scores", tiny_logits)
    model = make_model(randomize_plugins=True, pruning_keep_counts=None).eval()
    batch = make_batch(PADDED)
    with torch.no_grad():
        discard = model(**batch)
        model.model.pruning_layout = "mask"
        masked = model(**batch)
    assert discard.keep_masks[:, 0].sum() > 0  # the tiny positive logits are kept by the discard
    assert torch.equal(masked.keep_masks, discard.keep_masks)


def test_eager_training_layout_returns_every_layers_attention_weights_as_the_discard_does():
    """With eager attention the training layout returned the weights of the layers before the first pruner only
    (the soft key-mask attention gave None), so `attentions[i]` was no longer layer i's, and stock's warning told
    an eager user to use eager. Now every layer's weights come back; at the kept tokens they are the discard's."""
    model = make_model(randomize_plugins=True, attn_implementation="eager")
    batch = make_batch(PADDED)
    with torch.no_grad():
        discard = model(**batch, output_attentions=True)
        model.model.pruning_layout = "mask"
        masked = model(**batch, output_attentions=True)
        model.train()
        trained = model(**batch, output_attentions=True, gumbel_noise=False)
    layers = model.config.text_config.num_hidden_layers
    assert len(discard.attentions) == len(masked.attentions) == len(trained.attentions) == layers
    positions = discard.token_positions  # (B, T') original slot of each kept token, -1 for padding
    for b in range(positions.shape[0]):
        kept = positions[b][positions[b] >= 0]
        local = (positions[b] >= 0).nonzero().squeeze(1)
        for i in range(layers):
            full = masked.attentions[i][b]  # (H, T, T)
            if i >= model.config.pruning_layers[-1]:  # the last pruner's keys are the discard's keys
                dropped = torch.ones(full.shape[-1], dtype=torch.bool)
                dropped[kept] = False
                assert full[:, kept][:, :, dropped].abs().max() == 0
                ref = discard.attentions[i][b][:, local][:, :, local]
                torch.testing.assert_close(full[:, kept][:, :, kept], ref, rtol=0, atol=1e-5)
    # The eager weights' outputs are the sdpa form's (at the real tokens: padding rows differ as in stock models).
    sdpa = make_model(randomize_plugins=True)
    with torch.no_grad():
        sdpa.model.pruning_layout = "mask"
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(sdpa(**batch).logits[real], masked.logits[real], rtol=0, atol=1e-5)


def test_eager_training_layout_trains_as_the_sdpa_form():
    """The eager form of the soft key mask (which returns the weights) gives the sdpa form's loss and gradients."""
    grads = []
    for impl in ("eager", "sdpa"):
        model = make_model(randomize_plugins=True, attn_implementation=impl, query_dropout=0.0,
                           pruner_dropout=0.0).train()
        batch = make_batch(PADDED)
        real = batch["attention_mask"]
        labels = batch["input_ids"].masked_fill(real == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(real[:, :-1] == 0, -100)  # scored from a padding slot: skipped
        model(**batch, labels=labels, gumbel_noise=False).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("rcp_plugins" in k for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5, msg=name)


def test_a_text_only_row_keeps_its_own_key_weights_in_a_mixed_batch():
    """The mask layout writes M into the image slots of the rows with an image only: a text-only row (here longer
    than N, so those slot indices exist in it) kept weight 1 on every key, and its logits equal the discard's."""
    model = make_model(randomize_plugins=True)
    batch = make_batch([(6, 25, False), (2, 3, True)])
    with torch.no_grad():
        discard = model(**batch)
        with model.pruning_layout("mask"):
            masked = model(**batch)
    positions = discard.token_positions
    valid = positions >= 0
    ref = masked.logits.gather(1, positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, masked.logits.shape[-1]))
    assert (discard.logits[valid] - ref[valid]).abs().max() <= 1e-4
    assert (discard.logits[0] - masked.logits[0]).abs().max() <= 1e-5  # the text-only row is not pruned at all


@pytest.mark.parametrize("detach", [False, True])
def test_detach_prior_cuts_the_priors_gradient_into_the_pruners(detach):
    """`detach_prior` (`--detach_prior`): the prior A reaches the pruner (Eq. 5) without a gradient path back into
    the states it was computed from; off, it carries one."""
    model = make_model(randomize_plugins=True)
    model.model.detach_prior = detach
    seen = []
    hooks = [pruner.register_forward_pre_hook(lambda module, args: seen.append(args[4].requires_grad))
             for pruner in model.model.rcp_plugins.pruners.values()]
    try:
        with model.pruning_layout("mask"):
            model(**make_batch(PADDED))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [not detach] * len(model.model.rcp_plugins.pruners)


def test_the_mask_layouts_prior_ignores_the_keys_an_earlier_point_dropped():
    """In the mask layout a dropped token stays in place with key weight 0: the next point's prior (Eq. 4) must not
    let the question attend to it, so it equals the discard's prior, which no longer holds the token."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    select = model.model._select_tokens
    priors, candidates = {"discard": [], "mask": []}, []  # per point: the prior each pruner got; discard's (ids, valid)

    def recording(selector, ctx):
        candidates.append((ctx.ids, ctx.valid))
        return select(selector, ctx)

    model.model._select_tokens = recording
    hooks = [pruner.register_forward_pre_hook(lambda module, args: priors[layout].append(args[4].clone()))
             for pruner in model.model.rcp_plugins.pruners.values()]
    try:
        with torch.no_grad():
            for layout in ("discard", "mask"):
                with model.pruning_layout(layout):
                    model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(priors["discard"]) == len(priors["mask"]) == len(candidates) == 2
    for discard, masked, (ids, valid) in zip(priors["discard"], priors["mask"], candidates):
        assert masked.shape[1] == NUM_VISUAL  # every token stays in place, in raster order
        assert (discard - masked.gather(1, ids))[valid].abs().max() <= 2e-6
    assert candidates[1][0].shape[1] == 10 < NUM_VISUAL  # the first point dropped 6: the mask layout still holds them
