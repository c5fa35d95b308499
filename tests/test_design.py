"""The redesign's promises: a new pruning method is one selector class and one registry entry (defined here, in a
test file, without editing the project); the config is re-validated before every forward; runtime state never
leaks into the config or stays stale on the model."""

import pytest
import torch
from conftest import (
    IMAGE_TOKEN, NUM_VISUAL, at_positions, make_batch, make_model, masked_reference, row_inputs, stock_copy, tiny_config,
)

import configuration_rcp_llava
import modeling_rcp_llava
from configuration_rcp_llava import PRUNING_METHODS, PruningMethod, RcpLlavaConfig
from modeling_rcp_llava import SELECTORS, TokenSelector, register_pruning_method

PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]
TOY = dict(pruning_method="toy_norm", pruning_layers=[1, 3], repair_layers=[], pruning_keep_counts=[7, 3])


class NormSelector(TokenSelector):
    """A toy sixth method: keep the visual tokens whose hidden state has the largest L2 norm at the pruning layer."""

    method = PruningMethod("toy_norm")

    def scores(self, ctx):
        visual = ctx.hidden.gather(1, ctx.slots.unsqueeze(-1).expand(-1, -1, ctx.hidden.shape[-1]))  # (B, K, d)
        return visual.float().norm(dim=-1)  # (B, K)


@pytest.fixture(autouse=True, scope="module")
def toy_method():
    register_pruning_method(NormSelector)
    yield
    SELECTORS.pop("toy_norm")
    PRUNING_METHODS.pop("toy_norm")


def with_positions(batch):
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)}


# 1. A toy sixth method --------------------------------------------------------------------------------


def test_toy_method_keeps_the_largest_norms_at_its_first_layer():
    """At the first pruning layer the input is the unpruned layer-0 output: the stock model gives it."""
    model = make_model(**TOY)
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
        h1 = stock_copy(model)(**batch, output_hidden_states=True).hidden_states[1]  # input of layer 1
    assert out.kept_counts.tolist() == [[7, 3]] * 3 and model.last_pruning_info.pruning_layers == [1, 3]
    image = batch["input_ids"] == IMAGE_TOKEN
    for b in range(3):
        norms = h1[b][image[b]].norm(dim=-1)  # (N,) in raster order
        expected = sorted(sorted(range(NUM_VISUAL), key=lambda i: (-float(norms[i]), i))[:7])
        assert out.kept_indices[0][b].tolist() == expected
        assert set(out.kept_indices[1][b].tolist()) <= set(expected)


