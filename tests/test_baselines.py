"""The training-free baselines (issue 5): "vispruner", "fastv", "random", "attention_topk".

Each method's kept sets are compared with a slow reference written here from the method's description (plain
Python loops and sorts over the stock model's eager `output_attentions`), on a left-padded batch of 3; then
every method goes through the pruning contract of test_contract.py (discard == mask, cache == recompute,
batch == single, sdpa == eager).
"""

import pytest
import torch
from conftest import (
    IMAGE_TOKEN, NUM_VISUAL, allowed_keys, at_positions, make_batch, make_model, masked_reference, prompt_states,
    row_inputs, stock_copy, tiny_config,
)

from configuration_rcp_llava import RcpLlavaConfig
from modeling_rcp_llava import (
    RcpLlavaForConditionalGeneration, random_point_scores, vispruner_cls_attention, vispruner_keep_mask,
)

PADDED = [(2, 3, True), (5, 6, True), (1, 2, True)]

METHODS = {
    "vispruner": dict(pruning_method="vispruner", pruning_layers=None, repair_layers=None, pruning_keep_counts=None,
                      pre_llm_keep_count=6),
    "random-pre-llm": dict(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                           pre_llm_keep_count=5, pruning_seed=3),
    "random-layers": dict(pruning_method="random", pruning_layers=[1, 3], repair_layers=[],
                          pruning_keep_counts=[9, 4], pruning_seed=7),
    "fastv": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[], pruning_keep_counts=[6]),
    "fastv-question": dict(pruning_method="fastv", pruning_layers=[2], repair_layers=[], pruning_keep_counts=[6],
                           fastv_query="question"),
    "attention_topk": dict(pruning_method="attention_topk", pruning_layers=[1, 2], repair_layers=[],
                           pruning_keep_counts=[10, 5]),
}


def with_positions(batch):
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)}


def top(scores, candidates, k):
    """The k candidates with the highest score, ties to the lower index: a plain Python sort."""
    return set(sorted(candidates, key=lambda i: (-float(scores[i]), i))[:k])


def as_sets(keep_masks, p):
    return [set(keep_masks[b, p].nonzero().flatten().tolist()) for b in range(keep_masks.shape[0])]


def eager_stock(model):
    stock = stock_copy(model)
    for cfg in (stock.config, stock.config.text_config, stock.config.vision_config):
        cfg._attn_implementation = "eager"
    return stock


# 1. VisPruner ----------------------------------------------------------------------------------


def reference_vispruner(attention, features, budget, ratio):
    """VisPruner from its description, one image: attention (N,), features (N, c) -> kept raster indices."""
    n = len(attention)
    if budget >= n:
        return set(range(n))
    important = int(budget * ratio)
    order = sorted(range(n), key=lambda i: (-float(attention[i]), i))
    kept, residual = order[:important], order[important:]
    diverse = budget - important
    feats = [f.double() / f.double().norm() for f in features]
    while len(residual) > diverse:
        first, second = residual[0::2], residual[1::2]
        drop = min(8, len(residual) - diverse, len(first))
        if not second:  # a single token left: nothing to compare it with, it goes
            residual = first[drop:]
            continue
        best = [max(float(feats[i] @ feats[j]) for j in second) for i in first]
        ranked = sorted(range(len(first)), key=lambda j: (-best[j], j))
        residual = [first[j] for j in ranked[drop:]] + second
    return set(kept) | set(residual)


