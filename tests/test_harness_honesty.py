"""What the result files say about themselves: the tests they show, the compute they compare at, the samples and
split they score, the layers they ran at."""

import json
import os
import re

import pytest

from conftest import ROOT, load_benchmark


# -- evaluate_methods.py --rerender ---------------------------------------------------------------------------------


def _row(label, method, budget, k, correct, tokens, gflops=True):
    row = {"label": label, "method": method, "budget": budget, "k": k, "pruning_points": [1] if k else [],
           "keep_counts": None, "repair_layers": [], "kept_per_point": None if k is None else [float(k)],
           "avg_tokens_all_layers": tokens, "avg_tokens_from_first_point": tokens, "tokens_per_layer": [tokens] * 4,
           "score": sum(correct) / len(correct), "groups": {"a": sum(correct) / len(correct)}, "n": len(correct),
           "correct": correct, "group_of": ["a"] * len(correct)}
    if gflops:
        row["decoder_gflops"] = 0.5
    return row


def _grid(flop_matched=True):
    """An evaluate_grid-like result: full, RCP fixed and adaptive at 1/9, VisPruner at 1/9; a stale paired test with
    the adaptive row as the reference, as the harness wrote before commit f75499d."""
    from rcp_llava.evaluation import add_relative, mcnemar, paired_tests

    rows = [_row("none", "none", "full", None, [1] * 10, 16.0),
            _row("rcp", "rcp", "1/9", 2, [1] * 8 + [0] * 2, 5.5),
            _row("rcp (adaptive, 1/9)", "rcp", "1/9", None, [1] * 9 + [0], 7.25),
            _row("vispruner", "vispruner", "1/9", 2, [1] * 3 + [0] * 7, 2.0)]
    add_relative(rows)
    stale = {"budget": "1/9", "reference": "rcp (adaptive, 1/9)", "method": "vispruner", "delta": 0.6,
             **mcnemar(rows[2]["correct"], rows[3]["correct"]), "groups": {}}
    return {"data": "testbed", "kind": "testbed", "num_samples": 10, "num_visual_tokens": 16, "num_layers": 4,
            "model": "m", "rows": rows, "per_layer_retention": None, "paired_tests": paired_tests(rows) + [stale],
            "plugins_per_budget": None, "flop_matched": flop_matched, "infeasible": [], "mean_text_tokens": 5,
            "metric": "first-token accuracy"}


def _write_run(folder, result, command="python benchmarks/evaluate_methods.py --model m --name t"):
    evaluate_methods = load_benchmark("evaluate_methods")
    from rcp_llava.evaluation import format_table

    path = folder / "t.json"
    path.write_text(json.dumps({"command": command, "methods": [], "budgets": ["1/9"], "results": [result]}))
    markdown = "\n".join(["# Pruning methods x budgets: testbed", "", f"Command: `{command}`", "",
                          format_table(result)])
    (folder / "t.md").write_text(markdown)
    return evaluate_methods, path


def test_rerender_keeps_fixed_count_tests_drops_adaptive_references_and_records_both_commands(tmp_path):
    result = _grid()
    rows_before = json.loads(json.dumps(result["rows"]))
    evaluate_methods, path = _write_run(tmp_path, result)
    assert "| 1/9 | rcp (adaptive, 1/9) | vispruner |" in (tmp_path / "t.md").read_text()  # the stale test, shown

    evaluate_methods.main(["--rerender", str(path)])

    data = json.loads(path.read_text())
    tests = data["results"][0]["paired_tests"]
    assert [(t["reference"], t["method"]) for t in tests] == [
        ("rcp", "rcp (adaptive, 1/9)"), ("rcp", "vispruner")]
    assert (tests[1]["a_only"], tests[1]["b_only"]) == (5, 0)
    assert data["results"][0]["rows"] == rows_before
    rerender = f"python benchmarks/evaluate_methods.py --rerender {path}"
    assert data["command"] == "python benchmarks/evaluate_methods.py --model m --name t"
    assert data["rerendered"]["command"] == rerender
    md = (tmp_path / "t.md").read_text()
    assert "Command: `python benchmarks/evaluate_methods.py --model m --name t`" in md
    assert f"Paired tests re-rendered from the JSON by `{rerender}` (the harness now tests only fixed-count " \
           "references and shows each test's compute)." in md
    assert "| 1/9 | rcp (adaptive, 1/9) | vispruner |" not in md
    assert "| 1/9 | rcp | vispruner | not FLOP-matched: rcp 5.5 vs vispruner 2.0 tokens/layer | +0.500 | 5/0 |" in md
    for row in rows_before:  # every row's numbers stay
        assert f"| {row['label']} | " in md and f"| {row['score']:.3f} | " in md
    evaluate_methods.main(["--rerender", str(path)])  # again: the same files
    assert (tmp_path / "t.md").read_text() == md and json.loads(path.read_text()) == data


