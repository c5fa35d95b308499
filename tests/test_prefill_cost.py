"""What a pruned prefill costs beyond its layers (issue 19).

Keys computed once: the Eq. (4) prior projects the pruning layer's keys over the whole sequence; the layer then
reads its kept rows of them instead of projecting them again.

Host syncs: pruning at fixed counts waits for the device no more often than the stock LLaVA forward does; only
RCP's adaptive threshold (Eq. 8), whose kept counts depend on the data, reads them once per pruning point.
A decode step after a pruned prefill, which builds a key mask per pruned segment, waits no more often than a stock
step (once with sdpa, never with eager).

A host sync is an op whose result the host must read: `aten._local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`),
`aten.nonzero` and boolean indexing (`aten.index` with a bool mask), a copy from the device to the host, and
`Tensor.tolist()` (on CPU it dispatches nothing, so it is counted at the Python level): `benchmarks/efficiency.py`'s
`AtenCounter`, which the efficiency table counts with too. On CPU they are cheap, but each one is a pipeline stall
on a GPU, so they are counted here rather than timed.
"""

import contextlib

import pytest
import torch
from conftest import NUM_VISUAL, load_benchmark, make_batch, make_model, row_inputs

# The efficiency table's counter: every aten call (`total`) and the host syncs among them, by kind (`sync_counts`,
# `syncs` their sum). The same definition of a sync in both places.
CountSyncs = load_benchmark("efficiency").AtenCounter
PADDED = [(3, 5, True), (1, 3, True)]  # rows of different lengths: the shorter is left-padded
UNPADDED = [(3, 5, True), (3, 5, True)]


def count_syncs(model, batch, **kwargs):
    with CountSyncs() as counter:
        model(**batch, **kwargs)
    return counter


def stock_syncs(batch, attn_implementation="sdpa"):
    with torch.no_grad():
        stock = make_model(pruning_method="none", attn_implementation=attn_implementation)
        return count_syncs(stock, batch, use_cache=True).syncs


METHODS = {
    "rcp-fixed": {},
    "attention_topk": dict(pruning_method="attention_topk"),
    "fastv": dict(pruning_method="fastv", pruning_layers=[2], pruning_keep_counts=[6]),
    "random": dict(pruning_method="random", pruning_layers=[1, 2], pruning_keep_counts=[10, 5]),
    "random-pre-llm": dict(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                           pre_llm_keep_count=6),
    "vispruner": dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                           pre_llm_keep_count=6),
}


@pytest.mark.parametrize("attn", ["sdpa", "flash-like"])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fixed_count_prefill_syncs_no_more_than_stock(method, specs, attn):
    """Each pruning point builds its segment's key mask; whether a row of it is padded is known on the host, so
    neither sdpa's nor flash attention's mask builder reads it (each did once per point in a padded batch)."""
    batch = make_batch(specs)
    model = make_model(randomize_plugins=True, attn_implementation=attention_kind(attn), **METHODS[method])
    with torch.no_grad():
        counter = count_syncs(model, batch, use_cache=True)
    # the old kept-index lists and slot compaction: B x P `nonzero` calls and boolean indexing
    assert counter.sync_counts["nonzero"] == counter.sync_counts["boolean_index"] == 0, counter.sync_counts
    assert counter.syncs <= stock_syncs(batch, attention_kind(attn)), counter.sync_counts


def test_the_counter_sees_syncs():
    x = torch.arange(6)
    with CountSyncs() as counter:
        int(x.sum()), x[x > 2], x.nonzero(), x.tolist()
        x[torch.tensor([0, 1])]  # an index tensor: no sync
    assert counter.sync_counts == {"_local_scalar_dense": 1, "boolean_index": 1, "nonzero": 1, "tolist": 1}


def test_adaptive_threshold_reads_its_counts_once_per_point():
    batch = make_batch(UNPADDED)
    model = make_model(randomize_plugins=True, pruning_keep_counts=None)
    with torch.no_grad():
        counter = count_syncs(model, batch, use_cache=True)
        kept = model.last_pruning_info.kept_counts
    assert kept[0, 0] != kept[1, 0] or kept[0, 1] != kept[1, 1]  # rows keep different numbers: data-dependent
    points = len(model.config.pruning_layers)
    assert counter.sync_counts["tolist"] == 1 + points, counter.sync_counts  # the prefill's checks + one per point
    assert counter.sync_counts["nonzero"] == 0, counter.sync_counts
    # Rows that keep different counts leave padding, which the host knows from those counts: transformers need not
    # read the pruned segment's key mask to find it (it did, once per point, before).
    assert counter.syncs <= stock_syncs(batch) + points, counter.sync_counts


