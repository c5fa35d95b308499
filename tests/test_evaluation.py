"""The evaluation command, figures and ablation runner (rcp_llava/evaluation.py, benchmarks/*.py) on the micro
testbed, plus the budget -> keep-count reading."""

import json
import math
import os
import re

import pytest
import torch

from conftest import load_benchmark, make_batch, make_model
from configuration_rcp_llava import visual_tokens_per_layer
from rcp_llava.evaluation import add_relative, default_fastv_layer, method_model, method_overrides
from rcp_llava.schedule import (
    budget_count,
    parse_budget,
    rcp_keep_counts,
    scheduled_tokens_per_layer,
    stage_proportions,
)


def average_from(counts, layers, num_layers, n):
    per_layer = visual_tokens_per_layer(num_layers, n, layers, counts)
    return sum(per_layer[layers[0]:]) / (num_layers - layers[0])


# -- budgets -> counts -------------------------------------------------------------------------------


def test_budget_fractions_and_counts():
    assert [budget_count(parse_budget(b)[1], 144) for b in ("1/3", "2/9", "1/9")] == [48, 32, 16]
    # half up on the decimal given, not on its float (0.29 * 50 = 14.4999...: 14 and 28 before)
    assert [budget_count(parse_budget(b)[1], 50) for b in ("0.29", "0.57", "0.01", "1/100")] == [15, 29, 1, 1]
    import numpy as np  # a fraction computed with numpy, as before exact arithmetic

    assert budget_count(np.float32(1 / 9), 144) == budget_count(np.float64(1 / 9), 144) == 16
    assert parse_budget("0.25") == ("0.25", 0.25)
    for bad in ("0", "3/2", "abc"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_budget_boundaries_and_spellings():
    """The edges a mutation audit found untested: the whole image ("1") is a budget, "1/0" is refused as not a
    fraction (it raised ZeroDivisionError), the label is the budget as written without surrounding space (" 1/3 "
    kept its spaces, and names folders), a tiny fraction still keeps one token, and a budget of all N tokens is a
    valid keep count."""
    assert parse_budget("1") == ("1", 1.0)
    with pytest.raises(ValueError, match=r"^Budget '1/0' is not a fraction like '1/3' or '0\.25'\.$"):
        parse_budget("1/0")
    assert parse_budget(" 1/3 ") == parse_budget("1/3\n") == ("1/3", 1 / 3)
    assert budget_count(parse_budget("1/1000")[1], 144) == 1
    with pytest.raises(ValueError, match=r"^At least one pruning layer is needed\.$"):
        stage_proportions(0)
    assert rcp_keep_counts(144, [1, 2, 3], 4, 144) == [144, 144, 144]


def test_rcp_counts_are_valid_keep_counts_on_a_grid():
    """Every count in [1, N] and non-increasing (the masks are cumulative), for every placement of up to 4 pruners
    on decoders of 2-8 layers and every budget: the +-1 nudge was pinned by examples only, and a nudge that let a
    stage reach 0 ([6, 0] for [6, 1]) or rise past its predecessor ([8, 9, 6]) passed."""
    import itertools

    for num_layers in (2, 3, 4, 6, 8):
        for p in range(1, min(num_layers - 1, 4) + 1):
            for layers in itertools.combinations(range(1, num_layers), p):
                for n in (4, 9, 16):
                    for k in range(1, n + 1):
                        try:
                            counts = rcp_keep_counts(k, list(layers), num_layers, n)
                        except ValueError:
                            continue  # unreachable budgets are refused, with their own test
                        assert all(1 <= c <= n for c in counts), (k, layers, num_layers, n, counts)
                        assert counts == sorted(counts, reverse=True), (k, layers, num_layers, n, counts)
    assert rcp_keep_counts(4, [1, 3], 4, 9) == [6, 1] and rcp_keep_counts(7, [1, 2, 3], 6, 9) == [9, 8, 6]


def test_rcp_counts_average_to_the_budget_with_table_vi_proportions():
    # The tiny testbed's placement: pruners before layers 1, 2, 3 of 4; every stage spans one layer.
    assert rcp_keep_counts(16, [1, 2, 3], 4, 144) == [35, 10, 3]
    for k in (16, 32, 48):
        counts = rcp_keep_counts(k, [1, 2, 3], 4, 144)
        assert counts == sorted(counts, reverse=True)
        assert average_from(counts, [1, 2, 3], 4, 144) == k
        assert counts[0] / counts[1] == pytest.approx(16.72 / 4.59, rel=0.1)
    # LLaVA-1.5-7B at 64 tokens, pruners before layers 1, 13, 25 (the paper prints 2, 14, 26; spans 12, 12, 7): the
    # average over layers 1..31 is 64.
    counts = rcp_keep_counts(64, [1, 13, 25], 32, 576)
    assert counts == [125, 34, 11] and abs(average_from(counts, [1, 13, 25], 32, 576) - 64) < 0.5
    # A budget the steep proportions cannot reach under N: the first stage is capped, the rest take the excess.
    counts = rcp_keep_counts(100, [1, 2, 3], 4, 144)
    assert counts[0] == 144 and counts == sorted(counts, reverse=True)
    assert abs(average_from(counts, [1, 2, 3], 4, 144) - 100) <= 1 / 3
    assert rcp_keep_counts(16, [1], 2, 64) == [16]
    assert stage_proportions(3) == pytest.approx([16.72, 4.59, 1.44])
    assert stage_proportions(2) == pytest.approx([16.72, 1.44])


def test_rcp_counts_cap_nudge_and_round_exactly():
    """Pinned values of the steps `rcp_keep_counts` names: a stage capped at N hands its excess to the later
    stages in their Table VI ratio (a plain min(N, .) would leave the average short), the +-1 nudge goes down as
    well as up, and halves round up."""
    # Capped: the real first stage exceeds 576; the excess goes to 352 / 110 (without the redistribution the
    # later stages stay at their uncapped 315 / 173 shares, and the average misses k).
    assert rcp_keep_counts(384, [1, 13, 25], 32, 576) == [576, 352, 110]
    assert rcp_keep_counts(96, [1, 2, 3], 4, 144) == [144, 110, 34]
    # Nudged: a step down is what brings the average to k here.
    assert rcp_keep_counts(128, [1, 13, 25], 32, 576) == [249, 69, 22]
    assert rcp_keep_counts(2, [1, 2], 4, 16) == [4, 1]
    # Round half up: the capped first stage leaves 8.5 per layer to the second; 9 (half up) lets the nudge reach
    # 15 + 2 * 9 = 3 * 11 exactly, where half-to-even's 8 leaves [16, 8], one token short.
    assert rcp_keep_counts(11, [1, 2], 4, 16) == [15, 9]


def test_stage_proportions_interpolate_table_vi_log_linearly():
    # Four pruners: t = 0, 1/3, 2/3, 1 over Table VI's three values, geometric between neighbours.
    assert stage_proportions(4) == pytest.approx(
        [16.72, 16.72 ** (1 / 3) * 4.59 ** (2 / 3), 4.59 ** (2 / 3) * 1.44 ** (1 / 3), 1.44], rel=1e-12)
    assert stage_proportions(4) == pytest.approx([16.72, 7.0624, 3.1189, 1.44], abs=1e-4)
    assert rcp_keep_counts(192, [2, 8, 14, 20], 32, 576) == [539, 228, 101, 46]
    assert rcp_keep_counts(16, [1, 3, 5, 7], 8, 144) == [34, 14, 6, 4]


def test_method_overrides_follow_the_design():
    base = make_model(pruning_layers=[1, 2], repair_layers=[2, 3], pruning_keep_counts=None).config
    assert default_fastv_layer(4) == 1 and default_fastv_layer(32) == 2
    assert method_overrides("vispruner", 5, base)["pre_llm_keep_count"] == 5
    assert method_overrides("random", 5, base)["pruning_layers"] == []
    fastv = method_overrides("fastv", 5, base)
    assert fastv["pruning_layers"] == [1] and fastv["pruning_keep_counts"] == [5]
    rcp = method_overrides("rcp", 5, base)
    assert rcp["pruning_layers"] == [1, 2] and rcp["repair_layers"] == [2, 3]
    assert average_from(rcp["pruning_keep_counts"], [1, 2], 4, 16) == pytest.approx(5, abs=0.5)
    topk = method_overrides("attention_topk", 5, base)
    assert topk["pruning_keep_counts"] == rcp["pruning_keep_counts"] and topk["repair_layers"] == []


def test_method_model_shares_the_backbone_and_equals_a_fresh_model():
    base = make_model(randomize_plugins=True)  # pruning [1, 2] keep [10, 5], repair [2, 3]
    reference = make_model(randomize_plugins=True, pruning_keep_counts=[8, 3])
    model = method_model(base, pruning_keep_counts=[8, 3])
    assert model.model.language_model is base.model.language_model and model.lm_head is base.lm_head
    assert model.model.rcp_plugins is base.model.rcp_plugins  # same placement: the trained plug-ins
    batch = make_batch([(2, 4, True), (0, 6, True)])
    with torch.no_grad():
        got, want = model(**batch, use_cache=False), reference(**batch, use_cache=False)
    torch.testing.assert_close(got.logits, want.logits)
    assert got.kept_counts.tolist() == [[8, 3], [8, 3]]
    vis = method_model(base, **method_overrides("vispruner", 4, base.config))
    assert len(vis.model.rcp_plugins.pruners) == 0 and vis.model.vision_tower is base.model.vision_tower
    assert scheduled_tokens_per_layer(vis.config) == [4, 4, 4, 4]
    assert base.config.pruning_keep_counts == [10, 5]  # the base is untouched


def test_reference_token_counts_are_the_answer_tokens_without_bos():
    """Greedy scoring generates as many tokens as the reference has: a tokenizer that adds BOS (Llama's) must not
    add one to that count, or every one-token answer is scored on two generated tokens."""
    from conftest import sentencepiece_like_processor
    from rcp_llava.evaluation import reference_token_counts

    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    assert processor.tokenizer(["two"])["input_ids"][0][0] == processor.tokenizer.bos_token_id  # it adds BOS
    assert reference_token_counts(processor, ["two", "cats", "There are two cats."]) == [1, 1, 4]
    assert reference_token_counts(processor, []) == []


def test_relative_scores():
    rows = [{"method": "none", "score": 0.8, "groups": {"a": 0.5, "b": 1.0}},
            {"method": "rcp", "score": 0.4, "groups": {"a": 0.5, "b": 0.25}},
            {"method": "fastv", "score": 0.2, "groups": {"a": 0.0, "b": 0.5}}]
    add_relative(rows)
    assert rows[1]["relative"] == pytest.approx(0.5)
    assert rows[1]["groups_relative"] == pytest.approx({"a": 1.0, "b": 0.25})
    assert rows[1]["mean_group_relative"] == pytest.approx(0.625)
    assert rows[2]["mean_group_relative"] == pytest.approx(0.25)
    # A group the full model scores 0 has no ratio: the mean is over the groups that have one (not a 0 for it, not
    # a division by every group)
    rows = add_relative([{"method": "none", "score": 0.5, "groups": {"color": 1.0, "count": 0.0}},
                         {"method": "rcp", "score": 0.4, "groups": {"color": 0.8, "count": 0.0}}])
    assert rows[1]["groups_relative"] == {"color": pytest.approx(0.8), "count": None}
    assert rows[1]["mean_group_relative"] == pytest.approx(0.8)


# -- the command, figures and ablations on the micro testbed -------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro testbed and an RCP folder made from its stock model (untrained plug-ins, pruner before layer 1)."""
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.testbed import build_testbed

    root = tmp_path_factory.mktemp("micro")
    folder = build_testbed("micro", output_dir=root / "testbed", pruning_eval=False)
    rcp = RcpLlavaForConditionalGeneration.from_pretrained(
        folder / "model", pruning_layers=[1], repair_layers=[1], pruner_hidden_size=8, repair_bottleneck_size=8,
        visual_token_budget=16.0)
    rcp.save_pretrained(root / "rcp")
    AutoProcessor.from_pretrained(folder / "model").save_pretrained(root / "rcp")
    return root, folder


def test_evaluate_methods_command_on_micro(micro, tmp_path):
    evaluate_methods = load_benchmark("evaluate_methods")

    root, folder = micro
    evaluate_methods.main(["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--max_samples", "8",
                           "--methods", "none,rcp,vispruner,fastv,random", "--budgets", "1/3,2/9,1/9",
                           "--output_dir", str(tmp_path), "--name", "t", "--no_progress"])
    saved = json.loads((tmp_path / "t.json").read_text())
    (result,) = saved["results"]
    rows = result["rows"]
    labels = [(r["label"], r["budget"]) for r in rows]
    budgets = ["1/3", "2/9", "1/9"]
    expected = [("none", "full")] + [("rcp", b) for b in budgets] + [("rcp (adaptive)", "adaptive")] + [
        (m, b) for m in ("vispruner", "fastv", "random") for b in budgets]
    assert labels == expected
    n, layers = 64, 2
    full = rows[0]
    assert full["avg_tokens_all_layers"] == n and full["n"] == 8
    for r in rows[1:]:
        assert r["n"] == 8
        if r["budget"] == "adaptive":
            continue
        k = budget_count(parse_budget(r["budget"])[1], n)
        assert r["k"] == k
        per_layer = visual_tokens_per_layer(layers, n, r["pruning_points"], r["keep_counts"])
        assert r["tokens_per_layer"] == per_layer  # measured kept tokens = the configured schedule
        assert r["kept_per_point"] == [float(c) for c in r["keep_counts"]]
        if r["method"] in ("vispruner", "random"):
            assert r["pruning_points"] == [0] and r["avg_tokens_all_layers"] == k
        else:  # rcp and fastv prune before layer 1: layer 0 sees all N
            assert r["pruning_points"] == [1] and r["avg_tokens_from_first_point"] == k
            assert r["avg_tokens_all_layers"] == (n + k) / 2
        assert r["relative"] == (r["score"] / full["score"] if full["score"] else None)
    md = (tmp_path / "t.md").read_text()
    assert "Command: `python benchmarks/evaluate_methods.py --model" in md
    lines = md.splitlines()
    assert sum(line.startswith("| rcp | ") for line in lines) == 3
    assert "| rcp (adaptive) | adaptive |" in md and "% of N" in md
    # RCP against every other method at each budget, on the same samples (exact McNemar).
    tests = result["paired_tests"]
    assert [(t["budget"], t["method"]) for t in tests] == [
        (b, m) for b in budgets for m in ("vispruner", "fastv", "random")]
    by_label = {(r["label"], r["budget"]): r for r in rows}
    for t in tests:
        rcp, other = by_label[("rcp", t["budget"])], by_label[(t["method"], t["budget"])]
        assert t["delta"] == pytest.approx(rcp["score"] - other["score"])
        assert (t["a_only"] - t["b_only"]) / 8 == pytest.approx(t["delta"])
        assert 0.0 <= t["p_value"] <= 1.0 and set(t["groups"]) == set(rcp["groups"])
    assert sum(line.startswith("| 1/9 | rcp | ") for line in lines) == 3


def test_paired_tests_take_the_fixed_count_row_as_reference_only():
    """With --plugins_per_budget, each `rcp (adaptive, b)` row (method rcp, budget b) was a reference too: tested
    against every baseline at its own, larger compute (README's "beats VisPruner at 2/9, p = 0.008" came from it),
    and every pair with the fixed-count row appeared twice, once each way round."""
    from rcp_llava.evaluation import paired_tests

    def row(label, method, budget, correct):
        return {"label": label, "method": method, "budget": budget, "score": sum(correct) / len(correct),
                "correct": correct, "group_of": ["g"] * len(correct)}

    rows = [row("none", "none", "full", [1, 1, 1, 1]), row("rcp", "rcp", "2/9", [1, 1, 0, 1]),
            row("rcp (adaptive, 2/9)", "rcp", "2/9", [1, 1, 1, 1]), row("vispruner", "vispruner", "2/9", [1, 0, 0, 1]),
            row("rcp (adaptive)", "rcp", "adaptive", [1, 1, 1, 0])]
    tests = paired_tests(rows)
    assert [(t["reference"], t["method"]) for t in tests] == [("rcp", "rcp (adaptive, 2/9)"), ("rcp", "vispruner")]
    assert [t["delta"] for t in tests] == [-0.25, 0.25]


def test_dataset_folders_are_named_by_their_spec_and_mmbench_counts_its_questions(tmp_path):
    """Every dataset folder was labelled "testbed" (a run over several could not be told apart), and MMBench's
    heading counted rows while its score is over circular questions."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    from rcp_llava.evaluation import format_table, load_data

    rows = {"image": [Image.new("RGB", (4, 4))], "question": ["q"], "answer": ["a"]}
    for name in ("one", "two"):
        DatasetDict({"test": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / name))
    assert [load_data(str(tmp_path / name)).name for name in ("one", "two")] == [str(tmp_path / "one"),
                                                                              str(tmp_path / "two")]
    row = {"label": "none", "method": "none", "budget": "full", "k": 64, "kept_per_point": None, "pruning_points": [],
           "avg_tokens_all_layers": 64.0, "avg_tokens_from_first_point": 64.0, "groups": {}, "groups_relative": {},
           "score": 0.5, "relative": 1.0, "mean_group_relative": None,
           "metric": {"exact_match": 0.5, "per_row_exact_match": 0.6, "num_questions": 10, "num_rows": 20}}
    result = {"rows": [row], "num_visual_tokens": 64, "num_layers": 4, "data": "mmbench", "num_samples": 20,
              "metric": "exact_match", "model": "m"}
    assert "**mmbench** (20 rows = 10 circular questions, exact_match)" in format_table(result)
    del row["metric"]["num_questions"]
    assert "**mmbench** (20 samples, exact_match)" in format_table(result)


def test_mcnemar_exact_values():
    from rcp_llava.evaluation import mcnemar

    assert mcnemar([1, 1, 0], [1, 1, 0]) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    # 6 discordant pairs, all favouring a: p = 2 * (1/2)^6.
    assert mcnemar([1] * 6 + [0, 1], [0] * 6 + [0, 1]) == {"a_only": 6, "b_only": 0, "p_value": 2 / 64}
    # 5 vs 1: p = 2 * (C(6,0) + C(6,1)) / 64 = 14 / 64.
    assert mcnemar([1] * 5 + [0], [0] * 5 + [1])["p_value"] == pytest.approx(14 / 64)
    with pytest.raises(ValueError, match="Paired outcomes differ in length: 2 vs 1"):
        mcnemar([1, 0], [1])
    assert mcnemar([True, 1.0, False], [False, 0, 0]) == {"a_only": 2, "b_only": 0, "p_value": 0.5}
    # counted by truth value, three discordant pairs of strings were none, and 0.5 a right answer
    for a, b, bad in ((["0", "1", "0"], [1, 0, 1], "correct_a"), ([0, 0], [0.5, 1], "correct_b"),
                      ([None, 1], [0, 0], "correct_a")):
        with pytest.raises(ValueError, match=rf"^`{bad}` must hold 0/1 \(or bool\) outcomes, got "):
            mcnemar(a, b)


def test_per_budget_plugins_need_rcp_among_the_methods():
    """`plugins_per_budget` added `rcp (adaptive, b)` rows to a grid whose methods had no rcp."""
    from rcp_llava.evaluation import evaluate_grid

    with pytest.raises(ValueError, match=r"^`plugins_per_budget` gives RCP's plug-ins per budget, but `methods` "
                                         r"\['none', 'vispruner'\] has no 'rcp'; add it or drop `plugins_per_budget`"):
        evaluate_grid(None, None, None, ["none", "vispruner"], ["1/3"], plugins_per_budget={"1/3": "somewhere"})


def test_evaluate_methods_writes_every_datasets_results(micro, tmp_path):
    """Several --data: the JSON holds one result per dataset, as the markdown does (not the first alone)."""
    evaluate_methods = load_benchmark("evaluate_methods")

    root, folder = micro
    evaluate_methods.main(["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--data",
                           str(folder / "dataset") + "/", "--max_samples", "2", "--methods", "none", "--output_dir",
                           str(tmp_path), "--name", "t", "--no_progress"])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert len(saved["results"]) == 2 and [len(r["rows"]) for r in saved["results"]] == [1, 1]

def test_figures_on_micro(micro, tmp_path):
    evaluate_methods = load_benchmark("evaluate_methods")
    figures = load_benchmark("figures")

    root, folder = micro
    evaluate_methods.main(["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--max_samples", "4",
                           "--methods", "none,rcp,fastv", "--budgets", "1/9", "--output_dir", str(tmp_path),
                           "--name", "t", "--no_progress"])
    written = figures.main(["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--num_samples", "6",
                            "--num_images", "2", "--table", str(tmp_path / "t.json"), "--output_dir", str(tmp_path),
                            "--name", "m"])
    for name in ("drift_m.png", "masks_m.png", "accuracy_vs_tokens_m.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    assert len(written) == 3

    # The drift numbers: nothing differs before the first pruner; fresh adapters already act (the authors' gate
    # 0.1 at init, issue 15: they were an exact no-op before), and fresh pruners rank by the LLM's own attention
    # plus a near-inert cross score (aggregate 1/N_q of the attention probabilities).
    from rcp_llava.evaluation import load_base_model, load_data

    base, processor = load_base_model(root / "rcp")
    rows = [load_data(str(folder / "dataset"), max_samples=6).rows[i] for i in range(6)]
    result = figures.drift_and_masks(base, processor, rows, "1/9", mask_rows=rows[:2])
    curves = result["curves"]
    assert set(curves) == {"RCP with repair adapters", "RCP without repair", "attention top-k, no repair",
                           "random, no repair"}
    assert all(len(v) == 2 and v[0] == 0.0 for v in curves.values())
    assert curves["RCP without repair"][1] > 0
    assert curves["RCP with repair adapters"][1] != pytest.approx(curves["RCP without repair"][1], rel=1e-3)
    assert curves["attention top-k, no repair"][1] > 0 and curves["random, no repair"][1] > 0
    assert result["masks"].shape == (2, 1, 64) and result["masks"].sum(-1).tolist() == [[7], [7]]


def test_ablation_adapters_off_records_no_repair_layers(micro):
    """`adapters_off` evaluates `full`'s model with its adapters disabled: its rows must not list the adapters it ran
    without (the table's *repair layers* column), in both modes; with them on, they are listed."""
    ablations = load_benchmark("ablations")
    from rcp_llava.evaluation import load_base_model, load_data

    root, folder = micro
    base, processor = load_base_model(root / "rcp")
    data = load_data(str(folder / "dataset"), max_samples=4)
    on = ablations.evaluate_variant(base, processor, data, "1/9", 4)
    off = ablations.evaluate_variant(base, processor, data, "1/9", 4, repair=False)
    assert on["fixed"]["repair_layers"] == on["adaptive"]["repair_layers"] == [1]
    assert off["fixed"]["repair_layers"] == off["adaptive"]["repair_layers"] == []

def test_ablation_runner_smoke_on_micro(micro, tmp_path):
    ablations = load_benchmark("ablations")

    _, folder = micro
    train_args = (f"--base_model {folder / 'model'} --dataset_name_or_path {folder / 'dataset'} --pruning_layers 1 "
                  "--repair_layers 1 --pruner_hidden_size 8 --repair_bottleneck_size 8 --budget_fraction 0.25 "
                  "--per_device_train_batch_size 2 --use_cpu --disable_tqdm true --save_strategy no")
    argv = ["--variants", "no_adapters", "attention_topk", "--max_steps", "1", "--max_eval_samples", "8",
            "--dataset", str(folder / "dataset"), "--output_dir", str(tmp_path), "--name", "abl", "--train_args",
            train_args, "--work_dir", str(tmp_path / "work")]
    result = ablations.main(argv)
    variants = {r["variant"]: r for r in result["variants"]}
    assert list(variants) == ["full", "no_adapters", "attention_topk"]  # `full` added: attention_topk needs it
    assert variants["no_adapters"]["fixed"]["repair_layers"] == []
    saved = json.loads((tmp_path / "work" / "abl" / "no_adapters" / "model" / "config.json").read_text())
    assert saved["repair_layers"] == []
    assert variants["full"]["fixed"]["repair_layers"] == [1]
    assert variants["attention_topk"]["fixed"]["keep_counts"] == variants["full"]["fixed"]["keep_counts"] == [7]
    assert variants["attention_topk"]["trained"] is False and "adaptive" not in variants["attention_topk"]
    for r in result["variants"]:
        assert r["fixed"]["avg_tokens_from_first_point"] == 7 and r["fixed"]["n"] == 8
    assert result["table6"]["percent_of_n"] == pytest.approx([100 * variants["full"]["adaptive"]["kept_per_point"][0]
                                                              / 64])
    # paired tests against `full` on the same samples, from the per-sample outcomes kept in the JSON
    from rcp_llava.evaluation import mcnemar

    assert variants["full"]["fixed"]["vs_full"] is None and len(variants["full"]["fixed"]["correct"]) == 8
    for v in ("no_adapters", "attention_topk"):
        assert variants[v]["fixed"]["vs_full"] == mcnemar(variants[v]["fixed"]["correct"],
                                                          variants["full"]["fixed"]["correct"])
    md = (tmp_path / "abl.md").read_text()
    assert md.startswith("# Ablations") and "Command: `python benchmarks/ablations.py" in md
    test = variants["attention_topk"]["fixed"]["vs_full"]
    assert f"| {test['a_only']}/{test['b_only']}, p {test['p_value']:.2g} |" in md
    assert "| no_adapters | yes (1 steps) |" in md and "Table VI" in md

    # the table is not replaced unless asked
    with pytest.raises(FileExistsError, match=r"abl.md, .*abl.json already exist: .* pass --overwrite"):
        ablations.main(argv)
    argv.append("--overwrite")
    # a rerun reuses the trained variants; after the base model's weights change it trains them again
    assert variants["no_adapters"]["train_seconds"] is not None
    rerun = {r["variant"]: r for r in ablations.main(argv)["variants"]}
    assert rerun["no_adapters"]["train_seconds"] is None and rerun["full"]["train_seconds"] is None
    assert rerun["no_adapters"]["fixed"]["score"] == variants["no_adapters"]["fixed"]["score"]
    weights = folder / "model" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rebuilt base, same path
    rebuilt = {r["variant"]: r for r in ablations.main(argv)["variants"]}
    assert rebuilt["no_adapters"]["train_seconds"] is not None and rebuilt["full"]["train_seconds"] is not None


def test_load_data_testbed_means_the_main_jobs_testbed(micro, tmp_path, monkeypatch):
    """`"testbed"` is the main job's testbed (deep since issue 16; it was always tiny), `"testbed:NAME"` another."""
    from datasets import load_from_disk

    from rcp_llava.evaluation import load_data

    _, folder = micro
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    (tmp_path / "testbed" / "deep").mkdir(parents=True)
    (tmp_path / "testbed" / "deep" / "dataset").symlink_to(folder / "dataset")
    data = load_data("testbed")
    assert data.kind == "testbed" and len(data) == len(load_from_disk(str(folder / "dataset"))["test"])
    assert len(load_data("testbed:deep")) == len(data)
    assert len(load_data(folder / "dataset")) == len(data)  # a Path, as before the "testbed:" prefix
    missing = tmp_path / "testbed" / "tiny" / "dataset"
    with pytest.raises(FileNotFoundError, match=rf"The 'tiny' testbed is not built \({missing}\); run `python "
                                                r"benchmarks/build_testbed.py --preset tiny` \(or `python train_rcp.py "
                                                r"--testbed_preset tiny`, which builds it\)\."):
        load_data("testbed:tiny")
    with pytest.raises(ValueError, match=r"Unknown testbed preset 'huge' in 'testbed:huge'; choose one of \["):
        load_data("testbed:huge")


def test_ablation_runner_defaults_to_the_testbed_the_variants_train_on(tmp_path, monkeypatch):
    """Without --dataset the runner evaluates on the testbed that `train_rcp.py` trains on: `--testbed_preset` in
    --train_args, else the main job's default (deep) -- it used to assume tiny."""
    import train_rcp

    ablations = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    assert ablations.job_testbed(["--max_steps", "3"]) == train_rcp.MAIN_TESTBED == "deep"
    assert ablations.job_testbed(["--testbed_preset", "tiny"]) == "tiny"
    # both spellings train_rcp accepts, the last one winning as in argparse
    assert ablations.job_testbed(["--testbed_preset=tiny", "--max_steps", "3"]) == "tiny"
    assert ablations.job_testbed(["--testbed_preset", "tiny", "--testbed_preset=micro"]) == "micro"
    assert ablations.flag_value(["--base_model=/m", "--testbed_preset", "tiny"], "--base_model") == "/m"
    model = tmp_path / "testbed" / "deep" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"12345")
    assert [f[:2] for f in ablations.base_weights_fingerprint([])] == [["model.safetensors", 5]]
    loaded = []
    monkeypatch.setattr("rcp_llava.evaluation.load_data", lambda spec, **kw: loaded.append((spec, kw.get(
        "image_folder"))) or [])
    # stop right after the data is read (the variant names are checked before it)
    monkeypatch.setattr(ablations, "check_variants", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    for train_args, preset in (([], "deep"), (["--testbed_preset", "tiny"], "tiny")):
        with pytest.raises(RuntimeError, match="stop"):
            ablations.run(["full"], train_args, str(tmp_path), "abl")
        assert loaded[-1] == (f"testbed:{preset}", None)  # resolved by load_data (its own test)
    # Variants that train on a DatasetDict of one's own are scored on its test split, with its --image_folder (was:
    # on the deep testbed's)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for train_args in (["--dataset_name_or_path", str(mine)], ["--base_model", "/m", f"--dataset_name_or_path={mine}",
                                                                "--image_folder", "/imgs"]):
        with pytest.raises(RuntimeError, match="stop"):
            ablations.run(["full"], train_args, str(tmp_path), "abl")
        assert loaded[-1] == (str(mine), "/imgs" if "/m" in train_args else None)
    # ... and data without such a split is not scored on whatever load_data would read of it: --dataset is asked for
    (mine / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    for train_args, named in (([f"--dataset_name_or_path={mine}"], f"--dataset_name_or_path '{mine}', which is not"),
                              (["--dataset_name_or_path", "user/vqa"], "--dataset_name_or_path 'user/vqa', which is not"),
                              (["--llava_json", "x.json", "--dataset_name_or_path", str(mine)],
                               "--llava_json 'x.json', which has no test split")):
        with pytest.raises(ValueError, match=rf"^--dataset: the variants train on --train_args' {re.escape(named)}"):
            ablations.run(["full"], train_args, str(tmp_path), "abl")


def test_ablation_runner_reads_an_unbuilt_default_testbed_after_the_first_training(tmp_path, monkeypatch):
    """On a fresh machine the first variant's training builds the testbed: the runner reads it after that run
    instead of failing before it; a --dataset that is not there still fails before any training."""
    ablations = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    events = []

    def load_data(spec, **kwargs):
        events.append(("load", spec))
        if "train" not in [e[0] for e in events]:
            from rcp_llava.evaluation import data_folder

            return data_folder(spec)  # the real resolution: FileNotFoundError, nothing is built
        raise RuntimeError("read after training")

    monkeypatch.setattr("rcp_llava.evaluation.load_data", load_data)
    monkeypatch.setattr("rcp_llava.evaluation.load_base_model", lambda folder: (None, None))
    monkeypatch.setattr(ablations, "train_variant",
                        lambda v, args, folder, steps, reuse: events.append(("train", v)) or (folder, 1.0, []))
    with pytest.raises(RuntimeError, match="read after training"):
        ablations.run(["full"], ["--testbed_preset", "tiny"], str(tmp_path), "abl")
    assert events == [("load", "testbed:tiny"), ("train", "full"), ("load", "testbed:tiny")]

    events.clear()
    with pytest.raises(FileNotFoundError, match="The 'tiny' testbed is not built"):
        ablations.run(["full"], [], str(tmp_path), "abl", dataset="testbed:tiny")
    assert events == [("load", "testbed:tiny")]  # no training
    events.clear()  # a misspelt variant is named first (it was the unbuilt testbed, then, once built, the name)
    with pytest.raises(ValueError, match="Unknown variant 'no_repair'"):
        ablations.run(["full", "no_repair"], [], str(tmp_path), "abl", dataset="testbed:tiny")
    assert events == []
    # jobs that train from --base_model on no dataset have no default data: --dataset is asked for
    with pytest.raises(ValueError, match=r"^--dataset: the variants train from --train_args' --base_model on no "
                                         r"--dataset_name_or_path, so there is no test split"):
        ablations.run(["full"], ["--base_model", str(tmp_path)], str(tmp_path), "abl")
    assert events == []  # no training, nothing read
    with pytest.raises(ValueError, match="variants: none given; name at least one, e.g. full no_repair_loss"):
        ablations.run([], [], str(tmp_path), "abl")


# -- FLOP-matched budgets and the in-decoder oracle (issue 16) ------------------------------------------------


def _shape(num_layers, n, pruning_layers, repair_layers=()):
    from types import SimpleNamespace

    return SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=num_layers), num_visual_tokens=n,
                           pruning_layers=list(pruning_layers), repair_layers=list(repair_layers))