def test_toy_method_discard_equals_mask_and_batch_equals_single():
    model = make_model(**TOY)
    batch = with_positions(make_batch(PADDED))
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
        valid = out.token_positions >= 0
        theirs = at_positions(ref, out.token_positions)
        assert (out.logits - theirs)[valid].abs().max() <= 1e-4
        plain = make_batch(PADDED)
        gen = model.generate(**plain, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for i in range(3):
            single = row_inputs(plain, i, PADDED)
            one = model(**single)
            assert torch.equal(out.keep_masks[i], one.keep_masks[0])
            assert (out.logits[i][out.token_positions[i] >= 0] - one.logits[0]).abs().max() <= 1e-4
            single_gen = model.generate(**single, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(gen[i, -4:], single_gen[0, -4:])


def test_toy_method_generate_with_cache_equals_recompute():
    model = make_model(**TOY)
    batch = make_batch(PADDED)
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        keep = model.last_pruning_info.keep_masks
        for step in range(3):
            length = batch["input_ids"].shape[1] + step
            mask = torch.cat([batch["attention_mask"], torch.ones(3, step, dtype=torch.long)], 1)
            out = model(input_ids=gen.sequences[:, :length], pixel_values=batch["pixel_values"], attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False, visual_keep_masks=keep)
            assert (out.logits[:, -1] - gen.logits[step]).abs().max() <= 1e-4


def test_toy_method_config_rules_come_from_its_spec():
    from conftest import tiny_config

    with pytest.raises(ValueError, match=r"`pruning_keep_counts` is None, but `pruning_method='toy_norm'`"):
        tiny_config(**{**TOY, "pruning_keep_counts": None})
    with pytest.raises(ValueError, match=r"`pre_llm_keep_count` is 4, but `pruning_method='toy_norm'` does not"):
        tiny_config(**TOY, pre_llm_keep_count=4)
    assert tiny_config(**TOY).pruned_average_tokens() == (16 + 7 * 2 + 3) / 4


def test_registering_a_taken_name_or_a_non_selector_is_refused():
    class Other(TokenSelector):
        method = PruningMethod("toy_norm")

    with pytest.raises(ValueError, match="already registered; pass `overwrite=True`"):
        register_pruning_method(Other)
    with pytest.raises(TypeError, match="must be a `TokenSelector` subclass"):
        register_pruning_method(object)
    with pytest.raises(ValueError, match="prunes nowhere"):
        register_pruning_method(type("Nowhere", (TokenSelector,), {"method": PruningMethod("x", in_decoder=False)}))
    assert "x" not in PRUNING_METHODS


# 2. The config is checked again before every forward ----------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("pruning_keep_counts", [5, 10], r"`pruning_keep_counts` must be non-increasing"),
        ("pruning_keep_counts", [99, 5], r"`pruning_keep_counts` \[99, 5\] asks to keep more than the 16"),
        ("pruning_layers", [1, 3], r"`pruning_layers` is \[1, 3\], but this model's plug-ins were built for \[1, 2\]"),
        ("repair_layers", [3], r"`repair_layers` is \[3\], but this model's plug-ins were built for \[2, 3\]"),
        # plug-in sizes: the forward ran on the built modules, and the saved config then described other weights
        ("pruner_hidden_size", 32, r"`pruner_hidden_size` is 32, but this model's plug-ins were built with 16: plug-in "
                                   r"sizes are fixed when the model is built\. Build a new model with it \(e\.g\. "
                                   r"`from_pretrained\(\.\.\., pruner_hidden_size=32\)`\) instead of editing the "
                                   r"config, or set it back to 16\."),
        ("num_pruning_queries", 8, r"`num_pruning_queries` is 8, but this model's plug-ins were built with 16"),
        ("pruner_num_heads", 2, r"`pruner_num_heads` is 2, but this model's plug-ins were built with 4"),
        ("repair_bottleneck_size", 16, r"`repair_bottleneck_size` is 16, but this model's plug-ins were built with 8"),
        ("pruning_layers", [1, 9], r"`pruning_layers` contains \[9\]"),
        ("pruning_method", "magic", r"`pruning_method` is 'magic'"),
        ("gumbel_temperature", float("inf"), r"`gumbel_temperature` must be a positive float"),
        ("fastv_query", "first", r"`fastv_query` is 'first'"),
        # N changes with the feature strategy; the repair context's position table (Eq. 9) was built for 16 rows
        ("vision_feature_select_strategy", "full", r"^The config gives 17 visual tokens per image \(from `vision_config` "
                                                   r"and `vision_feature_select_strategy='full'`\), but this model's "
                                                   r"repair context was built for 16"),
    ],
)
def test_a_field_edited_after_construction_is_checked_at_the_next_forward(field, value, match):
    model = make_model()
    batch = make_batch(PADDED)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=match):
        model(**batch)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("pruning_method", ["rcp"], r"^`pruning_method` must be a method's name \(a str, one of \[.*\]\), got \['rcp'\]"),
        ("pruning_layers", None, r"^`pruning_layers` is None: the default placement is filled in when the config is "
                                 r"built, not after\. Set both lists, e\.g\. `config\.pruning_layers, "
                                 r"config\.repair_layers = RcpLlavaConfig\.paper_placement\(4\)`"),
        ("repair_layers", None, r"^`repair_layers` is None: the default placement"),
    ],
)
def test_a_field_edited_to_the_wrong_type_is_a_type_error_naming_it(field, value, match):
    """A list as the method's name failed as "unhashable type: 'list'"; a None placement (the constructor's default)
    as "must be a list of ints, got None", with no way to get the default back."""
    model = make_model()
    setattr(model.config, field, value)
    with pytest.raises(TypeError, match=match):
        model(**make_batch(PADDED))
    with pytest.raises(TypeError, match=match):
        tiny_config(**{field: value}) if field == "pruning_method" else model.config.validate_pruning()