def test_training_forward_syncs_no_more_than_stock():
    """The differentiable ('mask') layout of training: nothing moves, so nothing is read back."""
    batch = make_batch(PADDED)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    model = make_model(randomize_plugins=True)
    model.train()
    counter = count_syncs(model, batch, labels=labels)
    stock = make_model(pruning_method="none").train()
    with CountSyncs() as reference:
        stock(**batch, labels=labels)
    assert counter.sync_counts["nonzero"] == 0, counter.sync_counts
    assert counter.syncs <= reference.syncs, (counter.sync_counts, reference.sync_counts)


def decode_step(model, batch, new_tokens=1, step_mask=True):
    """Prefill `batch` with a cache, then run one step on `new_tokens` more tokens (with an attention mask, or
    none, as `generate` passes for unpadded prompts). Returns (the step's sync counter, its output, the prefill's
    output)."""
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1).repeat(1, new_tokens)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], dim=1) if step_mask else None
        with CountSyncs() as counter:
            step = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return counter, step, out


DECODE_METHODS = {**METHODS, "rcp-adaptive": dict(pruning_keep_counts=None)}
FLASH_LIKE = "rcp_test_fa_like"  # no "flash" in the name: transformers would load flash-attn kernels for it


def flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's contract, on a CPU: a (B, kv) padding mask or None, causal aligned to the last query. With
    transformers' flash mask builder registered for it, the masks a model builds are flash attention's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)  # (1, 1, q, kv)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :]  # (B, 1, q, kv)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False)


def attention_kind(name):
    """The model's attention implementation for a test's `attn` parameter (registering the flash-like one)."""
    if name != "flash-like":
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FLASH_LIKE, flash_like_attention)
    AttentionMaskInterface.register(FLASH_LIKE, flash_attention_mask)
    return FLASH_LIKE


@pytest.mark.parametrize("attn", ["sdpa", "flash-like", "eager"])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", sorted(DECODE_METHODS))
def test_decode_step_syncs_no_more_than_stock(method, specs, attn):
    """A step after a pruned prefill builds a key mask per pruned segment; with sdpa and flash attention,
    transformers read each one from the device (a sync per segment per step, 3 with two pruning layers). They are
    read together: as often as the stock model's step (eager reads none, in both)."""
    batch = make_batch(specs)
    model = make_model(randomize_plugins=True, attn_implementation=attention_kind(attn), **DECODE_METHODS[method])
    counter, _, out = decode_step(model, batch)
    assert out.past_key_values.rcp_state.segment_masks  # the step did decode after a pruned prefill
    stock, _, _ = decode_step(make_model(pruning_method="none", attn_implementation=attention_kind(attn)), batch)
    assert counter.sync_counts["nonzero"] == counter.sync_counts["boolean_index"] == 0, counter.sync_counts
    assert counter.syncs <= stock.syncs, (counter.sync_counts, stock.sync_counts)
    assert stock.syncs == (0 if attn == "eager" else 1), stock.sync_counts  # what "as often as stock" means here