def test_flop_matched_overrides_average_k_over_all_layers():
    from rcp_llava.evaluation import method_overrides
    from rcp_llava.flops import keep_counts_for_budget
    from rcp_llava.schedule import stage_proportions

    shape = _shape(16, 144, [1, 7, 13], [11, 15])  # the deep testbed at 1/9: k = 16
    rcp = method_overrides("rcp", 16, shape, flop_matched=True)
    assert rcp["pruning_keep_counts"] == keep_counts_for_budget(16, 144, [1, 7, 13], 16, stage_proportions(3))
    per_layer = visual_tokens_per_layer(16, 144, [1, 7, 13], rcp["pruning_keep_counts"])
    assert sum(per_layer) / 16 == pytest.approx(16, abs=0.5)
    assert method_overrides("attention_topk", 16, shape, flop_matched=True)["pruning_keep_counts"] == \
        rcp["pruning_keep_counts"]
    # FastV's K = 2 cannot reach 16 (2 x 144 > 16 x 16): K = 1 keeps round((256 - 144) / 15) = 7
    fastv = method_overrides("fastv", 16, shape, flop_matched=True)
    assert fastv["pruning_layers"] == [1] and fastv["pruning_keep_counts"] == [7]
    # at 1/3 (k = 48) the default K = 2 reaches it: (768 - 288) / 14 = 34.3 -> 34
    assert method_overrides("fastv", 48, shape, flop_matched=True)["pruning_keep_counts"] == [34]
    assert method_overrides("vispruner", 16, shape, flop_matched=True)["pre_llm_keep_count"] == 16
    with pytest.raises(ValueError, match=r"'fastv' cannot average 16 visual tokens over all 16 layers"):
        method_overrides("fastv", 16, shape, fastv_layer=2, flop_matched=True)
    with pytest.raises(ValueError, match=r"cannot be reached with pruning layers \[1, 7, 13\]"):
        method_overrides("rcp", 8, shape, flop_matched=True)  # layer 0 alone averages 9


