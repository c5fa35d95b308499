"""The stock-transformers contract: `pruning_method="none"` IS stock LLaVA; with pruning on, the output flags, the
`inputs_embeds` path, train mode and cache continuation behave as a `LlavaForConditionalGeneration` user expects,
and pruning happens only in a prefill that carries an image."""

import collections.abc
import copy
import math
import re

import pytest
import torch
from conftest import IMAGE_TOKEN, NUM_VISUAL, make_batch, make_model, row_inputs, stock_copy

SINGLE = [(3, 4, True)]
PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]
METHODS = {
    "rcp": dict(),
    "rcp-adaptive": dict(pruning_keep_counts=None),
    "vispruner": dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                      pre_llm_keep_count=6),
    "random-pre-llm": dict(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                           pre_llm_keep_count=5, pruning_seed=3),
    "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[], pruning_keep_counts=[6]),
    "attention_topk": dict(pruning_method="attention_topk", pruning_layers=[1, 2], repair_layers=[],
                           pruning_keep_counts=[10, 5]),
}


def none_and_stock(attn="sdpa"):
    model = make_model(pruning_method="none", pruning_layers=None, repair_layers=None, pruning_keep_counts=None,
                       attn_implementation=attn)
    return model, stock_copy(model)


# 1. pruning_method="none" is stock LLaVA -------------------------------------------------------------------


def test_none_equals_stock_exactly_with_every_output_flag():
    model, stock = none_and_stock(attn="eager")
    batch = make_batch(PADDED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
    with torch.no_grad():
        ours = model(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
        ref = stock(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
        assert torch.equal(ours.logits, ref.logits) and torch.equal(ours.loss, ref.loss)
        assert len(ours.hidden_states) == len(ref.hidden_states) == 5
        assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, ref.hidden_states))
        assert len(ours.attentions) == 4 and all(torch.equal(a, b) for a, b in zip(ours.attentions, ref.attentions))
        selected = model(**batch, output_hidden_states=[0, -1])
        assert torch.equal(selected.hidden_states[0], ref.hidden_states[0])
        assert torch.equal(selected.hidden_states[-1], ref.hidden_states[-1])
        assert selected.hidden_states[1:-1] == (None, None, None)
        as_tuple = model(**batch, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ref.logits)
        model.config.text_config.output_hidden_states = stock.config.text_config.output_hidden_states = True
        assert len(model(**batch).hidden_states) == len(stock(**batch).hidden_states) == 5
    assert model.last_pruning_info is None


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample", "static-cache"])
def test_none_generates_as_stock(mode):
    model, stock = none_and_stock()
    for m in (model, stock):
        m.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5)
    kwargs.update({"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=3),
                   "sample": dict(do_sample=True, top_k=5), "static-cache": dict(
                       do_sample=False, cache_implementation="static")}[mode])
    with torch.no_grad():
        torch.manual_seed(0)
        ours = model.generate(**batch, **kwargs)
        torch.manual_seed(0)
        ref = stock.generate(**batch, **kwargs)
    assert torch.equal(ours, ref)


@pytest.mark.slow
def test_none_compiles_with_a_static_cache_and_fullgraph():
    """On 4d033f1 `none` ran the custom loop and failed with "Data-dependent branching"; it is the stock forward now
    (about 30 s of inductor compilation on 2 CPU cores)."""
    from transformers import CompileConfig

    model, stock = none_and_stock()
    for m in (model, stock):
        m.generation_config.pad_token_id = 0
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    batch = make_batch(SINGLE)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        compiled = model.generate(**batch, cache_implementation="static", compile_config=compile_config, **greedy)
        ref = stock.generate(**batch, **greedy)
    assert torch.equal(compiled, ref)


# 2. Output flags with pruning on ----------------------------------------------------------------------------


def _flat(value):
    """A nested output tuple as a flat list of its leaves."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


def _same(a, b):
    """Equal leaves: tensors exactly, sequences of tensors (`kept_indices`) row by row, anything else by `==`."""
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if not isinstance(a, str) and isinstance(a, collections.abc.Sequence):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(METHODS))
def test_the_tuple_output_is_the_dict_outputs_fields_for_every_flag(name):
    """`return_dict=False` is the dict output's `to_tuple()`, leaf by leaf, for every flag combination (transformers'
    `test_model_outputs_equivalence` checks this but is xfailed on the bool fields; the tuple checks here read only
    its first entry, so a tuple without the loss passed: a mutation audit)."""
    import itertools

    model = make_model(randomize_plugins=True, attn_implementation="eager", **METHODS[name])
    batch = make_batch(PADDED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
    with torch.no_grad():
        for with_labels, hidden, attentions in itertools.product((False, True), repeat=3):
            kwargs = dict(batch, output_hidden_states=hidden, output_attentions=attentions, use_cache=False,
                          **({"labels": labels} if with_labels else {}))
            as_dict = model(**kwargs)
            as_tuple = model(**kwargs, return_dict=False)
            want, got = _flat(as_dict.to_tuple()), _flat(as_tuple)
            assert len(got) == len(want), (with_labels, hidden, attentions)
            assert all(type(a) is type(b) and _same(a, b) for a, b in zip(got, want)), (with_labels, hidden, attentions)
            assert torch.equal(as_tuple[0], as_dict.loss if with_labels else as_dict.logits)


def test_pruned_forward_honours_return_dict_and_hidden_state_flags():
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        as_tuple = model(**batch, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)
        selected = model(**batch, output_hidden_states=[0, -1])  # as stock: all L + 1, None where not selected
        assert selected.hidden_states[1:-1] == (None, None, None) and selected.hidden_state_positions[1] is None
        assert torch.equal(selected.hidden_states[0], full.hidden_states[0])
        assert torch.equal(selected.hidden_states[-1], full.hidden_states[-1])
        assert torch.equal(selected.hidden_state_positions[-1], full.hidden_state_positions[-1])
        assert model(**batch).hidden_states is None
        model.config.output_hidden_states = True  # from the config, as stock models read it
        from_config = model(**batch)
    assert len(from_config.hidden_states) == 5
    assert all(torch.equal(a, b) for a, b in zip(from_config.hidden_states, full.hidden_states))


def test_hidden_state_indices_resolve_as_stock():
    """Negative indices count from the L + 1 hidden states, as transformers' `resolve_hidden_states_indices` does:
    -(L + 1) is the embeddings (index 0), and an index outside [-(L + 1), L + 1) selects nothing."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    total = model.config.text_config.num_hidden_layers + 1
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        first = model(**batch, output_hidden_states=-total)
        outside = model(**batch, output_hidden_states=[-total - 1, total])
    assert len(first.hidden_states) == len(outside.hidden_states) == total
    assert torch.equal(first.hidden_states[0], full.hidden_states[0]) and first.hidden_states[1:] == (None,) * (total - 1)
    assert outside.hidden_states == (None,) * total


def test_pruned_forward_returns_the_attentions_over_the_surviving_tokens():
    """On 4d033f1 `output_attentions` was dropped (`attentions` None, also in `generate`)."""
    model = make_model(randomize_plugins=True, attn_implementation="eager")
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
        ref = stock_copy(model)(**batch, output_attentions=True)
        gen = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    lengths = [batch["input_ids"].shape[1], *[int(x) for x in batch["input_ids"].shape[1] - NUM_VISUAL +
                                              out.kept_counts.max(0).values]]
    widths = [lengths[0], lengths[1], lengths[2], lengths[2]]  # pruners before layers 1 and 2
    assert [a.shape[-1] for a in out.attentions] == widths and all(a.shape[-2] == a.shape[-1] for a in out.attentions)
    assert torch.allclose(out.attentions[0], ref.attentions[0], atol=1e-6)  # layer 0 runs before any pruning
    valid = out.token_positions >= 0
    rows = out.attentions[-1].sum(-1)  # (B, H, T'): each valid query row is a distribution over the kept keys
    assert torch.allclose(rows.permute(0, 2, 1)[valid], torch.ones_like(rows.permute(0, 2, 1)[valid]), atol=1e-5)
    assert len(gen.attentions) == 2 and len(gen.attentions[0]) == 4 and gen.attentions[1][-1].shape[-2] == 1


def test_sdpa_attentions_are_an_empty_tuple_with_stocks_warning(caplog):
    """With pruning, sdpa gave `(None, None, None, None)` and no warning; stock gives `()` and says why."""
    from transformers.utils import logging as hf_logging

    model = make_model(randomize_plugins=True)  # sdpa
    batch = make_batch(PADDED)
    hf_logging.enable_propagation()
    hf_logging.get_logger("modeling_rcp_llava").warning_once.cache_clear()  # once per process: earlier tests
    try:
        with torch.no_grad(), caplog.at_level("WARNING"):
            out = model(**batch, output_attentions=True)
            ref = stock_copy(model)(**batch, output_attentions=True)
    finally:
        hf_logging.disable_propagation()
    assert out.attentions == ref.attentions == ()
    ours = [r.getMessage() for r in caplog.records if r.name == "modeling_rcp_llava"]
    assert ours == ["`sdpa` attention does not support `output_attentions=True`. Please set your attention to "
                    "`eager` if you want any of these features."]


# 3. Pruning is triggered by an image, not by image-token ids ---------------------------------------------