@pytest.mark.parametrize(
    "n, budget, ratio",
    [
        (16, 6, 0.5),
        (16, 5, 0.5),  # 14 residual -> 7 (odd), then more to drop than the first half holds
        (15, 4, 0.5),  # odd N
        (16, 5, 0.0),  # no important token
        (16, 5, 1.0),  # no diverse token: the residual shrinks to a single token, which goes too
        (16, 1, 0.0),
        (16, 0, 0.5),
        (16, 16, 0.5),  # budget == N: no pruning
        (16, 40, 0.5),  # budget > N: no pruning
        (40, 9, 0.3),  # several rounds of 8
    ],
)
def test_vispruner_selection_equals_reference(n, budget, ratio):
    g = torch.Generator().manual_seed(n * 100 + budget)
    attention = torch.rand(3, n, generator=g)
    features = torch.randn(3, n, 8, generator=g)
    keep = vispruner_keep_mask(attention, features, budget, ratio)
    for b in range(3):
        expected = reference_vispruner(attention[b], features[b], budget, ratio)
        assert set(keep[b].nonzero().flatten().tolist()) == expected
        assert len(expected) == min(budget, n)


def test_vispruner_attention_ties_keep_the_lower_index():
    attention = torch.ones(1, 16)
    features = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    keep = vispruner_keep_mask(attention, features, 8, 1.0)
    assert keep[0].nonzero().flatten().tolist() == list(range(8))


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_vispruner_cls_attention_equals_eager_output_attentions(feature_layer):
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                              image_size=16, patch_size=4)
    model = make_model(vision_config=vision.to_dict(), **METHODS["vispruner"])
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    pixels = make_batch(PADDED)["pixel_values"]
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
        ours = vispruner_cls_attention(tower, out.hidden_states, feature_layer)
    layer = feature_layer % 4 - 1  # hidden_states[f] is the output of layer f - 1
    eager = out.attentions[layer][:, :, 0, 1:].mean(1)  # [CLS] row, patch columns, mean over heads
    assert ours.shape == (3, NUM_VISUAL)
    assert (ours - eager).abs().max() <= 1e-5


def test_vispruner_model_kept_sets_equal_reference_on_padded_batch():
    model = make_model(**{**METHODS["vispruner"], "pre_llm_keep_count": 7, "vispruner_important_ratio": 0.4})
    stock = eager_stock(model)
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
        vis = stock.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    attention = vis.attentions[-2][:, :, 0, 1:].mean(1)  # the layer producing hidden_states[-2]
    features = vis.hidden_states[-2][:, 1:]
    assert model.last_pruning_info.pruning_layers == [0]
    assert out.kept_counts.tolist() == [[7]] * 3
    for b, kept in enumerate(as_sets(out.keep_masks, 0)):
        assert kept == reference_vispruner(attention[b], features[b], 7, 0.4)


def test_vispruner_full_budget_equals_stock():
    model = make_model(**{**METHODS["vispruner"], "pre_llm_keep_count": NUM_VISUAL})
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
        ref = stock_copy(model)(**batch).logits
    assert out.kept_counts.tolist() == [[NUM_VISUAL]] * 3
    valid = out.token_positions >= 0
    theirs = at_positions(ref, out.token_positions)
    assert (out.logits - theirs)[valid].abs().max() <= 1e-5


# 2. FastV --------------------------------------------------------------------------------------


def question_positions(batch):
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    positions = torch.arange(ids.shape[1])
    last_image = torch.where(ids == IMAGE_TOKEN, positions, -1).max(1).values
    return (positions > last_image.unsqueeze(1)) & mask


@pytest.mark.parametrize("query", ["last", "question"])
def test_fastv_kept_sets_equal_reference_on_padded_batch(query):
    model = make_model(**{**METHODS["fastv"], "fastv_query": query})
    batch = with_positions(make_batch(PADDED))
    with torch.no_grad():
        out = model(**batch)
        attentions = eager_stock(model)(**batch, output_attentions=True).attentions
    k_layer = 2
    question = question_positions(batch)
    for b in range(3):
        attn = attentions[k_layer - 1][b].mean(0)  # (T, T), layer K-1, mean over heads
        image_pos = (batch["input_ids"][b] == IMAGE_TOKEN).nonzero().flatten().tolist()
        rows = [attn.shape[0] - 1] if query == "last" else question[b].nonzero().flatten().tolist()
        scores = [sum(float(attn[r, pos]) for r in rows) / len(rows) for pos in image_pos]
        assert as_sets(out.keep_masks, 0)[b] == top(scores, range(NUM_VISUAL), 6)


