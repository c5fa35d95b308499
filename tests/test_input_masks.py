"""Attention masks that hide a visual token (a token-ablation experiment; stock LLaVA reads such a token as an
invisible key). Every pruning method crashed on them with an index error: the prefill counted all N visual tokens
alive, so the compaction overran by the hidden ones. A hidden token is now dead from the start, like padding."""

import pytest
import torch
from conftest import IMAGE_TOKEN, NUM_VISUAL, at_positions, make_batch, make_model, masked_reference
from test_baselines import METHODS

PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]
CASES = {"rcp": dict(randomize_plugins=True, repair_layers=[]),
         "rcp-adaptive": dict(randomize_plugins=True, repair_layers=[], pruning_keep_counts=None),
         **METHODS}


def _with_positions(batch):
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)}


def _hide(batch, row, raster_ids):
    """Set the attention mask to 0 on visual tokens `raster_ids` of `row`."""
    slots = (batch["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
    batch["attention_mask"][row, slots[raster_ids]] = 0


@pytest.mark.parametrize("name", list(CASES))
def test_a_hidden_visual_token_is_never_kept_and_discard_equals_mask(name):
    model = make_model(**CASES[name])
    with torch.no_grad():
        kept_before = model(**_with_positions(make_batch(PADDED))).keep_masks  # (B, P, N)
    # Row 1, the longest (the compaction's width), hides a token the method keeps to the end without the hole
    # (VisPruner chooses blind to the mask); row 2 hides its first and last visual tokens.
    chosen = int(kept_before[1, -1].nonzero()[0])
    batch = make_batch(PADDED)
    _hide(batch, 1, [chosen])
    _hide(batch, 2, [0, NUM_VISUAL - 1])
    batch = _with_positions(batch)
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
    assert not out.keep_masks[1, :, chosen].any()
    assert not out.keep_masks[2, :, [0, NUM_VISUAL - 1]].any()
    assert torch.equal(out.kept_counts, out.keep_masks.sum(-1))
    valid = out.token_positions >= 0
    assert (out.logits - at_positions(ref, out.token_positions))[valid].abs().max() <= 1e-4
    # Physical discard: the valid slots are the shown tokens, less the visual ones dropped.
    shown_visual = torch.tensor([NUM_VISUAL, NUM_VISUAL - 1, NUM_VISUAL - 2])
    assert torch.equal(valid.sum(1), batch["attention_mask"].sum(1) - shown_visual + out.kept_counts[:, -1])


@pytest.mark.parametrize("counts", [[10, 5], None], ids=["fixed", "adaptive"])
def test_the_training_layout_treats_a_hidden_visual_token_as_the_discard_does(counts):
    model = make_model(randomize_plugins=True, pruning_keep_counts=counts)
    batch = make_batch(PADDED)
    _hide(batch, 1, [4])  # the longest row
    with torch.no_grad():
        discard = model(**batch)
        with model.pruning_layout("mask"):
            masked = model(**batch)
    assert torch.equal(masked.keep_masks, discard.keep_masks) and not discard.keep_masks[1, :, 4].any()
    assert torch.equal(masked.layer_retention, discard.layer_retention)
    positions = discard.token_positions
    valid = positions >= 0
    ref = at_positions(masked.logits, positions)
    assert (discard.logits[valid] - ref[valid]).abs().max() <= 1e-4


def test_given_keep_masks_leave_a_hidden_visual_token_out():
    model = make_model(randomize_plugins=True, repair_layers=[])
    batch = _with_positions(make_batch(PADDED))
    _hide(batch, 1, [2])
    forced = torch.ones(3, 2, NUM_VISUAL, dtype=torch.bool)
    forced[:, 1, 8:] = False
    with torch.no_grad():
        out = model(**batch, visual_keep_masks=forced)
        ref = masked_reference(model, batch, out.keep_masks)
    assert out.kept_counts.tolist() == [[16, 8], [15, 7], [16, 8]]
    valid = out.token_positions >= 0
    assert (out.logits - at_positions(ref, out.token_positions))[valid].abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["rcp", "rcp-adaptive", "fastv", "vispruner"])
def test_one_unpadded_row_with_a_hidden_visual_token_runs_and_generates(name):
    """The probe's case: one row, no padding to absorb the overrun (an index error for every in-decoder method)."""
    model = make_model(**CASES[name])
    batch = make_batch([(3, 4, True)])
    _hide(batch, 0, [3])
    with torch.no_grad():
        out = model(**batch)
        tokens = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert not out.keep_masks[0, :, 3].any() and tokens.shape == (1, batch["input_ids"].shape[1] + 3)


def test_vispruner_hiding_a_token_it_keeps_in_an_unpadded_row_matches_the_reference():
    """VisPruner chooses blind to the attention mask, so with a kept token hidden it keeps one fewer than its count:
    the loop reads the kept count from the mask then. Assuming the count made the row one slot longer than its
    tokens and called the segment unpadded -- different logits, silently, where no padding absorbed it."""
    model = make_model(**CASES["vispruner"])
    with torch.no_grad():
        chosen = int(model(**make_batch([(2, 3, True)])).keep_masks[0, 0].nonzero()[0])
    batch = make_batch([(2, 3, True)])
    _hide(batch, 0, [chosen])
    batch = _with_positions(batch)
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
    count = CASES["vispruner"]["pre_llm_keep_count"]
    assert not out.keep_masks[0, 0, chosen] and out.kept_counts.tolist() == [[count - 1]]
    valid = out.token_positions >= 0
    assert (out.logits - at_positions(ref, out.token_positions))[valid].abs().max() <= 1e-4


def test_the_default_question_is_the_unlabelled_text_after_the_image():
    """With labels, the answer tokens are not question rows: the prior's queries are the text after the image that
    carries no label -- the same kept tokens as that text given as `question_mask`."""
    model = make_model(**CASES["attention_topk"])
    batch = make_batch([(2, 3, True)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]  # the last 2 text tokens are the answer
    question = torch.zeros_like(batch["input_ids"])
    question[:, -3] = 1  # the one unlabelled token after the image
    with torch.no_grad():
        default = model(**batch, labels=labels).keep_masks
        given = model(**batch, question_mask=question).keep_masks
        all_text = model(**batch).keep_masks  # no labels: all 3 tokens after the image are the question
    assert torch.equal(default, given)
    assert not torch.equal(default, all_text)  # which rows are the question matters on this input


def test_a_4d_attention_mask_is_refused_by_name_when_pruning():
    """Stock takes a custom 4-D mask; pruning needs the 2-D padding mask (which tokens exist) and failed with
    "Index tensor must have the same number of dimensions as input tensor"."""
    model = make_model()
    batch = make_batch([(3, 4, True)])
    seq = batch["input_ids"].shape[1]
    mask4d = torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq)
    with pytest.raises(ValueError, match=r"^`attention_mask` has shape \(1, 1, 24, 24\); pruning reads the 2-D "
                                         r"padding mask .* or run with `pruning_method='none'`"):
        model(**{**batch, "attention_mask": mask4d})


@pytest.mark.parametrize("name", ["question_mask", "answer_mask"])
def test_a_token_mask_of_another_shape_is_refused_by_name(name):
    model = make_model()
    batch = make_batch([(3, 4, True)])
    with pytest.raises(ValueError, match=rf"^`{name}` has shape \(1, 23\); it marks tokens of this input, so it must "
                                         r"be \(1, 24\)"):
        model(**batch, **{name: batch["attention_mask"][:, 1:].bool()})


def test_generate_without_a_cache_grows_a_given_question_mask():
    """Without a cache every step runs the whole sequence again; the prompt-length `question_mask` given to
    `generate` no longer fit it ("The size of tensor a (28) must match the size of tensor b (29)"). It grows with
    False (a generated token is no question token): the same tokens as a greedy loop of forwards given the grown
    mask (which re-select on it; `generate` keeps the prompt's kept sets, tests/test_generate_no_cache.py)."""
    model = make_model(randomize_plugins=True, pruning_keep_counts=None)
    batch = make_batch([(2, 3, True), (5, 6, True)])
    seq = batch["input_ids"].shape[1]
    last_image = torch.where(batch["input_ids"] == IMAGE_TOKEN, torch.arange(seq), -1).max(1).values
    question = (torch.arange(seq) > last_image.unsqueeze(1)) & batch["attention_mask"].bool()
    question[:, -1] = False  # not the default mask: the last prompt token is left out
    with torch.no_grad():
        out = model.generate(**batch, question_mask=question, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             use_cache=False)
        ids, mask, q = batch["input_ids"], batch["attention_mask"], question
        for _ in range(3):
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], question_mask=q,
                           position_ids=positions, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            q = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
    assert torch.equal(out, ids)