def test_generating_the_image_token_id_mid_answer_continues():
    """On 4d033f1 the decode step after a generated `<image>` id raised "already holds N tokens"."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    with torch.no_grad():  # a large bias makes <image> the greedy choice at every step
        gen = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             sequence_bias={(IMAGE_TOKEN,): 1e4})
    prompt = batch["input_ids"].shape[1]
    assert (gen[:, prompt:] == IMAGE_TOKEN).all()
    assert model.last_pruning_info.kept_counts.tolist() == [[10, 5]] * 3  # the prefill's pruning, kept


@pytest.mark.parametrize("name", ["rcp", "vispruner", "fastv"])
def test_image_token_ids_without_an_image_are_text_as_in_stock(name):
    """On 4d033f1: "one image ... per prompt" for a partial run of ids, AttributeError for VisPruner."""
    model = make_model(**METHODS[name])
    stray = torch.tensor([[1, 5, IMAGE_TOKEN, IMAGE_TOKEN, 7, 8], [1, 5, 6, 7, IMAGE_TOKEN, 9]])
    with torch.no_grad():
        ours = model(input_ids=stray)
        ref = stock_copy(model)(input_ids=stray)
    assert (ours.logits - ref.logits).abs().max() <= 1e-5
    assert model.last_pruning_info is None  # nothing was pruned; the outputs carry a text row's pruning fields, as a
    # mixed batch gives them (every batch has the same fields, for `Trainer.predict`)
    assert ours.kept_counts.tolist() == [[0] * len(model.config.pruning_points)] * 2 and not ours.has_image.any()
    half = make_model(dtype=torch.bfloat16, **METHODS[name])
    with torch.no_grad():  # float32 as a pruned prefill's, in a half-precision model too (gathered per field)
        assert half(input_ids=stray).layer_retention.dtype == torch.float32
        mixed = half(**make_batch([(2, 3, True), (3, 2, False)], dtype=torch.bfloat16)).layer_retention
    assert mixed.dtype == torch.float32


@pytest.mark.parametrize("name", ["rcp", "vispruner", "random-pre-llm", "attention_topk"])
def test_inputs_embeds_prunes_like_input_ids(name):
    """On 4d033f1 the `inputs_embeds` path found no image token (the mask was taken after the features were
    scattered in) and ran unpruned."""
    model = make_model(**METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        by_ids = model(**batch)
        by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"])
        gen_ids = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        gen_embeds = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                    pixel_values=batch["pixel_values"], max_new_tokens=4, min_new_tokens=4,
                                    do_sample=False)
    assert torch.equal(by_embeds.keep_masks, by_ids.keep_masks) and torch.equal(by_embeds.token_positions,
                                                                                by_ids.token_positions)
    assert (by_embeds.logits - by_ids.logits).abs().max() <= 1e-5
    assert torch.equal(gen_embeds, gen_ids[:, batch["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", ["vispruner", "rcp"])
def test_beams_and_several_return_sequences_equal_single_runs(name):
    """Beams and `num_return_sequences` repeat each prompt with its image (VisPruner reads the vision tower's
    hidden states, so the image must be expanded whole, not only its projected features)."""
    model = make_model(**METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED[:2])
    beam = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        together = model.generate(**batch, **beam)
        info = model.last_pruning_info  # one row per prefill row: each prompt's, num_beams times (the README's rule)
        assert info.keep_masks.shape[0] == 6 and together.shape[0] == 4
        for i in range(2):
            single = model.generate(**row_inputs(batch, i, PADDED[:2]), **beam)
            assert torch.equal(together[2 * i:2 * i + 2, -3:], single[:, -3:])
            assert torch.equal(info.keep_masks[3 * i:3 * i + 3], model.last_pruning_info.keep_masks)


# 4. Training-free baselines in train mode -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vispruner", "random-pre-llm", "fastv", "attention_topk"])
def test_baselines_run_in_train_mode_with_backward_and_gradient_checkpointing(name):
    """On 4d033f1 any forward of a baseline in train mode raised "The differentiable ('mask') pruning layout...".
    A baseline prunes physically in train mode too: same outputs as eval, gradients reach the backbone."""
    model = make_model(**METHODS[name])
    batch = make_batch(PADDED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
    with torch.no_grad():
        ref = model(**batch, labels=labels)
    model.train()
    out = model(**batch, labels=labels)
    assert torch.equal(out.keep_masks, ref.keep_masks) and (out.logits - ref.logits).abs().max() <= 1e-5
    out.loss.backward()
    assert model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.gradient_checkpointing_enable()
    checkpointed = model(**batch, labels=labels)
    checkpointed.loss.backward()
    assert torch.equal(checkpointed.keep_masks, ref.keep_masks)
    assert model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_rcp_trains_in_the_mask_layout_only_while_its_plugins_train():
    model = make_model(randomize_plugins=True).train()
    batch = make_batch(PADDED)
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # mask layout: nothing moved
    for p in model.plugin_parameters():
        p.requires_grad_(False)  # e.g. fine-tuning the backbone of a pruned model
    assert model(**batch).logits.shape[1] < batch["input_ids"].shape[1]  # physical discard


# 5. Continuing from a returned cache -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("specs", [SINGLE, PADDED], ids=["single", "left-padded"])
def test_generate_continues_from_a_returned_cache(name, specs):
    """On 4d033f1, after a pre-LLM prune, `generate(input_ids=out.sequences, past_key_values=out.past_key_values)`
    raised "already holds 12 tokens": layer 0's cache holds the prompt minus the dropped tokens."""
    model = make_model(**METHODS[name], randomize_plugins=True)
    model.generation_config.pad_token_id = 0
    batch = make_batch(specs)
    greedy = dict(do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **greedy)
        first = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, **greedy)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(specs), 3, dtype=torch.long)], dim=1)
        rest = model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              max_new_tokens=3, min_new_tokens=3, **greedy)
    assert torch.equal(rest.sequences, whole.sequences)
    if name in ("vispruner", "random-pre-llm"):
        seen = first.past_key_values.get_seq_length()
        held = first.past_key_values.layers[0].keys.shape[-2]
        assert seen == batch["input_ids"].shape[1] + 5 and held < seen  # input tokens seen vs tokens held


@pytest.mark.parametrize("name", ["vispruner", "rcp"])
@pytest.mark.parametrize("cache", ["dynamic", "quantized"])
def test_generate_continues_from_a_cache_given_by_the_user(name, cache):
    """A user's cache (kept as is by generate) reports the input tokens seen after the pruned prefill; it used to
    report layer 0's physical length, and continuing fed the dropped positions again (logits off by 0.05 for a
    `DynamicCache`; a `QuantizedCache`, which no class swap covered, by 0.06 after VisPruner's pre-LLM prune)."""
    from transformers import DynamicCache, QuantizedCache

    model = make_model(**METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(SINGLE)
    greedy = dict(do_sample=False, return_dict_in_generate=True)

    def new_cache():
        return DynamicCache() if cache == "dynamic" else QuantizedCache("fp8", model.config)

    with torch.no_grad():
        whole = model.generate(**batch, past_key_values=new_cache(), max_new_tokens=5, min_new_tokens=5,
                               output_logits=True, **greedy)
        first = model.generate(**batch, past_key_values=new_cache(), max_new_tokens=2, min_new_tokens=2, **greedy)
        assert first.past_key_values.get_seq_length() == batch["input_ids"].shape[1] + 1  # prompt + 1 fed token
        assert isinstance(first.past_key_values, DynamicCache if cache == "dynamic" else QuantizedCache)
        rest = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=3,
                              min_new_tokens=3, output_logits=True, **greedy)
    assert torch.equal(rest.sequences, whole.sequences)
    assert all(torch.equal(a, b) for a, b in zip(rest.logits, whole.logits[2:]))


@pytest.mark.parametrize("name", ["rcp", "fastv", "vispruner"])
@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_given_cache_is_used_whatever_use_cache_says(name, how):
    """Stock's text model reads and fills a cache it is given whatever `use_cache` says; the pruned forward dropped
    it, so a decode step with `use_cache=False` (or a config saved with `use_cache: false`) ran with no context."""
    from transformers import DynamicCache

    model = make_model(**METHODS[name])
    batch = make_batch(PADDED)
    off = {"use_cache": False} if how == "argument" else {}
    if how == "config":
        model.config.text_config.use_cache = False
    with torch.no_grad():
        reference = model(**batch, use_cache=True)
        cache = DynamicCache()
        prefill = model(**batch, past_key_values=cache, **off)
        assert prefill.past_key_values is cache and cache.get_seq_length() == batch["input_ids"].shape[1]
        torch.testing.assert_close(prefill.logits, reference.logits, rtol=0, atol=0)
        step = reference.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], 1)
        expected = model(input_ids=step, attention_mask=mask, past_key_values=reference.past_key_values,
                         use_cache=True)
        got = model(input_ids=step, attention_mask=mask, past_key_values=cache, **off)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] + 1


