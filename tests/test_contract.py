"""The correctness contract of in-decoder pruning (issue 2, acceptance 1-6)."""

import pytest
import torch
from conftest import (
    IMAGE_TOKEN, NUM_VISUAL, at_positions, make_batch, make_model, masked_reference, row_inputs,
    stock_copy,
)

SINGLE = [(3, 4, True)]
PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]


def valid_logits(logits, positions, ref_logits):
    """Reference logits gathered at the surviving positions, and the model's, on valid slots only."""
    valid = positions >= 0
    return logits[valid], at_positions(ref_logits, positions)[valid]


# 1. No-op ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("specs", [SINGLE, PADDED], ids=["single", "left-padded"])
def test_method_none_equals_stock_llava(specs):
    model = make_model(pruning_method="none")
    assert len(model.model.rcp_plugins.pruners) == 0
    batch = make_batch(specs)
    with torch.no_grad():
        ours = model(**batch).logits
        ref = stock_copy(model)(**batch).logits
    valid = batch["attention_mask"].bool()
    assert (ours - ref)[valid].abs().max() <= 1e-5


@pytest.mark.parametrize("specs", [SINGLE, PADDED], ids=["single", "left-padded"])
def test_rcp_with_pruning_disabled_equals_stock_llava(specs):
    model = make_model()
    batch = make_batch(specs)
    with torch.no_grad():
        ref = stock_copy(model)(**batch).logits
        with model.plugins_disabled(pruning=True, repair=False):
            ours = model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert (ours - ref)[valid].abs().max() <= 1e-5


def test_fresh_plugins_use_the_authors_init():
    """Issue 15: the authors' initialisation replaces the exact no-op (gate 0, bias 0) at init: a gate of 0.1 and
    xavier(gain 0.1) `up` / `query_proj` let the adapters learn at the paper's learning rate; the pruner bias 2.0
    keeps the tokens whose centred log prior exceeds -2; FiLM starts at gamma = 1, beta = 0; the query aggregate at
    1/N_q; the token MLP's last layer at 0."""
    model = make_model()
    plugins = model.model.rcp_plugins
    for adapter in plugins.repair_adapters.values():
        assert adapter.gate.item() == pytest.approx(0.1)
        assert adapter.film_gamma.weight.abs().max() == 0 and adapter.film_beta.weight.abs().max() == 0
        for linear in (adapter.up, adapter.query_proj):
            bound = 0.1 * (6 / (linear.in_features + linear.out_features)) ** 0.5  # xavier_uniform, gain 0.1
            # the upper half of the range: a 100x smaller init (gain 1e-3) passed a bare `0 <`
            assert 0.5 * bound < linear.weight.abs().max() <= bound and linear.bias.abs().max() == 0
    for pruner in plugins.pruners.values():
        assert pruner.bias.item() == 2.0
        assert torch.equal(pruner.aggregate.weight, torch.full_like(pruner.aggregate.weight, 1 / 16))  # N_q = 16
        assert pruner.token_mlp[-1].weight.abs().max() == 0 and pruner.token_mlp[-1].bias.abs().max() == 0
    # the context's two projections, e_mask's included (it kept PyTorch's default init, ~3x the authors' scale)
    for linear in (plugins.repair_context.mask_proj, plugins.repair_context.pruned_proj):
        bound = 0.1 * (6 / (linear.in_features + linear.out_features)) ** 0.5
        assert 0.5 * bound < linear.weight.abs().max() <= bound and linear.bias.abs().max() == 0