@pytest.mark.parametrize("name, source", [
    ("num_visual_tokens", r"the vision tower's patch grid"),
    ("pruning_points", r"`pruning_layers` \(and `pre_llm_keep_count`"),
    ("point_keep_counts", r"`pruning_keep_counts` \(and `pre_llm_keep_count`\)"),
    ("pruning_spec", r"`pruning_method` \(the registered method of that name\): set it"),
])
def test_a_derived_property_given_a_value_is_refused_naming_its_source(tmp_path, name, source):
    """transformers sets config kwargs, `update` and `from_pretrained` overrides with `setattr`: a derived property
    raised "property ... has no setter" after logging the whole config."""
    match = rf"^`{name}` is derived from {source}.*; it cannot be set \(got 8\)\.$"
    with pytest.raises(ValueError, match=match):
        tiny_config(**{name: 8})
    config = tiny_config()
    with pytest.raises(ValueError, match=match):
        config.update({name: 8})
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        RcpLlavaConfig.from_pretrained(tmp_path, **{name: 8})
    assert config.num_visual_tokens == 16 and config.pruning_points == [1, 2] and config.pruning_spec.name == "rcp"


def test_a_vision_feature_layer_override_is_checked_on_load(tmp_path):
    """`from_pretrained(folder, vision_feature_layer=[...])` set the field after the checks (a VisPruner config it
    cannot run was returned, refused only at the model); it is merged in before them, as the placement's inputs."""
    config = tiny_config(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                         pre_llm_keep_count=4)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`pruning_method='vispruner'` needs one vision feature layer, but "
                                         r"`vision_feature_layer` is \[-2, -1\]"):
        RcpLlavaConfig.from_pretrained(tmp_path, vision_feature_layer=[-2, -1])
    assert RcpLlavaConfig.from_pretrained(tmp_path, vision_feature_layer=-1).vision_feature_layer == -1


@pytest.mark.parametrize("save", ["save_pretrained", "save_plugins"])
def test_a_plugin_size_edited_after_construction_is_refused_before_saving(tmp_path, save):
    """`save_pretrained` wrote the edited size into config.json beside weights of the built size, and loading the
    folder failed with size mismatches; the folder now stays as it was."""
    model = make_model()
    getattr(model, save)(tmp_path / "kept")
    before = {f.name: f.read_bytes() for f in (tmp_path / "kept").iterdir() if f.is_file()}
    model.config.pruner_hidden_size = 32
    with pytest.raises(ValueError, match=r"^`pruner_hidden_size` is 32, but this model's plug-ins were built with 16"):
        getattr(model, save)(tmp_path / "kept", overwrite=True)
    assert {f.name: f.read_bytes() for f in (tmp_path / "kept").iterdir() if f.is_file()} == before
    assert [p.name for p in (tmp_path / "kept").iterdir() if p.is_dir()] == []  # no staging folder left


def test_gumbel_temperature_is_a_forward_argument_not_config_state():
    """tau shapes the straight-through gradient (Eqs. 6-7); the forward argument acts like the config field and
    leaves the config alone."""
    model = make_model(randomize_plugins=True, pruning_keep_counts=None)
    model.model.gumbel_noise = False
    model.train()
    batch = make_batch(PADDED)

    def bias_grads(**kwargs):
        model.zero_grad()
        torch.manual_seed(0)  # query dropout
        model(**batch, **kwargs).layer_retention.sum().backward()
        return torch.stack([p.bias.grad for p in model.model.rcp_plugins.pruners.values()])

    hot = bias_grads(gumbel_temperature=4.0)
    assert model.config.gumbel_temperature == 1.0
    model.config.gumbel_temperature = 4.0
    same = bias_grads()
    model.config.gumbel_temperature = 1.0
    cold = bias_grads()
    assert torch.equal(hot, same)
    assert not torch.allclose(hot, cold)
    with pytest.raises(ValueError, match=r"The `gumbel_temperature` argument must be a positive float, got 0"):
        model(**batch, gumbel_temperature=0)


# 3. No stale or leaked runtime state ------------------------------------------------------------------


