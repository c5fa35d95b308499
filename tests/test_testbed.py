"""Fast tests of the synthetic-VQA testbed (`rcp_llava.testbed`): generator, text side, pruning eval, micro build."""

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rcp_llava.testbed import (
    FAMILIES,
    PRESETS,
    STAGES,
    build_dataset,
    build_processor,
    build_testbed,
    default_cache_dir,
    evaluate_accuracy,
    generate_scene,
    make_sample,
    oracle_keep,
    prompt_messages,
    pruned_inputs,
    random_keep,
    saliency_keep,
)
from rcp_llava.testbed.scenes import COLOURS, COUNT_WORDS, PLURALS



@pytest.fixture(scope="module")
def micro_test_rows():
    """micro's test split (seed 0) as a list of row dicts, built once for the tests that only read it."""
    return [dict(r) for r in build_dataset("micro", seed=0)["test"]]
TINY = PRESETS["tiny"]


def _samples(preset=TINY, n=40, split="test"):
    return [make_sample(preset, 0, split, i, FAMILIES, num_questions=5) for i in range(n)]


def test_generator_is_deterministic():
    for i in range(5):
        (s1, q1), (s2, q2) = make_sample(TINY, 7, "train", i), make_sample(TINY, 7, "train", i)
        assert np.array_equal(np.asarray(s1.image), np.asarray(s2.image))
        assert q1 == q2
    s3, _ = make_sample(TINY, 8, "train", 0)
    assert not np.array_equal(np.asarray(make_sample(TINY, 7, "train", 0)[0].image), np.asarray(s3.image))


def test_scene_density_and_layout():
    for scene, _ in _samples(n=30):
        assert TINY.min_objects <= len(scene.objects) <= TINY.max_objects
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        n_object = sum(len(o.patches) for o in scene.objects)
        assert n_object > TINY.budget(1 / 9), "scenes must hold more object patches than the 1/9 budget"


def _expected_answer(scene, q):
    """Re-derive the answer of a question from the scene's object list."""
    objs, text = scene.objects, q["question"]

    def match(ref):
        words = ref.split()
        return [o for o in objs if all(w in (o.colour, o.shape, o.size, "object") for w in words)]

    if m := re.fullmatch(r"what colour is the (.+)\?", text):
        (o,) = match(m[1])
        return o.colour
    if m := re.fullmatch(r"what size is the (.+)\?", text):
        (o,) = match(m[1])
        return o.size
    if m := re.fullmatch(r"what shape is the (.+)\?", text):
        (o,) = match(m[1])
        return o.shape
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", text):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"how many (\w+) objects are there\?", text):
        return COUNT_WORDS[sum(o.colour == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+) are there\?", text):
        shape = {v: k for k, v in PLURALS.items()}[m[1]]
        return COUNT_WORDS[sum(o.shape == shape for o in objs)]
    if m := re.fullmatch(r"where is the (.+)\?", text):
        (o,) = match(m[1])
        return o.quadrant
    raise AssertionError(f"unparsed question {text!r}")


def test_answers_consistent_with_scene():
    seen = set()
    for scene, questions in _samples(n=60):
        for q in questions:
            assert _expected_answer(scene, q) == q["answer"], q
            assert len(q["answer"].split()) == 1
            seen.add(q["family"])
            if q["family"] == "existence":
                assert (q["answer"] == "no") == bool(q["negative_type"])
    assert seen == set(FAMILIES)


def test_training_only_conjunction_questions_are_consistent_and_never_in_a_split():
    """`conjunction` asks the two-word referents the deep decoder missed (size of a colour + shape, colour of a
    size + shape), half each; its answers follow from the scene like every family's, and no saved split has it."""
    from rcp_llava.testbed.scenes import TRAINING_FAMILIES

    assert TRAINING_FAMILIES == ("conjunction",) and not set(TRAINING_FAMILIES) & set(FAMILIES)
    forms = {"size": 0, "colour": 0}
    for i in range(200):
        scene, (q,) = make_sample(TINY, 0, "stream", i, ("conjunction",))
        assert _expected_answer(scene, q) == q["answer"], q
        (target,) = [o for o in scene.objects if sorted(o.patches) == q["evidence_patches"]]
        m = re.fullmatch(r"what (size|colour) is the (\w+) (\w+)\?", q["question"])
        assert m and m[3] == target.shape and m[2] == (target.colour if m[1] == "size" else target.size), q
        forms[m[1]] += 1
    assert 70 <= forms["colour"] <= 115 and forms["size"] >= 85  # ~half each (colour when size + shape is unique)
    with pytest.raises(ValueError, match=r"Unknown question family 'size'.*'conjunction'"):
        make_sample(TINY, 0, "stream", 0, ("size",))


@pytest.mark.parametrize("name", ["tiny", "micro"])  # micro's small triangles have 1-pixel patches
def test_evidence_patches_match_drawn_objects(name):
    preset = PRESETS[name]
    g, p = preset.grid_size, preset.patch_size
    for scene, questions in _samples(preset, n=20):
        x = np.asarray(scene.image, dtype=np.float32) / 255
        patches = x.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p, 3)  # (N, p*p, 3)
        all_object = set()
        for o in scene.objects:
            rgb = np.array(COLOURS[o.colour]) / 255
            for i in o.patches:
                close = np.abs(patches[i] - rgb).max(-1) < 0.2  # pixels painted in the object's colour
                assert close.sum() >= 3, (o, i)
                r, c = divmod(i, g)
                assert o.row <= r < o.row + preset.object_cells and o.col <= c < o.col + preset.object_cells
            all_object |= set(o.patches)
        # no other patch holds an object colour
        for i in set(range(g * g)) - all_object:
            for rgb in COLOURS.values():
                assert (np.abs(patches[i] - np.array(rgb) / 255).max(-1) < 0.2).sum() < 3
        for q in questions:
            assert set(q["evidence_patches"]) <= all_object
            if q["family"] in ("attribute", "identity", "position") or q["answer"] == "yes":
                assert q["evidence_patches"], q


def _quadrant(row, col, g):
    """The quadrant of grid cell (row, col) by its name: rows count from the top, columns from the left."""
    return f"{'top' if row < g // 2 else 'bottom'}-{'left' if col < g // 2 else 'right'}"


def test_scene_layout_and_patch_labels_follow_the_grid():
    """What the scene docstring promises, checked against the grid itself (the answer check above reads the objects'
    own `quadrant`, so a transposed quadrant passed it): each object's block lies in one quadrant, which names it
    ("where is ...?" answered bottom-left for an object at row 3, column 8 of 12); blocks keep an empty cell between
    them (they touched in 865 pairs of 400 scenes without the margin); the patch labels' quadrant and part (2 x 2
    blocks: 1 2 / 3 4) follow rows and columns; the dataset record keeps every patch of an object."""
    from rcp_llava.testbed.scenes import QUADRANTS, scene_record

    g, k = TINY.grid_size, TINY.object_cells
    for scene, _ in _samples(n=100):
        labels = scene.patch_labels
        assert [QUADRANTS[q] for q in labels["quadrant"]] == [_quadrant(*divmod(i, g), g) for i in range(g * g)]
        for o in scene.objects:
            assert _quadrant(o.row, o.col, g) == _quadrant(o.row + k - 1, o.col + k - 1, g) == o.quadrant, o
            for dr in range(k):
                for dc in range(k):
                    assert labels["part"][(o.row + dr) * g + o.col + dc] == 1 + dr * k + dc
        for a, b in ((a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:]):
            assert abs(a.row - b.row) > k or abs(a.col - b.col) > k, (a, b)  # an empty cell between blocks
        assert [o["patches"] for o in scene_record(scene)["objects"]] == [o.patches for o in scene.objects]