def test_rerender_refuses_to_lose_text_the_json_cannot_rebuild_and_other_flags(tmp_path, capsys):
    evaluate_methods, path = _write_run(tmp_path, _grid())
    with (tmp_path / "t.md").open("a") as f:
        f.write("\nA note written by hand.\n")
    with pytest.raises(ValueError, match=r"t\.md holds text its JSON does not rebuild outside the paired tests"):
        evaluate_methods.main(["--rerender", str(path)])
    assert "A note written by hand." in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit):
        evaluate_methods.main(["--rerender", str(path), "--methods", "rcp"])
    assert "--methods cannot be used with it" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^--rerender '.*nope\.json': no such \.json file"):
        evaluate_methods.main(["--rerender", str(tmp_path / "nope.json")])


def test_rerender_takes_no_flag_but_overwrite(tmp_path, capsys):
    """A re-render runs nothing: a flag that would name another output or run (ignored) is refused, --overwrite kept."""
    evaluate_methods, path = _write_run(tmp_path, _grid())
    for flag in (["--name", "other"], ["--output_dir", str(tmp_path / "o")], ["--flop_matched"]):
        with pytest.raises(SystemExit):
            evaluate_methods.main(["--rerender", str(path), *flag])
        assert f"argument --rerender: {flag[0]} cannot be used with it" in capsys.readouterr().err
    evaluate_methods.main(["--rerender", str(path), "--overwrite"])
    assert json.loads(path.read_text())["rerendered"]["command"].endswith("--overwrite")

def test_evaluate_methods_refuses_a_methods_list_that_names_none(tmp_path):
    """`--methods ','` names no method: refused before anything loads (else a run with no rows)."""
    evaluate_methods = load_benchmark("evaluate_methods")
    with pytest.raises(ValueError, match=r"^--methods ',': unknown method\(s\) \[\]; choose from \["):
        evaluate_methods.main(["--model", str(tmp_path), "--methods", ",", "--output_dir", str(tmp_path / "out")])

def test_rerender_replaces_a_paired_test_section_the_json_rebuilds_otherwise(tmp_path):
    """Only the paired-test sections (heading, the blank line after it, the table) may differ from what the JSON
    rebuilds: a .md whose test table was written otherwise is re-rendered without --overwrite, not refused."""
    evaluate_methods, path = _write_run(tmp_path, _grid())
    md = (tmp_path / "t.md").read_text()
    stale = next(line for line in md.splitlines() if line.startswith("| 1/9 | rcp (adaptive, 1/9) | vispruner |"))
    assert md.count(stale + "\n") == 1
    (tmp_path / "t.md").write_text(md.replace(stale + "\n", ""))  # an older table: one test fewer
    evaluate_methods.main(["--rerender", str(path)])
    rerendered = (tmp_path / "t.md").read_text()
    assert ("| 1/9 | rcp | vispruner | not FLOP-matched: rcp 5.5 vs vispruner 2.0 tokens/layer | +0.500 | 5/0 |"
            in rerendered)
    assert "Paired tests re-rendered from the JSON by" in rerendered

def test_rerender_keeps_an_older_layout_without_flops():
    """A result written before decoder GFLOPs were recorded re-renders in its own layout (no column of dashes)."""
    from rcp_llava.evaluation import format_table

    result = _grid()
    for row in result["rows"]:
        row.pop("decoder_gflops")
    table = format_table(result)
    assert "decoder GFLOPs" not in table and "| vispruner | 1/9 (k=2) | 2.0@1 | 2.0 | 2.0 | 0.300 (30%) |" in table


