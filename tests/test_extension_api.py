"""A user's own pruning method and the outputs API under pruning, as the TokenSelector / register_pruning_method
docstrings and the README describe them (a read-only probe's findings)."""

import json

import pytest
import torch
from conftest import make_batch, make_model

from configuration_rcp_llava import PRUNING_METHODS, PruningMethod
from modeling_rcp_llava import SELECTORS, TokenSelector, register_pruning_method


@pytest.fixture
def registry():
    """Registers methods for one test and removes them after it."""
    added = []

    def register(cls, **kwargs):
        registered = register_pruning_method(cls, **kwargs)
        added.append(cls.method.name)  # after it took: a refused name (a built-in's) is not popped
        return registered

    yield register
    for name in added:
        SELECTORS.pop(name, None)
        PRUNING_METHODS.pop(name, None)


class _Norm(TokenSelector):
    method = PruningMethod("largest_norm")

    def scores(self, ctx):
        return ctx.hidden.gather(1, ctx.slots.unsqueeze(-1).expand(-1, -1, ctx.hidden.shape[-1])).norm(dim=-1)


def test_the_stock_forwards_name_is_not_taken_silently():
    """A spec named "none" replaced the built-in one without `overwrite` (its config checks then broke)."""
    class Clash(TokenSelector):
        method = PruningMethod("none")

        def scores(self, ctx):
            return ctx.valid.float()

    before = PRUNING_METHODS["none"]
    with pytest.raises(ValueError, match=r"'none' is already registered; pass `overwrite=True`"):
        register_pruning_method(Clash)
    with pytest.raises(ValueError, match=r"'none' is the stock forward .* cannot be registered again"):
        register_pruning_method(Clash, overwrite=True)
    assert PRUNING_METHODS["none"] is before and "none" not in SELECTORS