def test_oracle_keep_masks_keep_evidence_then_objects():
    from rcp_llava.evaluation import oracle_keep_masks_fn

    rows = [{"id": 3, "evidence_patches": [5, 9], "object_patches": [5, 9, 20, 21, 22]},
            {"id": 4, "evidence_patches": [1, 2, 3, 4], "object_patches": [1, 2, 3, 4]}]
    masks = oracle_keep_masks_fn([6, 3], 32)(0, rows)
    assert masks.shape == (2, 2, 32) and masks.sum(-1).tolist() == [[6, 3], [6, 3]]
    assert (masks[:, 1] <= masks[:, 0]).all()  # cumulative
    assert set(masks[0, 0].nonzero().flatten().tolist()) >= {5, 9, 20, 21, 22}
    assert set(masks[0, 1].nonzero().flatten().tolist()) >= {5, 9}
    assert set(masks[0, 1].nonzero().flatten().tolist()) - {5, 9} <= {20, 21, 22}
    assert set(masks[1, 1].nonzero().flatten().tolist()) < {1, 2, 3, 4}
    assert torch.equal(masks, oracle_keep_masks_fn([6, 3], 32)(5, rows))  # seeded per row, not per batch


def test_grid_bookkeeping_percentages_unknown_plugin_budgets_and_unnamed_groups(micro):
    """The retention table's percent of N is a percentage of the measured kept counts; plug-in sets for budgets the
    grid does not run are refused before anything runs (they ran as extra rows); and a benchmark row without a
    family is scored in the group "all"."""
    from rcp_llava.evaluation import evaluate_grid, load_base_model, load_data, score_benchmark
    from rcp_llava.readers import VqaRecord

    root, folder = micro
    base, processor = load_base_model(str(root / "rcp"))
    data = load_data(str(folder / "dataset"), max_samples=4)
    table = evaluate_grid(base, processor, data, ["none", "rcp"], ["1/3"], progress=False)["per_layer_retention"]
    n = base.config.num_visual_tokens
    assert table["kept"] and table["percent_of_n"] == pytest.approx([100 * k / n for k in table["kept"]])
    with pytest.raises(ValueError, match=re.escape("`plugins_per_budget` names budgets ['1/2'] that are not among "
                                                   "['1/3'].")):
        evaluate_grid(base, processor, data, ["none", "rcp"], ["1/3"], progress=False,
                      plugins_per_budget={"1/2": str(root / "rcp")})
    records = [VqaRecord(str(i), "x.jpg", "q", ["yes"], family="", benchmark="gqa") for i in range(2)]
    assert score_benchmark("gqa", ["yes", "no"], records)["groups"] == {"all": 0.5}


