"""`generate(use_cache=False)` is a slower cached `generate`, as in stock transformers, for every pruning method; and
a prefill in the differentiable ('mask') layout refuses a cache it cannot fill instead of forgetting the prompt."""

import pytest
import torch
from transformers import DynamicCache

from conftest import make_batch, make_model
from test_baselines import METHODS as BASELINES

METHODS = {"rcp": dict(), "rcp-adaptive": dict(pruning_keep_counts=None), **BASELINES}
GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)


def _model(method):
    model = make_model(randomize_plugins=True, **METHODS[method])
    model.generation_config.pad_token_id = 0
    return model


def _assert_same_generation(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_without_a_cache_equals_the_cached_generate(method):
    """Each step without a cache runs the whole sequence again. It re-selected the visual tokens there, reading the
    generated tokens as question text (RCP, attention top-k) or FastV's last prompt token on the newest one, and
    repaired only the newest position: the logits moved by up to 0.26 and RCP's tokens changed. It now keeps the
    prompt's kept sets and repairs the positions a cached decode repairs."""
    model = _model(method)
    batch = make_batch([(2, 3, True), (5, 6, True), (1, 4, False)])  # left padding, and a row without an image
    with torch.no_grad():
        cached = model.generate(**batch, **GREEDY)
        kept = model.last_pruning_info.keep_masks.clone()
        uncached = model.generate(**batch, use_cache=False, **GREEDY)
    _assert_same_generation(uncached, cached)
    assert torch.equal(model.last_pruning_info.keep_masks, kept)  # the last step ran on the prompt's kept sets


def test_generate_without_a_cache_with_beams_and_given_masks():
    """Beams and several sequences per prompt expand the kept sets with the rows; masks the caller gives are kept
    (the prompt's own answer mask is not imposed over one)."""
    model = _model("rcp-adaptive")
    batch = make_batch([(2, 3, True), (5, 6, True)])
    beams = dict(GREEDY, num_beams=3, num_return_sequences=2, output_logits=False)
    with torch.no_grad():
        cached = model.generate(**batch, **beams)
        uncached = model.generate(**batch, use_cache=False, **beams)
        assert torch.equal(uncached.sequences, cached.sequences)
        answer = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)  # repair nothing in the prompt
        given = dict(GREEDY, answer_mask=answer)
        _assert_same_generation(model.generate(**batch, use_cache=False, **given), model.generate(**batch, **given))


def test_a_mask_layout_prefill_refuses_a_cache_it_cannot_fill():
    """`pruning_layout('mask')` (a user checking discard against mask) with `generate` filled no cache, so every
    token after the first was predicted from the generated tokens alone -- silently, with a warning about train
    mode. It is refused; without a cache, generation there equals the physical one."""
    model = _model("rcp")
    batch = make_batch([(2, 3, True), (5, 6, True)])
    message = r"^A KV cache was given \(`generate`, or `past_key_values`\) to a prefill in the differentiable \('mask'\)"
    with torch.no_grad(), model.pruning_layout("mask"):
        with pytest.raises(ValueError, match=message):
            model.generate(**batch, **GREEDY)
        with pytest.raises(ValueError, match=message):
            model(**batch, past_key_values=DynamicCache())
        masked = model.generate(**batch, use_cache=False, **GREEDY)
    with torch.no_grad():
        physical = model.generate(**batch, **GREEDY)
    _assert_same_generation(masked, physical)