def _warn_afresh():
    """The save warnings are `warning_once` (per process and message): earlier tests may have said them already."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("modeling_rcp_llava").warning_once.cache_clear()


def test_a_saved_custom_method_says_how_to_load_it(registry, tmp_path, caplog):
    registry(_Norm)
    model = make_model(pruning_method="largest_norm", repair_layers=[])
    _warn_afresh()
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path)
    assert "`pruning_method='largest_norm'` is a method of your own" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # once per process: a Trainer saving every checkpoint said it at each one
        model.save_plugins(tmp_path / "again")
    assert "a method of your own" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["rcp_config.json", "rcp_plugins.safetensors"]
    SELECTORS.pop("largest_norm")
    PRUNING_METHODS.pop("largest_norm")  # a fresh process: the method is not registered
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    with pytest.raises(ValueError, match=r"If it is a method of your own, register its selector before building or "
                                         r"loading the model .* or load it with a built-in `pruning_method=\.\.\.`"):
        RcpLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pruning_method"] == "largest_norm"
    loaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path, pruning_method="attention_topk")
    assert loaded.config.pruning_method == "attention_topk"


def test_a_selector_registered_over_a_built_in_warns_on_save(tmp_path, caplog):
    """Registered over a built-in name with `overwrite=True`, a selector was saved without a word, and a fresh process
    then loaded the folder with the built-in method (the warning checked the name, not the class)."""
    from modeling_rcp_llava import BUILTIN_SELECTORS, RcpLlavaForConditionalGeneration

    builtin_spec, builtin_cls = PRUNING_METHODS["random"], SELECTORS["random"]

    class MyRandom(_Norm):
        method = builtin_spec

    register_pruning_method(MyRandom, overwrite=True)
    try:
        model = make_model(pruning_method="random", repair_layers=[])
        for save, folder in ((model.save_pretrained, "mine"), (model.save_plugins, "plugins")):  # RcpTrainer's
            _warn_afresh()
            caplog.clear()
            with caplog.at_level("WARNING"):
                save(tmp_path / folder)
            assert ("`pruning_method='random'` runs your own selector (MyRandom), registered over the built-in one"
                    in caplog.text), folder
    finally:
        register_pruning_method(builtin_cls, overwrite=True)
    assert SELECTORS["random"] is BUILTIN_SELECTORS["random"] is builtin_cls
    caplog.clear()
    with caplog.at_level("WARNING"):  # the built-in itself: nothing to say
        RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "mine").save_pretrained(tmp_path / "builtin")
    assert "your own selector" not in caplog.text and "a method of your own" not in caplog.text


def test_a_plugin_method_with_its_own_keep_says_training_uses_its_scores(registry, caplog):
    """The mask layout samples from `scores` with the built-in rule (Eqs. 6-8): a `keep` of its own trained the
    plug-ins for another rule than inference runs, without a word."""
    from modeling_rcp_llava import RcpSelector

    class Strict(RcpSelector):
        method = PruningMethod("rcp_strict", plugins=True, default_layers=PRUNING_METHODS["rcp"].default_layers)

        def keep(self, ctx):
            return self.scores(ctx) > 1.0

    class Scored(RcpSelector):  # a rule in `scores`: what training samples from
        method = PruningMethod("rcp_scored", plugins=True, default_layers=PRUNING_METHODS["rcp"].default_layers)

        def scores(self, ctx):
            return super().scores(ctx) - 1.0

    batch = make_batch([(2, 3, True), (0, 4, True)])
    labels = batch["input_ids"].clone()
    labels[:, :-2] = -100
    for cls, warned in ((Scored, False), (Strict, True)):
        registry(cls)
        model = make_model(pruning_method=cls.method.name, pruning_keep_counts=None, randomize_plugins=True)
        caplog.clear()
        with caplog.at_level("WARNING"):
            model(**batch)  # inference: its own rule, nothing to say
            assert "overrides `keep`" not in caplog.text
            model.train()(**batch, labels=labels)
        assert ("Strict overrides `keep`, but the differentiable (mask) layout selects with its `scores`"
                in caplog.text) is warned


def test_a_selector_returning_the_wrong_thing_is_named(registry):
    """A float or mis-shaped `keep` failed deep in the compaction ("bitwise_and_cpu not implemented for 'Float'")."""
    class Floaty(_Norm):
        method = PruningMethod("floaty")

        def keep(self, ctx):
            return ctx.valid.float()

    registry(Floaty)
    model = make_model(pruning_method="floaty", repair_layers=[])
    with pytest.raises(TypeError, match=r"^Floaty\.keep must return a bool tensor of shape \(2, 16\) \(batch, alive "
                                        r"visual tokens\), got torch\.float32 \(2, 16\)"):
        model(**make_batch([(2, 3, True), (5, 6, True)]))


@pytest.mark.parametrize("bad, got", [
    (lambda ctx: ctx.valid.float().argsort(1), r"torch\.int64 \(2, 16\)"),  # ranks, not scores
    (lambda ctx: ctx.valid.float()[0], r"torch\.float32 \(16,\)"),  # one row, broadcast to every row before
    (lambda ctx: [0.0] * 16, r"list"),
])
def test_scores_of_the_wrong_kind_are_named(registry, bad, got):
    """`scores` (the main extension point) failed deep in the top-k (an int64 overflow, a size mismatch, "'list' has
    no attribute 'masked_fill'") or was broadcast silently; only `keep`'s result was checked."""
    class Wrong(_Norm):
        method = PruningMethod("wrong_scores")

        def scores(self, ctx):
            return bad(ctx)

    registry(Wrong)
    model = make_model(pruning_method="wrong_scores", repair_layers=[])
    with pytest.raises(TypeError, match=r"^Wrong\.scores must return a floating-point tensor of shape \(2, 16\) "
                                        rf"\(batch, alive visual tokens; higher = kept\), got {got}\.$"):
        model(**make_batch([(2, 3, True), (5, 6, True)]))


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_method_name_no_config_can_use_is_refused(name):
    class Nameless(_Norm):
        method = PruningMethod(name)

    with pytest.raises(ValueError, match=r"^Nameless\.method's name is .*: give it a non-empty string"):
        register_pruning_method(Nameless)
    assert name not in SELECTORS and name not in PRUNING_METHODS


def test_keys_of_a_selectors_own_input_do_not_replace_the_pruning_layers(registry):
    """`ctx.visual_attention(ctx.layer, other_states, ...)` stored the pruning layer's keys of `other_states`, and the
    layer's forward then attended with them: discard and mask differed by 1e-3 under no_grad, with the same kept
    tokens (only the reuse, active at inference, was wrong)."""
    from conftest import at_positions, masked_reference

    class PrevInput(TokenSelector):
        method = PruningMethod("prev_input_attention")
        reads_attention = True

        def observe_layer_input(self, layer_idx, hidden):
            self.previous = hidden

        def scores(self, ctx):
            q_slots, q_valid = ctx.question_slots()
            return ctx.visual_attention(ctx.layer, ctx.layer.input_layernorm(self.previous), q_slots, q_valid)

    registry(PrevInput)
    model = make_model(pruning_method="prev_input_attention", pruning_layers=[1], pruning_keep_counts=[6],
                       repair_layers=[])
    batch = make_batch([(2, 3, True), (5, 6, True)])
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)  # as generate builds them
    with torch.no_grad():
        out = model(**batch)
        reference = masked_reference(model, batch, out.keep_masks)
    valid = out.token_positions >= 0
    assert (out.logits[valid] - at_positions(reference, out.token_positions)[valid]).abs().max() <= 1e-5