@pytest.mark.parametrize("attn", ["sdpa", "flash-like", "eager"])
@pytest.mark.parametrize("step_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("new_tokens", [1, 2])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", ["rcp-fixed", "rcp-adaptive", "random-pre-llm"])
def test_decode_step_masks_are_those_of_each_key_mask_alone(method, specs, new_tokens, step_mask, attn):
    """The masks of a decode step, read in one sync, are what `create_causal_mask` gives each segment's key mask
    (its stored prefill mask + the new columns) on its own: None where sdpa may use the plain causal kernel or flash
    attention needs no mask, the same tensor elsewhere; and the step's logits are bitwise those of a step that builds
    them one by one."""
    from transformers.masking_utils import create_causal_mask

    from modeling_rcp_llava import RcpLlavaModel

    def reference(self, hidden, attention_mask, cache, state):  # the masks as built before: one call per segment
        new_len = cache.layers[0].get_seq_length() + hidden.shape[1] - state.prefill_length
        if attention_mask is None:
            new_cols = torch.ones(hidden.shape[0], new_len, dtype=torch.bool)
        else:
            new_cols = attention_mask[:, attention_mask.shape[1] - new_len:].bool()
        key_masks = {} if 0 in state.segment_masks else {0: attention_mask}
        key_masks.update({idx: torch.cat([m, new_cols], dim=1) for idx, m in state.segment_masks.items()})
        return {idx: create_causal_mask(config=self.language_model.config, inputs_embeds=hidden, attention_mask=m,
                                        past_key_values=cache, position_ids=None, layer_idx=idx)
                for idx, m in key_masks.items()}

    batch = make_batch(specs)
    model = make_model(randomize_plugins=True, attn_implementation=attention_kind(attn), **DECODE_METHODS[method])
    built = {}
    original = RcpLlavaModel._decode_segment_masks

    def record(name, fn):
        def wrapped(self, hidden, attention_mask, cache, state):
            built[name] = fn(self, hidden, attention_mask, cache, state)
            return built[name]
        return wrapped

    try:
        RcpLlavaModel._decode_segment_masks = record("new", original)
        counter, step, out = decode_step(model, batch, new_tokens, step_mask)
        RcpLlavaModel._decode_segment_masks = record("reference", reference)
        _, again, _ = decode_step(model, batch, new_tokens, step_mask)
    finally:
        RcpLlavaModel._decode_segment_masks = original
    assert built["new"].keys() == built["reference"].keys()
    for idx, mask in built["new"].items():
        expected = built["reference"][idx]
        assert (mask is None and expected is None) or torch.equal(mask, expected), idx
    assert torch.equal(step.logits, again.logits)
    # both kinds of mask occur: sdpa drops a mask where nothing is padded and one query attends; eager never does
    dropped = [mask is None for mask in built["new"].values()]
    if attn == "eager":
        assert not any(dropped), dropped
    elif attn == "flash-like":  # no mask wherever nothing is padded, whatever the number of queries
        assert any(dropped) == (specs is UNPADDED or (not step_mask and method != "random-pre-llm")), dropped
    elif method == "rcp-adaptive" and new_tokens == 1 and specs is UNPADDED:
        assert dropped == [True, False, True], dropped  # rows keep different counts at the first point only
    elif step_mask or 0 in model.config.pruning_layers or method == "random-pre-llm":
        assert set(dropped) == {new_tokens == 1 and specs is UNPADDED}, dropped
    else:  # no step mask: layer 0 has no key mask to read
        assert dropped == [new_tokens == 1] + [new_tokens == 1 and specs is UNPADDED] * (len(dropped) - 1), dropped
    # Whether each segment's prefill mask is padded is known on the host: a step reads its masks (once) only when
    # it has an attention mask and some mask's answer depends on it -- layer 0's, or an unpadded segment's.
    state = out.past_key_values.rcp_state
    assert state.padded_segments == {idx: not bool(m.all()) for idx, m in state.segment_masks.items()}
    unknown = 0 not in state.segment_masks or not all(state.padded_segments.values())
    assert counter.syncs == int(step_mask and unknown and attn != "eager"), counter.sync_counts