def test_classifier_free_guidance_keeps_the_prefills_pruning_info():
    """`guidance_scale > 1` runs the model on the unconditional ids at every step (transformers'
    `UnbatchedClassifierFreeGuidanceLogitsProcessor`, with a cache of its own): those unpruned forwards left
    `last_pruning_info` None after a pruned generate, where the README reads `kept_counts` off it (a probe)."""
    model = make_model()
    batch = make_batch(PADDED)
    with torch.no_grad():
        for use_cache in (True, False):
            model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=use_cache)
            plain = model.last_pruning_info
            model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=use_cache, guidance_scale=1.5)
            assert model.last_pruning_info is not plain  # a new record, equal to the plain generate's
            assert torch.equal(model.last_pruning_info.keep_masks, plain.keep_masks)
            assert torch.equal(model.last_pruning_info.kept_counts, plain.kept_counts)
        model(input_ids=torch.randint(3, 90, (2, 5)))  # after generate, a forward's own record again
        assert model.last_pruning_info is None


def test_last_pruning_info_is_refreshed_or_cleared_on_every_forward():
    model = make_model()
    batch = make_batch(PADDED)
    with torch.no_grad():
        model(**batch)
        assert model.last_pruning_info.keep_masks.shape == (3, 2, NUM_VISUAL)
        model(input_ids=torch.randint(3, 90, (2, 5)))  # no image: nothing was pruned
        assert model.last_pruning_info is None
        with model.plugins_disabled():
            model(**batch)
        assert model.last_pruning_info is None
        model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert model.last_pruning_info.keep_masks.shape == (3, 2, NUM_VISUAL)  # the prefill's, kept through decode
        # A model switched to the stock forward prunes nothing: its info is cleared too (it kept the rcp run's).
        model.config.pruning_method = "none"
        model(**batch)
        assert model.last_pruning_info is None
        model.config.pruning_method = "rcp"
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        model.config.pruning_method = "none"
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert model.last_pruning_info is None


def test_kept_indices_are_computed_only_when_read():
    model = make_model()
    with torch.no_grad():
        out = model(**make_batch(PADDED))
    assert out.kept_indices._lists is None  # the forward did no `.nonzero()`
    assert len(out.kept_indices) == 2 and out.kept_indices._lists is None
    for p in range(2):
        for b in range(3):
            assert torch.equal(out.kept_indices[p][b], out.keep_masks[b, p].nonzero().flatten())


def test_model_only_kwargs_never_reach_the_decoder_layers():
    model = make_model()
    seen = []
    for layer in model.model.language_model.layers:
        layer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**make_batch(PADDED), output_attentions=False, return_dict=True)
        model(**make_batch(PADDED), mm_encoder_outputs=None)
    assert len(seen) == 8
    assert not any(keys & {"output_attentions", "return_dict", "mm_encoder_outputs", "gumbel_temperature"}
                   for keys in seen)


def test_pruning_layout_context_restores_the_previous_layout():
    model = make_model()
    with model.pruning_layout("mask"):
        assert model.model.pruning_layout == "mask"
        with model.pruning_layout("discard"):
            assert model.model.pruning_layout == "discard"
        assert model.model.pruning_layout == "mask"
    assert model.model.pruning_layout is None
    with pytest.raises(ValueError, match="`layout` is 'masked'"):
        with model.pruning_layout("masked"):
            pass


def test_save_pretrained_leaves_the_class_alone_and_writes_both_hub_files(tmp_path):
    model = make_model()
    cls = type(model)
    before = cls.__dict__.get("_auto_class", "unset")
    model.save_pretrained(tmp_path)
    assert cls.__dict__.get("_auto_class", "unset") == before
    for module in (modeling_rcp_llava, configuration_rcp_llava):
        with open(module.__file__) as f, open(tmp_path / module.__file__.rsplit("/", 1)[-1]) as g:
            assert f.read() == g.read()