def test_the_oracle_without_attention_topk_is_refused(micro):
    """Its rows go beside attention_topk's (same layers and counts): without one the grid ran no oracle row."""
    from rcp_llava.evaluation import evaluate_grid, load_base_model, load_data

    root, folder = micro
    base, processor = load_base_model(str(root / "rcp"))
    data = load_data(str(folder / "dataset"), max_samples=2)
    with pytest.raises(ValueError, match=r"^`oracle` adds a row per `attention_topk` row \(its layers and counts\), "
                                         r"but `methods` \['none', 'rcp'\] has no 'attention_topk'; add it"):
        evaluate_grid(base, processor, data, ["none", "rcp"], ["1/3"], oracle=True, progress=False)


def test_mean_text_tokens_counts_the_prompt_without_its_visual_tokens(micro):
    """The text part of the prefill the FLOPs are counted at: the processor's prompt (its <image> expanded to the
    image's tokens) less those tokens, averaged over the rows. The placeholder itself is not a text token."""
    from transformers import AutoProcessor

    from rcp_llava.data import prompt_messages
    from rcp_llava.evaluation import load_data, mean_text_tokens

    root, folder = micro
    processor = AutoProcessor.from_pretrained(root / "rcp")
    data = load_data(str(folder / "dataset"), max_samples=6)
    lengths = []
    for row in data.rows:
        text = processor.apply_chat_template(prompt_messages(row[data.question_column]), add_generation_prompt=True)
        ids = processor(text=[text], images=[row["image"]], add_special_tokens=False)["input_ids"][0]
        lengths.append(len(ids) - list(ids).count(processor.tokenizer.convert_tokens_to_ids(processor.image_token)))
    assert min(lengths) > 0
    assert mean_text_tokens(processor, data) == round(sum(lengths) / len(lengths))
    assert mean_text_tokens(processor, data, max_rows=1) == lengths[0]