def test_packed_sequences_are_refused():
    """Stock keeps sequences packed in one row apart (positions restarting, no attention_mask, no cache: it builds a
    block-diagonal mask); the pruned loop let them attend to each other, 0.23 off stock with nothing pruned and
    0.37 on a row with an image."""
    model = make_model(randomize_plugins=True)
    first, second = make_batch([(3, 2, False)]), make_batch([(2, 3, True)], seed=1)
    ids = torch.cat([first["input_ids"], second["input_ids"]], 1)
    positions = torch.cat([torch.arange(first["input_ids"].shape[1]), torch.arange(second["input_ids"].shape[1])])
    with pytest.raises(ValueError, match=r"^`position_ids` restart inside a row \(packed sequences, as padding-free "
                                         r"training packs them\): `pruning_method='rcp'` runs its own decoder loop"):
        model(input_ids=ids, pixel_values=second["pixel_values"], position_ids=positions.unsqueeze(0), use_cache=False)
    with torch.no_grad():  # positions that only start late are one sequence: as stock, no refusal
        shifted = torch.arange(ids.shape[1]).unsqueeze(0) + 7
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=second["pixel_values"], position_ids=shifted, use_cache=False).logits,
            model(input_ids=ids, pixel_values=second["pixel_values"], position_ids=shifted).logits)