def test_splits_draw_different_scenes_and_the_noise_is_the_presets():
    """A split's scene `index` is drawn from (seed, split, index): without the split, test scene i was train scene i
    (the test set was the training set). The noise is `noise_std` (the recipe records it): the same scene drawn
    without noise differs by that standard deviation (x3 went unnoticed)."""
    import dataclasses

    train, test = (np.asarray(make_sample(TINY, 0, split, 3)[0].image) for split in ("train", "test"))
    assert not np.array_equal(train, test)
    quiet = dataclasses.replace(TINY, noise_std=0.0)
    for i in range(3):
        noisy, clean = (np.asarray(make_sample(preset, 0, "test", i)[0].image, dtype=np.float64) / 255
                        for preset in (TINY, quiet))
        assert 0.85 * TINY.noise_std < (noisy - clean).std() < 1.15 * TINY.noise_std


def test_questions_follow_their_rules_and_mix():
    """Per-family rules the answer check cannot see, over 400 scenes x 5 questions: an attribute question never names
    its answer ("what colour is the white triangle?"); most referents of colour and identity questions are one word
    (a reversed key order made every identity referent two words); colour questions are about 2/3 of the attribute
    family (its 0.7 draw); every count word occurs (zero and three were never drawn under off-by-one mutations); all
    three POPE negative types occur,
    popular ones are among the 3 likeliest absent pairs, adversarial ones pair a present colour with a present shape
    on different objects; evidence is every object sharing the negative's colour or shape (existence), the counted
    objects (counting)."""
    from rcp_llava.testbed.scenes import COLOUR_PRIOR, SHAPE_PRIOR, SHAPES

    counts, negatives, colour_of, one_word = {}, {}, 0, {"attribute": 0, "identity": 0}
    attribute = identity = 0
    for scene, questions in _samples(n=400):
        objs = scene.objects
        for q in questions:
            text, family = q["question"], q["family"]
            if family == "attribute":
                attribute += 1
                assert q["answer"] not in text.split()[3:], q
                colour_of += text.startswith("what colour")
                one_word["attribute"] += len(text.split()) == 5
            elif family == "identity":
                identity += 1
                one_word["identity"] += len(text.split()) == 6
            elif family == "counting":
                counts[q["answer"]] = counts.get(q["answer"], 0) + 1
                m = re.fullmatch(r"how many (\w+) (?:objects )?are there\?", text)
                value = {v: k for k, v in PLURALS.items()}.get(m[1], m[1])
                assert q["evidence_patches"] == sorted(i for o in objs if value in (o.colour, o.shape)
                                                       for i in o.patches), q
            elif family == "existence" and q["answer"] == "no":
                kind = q["negative_type"]
                negatives[kind] = negatives.get(kind, 0) + 1
                colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", text).groups()
                assert q["evidence_patches"] == sorted(i for o in objs if o.colour == colour or o.shape == shape
                                                       for i in o.patches), q
                present = {(o.colour, o.shape) for o in objs}
                absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
                if kind == "popular":
                    weight = {(c, s): COLOUR_PRIOR[list(COLOURS).index(c)] * SHAPE_PRIOR[SHAPES.index(s)]
                              for c, s in absent}
                    assert sorted(weight.values(), reverse=True).index(weight[colour, shape]) < 3, q
                if kind == "adversarial":
                    assert any(o.colour == colour for o in objs) and any(o.shape == shape for o in objs), q
    assert set(counts) == set(COUNT_WORDS) and min(counts.values()) >= 20, counts
    assert set(negatives) == {"random", "popular", "adversarial"} and min(negatives.values()) >= 30, negatives
    assert 0.55 < colour_of / attribute < 0.8, (colour_of, attribute)
    assert one_word["attribute"] > colour_of / 2 and one_word["identity"] > identity / 2, one_word  # of their form


@pytest.mark.parametrize("name", ["micro", "tiny", "deep", "paper"])
def test_processor_image_token_count(name):
    preset = PRESETS[name]
    processor = build_processor(preset)
    scene = generate_scene(np.random.default_rng(0), preset, num_objects=2)
    prompt = processor.apply_chat_template(prompt_messages("where is the red circle?"), add_generation_prompt=True)
    batch = processor(text=[prompt], images=[scene.image], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == preset.num_visual_tokens
    assert batch["pixel_values"].shape[-1] == preset.image_size
    assert processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    assert default_cache_dir("tiny") == tmp_path / "testbed" / "tiny"
    monkeypatch.delenv("RCP_LLAVA_CACHE")  # was ignored: always ~/.cache
    assert default_cache_dir("tiny") == tmp_path / "hf" / "rcp_llava" / "testbed" / "tiny"
    monkeypatch.delenv("HF_HOME")
    assert default_cache_dir("deep") == tmp_path / "xdg" / "rcp_llava" / "testbed" / "deep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir("tiny") == tmp_path / "home" / ".cache" / "rcp_llava" / "testbed" / "tiny"


@pytest.fixture(scope="module")
def micro_testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro_testbed")
    build_testbed("micro", out, seed=0, command="pytest")
    return out


def test_full_stage_thins_background_never_objects():
    from rcp_llava.testbed.train import SceneStream

    stream = SceneStream(TINY, 0, "full", 80, turns=2, thinned_share=0.5)
    thinned, background_rates = 0, []
    for i in range(80):
        item = stream[i]
        keep, on_object = item["keep"], item["patch_labels"]["colour"] > 0
        assert keep.dtype == bool and keep.shape == (TINY.num_visual_tokens,)
        assert keep[on_object].all()  # what the image shows, and so every answer, is unchanged
        if not keep.all():
            thinned += 1
            background_rates.append(keep[~on_object].mean())
    assert 22 <= thinned <= 58  # half of the images (binomial sd ~4.5)
    assert 0.15 < np.mean(background_rates) < 0.55  # E[u**2] = 1/3
    again = SceneStream(TINY, 0, "full", 80, turns=2, thinned_share=0.5)
    assert all(np.array_equal(again[i]["keep"], stream[i]["keep"]) for i in (0, 7, 31))
    assert "keep" not in SceneStream(TINY, 0, "full", 4)[0]  # thinned_share=0: whole images, plain forward
    with pytest.raises(ValueError, match="thinned_share.*1.5"):
        SceneStream(TINY, 0, "full", 4, thinned_share=1.5)


def test_full_stage_scene_density_override():
    from rcp_llava.testbed.train import SceneStream

    cells = TINY.object_cells**2

    def counts(stream):
        return [int((stream[i]["patch_labels"]["colour"] > 0).sum()) // cells for i in range(60)]

    default = counts(SceneStream(TINY, 0, "full", 60))
    assert min(default) >= TINY.min_objects and max(default) <= TINY.max_objects
    wide = counts(SceneStream(TINY, 0, "full", 60, min_objects=2))
    assert min(wide) >= 2 and max(wide) <= TINY.max_objects
    assert sum(n < TINY.min_objects for n in wide) >= 20  # 4 of the 7 counts lie below the preset's range
    with pytest.raises(ValueError, match=r"min_objects.*\[1, 8\].*got 9"):
        SceneStream(TINY, 0, "full", 4, min_objects=9)


def test_micro_build_writes_loadable_llava(micro_testbed):
    out = micro_testbed
    assert (out / "work" / "full" / "checkpoint-2").is_dir()  # Trainer checkpoints, resumable
    assert [p.name for p in sorted((out / "work").iterdir())] == sorted(STAGES)
    assert all((out / "work" / stage / "final" / "config.json").is_file() for stage in STAGES)
    model = LlavaForConditionalGeneration.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    assert model.config.image_seq_length == PRESETS["micro"].num_visual_tokens
    assert processor.chat_template
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["families"]) == set(FAMILIES)
    assert set(metrics["pruning"]) == {"random", "oracle", "saliency"}
    # the warm-up ran with the attention supervision (eager), the saved model carries no trace of it
    state = json.loads((out / "work" / "warmup" / "checkpoint-2" / "trainer_state.json").read_text())
    attention_losses = [row["attention_loss"] for row in state["log_history"] if "attention_loss" in row]
    assert attention_losses and all(0 < v < 50 for v in attention_losses)
    assert "attn_implementation" not in (out / "model" / "config.json").read_text()
    # the vision tower is frozen after its own stage (as LLaVA-1.5 keeps CLIP frozen); the projector is not
    from safetensors.torch import load_file

    after_vision = load_file(out / "work" / "vision" / "final" / "model.safetensors")
    final = load_file(out / "model" / "model.safetensors")
    tower = [k for k in final if "vision_tower" in k]
    assert tower and all(torch.equal(final[k], after_vision[k]) for k in tower)
    assert any(not torch.equal(final[k], after_vision[k]) for k in final if "multi_modal_projector" in k)
    mtime = (out / "model" / "model.safetensors").stat().st_mtime
    build_testbed("micro", out, seed=0, command="a later reuse")  # reuses everything
    assert (out / "model" / "model.safetensors").stat().st_mtime == mtime
    assert json.loads((out / "metrics.json").read_text())["command"] == "pytest"  # who built it, not who reused


def _test_prompts(folder, count):
    """The testbed's model and its first `count` test rows as one left-padded prompt batch."""
    from datasets import load_from_disk

    model = LlavaForConditionalGeneration.from_pretrained(folder / "model").eval()
    processor = AutoProcessor.from_pretrained(folder / "model")
    rows = [r for r in load_from_disk(str(folder / "dataset"))["test"]][:count]
    prompts = [processor.apply_chat_template(prompt_messages(r["question"]), add_generation_prompt=True)
               for r in rows]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=prompts, images=[r["image"] for r in rows], return_tensors="pt", padding=True)
    return model, rows, batch