# 3. Attention top-k ----------------------------------------------------------------------------


def reference_attention_topk(model, batch, layers, counts):
    """A full-length eager forward; dropped visual tokens are masked out as keys from their drop layer on; at
    each pruning layer the alive visual tokens are ranked by the question rows' eager attention (mean over heads
    and question tokens). Returns the kept set per pruning layer and row."""
    lm = model.model.language_model
    h, image, cos_sin = prompt_states(model, batch)
    bsz, seq = batch["input_ids"].shape
    question = question_positions(batch)
    alive = batch["attention_mask"].bool().clone()
    kept = []
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        for idx, layer in enumerate(lm.layers):
            allowed = allowed_keys(alive)
            additive = torch.zeros(bsz, 1, seq, seq).masked_fill(~allowed.unsqueeze(1), torch.finfo(h.dtype).min)
            if idx in layers:
                _, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=cos_sin,
                                             attention_mask=additive)
                count = counts[layers.index(idx)]
                per_row = []
                for b in range(bsz):
                    image_pos = image[b].nonzero().flatten().tolist()
                    rows = question[b].nonzero().flatten().tolist()
                    attn = weights[b].mean(0)
                    scores = [sum(float(attn[r, pos]) for r in rows) / len(rows) for pos in image_pos]
                    candidates = [i for i, pos in enumerate(image_pos) if alive[b, pos]]
                    chosen = top(scores, candidates, count)
                    per_row.append(chosen)
                    for i, pos in enumerate(image_pos):
                        alive[b, pos] &= i in chosen
                kept.append(per_row)
                allowed = allowed_keys(alive)
                additive = torch.zeros(bsz, 1, seq, seq).masked_fill(~allowed.unsqueeze(1), torch.finfo(h.dtype).min)
            h = layer(h, attention_mask=additive, position_embeddings=cos_sin)
    finally:
        lm.config._attn_implementation = old
    return kept


def test_attention_topk_kept_sets_equal_reference_on_padded_batch():
    cfg = METHODS["attention_topk"]
    model = make_model(**cfg)
    batch = with_positions(make_batch(PADDED))
    with torch.no_grad():
        out = model(**batch)
        expected = reference_attention_topk(model, batch, cfg["pruning_layers"], cfg["pruning_keep_counts"])
    for p in range(2):
        assert as_sets(out.keep_masks, p) == expected[p]
    assert (out.keep_masks[:, 1] <= out.keep_masks[:, 0]).all()  # cumulative
    assert out.kept_counts.tolist() == [[10, 5]] * 3


# 4. Random -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random-pre-llm", "random-layers"])
def test_random_kept_sets_equal_reference_on_padded_batch(name):
    cfg = METHODS[name]
    model = make_model(**cfg)
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
    points = model.config.pruning_points
    counts = model.config.point_keep_counts
    # The documented draw: torch.rand(points, N) from a CPU generator seeded with `pruning_seed`.
    scores = torch.rand(len(points), NUM_VISUAL, generator=torch.Generator().manual_seed(cfg["pruning_seed"]),
                        dtype=torch.float64)
    for b in range(3):
        alive = set(range(NUM_VISUAL))
        for p, count in enumerate(counts):
            alive = top(scores[p], sorted(alive), count)
            assert as_sets(out.keep_masks, p)[b] == alive
    assert model.last_pruning_info.pruning_layers == points