def test_the_prior_clamps_attention_weights_at_the_authors_floor_before_the_log():
    """Eq. (4)'s log: the authors clamp a at 1e-6; at 1e-30 a weight of 1e-10 pulled its row's centred prior
    (e.g. [11.19, 5.48, -6.03, -10.64] vs the authors' [7.73, 2.03, -4.88, -4.88])."""
    import math

    from modeling_rcp_llava import PRIOR_LOG_FLOOR, _centred_log

    assert PRIOR_LOG_FLOOR == 1e-6
    a = torch.tensor([[0.3, 1e-3, 1e-8, 1e-10, 0.5]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True, False]])  # the last token is no longer alive
    logs = [math.log(0.3), math.log(1e-3), math.log(1e-6), math.log(1e-6)]
    expected = [v - sum(logs) / 4 for v in logs]
    assert _centred_log(a, valid)[0, :4].tolist() == pytest.approx(expected, abs=1e-12)
    assert _centred_log(a, valid)[0, :4].tolist() == pytest.approx([7.73, 2.03, -4.88, -4.88], abs=0.01)


def test_fresh_repair_adapters_change_only_the_answer_positions():
    """A fresh adapter (gate 0.1) already corrects the answer positions (here: the last one) and nothing else."""
    model = make_model()
    batch = make_batch(PADDED)
    with torch.no_grad():
        with_repair = model(**batch)
        with model.plugins_disabled(pruning=False, repair=True):
            without = model(**batch)
    assert torch.equal(with_repair.kept_counts, without.kept_counts)
    assert torch.equal(with_repair.logits[:, :-1], without.logits[:, :-1])
    assert not torch.allclose(with_repair.logits[:, -1], without.logits[:, -1], atol=1e-6)


def test_keeping_every_token_equals_stock():
    model = make_model(pruning_keep_counts=[NUM_VISUAL, NUM_VISUAL], repair_layers=[])
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
        ref = stock_copy(model)(**batch).logits
    assert out.kept_counts.tolist() == [[NUM_VISUAL] * 2] * 3
    ours, theirs = valid_logits(out.logits, out.token_positions, ref)
    assert (ours - theirs).abs().max() <= 1e-5


# 2. Discard == mask -----------------------------------------------------------------------------


def with_positions(batch):
    """RoPE positions as `generate` builds them (RoPE is shift-invariant only up to fp32 cos/sin rounding)."""
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)}


@pytest.mark.parametrize("specs", [SINGLE, PADDED], ids=["single", "left-padded"])
@pytest.mark.parametrize("counts", [[10, 5], None], ids=["fixed", "adaptive"])
def test_discard_equals_mask_fp32(specs, counts):
    model = make_model(repair_layers=[], pruning_keep_counts=counts, randomize_plugins=True)
    batch = with_positions(make_batch(specs))
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
        unpruned = stock_copy(model)(**batch).logits
    if counts is not None:
        assert out.kept_counts.tolist() == [counts] * len(specs)
    ours, theirs = valid_logits(out.logits, out.token_positions, ref)
    assert (ours - theirs).abs().max() <= 1e-4
    # Non-vacuous: pruning changed the prediction of the last prompt token.
    ours_full, _ = valid_logits(out.logits, out.token_positions, unpruned)
    assert (out.logits[:, -1] - unpruned[:, -1]).abs().max() > 1e-3


def test_discard_equals_mask_fp64_to_rounding():
    """fp64: equal up to ~1 ulp. Not bit-exact: sdpa sums a row over T' keys instead of T keys with zeros."""
    model = make_model(repair_layers=[], randomize_plugins=True, dtype=torch.float64)
    batch = with_positions(make_batch(PADDED, dtype=torch.float64))
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
    ours, theirs = valid_logits(out.logits, out.token_positions, ref)
    assert (ours - theirs).abs().max() <= 1e-14