def test_pruned_inputs_keep_all_matches_stock_forward(micro_testbed):
    model, rows, batch = _test_prompts(micro_testbed, 4)
    assert (batch["attention_mask"] == 0).any(), "the test needs left padding"
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = model(**batch, position_ids=position_ids).logits[:, -1]
        n = PRESETS["micro"].num_visual_tokens
        ours = model(**pruned_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     torch.ones(len(rows), n, dtype=torch.bool))).logits[:, -1]
        # dropping tokens changes the answer logits, keeps the sequence length bookkeeping right
        keep = oracle_keep(1 / 9)(rows)
        pruned = pruned_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], keep)
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert pruned["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] - n + int(keep.sum(-1).max())


def test_pruned_inputs_equal_stock_with_the_dropped_tokens_masked(micro_testbed):
    """The pruned layout (survivors' original positions, either padding side) against an independent reference: the
    stock forward of the whole prompt with the dropped image tokens hidden by its attention mask. The test above
    compares only keep-all (original positions equal compacted ones there) and the pruned length: positions counted
    from 0 in the short row, or right padding placed on the left, passed it (a mutation audit)."""
    model, rows, batch = _test_prompts(micro_testbed, 3)
    keep = oracle_keep(1 / 9)(rows)  # (B, N)
    is_image = batch["input_ids"] == model.config.image_token_id
    hidden = batch["attention_mask"].clone()
    hidden[is_image] = keep.reshape(-1).long()  # the dropped image tokens: invisible keys
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    lengths = (hidden.sum(-1)).tolist()
    assert len(set(lengths)) > 1, "rows of other pruned lengths: the padding side matters"
    with torch.no_grad():
        reference = model(**{**batch, "attention_mask": hidden}, position_ids=positions).logits[:, -1]
        for side in ("left", "right"):
            pruned = pruned_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], keep,
                                   padding_side=side)
            width = pruned["attention_mask"].shape[1]
            for b, length in enumerate(lengths):
                real = range(width - length, width) if side == "left" else range(length)
                assert pruned["attention_mask"][b].nonzero().flatten().tolist() == list(real)
                kept_positions = positions[b][hidden[b].bool()].tolist()
                assert pruned["position_ids"][b, list(real)].tolist() == kept_positions
            logits = model(**pruned).logits
            last = torch.tensor([width - 1 if side == "left" else length - 1 for length in lengths])
            torch.testing.assert_close(logits[torch.arange(len(rows)), last], reference, atol=1e-4, rtol=1e-4)


def test_keep_functions(micro_testbed):
    from datasets import load_from_disk

    rows = [r for r in load_from_disk(str(micro_testbed / "dataset"))["test"]]
    n = PRESETS["micro"].num_visual_tokens
    for make in (random_keep, oracle_keep, saliency_keep):
        keep = make(2 / 9)(rows)
        assert keep.shape == (len(rows), n) and keep.dtype == torch.bool
        assert (keep.sum(-1) == PRESETS["micro"].budget(2 / 9)).all()
        assert torch.equal(keep, make(2 / 9)(rows)), "keep functions are deterministic"
    keep = oracle_keep(1 / 3)(rows)
    for b, r in enumerate(rows):
        kept = set(keep[b].nonzero().flatten().tolist())
        ev = set(r["evidence_patches"])
        assert ev <= kept or len(kept & ev) == len(kept), "evidence comes first"
        others = set(r["object_patches"]) - ev
        if len(ev) + len(others) <= len(kept):
            assert others <= kept, "then the other objects"
    # saliency picks object patches before background
    sal = saliency_keep(1 / 9)(rows)
    for b, r in enumerate(rows):
        assert set(sal[b].nonzero().flatten().tolist()) <= set(r["object_patches"])


def test_evaluate_accuracy_keys(micro_testbed):
    from datasets import load_from_disk

    model = LlavaForConditionalGeneration.from_pretrained(micro_testbed / "model")
    processor = AutoProcessor.from_pretrained(micro_testbed / "model")
    ds = load_from_disk(str(micro_testbed / "dataset"))["validation"]
    acc = evaluate_accuracy(model, processor, ds, batch_size=3, keep_fn=random_keep(1 / 3), max_samples=4)
    assert acc["n"] == 4 and 0 <= acc["overall"] <= 1
    assert acc["kept_visual_tokens"] == PRESETS["micro"].budget(1 / 3)


def test_evaluate_accuracy_scores_each_family_and_existence_type_and_clips_max_samples(monkeypatch):
    """The bookkeeping of `evaluate_accuracy` against fixed predictions (rows 0, 3 and 6 of micro's test split
    wrong). It broke unnoticed (a mutation audit): every family's accuracy reported as the overall mean; the
    existence questions without a negative type filed as "random" instead of "positive"; and `max_samples` above
    the split's size an IndexError instead of the whole split."""
    import rcp_llava.testbed.evaluate as evaluate_module
    rows = build_dataset("micro", seed=0)["test"]
    wrong = {rows[i]["id"] for i in (0, 3, 6)}

    def fixed_predict(model, processor, batch, keep=None):
        return ["wrong" if r["id"] in wrong else r["answer"] for r in batch]

    monkeypatch.setattr(evaluate_module, "predict", fixed_predict)
    model = torch.nn.Linear(1, 1)
    expected = {
        "overall": 0.625, "n": 8,
        "families": {"attribute": 0.5, "counting": 0.0, "existence": 1.0, "identity": 0.5, "position": 1.0},
        "existence_negatives": {"adversarial": 1.0, "positive": 1.0},
        "kept_visual_tokens": 64.0,
    }
    assert [r["family"] for r in rows] == ["attribute", "identity", "existence", "counting", "position",
                                           "attribute", "identity", "existence"]
    assert [r["negative_type"] for r in rows if r["family"] == "existence"] == ["adversarial", ""]
    assert evaluate_accuracy(model, None, rows, batch_size=3) == expected
    assert evaluate_accuracy(model, None, rows, batch_size=3, max_samples=20) == expected
    assert evaluate_accuracy(model, None, rows, batch_size=3, max_samples=2)["n"] == 2


def test_random_keep_draws_per_sample_and_refuses_a_zero_fraction(micro_test_rows):
    """`random_keep` seeds each row's draw with its id: a seed without the id gave every row of a batch the same
    mask (a mutation audit). A fraction of 0 (keep nothing) is refused, naming `fraction`."""
    rows = micro_test_rows
    keep = random_keep(1 / 3)(rows)
    assert (keep.sum(-1) == PRESETS["micro"].budget(1 / 3)).all()
    assert len({tuple(k) for k in keep.tolist()}) == len(rows), "every row draws its own mask"
    assert torch.equal(random_keep(1 / 3)(rows[::-1]), keep.flip(0)), "a row's mask is its own, not its slot's"
    with pytest.raises(ValueError, match=r"^`fraction` must be in \(0, 1\], got 0\.0\.$"):
        random_keep(0.0)(rows)