def test_random_subsets_are_uniform_and_seeded():
    k, n, draws = 4, NUM_VISUAL, 2000
    hits = torch.zeros(n)
    for seed in range(draws):
        scores = random_point_scores(seed, 1, n)[0]
        hits[torch.topk(scores, k).indices] += 1
    freq = hits / draws
    assert (freq - k / n).abs().max() < 0.05  # each token kept with probability k/N
    assert torch.equal(random_point_scores(5, 2, n), random_point_scores(5, 2, n))
    assert not torch.equal(random_point_scores(5, 1, n), random_point_scores(6, 1, n))


def test_random_scores_are_drawn_and_moved_once_per_seed_and_device(monkeypatch):
    """A forward copies nothing to the device: a blocking copy per pruning point was a host sync on a GPU (PyTorch's
    CUDA sync debug mode, tests/test_cuda.py). Another seed draws again, with the same kept sets as a fresh draw."""
    import modeling_rcp_llava

    drawn = []
    draw = modeling_rcp_llava.random_point_scores
    monkeypatch.setattr(modeling_rcp_llava, "random_point_scores", lambda *a: drawn.append(a) or draw(*a))
    modeling_rcp_llava._random_point_scores_on.cache_clear()
    batch = make_batch([(3, 5, True), (1, 3, True)])
    model = make_model(pruning_method="random", pruning_layers=[1, 2], pruning_keep_counts=[10, 5])
    with torch.no_grad():
        first, second = model(**batch).keep_masks, model(**batch).keep_masks
        model.config.pruning_seed += 1
        other = model(**batch).keep_masks
        modeling_rcp_llava._random_point_scores_on.cache_clear()
        fresh = model(**batch).keep_masks
    seed = model.config.pruning_seed
    assert drawn == [(seed - 1, 2, NUM_VISUAL), (seed, 2, NUM_VISUAL), (seed, 2, NUM_VISUAL)]
    assert torch.equal(first, second) and not torch.equal(first, other) and torch.equal(other, fresh)


# 5. The contract, for every method ------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_discard_equals_mask(name):
    model = make_model(**METHODS[name])
    batch = with_positions(make_batch(PADDED))
    with torch.no_grad():
        out = model(**batch)
        ref = masked_reference(model, batch, out.keep_masks)
    valid = out.token_positions >= 0
    theirs = at_positions(ref, out.token_positions)
    assert (out.logits - theirs)[valid].abs().max() <= 1e-4
    # Physical discard: the output holds only the surviving tokens.
    kept = out.kept_counts[:, -1]
    assert torch.equal(valid.sum(1), batch["attention_mask"].sum(1) - NUM_VISUAL + kept)


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_with_cache_equals_recompute(name):
    model = make_model(**METHODS[name])
    batch = make_batch(PADDED)
    steps = 4
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    info = model.last_pruning_info
    bsz, prompt_len = batch["input_ids"].shape
    for step in range(steps):
        length = prompt_len + step
        mask = torch.cat([batch["attention_mask"], torch.ones(bsz, step, dtype=torch.long)], 1)
        with torch.no_grad():
            out = model(input_ids=gen.sequences[:, :length], pixel_values=batch["pixel_values"], attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=False,
                        visual_keep_masks=info.keep_masks)
        assert (out.logits[:, -1] - gen.logits[step]).abs().max() <= 1e-4
        no_eos = out.logits[:, -1].clone()
        no_eos[:, model.config.text_config.eos_token_id] = float("-inf")  # min_new_tokens forbids EOS
        assert torch.equal(no_eos.argmax(-1), gen.sequences[:, length])
    # Layer 0's cache holds only the kept tokens after a pre-LLM prune.
    layer0 = gen.past_key_values.layers[0].keys.shape[-2]
    dropped = NUM_VISUAL - info.kept_counts[:, 0] if 0 in info.pruning_layers else torch.zeros(bsz, dtype=torch.long)
    assert layer0 == int((batch["attention_mask"].sum(1) - dropped).max()) + steps - 1


