"""On a GPU: the host syncs the CPU tests count with the op counter, as PyTorch's CUDA sync debug mode reports them,
and a pruned model on CUDA computing what it computes on the CPU (issue 19). Skipped without CUDA (CI); run on a lent
device.

The CPU tests (`test_prefill_cost`) count syncs as the ops whose result the host must read (`AtenCounter`). Here
`torch.cuda.set_sync_debug_mode("warn")` makes PyTorch report each synchronizing CUDA call it makes -- a blocking copy
either way (one *to* the device included, which no op of the counter's list is) or a stream wait -- so a sync of
that kind that the counter's definition misses shows up as a mismatch. (The mode is PyTorch's instrumentation, not
the driver's: a wait the driver makes inside an asynchronous call is invisible to both.)
"""

import contextlib
import warnings

import pytest
import torch
from conftest import make_batch, make_model
from test_prefill_cost import DECODE_METHODS, METHODS, PADDED, UNPADDED, CountSyncs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: PyTorch's CUDA sync reports")

CUDA = "cuda"


@contextlib.contextmanager
def reported_syncs(count=True):
    """Yields a list that, on leaving, holds one message per synchronizing CUDA call PyTorch reported inside the
    block (and, with `count`, the op counter's count of the same block as its `.counter`)."""
    reports = SyncReports()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    counting = CountSyncs(device=CUDA) if count else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught, counting as counter:
        warnings.simplefilter("always")  # every report, not one per code location
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield reports
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    reports.counter = counter
    # (the first report comes with a notice that the mode is a prototype: not a sync)
    reports.extend(str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message))


class SyncReports(list):
    counter = None
    pruned = None


def test_reports_and_counter_see_the_same_syncs():
    """The positive control: each kind of sync the counter names is reported once (a CUDA tensor's `tolist` too,
    which the counter once counted twice), and an index tensor, which needs no sync, is not."""
    x = torch.arange(6, device=CUDA)
    index = torch.tensor([0, 1], device=CUDA)
    with reported_syncs() as reports:
        int(x.sum()), x[x > 2], x.nonzero(), x.tolist(), x.cpu()
        x[index]
    assert len(reports) == reports.counter.syncs == 5, (reports, reports.counter.sync_counts)
    assert reports.counter.sync_counts == {"_local_scalar_dense": 1, "boolean_index": 1, "nonzero": 1,
                                           "device_to_host": 2}
    with reported_syncs() as reports:
        torch.tensor([1.0, 2.0]).to(CUDA)  # a blocking copy to the device: reported, not an op the counter names
    assert len(reports) == 1 and reports.counter.syncs == 0


def on_cuda(batch, device=CUDA):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def stock_prefill_syncs(batch):
    stock = make_model(pruning_method="none").to(CUDA)
    with torch.no_grad(), reported_syncs() as reports:
        stock(**batch, use_cache=True)
    return reports


@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fixed_count_prefill_syncs_as_counted_and_no_more_than_stock(method, specs):
    batch = on_cuda(make_batch(specs))
    model = make_model(randomize_plugins=True, **METHODS[method]).to(CUDA)
    with torch.no_grad():
        model(**batch, use_cache=True)  # once before: the random baseline copies its scores to a device once
        with reported_syncs() as reports:
            model(**batch, use_cache=True)
    stock = stock_prefill_syncs(batch)
    assert len(reports) == reports.counter.syncs, (reports, reports.counter.sync_counts)
    assert len(reports) <= len(stock), (reports.counter.sync_counts, stock.counter.sync_counts)


def test_adaptive_prefill_syncs_at_most_once_per_point_beyond_stock():
    batch = on_cuda(make_batch(UNPADDED))
    model = make_model(randomize_plugins=True, pruning_keep_counts=None).to(CUDA)
    with torch.no_grad(), reported_syncs() as reports:
        model(**batch, use_cache=True)
    assert len(reports) == reports.counter.syncs, (reports, reports.counter.sync_counts)
    assert len(reports) <= len(stock_prefill_syncs(batch)) + len(model.config.pruning_layers)


@pytest.mark.parametrize("step_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", sorted(DECODE_METHODS))
def test_decode_step_syncs_as_counted_and_no_more_than_stock(method, specs, step_mask):
    """The efficiency table's decode steps pass no attention mask: there a pruned step, like a stock one, must not
    wait for the device at all."""

    def step_syncs(model):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1) if step_mask else None
            with reported_syncs() as reports:
                model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        state = getattr(out.past_key_values, "rcp_state", None)  # a stock model's cache has none
        reports.pruned = state is not None and bool(state.segment_masks)
        return reports

    batch = on_cuda(make_batch(specs))
    pruned = step_syncs(make_model(randomize_plugins=True, **DECODE_METHODS[method]).to(CUDA))
    stock = step_syncs(make_model(pruning_method="none").to(CUDA))
    assert pruned.pruned and not stock.pruned  # the step did decode after a pruned prefill
    assert len(pruned) == pruned.counter.syncs, (pruned, pruned.counter.sync_counts)
    assert len(pruned) <= len(stock), (pruned.counter.sync_counts, stock.counter.sync_counts)
    if not step_mask:
        assert len(pruned) == 0, pruned.counter.sync_counts