def test_keep_functions_take_the_whole_budget_refuse_more_and_draw_by_their_seed(micro_test_rows):
    """A fraction of 1 keeps every visual token (the unpruned reference) and one above 1 is refused, naming
    `fraction`: `< 1` refused the whole budget, and without the upper bound 1.5 kept everything silently (a mutation
    audit). `seed` picks another draw, the same again when repeated: ignored (a mutation audit), every seed of a
    sweep measured the same masks."""
    rows = micro_test_rows
    for make in (random_keep, oracle_keep, saliency_keep):
        assert make(1.0)(rows).all(), make
        with pytest.raises(ValueError, match=r"^`fraction` must be in \(0, 1\], got 1\.5\.$"):
            make(1.5)(rows)
    for make in (random_keep, oracle_keep):
        first, other = make(1 / 3, seed=0)(rows), make(1 / 3, seed=1)(rows)
        assert (first.sum(-1) == other.sum(-1)).all() and not torch.equal(first, other), make
        assert torch.equal(make(1 / 3, seed=1)(rows), other) and torch.equal(make(1 / 3)(rows), first), make


def test_oracle_keep_fills_the_budget_with_evidence_then_distractors_then_background(micro_test_rows):
    """At every budget the oracle keeps the evidence patches before the other objects' and those before background.
    The test above checks one budget at which evidence and distractors both fit: the distractors taken before the
    evidence (a mutation audit) passed it, and the "oracle" then dropped the answer first."""
    rows = micro_test_rows
    told_apart = False
    for fraction in (1 / 9, 2 / 9, 1 / 3):
        keep, k = oracle_keep(fraction)(rows), PRESETS["micro"].budget(fraction)
        for b, r in enumerate(rows):
            kept, evidence = set(keep[b].nonzero().flatten().tolist()), set(r["evidence_patches"])
            objects = set(r["object_patches"]) - evidence
            assert len(kept) == k
            if k <= len(evidence):
                assert kept <= evidence
            elif k <= len(evidence) + len(objects):
                assert evidence <= kept <= evidence | objects
                told_apart |= bool(evidence) and k < len(evidence) + len(objects)
            else:
                assert evidence | objects <= kept
    assert told_apart, "a row whose evidence and distractors do not both fit"


def test_patch_saliency_is_each_patchs_distance_to_the_median_colour():
    """`patch_saliency` scores each patch (raster order) by its pixels' mean distance to the image's median colour: on
    black with one red top-right quadrant (a quarter of the pixels), the background scores exactly 0, the red patch
    red's length. The mean colour taken for the background (a mutation audit) passed every test."""
    from PIL import Image

    from rcp_llava.testbed.evaluate import patch_saliency

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:4, 4:] = COLOURS["red"]
    red = float(np.sqrt(((np.array(COLOURS["red"], dtype=np.float32) / 255) ** 2).sum()))
    score = patch_saliency(Image.fromarray(pixels), 4)
    assert score.shape == (4,)
    np.testing.assert_allclose(score, [0.0, red, 0.0, 0.0], rtol=1e-6, atol=0)


def test_a_keep_mask_of_another_token_count_than_a_prompt_is_named():
    """A batch whose prompts hold different numbers of image tokens is refused naming them: only the largest count
    was compared (a mutation audit), so a row with fewer image tokens than `keep` failed in torch's indexing."""
    from rcp_llava.testbed.evaluate import surviving_tokens

    mask = torch.ones(2, 7, dtype=torch.long)
    is_image = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^`keep` has 4 visual tokens per sample but the prompts hold \[4, 3\] "
                                         r"image tokens\.$"):
        surviving_tokens(mask, is_image, torch.ones(2, 4, dtype=torch.bool))


def _untrained_micro_rows(count):
    """An untrained micro LLaVA (no build), its processor and the first `count` rows of micro's test split."""
    from rcp_llava.testbed.train import new_model

    micro = PRESETS["micro"]
    processor = build_processor(micro)
    model = new_model(micro, processor, seed=0).eval()
    return model, processor, [dict(r) for r in build_dataset("micro", seed=0)["test"]][:count]


def test_predict_reads_the_logits_of_the_last_position():
    """`predict`'s words are the argmax of a stock forward's logits at each (left-padded) row's last position.
    Reading the position before it (a mutation audit: `logits_to_keep=2 ... [:, 0]`) made every prediction, and so
    every accuracy the testbed reports, wrong, and no test noticed."""
    from rcp_llava.data import prompt_batch
    from rcp_llava.testbed.evaluate import predict

    model, processor, rows = _untrained_micro_rows(4)
    batch = prompt_batch(processor, [r["question"] for r in rows], [r["image"] for r in rows])
    assert (batch["attention_mask"][:, 0] == 0).any(), "the test needs left padding"
    with torch.no_grad():
        logits = model(**batch).logits  # position_ids from the mask, as prompt_batch makes them
    expected = processor.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
    assert predict(model, processor, rows) == expected
    before_last = processor.tokenizer.convert_ids_to_tokens(logits[:, -2].argmax(-1).tolist())
    assert before_last != expected, "the test tells the positions apart"


def test_right_padded_pruned_labels_are_ignored_on_the_padding():
    """`pruned_inputs(..., labels, padding_side="right")` pads the shortened rows' labels with -100 (ignored by the
    loss); padding them with 0 (a mutation audit) trained the padding to predict token 0."""
    from rcp_llava.data import prompt_batch
    from rcp_llava.testbed.evaluate import surviving_tokens

    model, processor, rows = _untrained_micro_rows(2)
    batch = prompt_batch(processor, [r["question"] for r in rows], [r["image"] for r in rows])
    n = PRESETS["micro"].num_visual_tokens
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[0, :10], keep[1, :4] = True, True
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        out = pruned_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], keep,
                            labels=labels, padding_side="right")
    survivors = surviving_tokens(batch["attention_mask"], batch["input_ids"] == model.config.image_token_id, keep)
    width = out["labels"].shape[1]
    for b in range(2):
        kept = labels[b][survivors[b]].tolist()
        assert out["labels"][b].tolist() == kept + [-100] * (width - len(kept))
        assert out["attention_mask"][b].tolist() == [1] * len(kept) + [0] * (width - len(kept))
    assert (out["labels"] == -100).sum() > 0, "a shortened row is padded"