# 3. Cache == recompute --------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[10, 5], None], ids=["fixed", "adaptive"])
def test_generate_with_cache_equals_no_cache_recompute(counts):
    model = make_model(randomize_plugins=True, pruning_keep_counts=counts)
    specs = PADDED
    batch = make_batch(specs)
    steps = 5
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    info = model.last_pruning_info
    bsz, prompt_len = batch["input_ids"].shape
    sequences = gen.sequences
    question = torch.zeros(bsz, prompt_len + steps, dtype=torch.bool)
    image = batch["input_ids"] == IMAGE_TOKEN
    last_image = torch.where(image, torch.arange(prompt_len), -1).max(1).values
    question[:, :prompt_len] = (torch.arange(prompt_len) > last_image.unsqueeze(1)) & batch["attention_mask"].bool()
    for step in range(steps):
        length = prompt_len + step
        answer = torch.zeros(bsz, length, dtype=torch.bool)
        answer[:, prompt_len - 1:] = True
        mask = torch.cat([batch["attention_mask"], torch.ones(bsz, step, dtype=torch.long)], 1)
        with torch.no_grad():
            out = model(input_ids=sequences[:, :length], pixel_values=batch["pixel_values"], attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False,
                        question_mask=question[:, :length], answer_mask=answer, visual_keep_masks=info.keep_masks)
        assert torch.equal(out.keep_masks, info.keep_masks)
        assert (out.logits[:, -1] - gen.logits[step]).abs().max() <= 1e-4
        assert torch.equal(out.logits[:, -1].argmax(-1), sequences[:, length])

    # Per-layer cache lengths: prompt - dropped before that layer + generated (the last token is not cached).
    cache = gen.past_key_values
    state = cache.rcp_state
    prompt_rows = batch["attention_mask"].sum(1)  # (B,)
    dropped_rows = NUM_VISUAL - info.kept_counts  # (B, P)
    for layer in range(model.config.text_config.num_hidden_layers):
        preceding = [p for p, l in enumerate(model.config.pruning_layers) if l <= layer]
        dropped = dropped_rows[:, preceding[-1]] if preceding else torch.zeros_like(prompt_rows)
        per_row = prompt_rows - dropped  # real tokens of each row in this layer's cache after the prefill
        # Rows are re-padded on the left to the longest row after each discard.
        assert cache.layers[layer].keys.shape[-2] == int(per_row.max()) + steps - 1
        if preceding:
            segment = state.segment_masks[model.config.pruning_layers[preceding[-1]]]
            assert torch.equal(segment.sum(1), per_row)


def test_cache_lengths_single_prompt_fixed_counts():
    model = make_model(pruning_keep_counts=[10, 5])
    batch = make_batch(SINGLE)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    lengths = [layer.keys.shape[-2] for layer in gen.past_key_values.layers]
    generated = 3
    assert lengths == [prompt_len + generated, prompt_len - 6 + generated, prompt_len - 11 + generated,
                       prompt_len - 11 + generated]


# 4. Batch == single -----------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[10, 5], None], ids=["fixed", "adaptive"])
def test_left_padded_batch_equals_single_runs(counts):
    model = make_model(randomize_plugins=True, pruning_keep_counts=counts)
    specs = PADDED
    batch = make_batch(specs)
    with torch.no_grad():
        out = model(**batch)
        gen = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        batch_counts = out.kept_counts
        for i in range(len(specs)):
            single = row_inputs(batch, i, specs)
            ref = model(**single)
            assert torch.equal(ref.kept_counts[0], batch_counts[i])
            for p in range(len(model.config.pruning_layers)):
                assert torch.equal(out.kept_indices[p][i], ref.kept_indices[p][0])
            valid = out.token_positions[i] >= 0
            ours = out.logits[i][valid]
            assert ours.shape == ref.logits[0].shape
            assert (ours - ref.logits[0]).abs().max() <= 1e-4
            single_gen = model.generate(**single, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(gen[i, -4:], single_gen[0, -4:])
    if counts is None:  # adaptive mode: rows really keep different numbers of tokens
        assert len(set(batch_counts[:, -1].tolist())) > 1


def test_prompt_without_image_goes_through_unpruned():
    model = make_model(randomize_plugins=True)
    specs = [(2, 3, True), (4, 5, False)]
    batch = make_batch(specs)
    with torch.no_grad():
        out = model(**batch)
        text_only = row_inputs(batch, 1, specs)
        ref = stock_copy(model)(input_ids=text_only["input_ids"]).logits
    assert out.kept_counts[1].tolist() == [0, 0] and not model.last_pruning_info.has_image[1]
    valid = out.token_positions[1] >= 0
    assert (out.logits[1][valid] - ref[0]).abs().max() <= 1e-5


# 5. The recomputed attention prior equals eager attention ----------------------------------------


def test_question_attention_equals_eager_output_attentions():
    from modeling_rcp_llava import question_attention_probs

    model = make_model(attn_implementation="eager")
    stock = stock_copy(model)
    stock.config._attn_implementation = "eager"
    stock.config.text_config._attn_implementation = "eager"
    batch = make_batch(PADDED)
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = stock(**batch, position_ids=positions, output_attentions=True, output_hidden_states=True)
    lm = model.model.language_model
    bsz, seq = batch["input_ids"].shape
    q_slots = torch.arange(seq - 5, seq).expand(bsz, -1)  # the last 5 rows: question tokens of every row
    for layer_idx in (1, 2):
        layer = lm.layers[layer_idx]
        h = out.hidden_states[layer_idx]
        cos, sin = lm.rotary_emb(h, positions)
        with torch.no_grad():
            probs = question_attention_probs(layer.self_attn, layer.input_layernorm(h), cos, sin,
                                             batch["attention_mask"].bool(), q_slots)
        eager = out.attentions[layer_idx][:, :, -5:, :]  # (B, H, 5, T)
        assert lm.config.num_key_value_heads < lm.config.num_attention_heads  # GQA is exercised
        assert (probs - eager).abs().max() <= 1e-5


# 6. Beam search and sampling --------------------------------------------------------------------


def test_beam_search_and_sampling_run():
    model = make_model(randomize_plugins=True)
    batch = make_batch(PADDED)
    with torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=4, num_beams=3, do_sample=False)
        sampled = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5)
    assert beams.shape[0] == 3 and sampled.shape[0] == 3