def test_packed_sequences_are_refused_under_gradient_checkpointing_in_training():
    """Stock turns `use_cache` off for a checkpointed text model in train mode, so it reads the packing there (the
    usual padding-free setup); the pruned forward made a cache its checkpointed layers then dropped, skipped the
    check and mixed the sequences (0.27 off stock). It now decides `use_cache` as stock does."""
    model = make_model(pruning_method="random", pruning_layers=[1, 2], repair_layers=[], pruning_keep_counts=[10, 5])
    model.gradient_checkpointing_enable()
    model.train()
    first, second = make_batch([(3, 2, False)]), make_batch([(2, 3, False)], seed=1)
    ids = torch.cat([first["input_ids"], second["input_ids"]], 1)
    positions = torch.cat([torch.arange(first["input_ids"].shape[1]), torch.arange(second["input_ids"].shape[1])])
    with pytest.raises(ValueError, match=r"^`position_ids` restart inside a row"):
        model(input_ids=ids, position_ids=positions.unsqueeze(0))
    out = model(**first)  # and, as stock, no cache
    assert out.past_key_values is None


def test_the_default_answer_positions_are_those_that_predict_a_labelled_token():
    """Without `answer_mask`, the repair adapters act at the positions whose next token is labelled (they predict
    the answer, Eqs. 11-15): the same logits as that mask given explicitly, and not the labelled positions
    themselves."""
    model = make_model(randomize_plugins=True)
    batch = make_batch([(2, 5, True)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]
    predicting = torch.zeros_like(batch["input_ids"])
    predicting[:, -4:-1] = 1
    with torch.no_grad():
        default = model(**batch, labels=labels)
        given = model(**batch, answer_mask=predicting)
        labelled = model(**batch, answer_mask=(labels != -100).long())
    assert torch.equal(default.logits, given.logits)
    assert not torch.allclose(default.logits, labelled.logits)