@pytest.mark.parametrize("stage", ["vision", "warmup"])
def test_an_interrupted_stage_resumes_to_the_uninterrupted_weights(stage, tmp_path):
    """Interrupt a stage right after its step-2 checkpoint, run it again: the final weights equal an uninterrupted
    run's. On 4d033f1 the chat stages read the llava-hf-layout checkpoint with a plain `load_state_dict`, matched no
    key (a warning), and went on from their initial weights (max difference 0.0055 here)."""
    import dataclasses

    from transformers import TrainerCallback

    from rcp_llava.testbed import train as testbed_train
    from rcp_llava.testbed.presets import get_preset
    preset = get_preset("micro")
    processor = build_processor(preset)
    spec = dataclasses.replace(preset.stages[stage], max_steps=4)
    init = None if stage == "vision" else testbed_train.run_stage("vision", preset, tmp_path / "init", processor)
    whole = testbed_train.run_stage(stage, preset, tmp_path / "whole", processor, init_dir=init, save_steps=2,
                                    spec=spec)

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    original = testbed_train.TestbedTrainer.__init__

    def with_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Interrupt())

    testbed_train.TestbedTrainer.__init__ = with_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            testbed_train.run_stage(stage, preset, tmp_path / "cut", processor, init_dir=init, save_steps=2, spec=spec)
    finally:
        testbed_train.TestbedTrainer.__init__ = original
    assert (tmp_path / "cut" / stage / "checkpoint-2").is_dir() and not (tmp_path / "cut" / stage / "final").exists()
    resumed = testbed_train.run_stage(stage, preset, tmp_path / "cut", processor, init_dir=init, save_steps=2,
                                      spec=spec)
    a = LlavaForConditionalGeneration.from_pretrained(whole).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_resumed_on_another_thread_count_says_so(tmp_path, caplog):
    """CPU training depends on torch's thread count (micro's build: 1 vs 2 threads end 1.1e-4 apart), so a stage
    started on one count and resumed on another equals no uninterrupted build: a deep build resumed that way came out
    at 0.868 test accuracy against 0.899, unannounced. Each run's count is recorded; a changed one is named."""
    from rcp_llava.testbed import train as testbed_train

    stage_dir = tmp_path / "warmup"
    stage_dir.mkdir()
    threads = torch.get_num_threads()
    testbed_train._record_threads(stage_dir, "warmup", None)
    testbed_train._record_threads(stage_dir, "warmup", "checkpoint-2")  # same count: nothing to say
    assert json.loads((stage_dir / "threads.json").read_text()) == [threads]
    assert "resumes on" not in caplog.text
    (stage_dir / "threads.json").write_text(json.dumps([threads + 1]))
    testbed_train._record_threads(stage_dir, "warmup", "checkpoint-2")
    # the way back for the CLI that builds testbeds: its --num_threads sets the count over OMP_NUM_THREADS, so
    # "Set OMP_NUM_THREADS" alone resumed on the wrong count again
    assert (f"stage 'warmup' trained on {threads + 1} thread(s) and resumes on {threads}: the result will equal no "
            f"uninterrupted build. Continue it on {threads + 1} thread(s) as it started "
            f"(`benchmarks/build_testbed.py --num_threads {threads + 1}`, which sets the count itself; elsewhere "
            f"OMP_NUM_THREADS={threads + 1} or torch.set_num_threads({threads + 1}))") in caplog.text
    assert json.loads((stage_dir / "threads.json").read_text()) == [threads + 1, threads]


def test_a_stage_records_its_thread_count(tmp_path):
    from rcp_llava.testbed import train as testbed_train
    from rcp_llava.testbed.presets import get_preset
    preset = get_preset("micro")
    testbed_train.run_stage("vision", preset, tmp_path, build_processor(preset))
    assert json.loads((tmp_path / "vision" / "threads.json").read_text()) == [torch.get_num_threads()]


def test_resuming_from_a_checkpoint_of_another_model_is_an_error(tmp_path):
    """A checkpoint whose weights do not fit is an error naming it, never a warning."""
    from rcp_llava.testbed import train as testbed_train
    from rcp_llava.testbed.presets import get_preset
    preset = get_preset("micro")
    processor = build_processor(preset)
    model = testbed_train.new_model(preset, processor)
    other = torch.nn.Linear(2, 2)
    folder = tmp_path / "checkpoint-2"
    model.config.save_pretrained(folder)
    from safetensors.torch import save_file

    save_file({"weight": other.weight.detach().contiguous()}, str(folder / "model.safetensors"))
    trainer = testbed_train.TestbedTrainer(model=model, args=testbed_train._training_args(
        tmp_path, preset.stages["full"], 0, 2))
    with pytest.raises(ValueError, match=r"checkpoint-2 does not hold this stage's model .*missing_keys"):
        trainer._load_from_checkpoint(str(folder))


def test_a_later_evaluation_does_not_rewrite_the_build_command(tmp_path):
    """The pruning table added to a cached testbed by a later caller (the first `train_rcp.py`) is recorded as
    `evaluated_by`; `command` stays the command that built the model (it used to become the caller's argv)."""
    import json

    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "tb", pruning_eval=False, command="build it")
    build_testbed("micro", output_dir=tmp_path / "tb", pruning_eval=True, command="evaluate it")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["command"], metrics["evaluated_by"], "pruning" in metrics) == ("build it", "evaluate it", True)
    assert not list(folder.glob("metrics.json.tmp*"))


def test_a_stage_trained_with_another_recipe_is_never_reused(tmp_path):
    """Each stage folder records its recipe; asking for another (a model setting, a stage setting, or a different
    stage before it) is a ValueError naming what differs, and the folder is left as it was."""
    import dataclasses

    from rcp_llava.testbed import train as testbed_train
    micro = PRESETS["micro"]
    processor = build_processor(micro)
    vision = testbed_train.run_stage("vision", micro, tmp_path, processor)
    saved = json.loads((tmp_path / "vision" / "recipe.json").read_text())
    assert saved == testbed_train.stage_recipe("vision", micro, micro.stages["vision"], 0)
    assert saved["spec"]["max_steps"] == 2 and saved["model"]["text_layers"] == 2 and saved["init"] is None
    mtime = (vision / "model.safetensors").stat().st_mtime
    with pytest.raises(ValueError, match=r"vision was trained with another recipe .*differs in model\.noise_std\)"):
        testbed_train.run_stage("vision", dataclasses.replace(micro, noise_std=0.05), tmp_path, processor)
    with pytest.raises(ValueError, match=r"differs in seed, spec\.learning_rate\); delete the folder"):
        testbed_train.run_stage("vision", micro, tmp_path, processor, seed=1,
                                spec=dataclasses.replace(micro.stages["vision"], learning_rate=1.0))
    assert (vision / "model.safetensors").stat().st_mtime == mtime
    assert testbed_train.run_stage("vision", micro, tmp_path, processor) == vision  # same recipe: reused
    # the next stage's recipe holds the one it started from
    testbed_train.run_stage("warmup", micro, tmp_path, processor, init_dir=vision)
    warmup = json.loads((tmp_path / "warmup" / "recipe.json").read_text())
    assert warmup["init"] == saved and warmup["spec"]["attention_supervision"] == 1.0
    assert warmup == testbed_train.recipe_chain(micro, stages=("vision", "warmup"))
    # a damaged recipe is a ValueError naming the file, and nothing is retrained over it
    (tmp_path / "vision" / "recipe.json").write_text('{"stage": "vis')
    with pytest.raises(ValueError, match=r"vision/recipe\.json is not valid JSON .*delete its folder"):
        testbed_train.run_stage("vision", micro, tmp_path, processor)
    assert (vision / "model.safetensors").stat().st_mtime == mtime


def test_a_build_of_another_recipe_is_not_reused(micro_testbed):
    """A built testbed whose recipe differs from this version's preset is an error, not a silently stale model."""
    import dataclasses

    from rcp_llava.testbed.train import recipe_chain

    micro = PRESETS["micro"]
    assert json.loads((micro_testbed / "work" / "full" / "recipe.json").read_text()) == recipe_chain(micro)
    changed = dataclasses.replace(micro, stages={**micro.stages, "warmup": dataclasses.replace(
        micro.stages["warmup"], families=("conjunction",))})
    mtime = (micro_testbed / "model" / "model.safetensors").stat().st_mtime
    with pytest.raises(ValueError, match=r"another 'micro' recipe .*differs in init\.init\.spec\.families\); "
                                         r"build into another `output_dir`"):
        build_testbed(changed, micro_testbed)
    assert (micro_testbed / "model" / "model.safetensors").stat().st_mtime == mtime


def test_a_dataset_of_another_preset_or_seed_is_not_reused(micro_testbed, tmp_path):
    """`dataset/` was reused whenever it existed: micro's data copied into a folder built as `tiny` was trained on
    and would have been published as tiny's. The build records its recipe; a folder without one (built before) is
    checked by its split sizes and image size."""
    import shutil

    from rcp_llava.testbed.build import DATASET_RECIPE_FILE, dataset_recipe

    saved = json.loads((micro_testbed / "dataset" / DATASET_RECIPE_FILE).read_text())
    assert saved == dataset_recipe(PRESETS["micro"], 0) == {
        "preset": "micro", "seed": 0, "image_size": PRESETS["micro"].image_size, "patch_size": 4, "object_cells": 2,
        "min_objects": 2, "max_objects": 4, "noise_std": 0.02,
        "sizes": {"train": PRESETS["micro"].num_train, "validation": PRESETS["micro"].num_validation,
                  "test": PRESETS["micro"].num_test}}
    other = tmp_path / "other"
    shutil.copytree(micro_testbed / "dataset", other / "dataset")
    with pytest.raises(ValueError, match=r"^The dataset in .*other/dataset was not generated by the 'tiny' testbed "
                                         r"with seed 0 \(differs in image_size, max_objects, min_objects, patch_size, "
                                         r"preset, sizes\); build into another "
                                         r"`output_dir`, or delete .* to regenerate it"):
        build_testbed("tiny", other)
    with pytest.raises(ValueError, match=r"'micro' testbed with seed 1 \(differs in seed\)"):
        build_testbed("micro", other, seed=1)
    (other / "dataset" / DATASET_RECIPE_FILE).unlink()  # built before the recipe was recorded
    with pytest.raises(ValueError, match=r"'tiny' testbed with seed 0 \(differs in image_size, sizes\)"):
        build_testbed("tiny", other)
    assert not (other / "model").exists()  # nothing trained on it