def test_toy_method_runs_through_the_evaluator(tmp_path):
    """The method grid reads the registry: the toy method is evaluated at the RCP model's layers with the same
    counts as attention top-k, and its selector is what ran."""
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.evaluation import available_methods, evaluate_grid, load_data, method_overrides
    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    base = RcpLlavaForConditionalGeneration.from_pretrained(
        folder / "model", pruning_layers=[1], repair_layers=[1], pruner_hidden_size=8, repair_bottleneck_size=8)
    processor = AutoProcessor.from_pretrained(folder / "model")
    processor.tokenizer.padding_side = "left"
    assert "toy_norm" in available_methods()
    assert method_overrides("toy_norm", 16, base.config) == dict(
        pruning_method="toy_norm", pruning_layers=[1], repair_layers=[], pruning_keep_counts=[16],
        pre_llm_keep_count=None)

    calls = []
    original = NormSelector.scores
    NormSelector.scores = lambda self, ctx: calls.append(ctx.layer_idx) or original(self, ctx)
    try:
        result = evaluate_grid(base, processor, load_data(str(folder / "dataset"), max_samples=8),
                               methods=["none", "toy_norm", "attention_topk"], budgets=["1/4", "1/8"], progress=False)
    finally:
        NormSelector.scores = original
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert list(rows) == [("none", "full"), ("toy_norm", "1/4"), ("toy_norm", "1/8"), ("attention_topk", "1/4"),
                          ("attention_topk", "1/8")]
    for budget, k in (("1/4", 16), ("1/8", 8)):
        toy, topk = rows[("toy_norm", budget)], rows[("attention_topk", budget)]
        assert toy["pruning_points"] == topk["pruning_points"] == [1] and toy["keep_counts"] == [k]
        assert toy["kept_per_point"] == [float(k)] and toy["n"] == 8
        assert toy["tokens_per_layer"] == [64, k]
    assert calls and set(calls) == {1}  # one selection per evaluation batch, at the RCP layer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mask_layout_layers_before_the_first_pruner_equal_the_teacher_bit_for_bit(attn):
    """The training layout switches to the soft key-mask attention for its loop; the layers before the first pruner
    still run the configured attention, so the student's early hidden states are the teacher's exactly."""
    model = make_model(randomize_plugins=True, attn_implementation=attn)
    batch = make_batch(PADDED)
    with torch.no_grad():
        with model.plugins_disabled():
            teacher = model(**batch, output_hidden_states=True, use_cache=False)
        with model.pruning_layout("mask"):
            student = model(**batch, output_hidden_states=True, use_cache=False)
    assert model.model.language_model.config._attn_implementation == attn  # restored after the loop
    assert torch.equal(student.hidden_states[0], teacher.hidden_states[0])
    assert torch.equal(student.hidden_states[1], teacher.hidden_states[1])  # layer 0's output; the pruner is at 1
    assert not torch.equal(student.hidden_states[2], teacher.hidden_states[2])


def test_method_none_loads_any_depth_with_the_defaults():
    """`pruning_method="none"` names no layers: a 4-layer model needs no `pruning_layers` / `repair_layers` (they
    defaulted to the paper's 7B placement before, which a shallow model refused)."""
    from conftest import tiny_config

    config = tiny_config(pruning_method="none", pruning_layers=None, repair_layers=None, pruning_keep_counts=None)
    assert config.pruning_layers == [] and config.repair_layers == [] and config.pruning_points == []
    assert config.tokens_per_layer() == [NUM_VISUAL] * 4
    assert tiny_config(pruning_layers=None, repair_layers=[], pruning_keep_counts=None,
                       text_config=dict(num_hidden_layers=30, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=100)
                       ).pruning_layers == [1, 12, 23]  # RCP: the paper's placement [1, 13, 25] scaled to 30 layers


def test_a_spec_without_a_selector_and_a_pre_llm_method_without_a_count_are_refused():
    from configuration_rcp_llava import register_pruning_spec
    from conftest import tiny_config

    register_pruning_spec(PruningMethod("spec_only"))
    try:
        model = make_model(pruning_method="spec_only", repair_layers=[])
        with pytest.raises(ValueError, match=r"`pruning_method='spec_only'` has a config spec but no token selector"):
            model(**make_batch(PADDED))
    finally:
        PRUNING_METHODS.pop("spec_only")
    register_pruning_spec(PruningMethod("pre_only", in_decoder=False, pre_llm=True))
    try:
        with pytest.raises(ValueError, match=r"`pruning_method='pre_only'` prunes before the LLM and needs "
                                             r"`pre_llm_keep_count`"):
            tiny_config(pruning_method="pre_only", pruning_layers=None, repair_layers=None, pruning_keep_counts=None)
    finally:
        PRUNING_METHODS.pop("pre_only")