@pytest.mark.parametrize("name", list(METHODS))
def test_left_padded_batch_equals_single_runs(name):
    model = make_model(**METHODS[name])
    batch = make_batch(PADDED)
    with torch.no_grad():
        out = model(**batch)
        gen = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for i in range(3):
            single = row_inputs(batch, i, PADDED)
            ref = model(**single)
            for p in range(len(out.kept_indices)):
                assert torch.equal(out.kept_indices[p][i], ref.kept_indices[p][0])
            valid = out.token_positions[i] >= 0
            assert (out.logits[i][valid] - ref.logits[0]).abs().max() <= 1e-4
            single_gen = model.generate(**single, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            assert torch.equal(gen[i, -4:], single_gen[0, -4:])


@pytest.mark.parametrize("name", list(METHODS))
def test_sdpa_equals_eager(name):
    sdpa = make_model(**METHODS[name])
    eager = make_model(attn_implementation="eager", **METHODS[name])
    for cfg in (eager.config.text_config, eager.config.vision_config):
        cfg._attn_implementation = "eager"
    batch = make_batch(PADDED)
    with torch.no_grad():
        a, b = sdpa(**batch), eager(**batch)
    assert torch.equal(a.keep_masks, b.keep_masks)
    valid = a.token_positions >= 0  # padding rows differ (sdpa zeroes fully-masked rows)
    assert (a.logits - b.logits)[valid].abs().max() <= 1e-4


def test_decode_without_position_ids_after_pre_llm_prune():
    """A hand-written decode loop (no position_ids): positions continue from the prompt length, not from layer
    0's shorter cache."""
    model = make_model(**METHODS["vispruner"])
    batch = make_batch([(3, 4, True)])
    with torch.no_grad():
        first = model(**batch, use_cache=True)
        layer0 = first.past_key_values.layers[0].keys.shape[-2]
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, past_key_values=first.past_key_values, use_cache=True)
        ids = torch.cat([batch["input_ids"], nxt], 1)
        ref = model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False,
                    visual_keep_masks=first.keep_masks)
    assert layer0 == batch["input_ids"].shape[1] - NUM_VISUAL + 6
    assert (step.logits[:, -1] - ref.logits[:, -1]).abs().max() <= 1e-4


def test_pruning_info_is_filled_like_rcp():
    model = make_model(**METHODS["fastv"])
    batch = make_batch([(2, 3, True), (4, 5, False)])
    with torch.no_grad():
        model(**batch)
    info = model.last_pruning_info
    assert info.pruning_layers == [2] and info.keep_masks.shape == (2, 1, NUM_VISUAL)
    assert info.kept_counts.tolist() == [[6], [0]] and info.has_image.tolist() == [True, False]
    assert len(info.kept_indices) == 1 and info.kept_indices[0][0].tolist() == sorted(info.kept_indices[0][0].tolist())