def test_training_forward_syncs_as_counted_and_no_more_than_stock():
    batch = on_cuda(make_batch(PADDED))
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    model = make_model(randomize_plugins=True).to(CUDA).train()
    stock = make_model(pruning_method="none").to(CUDA).train()
    with reported_syncs() as reports:
        model(**batch, labels=labels).loss.backward()  # the logistic noise drawn on the device: no host sync
    with reported_syncs() as reference:
        stock(**batch, labels=labels).loss.backward()
    assert len(reports) == reports.counter.syncs, (reports, reports.counter.sync_counts)
    assert len(reports) <= len(reference), (reports.counter.sync_counts, reference.counter.sync_counts)


# Float64 on both devices: no TF32, no reduced-precision kernels. Two float32 steps remain, whatever the model's
# dtype: transformers computes the rotary tables (cos, sin) in float32 and its loss on float32 logits, where the two
# devices round differently (the logits then differ by up to 6e-8 on the H200, the loss by one float32 ulp). Every
# ranking (which token is kept) is the same; a wrong kept set or mask would move logits by orders more. The random
# baseline's scores come from a seeded CPU generator, so it keeps the same tokens on both devices too.


@pytest.mark.parametrize("method", sorted(DECODE_METHODS))
def test_cuda_prefill_and_generation_match_cpu(method):
    batch = make_batch(PADDED, dtype=torch.float64)
    cpu = make_model(randomize_plugins=True, dtype=torch.float64, **DECODE_METHODS[method])
    gpu = make_model(randomize_plugins=True, dtype=torch.float64, **DECODE_METHODS[method]).to(CUDA)
    with torch.no_grad():
        ref = cpu(**batch, use_cache=True)
        out = gpu(**on_cuda(batch), use_cache=True)
    assert torch.equal(out.keep_masks.cpu(), ref.keep_masks)
    torch.testing.assert_close(out.logits.cpu(), ref.logits, rtol=1e-5, atol=1e-6)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = cpu.generate(**batch, **kwargs)
    assert torch.equal(gpu.generate(**on_cuda(batch), **kwargs).cpu(), expected)


def test_cuda_training_gradients_match_cpu():
    """RCP's plug-ins train in the mask layout (soft key weights, straight-through masks): the same loss and plug-in
    gradients on both devices."""
    batch = make_batch(PADDED, dtype=torch.float64)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    grads = {}
    for device in ("cpu", CUDA):
        # no dropout, no logistic noise: the two devices draw different random numbers
        model = make_model(randomize_plugins=True, dtype=torch.float64, query_dropout=0.0,
                           pruner_dropout=0.0).to(device).train()
        inputs = on_cuda(batch, device)
        loss = model(**inputs, labels=labels.to(device), gumbel_noise=False).loss
        loss.backward()
        plugins = {name: p for name, p in model.named_parameters() if ".rcp_plugins." in name}
        assert all(p.requires_grad for p in plugins.values())
        assert all(p.grad is not None for p in plugins.values()), [n for n, p in plugins.items() if p.grad is None]
        grads[device] = (loss.detach().cpu(), {name: p.grad.cpu() for name, p in plugins.items()})
    torch.testing.assert_close(grads[CUDA][0], grads["cpu"][0], rtol=1e-6, atol=0.0)  # float32: one ulp is 1e-7
    assert grads[CUDA][1].keys() == grads["cpu"][1].keys() and grads["cpu"][1]
    scale = max(grad.abs().max().item() for grad in grads["cpu"][1].values())
    for name, grad in grads["cpu"][1].items():
        torch.testing.assert_close(grads[CUDA][1][name], grad, rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m: f"{name}: {m}")
    # Every plug-in is reached by the loss (at least 1e-3 of the largest gradient; the smallest here is 1.2e-2),
    # except the pruners' key bias: it adds q . b_k to every score of a query's row, which softmax ignores, so its
    # gradient is rounding (3e-18 of the largest on the CPU).
    peak = {name: grad.abs().max().item() / scale for name, grad in grads["cpu"][1].items()}
    key_bias = {name for name in peak if name.endswith(".attn_k.bias")}
    assert key_bias and all(peak[name] < 1e-12 for name in key_bias), peak
    assert all(peak[name] >= 1e-3 for name in peak if name not in key_bias), peak


def test_compiled_selection_on_cuda_keeps_the_tokens_and_waits_no_more():
    """`compile_selection()` on a GPU (Inductor's Triton kernels): eager's kept sets, and a compiled prefill waits for
    the device no more often than an eager one (counted without the op counter, whose dispatch mode a compiled
    function would trace)."""
    torch._dynamo.reset()
    batch = on_cuda(make_batch(UNPADDED))
    model = make_model(randomize_plugins=True).to(CUDA)
    with torch.no_grad():
        ref = model(**batch, use_cache=True)
        with reported_syncs(count=False) as eager:
            model(**batch, use_cache=True)
        model.compile_selection()
        torch._dynamo.utils.counters.clear()
        model(**batch, use_cache=True)  # compiles: one graph per pruning point
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(model.config.pruning_layers)
        with reported_syncs(count=False) as compiled:
            out = model(**batch, use_cache=True)
    torch._dynamo.reset()
    assert None not in model.model._compiled_selection.values()  # compiled, not fallen back to eager
    assert torch.equal(out.keep_masks, ref.keep_masks)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert len(compiled) <= len(eager), (compiled, eager)