def test_a_reset_cache_forgets_its_pruned_prefill():
    """`Cache.reset` (emptied for reuse) kept the pruned prefill's state: refilled by the stock path, the cache
    counted the tokens VisPruner had dropped, and generation continued from it at the wrong positions."""
    from transformers import DynamicCache

    model = make_model(**METHODS["vispruner"])
    model.generation_config.pad_token_id = 0
    batch = make_batch(SINGLE)
    greedy = dict(do_sample=False, return_dict_in_generate=True)
    cache = DynamicCache()
    with torch.no_grad():
        model.generate(**batch, past_key_values=cache, max_new_tokens=2)
        assert cache.rcp_state is not None
        cache.reset()
        assert cache.rcp_state is None
        model.config.pruning_method, model.config.pre_llm_keep_count = "none", None
        whole = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, output_logits=True, **greedy)
        first = model.generate(**batch, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **greedy)
        assert cache.get_seq_length() == cache.layers[0].keys.shape[-2] == batch["input_ids"].shape[1] + 2
        rest = model.generate(input_ids=first.sequences, past_key_values=cache, max_new_tokens=3, min_new_tokens=3,
                              output_logits=True, **greedy)
    assert torch.equal(rest.sequences, whole.sequences)
    assert all(torch.equal(a, b) for a, b in zip(rest.logits, whole.logits[3:]))


def test_a_pruned_quantized_cache_unpickles_in_a_new_process(tmp_path):
    """`RcpQuantizedCache` is made at run time: pickled by reference, a new process (a spawned worker, `torch.load`)
    could not find it until it had pruned with such a cache itself."""
    import subprocess
    import sys

    from transformers import QuantizedCache

    from conftest import ROOT

    model = make_model(**METHODS["vispruner"])
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(**make_batch(SINGLE), past_key_values=QuantizedCache("fp8", model.config),
                             max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert type(cache).__name__ == "RcpQuantizedCache"
    torch.save(cache, tmp_path / "cache.pkl")  # pickle (`pickle.dumps` of fp8 tensors fails to load in torch itself)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); import modeling_rcp_llava; "
            "c = torch.load(sys.argv[1], weights_only=False); "
            "print(type(c).__name__, type(c).__mro__[2].__name__, c.get_seq_length(), c.rcp_state.input_length)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache.pkl"), ROOT], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["RcpQuantizedCache", "QuantizedCache", str(cache.get_seq_length()),
                                   str(cache.rcp_state.input_length)]
    copied = copy.deepcopy(cache)
    assert type(copied) is type(cache) and copied.get_seq_length() == cache.get_seq_length()


def test_none_generates_with_a_pixtral_tower_and_image_sizes_as_stock():
    """`generate` pre-encodes the images with only the arguments `get_image_features`' signature names; ours had no
    `image_sizes`, so a Pixtral tower (llava-hf's pixtral-12b layout) saw the padded image whole: 'Image features and
    image tokens do not match, tokens: 8, features: 512'."""
    from transformers import LlamaConfig, PixtralVisionConfig

    from configuration_rcp_llava import RcpLlavaConfig
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, head_dim=8)
    config = RcpLlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=99,
                            pruning_method="none", vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = RcpLlavaForConditionalGeneration(config).eval()
    stock = stock_copy(model)
    ids = torch.tensor([[1, 5, 6] + [99] * 8 + [7, 8]])  # a 16 x 8 image: 4 x 2 patches
    pixels = torch.randn(1, 3, 16, 16)
    pixels[..., 8:] = 0
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                  image_sizes=torch.tensor([[16, 8]]))
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        ours, theirs = model.generate(**inputs, **greedy), stock.generate(**inputs, **greedy)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_last_hidden_state_is_the_final_norm_output_as_stock(name):
    """transformers 5 swaps the final norm's output in as the last of `hidden_states`; the pruned loops returned the
    last layer's raw output there (3.0 off stock for a prompt without an image, in every generate step too)."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    stock = stock_copy(model)
    batch, text = make_batch(PADDED), make_batch([(2, 3, False), (4, 6, False)])
    with torch.no_grad():
        out = model.model(**batch, output_hidden_states=True, use_cache=True)
        assert len(out.hidden_states) == 5 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
        step = model(**batch, use_cache=True)
        nxt = step.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        decoded = model.model(input_ids=nxt, attention_mask=mask, past_key_values=step.past_key_values,
                              output_hidden_states=[0, 4])
        assert decoded.hidden_states[1:4] == (None, None, None)
        assert torch.equal(decoded.hidden_states[4], decoded.last_hidden_state)
        ours, theirs = model(**text, output_hidden_states=True), stock(**text, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_right_padded_batch_has_the_loss_terms_of_its_rows_alone(name):
    """Compaction right-aligns every row, so a right-padded row's first token came after padding slots, and the
    last of them "predicted" it: a loss term per padded row that neither stock nor the row alone has (TRL's
    collators pad on the right with labels = input_ids)."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    specs = PADDED + [(3, 2, False)]
    left = make_batch(specs)
    right = {"pixel_values": left["pixel_values"]}
    order = torch.argsort(left["attention_mask"], dim=1, descending=True, stable=True)  # real tokens first, in order
    right["input_ids"], right["attention_mask"] = left["input_ids"].gather(1, order), left["attention_mask"].gather(1, order)
    labels = right["input_ids"].masked_fill(right["attention_mask"] == 0, -100)
    with torch.no_grad():
        total = model(**right, labels=labels, num_items_in_batch=1).loss  # a sum of the terms
        rows = [model(**row_inputs(left, i, specs), labels=row_inputs(left, i, specs)["input_ids"],
                      num_items_in_batch=1).loss for i in range(len(specs))]
        torch.testing.assert_close(total, sum(rows), rtol=1e-5, atol=1e-5)
        only_first = torch.full_like(labels, -100)
        only_first[:, 0] = labels[:, 0]  # nothing precedes these: no term, as stock (nan)
        assert model(**right, labels=only_first).loss.isnan()
        # image-first rows without BOS, every token a target: input position 0 may be pruned, and the first token
        # that survives (position >= 1) sat behind padding slots too (a review found the first fix missed it)
        g = torch.Generator().manual_seed(0)
        rows = [[IMAGE_TOKEN] * NUM_VISUAL + torch.randint(3, 90, (q,), generator=g).tolist() for q in (3, 7, 5)]
        ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        pixels = torch.randn(3, 3, 16, 16, generator=g)
        total = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids.masked_fill(mask == 0, -100),
                      question_mask=mask.bool() & (ids != IMAGE_TOKEN), num_items_in_batch=1).loss
        alone = [model(input_ids=torch.tensor([r]), pixel_values=pixels[i:i + 1], labels=torch.tensor([r]),
                       question_mask=torch.tensor([r]) != IMAGE_TOKEN, num_items_in_batch=1).loss
                 for i, r in enumerate(rows)]
        torch.testing.assert_close(total, sum(alone), rtol=1e-5, atol=1e-5)


def test_the_repair_loss_reads_each_layers_own_output_the_last_one_too():
    """With `hidden_states[L]` the final norm's output (as stock), the repair loss and the drift read the last
    layer's own output from the norm's input (`LayerOutputs`): on the testbed placements the last layer is a repair
    layer (deep: [11, 15] of 16), and its W2 term compared normed states, 140x the repaired output's on a probe."""
    from rcp_llava.losses import LayerOutputs

    model = make_model(randomize_plugins=True)
    seen = {}
    hooks = [model.model.rcp_plugins.repair_adapters[k].register_forward_hook(
        lambda module, args, output, k=k: seen.__setitem__(int(k), output)) for k in ("2", "3")]
    with torch.no_grad(), model.pruning_layout("mask"), LayerOutputs(model) as outputs:
        out = model(**make_batch(PADDED), output_hidden_states=True, use_cache=False)
        states = outputs.of(out, [1, 2, 3])
    for hook in hooks:
        hook.remove()
    assert states[0] is out.hidden_states[2] and states[1] is out.hidden_states[3]
    assert torch.equal(states[1], seen[2]) and torch.equal(states[2], seen[3])  # the repaired outputs
    assert torch.equal(model.model.language_model.norm(states[2]), out.hidden_states[4])
    # The block's hook goes with it: left on the norm, one leaked per training step, each holding its tensor, and
    # the last output read after the block was a later forward's.
    assert not model.model.language_model.norm._forward_pre_hooks
    with torch.no_grad():
        model(**make_batch(PADDED), use_cache=False)
    assert outputs.last is states[2]


def test_none_generates_with_chunked_prefill_as_stock():
    """`none` lets generate pre-encode the images, as stock does (chunked prefill cannot split raw pixels)."""
    model, stock = none_and_stock()
    for m in (model, stock):
        m.generation_config.pad_token_id = 0
    batch = make_batch(SINGLE)
    greedy = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, prefill_chunk_size=8)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **greedy), stock.generate(**batch, **greedy))


def test_vispruner_with_precomputed_image_outputs_and_beams():
    """Precomputed `mm_encoder_outputs` (from the model's own `get_image_features`, which adds the vision states
    VisPruner reads): generate repeats only their features for beams; the kept sets are repeated to match."""
    model = make_model(**METHODS["vispruner"])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED[:2])
    beam = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        image = model.model.get_image_features(batch["pixel_values"], return_dict=True)
        given = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               mm_encoder_outputs={"image": image}, **beam)
        ref = model.generate(**batch, **beam)
    assert torch.equal(given, ref)