def test_flop_matched_grid_with_the_oracle_on_micro(micro, tmp_path):
    evaluate_methods = load_benchmark("evaluate_methods")
    from rcp_llava.flops import decoder_layer_flops

    root, folder = micro
    evaluate_methods.main(["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--max_samples", "8",
                           "--methods", "none,rcp,attention_topk,fastv,vispruner", "--budgets", "3/4,1/9",
                           "--flop_matched", "--oracle", "--output_dir", str(tmp_path), "--name", "f",
                           "--no_progress"])
    result = json.loads((tmp_path / "f.json").read_text())["results"][0]
    rows = {(r["label"], r["budget"]): r for r in result["rows"]}
    # 3/4 of 64 = 48 per layer over both layers: the in-decoder methods keep 32 after layer 1, VisPruner 48
    for label in ("rcp", "attention_topk", "oracle (in-decoder)", "fastv", "vispruner"):
        assert rows[(label, "3/4")]["avg_tokens_all_layers"] == 48, label
    assert rows[("oracle (in-decoder)", "3/4")]["keep_counts"] == rows[("attention_topk", "3/4")]["keep_counts"] == [32]
    # 1/9 (k = 7): layer 0 alone averages 32, so every in-decoder cell is listed as not run; VisPruner runs
    assert sorted(c["method"] for c in result["infeasible"]) == ["attention_topk", "fastv", "rcp"]
    assert ("vispruner", "1/9") in rows and ("rcp", "1/9") not in rows and ("oracle (in-decoder)", "1/9") not in rows
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root / "rcp")
    text = result["mean_text_tokens"]
    assert text > 0
    for r in result["rows"]:
        assert r["decoder_gflops"] == pytest.approx(
            sum(decoder_layer_flops(config, text + round(v)) for v in r["tokens_per_layer"]) / 1e9)
    assert rows[("vispruner", "3/4")]["decoder_gflops"] < rows[("none", "full")]["decoder_gflops"]
    md = (tmp_path / "f.md").read_text()
    assert "**FLOP-matched**" in md and "*rcp at 1/9 (k=7) not run*" in md and "| oracle (in-decoder) | 3/4" in md


def test_rank_auc_hand_computed():
    selection_signal = load_benchmark("selection_signal")
    auc = selection_signal.rank_auc
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75  # 3 of the 4 pairs ordered right
    assert auc([1, 2, 3], [True, False, False]) == 0.0
    assert auc([2, 2, 1], [True, False, False]) == 0.75  # the tie counts half: (0.5 + 1) / 2
    assert math.isnan(auc([1, 2], [True, True]))
    with pytest.raises(ValueError, match="one flag per score"):
        auc([1, 2, 3], [True, False])