@pytest.mark.parametrize("stem", ["table1_per_budget_deep", "table1_per_budget_deep_a2", "table1_per_budget_tiny"])
def test_committed_table1_files_show_only_fixed_count_tests_and_regenerate_from_their_json(stem):
    evaluate_methods = load_benchmark("evaluate_methods")
    from rcp_llava.evaluation import paired_tests

    folder = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(folder, stem + ".json")) as f:
        data = json.load(f)
    with open(os.path.join(folder, stem + ".md")) as f:
        committed = f.read()
    for result in data["results"]:
        assert result["paired_tests"] == paired_tests(result["rows"])
    assert evaluate_methods.results_markdown(data["results"], data["command"], data["rerendered"]) == committed
    assert "| rcp (adaptive, 1/9) | vispruner |" not in committed


# -- format_table: the compute of a test ----------------------------------------------------------------------------


def test_paired_tests_say_the_compute_differs_without_flop_matching():
    from rcp_llava.evaluation import format_table

    result = _grid(flop_matched=False)
    result["paired_tests"] = result["paired_tests"][:-1]
    table = format_table(result)
    assert "**not FLOP-matched**: the budget fixes the kept count k, not the compute" in table
    assert "| 1/9 | rcp | vispruner | not FLOP-matched: rcp 5.5 vs vispruner 2.0 tokens/layer | +0.500 | 5/0 |" in table
    assert "RCP minus each method at the same budget, overall" not in table

    # FLOP-matched: the fixed-count rows are equal (as `method_overrides` makes them), and the adaptive row's own
    # count is still shown (the column was dropped, so a test at unequal compute read as matched)
    for row in result["rows"]:
        if row["label"] == "vispruner":
            row["avg_tokens_all_layers"] = 5.5
    matched = format_table({**result, "flop_matched": True})
    assert ("Paired tests (exact McNemar on the same samples): RCP minus each method at the same budget, overall and "
            "per group; the fixed-count rows are FLOP-matched (up to their integer keep counts), an adaptive row keeps "
            "its own number of tokens (*compute*: tokens per layer over all layers, RCP's vs the other's); *a/b*: "
            "samples only RCP / only the other method gets right.") in matched
    assert "| 1/9 | rcp | vispruner | equal: 5.5 tokens/layer | +0.500 | 5/0 |" in matched
    assert ("| 1/9 | rcp | rcp (adaptive, 1/9) | not FLOP-matched: rcp 5.5 vs rcp (adaptive, 1/9) 7.2 tokens/layer | "
            in matched)
    # fixed counts matched up to rounding (integer keep counts): not called unmatched as the adaptive row is
    for row in result["rows"]:
        if row["label"] == "vispruner":
            row["avg_tokens_all_layers"] = 5.3
    rounded = format_table({**result, "flop_matched": True})
    assert "| 1/9 | rcp | vispruner | matched up to integer counts: rcp 5.5 vs vispruner 5.3 tokens/layer | " in rounded


# -- ablations.py ------------------------------------------------------------------------------------------------------


def _ablation(variants, **extra):
    return {"command": "c", "budget": "1/9", "max_steps": 1, "num_eval_samples": 4, "num_visual_tokens": 64,
            "full_model": {"score": 1.0, "groups": {}}, "variants": variants, "table6": None, **extra}


def _variant(name, layers, tokens, vs_full=None):
    fixed = {"pruning_layers": layers, "repair_layers": [], "keep_counts": [7] * len(layers), "score": 0.5,
             "avg_tokens_all_layers": tokens, "vs_full": vs_full}
    return {"variant": name, "trained": True, "max_steps": 1, "fixed": fixed}


SAME_LAYER = "every variant prunes first at the same layer, so all average the same visual tokens over all layers"