@pytest.mark.parametrize("attn", ["sdpa", "flash-like", "eager"])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", ["rcp-fixed", "rcp-adaptive", "random-pre-llm"])
def test_prefill_masks_are_those_of_each_key_mask(method, specs, attn):
    """Every mask a pruned prefill builds from what the host knows (layer 0's from the prompt's row lengths, each
    pruning point's from the rows' new lengths) is the one `create_causal_mask` builds from the key mask itself."""
    from transformers.masking_utils import create_causal_mask

    from modeling_rcp_llava import RcpLlavaModel

    batch = make_batch(specs)
    model = make_model(randomize_plugins=True, attn_implementation=attention_kind(attn), **DECODE_METHODS[method])
    seen, original = [], RcpLlavaModel._layer_mask

    def check(self, hidden, key_mask, cache, layer_idx, padded=None):
        mask = original(self, hidden, key_mask, cache, layer_idx, padded)
        expected = create_causal_mask(config=self.language_model.config, inputs_embeds=hidden, attention_mask=key_mask,
                                      past_key_values=cache, position_ids=None, layer_idx=layer_idx)
        seen.append((layer_idx, padded, mask is None))
        assert (mask is None and expected is None) or torch.equal(mask, expected), (layer_idx, padded)
        return mask

    try:
        RcpLlavaModel._layer_mask = check
        with torch.no_grad():
            model(**batch, use_cache=True)
    finally:
        RcpLlavaModel._layer_mask = original
    points = [0] if method == "random-pre-llm" else model.config.pruning_layers  # (a pre-LLM prune: before layer 0)
    assert [layer for layer, _, _ in seen] == [0, *points]  # the prompt's, then one per pruning point
    assert seen[0][1] == (specs is PADDED)  # every mask was built knowing its padding
    assert all(padded is not None for _, padded, _ in seen), seen
    if attn != "eager":  # unpadded masks are dropped (sdpa's plain causal kernel, flash's no mask)
        assert all(dropped == (not padded) for _, padded, dropped in seen), seen


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("specs", [PADDED, UNPADDED], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("method", ["rcp-fixed", "rcp-adaptive", "fastv", "vispruner"])
def test_generate_steps_sync_no_more_than_stock(method, specs, num_beams):
    """Per generated token, in `generate` (which drops an all-ones attention mask): as many host syncs as the stock
    model's steps -- the loop's own, and no mask read where no row is padded. The one exception, one read per
    token: beams after a prefill that left a segment padded on an unpadded prompt (the adaptive threshold's rows keep
    different counts); a beam reorder may pick only full rows, so the host no longer knows."""
    batch = make_batch(specs)
    model = make_model(randomize_plugins=True, **DECODE_METHODS[method])
    stock = make_model(pruning_method="none")

    def per_step(m):
        counts = []
        for tokens in (2, 6):
            with torch.no_grad(), CountSyncs() as counter:
                m.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           num_beams=num_beams)
            counts.append(counter.syncs)
        return (counts[1] - counts[0]) / 4

    ours, theirs = per_step(model), per_step(stock)
    if method == "rcp-adaptive" and specs is UNPADDED and num_beams > 1:
        assert ours == theirs + 1
    else:  # fewer where the pruned prefill already knows a mask the stock step must read (a pre-LLM prune's)
        assert ours <= theirs


def test_lazy_kept_indices_sync_only_when_read():
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    with CountSyncs() as counter:
        indices = out.kept_indices[1][0]
    assert counter.sync_counts["nonzero"] == len(model.config.pruning_layers) * 2  # resolved on first access, all at once
    assert torch.equal(indices, out.keep_masks[0, 1].nonzero().flatten())


def rows_per_call(model, batch, module="self_attn.k_proj"):
    """Rows that `module` of each decoder layer processed during one forward: {layer index: [rows per call]}."""
    calls, handles = {}, []
    for idx, layer in enumerate(model.model.language_model.layers):
        def hook(mod, args, output, idx=idx):
            calls.setdefault(idx, []).append(args[0].shape[0] * args[0].shape[1])
        handles.append(layer.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


@pytest.mark.parametrize("module", ["self_attn.k_proj", "input_layernorm"])
@pytest.mark.parametrize("method", ["rcp", "attention_topk"])
def test_pruning_layer_computes_its_keys_and_normalised_input_once(method, module):
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True, pruning_method=method)
    calls, out = rows_per_call(model, batch, module)
    width = batch["input_ids"].shape[1]
    points = model.config.pruning_layers  # [1, 2]
    # The first pruning layer: one call, on the whole (unpruned) sequence -- not a second one on its kept rows.
    assert calls[points[0]] == [2 * width]
    assert all(len(calls[idx]) == 1 for idx in range(len(model.model.language_model.layers))), calls
    # and the values are the layer's own: the same logits as a prefill that computes them again
    from modeling_rcp_llava import PrunedPrefill

    original = PrunedPrefill.given_inputs
    try:
        PrunedPrefill.given_inputs = lambda self, layer_idx, layer: contextlib.nullcontext()
        again_calls, again = rows_per_call(model, batch, module)
    finally:
        PrunedPrefill.given_inputs = original
    assert len(again_calls[points[0]]) == 2  # the reference does compute twice
    assert torch.equal(out.keep_masks, again.keep_masks)
    assert (out.logits - again.logits).abs().max() <= 1e-5


# -- the cheaper selection kernels give the reference values (issue 19) -------------------------------------------