def test_repair_state_follows_beam_reordering():
    from modeling_rcp_llava import RcpDecodeState, RcpDynamicCache

    contexts = torch.arange(12.0).view(3, 4)
    state = RcpDecodeState(7, {2: torch.tensor([[1, 0], [1, 1], [0, 1]]).bool()}, {3: contexts},
                           torch.tensor([True, False, True]))
    cache = RcpDynamicCache()
    cache.rcp_state = state
    beam_idx = torch.tensor([2, 2, 0])
    cache.reorder_cache(beam_idx)
    assert torch.equal(state.repair_contexts[3], contexts[beam_idx])
    assert state.has_image.tolist() == [True, True, True]
    assert state.segment_masks[2].tolist() == [[False, True], [False, True], [True, False]]
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(state.repair_contexts[3], contexts[[2]])


def test_decode_state_knows_padding_only_while_every_row_stays():
    """What the host knows of each segment's padding (so decode steps need not read the masks) survives repeating
    rows; picking rows keeps "unpadded" (rows of an all-True mask) but forgets "padded" (the picked rows may be full)."""
    from modeling_rcp_llava import RcpDecodeState

    masks = {2: torch.tensor([[True, False], [True, True]]), 5: torch.ones(2, 2, dtype=torch.bool)}

    def state():
        return RcpDecodeState(7, dict(masks), {}, torch.tensor([True, True]), padded_segments={2: True, 5: False})

    repeated = state()
    repeated.repeat_interleave(2)
    assert repeated.padded_segments == {2: True, 5: False}
    for pick in (lambda s: s.reorder(torch.tensor([1, 1])), lambda s: s.select(torch.tensor([1]))):
        picked = state()
        pick(picked)
        assert bool(picked.segment_masks[2].all())  # the padded row is gone: "padded" would now be wrong
        assert picked.padded_segments == {5: False}