def test_vispruner_refuses_precomputed_image_outputs_it_cannot_rank():
    """VisPruner ranks patches with the vision tower's hidden states. Precomputed `mm_encoder_outputs` without them
    (features encoded elsewhere: `hidden_states=None`) are refused by name, in `forward` and in `generate`, rather
    than failing inside the [CLS]-attention; and outputs whose features cover more images than their hidden states
    (3 feature sets, states of 2 images: not `generate`'s beam repetition, which is a multiple) are refused rather
    than paired with another image's kept set."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = make_model(**METHODS["vispruner"])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)  # 3 rows, one image each
    pixel_values = batch.pop("pixel_values")
    with torch.no_grad():
        image = model.model.get_image_features(pixel_values, return_dict=True)
        two = model.model.get_image_features(pixel_values[:2], return_dict=True)
    stateless = BaseModelOutputWithPooling(pooler_output=image.pooler_output, hidden_states=None)
    no_states = (r"^`pruning_method='vispruner'` ranks patches with the vision tower's hidden states, but the image "
                 r"outputs hold none: pass `pixel_values`, or `mm_encoder_outputs` from this model's own "
                 r"`model\.model\.get_image_features\(pixel_values\)`, which adds them\.$")
    with torch.no_grad():
        with pytest.raises(ValueError, match=no_states):
            model(**batch, mm_encoder_outputs={"image": stateless})
        with pytest.raises(ValueError, match=no_states):
            model.generate(**batch, mm_encoder_outputs={"image": stateless}, max_new_tokens=2)
        # transformers' own form: `output_hidden_states=False` keeps only the feature layer's entry ([None, h, None]),
        # and the [CLS] attention also reads the layer before it -- a TypeError in layer_norm before this check
        selected = model.model.get_image_features(pixel_values, return_dict=True, output_hidden_states=False)
        assert [h is None for h in selected.hidden_states] == [True, False, True]
        with pytest.raises(ValueError, match=r"^`pruning_method='vispruner'` ranks patches with the vision tower's "
                                             r"hidden states, but the image outputs hold those of layers \[1\] only "
                                             r"\(it reads \[0, 1\]\): pass `pixel_values`"):
            model(**batch, mm_encoder_outputs={"image": selected})
        mixed = BaseModelOutputWithPooling(pooler_output=image.pooler_output, hidden_states=two.hidden_states)
        with pytest.raises(ValueError, match=r"^`pruning_method='vispruner'`: the image outputs hold 3 feature sets "
                                             r"but hidden states of 2 images; pass `pixel_values` instead of "
                                             r"`mm_encoder_outputs`\.$"):
            model(**batch, mm_encoder_outputs={"image": mixed})
        # the model's own outputs, whole, are taken: the kept sets of `pixel_values` (6 of 16 per row)
        given = model(**batch, mm_encoder_outputs={"image": image})
        assert model.last_pruning_info.kept_counts[:, 0].tolist() == [6, 6, 6]
        ref = model(**batch, pixel_values=pixel_values)
    assert torch.equal(given.logits, ref.logits)


def test_a_copied_cache_continues_twice_the_same():
    model = make_model(**METHODS["vispruner"])
    model.generation_config.pad_token_id = 0
    batch = make_batch(SINGLE)
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                               return_dict_in_generate=True)
        # logits, not only tokens: a copy that lost its pruning state (the tokens VisPruner dropped before the LLM)
        # continued 0.06 off in its logits with the same two tokens (a mutation audit)
        kwargs = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                      output_logits=True)
        a = model.generate(input_ids=first.sequences, past_key_values=copy.deepcopy(first.past_key_values), **kwargs)
        b = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape[1] == batch["input_ids"].shape[1] + 4
    assert len(a.logits) == 2 and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert NUM_VISUAL == 16


# 6. torch.compile with pruning on -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_torch_compile_of_a_pruning_model_gives_its_eager_outputs(name, monkeypatch):
    """`torch.compile(model)` as a transformers user writes it: the pruned forward runs eagerly inside the compiled
    model (`torch.compiler.disable`; Dynamo traced FastV into a size mismatch and Inductor failed on RCP's prior before),
    so logits, kept sets and greedy generation on a left-padded batch are the eager model's exactly -- and the user is
    told once that this part is not compiled."""
    from modeling_rcp_llava import logger

    said = []
    monkeypatch.setattr(logger, "warning_once", said.append)
    torch._dynamo.reset()
    model = make_model(randomize_plugins=True, **METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref, ref_tokens = model(**batch), model.generate(**batch, **greedy)
        assert not said  # eager: nothing to say
        out = torch.compile(model)(**batch)
        assert torch.equal(out.logits, ref.logits)
        assert all(torch.equal(a, b) for a, b in zip(out.keep_masks, ref.keep_masks))
        # `generate` calls the model's own forward (a compiled wrapper's `generate` is the eager model's): compile that
        model.forward = torch.compile(model.forward)
        assert torch.equal(model.generate(**batch, **greedy), ref_tokens)
    torch._dynamo.reset()
    method = METHODS[name].get("pruning_method", "rcp")
    assert said and set(said) == {
        f"torch.compile: `pruning_method={method!r}` runs the pruned forward eagerly (its shapes follow the kept "
        "sets), so compiling it gives the same outputs and no speed-up there; `pruning_method='none'` is the stock "
        "forward and compiles."}


# 7. Assisted / prompt-lookup decoding ------------------------------------------------------------------------------


def _repeating_prompt():
    """One prompt whose text repeats, so prompt lookup drafts tokens and the verifying forward rejects some."""
    batch = make_batch(SINGLE)
    tail = batch["input_ids"][:, -4:]
    batch["input_ids"] = torch.cat([batch["input_ids"], tail, tail], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def _crops_into_the_prefill(monkeypatch):
    """Record each cut a cache's `crop` makes into its pruned prefill (the draft verified with the prompt)."""
    from modeling_rcp_llava import RcpDecodeState

    cuts, crop = [], RcpDecodeState.crop

    def spy(self, tokens, decoded):
        cuts.append(tokens - max(decoded, 0))
        return crop(self, tokens, decoded)

    monkeypatch.setattr(RcpDecodeState, "crop", spy)
    return cuts


@pytest.mark.parametrize("name", list(METHODS))
def test_assisted_decoding_gives_greedy_decodings_tokens_where_an_image_is_pruned(name, monkeypatch):
    """Assisted and prompt-lookup decoding verify the draft in the prompt's own forward. It was refused with pruning
    (before that, on 2f970f9: "Trying to create tensor with negative dimension" for RCP): the prefill would choose
    visual tokens with the draft read as question text (FastV: its last token as the prompt's), then crop the
    rejected draft out of the pruned prompt's segments. Now the prompt ends at its `answer_mask`, and the crop
    follows the prefill's state: the tokens, kept sets and logits of greedy decoding, with an assistant whose
    4-token drafts are all rejected (each crop cutting into the prefill at first) and with prompt lookup."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    model.generation_config.pad_token_id = 0
    assistant = make_model(seed=10, pruning_method="none", pruning_layers=None, repair_layers=None,
                           pruning_keep_counts=None)
    assistant.generation_config.update(pad_token_id=0, num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)  # always 4 tokens
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    cuts = _crops_into_the_prefill(monkeypatch)
    for batch, assisted in ((make_batch(SINGLE), dict(assistant_model=assistant)),
                            (_repeating_prompt(), dict(prompt_lookup_num_tokens=3))):
        with torch.no_grad():
            ref = model.generate(**batch, **greedy)
            ref_info = model.last_pruning_info
            cuts.clear()
            out = model.generate(**batch, **greedy, **assisted)
        assert torch.equal(out.sequences, ref.sequences), assisted
        for ours, theirs in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert torch.equal(model.last_pruning_info.keep_masks, ref_info.keep_masks)
        if "assistant_model" in assisted:
            assert cuts[0] == 4  # the whole first draft, cut from the prefill's end
    text = {"input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, 5),
            "attention_mask": batch["attention_mask"]}
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():  # a text-only prompt is not pruned: as on a stock model
        assert torch.equal(model.generate(**text, **greedy, prompt_lookup_num_tokens=3), model.generate(**text, **greedy))


@pytest.mark.parametrize("name", list(METHODS))
def test_accepted_drafts_decode_as_greedy_decoding(name, monkeypatch):
    """The assisted test above rejects every draft, so the draft's tokens never stand as the answer: here a candidate
    generator proposes greedy decoding's own next tokens, all of a 3-token draft or its first only, and the verifying
    forwards accept them. Accepted draft tokens are answer positions: the repair adapters correct them (the answer
    mask grown over the draft) and decoding on from them must give greedy decoding's tokens, logits and kept sets."""
    from transformers.generation.candidate_generator import CandidateGenerator

    class Oracle(CandidateGenerator):  # the reference's next tokens, the draft's tail made wrong after `right`
        def __init__(self, target, right):
            self.target, self.right, self.matches = target, right, []

        def get_candidates(self, input_ids, **kwargs):
            draft = self.target[:, input_ids.shape[1]:input_ids.shape[1] + 3].clone()
            draft[:, self.right:] = 3 + (draft[:, self.right:] - 2) % 80  # another ordinary token
            return torch.cat([input_ids, draft], dim=1), None

        def update_candidate_strategy(self, input_ids, scores, num_matches):
            self.matches.append(num_matches)

    model = make_model(randomize_plugins=True, **METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(SINGLE)
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        ref = model.generate(**batch, **greedy)
        ref_info = model.last_pruning_info
        for right in (3, 1):
            oracle = Oracle(ref.sequences, right)
            monkeypatch.setattr(model, "_get_candidate_generator", lambda *args, **kwargs: oracle)
            out = model.generate(**batch, **greedy, prompt_lookup_num_tokens=3)
            assert torch.equal(out.sequences, ref.sequences), right
            for ours, theirs in zip(out.logits, ref.logits, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
            assert torch.equal(model.last_pruning_info.keep_masks, ref_info.keep_masks)
            # drafts were accepted: whole ones (then the one token left), or their first token each time
            assert oracle.matches == ([3, 3, 1] if right == 3 else [1] * 5), (right, oracle.matches)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_draft_verified_with_its_prompt_selects_and_decodes_as_the_prompt_alone(name):
    """The forward under assisted decoding, called directly on a left-padded batch: prompt + a 3-token draft with
    `answer_mask` from the prompt's last token keeps the prompt's kept sets and logits; cropped back to the prompt,
    its cache decodes as the prompt's own (the segments' stored key masks cut too: with padding they are read)."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    batch = make_batch(PADDED)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    bsz, length = ids.shape
    draft = torch.randint(3, 90, (bsz, 3), generator=torch.Generator().manual_seed(1))
    step = torch.tensor([[7]] * bsz)
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        answer = torch.zeros(bsz, length + 3, dtype=torch.bool)
        answer[:, length - 1:] = True
        full_mask = torch.cat([mask, torch.ones_like(draft)], dim=1)
        verified = model(input_ids=torch.cat([ids, draft], dim=1), attention_mask=full_mask, pixel_values=pixels,
                         answer_mask=answer, use_cache=True)
        assert alone.has_image.all() and torch.equal(verified.keep_masks, alone.keep_masks)
        # logits come for the kept slots (physical discard): the prompt's last token is 4th from the end
        torch.testing.assert_close(verified.logits[:, -4], alone.logits[:, -1], rtol=0, atol=1e-5)
        cache = verified.past_key_values
        cache.crop(-3)
        assert cache.get_seq_length() == alone.past_key_values.get_seq_length() == length
        step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        ours = model(input_ids=step, attention_mask=step_mask, past_key_values=cache).logits
        theirs = model(input_ids=step, attention_mask=step_mask, past_key_values=alone.past_key_values).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_crop_into_a_pruned_prompt_is_refused():
    """The prompt's tokens chose the kept sets: cropping into them would leave another prompt's selection (stock
    crops any token). Decoded tokens crop as in stock; the refusal changes nothing."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(SINGLE)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        step = torch.tensor([[7, 8]])
        model(input_ids=step, attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 2, dtype=torch.long),
              past_key_values=cache)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    with pytest.raises(ValueError, match=r"^`crop` would remove 3 tokens from a cache filled by a pruned prefill: 2 "
                                         r"decoded after it and 1 of its prompt, whose tokens chose the visual tokens"):
        cache.crop(-3)
    assert [layer.get_seq_length() for layer in cache.layers] == lengths
    seen = cache.get_seq_length()
    cache.crop(-2)
    assert [layer.get_seq_length() for layer in cache.layers] == [n - 2 for n in lengths]
    assert cache.get_seq_length() == seen - 2


def test_a_crop_follows_the_draft_left_and_the_tokens_decoded_after_it():
    """Cropping part of a verified draft leaves the rest of it croppable, and no more: the prefill's draft length
    shrinks with each cut (left as it was, a later crop went into the prompt unrefused). A crop of decoded tokens only
    leaves the prefill's state as it is (its segments' key masks, read with padding), so the next step decodes as
    after the prompt and the draft's first token alone."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    bsz, length = ids.shape
    draft = torch.randint(3, 90, (bsz, 3), generator=torch.Generator().manual_seed(1))
    first, second = torch.tensor([[7]] * bsz), torch.tensor([[8]] * bsz)

    def grown(n):
        return torch.cat([mask, torch.ones(bsz, n, dtype=mask.dtype)], dim=1)

    with torch.no_grad():
        answer = torch.zeros(bsz, length + 3, dtype=torch.bool)
        answer[:, length - 1:] = True
        cache = model(input_ids=torch.cat([ids, draft], dim=1), attention_mask=grown(3), pixel_values=pixels,
                      answer_mask=answer, use_cache=True).past_key_values
        cache.crop(-2)  # the draft's last two tokens: its first stays
        model(input_ids=first, attention_mask=grown(2), past_key_values=cache)
        cache.crop(-1)  # the decoded token alone
        ours = model(input_ids=second, attention_mask=grown(2), past_key_values=cache).logits
        alone = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True).past_key_values
        model(input_ids=draft[:, :1], attention_mask=grown(1), past_key_values=alone)
        theirs = model(input_ids=second, attention_mask=grown(2), past_key_values=alone).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        lengths = [layer.get_seq_length() for layer in cache.layers]
        with pytest.raises(ValueError, match=r"^`crop` would remove 3 tokens from a cache filled by a pruned prefill: "
                                             r"1 decoded after it and 1 of its prompt"):
            cache.crop(-3)
        assert [layer.get_seq_length() for layer in cache.layers] == lengths
        cache.crop(-2)  # the decoded token and the draft's first
        assert cache.get_seq_length() == length


@pytest.mark.parametrize("name", list(METHODS))
def test_a_draft_after_a_prompt_that_ends_on_its_image_is_refused_as_the_prompt_alone(name):
    """A prompt that ends on its image is refused (a pruner could drop its last token, whose logits generation
    reads). With a draft verified after it (`answer_mask` from that token, as assisted decoding passes it), the
    draft's last token is the last valid one: the check must read the prompt's end, not the draft's."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    batch = make_batch([(5, 0, True), (3, 2, True)])
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    bsz, length = ids.shape
    draft = torch.randint(3, 90, (bsz, 3), generator=torch.Generator().manual_seed(2))
    answer = torch.zeros(bsz, length + 3, dtype=torch.bool)
    answer[:, length - 1:] = True
    message = r"^Row 0 of the batch ends on its image: a pruner could drop the last prompt token"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(input_ids=torch.cat([ids, draft], dim=1), attention_mask=torch.cat([mask, torch.ones_like(draft)], 1),
              pixel_values=pixels, answer_mask=answer)


def test_generation_grows_the_given_masks_over_the_draft():
    """Assisted decoding's first forward runs the prompt with the draft appended: `prepare_inputs_for_generation`
    grows a given `question_mask` (a drafted token is no question token) and `answer_mask` (it is an answer position)
    to the sequence, as `_update_model_kwargs_for_generation` does per generated token. Masks as long as the sequence
    pass as given."""
    model = make_model()
    batch = make_batch(SINGLE)
    ids = batch["input_ids"]
    length = ids.shape[1]
    question = torch.zeros(1, length, dtype=torch.bool)
    question[:, -3:] = True
    answer = torch.zeros(1, length, dtype=torch.bool)
    answer[:, -1] = True
    longer = torch.cat([ids, torch.tensor([[5, 6, 7]])], dim=1)
    inputs = model.prepare_inputs_for_generation(longer, attention_mask=torch.ones_like(longer),
                                                 pixel_values=batch["pixel_values"], question_mask=question,
                                                 answer_mask=answer, is_first_iteration=True)
    assert torch.equal(inputs["question_mask"], torch.cat([question, torch.zeros(1, 3, dtype=torch.bool)], dim=1))
    assert torch.equal(inputs["answer_mask"], torch.cat([answer, torch.ones(1, 3, dtype=torch.bool)], dim=1))
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), question_mask=question,
                                                 answer_mask=answer, is_first_iteration=True)
    assert inputs["question_mask"] is question and inputs["answer_mask"] is answer


