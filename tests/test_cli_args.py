"""Bad command-line input of the benchmark scripts: refused at parsing, or before anything loads, naming the flag,
the value and the fix (a probe found 0 meaning "all", ZeroDivisionError / range() / reshape errors deep in runs,
bare KeyErrors and wrong flag names). Every test is instant: nothing is trained or built."""

import json
import os
import shlex
import struct
import sys

import pytest

from conftest import load_benchmark


def _never(*args, **kwargs):
    raise AssertionError("a model was built (or a variant trained) before the arguments were checked")


def _run(script, argv, monkeypatch):
    """A benchmark script's `main` on `argv` (efficiency.py reads `sys.argv`), its model building and training
    failing if reached."""
    module = load_benchmark(script)
    if script == "efficiency":
        monkeypatch.setattr(module, "RcpLlavaForConditionalGeneration", _never)
        monkeypatch.setattr(sys, "argv", ["efficiency.py", *argv])
        return module.main()
    if script == "ablations":
        monkeypatch.setattr(module, "train_variant", _never)
    return module.main(argv)


def _splits(folder, names=("train", "validation", "test")):
    """A tiny `save_to_disk` DatasetDict with the testbed's columns (no images needed: nothing reads them)."""
    from datasets import Dataset, DatasetDict

    rows = {"image": ["x"], "question": ["q?"], "answer": ["a"], "evidence_patches": [[0]]}
    DatasetDict({n: Dataset.from_dict(rows) for n in names}).save_to_disk(str(folder))
    return folder


# -- counts: whole numbers >= 1, refused at parsing (before --model / --data are read) -------------------------

COUNTS = [
    ("efficiency", ["--preset", "tiny", "--device", "cpu"], "--repeats", "0"),
    ("efficiency", ["--preset", "tiny", "--device", "cpu"], "--threads", "0"),
    ("ablations", [], "--threads", "0"),  # was silently ignored
    ("ablations", [], "--batch_size", "0"),
    ("ablations", [], "--max_eval_samples", "-1"),
    ("figures", ["--model", "{tmp}/none"], "--num_samples", "0"),
    ("figures", ["--model", "{tmp}/none"], "--num_images", "-2"),
    ("figures", ["--model", "{tmp}/none"], "--threads", "0"),
    ("calibrate_retention", ["--model", "{tmp}/none"], "--max_samples", "0"),  # was "all"
    ("headroom_split", ["--model", "{tmp}/none", "--data", "{tmp}/none"], "--max_samples", "0"),  # ZeroDivisionError
    ("headroom_split", ["--model", "{tmp}/none", "--data", "{tmp}/none"], "--batch_size", "0"),  # range() error
    ("selection_signal", ["--model", "{tmp}/none", "--data", "{tmp}/none"], "--batch_size", "0"),
    ("selection_signal", ["--model", "{tmp}/none", "--data", "{tmp}/none"], "--max_samples", "0"),  # a NaN table
    ("testbed_diagnostics", ["--folder", "{tmp}/none"], "--probe_images", "0"),
    ("testbed_diagnostics", ["--folder", "{tmp}/none"], "--max_samples", "1.5"),
]


@pytest.mark.parametrize("script, argv, flag, value", COUNTS, ids=[f"{c[0]}{c[2]}={c[3]}" for c in COUNTS])
def test_count_flags_refuse_zero_and_negatives_at_parsing(tmp_path, monkeypatch, capsys, script, argv, flag, value):
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))  # no testbed: ablations' default data fails fast
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv] + [flag, value, "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        _run(script, argv, monkeypatch)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a whole number >= 1, got '{value}'" in capsys.readouterr().err
    assert not out.exists()


# -- efficiency.py ----------------------------------------------------------------------------------------------


@pytest.fixture
def efficiency_unbuilt(monkeypatch):
    """efficiency.py whose model class fails if the run gets as far as building a model."""
    module = load_benchmark("efficiency")
    monkeypatch.setattr(module, "RcpLlavaForConditionalGeneration", _never)
    return module


@pytest.mark.parametrize("flag, value", [("--batch_sizes", "0"), ("--batch_sizes", "1,-8"), ("--batch_sizes", "1,"),
                                         ("--budgets", "abc"), ("--budgets", "64,0")])
def test_efficiency_lists_are_checked_before_the_models_are_built(efficiency_unbuilt, tmp_path, monkeypatch, flag,
                                                                  value):
    """`--batch_sizes 0` was a reshape error after building every model, `--budgets abc` int()'s "invalid
    literal"."""
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--device", "cpu", "--output_dir",
                                      str(tmp_path / "out"), flag, value])
    with pytest.raises(ValueError, match=rf"^{flag} '{value}': give comma-separated whole numbers >= 1"):
        efficiency_unbuilt.main()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["576", "600"])