# -- the deep preset (issue 16) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deep", "paper"])
def test_preset_reaches_the_papers_budgets_over_all_layers_and_supervises_no_pruning_layer(name):
    """16 layers: with the paper's relative placements the budgets 1/3, 2/9, 1/9 are reachable as means over ALL
    decoder layers, and the supervised binding hops sit at layers no pruner reads -- for deep (144 visual tokens)
    and for paper (576, LLaVA-1.5's geometry), which had 8 layers: 1/9 of 576 over all layers was out of reach and
    the default hops (0, 1, 2) put the referent hop at the first pruner's layer, the near-oracle prior issue 16
    designed deep to avoid."""
    from configuration_rcp_llava import paper_placement
    from rcp_llava.flops import keep_counts_for_budget
    from rcp_llava.schedule import stage_proportions

    preset = PRESETS[name]
    n = preset.num_visual_tokens
    assert preset.text_layers == 16 and n == {"deep": 144, "paper": 576}[name]
    pruning = set()
    for fraction in (1 / 3, 2 / 9, 1 / 9):
        layers, repair = paper_placement(preset.text_layers, fraction)
        assert layers[0] == (1 if fraction < 0.2 else 2) and repair == [11, 15]
        k = preset.budget(fraction)
        counts = keep_counts_for_budget(preset.text_layers, n, layers, k, stage_proportions(len(layers)))
        per_layer = [n] * layers[0]
        for i, layer in enumerate(layers):
            per_layer += [counts[i]] * ((layers[i + 1] if i + 1 < len(layers) else preset.text_layers) - layer)
        assert abs(sum(per_layer) / preset.text_layers - k) < 0.5, (fraction, counts)
        pruning |= set(layers)
    assert pruning == {1, 2, 7, 12, 13}
    assert not pruning & set(preset.supervised_layers) and len(set(preset.supervised_layers)) == 3
    # and the main job on it (`train_rcp.py --testbed_preset NAME`) keeps that placement and budget over all layers
    # (paper ran as tiny: pruners at [1, 2, 3], one of them on a supervised hop)
    import train_rcp

    assert not {"pruning_layers", "repair_layers"} & set(train_rcp.testbed_pruning(name))
    job = train_rcp.testbed_job_defaults(name)
    assert job["sparsity_layers"] == "all" and job["output_dir"] == f"outputs/rcp_{name}"


def test_deep_preset_scenes_are_deterministic_and_consistent():
    deep = PRESETS["deep"]
    samples = _samples(deep, n=40)
    for (s1, q1), i in zip(samples[:5], range(5)):
        s2, q2 = make_sample(deep, 0, "test", i, FAMILIES, num_questions=5)
        assert np.array_equal(np.asarray(s1.image), np.asarray(s2.image)) and q1 == q2
    for scene, questions in samples:
        assert deep.min_objects <= len(scene.objects) <= deep.max_objects
        for q in questions:
            assert _expected_answer(scene, q) == q["answer"], q
            assert set(q["evidence_patches"]) <= {i for o in scene.objects for i in o.patches}
            if q["family"] in ("attribute", "identity", "position") or q["answer"] == "yes":
                assert q["evidence_patches"], q


def test_a_deep_shaped_micro_build_loads_with_stock_classes(tmp_path):
    """The deep preset's decoder shape (16 layers, hops at 3-5, attention supervision on them) through every stage
    at micro size: a stock LLaVA folder."""
    import dataclasses

    deep_micro = dataclasses.replace(PRESETS["micro"], name="deep-micro", text_layers=16,
                                     supervised_layers=PRESETS["deep"].supervised_layers)
    out = build_testbed(deep_micro, tmp_path / "deep-micro", pruning_eval=False)
    model = LlavaForConditionalGeneration.from_pretrained(out / "model")
    assert model.config.text_config.num_hidden_layers == 16
    assert AutoProcessor.from_pretrained(out / "model").chat_template
    state = json.loads((out / "work" / "warmup" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [row["attention_loss"] for row in state["log_history"] if "attention_loss" in row]


# -- training-stage data and recipe details (a mutation audit left these unchecked) -------------------------------


def _object_count(item, preset=TINY):
    return int((item["patch_labels"]["colour"] > 0).sum()) // preset.object_cells**2


def test_a_min_objects_override_draws_both_ends_of_its_range_and_refuses_a_negative():
    """`min_objects` makes the range `[min_objects, max_objects]`, both ends included: drawing up to
    `max_objects - 1` only (the `+ 1` dropped) passed every other test. A negative count is refused like 9."""
    from rcp_llava.testbed.train import SceneStream

    stream = SceneStream(TINY, 0, "full", 80, min_objects=2)
    assert {_object_count(stream[i]) for i in range(80)} == set(range(2, TINY.max_objects + 1))
    with pytest.raises(ValueError, match=r"min_objects.*\[1, 8\].*got -1\.$"):
        SceneStream(TINY, 0, "full", 4, min_objects=-1)


def test_the_density_curriculum_grows_scenes_from_one_object_to_the_presets_range():
    """`curriculum=0.5`: item `i` of the first half holds 1 to `1 + int(7 * i / 40)` objects (of 80 items), so the
    scenes grow from a single object; the second half draws the preset's own 6-8."""
    from rcp_llava.testbed.train import SceneStream

    stream = SceneStream(TINY, 0, "warmup", 80, curriculum=0.5)
    counts = [_object_count(stream[i]) for i in range(80)]
    assert counts[0] == 1
    assert all(1 <= counts[i] <= 1 + int(7 * i / 40) for i in range(40)), counts[:40]
    assert max(counts[:10]) <= 2 and max(counts[30:40]) >= 5, counts[:40]  # it grows
    assert all(TINY.min_objects <= n <= TINY.max_objects for n in counts[40:]), counts[40:]


def test_each_stage_streams_its_own_scenes():
    """Item `i` is a function of `(seed, stage, i)`: the vision and chat stages do not train on one scene list."""
    from rcp_llava.testbed.train import SceneStream

    images = {stage: [np.asarray(SceneStream(TINY, 0, stage, 3)[i]["image"]) for i in range(3)]
              for stage in ("vision", "warmup", "full")}
    again = [np.asarray(SceneStream(TINY, 0, "full", 3)[i]["image"]) for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(images["full"], again))
    for one, other in (("vision", "warmup"), ("vision", "full"), ("warmup", "full")):
        assert not any(np.array_equal(a, b) for a, b in zip(images[one], images[other])), (one, other)


def test_subset_stages_keep_every_object_and_a_tenth_of_the_background():
    """The warm-up's token subsets: every object patch plus ~10% of the background (~35 of 144 tokens)."""
    from rcp_llava.testbed.train import SceneStream

    stream = SceneStream(TINY, 0, "warmup", 60, subset=True)
    rates = []
    for i in range(60):
        item = stream[i]
        keep, on_object = item["keep"], item["patch_labels"]["colour"] > 0
        assert keep[on_object].all()
        rates.append(keep[~on_object].mean())
    assert 0.08 < np.mean(rates) < 0.12, np.mean(rates)


def test_the_thinned_share_is_the_share_of_thinned_images_and_keeps_a_third_of_the_background():
    """`thinned_share=0.25` thins a quarter of the images (the comparison flipped, three quarters were thinned and
    the 0.5 of the other test could not tell); a thinned image keeps each background patch with probability
    `u**2` (mean 1/3; with `u` it was 1/2, inside the other test's bounds)."""
    from rcp_llava.testbed.train import SceneStream

    quarter = SceneStream(TINY, 0, "full", 200, turns=1, thinned_share=0.25)
    thinned = sum(not quarter[i]["keep"].all() for i in range(200))
    assert 30 <= thinned <= 70, thinned  # 50 expected, binomial sd ~6
    every = SceneStream(TINY, 0, "full", 200, turns=1, thinned_share=1.0)
    rates = []
    for i in range(200):
        item = every[i]
        rates.append(item["keep"][item["patch_labels"]["colour"] == 0].mean())
    assert 0.28 < np.mean(rates) < 0.39, np.mean(rates)  # E[u**2] = 1/3, sd of the mean ~0.02


def test_chat_batches_label_every_answer_and_its_eos_show_the_image_first_and_carry_keep():
    """Labels are the answer tokens and the `</s>` after each (nothing else); the image is in the first user turn;
    a subset stage's `keep` masks travel in the batch (dropped, the warm-up trained on whole scenes)."""
    from rcp_llava.testbed.train import ChatCollator, SceneStream

    micro = PRESETS["micro"]
    processor = build_processor(micro)
    tok = processor.tokenizer
    stream = SceneStream(micro, 0, "warmup", 3, turns=2, subset=True)
    items = [stream[i] for i in range(3)]
    batch = ChatCollator(processor)(items)
    assert torch.equal(batch["keep"], torch.as_tensor(np.stack([it["keep"] for it in items])))
    for ids, labels, item in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), items):
        tokens = tok.convert_ids_to_tokens(ids)
        assert [t for t, label in zip(tokens, labels) if label != -100] == [
            t for q in item["questions"] for t in (*tok.tokenize(q["answer"]), "</s>")]
        assert all(label in (-100, i) for i, label in zip(ids, labels))
        assert tokens.count("<image>") == micro.num_visual_tokens
        assert tokens.index("<image>") < tokens.index(tok.tokenize(item["questions"][0]["question"])[0])
        assert tokens.index("<image>") < tokens.index("ASSISTANT")