def test_with_labels_a_given_answer_mask_does_not_end_the_prompt():
    """Only without labels does an `answer_mask` end the prompt (a draft verified with it); with labels they say where
    the prompt ends. A caption labelled right after its image, with the answer mask its labels imply passed
    explicitly, is run as without it (taken as the prompt's end, its last image token was refused as a prompt that
    ends on its image)."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(SINGLE)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]  # the 4 tokens after the image
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != -100  # the default: the last image token on
    with torch.no_grad():
        ref = model(**batch, labels=labels)
        out = model(**batch, labels=labels, answer_mask=answer)
    assert torch.equal(out.keep_masks, ref.keep_masks) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("name", ["rcp", "fastv"])
def test_an_answer_mask_on_padding_does_not_end_the_prompt(name):
    """The first answer position ends the prompt among the row's tokens only: a mask built over the padded batch
    (True on the padding too, and on each row's last token) selects as the default one (the last token alone), not
    as a prompt ending on the left padding."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    batch = make_batch(PADDED)
    answer = batch["attention_mask"] == 0
    answer[:, -1] = True
    with torch.no_grad():
        ref = model(**batch)
        out = model(**batch, answer_mask=answer)
    assert (batch["attention_mask"] == 0).any() and torch.equal(out.keep_masks, ref.keep_masks)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], rtol=0, atol=1e-6)