def test_efficiency_refuses_budgets_that_prune_nothing(efficiency_unbuilt, tmp_path, monkeypatch, value):
    """`--budgets 576` (full) or 600 failed in the schedule's solver with a message that named no flag."""
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "mid", "--device", "cpu", "--output_dir",
                                      str(tmp_path / "out"), "--budgets", f"64,{value}"])
    with pytest.raises(ValueError, match=rf"^--budgets {value}: a budget counts the visual tokens of LLaVA-1\.5's 576 "
                                         r"kept on average .* 576 or more prunes nothing"):
        efficiency_unbuilt.main()
    assert not (tmp_path / "out").exists()


def test_efficiency_names_a_budget_no_schedule_reaches(efficiency_unbuilt, tmp_path, monkeypatch):
    """The solver's own error, named by the flag (here on a preset whose layers before the first pruner hold more)."""
    efficiency = efficiency_unbuilt

    def unreachable(*args):
        raise ValueError("unreachable")

    monkeypatch.setattr(efficiency, "rcp_schedule", unreachable)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "mid", "--device", "cpu", "--output_dir",
                                      str(tmp_path / "out"), "--budgets", "64"])
    with pytest.raises(ValueError, match=r"^--budgets 64: no RCP schedule of preset 'mid' reaches it\. .*unreachable$"):
        efficiency.main()


@pytest.mark.parametrize("value", ["-2", "-1"])
def test_efficiency_refuses_negative_new_tokens(efficiency_unbuilt, tmp_path, monkeypatch, capsys, value):
    """0 is documented (the prefill alone); -2 was taken as 0. -1, the boundary, is as negative (it too was a
    prefill-only run, labelled -1 new tokens)."""
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--device", "cpu", "--new_tokens", value,
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        efficiency_unbuilt.main()
    assert f"argument --new_tokens: must be a whole number >= 0, got {value}" in capsys.readouterr().err