def test_ablations_claim_equal_compute_only_when_it_holds():
    ablations = load_benchmark("ablations")
    test = {"a_only": 3, "b_only": 1, "p_value": 0.625}
    equal = ablations.format_ablations(_ablation([_variant("full", [1, 2, 3], 12.0),
                                                  _variant("adapters=3", [1, 2, 3], 12.0, test)]))
    assert SAME_LAYER in equal and "tok/layer (all), fixed" not in equal
    assert "| 3/1, p 0.62 |" in equal

    md = ablations.format_ablations(_ablation([_variant("full", [1, 2, 3], 12.0),
                                               _variant("pruners=2", [2], 17.5, test)]))
    assert SAME_LAYER not in md
    assert "the variants do NOT all average the same visual tokens over all layers" in md
    assert "not at equal compute" in md
    assert "| variant | trained | pruning layers | repair layers | fixed counts | tok/layer (all), fixed |" in md
    assert "| pruners=2 | yes (1 steps) | [2] | none | [7] | 17.5 | 0.500 |" in md
    assert "3/1, p 0.62 (not equal compute: 17.5 vs full's 12.0 tok/layer) |" in md


def test_ablations_equal_compute_needs_one_first_pruning_layer_and_means_within_tolerance():
    """Equal compute: the same first pruner (a variant pruning first elsewhere keeps N tokens up to it, even where
    its recorded mean happens to match) and the recorded means within 0.05 tokens."""
    ablations = load_benchmark("ablations")
    full = _variant("full", [1, 2, 3], 12.0)
    assert ablations.equal_fixed_compute([full, _variant("adapters=3", [1, 2, 3], 12.04)])
    assert not ablations.equal_fixed_compute([full, _variant("adapters=3", [1, 2, 3], 12.1)])
    assert not ablations.equal_fixed_compute([full, _variant("pruners=2", [2], 12.0)])

def test_ablations_table_scores_against_the_full_model_and_names_any_compute_gap():
    """*% of full* divides by the full model's score; a paired test at another compute says so from 0.05 tokens on."""
    ablations = load_benchmark("ablations")
    test = {"a_only": 3, "b_only": 1, "p_value": 0.625}
    md = ablations.format_ablations(_ablation([_variant("full", [1, 2, 3], 12.0),
                                               _variant("adapters=3", [1, 2, 3], 12.0, test)],
                                              full_model={"score": 0.8, "groups": {}}))
    assert "| adapters=3 | yes (1 steps) | [1, 2, 3] | none | [7, 7, 7] | 0.500 | 62.5% | 3/1, p 0.62 |" in md
    variants = [_variant("full", [1, 2, 3], 12.0), _variant("pruners=2", [2], 13.0, test)]
    md = ablations.format_ablations(_ablation(variants))
    assert "| 3/1, p 0.62 (not equal compute: 13.0 vs full's 12.0 tok/layer) |" in md

def test_ablations_adaptive_cells_give_retention_from_the_first_pruner_over_the_target():
    """*retention / target*: the adaptive row's mean kept tokens from the first pruner over N (what the target
    retention counts), next to the tokens per layer from the first pruner / over all layers."""
    ablations = load_benchmark("ablations")
    full = _variant("full", [1, 2, 3], 12.0)
    full["adaptive"] = {"score": 0.75, "kept_per_point": [8.0, 4.0, 2.0], "avg_tokens_from_first_point": 6.4,
                        "avg_tokens_all_layers": 20.8}
    full["target_retention"] = 0.1
    md = ablations.format_ablations(_ablation([full]))
    assert "| 0.500 | 50.0% | – | 0.750 | 75.0% | 8.0, 4.0, 2.0 | 6.4 / 20.8 | 0.100 / 0.100 | – |" in md

def test_ablations_name_the_split_read():
    ablations = load_benchmark("ablations")
    md = ablations.format_ablations(_ablation([_variant("full", [1], 12.0)],
                                              split="no split: the folder's rows, read whole"))
    assert "evaluated on 4 samples (no split: the folder's rows, read whole)" in md and "test samples" not in md


# -- train_rcp.py / figures.py: the sample count -------------------------------------------------------------------