def test_a_crop_is_refused_past_the_shortest_draft_of_the_batch():
    """A crop cuts every row alike: rows whose drafts begin at different positions (`answer_mask`) can lose no more
    than the shortest draft, past which a row's prompt would be cut; once that row is dropped from the batch, the
    others' longer drafts can go."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    bsz, length = ids.shape
    draft = torch.randint(3, 90, (bsz, 3), generator=torch.Generator().manual_seed(1))
    answer = torch.zeros(bsz, length + 3, dtype=torch.bool)
    answer[:, length - 2:] = True  # rows 1 and 2: a 4-token draft (the prompt's last token in it)
    answer[0, length - 2] = False  # row 0: the 3 tokens appended
    with torch.no_grad():
        cache = model(input_ids=torch.cat([ids, draft], dim=1), attention_mask=torch.cat([mask, torch.ones_like(draft)],
                      dim=1), pixel_values=pixels, answer_mask=answer, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"^`crop` would remove 4 tokens from a cache filled by a pruned prefill: 0 "
                                         r"decoded after it and 1 of its prompt"):
        cache.crop(-4)
    cache.batch_select_indices(torch.tensor([1, 2]))  # the draft lengths follow the rows kept
    cache.crop(-4)
    assert cache.get_seq_length() == length - 1


def test_assisted_decoding_keeps_a_given_answer_mask():
    """`generate(answer_mask=...)` with an assistant: the caller's mask ends the prompt (here two tokens before its
    last), as in greedy decoding, and is not replaced by the default (the prompt's last token), which selects
    otherwise (FastV reads the attention of the prompt's end)."""
    model = make_model(randomize_plugins=True, **METHODS["fastv"])
    model.generation_config.pad_token_id = 0
    assistant = make_model(seed=10, pruning_method="none", pruning_layers=None, repair_layers=None,
                           pruning_keep_counts=None)
    assistant.generation_config.update(pad_token_id=0, num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)
    batch = make_batch(SINGLE)
    answer = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    answer[:, -3:] = True
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, answer_mask=answer)
    with torch.no_grad():
        ref = model.generate(**batch, **greedy)
        ref_masks = model.last_pruning_info.keep_masks
        model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert not torch.equal(model.last_pruning_info.keep_masks, ref_masks)  # the mask given selects otherwise
        out = model.generate(**batch, **greedy, assistant_model=assistant)
    assert torch.equal(model.last_pruning_info.keep_masks, ref_masks) and torch.equal(out, ref)


def test_none_decodes_with_prompt_lookup_as_stock():
    model, stock = none_and_stock()
    for m in (model, stock):
        m.generation_config.pad_token_id = 0
    batch = _repeating_prompt()
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        ours = model.generate(**batch, **greedy, prompt_lookup_num_tokens=3)
        assert torch.equal(ours, stock.generate(**batch, **greedy, prompt_lookup_num_tokens=3))
        assert torch.equal(ours, model.generate(**batch, **greedy))


# 8. Mixed precision (autocast) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_pruning_runs_under_autocast_as_stock_does(name):
    """`torch.autocast` (what Trainer's `bf16=True` runs the forward under) ran the Eq. (4) prior's product in bf16,
    whose range the float32 mask value overflows: on 961029c every method that reads the layer's attention (RCP,
    FastV, attention top-k) raised "value cannot be converted to type c10::BFloat16 without overflow", in inference
    and in training. The prior's scores stay in float32; stock LLaVA runs under autocast, so must a pruning model."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    with torch.no_grad():
        plain = model(**batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    valid = out.token_positions >= 0
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits[valid]).all()
    assert torch.equal(out.token_positions >= 0, plain.token_positions >= 0) or name == "rcp-adaptive"
    # training, every method: RCP's differentiable layout backward into the plug-ins, the physical one (baselines)
    # into the backbone
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)).loss
    loss.backward()
    params = model.model.rcp_plugins.parameters() if name.startswith("rcp") else model.parameters()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_question_attention_probs_stay_in_float32_under_autocast():
    from modeling_rcp_llava import question_attention_probs

    model = make_model()
    attn = model.model.language_model.layers[1].self_attn
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 32, generator=g)
    cos, sin = model.model.language_model.rotary_emb(hidden, torch.arange(9).expand(2, 9))
    key_valid = torch.ones(2, 9, dtype=torch.bool)
    key_valid[0, :2] = False
    slots = torch.tensor([[7, 8], [6, 8]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        keys = attn.k_proj(hidden)  # bf16 under autocast, as the caller hands them over
        probs = question_attention_probs(attn, hidden, cos, sin, key_valid, slots, keys=keys)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is back on afterwards
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 2))
    assert (probs[0, :, :, :2] == 0).all() and (probs[1, :, 0, 7:] == 0).all()  # padding and the future get nothing


def test_autocast_off_only_where_autocast_is_known_and_on():
    """The meta device has no autocast (`torch.is_autocast_enabled('meta')` raises): the prior turns nothing off there
    (transformers' `maybe_autocast`, as Llama's RoPE uses it), and it still runs; on the CPU the caller's autocast is
    off inside the prior's product and on again after it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from modeling_rcp_llava import question_attention_probs

    def probs_on(device):
        with torch.device(device):
            model = make_model()
            attn = model.model.language_model.layers[1].self_attn
            hidden = torch.randn(2, 9, 32)
            cos, sin = model.model.language_model.rotary_emb(hidden, torch.arange(9).expand(2, 9))
            return question_attention_probs(attn, hidden, cos, sin, torch.ones(2, 9, dtype=torch.bool),
                                            torch.tensor([[7, 8], [6, 8]]))

    assert probs_on("meta").shape == (2, 4, 2, 9)

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.bmm:
                self.dtypes.append(out.dtype)
            return out

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with Products() as products:
            probs_on("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert products.dtypes == [torch.float32]  # the scores' product (the projections are mm, under autocast)


def test_prior_and_vispruner_similarities_stay_in_float32_under_autocast(monkeypatch):
    """Under a caller's autocast the Eq. (4) prior's question-row sum runs in float32: given the same attention
    probabilities (here fixed float32 ones, whose bits bf16 cannot hold) it is the prior of a run without autocast,
    bit for bit. VisPruner's cosine similarities are float32 products too (its ranking is specified in float32)."""
    import modeling_rcp_llava
    from torch.utils._python_dispatch import TorchDispatchMode
    from modeling_rcp_llava import vispruner_keep_mask

    def fixed_probs(attn_module, hidden_norm, cos, sin, key_valid, query_slots, keys=None, rows=None):
        bsz, seq = key_valid.shape
        g = torch.Generator().manual_seed(seq)
        heads = attn_module.config.num_attention_heads
        return torch.rand(bsz, heads, query_slots.shape[1], seq, generator=g).softmax(-1)

    priors, centred = [], modeling_rcp_llava._centred_log
    monkeypatch.setattr(modeling_rcp_llava, "question_attention_probs", fixed_probs)
    monkeypatch.setattr(modeling_rcp_llava, "_centred_log", lambda a, valid: priors.append(a) or centred(a, valid))
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    with torch.no_grad():
        model(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
    assert len(priors) == 4 and torch.equal(priors[2], priors[0])  # the first pruning point of each run

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm):
                self.dtypes.add(out.dtype)
            return out

    g = torch.Generator().manual_seed(0)
    cls_attention, features = torch.rand(2, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16), ProductDtypes() as products:
        vispruner_keep_mask(cls_attention, features, 6, 0.5)
    assert products.dtypes == {torch.float32}


# 9. generate in train mode --------------------------------------------------------------------------------------


def test_rcp_generate_in_train_mode_keeps_the_prompt_in_its_cache(monkeypatch):
    """On 50040c4 a train-mode `generate` (a model never put in eval, or generation inside a training loop) ran RCP's
    prefill in the differentiable layout, which fills no cache: every later step saw only the generated tokens
    (layer 0 held 3 of 31 after 4 new tokens) and produced noise. Stock generates the same in train mode as in eval.
    A prefill given a cache now prunes physically: without dropout in the plug-ins, train mode generates exactly
    what eval does, and the user is told once why train-mode pruning is not the training forward's."""
    from modeling_rcp_llava import logger

    said = []
    monkeypatch.setattr(logger, "warning_once", said.append)
    model = make_model(randomize_plugins=True, query_dropout=0.0, pruner_dropout=0.0)
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**batch, **greedy)
        assert not said
        model.train()
        out = model.generate(**batch, **greedy)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.past_key_values.layers[0].keys.shape[-2] == batch["input_ids"].shape[1] + 3
    assert len(said) == 1 and "fills a KV cache" in said[0] and "model.eval()" in said[0]
    # The training forward itself is unchanged: the differentiable layout (every token in place), no cache.
    out = model(**batch, use_cache=True)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] and out.past_key_values is None
    assert "`use_cache=True` is ignored" in said[-1]
    # A cache given to a forward with gradients: neither layout could train the pruners and fill it.
    from transformers import DynamicCache

    with pytest.raises(ValueError, match=r"`past_key_values` was given to a training forward .*gradients on\)"):
        model(**batch, past_key_values=DynamicCache())


