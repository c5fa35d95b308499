"""`compile_selection`: each pruning method's token choice (its selector's `keep`) through `torch.compile`, the rest
of the pruned forward eager (issue 19: on a GPU at batch 1 the selection's ~180 small ops per point cost more to
dispatch than to run). Dynamo's `eager` backend traces exactly what eager runs, so there the outputs are bitwise
eager's: that checks that every built-in selector compiles as one graph (`fullgraph=True`); Inductor's fused
kernels round differently."""

import pytest
import torch
from conftest import make_batch, make_model
from test_prefill_cost import DECODE_METHODS, PADDED

from configuration_rcp_llava import PRUNING_METHODS, PruningMethod
from modeling_rcp_llava import SELECTORS, TokenSelector, register_pruning_method


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """No graph of another test's shapes, no recompile or graph count carried over."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", sorted(DECODE_METHODS))
def test_every_selector_compiles_whole_and_keeps_eager_outputs(method, compiles):
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True, **DECODE_METHODS[method])
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref, ref_tokens = model(**batch), model.generate(**batch, **kwargs)
        assert model.compile_selection(backend="eager") is model
        out, tokens = model(**batch), model.generate(**batch, **kwargs)
    assert torch.equal(out.keep_masks, ref.keep_masks) and torch.equal(out.logits, ref.logits)
    assert torch.equal(tokens, ref_tokens)
    assert len(compiles) == 1 and compiles[0][0].endswith(".keep"), compiles  # the method's keep, compiled once
    assert compiles[0][1] == {"fullgraph": True, "dynamic": False, "backend": "eager"}
    # Dynamo compiled one graph per pruning point (not a silent eager run), and generate's prefill of the same
    # prompt reused them
    assert graphs() == len(model.config.pruning_points)
    assert None not in model.model._compiled_selection.values()


def test_the_pruning_layer_still_reuses_what_compiled_selection_computed(monkeypatch):
    """The prior's normalised input and keys, computed inside the compiled selection, are still handed to the
    pruning layer (its kept rows), not computed again: bitwise-equal outputs could not tell."""
    import modeling_rcp_llava

    given = []
    prune = modeling_rcp_llava.PrunedPrefill.prune

    def recorded(self, *args, **kwargs):
        out = prune(self, *args, **kwargs)
        given.append(sorted(self._given[1]) if self._given else None)
        return out

    monkeypatch.setattr(modeling_rcp_llava.PrunedPrefill, "prune", recorded)
    model = make_model(randomize_plugins=True)
    with torch.no_grad():
        model.compile_selection(backend="eager")(**make_batch(PADDED))
    assert graphs() == 2 and given == [["input_layernorm", "self_attn.k_proj"]] * 2


def test_inductor_keeps_the_same_tokens():
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True)
    with torch.no_grad():
        ref = model(**batch)
        out = model.compile_selection()(**batch)  # torch.compile's default backend: Inductor
    assert graphs() == len(model.config.pruning_layers)  # one whole graph per pruning point
    assert torch.equal(out.keep_masks, ref.keep_masks)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_the_switch_keeps_compiled_functions_and_training_stays_eager(compiles):
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True)
    with torch.no_grad():
        model.compile_selection(backend="eager")(**batch)
        compiled = graphs()
        model.compile_selection(False)
        assert not model.model.selection_compiled
        model(**batch)
        model(**make_batch([(2, 4, True)]))  # a new shape: eager, so no new graph
        assert graphs() == compiled
        model.compile_selection(backend="eager")(**batch)  # the same options: the same compiled function
        assert len(compiles) == 1 and graphs() == compiled
        model.compile_selection(backend="eager", mode=None)(**batch)  # other options: compiled afresh
        assert len(compiles) == 2 and compiles[1][1]["mode"] is None
    # Training forwards (gradients on, RCP's differentiable layout) never take the compiled path.
    def compiled_call(*args, **kwargs):
        raise AssertionError("a training forward ran the compiled selection")

    model.model._compiled_selection = dict.fromkeys(model.model._compiled_selection, compiled_call)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    model.train()
    model(**batch, labels=labels).loss.backward()
    with pytest.raises(AssertionError, match="ran the compiled selection"), torch.no_grad():
        model.eval()(**batch)  # the stand-in is reached at inference: the training forward did not skip it by luck


class _HostRead(TokenSelector):
    """A selector of a user's own that reads a tensor on the host: a graph break, which `fullgraph=True` refuses."""

    method = PruningMethod("host_read_compile_test")

    def scores(self, ctx):
        rows = ctx.valid.float().sum(1).tolist()  # the host read (of floats: Dynamo traces an integer tensor's)
        norms = ctx.hidden.gather(1, ctx.slots.unsqueeze(-1).expand(-1, -1, ctx.hidden.shape[-1])).norm(dim=-1)
        return norms + torch.tensor(rows, dtype=norms.dtype).unsqueeze(1) * 0