# 6. Config: loadable from config.json alone; bad input ---------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_loads_from_config_json_alone(name, tmp_path):
    model = make_model(**METHODS[name])
    model.save_pretrained(tmp_path)
    loaded = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    for field in ("pruning_method", "pruning_layers", "pruning_keep_counts", "pre_llm_keep_count",
                  "vispruner_important_ratio", "fastv_query", "pruning_seed"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert len(loaded.model.rcp_plugins.pruners) == 0 and not loaded.plugin_state_dict()
    config = RcpLlavaConfig.from_pretrained(tmp_path)
    assert config.pruning_points == model.config.pruning_points
    batch = make_batch(PADDED)
    with torch.no_grad():
        assert torch.equal(model(**batch).keep_masks, loaded(**batch).keep_masks)


def test_defaults_per_method():
    assert tiny_config(pruning_method="vispruner", pruning_layers=None, repair_layers=None, pruning_keep_counts=None,
                       pre_llm_keep_count=4).pruning_points == [0]
    fastv = tiny_config(pruning_method="fastv", pruning_layers=None, repair_layers=None, pruning_keep_counts=[4])
    # FastV's K = 2 (FastV paper), 1 on a shallow (<= 8 layers) model such as this 4-layer one.
    assert fastv.pruning_layers == [1] and fastv.repair_layers == [] and fastv.fastv_query == "last"
    assert fastv.pruned_average_tokens() == (16 * 1 + 4 * 3) / 4


VIS = dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({**VIS}, ValueError, r"needs `pre_llm_keep_count`"),
        ({**VIS, "pre_llm_keep_count": 17}, ValueError, r"`pre_llm_keep_count` is 17.*\[0, 16\]"),
        ({**VIS, "pre_llm_keep_count": -1}, ValueError, r"`pre_llm_keep_count` is -1"),
        ({**VIS, "pre_llm_keep_count": 2.5}, TypeError, r"`pre_llm_keep_count` must be an int"),
        ({**VIS, "pre_llm_keep_count": 4, "pruning_layers": [1], "pruning_keep_counts": [4]}, ValueError,
         r"prunes only before the LLM; set `pruning_layers=\[\]`"),
        ({**VIS, "pre_llm_keep_count": 4, "vispruner_important_ratio": 1.5}, ValueError,
         r"`vispruner_important_ratio` must be a number in \[0, 1\]"),
        ({**VIS, "pre_llm_keep_count": 4, "vision_feature_select_strategy": "full"}, ValueError,
         r"vision_feature_select_strategy='default'"),
        ({**VIS, "pre_llm_keep_count": 4, "vision_feature_layer": [-2, -1]}, ValueError,
         r"one vision feature layer"),
        ({"pruning_method": "fastv", "pruning_layers": [1, 2], "repair_layers": []}, ValueError,
         r"`pruning_layers` must hold one layer"),
        ({"pruning_method": "fastv", "pruning_layers": [2], "repair_layers": [], "pruning_keep_counts": None},
         ValueError, r"`pruning_keep_counts` is None, but `pruning_method='fastv'`"),
        ({"pruning_method": "fastv", "pruning_layers": [2], "repair_layers": [], "pruning_keep_counts": [17]},
         ValueError, r"more than the 16 visual tokens"),
        ({"pruning_method": "fastv", "pruning_layers": [0], "repair_layers": [], "pruning_keep_counts": [4]},
         ValueError, r"`pruning_layers` contains 0"),
        ({"pruning_method": "fastv", "pruning_layers": [2], "repair_layers": [], "pruning_keep_counts": [4],
          "fastv_query": "first"}, ValueError, r"`fastv_query` is 'first'"),
        ({"pruning_method": "random", "pruning_layers": [], "repair_layers": [], "pruning_keep_counts": None},
         ValueError, r"`pruning_method='random'` needs `pre_llm_keep_count`"),
        ({"pruning_method": "random", "pre_llm_keep_count": 4, "repair_layers": []}, ValueError,
         r"not both"),
        ({"pruning_method": "attention_topk", "pruning_layers": [], "repair_layers": [],
          "pruning_keep_counts": None}, ValueError, r"`pruning_layers` is empty"),
        ({"pruning_method": "attention_topk", "repair_layers": [], "pruning_keep_counts": [10, 12]}, ValueError,
         r"must be non-increasing"),
        ({"pruning_method": "rcp", "pre_llm_keep_count": 4}, ValueError,
         r"`pre_llm_keep_count` is 4, but `pruning_method='rcp'` does not prune before the LLM"),
    ],
)
def test_bad_baseline_config_fields(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_bad_inputs_at_run_time():
    model = make_model(**METHODS["random-pre-llm"])
    batch = make_batch(PADDED)
    with pytest.raises(ValueError, match=r"`visual_keep_masks` has shape \(3, 2, 16\), expected \(3, 1, 16\)"):
        model(**batch, visual_keep_masks=torch.ones(3, 2, NUM_VISUAL, dtype=torch.bool))
    with model.pruning_layout("mask"), pytest.raises(ValueError,
                                                     match=r"'mask'.*`pruning_method='random'` has none.*model.eval"):
        model(**batch)
    right = {k: v.flip(1) if k != "pixel_values" else v for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"Right padding is not supported"):
        model.generate(**right, max_new_tokens=2)


def test_vispruner_reads_each_rows_own_image_after_a_text_only_row():
    """A text-only row first: row i's image is the number of image rows before it (a cumulative count), so every
    image row keeps what its own single run keeps -- an index clamped to the image count gave row 1 row 2's set."""
    specs = [(2, 3, False), (2, 3, True), (3, 4, True)]
    model = make_model(**METHODS["vispruner"])
    batch = make_batch(specs)
    with torch.no_grad():
        kept = model(**batch).keep_masks[:, 0]  # (B, N)
        for i in (1, 2):
            assert torch.equal(kept[i], model(**row_inputs(batch, i, specs)).keep_masks[0, 0]), i
    assert not torch.equal(kept[1], kept[2])
    assert not kept[0].any()


def test_fastv_reads_the_last_prompt_token_not_a_labelled_answer():
    """With a labelled continuation (a log-likelihood), FastV's query is the last prompt token before the answer:
    the tokens it keeps are those of the prompt alone, not those the last answer token would pick."""
    model = make_model(**METHODS["fastv"])
    batch = make_batch([(2, 5, True)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]  # the last 3 tokens are the answer
    prompt = {k: v if k == "pixel_values" else v[:, :-3] for k, v in batch.items()}
    with torch.no_grad():
        with_answer = model(**batch, labels=labels).keep_masks
        alone = model(**prompt).keep_masks
        unlabelled = model(**batch).keep_masks  # no labels: the last token is the prompt's end
    assert torch.equal(with_answer, alone)
    assert not torch.equal(unlabelled, alone)  # the choice of query row matters on this input


def test_fastv_on_a_caption_labelled_after_the_image_reads_the_last_image_token():
    """A caption labelled right after the image leaves no unlabelled text after it: FastV's query fell back to the
    last valid token, a caption token, so the caption chose the tokens that predict it (four captions kept four
    sets). The prompt ends on the image there: the query is the last image token, its layer K-1 eager attention
    gives the kept set, and every caption keeps that set."""
    model = make_model(**METHODS["fastv"])
    batch = make_batch([(2, 4, True)])
    ids = batch["input_ids"]
    image = ids == IMAGE_TOKEN
    last_image = int(image[0].nonzero().max())
    with torch.no_grad():
        attention = eager_stock(model)(**batch, output_attentions=True).attentions[1][0].mean(0)  # layer K-1 = 1
        kept = []
        for seed in range(4):
            caption = ids.clone()
            caption[:, last_image + 1:] = torch.randint(3, 90, (1, 4), generator=torch.Generator().manual_seed(seed))
            labels = torch.where(torch.arange(ids.shape[1]) > last_image, caption, -100)
            kept.append(as_sets(model(**{**batch, "input_ids": caption}, labels=labels).keep_masks, 0)[0])
    image_pos = image[0].nonzero().flatten().tolist()
    expected = top([float(attention[last_image, pos]) for pos in image_pos], range(NUM_VISUAL), 6)
    assert kept == [expected] * 4


def test_vispruner_at_the_embeddings_layer_is_refused_by_name():
    """`vision_feature_layer=0` selects the tower's embeddings, which no attention layer produced: refused naming
    the field, not a TypeError from inside the tower's norm."""
    model = make_model(**METHODS["vispruner"], vision_feature_layer=0)
    with pytest.raises(ValueError, match=r"`pruning_method='vispruner'` needs the attention of the vision layer that "
                                         r"produces the features, but `vision_feature_layer=0` selects the embeddings "
                                         r"of a 2-layer vision tower\."):
        model(**make_batch([(2, 3, True)]))