def test_rcp_generate_in_train_mode_without_a_cache_prunes_as_the_cached_one(monkeypatch):
    """`generate(use_cache=False)` in train mode (TRL's setting under gradient checkpointing) ran RCP's prefill in the
    training layout: Gumbel noise and soft masks, and the later steps reused its noisy kept sets, so two calls kept
    different sets and the tokens left the cached generate's (0.2 off in logits), with no word. It prunes physically
    now, as the cached train-mode generate does: without dropout, eval's tokens, logits and kept sets."""
    from modeling_rcp_llava import logger

    said = []
    monkeypatch.setattr(logger, "warning_once", said.append)
    model = make_model(randomize_plugins=True, query_dropout=0.0, pruner_dropout=0.0)
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, bad_words_ids=[[IMAGE_TOKEN]])
    with torch.no_grad():
        ref = model.generate(**batch, **greedy)
        kept = model.last_pruning_info.keep_masks
        model.train()
        for seed in (0, 1):
            torch.manual_seed(seed)  # the Gumbel noise drew other kept sets per call
            out = model.generate(**batch, use_cache=False, **greedy)
            assert torch.equal(out.sequences, ref.sequences)
            assert torch.equal(model.last_pruning_info.keep_masks, kept)
            assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-5
    assert len(said) == 2 and len(set(said)) == 1 and "`generate(use_cache=False)` prunes physically" in said[0]
    assert model.model.pruning_layout is None  # restored


@pytest.mark.parametrize("name", ["rcp", "fastv"])
def test_generate_in_train_mode_with_gradient_checkpointing_needs_use_cache_false(name):
    """Train mode + gradient checkpointing: transformers' checkpointed layers drop the cache, so the default cached
    `generate` failed at its second step with a shape error in the decoder loop (stock goes on silently, from no
    cache). It is refused before any step with the way out; `use_cache=False` (TRL's choice then) generates eval's
    tokens."""
    model = make_model(randomize_plugins=True, query_dropout=0.0, pruner_dropout=0.0, **METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, bad_words_ids=[[IMAGE_TOKEN]])
    with torch.no_grad():
        ref = model.generate(**batch, **greedy)
        model.train()
        model.gradient_checkpointing_enable()
        with pytest.raises(ValueError, match=re.escape(
                "`generate` in train mode with gradient checkpointing on needs `use_cache=False` (as TRL passes it "
                "then): the checkpointed layers fill no KV cache.")):
            model.generate(**batch, **greedy)
        assert torch.equal(model.generate(**batch, use_cache=False, **greedy), ref)
        # an `inputs_embeds` prompt: `generate` turns the cache back on, so `use_cache=False` does not help there
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(ValueError, match=re.escape("an `inputs_embeds` prompt always generates with a cache")):
            model.generate(inputs_embeds=embeds, pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"], use_cache=False, **greedy)


def test_baselines_return_a_cache_in_train_mode_as_stock():
    """Stock fills a cache in train mode when `use_cache` is on; a baseline (physical pruning in train mode) returned
    None on 468228a. Its cache now continues decoding exactly as an eval prefill's does."""
    model = make_model(**METHODS["fastv"])
    batch = make_batch(PADDED)
    with torch.no_grad():
        ref = model(**batch, use_cache=True)
        model.train()
        out = model(**batch, use_cache=True)
    assert out.past_key_values is not None
    assert [l.keys.shape for l in out.past_key_values.layers] == [l.keys.shape for l in ref.past_key_values.layers]
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(out.past_key_values.layers, ref.past_key_values.layers))


# 10. Right padding in forward -------------------------------------------------------------------------------------


def _right_padded(batch):
    ids, mask = torch.zeros_like(batch["input_ids"]), torch.zeros_like(batch["attention_mask"])
    for i, (row, valid) in enumerate(zip(batch["input_ids"], batch["attention_mask"].bool())):
        ids[i, : int(valid.sum())], mask[i, : int(valid.sum())] = row[valid], 1
    return {**batch, "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", list(METHODS))
def test_forward_on_a_right_padded_batch_equals_the_left_padded_one(name):
    """A right-padding collator (a loss evaluation) must not change what is kept. On 50040c4 FastV's "last prompt
    token" query read the last slot, a pad under right padding: 2 of 3 rows kept other tokens (logits off by 0.35)."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    left = make_batch(PADDED)
    right = _right_padded(left)
    with torch.no_grad():
        a, b = model(**left), model(**right)
    assert torch.equal(a.keep_masks, b.keep_masks)
    for i in range(len(PADDED)):
        x, y = a.logits[i][a.token_positions[i] >= 0], b.logits[i][b.token_positions[i] >= 0]
        assert x.shape == y.shape and (x - y).abs().max() <= 1e-5


# 11. labels with logits_to_keep -------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 5, torch.tensor([0, 3])], ids=["1", "5", "indices"])
def test_labels_with_a_partial_logits_to_keep_are_refused(keep):
    """On 50040c4 the pruned loss sliced the labels with the logits and returned nan for `logits_to_keep=1` (a loss over
    the kept window, silently partial, otherwise); stock fails deep in cross-entropy. Both cases: a clear error."""
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
    with torch.no_grad(), pytest.raises(ValueError, match=r"`labels` need the logits of every position, but "
                                                          r"`logits_to_keep=.*` keeps \d+ of \d+\. Leave"):
        model(**batch, labels=labels, logits_to_keep=keep)
    with torch.no_grad():  # every position kept: the loss of the default
        whole = model(**batch, labels=labels).loss
        assert torch.equal(model(**batch, labels=labels, logits_to_keep=batch["input_ids"].shape[1]).loss, whole)


# 12. transformers' Trainer.predict / evaluate -------------------------------------------------------------------------


def test_plain_trainer_predicts_with_a_pruning_model(tmp_path):
    """`Trainer.predict` (and `evaluate` with `compute_metrics`) gathers every output that is not in
    `config.keys_to_ignore_at_inference`; on 50040c4 it raised "Unsupported types (_KeptIndices)". The predictions
    now hold the pruned logits and `token_positions` (padded with -100 across batches), which map them back."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    model = make_model(randomize_plugins=True)
    # the last evaluation batch holds no image: its outputs had no `image_hidden_states` and no pruning fields, so
    # Trainer's field-by-field concatenation put its `token_positions` in another field's place and dropped the rest
    batch = make_batch(PADDED + [(4, 2, True), (3, 2, False), (2, 4, False)])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def row(i):
        out = {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": labels[i]}
        return {**out, "pixel_values": batch["pixel_values"][i]} if i < 4 else out

    class Rows(Dataset):
        def __init__(self, count=len(labels)):
            self.count = count

        def __len__(self):
            return self.count

        def __getitem__(self, i):
            return row(i)

    seen = []
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2,
                             per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(4),  # shuffled: the image rows alone collate
                      compute_metrics=lambda p: seen.append(p) or {"rows": len(p.label_ids)})
    before = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    assert math.isfinite(trainer.train().training_loss)  # the model's own loss, in RCP's training layout
    assert any(not torch.equal(before[k], v) for k, v in model.plugin_state_dict().items())
    out = trainer.predict(Rows())
    assert len(out.predictions) == 6  # logits, token_positions, kept_counts, keep_masks, layer_retention, has_image
    logits, positions, has_image = out.predictions[0], out.predictions[1], out.predictions[5]
    assert out.metrics["test_rows"] == 6 and len(seen) == 1
    assert has_image.tolist() == [True] * 4 + [False] * 2 and out.predictions[2].shape == (6, 2)
    for i in range(6):
        with torch.no_grad():
            single = model(**{k: v.unsqueeze(0) for k, v in row(i).items()})  # labels: RCP's question (the prior's
            # queries) is the prompt before the labelled answer, as in the Trainer's forward
        valid = positions[i] >= 0  # -100: padding between the batches' pruned lengths
        assert positions[i][valid].tolist() == single.token_positions[0][single.token_positions[0] >= 0].tolist()
        own = single.logits[0][single.token_positions[0] >= 0]
        assert abs(torch.as_tensor(logits[i][valid]) - own).max() <= 1e-4
    assert "keys_to_ignore_at_inference" not in model.config.to_dict()


# 13. A labelled continuation does not choose the tokens --------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_a_labelled_continuation_keeps_what_its_prompt_keeps(name):
    """A log-likelihood (lmms-eval's `loglikelihood`, a loss) runs prompt + continuation with the continuation
    labelled; pruning must choose what generation's prefill of the prompt chose. On 468228a FastV's last-token query
    read the continuation's last token: lmms-eval scored the model's own greedy output as not greedy (log-prob -4.38
    where generate gave -0.009)."""
    model = make_model(randomize_plugins=True, **METHODS[name])
    prompt = make_batch(PADDED)
    g = torch.Generator().manual_seed(7)
    answer = torch.randint(3, 90, (len(PADDED), 3), generator=g)
    full = {**prompt, "input_ids": torch.cat([prompt["input_ids"], answer], 1),
            "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(answer)], 1)}
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, -3:] = answer
    with torch.no_grad():
        alone, scored = model(**prompt), model(**full, labels=labels)
    assert torch.equal(scored.keep_masks, alone.keep_masks)