def test_another_layers_attention_does_not_hand_its_keys_to_the_pruning_layer(registry):
    """`ctx.visual_attention(layers[0], ctx.hidden_norm(), ...)` at pruning layer 2 projects with layer 0's `k_proj`:
    those keys are not the pruning layer's, so they must not be kept for its forward (they were, and its logits
    differed from the same kept set given as masks by 1.6e-3)."""

    class OtherLayer(TokenSelector):
        method = PruningMethod("other_layer_attention")
        reads_attention = True

        def scores(self, ctx):
            q_slots, q_valid = ctx.question_slots()
            return ctx.visual_attention(self.model.language_model.layers[0], ctx.hidden_norm(), q_slots, q_valid)

    registry(OtherLayer)
    model = make_model(pruning_method="other_layer_attention", pruning_layers=[2], repair_layers=[],
                       pruning_keep_counts=[6])
    batch = make_batch([(2, 3, True)])
    with torch.no_grad():
        out = model(**batch)
        given = model(**batch, visual_keep_masks=out.keep_masks)  # no selection: the layer projects its own keys
    assert torch.equal(out.keep_masks, given.keep_masks)
    assert (out.logits - given.logits).abs().max() <= 1e-5


def test_visual_attention_is_the_mean_over_heads_and_question_rows(registry):
    """`ctx.visual_attention` documents the attention the question rows pay each visual token, averaged over heads
    and valid query rows: equal to stock eager attention at the first pruning point (unpruned input). Built-in top-k
    is blind to its scale, a selector of the user's is not (a sum over heads read 4x this)."""
    from conftest import stock_copy

    seen = []

    class Probe(TokenSelector):
        method = PruningMethod("visual_attention_probe")
        reads_attention = True

        def scores(self, ctx):
            seen.append(ctx.visual_attention(ctx.layer, ctx.hidden_norm(), *ctx.question_slots()))
            return seen[-1]

    registry(Probe)
    model = make_model(pruning_method="visual_attention_probe", pruning_layers=[1], repair_layers=[],
                       pruning_keep_counts=[6])
    stock = stock_copy(model)
    stock.config._attn_implementation = stock.config.text_config._attn_implementation = "eager"
    batch = make_batch([(2, 3, True)])  # BOS, 2 text, 16 image tokens at 3..18, 3 question tokens
    with torch.no_grad():
        model(**batch)
        eager = stock(**batch, output_attentions=True).attentions[1][0]  # (H, T, T)
    reference = eager[:, -3:, 3:19].mean((0, 1))  # (N,)
    assert (seen[0][0] - reference).abs().max() <= 1e-6
    assert 0.0 < seen[0].sum() < 1.0


def test_a_keep_of_its_own_is_counted_from_its_mask_not_the_keep_count(registry):
    """A selector that overrides `keep` may keep any number of tokens: the loop reads the count from its mask (a
    host sync) instead of assuming `pruning_keep_counts` -- which overran the compaction (an index error) when it
    kept more."""

    class KeepAll(TokenSelector):
        method = PruningMethod("keep_every_alive_token")

        def keep(self, ctx):
            return ctx.valid.clone()

    registry(KeepAll)
    model = make_model(pruning_method="keep_every_alive_token", pruning_layers=[1, 2], repair_layers=[],
                       pruning_keep_counts=[10, 5])
    batch = make_batch([(2, 3, True), (0, 4, True)])
    with torch.no_grad():
        out = model(**batch)
    assert out.keep_masks.all()
    assert out.past_key_values.get_seq_length() == batch["input_ids"].shape[1]  # nothing was dropped
    assert out.logits.isfinite().all()