@pytest.mark.parametrize("counts", ["fixed", "adaptive"])
def test_a_mixed_batch_is_as_long_as_its_longest_row(counts):
    """A text-only row keeps its length (nothing of it is pruned); the pruned sequence is as long as its longest row,
    in every layer's cache. Every length test used image rows only: a text row counted as keeping the point's count
    (its length grown by it, every row padded to that) passed (a mutation audit)."""
    overrides = {} if counts == "fixed" else {"pruning_keep_counts": None}
    model = make_model(randomize_plugins=True, **overrides)
    batch = make_batch([(2, 3, True), (4, 5, False)])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    valid = out.token_positions >= 0  # (B, T')
    assert valid[1].sum() == batch["attention_mask"][1].sum()  # the text row whole
    assert valid.any(0).all(), "a column that is padding in every row"
    lengths = {out.past_key_values.get_seq_length(i) for i in range(model.config.text_config.num_hidden_layers)}
    assert max(lengths) == batch["input_ids"].shape[1] and min(lengths) == valid.shape[1]


def test_a_repeated_or_selected_cache_decodes_each_row_as_its_prompt():
    """`Cache.batch_repeat_interleave` / `batch_select_indices` (what generate does to a given cache for
    `num_return_sequences` or contrastive search): the pruning state's segment masks, repair contexts and image flags
    follow the rows (tiling them instead of interleaving passed every test: a mutation audit). A decode step on the
    repeated or selected cache equals the original's rows."""
    import copy

    model = make_model(randomize_plugins=True, seed=3)
    batch = make_batch(PADDED, seed=5)
    nxt = torch.tensor([[7], [8], [9]])
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=batch["attention_mask"].dtype)], dim=1)
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
        step = model(input_ids=nxt, attention_mask=mask, past_key_values=copy.deepcopy(cache)).logits[:, -1]
        repeated = copy.deepcopy(cache)
        repeated.batch_repeat_interleave(2)
        twice = model(input_ids=nxt.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                      past_key_values=repeated).logits[:, -1]
        cache.batch_select_indices(torch.tensor([2, 0]))
        picked = model(input_ids=nxt[[2, 0]], attention_mask=mask[[2, 0]], past_key_values=cache).logits[:, -1]
    assert not torch.allclose(step[0], step[1], atol=1e-3)  # rows that differ: a mix-up would show
    torch.testing.assert_close(twice, step.repeat_interleave(2, 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(picked, step[[2, 0]], rtol=1e-5, atol=1e-6)


def test_beam_search_batch_equals_single_with_trained_adapters():
    """If the adapters' per-sample state did not follow the beams, rows would read each other's context."""
    model = make_model(randomize_plugins=True, seed=3)
    specs = [(2, 3, True), (5, 6, True)]
    batch = make_batch(specs, seed=5)
    with torch.no_grad():
        beams = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False)
        for i in range(len(specs)):
            single = model.generate(**row_inputs(batch, i, specs), max_new_tokens=5, min_new_tokens=5,
                                    num_beams=3, do_sample=False)
            assert torch.equal(beams[i, -5:], single[0, -5:])


def test_a_row_with_exactly_one_padding_token_equals_its_single_run():
    """Whether a pruned segment is padded is read on the host from the rows' lengths: a batch whose shorter row has
    a single padding token is padded too."""
    model = make_model(randomize_plugins=True)
    specs = [(3, 4, True), (2, 4, True)]
    batch = make_batch(specs)
    assert batch["attention_mask"].sum(1).tolist() == [24, 23]
    with torch.no_grad():
        out = model(**batch)
        for i in range(2):
            single = model(**row_inputs(batch, i, specs))
            assert (out.logits[i, -1] - single.logits[0, -1]).abs().max() <= 1e-5, i


def test_nested_plugins_disabled_keeps_the_outer_blocks_pruning_off():
    """`plugins_disabled()` (no pruning, no repair) around `plugins_disabled(pruning=False)`: the inner block does
    not turn pruning back on; the forward is stock's."""
    model = make_model(randomize_plugins=True)
    batch = make_batch([(2, 4, True)])
    with torch.no_grad():
        with model.plugins_disabled():
            with model.plugins_disabled(pruning=False):
                inner = model(**batch)
            outer = model(**batch)
        stock = stock_copy(model)(**batch)
    assert inner.logits.shape == stock.logits.shape == outer.logits.shape
    assert torch.equal(inner.logits, outer.logits)
    assert (inner.logits - stock.logits).abs().max() <= 1e-5