def test_fastv_last_token_query_on_mixed_batches_and_fully_labelled_rows():
    """Review of 319dc23 (FastV's query from the question slots): a row without an image has no question slot, so
    the query became slot -1 -- an IndexError when that row came first, another row's slot otherwise; and with labels
    on every token (a causal-LM collator) the question fell back to the text before the image, which cannot attend
    to it, so FastV kept the first k tokens in raster order. The query is now each row's last prompt token from the
    labels alone: batch == single with the no-image row first, and labels on every token keep what no labels keep."""
    model = make_model(**METHODS["fastv"])
    specs = [(2, 3, False), (5, 6, True), (1, 2, True)]
    batch = make_batch(specs)
    with torch.no_grad():
        out = model(**batch)
        for i in range(len(specs)):
            single = model(**row_inputs(batch, i, specs))
            if specs[i][2]:
                assert torch.equal(out.keep_masks[i], single.keep_masks[0])
            rows = out.logits[i][out.token_positions[i] >= 0]
            assert rows.shape == single.logits[0].shape and (rows - single.logits[0]).abs().max() <= 1e-5
        labelled = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        assert torch.equal(model(**batch, labels=labelled).keep_masks, out.keep_masks)
    raster = torch.zeros(NUM_VISUAL, dtype=torch.bool)
    raster[:6] = True
    assert not any(torch.equal(m[0], raster) for m in out.keep_masks[1:])


def _sliding_window_text_config(kind, window):
    """A tiny Mistral (every layer windowed) or Qwen2 (layers 2-3 windowed, `layer_types`) text backbone."""
    from transformers import MistralConfig, Qwen2Config

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=256)
    if kind == "mistral":
        return MistralConfig(sliding_window=window, **common).to_dict()
    return Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=2, **common).to_dict()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
@pytest.mark.parametrize("name", ["rcp", "fastv"])
def test_sliding_window_backbone_is_stock_within_the_window_and_refused_past_it(kind, name):
    """A Mistral / Qwen2 backbone with a sliding window: the pruned loop builds causal masks, which are the windowed
    ones only up to the window. Past it the logits were 0.17 off stock's with nothing pruned (a text-only prompt,
    `plugins_disabled()`); now such a forward is refused, and within the window every output is stock's."""
    from modeling_rcp_llava import sliding_window_of

    window = 30
    model = make_model(text_config=_sliding_window_text_config(kind, window), **METHODS[name])
    assert sliding_window_of(model.config.text_config) == window
    stock = stock_copy(model)
    for m in (model, stock):
        m.generation_config.pad_token_id = 0
    image = make_batch([(2, 4, True)])  # 23 tokens
    text = {k: v for k, v in make_batch([(5, 8, False)]).items() if v is not None}  # 14 tokens
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**text, **greedy), stock.generate(**text, **greedy))
        with model.plugins_disabled():
            assert torch.equal(model(**image).logits, stock(**image).logits)
            assert torch.equal(model.generate(**image, **greedy), stock.generate(**image, **greedy))
        pruned = model.generate(**image, **greedy)  # 28 tokens: pruned within the window
        assert pruned.shape[1] == 28 and model.last_pruning_info.kept_counts.sum() < NUM_VISUAL
        long_text = {k: v for k, v in make_batch([(window, 0, False)]).items() if v is not None}
        message = (rf"sliding-window attention \(window {window} tokens\), and this forward spans {window + 1} tokens "
                   rf"\(0 cached \+ {window + 1} new\).*`pruning_method='none'`")
        with pytest.raises(ValueError, match=message):
            model(**long_text)
        with pytest.raises(ValueError, match=rf"window {window} tokens\), and this generation may span 33 tokens "
                                             r"\(prompt 23 \+ up to 10 new\).*Lower `max_new_tokens` to 7 or less"):
            model.generate(**image, max_new_tokens=10, min_new_tokens=10, do_sample=False)  # refused before a step
        with pytest.raises(ValueError, match=r"this generation may span 40 tokens \(prompt 23 \+ up to 17 new\)"):
            model.generate(**image, max_length=40, do_sample=False)  # max_length counts the prompt
        # through `inputs_embeds` too (the check read `input_ids` alone: 8 tokens came, then the forward raised)
        embeds = model.get_input_embeddings()(image["input_ids"])
        with pytest.raises(ValueError, match=r"this generation may span 33 tokens \(prompt 23 \+ up to 10 new\)"):
            model.generate(inputs_embeds=embeds, pixel_values=image["pixel_values"],
                           attention_mask=image["attention_mask"], max_new_tokens=10, do_sample=False)
        model.config.pruning_method = "none"  # the stock forward: windowed as stock, at any length
        assert torch.equal(model(**long_text).logits, stock(**long_text).logits)


def test_llama_backbone_has_no_sliding_window():
    from modeling_rcp_llava import sliding_window_of

    assert sliding_window_of(make_model().config.text_config) is None
    config = make_model(text_config=_sliding_window_text_config("qwen2", 30)).config.text_config
    config.layer_types = ["full_attention"] * 4
    assert sliding_window_of(config) is None


@pytest.mark.parametrize("name", ["vispruner", "rcp"])
def test_quantized_cache_implementation_is_the_quantized_cache_given(name):
    """`cache_implementation="quantized"` was refused ("only the dynamic cache allows") while the same
    `QuantizedCache` passed as an object worked; generate's own one now keeps its quantized storage and the pruning
    state, and decodes exactly as the given one."""
    from transformers import QuantizedCache

    from modeling_rcp_llava import RcpCacheMixin

    model = make_model(**METHODS[name])
    model.generation_config.pad_token_id = 0
    batch = make_batch(PADDED[:2])
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        made = model.generate(**batch, cache_implementation="quantized", cache_config={"backend": "fp8"}, **greedy)
        given = model.generate(**batch, past_key_values=QuantizedCache("fp8", model.config), **greedy)
        dynamic = model.generate(**batch, **greedy)
    assert torch.equal(made.sequences, given.sequences)
    assert all(torch.equal(a, b) for a, b in zip(made.logits, given.logits))
    assert isinstance(made.past_key_values, QuantizedCache) and isinstance(made.past_key_values, RcpCacheMixin)
    assert not all(torch.equal(a, b) for a, b in zip(made.logits, dynamic.logits))  # fp8 storage, not a dynamic one


@pytest.mark.parametrize("name", ["rcp", "fastv", "vispruner"])
def test_every_hidden_state_position_marks_padding(name):
    """`hidden_state_positions` gave left-padding slots real indices (0, 1, ...) in the hidden states before the
    first prune, while `token_positions` (and every entry after a prune) marks them -1, as documented: counting
    tokens with `positions >= 0` counted the pads there."""
    model = make_model(**METHODS[name])
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    for positions in out.hidden_state_positions:
        assert positions.shape[0] == len(PADDED)
        for row, pad in enumerate(pads):
            valid = positions[row] >= 0
            assert int((~valid).sum()) >= pad and not valid[:pad].any()
            assert positions[row][valid].tolist() == sorted(positions[row][valid].tolist())
    first = out.hidden_state_positions[0]
    assert first.tolist() == torch.where(batch["attention_mask"].bool(),
                                         torch.arange(first.shape[1]).expand_as(first), -1).tolist()


def test_a_multi_token_continuation_after_a_pre_llm_prune_equals_a_recompute():
    """After a pre-LLM prune the cache holds fewer tokens than the positions seen: the causal mask of a multi-token
    step is sized by the physical cache (`get_query_offset`), while its positions count the prompt's own tokens."""
    from transformers import DynamicCache

    model = make_model(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                       pre_llm_keep_count=5, pruning_seed=3)
    batch = make_batch([(2, 4, True)])
    cache = DynamicCache(config=model.config.text_config)
    step = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        prefill = model(**batch, past_key_values=cache, use_cache=True)
        cached = model(input_ids=step, past_key_values=cache, use_cache=True)
        full = model(input_ids=torch.cat([batch["input_ids"], step], 1), pixel_values=batch["pixel_values"],
                     visual_keep_masks=prefill.keep_masks, use_cache=False)
    assert cache.layers[0].get_seq_length() == batch["input_ids"].shape[1] - NUM_VISUAL + 5 + 3
    assert (cached.logits - full.logits[:, -3:]).abs().max() <= 1e-5


def test_output_attentions_set_on_the_text_config_is_read_as_stock_reads_it():
    """`config.text_config.output_attentions=True` with no argument: stock's decoder returns every layer's weights,
    and the pruned loop does the same."""
    model = make_model(randomize_plugins=True, attn_implementation="eager")
    model.config.text_config.output_attentions = True
    batch = make_batch([(2, 4, True)])
    with torch.no_grad():
        pruned = model(**batch)
        model.config.pruning_method = "none"
        stock = model(**batch)
    layers = model.config.text_config.num_hidden_layers
    assert stock.attentions is not None and len(stock.attentions) == layers
    assert pruned.attentions is not None and len(pruned.attentions) == layers


def test_a_cache_emptied_after_a_pre_llm_prune_is_reused_as_a_fresh_one():
    """Every layer cropped to 0 (a rolled-back cache, reused): it reports 0 tokens, takes a new image prompt as a
    prefill, and a text prompt after that counts only its own tokens."""
    from transformers import DynamicCache

    model = make_model(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                       pre_llm_keep_count=5, pruning_seed=3)
    batch = make_batch([(2, 4, True)])
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        fresh = model(**batch)
        model(**batch, past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.crop(-layer.get_seq_length())
        assert cache.get_seq_length() == 0
        again = model(**batch, past_key_values=cache, use_cache=True)
        assert torch.equal(again.kept_counts, fresh.kept_counts)
        assert (again.logits - fresh.logits).abs().max() <= 1e-5
        for layer in cache.layers:
            layer.crop(-layer.get_seq_length())
        text = make_batch([(6, 3, False)])
        model(input_ids=text["input_ids"], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == text["input_ids"].shape[1]