def test_selection_signal_on_micro(micro, tmp_path):
    """At the first pruning point nothing is pruned yet, so the student's Eq. (4) prior is the centred log of the
    frozen teacher's question attention at that layer, token for token."""
    from datasets import load_from_disk
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    selection_signal = load_benchmark("selection_signal")
    root, folder = micro
    model = RcpLlavaForConditionalGeneration.from_pretrained(root / "rcp").eval()
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(3))
    table = selection_signal.collect(model, AutoProcessor.from_pretrained(root / "rcp"), rows, batch_size=2)[1]
    prior = torch.tensor(table["prior"]).view(3, 64)  # every token alive: 64 per sample, raster order
    attention = torch.tensor(table["teacher question"]).view(3, 64).log()
    torch.testing.assert_close(prior, attention - attention.mean(1, keepdim=True), rtol=0, atol=1e-5)
    evidence = torch.tensor(table["evidence"]).view(3, 64).bool()
    for i in range(3):
        assert sorted(evidence[i].nonzero().flatten().tolist()) == sorted(rows[i]["evidence_patches"])
    # "teacher answer": layer 1's attention from the prompt's last token (which predicts the answer), as the stock
    # model's eager attention reports it on the prompt alone (causal: the answer after it changes nothing)
    from transformers import LlavaForConditionalGeneration

    from rcp_llava.data import load_image, prompt_batch

    stock = LlavaForConditionalGeneration.from_pretrained(folder / "model", attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(root / "rcp")
    answer = torch.tensor(table["teacher answer"]).view(3, 64)
    for i in range(3):
        batch = prompt_batch(processor, [rows[i]["question"]], [load_image(rows[i]["image"])])
        with torch.no_grad():
            attentions = stock(**batch, output_attentions=True).attentions[1]  # (1, H, T, T)
        image = batch["input_ids"][0] == stock.config.image_token_index
        torch.testing.assert_close(answer[i], attentions[0, :, -1, image].mean(0), rtol=1e-4, atol=1e-6)

    argv = ["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--split", "test", "--max_samples", "8",
            "--batch_size", "3", "--output_dir", str(tmp_path), "--name", "s"]
    summary = selection_signal.main(argv)
    row = summary["1"]
    assert row["alive"] == 8 * 64
    assert all(0.0 <= row[s]["all"] <= 1.0 for s in selection_signal.SIGNALS)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary)) and saved["samples"] == 8
    assert "| 1 | 512 |" in (tmp_path / "s.md").read_text()
    with pytest.raises(FileExistsError, match="s.md"):
        selection_signal.main(argv)


def test_headroom_split_on_micro(micro, tmp_path):
    """With the oracle at no point the split's kept sets are attention_topk's; at every point they are the in-decoder
    oracle's of `evaluate_methods --oracle`, token for token."""
    import modeling_rcp_llava as M
    from conftest import NUM_VISUAL
    from configuration_rcp_llava import PRUNING_METHODS
    from rcp_llava.evaluation import load_data, oracle_keep_masks_fn, oracle_order

    headroom_split = load_benchmark("headroom_split")
    base = make_model(randomize_plugins=True)  # 4 layers, 16 visual tokens
    specs = [(2, 4, True), (0, 3, True), (1, 5, True)]
    batch = make_batch(specs)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(len(specs)):
        order = torch.randperm(NUM_VISUAL, generator=g).tolist()
        rows.append({"id": i, "evidence_patches": order[:2], "object_patches": order[:7]})
    layers, counts = [1, 2], [10, 4]
    topk = method_model(base, pruning_method="attention_topk", pruning_layers=layers, pruning_keep_counts=counts,
                        repair_layers=[])
    with torch.no_grad():
        reference = topk(**batch).keep_masks  # (B, 2, N)
    for subset, expected in [((), reference), ((0, 1), oracle_keep_masks_fn(counts, NUM_VISUAL)(0, rows)),
                             ((1,), None)]:
        with headroom_split.evidence_first_method(subset, NUM_VISUAL) as selector:
            selector.rows = rows
            model = method_model(base, pruning_method="evidence_first", pruning_layers=layers,
                                 pruning_keep_counts=counts, repair_layers=[])
            with torch.no_grad():
                masks = model(**batch).keep_masks
        assert "evidence_first" not in M.SELECTORS and "evidence_first" not in PRUNING_METHODS  # removed again
        if expected is not None:
            assert torch.equal(masks, expected), subset
        else:  # the prior's choice at the first point, then the oracle's preference among what it left
            assert torch.equal(masks[:, 0], reference[:, 0])
            for b, row in enumerate(rows):
                alive = set(masks[b, 0].nonzero().flatten().tolist())
                best = [i for i in oracle_order(row, NUM_VISUAL) if i in alive][:4]
                assert sorted(best) == masks[b, 1].nonzero().flatten().tolist()
    assert not torch.equal(reference, oracle_keep_masks_fn(counts, NUM_VISUAL)(0, rows))  # the check can fail

    root, folder = micro
    data = load_data(str(folder / "dataset"), split="test")
    argv = ["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--layers", "1", "--counts", "6",
            "--batch_size", "3", "--output_dir", str(tmp_path), "--name", "h"]
    results = {tuple(r["oracle_points"]): r for r in headroom_split.main(argv)}
    assert sorted(results) == [(), (0,)] and len(results[()]["correct"]) == len(data.rows)
    assert results[()]["mcnemar_vs_prior"] == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    md = (tmp_path / "h.md").read_text()
    assert "| none (attention_topk) |" in md and "\n| 1 |" in md
    with pytest.raises(FileExistsError, match="h.md"):
        headroom_split.main(argv)
    base_argv = ["--model", str(root / "rcp"), "--data", str(folder / "dataset"), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="one count per layer"):
        headroom_split.main(base_argv + ["--layers", "1", "--counts", "6,3", "--name", "x"])
    with pytest.raises(ValueError, match="there are 1 pruning points"):
        headroom_split.main(base_argv + ["--layers", "1", "--counts", "6", "--subsets", "none;1", "--name", "y"])



def test_testbed_diagnostics_question_forms_and_probes(micro, tmp_path):
    diagnostics = load_benchmark("testbed_diagnostics")
    form = diagnostics.question_form
    assert form("what colour is the ring?") == ("colour", 1)
    assert form("what colour is the small ring?") == ("colour", 2)
    assert form("what size is the blue square?") == ("size", 2)
    assert form("what shape is the red object?") == ("shape", 1)
    assert form("what shape is the large red object?") == ("shape", 2)
    assert form("how many circles are there?") is None and form("is there a red ring?") is None

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    assert diagnostics.probe_accuracy(x, (x[:, 2] > 0).long()) >= 0.97  # linearly separable
    assert diagnostics.probe_accuracy(x, torch.randint(0, 2, (400,), generator=g)) < 0.75  # no information

    root, folder = micro
    forms, probes = diagnostics.main(["--folder", str(folder), "--probe_images", "4", "--output_dir", str(tmp_path),
                                      "--name", "d"])
    from datasets import load_from_disk

    test = load_from_disk(str(folder / "dataset"))["test"]
    assert sum(n for _, n in forms.values()) == sum(form(q) is not None for q in test["question"])
    assert set(probes) == {"size", "colour", "shape"} and all(0.0 <= v <= 1.0 for v in probes.values())
    assert json.loads((tmp_path / "d.json").read_text())["probes"] == probes
    # --probe_images 2: the first 2 validation images' objects, not the whole split's
    diagnostics.main(["--folder", str(folder), "--max_samples", "1", "--probe_images", "2", "--output_dir",
                      str(tmp_path), "--name", "d2"])
    objects = [len(row["objects"]) for row in load_from_disk(str(folder / "dataset"))["validation"]]
    assert json.loads((tmp_path / "d2.json").read_text())["objects"] == sum(objects[:2]) < sum(objects)
    with pytest.raises(FileNotFoundError, match="--model"):
        diagnostics.main(["--folder", str(folder), "--model", str(tmp_path / "none"), "--output_dir", str(tmp_path)])