def test_padding_reads_minus_one_in_token_positions_with_or_without_an_image_row():
    """A text-only batch's pruned-loop forward gave its padding positions 0, 1, ...; in a batch with an image row the
    same rows read -1 there (a `compute_metrics` keeping `>= 0` counted the padding)."""
    from conftest import stock_copy

    model = make_model(randomize_plugins=True)
    text = make_batch([(2, 3, False), (6, 6, False)])
    with torch.no_grad():
        out = model(**text, labels=text["input_ids"])
        stock = stock_copy(model)(**text, labels=text["input_ids"])
    assert torch.equal(out.token_positions >= 0, text["attention_mask"].bool())
    # nothing was pruned: the loss is stock's, padding labels included (the positions' -1 must not drop them)
    torch.testing.assert_close(out.loss, stock.loss, rtol=0, atol=1e-6)


def test_token_positions_follow_logits_to_keep():
    model = make_model()
    batch = make_batch([(2, 3, True), (5, 6, True)])
    with torch.no_grad():
        full = model(**batch)
        last3 = model(**batch, logits_to_keep=3)
        picked = model(**batch, logits_to_keep=torch.tensor([0, full.logits.shape[1] - 1]))
        with pytest.raises(ValueError, match=r"`logits_to_keep` holds position 27, but this forward's output has 17 "
                                             r"positions \(valid -17\.\.16\): with pruning they index the surviving"):
            model(**batch, logits_to_keep=torch.tensor([batch["input_ids"].shape[1] - 1]))
        with pytest.raises(ValueError, match=r"holds position -18, .* \(valid -17\.\.16\)"):
            model(**batch, logits_to_keep=torch.tensor([-18, 0]))
    assert torch.equal(last3.token_positions, full.token_positions[:, -3:])
    torch.testing.assert_close(last3.logits, full.logits[:, -3:], rtol=0, atol=1e-6)
    assert torch.equal(picked.token_positions, full.token_positions[:, [0, -1]])


def test_an_exact_count_that_keep_does_not_keep_is_named(registry):
    """`exact_count` sizes the pruned sequence without reading `keep`: a selector whose count was wrong went on with
    row lengths sized for it, without a word. On CPU, where reading the counts is free, it is checked."""
    class Overclaims(_Norm):
        method = PruningMethod("overclaims")

        def keep(self, ctx):  # the top 3 of each row, whatever the point asks
            return _top_k_mask_of(self.scores(ctx), ctx.valid, 3)

        def exact_count(self, ctx):
            return ctx.keep_count

    registry(Overclaims)
    model = make_model(pruning_method="overclaims", repair_layers=[], pruning_keep_counts=[10, 3])
    batch = make_batch([(2, 4, True), (3, 5, True)])
    with pytest.raises(ValueError, match=r"Overclaims\.exact_count returned 10, but its `keep` kept \[3, 3\] visual "
                                         r"tokens per row \(of \[16, 16\] alive\) at pruning point 0: return the "
                                         r"number `keep` leaves"):
        model(**batch)

    class Honest(Overclaims):
        method = PruningMethod("honest_three")

        def exact_count(self, ctx):
            return 3

    registry(Honest)
    model.config.pruning_method = "honest_three"
    honest = model(**batch)  # a true count passes, and prunes as reading the counts from `keep` does

    class Unclaimed(Overclaims):
        method = PruningMethod("unclaimed_three")

        def exact_count(self, ctx):
            return None

    registry(Unclaimed)
    model.config.pruning_method = "unclaimed_three"
    read = model(**batch)
    assert honest.kept_counts.tolist() == read.kept_counts.tolist() == [[3, 3], [3, 3]]
    assert torch.equal(honest.keep_masks, read.keep_masks) and torch.equal(honest.logits, read.logits)


def _top_k_mask_of(scores, valid, k):
    from modeling_rcp_llava import _top_k_mask

    return _top_k_mask(scores, valid, k)