def test_the_patch_probe_scores_each_patch_on_every_head():
    """The vision stage's loss: the sum over the five heads of the cross-entropy of each patch's own label, read
    from the hidden state LLaVA projects with the CLS token dropped."""
    import torch.nn.functional as F

    from rcp_llava.testbed.train import PATCH_HEADS, PatchCollator, PatchProbe, SceneStream, new_model

    micro = PRESETS["micro"]
    processor = build_processor(micro)
    llava = new_model(micro, processor)
    probe = PatchProbe(llava)
    stream = SceneStream(micro, 0, "vision", 2)
    batch = PatchCollator(processor)([stream[0], stream[1]])
    assert batch["colour"].shape == (2, micro.num_visual_tokens)
    with torch.no_grad():
        loss = probe(**batch)["loss"]
        hidden = llava.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
        patches = hidden[:, 1:]
        assert patches.shape[1] == micro.num_visual_tokens
        want = sum(F.cross_entropy(probe.heads[name](patches).flatten(0, 1), batch[name].flatten())
                   for name in PATCH_HEADS)
    assert torch.allclose(loss, want, rtol=1e-5), (loss, want)


def test_the_attention_loss_is_added_at_its_weight_and_items_are_read_in_order(tmp_path):
    """`compute_loss` = the language-model loss + `attention_supervision` x the attention loss (a weight of 0.5,
    not 1); the sampler reads the items in order, as the density curriculum needs."""
    from rcp_llava.testbed.train import ChatCollator, SceneStream, TestbedTrainer, _training_args, new_model

    micro = PRESETS["micro"]
    processor = build_processor(micro)
    model = new_model(micro, processor)
    stream = SceneStream(micro, 0, "warmup", 6, turns=2, subset=True)
    batch = ChatCollator(processor, attention_targets=True)([stream[0], stream[1]])

    def trainer(weight):
        return TestbedTrainer(model=model, args=_training_args(tmp_path, micro.stages["warmup"], 0, 2),
                              train_dataset=stream, attention_supervision=weight,
                              supervised_layers=micro.supervised_layers)

    with torch.no_grad():
        plain = trainer(0.0).compute_loss(model, dict(batch))
        weighted = trainer(0.5)
        total = weighted.compute_loss(model, dict(batch))
    (attention,) = weighted._attention_losses
    assert attention > 0.1
    assert torch.allclose(total, plain + 0.5 * attention, rtol=1e-5), (total, plain, attention)
    assert list(weighted._get_train_sampler()) == list(range(6))


def test_training_arguments_follow_the_stage_spec(tmp_path):
    """Steps, batch, learning rate, its cosine schedule with `warmup_ratio` of the steps as warm-up, the seed."""
    from rcp_llava.testbed.presets import StageSpec
    from rcp_llava.testbed.train import _training_args

    spec = StageSpec(max_steps=200, batch_size=3, learning_rate=1e-3, warmup_ratio=0.05)
    args = _training_args(tmp_path, spec, 7, 50)
    assert (args.max_steps, args.warmup_steps, args.per_device_train_batch_size, args.learning_rate,
            args.lr_scheduler_type, args.seed, args.data_seed, args.save_steps) == (
        200, 10, 3, 1e-3, "cosine", 7, 7, 50)


def test_recipe_helpers_name_what_a_stage_is_a_function_of(tmp_path, caplog):
    """`recipe_chain(specs=...)` is the recipe `train_testbed_model(specs=...)` records; a stage started from a folder
    without a recipe records that folder's path (None would equal a stage trained from scratch); a saved recipe
    lacking a key differs in it; and a stage whose recipe matches is reused without a warning."""
    import dataclasses
    import logging

    from rcp_llava.testbed import train as testbed_train

    micro = PRESETS["micro"]
    spec = dataclasses.replace(micro.stages["vision"], max_steps=5)
    assert testbed_train.recipe_chain(micro, stages=("vision",), specs={"vision": spec}) == \
        testbed_train.stage_recipe("vision", micro, spec, 0)
    elsewhere = tmp_path / "elsewhere" / "final"
    assert testbed_train._init_recipe(elsewhere) == str(elsewhere) and testbed_train._init_recipe(None) is None
    recipe = testbed_train.stage_recipe("vision", micro, micro.stages["vision"], 0)
    older = json.loads(json.dumps(recipe))
    del older["spec"]["min_objects"]
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert testbed_train.saved_recipe_diff(tmp_path / "old.json", recipe) == ["spec.min_objects"]
    stage_dir = tmp_path / "vision"
    with caplog.at_level(logging.WARNING, logger="rcp_llava.testbed.train"):
        testbed_train._check_recipe(stage_dir, recipe)
        testbed_train._check_recipe(stage_dir, recipe)
    assert json.loads((stage_dir / "recipe.json").read_text()) == recipe
    assert "reused unchecked" not in caplog.text


def test_a_final_folder_without_weights_names_the_weights_file(tmp_path):
    """`missing_final_file` names the first file an interrupted save lacks: `model.safetensors` (not the index of a
    sharded save) when no weights were written; None for a whole folder (sharded weights count)."""
    from rcp_llava.testbed.train import missing_final_file

    (tmp_path / "config.json").write_text("{}")
    assert missing_final_file(tmp_path) == "model.safetensors"
    for name in ("model.safetensors.index.json", "tokenizer_config.json", "processor_config.json"):
        (tmp_path / name).write_text("{}")
    assert missing_final_file(tmp_path) is None