def test_train_report_names_the_sample_count_and_split():
    import train_rcp

    with open(os.path.join(ROOT, "benchmarks", "results", "train_rcp_tiny.json")) as f:
        metrics = json.load(f)
    metrics.update(test_split="test", evaluated_split="test")
    assert {metrics["full"]["n"], metrics["rcp"]["n"]} == {500}
    report = train_rcp.format_report(metrics)
    assert "accuracies on 500 samples of the 'test' split (the same samples for every row):" in report
    table = report.index("| model ")
    assert report.index("500 samples") < table  # above the accuracies, not only in the McNemar line


def test_figures_accuracy_markdown_gives_n_per_row():
    figures = load_benchmark("figures")
    result = _grid()
    md = figures.accuracy_markdown({"command": "c", "results": [result]}, "f", "x")
    assert "| score | n |" in md
    assert "| vispruner | 1/9 | 2.0 | 2.0 | 0.300 | 10 |" in md
    # each row's own sample count, not the dataset's (a row scored on fewer samples says so)
    result["rows"][3]["n"] = 7
    md = figures.accuracy_markdown({"command": "c", "results": [result]}, "f", "x")
    assert "| vispruner | 1/9 | 2.0 | 2.0 | 0.300 | 7 |" in md and "| rcp | 1/9 | 5.5 | 5.5 | 0.800 | 10 |" in md


# -- the split a script read -----------------------------------------------------------------------------------------


def test_check_split_used_refuses_a_split_no_data_is_read_by():
    from rcp_llava.evaluation import EvalData, check_split_used

    plain = EvalData("testbed", [], "folder", split=None)
    with pytest.raises(ValueError, match="^" + re.escape(
            "--split 'test' is used by no --data (['folder']): only a DatasetDict folder and ScienceQA-IMG (without "
            "its own ',split=') are read by split. Drop --split.") + "$"):
        check_split_used("test", [plain], ["folder"])
    check_split_used(None, [plain], ["folder"])  # the default: nobody asked
    check_split_used("test", [EvalData("testbed", [], "dd", split="test")], ["dd"])


def test_headroom_split_refuses_a_split_a_single_split_folder_ignores(tmp_path):
    from rcp_llava.testbed import build_dataset

    folder = tmp_path / "train_only"
    build_dataset("micro", seed=0, sizes={"train": 3, "validation": 1, "test": 1})["train"].save_to_disk(str(folder))
    headroom = load_benchmark("headroom_split")
    with pytest.raises(ValueError, match=re.escape(f"--split 'test' is used by no --data (['{folder}'])")):
        headroom.main(["--model", str(tmp_path / "no_model"), "--data", str(folder), "--split", "test",
                       "--output_dir", str(tmp_path / "out")])


# -- prefill_benchmark.py: the paper placement -------------------------------------------------------------------------


def test_prefill_benchmark_uses_the_projects_zero_based_placement():
    prefill = load_benchmark("prefill_benchmark")
    from configuration_rcp_llava import PAPER_PLACEMENTS

    assert prefill.scaled_layers(32) == list(PAPER_PLACEMENTS[32][64][0]) == [1, 13, 25]
    assert prefill.scaled_layers(8) == [1, 3, 6]
    with pytest.raises(ValueError, match=r"^--text_layers 3: .* give --text_layers >= 4\.$"):
        prefill.scaled_layers(3)


