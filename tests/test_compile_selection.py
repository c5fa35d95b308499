"""`compile_selection`: each pruning method's token choice (its selector's `keep`) through `torch.compile`, the rest
of the pruned forward eager (issue 19: on a GPU at batch 1 the selection's ~180 small ops per point cost more to
dispatch than to run). Dynamo's `eager` backend traces exactly what eager runs, so there the outputs are bitwise
eager's: that checks that every built-in selector compiles as one graph (`fullgraph=True`); Inductor's fused
kernels round differently."""

import pytest
import torch
from conftest import make_batch, make_model
from test_prefill_cost import DECODE_METHODS, PADDED


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
    selector = type(model.model)._select_tokens  # (the model's own, not a wrapper)
    assert selector.__qualname__ == "RcpLlavaModel._select_tokens"
    assert len(compiles) == 1 and compiles[0][0].endswith(".keep"), compiles  # the method's keep, compiled once
    assert compiles[0][1] == {"fullgraph": True, "dynamic": False, "backend": "eager"}
    assert graphs() >= 1  # Dynamo compiled it: not a silent eager run


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


def test_enabled_must_be_a_bool():
    model = make_model()
    with pytest.raises(TypeError, match=r"^`enabled` must be True or False, got 'inductor'; torch\.compile's options "
                                        r"go as keyword arguments"):
        model.compile_selection("inductor")
    assert not model.model.selection_compiled