@pytest.mark.parametrize("stage", ["rebalance", "full"])
def test_run_stage_trains_each_chat_stage_as_its_spec_says(stage, tmp_path, monkeypatch):
    """What `run_stage` hands the Trainer for a chat stage: the vision tower frozen, the stage's families, token
    subsets in both subset stages, the attention supervision at the spec's weight on the preset's hop layers (none
    in `full`), the thinning and scene range of `full`."""
    from rcp_llava.testbed import train as testbed_train
    from rcp_llava.testbed.presets import REBALANCE_FAMILIES
    class Stop(Exception):
        pass

    seen = {}

    def train(self, *args, **kwargs):
        seen["trainer"] = self
        raise Stop

    monkeypatch.setattr(testbed_train.TestbedTrainer, "train", train)
    micro = PRESETS["micro"]
    with pytest.raises(Stop):
        testbed_train.run_stage(stage, micro, tmp_path, build_processor(micro))
    trainer = seen["trainer"]
    data, spec = trainer.train_dataset, micro.stages[stage]
    llava = trainer.model
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())
    assert all(p.requires_grad for p in llava.model.language_model.parameters())
    assert all(p.requires_grad for p in llava.model.multi_modal_projector.parameters())
    assert trainer.supervised_layers == micro.supervised_layers == (0, 1, 1)
    if stage == "rebalance":
        assert data.families == REBALANCE_FAMILIES and data.subset and data.turns == 2
        assert trainer.attention_supervision == 1.0 and trainer.data_collator.attention_targets
    else:
        assert data.families == testbed_train.TRAIN_FAMILIES and not data.subset
        assert (data.thinned_share, data.min_objects) == (0.5, 1)
        assert trainer.attention_supervision == 0.0 and not trainer.data_collator.attention_targets
    assert len(data) == spec.max_steps * spec.batch_size


def test_a_resume_is_compared_with_the_latest_runs_thread_count(tmp_path, caplog):
    """`threads.json` lists every run's count; a resume is compared with the LAST run's: a stage that moved from 1
    thread to this count resumes silently, one that moved away from it is named."""
    from rcp_llava.testbed import train as testbed_train

    stage_dir = tmp_path / "full"
    stage_dir.mkdir()
    threads = torch.get_num_threads()
    (stage_dir / "threads.json").write_text(json.dumps([threads + 1, threads]))
    testbed_train._record_threads(stage_dir, "full", "checkpoint-2")
    assert "resumes on" not in caplog.text
    assert json.loads((stage_dir / "threads.json").read_text()) == [threads + 1, threads]
    (stage_dir / "threads.json").write_text(json.dumps([threads, threads + 1]))
    testbed_train._record_threads(stage_dir, "full", "checkpoint-2")
    assert f"stage 'full' trained on {threads + 1} thread(s) and resumes on {threads}" in caplog.text
    assert json.loads((stage_dir / "threads.json").read_text()) == [threads, threads + 1, threads]


def test_default_cache_dir_of_a_preset_object_is_named_by_the_preset(monkeypatch, tmp_path):
    """`build_testbed(preset_object)` without `output_dir` caches under the preset's name, not its repr."""
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    assert default_cache_dir(PRESETS["micro"]) == tmp_path / "testbed" / "micro"


def test_budgets_are_the_documented_token_counts():
    """1/3, 2/9 and 1/9 of the 144 visual tokens of tiny / deep: 48, 32 and 16 kept tokens; a budget of 1 keeps all
    144 and 3/4 keeps 108 (counted on 143 tokens, the three paper budgets round alike and passed)."""
    for name in ("tiny", "deep"):
        assert [PRESETS[name].budget(f) for f in (1 / 3, 2 / 9, 1 / 9, 3 / 4, 1.0)] == [48, 32, 16, 108, 144]
    assert [PRESETS["micro"].budget(1.0), PRESETS["paper"].budget(1.0)] == [64, 576]


def test_dataset_splits_hold_their_own_scenes_ids_and_sizes():
    """`build_dataset(sizes=...)`: each split has the asked size, its own id range and its own scenes (a test set
    drawn as the train split was would score memorised scenes)."""
    data = build_dataset("micro", seed=0, sizes={"train": 2, "validation": 1, "test": 3})
    assert {split: data[split]["id"] for split in data} == {
        "train": [0, 1], "validation": [10_000_000], "test": [20_000_000, 20_000_001, 20_000_002]}
    train = [np.asarray(row["image"]) for row in data["train"]]
    for split in ("validation", "test"):
        assert not any(np.array_equal(np.asarray(row["image"]), image) for row in data[split] for image in train)


def test_the_model_config_follows_the_preset():
    """`build_model_config`: the preset's RoPE base (1e6, not Llama's 1e4), full multi-head attention (as many
    key/value heads as heads), LLaVA reading the vision tower's last layer (the one the vision stage trains its patch
    heads on), untied embeddings and one image placeholder per visual token."""
    from rcp_llava.testbed.text import build_model_config

    for name in ("micro", "tiny"):
        preset = PRESETS[name]
        config = build_model_config(preset, build_processor(preset).tokenizer)
        text = config.text_config
        assert text.rope_parameters["rope_theta"] == preset.rope_theta == 1_000_000.0
        assert (text.num_attention_heads, text.num_key_value_heads) == (preset.text_heads, preset.text_heads)
        assert (text.num_hidden_layers, text.hidden_size, text.tie_word_embeddings) == (
            preset.text_layers, preset.text_hidden_size, False)
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "default")
        assert config.image_seq_length == preset.num_visual_tokens


def test_the_word_tokenizer_splits_punctuation_and_pads_on_the_left():
    """`word_level_tokenizer`: `? : . , !` are tokens of their own (`word!` was one unknown word), hyphenated words
    stay whole; left padding, which batched generation needs, is the default."""
    from rcp_llava.word_tokenizer import CHAT_TEMPLATE, word_level_tokenizer

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "yes", "no", "top-left", "!", "?", ":", ".", ","]
    tok = word_level_tokenizer({w: i for i, w in enumerate(words)}, CHAT_TEMPLATE)
    assert tok.tokenize("yes! no? top-left: no, yes.") == [
        "yes", "!", "no", "?", "top-left", ":", "no", ",", "yes", "."]
    assert tok.padding_side == "left"
    assert build_processor(PRESETS["micro"]).tokenizer.padding_side == "left"


def test_deep_reuses_tinys_recipe_with_its_documented_changes():
    """The deep preset's stages: tiny's, with warm-up 2600, rebalance 900 and a 1200-step `full` stage on
    `DEEP_FULL_FAMILIES` (the recipe of the 0.899 build)."""
    import dataclasses

    from rcp_llava.testbed.presets import DEEP_FULL_FAMILIES, TINY_STAGES

    deep = PRESETS["deep"].stages
    assert deep["vision"] == TINY_STAGES["vision"]
    assert deep["warmup"] == dataclasses.replace(TINY_STAGES["warmup"], max_steps=2600)
    assert deep["rebalance"] == dataclasses.replace(TINY_STAGES["rebalance"], max_steps=900)
    assert deep["full"] == dataclasses.replace(TINY_STAGES["full"], max_steps=1200, families=DEEP_FULL_FAMILIES)


def test_the_chat_template_ends_a_prompt_for_generation_with_the_assistant_turn():
    """The prompt every evaluation sends ends with `ASSISTANT:` (the model answers after it); a whole conversation
    closes each answer with `</s>`."""
    processor = build_processor(PRESETS["micro"])
    messages = prompt_messages("where is the red circle?")
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == \
        "USER: <image> where is the red circle? ASSISTANT:"
    answered = messages + [{"role": "assistant", "content": [{"type": "text", "text": "top-left"}]}]
    assert processor.apply_chat_template(answered) == "USER: <image> where is the red circle? ASSISTANT: top-left</s> "


def test_the_testbed_vocabulary_has_each_word_once_and_dense_ids():
    """`vocabulary()` lists each word once (PROMPT_WORDS repeats `is`): the token ids are exactly 0..len-1, so the
    model's `vocab_size = len(tokenizer)` embeds every word (a duplicate gave the last word, `three`, the id
    `len(tokenizer)`: an index past the embedding whenever a count of three was asked or answered)."""
    from rcp_llava.testbed.text import build_tokenizer, vocabulary

    words = vocabulary()
    assert len(words) == len(set(words))
    tok = build_tokenizer()
    assert sorted(tok.get_vocab().values()) == list(range(len(tok))) and len(tok) == len(words)
    assert tok.convert_tokens_to_ids(words[-1]) == len(tok) - 1