@pytest.mark.parametrize("t", [40, 2])
def test_prefill_benchmark_selection_flops_are_the_measured_overhead(t):
    """`selection_flops` counted k_proj over the whole sequence (the pruning layer reuses the kept rows' keys, which
    the analytic pruned count already holds), the pruner as two d x P maps and the BOS as a question row: 1.37x the
    overhead FlopCounterMode measures; then, without the pruner's query-side products and the prior's sum over the
    question rows, 0.53% below it, within the 1% this test allowed (a BOS counted as a question row passed it). Now
    exactly the measured overhead (4 layers, eager attention, no repair adapter), with 39 question rows and with 1."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.flops import llava_flops, schedule_tokens_per_layer

    prefill = load_benchmark("prefill_benchmark")
    layers, counts, num_layers, n = prefill.scaled_layers(4), [96, 26, 8], 4, 576
    config = prefill.mid_config(layers, counts, num_layers)
    config.repair_layers = []
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = RcpLlavaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, n), 999), torch.randint(3, 900, (1, t - 1))], 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 336, 336), use_cache=True, logits_to_keep=1)
    schedule = schedule_tokens_per_layer(num_layers, t, n, layers, counts)
    overhead = counter.get_total_flops() - llava_flops(config, num_text_tokens=t,
                                                       decoder_tokens_per_layer=schedule).total
    assert prefill.selection_flops(config, t, [n, *counts[:-1]], counts) == overhead


def test_prefill_benchmark_selection_flops_scale_with_the_batch():
    prefill = load_benchmark("prefill_benchmark")
    config = prefill.mid_config(prefill.scaled_layers(8), [96, 26, 8])
    one = prefill.selection_flops(config, 40, [576, 96, 26], [96, 26, 8])
    assert one > 0 and prefill.selection_flops(config, 40, [576, 96, 26], [96, 26, 8], batch_size=3) == 3 * one


def test_prefill_benchmark_report_on_a_scripted_clock(monkeypatch, capsys):
    """The printed report (a narrower decoder), on a clock that advances one second per reading: a stock or
    unpruned prefill lasts 1 s, a pruned one 7 s (its three selections 1 s each, read inside it). So the time ratio
    is 7, the overhead 3 s of the pruned prefill's 7; the analytic numbers are `rcp_llava.flops`'s for the schedule
    the report prints, the selection FLOPs those of the tokens entering each point (576 / 96 / 26), and the KV
    cache ratio the schedule's."""
    import itertools
    from types import SimpleNamespace

    import torch

    from rcp_llava.flops import llava_flops, schedule_tokens_per_layer

    from transformers import CLIPVisionConfig, LlamaConfig

    from configuration_rcp_llava import RcpLlavaConfig

    prefill = load_benchmark("prefill_benchmark")

    def narrow_config(pruning_layers, keep_counts, num_layers=8):  # mid_config's, narrower: a quick run
        return RcpLlavaConfig(
            text_config=LlamaConfig(hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=1000, pad_token_id=0).to_dict(),
            vision_config=CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, image_size=336, patch_size=14).to_dict(),
            image_token_index=999, image_seq_length=576, pruning_layers=pruning_layers,
            repair_layers=[num_layers - 2], pruning_keep_counts=keep_counts, pruner_hidden_size=8,
            repair_bottleneck_size=8)

    monkeypatch.setattr(prefill, "mid_config", narrow_config)
    monkeypatch.setattr(prefill, "time", SimpleNamespace(perf_counter=itertools.count().__next__))
    t, layers, counts = 8, [1, 2, 3], [96, 26, 8]
    prefill.main(["--repeats", "1", "--text_layers", "4", "--text_tokens", str(t), "--threads",
                  str(torch.get_num_threads())])
    out = capsys.readouterr().out
    config = prefill.mid_config(layers, counts, 4)
    schedule = schedule_tokens_per_layer(4, t, 576, layers, counts)
    full, pruned = llava_flops(config, num_text_tokens=t).total, llava_flops(
        config, num_text_tokens=t, decoder_tokens_per_layer=schedule).total
    select = prefill.selection_flops(config, t, [576, 96, 26], counts)
    assert f"schedule: pruners before layers {layers} keep {counts}; tokens per layer {schedule} (full 584)" in out
    assert "measured prefill-time ratio pruned/full: 7.000\n" in out
    assert f"analytic FLOPs ratio pruned/full:        {pruned / full:.3f}\n" in out
    assert f"time ratio / FLOPs ratio:                {7 / (pruned / full):.3f}   (target <= 1.15)" in out
    assert "pruner overhead: 3000.00 ms = 42.9% of the pruned prefill (target < 5%)" in out
    assert f"{select / 1e9:.2f} GFLOPs = {select / pruned:.1%} of the pruned prefill's FLOPs" in out
    assert f"time ratio / FLOPs ratio with the selection FLOPs counted: {7 / ((pruned + select) / full):.3f}" in out
    assert f"KV cache pruned/full: {sum(schedule) / (4 * 584):.3f}; loop overhead of the RCP model vs stock LLaVA " \
           "with pruning off: 1.000x" in out
    assert "| RCP 64-token schedule  |     7000.0 |" in out and "| stock LLaVA            |     1000.0 |" in out