def test_efficiency_refuses_cuda_without_cuda_before_building(efficiency_unbuilt, tmp_path, monkeypatch):
    """Was torch's "Torch not compiled with CUDA enabled" from inside the first model's build."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--device", "cuda", "--output_dir",
                                      str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"^--device 'cuda': CUDA is not available here .*pass --device cpu"):
        efficiency_unbuilt.main()
    assert not (tmp_path / "out").exists()


# -- ablations.py -----------------------------------------------------------------------------------------------


@pytest.fixture
def ablations_untrained(monkeypatch, tmp_path):
    """ablations.py whose training fails if reached, with an empty testbed cache."""
    module = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(module, "train_variant", _never)
    return module


def test_ablations_checks_the_budget_before_training(ablations_untrained, tmp_path):
    """`--budget abc` failed in the evaluation, after the first variant's training."""
    with pytest.raises(ValueError, match=r"^--budget 'abc': Budget 'abc' is not a fraction like '1/3'"):
        ablations_untrained.main(["--variants", "full", "--budget", "abc", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ablations_names_its_own_dataset_flag(ablations_untrained, tmp_path):
    """A --dataset that is not there was reported as `--data '/nope' is neither ...` (load_data's flag)."""
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"^--dataset '{missing}' is neither a dataset folder"):
        ablations_untrained.main(["--variants", "full", "--dataset", missing, "--output_dir", str(tmp_path / "out")])


def test_ablations_refuses_max_steps_zero(ablations_untrained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablations_untrained.main(["--max_steps", "0", "--output_dir", str(tmp_path / "out")])
    assert "argument --max_steps: 0 trains nothing" in capsys.readouterr().err


def test_ablations_labels_epoch_training_as_epochs():
    """`--max_steps -1` (train_rcp: train for `num_train_epochs`) showed as "yes (-1 steps)"."""
    ablations = load_benchmark("ablations")
    fixed = {"pruning_layers": [1], "repair_layers": [1], "keep_counts": [7], "score": 0.5, "vs_full": None}
    result = {"full_model": {"score": 0.5}, "max_steps": -1, "budget": "1/9", "num_visual_tokens": 64,
              "command": "c", "num_eval_samples": 8, "table6": None,
              "variants": [{"variant": "full", "trained": True, "max_steps": -1, "fixed": fixed}]}
    md = ablations.format_ablations(result)
    assert "| full | yes (the job's `num_train_epochs` epochs) |" in md
    assert "with the job's `num_train_epochs` epochs (labelled below)" in md
    assert "-1 steps" not in md


def test_ablation_source_is_written_atomically(tmp_path, monkeypatch):
    """`ablation_source.json` was written in place: a write that failed halfway left a truncated file (and the
    previous one lost)."""
    import train_rcp

    ablations = load_benchmark("ablations")

    class Parser:
        def parse_args_into_dataclasses(self, args):
            return object(), object()

    monkeypatch.setattr(train_rcp, "build_parser", Parser)
    monkeypatch.setattr(train_rcp, "run_job", lambda job, args, explicit: None)
    monkeypatch.setattr(ablations, "base_weights_fingerprint", lambda argv: {"not JSON"})  # a set: fails mid-dump
    out = tmp_path / "full"
    out.mkdir()
    (out / "ablation_source.json").write_text('{"previous": true}')
    with pytest.raises(TypeError, match="not JSON serializable"):
        ablations.train_variant("full", [], str(out), reuse=False)
    assert (out / "ablation_source.json").read_text() == '{"previous": true}'
    assert os.listdir(out) == ["ablation_source.json"]  # no temporary file left either


# -- figures.py -------------------------------------------------------------------------------------------------


def _result(data, score=0.5):
    rows = [{"label": "none", "budget": "full", "score": 0.75, "avg_tokens_all_layers": 64.0,
             "avg_tokens_from_first_point": 64.0},
            {"label": "rcp", "budget": "1/9", "score": score, "avg_tokens_all_layers": 11.0,
             "avg_tokens_from_first_point": 7.0}]
    return {"data": data, "num_visual_tokens": 64, "rows": rows, "metric": "accuracy"}


def _png_height(path):
    with open(path, "rb") as f:
        return struct.unpack(">II", f.read(24)[16:24])[1]


@pytest.mark.parametrize("content, problem", [
    ("{}", r"no \"results\" list"),
    ("", r"not JSON \(Expecting value"),
    (json.dumps({"command": "python benchmarks/ablations.py", "variants": []}), r"no \"results\" list"),
    (json.dumps({"results": [{"data": "x", "num_visual_tokens": 64, "rows": [{"label": "none"}]}]}),
     r"a result lacks \['rows\[\]\.avg_tokens_all_layers'"),
])
def test_figures_refuses_a_table_that_is_not_evaluate_methods_output(tmp_path, content, problem):
    """`{}`, an ablations JSON or an empty file: a KeyError / JSONDecodeError after the output folder was made."""
    figures = load_benchmark("figures")
    table = tmp_path / "t.json"
    table.write_text(content)
    with pytest.raises(ValueError, match=rf"^--table '{table}': {problem}.*expected the JSON evaluate_methods\.py "
                                         r"writes"):
        figures.main(["--table", str(table), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_figures_names_a_missing_table(tmp_path):
    """A missing --table raised a bare "[Errno 2] No such file or directory", without the flag or what to pass."""
    figures = load_benchmark("figures")
    missing = tmp_path / "none.json"
    with pytest.raises(FileNotFoundError, match=rf"^--table '{missing}': no such file; expected the JSON "
                                                r"evaluate_methods\.py writes"):
        figures.main(["--table", str(missing), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


NAMED_SCRIPTS = {  # script: the arguments it needs besides --name, up to parsing
    "ablations": [], "calibrate_retention": ["--model", "m"], "evaluate_methods": [], "figures": ["--table", "t"],
    "headroom_split": ["--model", "m", "--data", "d"], "selection_signal": ["--model", "m", "--data", "d"],
    "testbed_diagnostics": [], "testbed_report": [],
}


@pytest.mark.parametrize("script", sorted(NAMED_SCRIPTS))
@pytest.mark.parametrize("name", ["a/b", "..", "", " "])
def test_every_name_flag_refuses_a_path_at_parsing(script, name, tmp_path, capsys, monkeypatch):
    """`--name a/b` ran the whole job and then failed at the write ("No such file or directory: '.../a/b.png.tmp-N'");
    `--name ..` wrote `...md` beside the output folder. Every script's --name is a file stem, checked at parsing."""
    import argparse

    module = load_benchmark(script)
    parse = argparse.ArgumentParser.parse_args

    def parse_only(parser, *args, **kwargs):  # a name that parses must not start the job (it would train / build)
        parse(parser, *args, **kwargs)
        raise AssertionError(f"{script}: --name {name!r} was accepted")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(SystemExit) as raised:
        module.main([*NAMED_SCRIPTS[script], "--name", name, "--output_dir", str(tmp_path / "out")])
    assert raised.value.code == 2
    assert (f"argument --name: must be a file name stem (no folder; put the folder in --output_dir), got {name!r}"
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_figures_writes_the_plotted_numbers_and_plots_every_dataset(tmp_path):
    """accuracy_vs_tokens_NAME.md held only the command (--help promises the plotted numbers), and a table of two
    datasets plotted only the first."""
    figures = load_benchmark("figures")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"command": "evaluate one", "results": [_result("testbed")]}))
    two.write_text(json.dumps({"command": "evaluate two", "results": [_result("testbed"), _result("gqa", 0.25)]}))
    figures.main(["--table", str(one), "--output_dir", str(tmp_path), "--name", "one"])
    figures.main(["--table", str(two), "--output_dir", str(tmp_path), "--name", "two"])
    md = (tmp_path / "accuracy_vs_tokens_one.md").read_text()
    assert "(data: `evaluate one`)" in md
    assert "| none | full | 64.0 | 64.0 | 0.750 |" in md and "| rcp | 1/9 | 11.0 | 7.0 | 0.500 |" in md
    md = (tmp_path / "accuracy_vs_tokens_two.md").read_text()
    assert "testbed (N = 64)" in md and "gqa (N = 64)" in md and "| rcp | 1/9 | 11.0 | 7.0 | 0.250 |" in md
    # one row of plots per dataset
    assert _png_height(tmp_path / "accuracy_vs_tokens_two.png") > 1.8 * _png_height(tmp_path /
                                                                                    "accuracy_vs_tokens_one.png")


def test_figures_refuses_benchmark_data_before_loading_the_model(tmp_path):
    """`--data gqa:...` failed after the model loaded: "'VqaRecord' object is not subscriptable"."""
    figures = load_benchmark("figures")
    with pytest.raises(ValueError, match=r"^--data 'gqa:/x': the drift and mask figures need testbed rows"):
        figures.main(["--model", str(tmp_path / "none"), "--data", "gqa:/x", "--output_dir", str(tmp_path / "out")])


# -- calibrate_retention.py -------------------------------------------------------------------------------------


def test_calibrate_refuses_a_model_without_rcp_pruning(tmp_path, monkeypatch):
    """A stock model ran the whole evaluation, then failed with KeyError: 'retention_from_first_point'."""
    from types import SimpleNamespace

    import rcp_llava.evaluation

    calibrate = load_benchmark("calibrate_retention")
    stock = SimpleNamespace(config=SimpleNamespace(pruning_method="none", pruning_layers=[]))
    monkeypatch.setattr(rcp_llava.evaluation, "load_base_model", lambda model: (stock, None))
    monkeypatch.setattr(rcp_llava.evaluation, "evaluate_model", lambda *a, **k: pytest.fail("evaluated"))
    data = _splits(tmp_path / "data")
    with pytest.raises(ValueError, match=r"^--model 'stock' prunes with 'none' at layers \[\]: calibration shifts "
                                         r"RCP's pruner biases; pass a trained RCP folder"):
        calibrate.main(["--model", "stock", "--data", str(data), "--output_dir", str(tmp_path / "out"),
                        "--all_layers"])  # no train_rcp record beside "stock" to say which layers
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recorded, flags, from_first", [
    ("all", [], False), ("from_first_pruner", [], True), ("all", ["--from_first_pruner"], True),
    ("from_first_pruner", ["--all_layers"], False), (None, ["--from_first_pruner"], True)])
def test_calibrate_averages_over_the_layers_the_model_was_trained_over(tmp_path, monkeypatch, recorded, flags,
                                                                       from_first):
    """It always averaged from the first pruner (the tiny job's recipe): on the main job's deep testbed, trained
    over all layers (`sparsity_layers` 'all'), it calibrated to 1.5x the budget the model was trained to."""
    from types import SimpleNamespace

    import rcp_llava.evaluation
    import train_rcp

    calibrate = load_benchmark("calibrate_retention")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    if recorded is not None:
        (run / "metrics.json").write_text(json.dumps({"sparsity_layers": recorded}))
    model = SimpleNamespace(config=SimpleNamespace(pruning_method="rcp", pruning_layers=[1]))
    monkeypatch.setattr(rcp_llava.evaluation, "load_base_model", lambda folder: (model, SimpleNamespace()))
    monkeypatch.setattr("rcp_llava.data.RcpDataCollator", lambda processor: None)
    result = {"score": 0.5, "groups": {}, "retention_from_first_point": 0.2, "retention_all_layers": 0.1,
              "kept_per_point": [3.0]}
    monkeypatch.setattr(rcp_llava.evaluation, "evaluate_model", lambda *a, **k: result)
    asked = []
    monkeypatch.setattr(train_rcp, "calibrate_retention", lambda *a, from_first_pruner: asked.append(
        from_first_pruner) or {"target": 0.1, "bias_shift": 0.0, "n": 1, "split": "validation"})
    out = calibrate.main(["--model", str(run / "model"), "--data", str(_splits(tmp_path / "data")), "--output_dir",
                          str(tmp_path / "out"), *flags])
    assert asked == [from_first] and out["after"]["retention"] == (0.2 if from_first else 0.1)


def test_calibrate_without_a_training_record_asks_which_layers(tmp_path):
    calibrate = load_benchmark("calibrate_retention")
    model = tmp_path / "model"
    with pytest.raises(ValueError, match=rf"^--model '{model}': no train_rcp\.py record beside it \({tmp_path}/"
                                         r"metrics\.json, with `sparsity_layers`\) says which layers its retention "
                                         r"was trained over; pass --all_layers or --from_first_pruner\.$"):
        calibrate.main(["--model", str(model), "--data", str(_splits(tmp_path / "data")), "--output_dir",
                        str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record", ['{"sparsity_layers": "from_first"}', '{"sparsity_layers": null}', '[]', '{'])
def test_calibrate_refuses_a_training_record_that_names_no_known_layers(tmp_path, record):
    """Only 'all' or 'from_first_pruner' decide; any other record (a typo, a null, not JSON) asks, rather than
    calibrating to the all-layers target unasked."""
    import argparse

    calibrate = load_benchmark("calibrate_retention")
    (tmp_path / "metrics.json").write_text(record)
    with pytest.raises(ValueError, match=r"no train_rcp\.py record beside it .* pass --all_layers or --from_first"):
        calibrate.trained_from_first_pruner(argparse.Namespace(model=str(tmp_path / "model")))
    (tmp_path / "metrics.json").write_text('{"sparsity_layers": "all"}')
    assert calibrate.trained_from_first_pruner(argparse.Namespace(model=str(tmp_path / "model"))) is False

def test_calibrate_accepts_a_train_split_when_there_is_no_validation_split(tmp_path, monkeypatch):
    """The layout asks for 'test' and 'validation' OR 'train' (the split calibrated on): test + train passes the
    check and the model is loaded next."""
    import rcp_llava.evaluation as evaluation

    calibrate = load_benchmark("calibrate_retention")

    def loaded(*args, **kwargs):
        raise RuntimeError("the model loads")

    monkeypatch.setattr(evaluation, "load_base_model", loaded)
    data = str(_splits(tmp_path / "data", ("train", "test")))
    with pytest.raises(RuntimeError, match="the model loads"):
        calibrate.main(["--model", str(tmp_path / "model"), "--data", data, "--all_layers", "--output_dir",
                        str(tmp_path / "out")])

def test_calibrate_checks_the_data_layout_before_the_model(tmp_path):
    """One split's folder was "Column 'test' doesn't exist", BENCHMARK:PATH datasets' "Directory not found", both
    after the model loaded (here: a --model that does not exist, never read)."""
    from datasets import Dataset

    calibrate = load_benchmark("calibrate_retention")
    model = str(tmp_path / "none")
    single = tmp_path / "single"
    Dataset.from_dict({"question": ["q?"]}).save_to_disk(str(single))
    with pytest.raises(ValueError, match=rf"^--data '{single}' is one split's folder, not a DatasetDict; pass "
                                         r"testbed, testbed:PRESET or a `save_to_disk` DatasetDict folder with a "
                                         r"'test' split"):
        calibrate.main(["--model", model, "--data", str(single), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"^--data 'gqa:/x' is not a dataset folder; pass testbed"):
        calibrate.main(["--model", model, "--data", "gqa:/x", "--output_dir", str(tmp_path / "out")])
    no_test = _splits(tmp_path / "no_test", names=("train", "validation"))
    with pytest.raises(ValueError, match=rf"^--data '{no_test}' has the splits \['train', 'validation'\], not "
                                         r"\['test'\]"):
        calibrate.main(["--model", model, "--data", str(no_test), "--output_dir", str(tmp_path / "out")])


# -- selection_signal.py / testbed_diagnostics.py: splits named before the model loads ---------------------------


def test_selection_signal_names_the_available_splits(tmp_path):
    selection_signal = load_benchmark("selection_signal")
    data = _splits(tmp_path / "data")
    with pytest.raises(ValueError, match=r"^--split 'nosuch': .* has no such split; it has \['train', 'validation', "
                                         r"'test'\]"):
        selection_signal.main(["--model", str(tmp_path / "none"), "--data", str(data), "--split", "nosuch",
                               "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("flag", ["--split", "--probe_split"])
def test_testbed_diagnostics_names_the_available_splits(tmp_path, flag):
    """Was a bare KeyError: 'nosuch', after the model loaded (here: an empty model folder, never read)."""
    diagnostics = load_benchmark("testbed_diagnostics")
    _splits(tmp_path / "tb" / "dataset")
    (tmp_path / "tb" / "model").mkdir()
    with pytest.raises(ValueError, match=rf"^{flag} 'nosuch': .*dataset has no such split; it has \['train', "
                                         r"'validation', 'test'\]"):
        diagnostics.main(["--folder", str(tmp_path / "tb"), flag, "nosuch", "--output_dir", str(tmp_path / "out")])


# -- testbed_report.py ------------------------------------------------------------------------------------------


def _metrics():
    fam = {"attribute": 0.9}
    return {"preset": "deep", "command": "python benchmarks/build_testbed.py --preset deep", "num_visual_tokens": 144,
            "test": {"overall": 0.9, "n": 10, "families": fam}, "validation": {"overall": 0.8, "n": 10}}


def test_testbed_report_records_its_own_command(tmp_path):
    """The JSON was metrics.json alone and the report's command was recorded nowhere."""
    report = load_benchmark("testbed_report")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "metrics.json").write_text(json.dumps(_metrics()))
    argv = ["--folder", str(tmp_path / "tb"), "--output_dir", str(tmp_path / "out"), "--name", "r"]
    report.main(argv)
    command = shlex.join(["python", "benchmarks/testbed_report.py", *argv])
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert saved == {**_metrics(), "report_command": command}  # the build's "command" kept as it was
    assert f"Built by: `python benchmarks/build_testbed.py --preset deep`; reported by `{command}`" in (
        tmp_path / "out" / "r.md").read_text()


@pytest.mark.parametrize("drop, key", [("test", "test"), ("families", "test.families"), ("preset", "preset"),
                                       ("n", "validation.n")])
def test_testbed_report_names_a_missing_metrics_key(tmp_path, drop, key):
    """A metrics.json without "test" was a bare KeyError: 'test'."""
    report = load_benchmark("testbed_report")
    metrics = _metrics()
    if drop == "families":
        del metrics["test"]["families"]
    elif drop == "n":  # the report prints the validation's sample count
        del metrics["validation"]["n"]
    else:
        del metrics[drop]
    path = tmp_path / "tb" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=rf"^{path} lacks the key '{key}' .*rebuild the testbed"):
        report.main(["--folder", str(path.parent), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -- --help keeps the docstrings' line continuations -------------------------------------------------------------


@pytest.mark.parametrize("script", ["ablations", "headroom_split", "selection_signal"])
def test_help_keeps_the_examples_line_continuations(script, capsys):
    """The module docstrings were not raw: `\\` + newline joined the example's two lines with a run of spaces."""
    module = load_benchmark(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert " \\\n        --" in capsys.readouterr().out



def test_efficiency_tag_and_lmms_task_name_refuse_a_path(tmp_path, monkeypatch, capsys):
    """The same stem check for the other names of written files (a review): efficiency's `--tag a/b` measured the
    first batch size and then failed at the write; the lmms-eval task writer's `--name ../x` wrote outside DIR."""
    import subprocess

    efficiency = load_benchmark("efficiency")
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--tag", "a/b", "--output_dir", str(tmp_path / "out"),
                                      "--preset", "tiny", "--dry_run"])  # a regression runs nothing for long
    with pytest.raises(SystemExit) as raised:
        efficiency.main()
    assert raised.value.code == 2
    assert "argument --tag: must be a file name stem (no folder; put the folder in --output_dir), got 'a/b'" in \
        capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "rcp_llava.lmms_eval_model", "--write_task", str(tmp_path / "task"),
                             "--name", "../x"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 2
    assert ("argument --name: must be a file name stem (no folder; put the folder in --write_task), got '../x'"
            in result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_testbed_report_puts_every_number_in_its_cell(tmp_path):
    """The report's table and sentences, cell by cell: families in name order; test accuracy and chance per family;
    validation on its own sample count; each pruner's overall and per-family accuracy at each budget (1/3 first)."""
    report = load_benchmark("testbed_report")
    metrics = {"preset": "deep", "command": "build", "num_visual_tokens": 144, "evaluated_by": "eval",
               "build_times": {"training_s": 10.0, "evaluation_s": 2.0},
               "chance": {"counting": 0.25, "attribute": 0.125},
               "test": {"overall": 0.75, "n": 40, "families": {"counting": 0.5, "attribute": 0.875}},
               "validation": {"overall": 0.625, "n": 24, "families": {"counting": 0.0, "attribute": 0.0}},
               "pruning": {"random": {"1/9": {"overall": 0.3, "kept_visual_tokens": 16,
                                              "families": {"counting": 0.2, "attribute": 0.4}},
                                      "1/3": {"overall": 0.6, "kept_visual_tokens": 48,
                                              "families": {"counting": 0.5, "attribute": 0.7}}},
                           "oracle": {"1/9": {"overall": 0.7, "kept_visual_tokens": 16.4,
                                              "families": {"counting": 0.6, "attribute": 0.8}},
                                      "1/3": {"overall": 0.8, "kept_visual_tokens": 47.6,
                                              "families": {"counting": 0.9, "attribute": 0.65}}}}}
    text = report.format_report(metrics, "tb", report_command="report")
    assert text.splitlines() == [
        "# Testbed `deep`: tb", "",
        "Built by: `build`; evaluated by `eval`; reported by `report`",
        "Build times (s): evaluation_s 2.0, training_s 10.0; total 12 s.", "",
        "Test accuracy **0.750** on 40 samples (validation 0.625 on 24); N = 144 visual tokens.", "",
        "| family | attribute | counting |", "|---|---|---|",
        "| test accuracy | 0.875 | 0.500 |",
        "| chance | 0.125 | 0.250 |", "",
        "Input-level pruning before the LLM (overall, then per family; kept tokens per image):", "",
        "| pruner | budget | kept | overall | attribute | counting |", "|---|---|---|---|---|---|",
        "| random | 1/3 | 48 | 0.600 | 0.700 | 0.500 |",
        "| random | 1/9 | 16 | 0.300 | 0.400 | 0.200 |",
        "| oracle | 1/3 | 48 | 0.800 | 0.650 | 0.900 |",
        "| oracle | 1/9 | 16 | 0.700 | 0.800 | 0.600 |"]


def test_testbed_report_reads_each_pruners_own_budgets():
    """The budgets were read from the first pruner and looked up in every other: pruners measured at different
    budgets (an oracle at 1/9 only) ended the report with a bare KeyError '1/3'. Each pruner's rows, largest first."""
    report = load_benchmark("testbed_report")
    metrics = _metrics()
    row = lambda kept, acc: {"overall": acc, "kept_visual_tokens": kept,  # noqa: E731
                             "families": {f: acc for f in metrics["test"]["families"]}}
    metrics["pruning"] = {"random": {"1/9": row(16, 0.3), "1/3": row(48, 0.6)}, "oracle": {"1/9": row(16, 0.7)}}
    lines = [line for line in report.format_report(metrics, "tb").splitlines() if line.startswith("| random |")
             or line.startswith("| oracle |")]
    assert [line.split(" | ")[:4] for line in lines] == [["| random", "1/3", "48", "0.600"],
                                                         ["| random", "1/9", "16", "0.300"],
                                                         ["| oracle", "1/9", "16", "0.700"]]