def _reference_rope(x, cos, sin):
    """The prior's RoPE before issue 19: x cos + rotate_half(x) sin with rotate_half built by `cat`, the product
    added by one `addcmul` (transformers' Llama adds two products, which may round differently in the last bit)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos.unsqueeze(1), torch.cat((-x2, x1), dim=-1), sin.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bsz", [1, 3])
def test_rope_and_row_gather_equal_their_reference_formulas(dtype, bsz):
    from modeling_rcp_llava import _apply_rope, _gather_seq

    torch.manual_seed(0)
    seq, heads, head_dim = 11, 4, 8
    keys = torch.randn(bsz, seq, heads * head_dim, dtype=dtype)
    x = keys.view(bsz, seq, heads, head_dim).transpose(1, 2)  # the strided view the prior rotates
    cos, sin = torch.randn(bsz, seq, head_dim), torch.randn(bsz, seq, head_dim)  # float32, as the rotary embedding
    out = _apply_rope(x, cos, sin)
    assert torch.equal(out, _reference_rope(x, cos, sin)) and out.is_contiguous()
    x1, x2 = x.chunk(2, dim=-1)
    llama = x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)
    torch.testing.assert_close(out, llama)  # the layer's own formula, up to rounding
    # with autograd (the training layout's prior): same values and gradients
    xg = x.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    _apply_rope(xg, cos, sin).square().sum().backward()
    _reference_rope(xr, cos, sin).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    # row gather: padded rows read slot 0, as `_compact` produces them
    src = torch.stack([torch.randperm(seq)[:7] for _ in range(bsz)])
    src[0, :2] = 0
    hidden = torch.randn(bsz, seq, 6, dtype=dtype).requires_grad_(True)
    gathered = _gather_seq(hidden, src)
    reference = torch.gather(hidden, 1, src.unsqueeze(-1).expand(-1, -1, 6))
    assert torch.equal(gathered, reference)
    weights = torch.randn_like(reference)
    (grad,) = torch.autograd.grad((gathered * weights).sum(), hidden)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), hidden)
    assert torch.equal(grad, grad_ref)


def test_given_inputs_are_put_back_when_the_layer_fails():
    """The pruning layer runs with its norm and key projection swapped for the precomputed kept rows; an error in
    the layer must not leave them swapped (the next forward would read stale tensors)."""
    batch = make_batch(PADDED)
    model = make_model(randomize_plugins=True)
    layer = model.model.language_model.layers[model.config.pruning_layers[0]]
    norm, k_proj = layer.input_layernorm, layer.self_attn.k_proj
    original = layer.mlp.forward
    layer.mlp.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            model(**batch)
    finally:
        layer.mlp.forward = original
    assert layer.input_layernorm is norm and layer.self_attn.k_proj is k_proj
    with torch.no_grad():
        again = model(**batch)
        reference = make_model(randomize_plugins=True)(**batch)
    assert torch.equal(again.logits, reference.logits)


def test_question_slots_carried_through_compaction_match_a_fresh_search():
    """`PrunedPrefill.question_slots` finds the question rows once and moves them with each compaction; at every
    pruning point of a padded batch (rows of different lengths, one without an image) they are the slots a fresh
    search of the current layout finds, and the outputs match a run that searches afresh at every point."""
    from conftest import make_batch, make_model

    import modeling_rcp_llava as M

    model = make_model(randomize_plugins=True, pruning_layers=[1, 2, 3], repair_layers=[3],
                       pruning_keep_counts=[12, 6, 3])
    specs = [(2, 5, True), (0, 2, True), (4, 3, False), (1, 7, True)]
    batch = make_batch(specs)
    seen = []
    original = model.model._select_tokens

    def check(selector, ctx):
        carried = ctx.question_slots()
        fresh = M._first_slots(ctx.prefill.slot_question(), ctx.prefill.question_width)
        seen.append((ctx.point, carried, fresh))
        return original(selector, ctx)

    model.model._select_tokens = check
    with torch.no_grad():
        carried_out = model(**batch)
    assert [p for p, _, _ in seen] == [0, 1, 2]
    for point, (slots, valid), (fresh_slots, fresh_valid) in seen:
        assert torch.equal(valid, fresh_valid), point
        assert torch.equal(slots[valid], fresh_slots[fresh_valid]), point
        # every question token at every point (a row without an image has none: nothing to prune)
        assert valid.sum(1).tolist() == [q if image else 0 for _, q, image in specs]

    def search_every_point(self):  # the behaviour before: a fresh search at each point
        return M._first_slots(self.slot_question(), self.question_width)

    model.model._select_tokens = original
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.PrunedPrefill, "question_slots", search_every_point)
        fresh_out = model(**batch)
    assert torch.equal(carried_out.logits, fresh_out.logits)
    assert torch.equal(carried_out.keep_masks, fresh_out.keep_masks)


def test_question_slots_are_searched_once_per_prefill_unless_a_question_token_can_be_dropped():
    """One search per prefill, whether the tokens move (discard) or not (the training mask layout); one per pruning
    point when `question_mask` marks an image token, which a pruner may drop (its slots cannot be carried)."""
    from conftest import IMAGE_TOKEN, make_batch, make_model

    import modeling_rcp_llava as M

    model = make_model(randomize_plugins=True, pruning_layers=[1, 2, 3], repair_layers=[3],
                       pruning_keep_counts=[12, 6, 3])
    batch = make_batch([(2, 5, True), (0, 2, True), (1, 7, True)])
    searches = []
    with pytest.MonkeyPatch.context() as mp:
        search = M.PrunedPrefill.slot_question  # only the fresh search reads it
        mp.setattr(M.PrunedPrefill, "slot_question", lambda self: searches.append(1) or search(self))
        with torch.no_grad():
            model(**batch)
        assert len(searches) == 1
        searches.clear()
        labels = batch["input_ids"].clone()
        labels[:, :-2] = -100
        model.train()
        model(**batch, labels=labels)
        model.eval()
        assert len(searches) == 1
        searches.clear()
        question = batch["attention_mask"].bool() & (batch["input_ids"] != 1)  # text and image tokens alike
        assert (question & (batch["input_ids"] == IMAGE_TOKEN)).any()
        with torch.no_grad():
            on_image = model(**batch, question_mask=question)
        assert len(searches) == 3
    assert on_image.keep_masks.shape[1] == 3


def test_training_layout_takes_flash_attentions_padding_mask():
    """Flash attention's mask builder gives a (B, kv) padding mask; the training layout's soft key-mask attention
    passed it to sdpa as it was, so a left-padded batch in train mode failed ("The size of tensor a (28) must match
    the size of tensor b (2)"). It now reads it as flash does: each row of the padded batch gets the logits it gets
    alone (unpadded: no mask), and the plug-ins get finite gradients."""
    model = make_model(randomize_plugins=True, pruning_keep_counts=None, attn_implementation=attention_kind("flash-like"))
    for name, p in model.named_parameters():
        p.requires_grad_(".rcp_plugins." in name)
    model.train()
    specs = [(2, 3, True), (5, 6, True)]
    batch = make_batch(specs)
    keep = torch.zeros(2, 2, NUM_VISUAL, dtype=torch.bool)
    keep[:, 0, ::2] = True
    keep[:, 1, ::4] = True  # given masks: no noise, the same kept sets batched and alone
    out = model(**batch, visual_keep_masks=keep)
    out.logits[:, -1].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for i in range(2):
            alone = model(**row_inputs(batch, i, specs), visual_keep_masks=keep[i:i + 1]).logits[0]
            torch.testing.assert_close(out.logits[i, -alone.shape[0]:].detach(), alone, rtol=1e-5, atol=1e-5)


def test_retention_is_computed_once_per_pruning_point_and_equals_the_kept_fractions():
    """`layer_retention` in the physical layout: each layer's fraction of the visual tokens it processes, the kept
    masks' cumulative count / N (1 before the first point). The layers between two points share one value: it is
    reduced from `alive` once per point (and once for the layers before the first), not three ops per layer -- 84
    dispatched calls of a 32-layer prefill with three points, where a batch-1 GPU prefill's time follows its calls."""
    import modeling_rcp_llava as M

    model = make_model(randomize_plugins=True, pruning_layers=[1, 3], repair_layers=[3], pruning_keep_counts=[12, 5])
    batch = make_batch([(2, 5, True), (0, 2, True)])
    sums, original = [], M.PrunedPrefill.record_retention

    def record(run):
        before = len(run.retention)
        with CountSyncs() as counter:
            original(run)
        assert len(run.retention) == before + 1
        sums.append(counter.total)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(M.PrunedPrefill, "record_retention", record)
        out = model(**batch)
    # layers 0 | 1 2 | 3: a reduction (sum, to, div) at the first layer of each stretch, nothing at the others
    assert sums == [3, 3, 0, 3]
    kept = out.keep_masks.sum(-1).float() / NUM_VISUAL  # (B, P): tokens alive after each point
    expected = torch.stack([torch.ones(2), kept[:, 0], kept[:, 0], kept[:, 1]], dim=1)
    assert out.layer_retention.shape == (2, 4)
    assert torch.equal(out.layer_retention, expected)
    assert kept[:, 0].tolist() == [12 / NUM_VISUAL] * 2 and kept[:, 1].tolist() == [5 / NUM_VISUAL] * 2