@pytest.fixture
def host_read_method():
    register_pruning_method(_HostRead)
    yield _HostRead
    SELECTORS.pop(_HostRead.method.name, None)
    PRUNING_METHODS.pop(_HostRead.method.name, None)


def warned(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile_selection: ")]


def test_a_selector_that_cannot_compile_selects_eagerly_with_a_warning(host_read_method, caplog):
    batch = make_batch(PADDED)
    model = make_model(pruning_method=host_read_method.method.name, repair_layers=[])
    with torch.no_grad(), caplog.at_level("WARNING"):
        ref = model(**batch)
        out = model.compile_selection(backend="eager")(**batch)
        again = model(**batch)  # not traced again
    assert torch.equal(out.logits, ref.logits) and torch.equal(again.keep_masks, ref.keep_masks)
    assert len(warned(caplog)) == 1 and warned(caplog)[0].startswith(
        "compile_selection: _HostRead.keep could not be compiled (Unsupported: ")
    assert warned(caplog)[0].endswith("this model selects with it eagerly from now on (the same outputs, without the "
                                      "speed-up).")
    assert model.model._compiled_selection == {_HostRead: None}


def test_past_the_recompile_limit_selection_goes_eager_with_a_warning(caplog):
    """Each prompt shape compiles a graph per pruning point; past Dynamo's limit (`fullgraph` makes it an error)
    the method selects eagerly, with the same outputs."""
    model = make_model(randomize_plugins=True).compile_selection(backend="eager")
    shapes = [[(3, 5, True), (1, 3, True)], [(2, 4, True)], [(4, 2, True)]]
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad(), caplog.at_level("WARNING"):
        outs = [model(**make_batch(specs)) for specs in shapes]  # 2 graphs, then a third: past the limit
        model.compile_selection(False)
        refs = [model(**make_batch(specs)) for specs in shapes]
    for out, ref in zip(outs, refs):
        assert torch.equal(out.logits, ref.logits)
    assert len(warned(caplog)) == 1 and "(FailOnRecompileLimitHit: " in warned(caplog)[0]


def test_a_question_token_on_the_image_compiles_too():
    """With `question_mask` on image tokens the question's slots are counted on the host (a pruner may drop one):
    done before the compiled selection, which then traces whole."""
    batch = make_batch(PADDED)
    question = batch["attention_mask"].bool() & (batch["input_ids"] != 1)  # text and image tokens alike
    model = make_model(randomize_plugins=True)
    with torch.no_grad():
        ref = model(**batch, question_mask=question)
        out = model.compile_selection(backend="eager")(**batch, question_mask=question)
    assert torch.equal(out.logits, ref.logits) and graphs() == 2
    assert None not in model.model._compiled_selection.values()


def test_enabled_must_be_a_bool():
    model = make_model()
    with pytest.raises(TypeError, match=r"^`enabled` must be True or False, got 'inductor'; torch\.compile's options "
                                        r"go as keyword arguments"):
        model.compile_selection("inductor")
    assert not model.model.selection_compiled