def test_the_lmms_eval_task_writer_runs_without_lmms_eval_and_quotes_its_values(tmp_path):
    """`python -m rcp_llava.lmms_eval_model --write_task` needs no lmms-eval (it failed on the module's import before),
    and writes values YAML reads back verbatim: a dataset path with '#' was cut at it, a name with ': ' broke the
    file; a split the dataset lacks and a folder that is no saved dataset are refused."""
    import subprocess
    import sys

    import yaml
    from datasets import Dataset, DatasetDict

    data = tmp_path / "my data #1"
    DatasetDict({"test": Dataset.from_dict({"question": ["q"], "answer": ["a"]})}).save_to_disk(str(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['lmms_eval'] = None; import runpy; "
                           "runpy.run_module('rcp_llava.lmms_eval_model', run_name='__main__')",
                           "--write_task", str(tmp_path / "tasks"), "--dataset", str(data)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    task = yaml.load((tmp_path / "tasks" / "rcp_testbed.yaml").read_text(), Loader=Loader)
    assert (task["task"], task["dataset_path"], task["test_split"]) == ("rcp_testbed", str(data), "test")
    assert (tmp_path / "tasks" / "rcp_testbed_utils.py").is_file()  # named after the task: a folder's utils.py stays
    assert task["doc_to_text"] == "rcp_testbed_utils.doc_to_text"

    from rcp_llava.lmms_eval_model import write_testbed_task

    with pytest.raises(ValueError, match=r"`split` 'nosuch' is not in .*, which has \['test'\]"):
        write_testbed_task(tmp_path / "t2", data, split="nosuch")
    with pytest.raises(ValueError, match=r"`name` 'a b: c' must be letters, digits"):
        write_testbed_task(tmp_path / "t2", data, name="a b: c")
    with pytest.raises(ValueError, match=r"is not a saved dataset with splits \(no dataset_dict.json\)"):
        write_testbed_task(tmp_path / "t2", tmp_path / "tasks")
    assert not (tmp_path / "t2").exists()  # refused before anything is written


# -- scoring answers of one token and of several -------------------------------------------------------


def _random_micro_rcp():
    """A random micro-testbed LLaVA with untrained RCP plug-ins at a fixed count, its processor and 6 test rows (no
    testbed build: the scoring, not the accuracy, is under test)."""
    from configuration_rcp_llava import RcpLlavaConfig
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.testbed import build_dataset, build_model_config, build_processor, get_preset

    preset = get_preset("micro")
    processor = build_processor(preset)
    stock = build_model_config(preset, processor.tokenizer).to_dict()
    torch.manual_seed(0)
    config = RcpLlavaConfig(**{k: v for k, v in stock.items() if k != "model_type"}, pruning_layers=[1],
                            repair_layers=[1], pruner_hidden_size=8, repair_bottleneck_size=8,
                            pruning_keep_counts=[16])
    model = RcpLlavaForConditionalGeneration(config).eval()
    rows = build_dataset("micro", seed=0, sizes={"train": 1, "validation": 1, "test": 6})["test"]
    return model, processor, rows


def test_multi_token_references_are_scored_on_the_greedy_answer(tmp_path):
    """A `save_to_disk` folder in the testbed format (and train_rcp.py's final metrics on a user's own test split)
    was scored on the greedy FIRST token against the whole reference: a two-token answer never matched (0.0 where
    the model's greedy answers were the references). Each reference of n tokens is now matched against the first
    n greedy tokens; a one-token reference among them is still scored on the first token."""
    from datasets import Dataset, DatasetDict

    from rcp_llava.data import prompt_batch
    from rcp_llava.evaluation import EvalData, evaluate_model, load_data, pruning_layout

    model, processor, rows = _random_micro_rcp()
    generated = []
    for row in rows:  # the model's own greedy two-token answers, one row at a time (no padding)
        batch = prompt_batch(processor, [row["question"]], [row["image"]])
        batch.pop("position_ids")
        with torch.no_grad(), pruning_layout(model, "discard"):
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        generated.append(processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    assert all(len(answer.split()) == 2 for answer in generated)
    first, second = generated[5].split()
    wrong = f"{first} {'cross' if second != 'cross' else 'circle'}"  # right first token, wrong second
    references = generated[:4] + [generated[4].split()[0], wrong]
    table = Dataset.from_list([dict(r, answer=a) for r, a in zip(rows, references)], features=rows.features)
    DatasetDict({"test": table}).save_to_disk(str(tmp_path / "data"))
    result = evaluate_model(model, processor, load_data(str(tmp_path / "data")), batch_size=4)
    assert result["predictions"] == generated[:4] + [generated[4].split()[0], generated[5]]
    assert result["correct"] == [1, 1, 1, 1, 1, 0] and result["score"] == 5 / 6
    assert result["scoring"] == "greedy answer tokens"
    # the kept-token statistics still come from the same prefill as on one-token answers
    one = evaluate_model(model, processor, EvalData("testbed", rows, "t"), batch_size=4)
    assert one["kept_per_point"] == result["kept_per_point"]
    assert one["retention_all_layers"] == result["retention_all_layers"]


def test_one_token_references_keep_the_first_token_scoring(monkeypatch):
    """The testbed's one-token answers are scored as before (its committed results must not move): one prefill,
    the greedy first token, no `generate`."""
    import rcp_llava.evaluation as evaluation

    model, processor, rows = _random_micro_rcp()
    expected, _, _ = evaluation.first_token_predictions(model, processor, list(rows))

    def no_generate(*args, **kwargs):
        raise AssertionError("one-token references were scored by generation")

    monkeypatch.setattr(evaluation, "greedy_answer_predictions", no_generate)
    result = evaluation.evaluate_model(model, processor, evaluation.EvalData("testbed", rows, "t"), batch_size=4)
    assert result["scoring"] == "first token" and result["predictions"] == expected
    assert result["correct"] == [int(p == a) for p, a in zip(expected, rows["answer"])]


@pytest.mark.parametrize("kind", ["testbed", "benchmark"])
def test_data_without_rows_is_refused(kind):
    """Was: an IndexError on the empty per-layer table, after the (empty) loop; train_rcp reached it with an empty
    test split after training, before anything was saved."""
    import rcp_llava.evaluation as evaluation

    with pytest.raises(ValueError, match=r"^evaluate_model: 'empty' has no rows to score\. Give data with at least "
                                         r"one row\.$"):
        evaluation.evaluate_model(None, None, evaluation.EvalData(kind, [], "empty"))


def test_kept_tokens_per_layer_of_a_row_without_an_image_is_zero():
    """A text-only row kept 0 at every point, but its layers before the first pruner read N ([16, 0, 0, 0]): it
    never had an image. Given `has_image` (as `last_pruning_info` holds it), such a row is 0 at every layer."""
    from rcp_llava.schedule import kept_tokens_per_layer

    model = make_model(pruning_keep_counts=[8, 4])
    with torch.no_grad():
        out = model(**make_batch([(2, 3, True), (4, 5, False)]))
    has_image = model.last_pruning_info.has_image
    assert kept_tokens_per_layer(model.config, out.kept_counts, 2, has_image) == [[16, 8, 4, 4], [0, 0, 0, 0]]
    assert kept_tokens_per_layer(model.config, out.kept_counts, 2)[1] == [16, 0, 0, 0]  # without it, as before
    assert kept_tokens_per_layer(model.config, None, 2, [True, False]) == [[16] * 4, [0] * 4]


def test_testbed_diagnostics_form_accuracy_groups_and_scores(monkeypatch):
    """Accuracy per question form with the predictions stubbed: rows of no form are left out, the rest predicted in
    batches of `batch_size`, each group's accuracy over its own rows, named in the singular for one word."""
    import rcp_llava.testbed.evaluate as testbed_evaluate

    diagnostics = load_benchmark("testbed_diagnostics")
    rows = [{"question": q, "answer": a} for q, a in [
        ("what colour is the ring?", "red"), ("how many rings are there?", "one"),
        ("what colour is the small ring?", "blue"), ("what colour is the large ring?", "green"),
        ("what shape is the red object?", "ring"), ("what size is the blue square?", "small")]]
    said = {"what colour is the ring?": "red", "how many rings are there?": "one", "what colour is the small ring?":
            "red", "what colour is the large ring?": "green", "what shape is the red object?": "ring",
            "what size is the blue square?": "large"}
    batches = []

    def predict(model, processor, batch):
        batches.append([r["question"] for r in batch])
        return [said[r["question"]] for r in batch]

    monkeypatch.setattr(testbed_evaluate, "predict", predict)
    forms = diagnostics.form_accuracy(None, None, rows, batch_size=2)
    assert forms == {"asks colour, named by 1 word": (1.0, 1), "asks colour, named by 2 words": (0.5, 2),
                     "asks shape, named by 1 word": (1.0, 1), "asks size, named by 2 words": (0.0, 1)}
    assert list(forms) == sorted(forms)
    assert [len(b) for b in batches] == [2, 2, 1] and "how many rings are there?" not in sum(batches, [])


def test_testbed_diagnostics_probe_is_scored_on_the_held_out_quarter():
    """The first 3/4 follow one rule and the last quarter the opposite one: trained on the first 3/4 and scored on
    the rest, the probe gets the last quarter wrong (scored on its training rows, or trained on a quarter and scored
    on the rest, it would look right)."""
    diagnostics = load_benchmark("testbed_diagnostics")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = (x[:, 0] > 0).long()
    y[300:] = 1 - y[300:]
    assert diagnostics.probe_accuracy(x, y) <= 0.1


def test_testbed_diagnostics_object_features_are_mean_and_max_of_the_objects_patches():
    """Per object: its patches' projected features averaged, then their maximum; labels coded by sorted value; rows
    fed to the model in chunks of `batch_size`."""
    from types import SimpleNamespace

    diagnostics = load_benchmark("testbed_diagnostics")
    features = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2) * torch.tensor([1.0, -1.0])  # (B, N, d)
    chunks = []

    def image_processor(images, return_tensors):
        chunks.append(list(images))
        return {"pixel_values": torch.tensor(images)}

    model = SimpleNamespace(model=SimpleNamespace(get_image_features=lambda pixel_values: features[pixel_values]))

    def obj(patches, size, colour, shape):
        return {"patches": patches, "size": size, "colour": colour, "shape": shape}

    rows = [{"image": 0, "objects": [obj([0, 2], "small", "red", "ring"), obj([3], "large", "blue", "cross")]},
            {"image": 1, "objects": []},
            {"image": 2, "objects": [obj([1, 2, 3], "small", "blue", "ring")]}]
    x, codes = diagnostics.object_features(model, SimpleNamespace(image_processor=image_processor), rows, batch_size=2)
    assert chunks == [[0, 1], [2]]
    expected = []
    for image, patches in ((0, [0, 2]), (0, [3]), (2, [1, 2, 3])):
        p = features[image, patches]
        expected.append(torch.cat([p.mean(0), p.amax(0)]))
    torch.testing.assert_close(x, torch.stack(expected), rtol=0, atol=0)
    assert codes == {"size": [1, 0, 1], "colour": [1, 0, 0], "shape": [1, 0, 1]}


def test_selection_signal_summary_and_its_table_row():
    """`summarise`: alive tokens, the evidence's share of them and the share of it the point keeps, and each signal's
    AUC over all alive tokens and over the dropped ones only; `format_markdown` puts them in that order."""
    selection_signal = load_benchmark("selection_signal")
    scores = [0.9, 0.2, 0.8, 0.3, 0.1, 0.4]
    columns = {s: list(scores) for s in selection_signal.SIGNALS}
    columns["prior"] = [-v for v in scores]
    # evidence: tokens 0 and 1; kept: 0 and 2. All: 5 of the 8 (evidence, other) pairs ordered right; dropped
    # (1, 3, 4, 5): 0.2 above 0.1 only, 1 of 3 (over the kept ones it would be 1 of 1)
    columns["evidence"] = [True, True, False, False, False, False]
    columns["kept"] = [True, False, True, False, False, False]
    summary = selection_signal.summarise({3: columns})
    row = summary["3"]
    assert (row["alive"], row["evidence_share"], row["evidence_kept"]) == (6, pytest.approx(1 / 3), 0.5)
    assert row["g_task"] == {"all": 0.625, "dropped": pytest.approx(1 / 3)}
    assert row["prior"] == {"all": 0.375, "dropped": pytest.approx(2 / 3)}
    cells = " | ".join("0.375 (0.667)" if s == "prior" else "0.625 (0.333)" for s in selection_signal.SIGNALS)
    assert f"| 3 | 6 | 0.333 | 0.500 | {cells} |" in selection_signal.format_markdown(summary, "c", 1, "m").splitlines()


def _two_point_rcp(folder):
    """An RCP model on the micro testbed's vision tower and processor with a 4-layer decoder (random weights):
    points before layers 1 and 2 keeping 32, then 16 of the 64 visual tokens."""
    from transformers import AutoConfig

    from configuration_rcp_llava import RcpLlavaConfig
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    fields = {k: v for k, v in AutoConfig.from_pretrained(folder / "model").to_dict().items()
              if k not in ("model_type", "architectures")}
    fields["text_config"]["num_hidden_layers"] = 4
    config = RcpLlavaConfig(**fields, pruning_layers=[1, 2], pruning_keep_counts=[32, 16], repair_layers=[3],
                            pruner_hidden_size=8, repair_bottleneck_size=8)
    torch.manual_seed(0)
    return RcpLlavaForConditionalGeneration(config).eval()


def test_selection_signal_columns_at_two_pruning_points(micro, monkeypatch):
    """`collect` at two points: a point's columns cover the tokens alive before it (all 64, then the 32 the first
    point kept), its kept flags are the tokens it keeps, and g_task / g_repair are minus the gradients of the task and
    of the repair loss with respect to its cumulative mask M(p) (here both losses stubbed: fixed, different weightings
    of M at the second point, so that the gradient there is known exactly)."""
    from datasets import load_from_disk
    from transformers import AutoProcessor

    import modeling_rcp_llava as M
    import train_rcp

    selection_signal = load_benchmark("selection_signal")
    root, folder = micro
    model = _two_point_rcp(folder)
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(3))
    masks, prune_mask = {}, M.PrunedPrefill._prune_mask

    def capture(self, layer_idx, *args, **kwargs):  # M(p) as the pruning left it
        out = prune_mask(self, layer_idx, *args, **kwargs)
        masks[layer_idx] = self.soft_alive
        return out

    g = torch.Generator().manual_seed(0)
    weights = {"g_task": torch.randn(3, 64, generator=g), "g_repair": torch.randn(3, 64, generator=g)}
    monkeypatch.setattr(M.PrunedPrefill, "_prune_mask", capture)
    monkeypatch.setattr(train_rcp, "task_loss", lambda logits, labels: (masks[2] * weights["g_task"]).sum())
    monkeypatch.setattr(train_rcp, "w2_repair_loss",
                        lambda student, teacher, answer_mask: (masks[2] * weights["g_repair"]).sum())
    table = selection_signal.collect(model, AutoProcessor.from_pretrained(folder / "model"), rows, batch_size=3)
    assert sorted(table) == [1, 2]
    assert all(len(column) == 3 * 64 for column in table[1].values())
    assert all(len(column) == 3 * 32 for column in table[2].values())
    assert torch.tensor(table[1]["kept"]).view(3, 64).sum(1).tolist() == [32, 32, 32]
    assert torch.tensor(table[2]["kept"]).view(3, 32).sum(1).tolist() == [16, 16, 16]
    alive = masks[1].detach() > 0.5  # before the second point: what the first kept
    assert alive.sum(1).tolist() == [32, 32, 32]
    for signal, w in weights.items():
        torch.testing.assert_close(torch.tensor(table[2][signal]), -w[alive], rtol=0, atol=0)
    evidence = torch.zeros(3, 64, dtype=torch.bool)
    for i in range(3):
        evidence[i, list(rows[i]["evidence_patches"])] = True
    assert torch.tensor(table[2]["evidence"]).bool().tolist() == evidence[alive].tolist()


def test_selection_signal_teacher_question_is_the_question_rows_mean_attention(micro):
    """"teacher question": the frozen model's attention at the pruning layer from the question tokens to each visual
    token, averaged over heads and over the question rows, as the stock model's eager attention reports it (causal:
    the answer after the question changes nothing)."""
    from datasets import load_from_disk
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.data import RcpDataCollator

    selection_signal = load_benchmark("selection_signal")
    root, folder = micro
    model = RcpLlavaForConditionalGeneration.from_pretrained(root / "rcp").eval()
    processor = AutoProcessor.from_pretrained(root / "rcp")
    rows = load_from_disk(str(folder / "dataset"))["test"].select(range(3))
    table = selection_signal.collect(model, processor, rows, batch_size=3)[1]
    inputs = RcpDataCollator(processor)(list(rows))
    stock = LlavaForConditionalGeneration.from_pretrained(folder / "model", attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = stock(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "position_ids")},
                           output_attentions=True).attentions[1]  # (B, H, T, T)
    question = torch.tensor(table["teacher question"]).view(3, 64)
    for b in range(3):
        image = inputs["input_ids"][b] == stock.config.image_token_index
        rows_b = inputs["question_mask"][b].bool()
        expected = attentions[b][:, rows_b][:, :, image].mean(0).mean(0)
        torch.testing.assert_close(question[b], expected, rtol=1e-4, atol=1e-6)


def test_selection_signal_refuses_a_model_that_is_not_rcp(micro, tmp_path):
    """The signals are RCP's (its pruner's gradients and logits): a model saved with another method is refused."""
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    selection_signal = load_benchmark("selection_signal")
    root, folder = micro
    other = RcpLlavaForConditionalGeneration.from_pretrained(root / "rcp", pruning_method="random",
                                                             pruning_keep_counts=[16])
    other.save_pretrained(tmp_path / "random")
    AutoProcessor.from_pretrained(root / "rcp").save_pretrained(tmp_path / "random")
    with pytest.raises(ValueError, match=r"prunes with 'random'; pass an RCP model\.$"):
        selection_signal.main(["--model", str(tmp_path / "random"), "--data", str(folder / "dataset"), "--split",
                               "test", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
