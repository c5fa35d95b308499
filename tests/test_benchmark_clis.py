"""The benchmark scripts' command lines: bad values stop at parsing or before anything loads (naming the flag),
nothing is computed and then lost at the write, and what a flag promises is what a run does. A probe found each
case below failing; every test is quick: nothing is trained, built or timed for long (models, training and
evaluation are stubbed where a run would reach them)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, load_benchmark, tiny_config


def _never(*args, **kwargs):
    raise AssertionError("a model was built, loaded or trained before the arguments were checked")


def _dataset(folder, families, split="test"):
    """A `save_to_disk` DatasetDict in the testbed format (real images, one row per family entry)."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    n = len(families)
    rows = {"image": [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(n)],
            "question": [f"question {i}?" for i in range(n)], "answer": ["yes"] * n, "family": list(families),
            "evidence_patches": [[0]] * n}
    DatasetDict({split: Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return str(folder)


# -- counts: whole numbers >= 1 at parsing (they failed deep in torch / statistics, or at the end of the run) -------

COUNTS = [("baselines_benchmark", flag) for flag in ("--repeats", "--samples", "--batch_size", "--text_tokens",
                                                      "--threads")]
COUNTS += [("prefill_benchmark", flag) for flag in ("--repeats", "--batch_size", "--threads", "--text_tokens")]
COUNTS += [("selection_profile", flag) for flag in ("--threads", "--repeats")]
COUNTS += [("compiled_selection", "--repeats")]
COUNTS += [("build_testbed", flag) for flag in ("--num_threads", "--eval_max_samples", "--save_steps")]


@pytest.mark.parametrize("script, flag", COUNTS, ids=[f"{s}{f}" for s, f in COUNTS])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_count_flags_stop_at_parsing(script, flag, value, tmp_path, monkeypatch, capsys):
    if script in ("selection_profile", "compiled_selection"):
        load_benchmark("efficiency")  # what it imports by name from its own folder
    module = load_benchmark(script)
    for name in ("RcpLlavaForConditionalGeneration", "build_testbed", "profile"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _never)
    argv = [flag, value] + (["--output_dir", str(tmp_path / "out")] if script in ("selection_profile",
                                                                                 "compiled_selection",
                                                                                 "build_testbed") else [])
    with pytest.raises(SystemExit) as raised:
        module.main(argv)
    assert raised.value.code == 2
    assert f"argument {flag}: must be a whole number >= 1, got '{value}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["baselines_benchmark", "prefill_benchmark"])
def test_one_text_token_stops_at_parsing(script, monkeypatch, capsys):
    """Was: BOS + the image alone, which the model refuses ("Row 0 of the batch ends on its image"), naming no flag,
    after the full model's pass in baselines_benchmark."""
    module = load_benchmark(script)
    monkeypatch.setattr(module, "RcpLlavaForConditionalGeneration", _never)
    with pytest.raises(SystemExit) as raised:
        module.main(["--text_tokens", "1"])
    assert raised.value.code == 2
    assert ("argument --text_tokens: must be >= 2 (BOS and at least one token after the image), got 1"
            in capsys.readouterr().err)


def test_build_testbed_refuses_a_seed_numpy_cannot_take_before_making_the_folder(tmp_path, monkeypatch, capsys):
    """Was: numpy's "expected non-negative integer", naming no seed, with the folder and its lock left behind."""
    from rcp_llava.testbed import build_testbed

    module = load_benchmark("build_testbed")
    with pytest.raises(SystemExit) as raised:
        module.main(["--preset", "micro", "--output_dir", str(tmp_path / "cli"), "--seed", "-1"])
    assert raised.value.code == 2
    assert "argument --seed: -1 is outside [0, 2**32 - 1] (numpy seeds the data generator)" in capsys.readouterr().err
    for seed in (-1, 2 ** 32, 1.5, True):
        with pytest.raises(ValueError, match=rf"^seed {seed!r}: give a whole number in \[0, 2\*\*32 - 1\]"):
            build_testbed("micro", tmp_path / "lib", seed=seed)
    assert list(tmp_path.iterdir()) == []


def test_testbed_report_names_the_presets_it_knows(tmp_path, capsys):
    """Was: `--preset bogus` suggested `build_testbed.py --preset bogus`, which fails ("Unknown testbed preset")."""
    with pytest.raises(SystemExit) as raised:
        load_benchmark("testbed_report").main(["--preset", "bogus", "--output_dir", str(tmp_path)])
    assert raised.value.code == 2
    assert ("argument --preset: invalid choice: 'bogus' (choose from 'deep', 'micro', 'paper', 'tiny')"
            in capsys.readouterr().err)


def test_quickstart_answers_help_and_refuses_unknown_flags():
    """Was: it had no parser, so --help (or a typo) ran the whole demo and exited 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    script = os.path.join(ROOT, "examples", "quickstart.py")
    shown = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: quickstart.py [-h]")
    assert "Quickstart: prune visual tokens" in shown.stdout and "tokens after the processor" not in shown.stdout
    typo = subprocess.run([sys.executable, script, "--bogus"], env=env, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "unrecognized arguments: --bogus" in typo.stderr and typo.stdout == ""


@pytest.mark.parametrize("script", ["baselines_benchmark", "prefill_benchmark"])
def test_printed_benchmarks_print_their_command_first(script, monkeypatch, capsys):
    """They print a table and record nothing else: the command heads the output, quoted for the shell."""
    module = load_benchmark(script)
    monkeypatch.setattr(module, "RcpLlavaForConditionalGeneration", _never)
    with pytest.raises(AssertionError, match="a model was built"):
        module.main(["--threads", "2", "--repeats", "3"])
    assert capsys.readouterr().out == f"Command: python benchmarks/{script}.py --threads 2 --repeats 3\n"


# -- build_testbed.py / testbed_report.py ----------------------------------------------------------------------


def test_build_testbed_defaults_to_the_main_preset(tmp_path, monkeypatch):
    """It built `tiny` while testbed_report and every "testbed" reader read `deep` (MAIN_PRESET)."""
    from rcp_llava.testbed import MAIN_PRESET, default_cache_dir

    build = load_benchmark("build_testbed")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    seen = {}

    def record(preset, out, **kwargs):
        seen.update(preset=preset, out=out, eval_max_samples=kwargs["eval_max_samples"])
        raise KeyboardInterrupt  # stop before the metrics are read

    monkeypatch.setattr(build, "build_testbed", record)
    with pytest.raises(KeyboardInterrupt):
        build.main(["--eval_max_samples", "5"])
    assert MAIN_PRESET == "deep"
    assert seen == {"preset": "deep", "out": default_cache_dir("deep"), "eval_max_samples": 5}


@pytest.mark.parametrize("folder", [False, True])
def test_testbed_report_names_the_exact_build_command(tmp_path, monkeypatch, folder):
    report = load_benchmark("testbed_report")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    argv = ["--output_dir", str(tmp_path / "out")] + (["--folder", str(tmp_path / "tb")] if folder else [])
    expected = (rf"build the testbed first: `python benchmarks/build_testbed.py --preset deep --output_dir "
                rf"{tmp_path / 'tb'}`, with the --preset meant for that folder\.$" if folder else
                r"build the testbed first: `python benchmarks/build_testbed.py --preset deep`\.$")
    with pytest.raises(FileNotFoundError, match=r"metrics\.json: no metrics\.json; " + expected):
        report.main(argv)
    assert not (tmp_path / "out").exists()


# -- refuse_existing's wording, efficiency.py's dry run ----------------------------------------------------------


def test_refuse_existing_names_the_flags_the_caller_has(tmp_path):
    from rcp_llava.results import refuse_existing

    path = tmp_path / "t.md"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match=r"t\.md already exist: choose another --name / --output_dir or pass "
                                              r"--overwrite to replace them\.$"):
        refuse_existing([str(path)])  # unchanged for the scripts that have --name
    with pytest.raises(FileExistsError, match=r"t\.md already exist: choose another --tag / --output_dir or pass "
                                              r"--overwrite to replace them\.$"):
        refuse_existing([str(path)], choose="--tag / --output_dir")


def test_efficiency_dry_run_is_not_stopped_by_earlier_tables(tmp_path, monkeypatch, capsys):
    """"Time nothing, write nothing": it was refused by the committed tables it would not have touched; a real run
    is refused naming --tag (it told users to choose another --name, a flag efficiency.py does not have)."""
    efficiency = load_benchmark("efficiency")
    (tmp_path / "efficiency_tiny_cpu.md").write_text("mine")
    argv = ["efficiency.py", "--preset", "tiny", "--device", "cpu", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--dry_run"])
    efficiency.main()
    assert "dry run: 16 methods of preset tiny built on the meta device" in capsys.readouterr().out
    monkeypatch.setattr(efficiency, "RcpLlavaForConditionalGeneration", _never)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(FileExistsError, match=r"efficiency_tiny_cpu\.md already exist: choose another --tag / "
                                              r"--output_dir or pass --overwrite"):
        efficiency.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficiency_tiny_cpu.md"]
    assert (tmp_path / "efficiency_tiny_cpu.md").read_text() == "mine"


@pytest.mark.parametrize("sizes", ["0", "1,0", "-8"])
def test_selection_profile_refuses_a_batch_size_below_one(tmp_path, monkeypatch, sizes):
    load_benchmark("efficiency")  # what it imports by name from its own folder
    profile = load_benchmark("selection_profile")
    monkeypatch.setattr(profile, "profile", _never)
    with pytest.raises(ValueError, match=rf"^--batch_sizes \({sizes}\) must be >= 1\.$"):
        profile.main(["--preset", "tiny", "--batch_sizes", sizes, "--output_dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_selection_profile_refusal_names_its_own_flag(tmp_path, monkeypatch):
    load_benchmark("efficiency")  # what it imports by name from its own folder
    profile = load_benchmark("selection_profile")
    monkeypatch.setattr(profile, "profile", _never)
    (tmp_path / "selection_profile_tiny_cpu_rcp-64.json").write_text("mine")
    with pytest.raises(FileExistsError, match=r"rcp-64\.json already exist: choose another --output_dir or pass "
                                              r"--overwrite to replace them\.$"):
        profile.main(["--preset", "tiny", "--budget", "64", "--output_dir", str(tmp_path)])


# -- compare_prefill.py ------------------------------------------------------------------------------------------


def _compare(tmp_path, output, methods):
    import modeling_rcp_llava

    compare = load_benchmark("compare_prefill")
    compare.main(["--old", modeling_rcp_llava.__file__, "--preset", "tiny", "--batch_sizes", "1", "--repeats", "1",
                  "--methods", methods, "--output", str(output)])
    return {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in output.read_text().splitlines()
            if line.startswith("| ") and " ms" not in line}


def test_compare_prefill_creates_the_output_folder(tmp_path):
    """--output in a folder not made yet: the whole A/B ran, then atomic_write failed (FileNotFoundError)."""
    rows = _compare(tmp_path, tmp_path / "new" / "sub" / "ab.md", "full")
    assert list(rows) == ["full"] and rows["full"][-1] == "True |"


def test_compare_prefill_ideal_gets_the_kept_sets(tmp_path):
    """`ideal-64` was accepted but timed plain RCP (selection ran: its select columns held times). Now both
    versions get the new version's RCP kept sets, as efficiency.py's ideal: no selection, same outputs."""
    rows = _compare(tmp_path, tmp_path / "ab.md", "rcp-64,ideal-64")
    assert list(rows) == ["rcp-64", "ideal-64"]
    old_select, new_select, same = rows["rcp-64"][4:]
    assert float(old_select) > 0 and float(new_select) > 0 and same == "True |"
    assert rows["ideal-64"][4:] == ["–", "–", "True |"]


def test_compare_prefill_keeps_a_table_another_run_wrote_meanwhile(tmp_path, monkeypatch, caplog):
    """Without --overwrite, a table another run wrote at --output while this one timed was replaced at the end."""
    import logging

    import modeling_rcp_llava

    compare = load_benchmark("compare_prefill")
    output = tmp_path / "ab.md"

    def other_run_then_build(config):
        output.write_text("other\n")
        return modeling_rcp_llava.RcpLlavaForConditionalGeneration(config)

    monkeypatch.setattr(compare, "RcpLlavaForConditionalGeneration", other_run_then_build)
    argv = ["--old", modeling_rcp_llava.__file__, "--preset", "tiny", "--batch_sizes", "1", "--repeats", "1",
            "--methods", "full", "--output", str(output)]
    with caplog.at_level(logging.WARNING):
        compare.main(argv)
    assert output.read_text() == "other\n" and "| full | 1 |" in (tmp_path / "ab-2.md").read_text()
    assert f"{output}: written by another run while this one ran (without --overwrite)" in caplog.text
    compare.main(argv + ["--overwrite"])  # replaces, as before
    assert "| full | 1 |" in output.read_text() and sorted(os.listdir(tmp_path)) == ["ab-2.md", "ab.md"]


# -- ablations.py ------------------------------------------------------------------------------------------------


@pytest.fixture
def stubbed_ablations(tmp_path, monkeypatch):
    """ablations.py with training, model loading and evaluation stubbed: a 16-token model whose `full` variant
    keeps 8 and 4 tokens after layers 1 and 2."""
    import rcp_llava.evaluation as evaluation
    import train_rcp  # noqa: F401  before the stubs: it binds `evaluate_model` at import (ablations imports it later)

    ablations = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "work" / "full" / "model"
    model_dir.mkdir(parents=True)
    monkeypatch.setattr(ablations, "train_variant", lambda *a, **k: (str(model_dir), 1.0, ["stub"]))
    monkeypatch.setattr(evaluation, "load_base_model",
                        lambda path: (SimpleNamespace(config=SimpleNamespace(num_visual_tokens=16)), None))
    monkeypatch.setattr(evaluation, "method_overrides", lambda *a: {})
    monkeypatch.setattr(evaluation, "method_model", lambda base, **k: base)
    monkeypatch.setattr(evaluation, "evaluate_model",
                        lambda model, processor, data, batch_size: {"score": 0.5, "groups": {}, "n": len(data)})

    def evaluate_variant(base, processor, data, budget, batch_size, repair=True, method="rcp"):
        mode = {"score": 0.5, "groups": {}, "n": len(data), "correct": [1] * len(data), "keep_counts": [8, 4],
                "kept_per_point": [8.0, 4.0], "pruning_layers": [1, 2], "repair_layers": [2],
                "avg_tokens_all_layers": 9.0, "avg_tokens_from_first_point": 6.0}
        return {"fixed": dict(mode), "adaptive": dict(mode)}

    monkeypatch.setattr(ablations, "evaluate_variant", evaluate_variant)
    return ablations


def _pope(folder, count=3):
    from PIL import Image

    folder.mkdir()
    with open(folder / "coco_pope_random.json", "w") as f:
        for i in range(count):
            Image.new("RGB", (16, 16)).save(folder / f"{i}.png")
            f.write(json.dumps({"question_id": i, "image": f"{i}.png", "text": "is there a ring?", "label": "yes"})
                    + "\n")
    return f"pope:{folder / 'coco_pope_random.json'},image_dir={folder}"


@pytest.mark.parametrize("kind", ["folder without grid_size", "benchmark"])
def test_ablations_write_any_datas_results_with_the_models_n(stubbed_ablations, tmp_path, kind):
    """A --dataset folder without the testbed's grid_size column (KeyError) or a BENCHMARK:PATH spec (Table VI's
    percent of None, a TypeError) failed at the end, after every variant had trained and been evaluated."""
    spec = (_dataset(tmp_path / "data", ["a", "b", "c"]) if kind != "benchmark" else _pope(tmp_path / "pope"))
    out = tmp_path / "out"
    stubbed_ablations.main(["--variants", "full", "--dataset", spec, "--output_dir", str(out), "--name", "t",
                            "--work_dir", str(tmp_path / "work")])
    result = json.loads((out / "t.json").read_text())
    assert result["num_visual_tokens"] == 16 and result["num_eval_samples"] == 3
    assert result["table6"] == {"pruning_layers": [1, 2], "kept": [8.0, 4.0], "percent_of_n": [50.0, 25.0]}
    assert "| % of N | 50.00% | 25.00% |" in (out / "t.md").read_text()
    # the data scored is named (the command's --train_args named only what the variants trained on)
    assert result["data"] == spec and f"3 samples ({result['split']}) of `{spec}`" in (out / "t.md").read_text()


def test_ablations_untrained_variants_reuse_the_full_model_trained_in_this_run(stubbed_ablations, tmp_path,
                                                                               monkeypatch):
    """`full` trains first, whatever the order named, and adapters_off / attention_topk reuse that model even with
    --no_reuse: training it again for them would score them on another `full` than the table's `full` row."""
    model_dir = tmp_path / "work" / "full" / "model"
    grad_norm = {"median": 1.0, "p99": 2.0, "max": 3.0}
    (model_dir.parent / "metrics.json").write_text(json.dumps({"grad_norm": grad_norm, "target_retention": 0.1}))
    calls = []
    monkeypatch.setattr(stubbed_ablations, "train_variant", lambda name, args, folder, steps, reuse=True: calls.append(
        (name, reuse)) or (str(model_dir), 1.0, ["stub"]))
    evaluated, evaluate = [], stubbed_ablations.evaluate_variant
    monkeypatch.setattr(stubbed_ablations, "evaluate_variant", lambda *a, **k: evaluated.append(k) or evaluate(*a, **k))
    result = stubbed_ablations.main(["--variants", "adapters_off", "full", "attention_topk", "--dataset",
                                     _dataset(tmp_path / "data", ["a", "b"]), "--output_dir", str(tmp_path / "out"),
                                     "--name", "t", "--work_dir", str(tmp_path / "work"), "--no_reuse"])
    assert calls == [("full", False), ("full", True), ("full", True)]
    # adapters_off is scored with the adapters disabled, attention_topk as its own method, in the trained order
    assert evaluated == [{"repair": True}, {"repair": False}, {"method": "attention_topk"}]
    assert [r["variant"] for r in result["variants"]] == ["adapters_off", "full", "attention_topk"]
    assert result["split"] == "split 'test'"  # what load_data read, as the table says it
    # `full`'s training record is its own: the untrained rows show no gradient norms of a run they did not have
    assert [r["grad_norm"] for r in result["variants"]] == [None, grad_norm, None]

def _another_run_writes_first(module, monkeypatch, stem):
    """Wrap `module.write_results` so that another run with the same name writes `stem` just before this one does."""
    real = module.write_results

    def write_results(*args, **kwargs):
        with open(stem + ".md", "w") as f:
            f.write("the other run\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_results", write_results)


def test_ablations_keep_a_result_another_run_wrote_meanwhile(stubbed_ablations, tmp_path, monkeypatch):
    """Was: the start-up check found NAME free, and the end of a run of hours replaced what another run had written
    there since (only evaluate_methods.py passed --overwrite on to the write)."""
    out = tmp_path / "out"
    out.mkdir()
    _another_run_writes_first(stubbed_ablations, monkeypatch, str(out / "t"))
    argv = ["--variants", "full", "--dataset", _dataset(tmp_path / "data", ["a", "b", "c"]), "--output_dir",
            str(out), "--name", "t", "--work_dir", str(tmp_path / "work")]
    stubbed_ablations.main(argv)
    assert (out / "t.md").read_text() == "the other run\n" and not (out / "t.json").exists()
    assert json.loads((out / "t-2.json").read_text())["num_eval_samples"] == 3
    stubbed_ablations.main(argv + ["--overwrite"])  # asked for: replaced
    assert json.loads((out / "t.json").read_text())["num_eval_samples"] == 3


def test_testbed_report_keeps_a_report_another_run_wrote_meanwhile(tmp_path, monkeypatch):
    report = load_benchmark("testbed_report")
    row = {"overall": 0.5, "families": {"attribute": 0.5}, "kept_visual_tokens": 64, "n": 2}
    metrics = {"preset": "micro", "command": "build_testbed.py --preset micro", "num_visual_tokens": 64,
               "build_times": {"training_s": 1.0, "evaluation_s": 1.0}, "chance": {"attribute": 0.1}, "test": row,
               "validation": row, "pruning": {"random": {"1/9": row}}}
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "metrics.json").write_text(json.dumps(metrics))
    _another_run_writes_first(report, monkeypatch, str(tmp_path / "testbed_micro"))
    report.main(["--folder", str(tmp_path / "tb"), "--output_dir", str(tmp_path)])
    assert (tmp_path / "testbed_micro.md").read_text() == "the other run\n"
    assert json.loads((tmp_path / "testbed_micro-2.json").read_text())["preset"] == "micro"


BAD_VARIANTS = [
    ("lambda_repair=abc", r"\(--lambda_repair abc, after --train_args\): train_rcp\.py would refuse it: argument "
                          r"--lambda_repair/--lambda-repair: invalid float value: 'abc'"),
    ("clip=x", r"\(--max_grad_norm x, after --train_args\): train_rcp\.py would refuse it: argument "
               r"--max_grad_norm/--max-grad-norm: invalid float value: 'x'"),
    ("pruners=1,a", r"`pruning_layers` must be integers, e\.g\. '1,13,25' or '1 13 25', got '1,a'"),
    ("pruners=99", r"`pruning_layers` contains \[99\], but the text model has 16 layers"),
    ("adapters=0", r"`repair_layers` starts at 0, before the first pruning layer 1"),
]


@pytest.mark.parametrize("variant, problem", BAD_VARIANTS, ids=[v for v, _ in BAD_VARIANTS])
def test_ablations_check_every_variants_values_before_training(tmp_path, monkeypatch, variant, problem):
    """They passed the name check and failed only when that variant's train_rcp job parsed its flags, after the
    variants before it had trained (hours). Checked against the config the job would build: the main job's deep
    testbed (16 layers), here not built yet, so from its preset."""
    ablations = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ablations, "train_variant", _never)
    with pytest.raises(ValueError, match=rf"^variant '{variant}' .*{problem}.* Checked before any variant trains; "
                                         r"fix the variant or --train_args\.$"):
        ablations.main(["--variants", "full", variant, "--output_dir", str(tmp_path / "out"), "--work_dir",
                        str(tmp_path / "work")])
    assert list(tmp_path.iterdir()) == []  # nothing written, no work folder


def test_ablations_check_accepts_every_documented_variant(tmp_path, monkeypatch):
    ablations = load_benchmark("ablations")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    variants = ablations.DEFAULT_VARIANTS + sorted(ablations.OLD) + ["detach_prior", "lambda_repair=40", "clip=0",
                                                                      "pruners=1,2,3", "adapters="]
    for train_args in ([], ["--testbed_preset", "tiny"]):
        assert ablations.check_variants(variants, train_args, str(tmp_path / "work")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ablation_variants_pass_the_flags_their_table_documents():
    """What each variant changes (the module docstring's table): a wrong flag value, or `adapters=` passed as
    `--repair_layers ''` (which train_rcp reads as its default adapters), trains another model under the name."""
    ablations = load_benchmark("ablations")
    assert ablations.variant_spec("full") == ([], {}, True)
    assert ablations.variant_spec("no_repair_loss") == (["--lambda_repair", "0"], {}, True)
    assert ablations.variant_spec("mean_only_repair") == (["--repair_loss_mean_only", "true"], {}, True)
    assert ablations.variant_spec("no_adapters") == ([], {"repair_layers": []}, True)
    assert ablations.variant_spec("adapters=") == ([], {"repair_layers": []}, True)
    assert ablations.variant_spec("adapters=3") == (["--repair_layers", "3"], {}, True)
    assert ablations.variant_spec("pruners=1,2") == (["--pruning_layers", "1,2"], {}, True)
    assert ablations.variant_spec("lambda_repair=40") == (["--lambda_repair", "40"], {}, True)
    assert ablations.variant_spec("clip=0") == (["--max_grad_norm", "0"], {}, True)
    assert ablations.variant_spec("adapters_off") == ablations.variant_spec("attention_topk") == ([], {}, False)


def test_ablation_variant_argv_appends_the_variants_flags_and_skips_train_rcps_own_test():
    """The main job's flags, then the variant's (the last value wins in train_rcp), then where it goes; train_rcp's
    own test evaluation is off (`--test_split none`): the runner scores every variant itself, at one budget."""
    ablations = load_benchmark("ablations")
    assert ablations.variant_argv("no_repair_loss", ["--lambda_repair", "3"], "out", max_steps=5) == [
        "--lambda_repair", "3", "--lambda_repair", "0", "--output_dir", "out", "--test_split", "none",
        "--report_to", "none", "--max_steps", "5"]
    # flag_value reads a repeated flag as train_rcp's parser does: the last one, in either spelling
    for argv in (["--testbed_preset", "tiny", "--testbed_preset", "micro"],
                 ["--testbed_preset=tiny", "--testbed_preset", "micro"]):
        assert ablations.flag_value(argv, "--testbed_preset") == "micro"


# -- figures.py --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, error", [
    ("--budget", "abc", r"^--budget 'abc': Budget 'abc' is not a fraction like '1/3'"),
    ("--split", "nosuch", r"has no split 'nosuch'; it has \['test'\]"),
])
def test_figures_checks_budget_and_data_before_the_model(tmp_path, monkeypatch, flag, value, error):
    """Both failed after the model had loaded, and an empty output folder was left behind."""
    import rcp_llava.evaluation as evaluation

    figures = load_benchmark("figures")
    monkeypatch.setattr(evaluation, "load_base_model", _never)
    data = _dataset(tmp_path / "data", ["a", "b"])
    with pytest.raises(ValueError, match=error):
        figures.main(["--model", str(tmp_path / "none"), "--data", data, flag, value, "--output_dir",
                      str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_figures_draws_num_images_spread_over_the_families(tmp_path, monkeypatch):
    """`--num_images 6` drew 5 images (one per family, and only among the --num_samples drift rows)."""
    import rcp_llava.evaluation as evaluation

    figures = load_benchmark("figures")
    families = ["a", "a", "b", "a", "c", "b", "a", "d"]
    data = _dataset(tmp_path / "data", families)
    monkeypatch.setattr(evaluation, "load_base_model", lambda *a, **k: (None, None))
    seen = {}

    def capture(base, processor, rows, budget, mask_rows):
        seen.update(rows=[r["question"] for r in rows], masks=[r["question"] for r in mask_rows])
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "drift_and_masks", capture)
    for samples, images, masks in (("8", "6", (0, 1, 2, 4, 5, 7)), ("2", "3", (0, 1, 2))):
        with pytest.raises(KeyboardInterrupt):
            figures.main(["--model", "m", "--data", data, "--num_samples", samples, "--num_images", images,
                          "--output_dir", str(tmp_path / "out")])
        assert seen["rows"] == [f"question {i}?" for i in range(int(samples))]
        # 8 rows: round 1 the first a, b, c, d (rows 0, 2, 4, 7), round 2 the second a, b (rows 1, 5), in row
        # order; 2 drift samples: the images come from the first 3 rows, beyond them
        assert seen["masks"] == [f"question {i}?" for i in masks]
    assert not (tmp_path / "out").exists()  # nothing written yet, no folder


def test_figures_refuse_an_existing_masks_figure_before_the_model(tmp_path, monkeypatch):
    """Every file a --model run writes is checked at start-up: the masks figure too (else found after the model)."""
    import rcp_llava.evaluation as evaluation

    figures = load_benchmark("figures")
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluation, "load_base_model", _never)
    (tmp_path / "masks_n.png").write_bytes(b"m")
    with pytest.raises(FileExistsError, match=r"masks_n\.png already exist: choose another --name / --output_dir"):
        figures.main(["--model", "m", "--name", "n", "--output_dir", str(tmp_path)])

@pytest.mark.parametrize("overwrite", [False, True])
def test_figures_keep_figures_another_run_wrote_meanwhile(tmp_path, monkeypatch, caplog, overwrite):
    """Without --overwrite, the drift and mask figures (and their .md) replaced those another run with the same
    --name wrote while this one computed; now all three go beside them under one numbering, as the tables do."""
    import logging

    import rcp_llava.evaluation as evaluation

    figures = load_benchmark("figures")
    data = _dataset(tmp_path / "data", ["a", "b"])
    out = tmp_path / "out"
    monkeypatch.setattr(evaluation, "load_base_model", lambda *a, **k: (None, None))

    def other_run_then_result(base, processor, rows, budget, mask_rows):
        out.mkdir()
        (out / "drift_n.png").write_bytes(b"other")
        return {"curves": {"rcp": [1.0, 2.0]}, "masks": [], "mask_points": [], "budget": "1/9", "k": 3,
                "counts": [3], "pruning_layers": [1], "repair_layers": [2]}

    monkeypatch.setattr(figures, "drift_and_masks", other_run_then_result)
    monkeypatch.setattr(figures, "plot_drift", lambda curves, path, title: open(path, "wb").write(b"drift"))
    monkeypatch.setattr(figures, "plot_masks", lambda picks, masks, points, path, title: open(path, "wb").write(b"m"))
    argv = ["--model", "m", "--data", data, "--num_samples", "2", "--num_images", "2", "--output_dir", str(out),
            "--name", "n"]
    with caplog.at_level(logging.WARNING):
        written = figures.main(argv + ["--overwrite"] * overwrite)
    suffix = "" if overwrite else "-2"
    assert written == [str(out / f"drift_n{suffix}.png"), str(out / f"masks_n{suffix}.png")]
    assert (out / f"drift_n{suffix}.png").read_bytes() == b"drift" and (out / f"masks_n{suffix}.png").read_bytes() == b"m"
    table = (out / f"figures_n{suffix}.md").read_text()
    # the table names the figures beside it (it named the other run's drift_n.png)
    assert table.startswith(f"# Figures: drift_n{suffix}.png, masks_n{suffix}.png\n") and "| rcp | 1 | 2 |" in table
    if overwrite:
        assert sorted(os.listdir(out)) == ["drift_n.png", "figures_n.md", "masks_n.png"]
    else:
        assert (out / "drift_n.png").read_bytes() == b"other"
        assert sorted(os.listdir(out)) == ["drift_n-2.png", "drift_n.png", "figures_n-2.md", "masks_n-2.png"]
        # the warning names what the other run wrote, not every planned file
        assert f"{out / 'drift_n.png'}: written by another run while this one ran" in caplog.text


# -- gpu_check.sh: argument handling only (a stand-in PYTHON records what would run; nothing installs or runs) ----


def _gpu_check(tmp_path, *args):
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path / 'calls'}\n")
    recorder.chmod(0o755)
    (tmp_path / "wheels").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": str(recorder), "RCP_WHEELS": str(tmp_path / "wheels")}
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *args], capture_output=True,
                            text=True, timeout=60, env=env, cwd=str(tmp_path))
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return result, calls


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--cpu", "--help"], ["--prepare", "--help"]])
def test_gpu_check_help_prints_the_usage_and_does_nothing_else(tmp_path, args):
    """--help became OUT_DIR, and the script installed wheels before it failed."""
    result, calls = _gpu_check(tmp_path, *args)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("The efficiency table on a GPU (issue 19)")
    assert "  bash benchmarks/gpu_check.sh --prepare [WHEEL_DIR]  # here" in result.stdout
    assert "  bash benchmarks/gpu_check.sh --cpu [--overwrite] [OUT_DIR]" in result.stdout
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["python", "wheels"]


def test_gpu_check_keeps_an_earlier_table_unless_overwrite(tmp_path):
    """Every run passed --overwrite to efficiency.py: a rerun into the default OUT_DIR replaced the earlier table."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "efficiency_tiny_cpu.json").write_text("mine")
    result, calls = _gpu_check(tmp_path, "--cpu", str(out))
    assert result.returncode == 1 and calls == []
    assert result.stderr == (f"gpu_check: {out}/efficiency_tiny_cpu.json already exist: choose another OUT_DIR or "
                             f"pass --overwrite to replace them (bash benchmarks/gpu_check.sh --cpu --overwrite "
                             f"{out}).\n")
    assert (out / "efficiency_tiny_cpu.json").read_text() == "mine"
    os.remove(out / "efficiency_tiny_cpu.json")
    (out / "cuda_tests.txt").write_text("an earlier device's report")  # the CUDA tests' report is kept too
    result, calls = _gpu_check(tmp_path, "--cpu", str(out))
    assert result.returncode == 1 and calls == [] and f"{out}/cuda_tests.txt already exist" in result.stderr
    assert (out / "cuda_tests.txt").read_text() == "an earlier device's report"
    result, calls = _gpu_check(tmp_path, "--cpu", "--overwrite", str(out))
    assert result.returncode == 0, result.stderr
    timed = [c for c in calls if c.startswith("benchmarks/efficiency.py --preset tiny")]
    assert timed == [f"benchmarks/efficiency.py --preset tiny --device cpu --batch_sizes 1,2 --repeats 1 "
                     f"--new_tokens 4 --budgets 64 --output_dir {out} --overwrite"]
    tests = calls.index("-m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py")  # before anything is timed
    assert tests < calls.index(timed[0]) and calls[tests - 1] == "-c import pytest"
    # a fresh OUT_DIR: no --overwrite passed on (efficiency.py keeps its own refusal)
    os.remove(tmp_path / "calls")
    result, calls = _gpu_check(tmp_path, "--cpu", str(tmp_path / "fresh"))
    assert result.returncode == 0, result.stderr
    assert [c for c in calls if c.startswith("benchmarks/efficiency.py --preset tiny")] == [
        f"benchmarks/efficiency.py --preset tiny --device cpu --batch_sizes 1,2 --repeats 1 --new_tokens 4 "
        f"--budgets 64 --output_dir {tmp_path / 'fresh'}"]
    result, calls = _gpu_check(tmp_path, "--bogus")
    assert result.returncode == 2 and "gpu_check: unknown option --bogus" in result.stderr


# -- plugin_params.py, headroom_split.py ---------------------------------------------------------------------------


def test_plugin_params_has_a_parser(monkeypatch, capsys):
    """`--help --bogus` printed the table."""
    plugin_params = load_benchmark("plugin_params")
    monkeypatch.setattr(plugin_params, "counts", _never)
    with pytest.raises(SystemExit) as raised:
        plugin_params.main(["--help"])
    assert raised.value.code == 0 and "Plug-in parameter counts" in capsys.readouterr().out
    with pytest.raises(SystemExit) as raised:
        plugin_params.main(["--bogus"])
    assert raised.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("layers, counts, problem", [
    ("1,7", "8,4", r"`pruning_layers` contains \[7\], but the text model has 4 layers"),
    ("1,2", "8,20", r"`pruning_keep_counts`"),
])
def test_headroom_split_checks_layers_and_counts_before_the_model_loads(tmp_path, monkeypatch, layers, counts,
                                                                        problem):
    """They were refused after the data and the weights had loaded, naming config fields, not the flags."""
    import rcp_llava.evaluation as evaluation

    headroom = load_benchmark("headroom_split")
    monkeypatch.setattr(evaluation, "load_base_model", _never)
    tiny_config().save_pretrained(str(tmp_path / "model"))  # 4 layers, 16 visual tokens; no weights
    data = _dataset(tmp_path / "data", ["a"])
    with pytest.raises(ValueError, match=rf"^--layers '{layers}' / --counts '{counts}' do not fit --model "
                                         rf"'{tmp_path / 'model'}' \(4 decoder layers, 16 visual tokens\): {problem}"):
        headroom.main(["--model", str(tmp_path / "model"), "--data", data, "--layers", layers, "--counts", counts,
                       "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_headroom_split_tests_every_row_against_the_prior_everywhere(tmp_path, monkeypatch):
    """Each row: the layers given the oracle (not the point indices), its accuracy, and McNemar of it against
    S = none (attention_topk at every point), a = samples only this row gets right."""
    import rcp_llava.evaluation as evaluation

    headroom = load_benchmark("headroom_split")
    monkeypatch.setattr(evaluation, "load_base_model", lambda model: (None, None))
    monkeypatch.setattr(headroom, "check_schedule", lambda *args: None)
    outcomes = {(): [1, 0, 0, 0], (0,): [1, 1, 1, 0], (1,): [0, 0, 0, 0], (0, 1): [1, 1, 1, 1]}
    monkeypatch.setattr(headroom, "split_headroom", lambda *args: {s: outcomes[s] for s in args[5]})
    rows = headroom.main(["--model", "m", "--data", _dataset(tmp_path / "data", ["a", "b", "c", "d"]),
                          "--layers", "1,7", "--counts", "8,4", "--output_dir", str(tmp_path / "out")])
    assert [(r["oracle_layers"], r["accuracy"], r["mcnemar_vs_prior"]["a_only"], r["mcnemar_vs_prior"]["b_only"])
            for r in rows] == [([], 0.25, 0, 0), ([1], 0.75, 2, 0), ([7], 0.0, 0, 1), ([1, 7], 1.0, 3, 0)]
    md = (tmp_path / "out" / "headroom_split.md").read_text()
    assert "| none (attention_topk) | 0.250 | 0/0 | 1 |" in md and "| 1, 7 | 1.000 | 3/0 | 0.25 |" in md

def test_headroom_split_default_subsets_are_the_documented_ones_each_once():
    """none, each point alone, all but the first, all: a subset listed twice (one point's "all", two points' "all
    but the first") ran its evaluation twice for one row."""
    headroom = load_benchmark("headroom_split")
    assert headroom.default_subsets(1) == [(), (0,)]
    assert headroom.default_subsets(2) == [(), (0,), (1,), (0, 1)]
    assert headroom.default_subsets(3) == [(), (0,), (1,), (2,), (1, 2), (0, 1, 2)]
    assert headroom.parse_subsets("none;2,1,1;0", 3) == [(), (1, 2), (0,)]


def test_compare_prefill_times_on_a_scripted_clock(tmp_path, monkeypatch):
    """The table's numbers from a scripted clock and selection timers: the warm-up round (new, then old) untimed;
    then old first in odd rounds, new first in even ones; medians (not means) of each version's prefills, the
    ratio the median of the rounds' new / old (not old / new, not the ratio of the medians), and each version's
    select column from its own timer."""
    import modeling_rcp_llava

    compare = load_benchmark("compare_prefill")
    # Per timed prefill, in the order they run: round 1 old 3 ms, new 1 ms; round 2 new 2 ms, old 9 ms; round 3
    # old 4 ms, new 6 ms. Old: median 4 (mean 5.3); new: median 2; new / old per round 1/3, 2/9, 3/2: median 0.333.
    readings = iter([0.0, 0.0] + [t for i, ms in enumerate([3, 1, 2, 9, 4, 6]) for t in (i, i + ms / 1e3)])
    monkeypatch.setattr(compare, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    load_module = compare.load_module

    def with_scripted_timers(name, path):
        module = load_module(name, path)
        if name == "efficiency_benchmark":
            made = []

            class Timer:  # the first made is old's, the second new's: 1 ms and 2 ms of selection per prefill
                def __init__(self, device):
                    made.append(self)
                    self.seconds = len(made) / 1e3

                def wrap(self, model):
                    pass

                def reset(self):
                    pass

                def totals(self):
                    return self.seconds, 0.0

            module.SelectionTimer = Timer
        return module

    monkeypatch.setattr(compare, "load_module", with_scripted_timers)
    output = tmp_path / "ab.md"
    compare.main(["--old", modeling_rcp_llava.__file__, "--preset", "tiny", "--batch_sizes", "1", "--repeats", "3",
                  "--methods", "rcp-64", "--output", str(output)])
    assert "| rcp-64 | 1 | 4.0 | 2.0 | 0.333 | 1.00 | 2.00 | True |" in output.read_text().splitlines()
    assert next(readings, None) is None  # every reading taken: two starts in the warm-up, two per timed prefill


def test_compare_prefill_refuses_an_empty_method_list(tmp_path, monkeypatch):
    """`--methods ,` named no method: the table was written with its header alone."""
    import modeling_rcp_llava

    compare = load_benchmark("compare_prefill")
    monkeypatch.setattr(compare, "RcpLlavaForConditionalGeneration", _never)
    with pytest.raises(ValueError, match=r"^--methods ',': unknown \[\]; use some of \['full', "):
        compare.main(["--old", modeling_rcp_llava.__file__, "--preset", "tiny", "--methods", ",", "--output",
                      str(tmp_path / "ab.md")])
    assert list(tmp_path.iterdir()) == []


def test_compare_prefill_refuses_the_gpu_preset(tmp_path, monkeypatch):
    """`--preset llava-1.5-7b` (efficiency.py's GPU shape) built two random 7B models in fp32 on the CPU (about 56 GB):
    refused before any model, naming the CPU presets."""
    import modeling_rcp_llava

    compare = load_benchmark("compare_prefill")
    monkeypatch.setattr(compare, "RcpLlavaForConditionalGeneration", _never)
    with pytest.raises(ValueError, match=r"^--preset llava-1\.5-7b is efficiency\.py's GPU shape; .* Use a CPU preset: "
                                         r"mid, mid-32, tiny\.$"):
        compare.main(["--old", modeling_rcp_llava.__file__, "--preset", "llava-1.5-7b", "--output",
                      str(tmp_path / "ab.md")])
    assert list(tmp_path.iterdir()) == []


def test_plugin_params_prints_each_count_in_its_column(monkeypatch, capsys):
    """The table: placement, then pruners (ours, with the authors' unused parameters, the paper's), then adapters and
    context likewise, in M, for each model (`counts` stubbed: the columns, not the counting, are under test here)."""
    plugin_params = load_benchmark("plugin_params")
    stub = {name: {"pruning_layers": [1, i], "repair_layers": [i + 1], "pruners": 1_234_567 * i,
                   "pruners_paper_count": 2_000_000 * i, "adapters": 3_000_700 * i,
                   "adapters_paper_count": 4_100_000 * i}
            for i, name in ((1, "LLaVA-1.5-7B"), (2, "LLaVA-1.5-13B"))}
    monkeypatch.setattr(plugin_params, "counts", stub.__getitem__)
    plugin_params.main([])
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| LLaVA-1.5-7B | [1, 1] / [2] | 1.235M | 2.000M | 16.56M | 3.001M | 4.100M | 20.15M |",
        "| LLaVA-1.5-13B | [1, 2] / [3] | 2.469M | 4.000M | 19.70M | 6.001M | 8.200M | 24.87M |"]


def test_baselines_benchmark_schedules():
    """The schedules the docstring gives: VisPruner and random before the LLM, FastV before layer 2 of 8, attention
    top-k before layers 1 / 4 / 7 at the paper's 96 / 26 / 8 scaled by budget / 64."""
    baselines = load_benchmark("baselines_benchmark")
    for method in ("vispruner", "random"):
        fields = baselines.method_fields(method, 128)
        assert (fields["pre_llm_keep_count"], fields["pruning_layers"], fields["pruning_keep_counts"]) == (128, [],
                                                                                                          None)
    fastv = baselines.method_fields("fastv", 64)
    assert (fastv["pruning_layers"], fastv["pruning_keep_counts"], fastv["fastv_query"]) == ([2], [64], "last")
    for budget, counts in ((192, [288, 78, 24]), (128, [192, 52, 16]), (64, [96, 26, 8])):
        topk = baselines.method_fields("attention_topk", budget)
        assert (topk["pruning_layers"], topk["pruning_keep_counts"]) == ([1, 4, 7], counts)
    assert baselines.method_fields("none", None)["pruning_method"] == "none"


def test_baselines_benchmark_table_on_a_scripted_clock(monkeypatch, capsys):
    """The printed table on a small decoder (8 layers, as the placements need) whose head answers token 0 whatever it
    sees (VisPruner reads the second-to-last of two vision layers), so every method agrees with the full model on
    every sample; the clock's n-th reading is n**3 s, so each run's time is known: two warm-up rounds read only a
    start, then each run reads a start and an end, in order."""
    import itertools
    import statistics
    from types import SimpleNamespace

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from configuration_rcp_llava import RcpLlavaConfig

    baselines = load_benchmark("baselines_benchmark")

    def small_config():
        return RcpLlavaConfig(
            text_config=LlamaConfig(hidden_size=32, num_hidden_layers=8, num_attention_heads=2, intermediate_size=64,
                                    vocab_size=1000, pad_token_id=0).to_dict(),
            vision_config=CLIPVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32, image_size=336, patch_size=14).to_dict(),
            image_token_index=999, image_seq_length=576, pruning_method="none", pruning_layers=[], repair_layers=[])

    model_class = baselines.RcpLlavaForConditionalGeneration

    def answers_zero(config):
        model = model_class(config)
        with torch.no_grad():
            model.lm_head.weight.zero_()
        return model

    monkeypatch.setattr(baselines, "mid_config", small_config)
    monkeypatch.setattr(baselines, "RcpLlavaForConditionalGeneration", answers_zero)
    monkeypatch.setattr(baselines, "time", SimpleNamespace(perf_counter=lambda c=itertools.count(): next(c) ** 3))
    repeats, runs = 3, 13
    baselines.main(["--samples", "3", "--batch_size", "2", "--repeats", str(repeats), "--text_tokens", "4",
                    "--threads", str(torch.get_num_threads())])
    lines = capsys.readouterr().out.splitlines()

    def median_time(run):  # the reading before its start: 2 warm-up rounds of one reading per run, then two each
        starts = [2 * runs + 2 * runs * r + 2 * run for r in range(repeats)]
        return statistics.median((s + 1) ** 3 - s ** 3 for s in starts)

    assert f"full prefill: {median_time(0) * 1e3:.1f} ms" in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    expected = []
    for i, (method, kept, avg) in enumerate(
            [("vispruner", 192, 192), ("vispruner", 128, 128), ("vispruner", 64, 64), ("random", 192, 192),
             ("random", 128, 128), ("random", 64, 64), ("fastv", [192], 288), ("fastv", [128], 240),
             ("fastv", [64], 192), ("attention_topk", [288, 78, 24], 212), ("attention_topk", [192, 52, 16], 166),
             ("attention_topk", [96, 26, 8], 119)]):
        label = ("1/3", "2/9", "1/9")[i % 3]
        expected.append(f"| {method} | {label} | {kept} | {avg} | 100% | {median_time(i + 1) / median_time(0):.3f} |")
    assert rows == expected


# -- compiled_selection.py ---------------------------------------------------------------------------------------


def test_compiled_selection_times_the_compiled_selector_beside_the_eager_one_and_the_ideal(tmp_path, compiles):
    """The compiled variant is the model's `compile_selection` (its selector's `keep` through `torch.compile` with the
    backend asked for, compiled once and reused), the eager one plain, the ideal given the eager kept sets; the
    compiled one keeps the same tokens."""
    load_benchmark("efficiency")  # the script imports it by name, as from its own folder
    compiled_selection = load_benchmark("compiled_selection")
    compiled_selection.main(["--preset", "tiny", "--backend", "eager", "--repeats", "2", "--batch_sizes", "1,2",
                             "--output_dir", str(tmp_path)])
    assert [(name.split(".")[-1], kwargs) for name, kwargs in compiles] == [
        ("keep", {"fullgraph": True, "dynamic": False, "backend": "eager"})]
    data = json.loads((tmp_path / "compiled_selection_tiny_cpu_rcp-128_eager.json").read_text())
    assert data["command"] == ("python benchmarks/compiled_selection.py --preset tiny --backend eager --repeats 2 "
                               f"--batch_sizes 1,2 --output_dir {tmp_path}")
    assert data["device"] == "CPU, 2 threads" and data["dtype"] == "float32"
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    points = len(load_benchmark("efficiency").method_configs("tiny", [128])["rcp-128"][0]["pruning_layers"])
    for row in data["results"]:
        assert row["compiled_graphs"] == points  # one per pruning point, compiled afresh for each batch size
        assert row["same_kept_sets"] and row["logits_max_abs_diff"] == 0.0  # Dynamo's eager backend: the same ops
        for variant in ("eager", "compiled"):
            assert 0 < row[f"{variant}_selection_ms"] < row[f"{variant}_prefill_ms"]
            assert 0 < row[f"{variant}_selection_share"] < 1
            assert row[f"{variant}_x_ideal"] > 0
        assert row["ideal_prefill_ms"] > 0
    table = (tmp_path / "compiled_selection_tiny_cpu_rcp-128_eager.md").read_text()
    assert f"Command: `{data['command']}`" in table and table.count("| True |") == 2


def test_compiled_selection_refuses_before_building(tmp_path, monkeypatch):
    """An existing result, and the GPU preset on the CPU (a 7B model in float32), stop it before a model is built."""
    load_benchmark("efficiency")
    compiled_selection = load_benchmark("compiled_selection")
    monkeypatch.setattr(compiled_selection, "RcpLlavaForConditionalGeneration", _never)
    (tmp_path / "compiled_selection_tiny_cpu_rcp-128_eager.md").write_text("kept\n")
    with pytest.raises(FileExistsError, match=r"compiled_selection_tiny_cpu_rcp-128_eager\.md already exist: choose "
                                              r"another --output_dir or pass --overwrite"):
        compiled_selection.main(["--preset", "tiny", "--backend", "eager", "--output_dir", str(tmp_path)])
    assert (tmp_path / "compiled_selection_tiny_cpu_rcp-128_eager.md").read_text() == "kept\n"
    with pytest.raises(ValueError, match=r"^--preset llava-1\.5-7b is efficiency\.py's GPU shape \(a 7B model\): run "
                                         r"it with --device cuda, or use a CPU preset: mid, mid-32, tiny\.$"):
        compiled_selection.main(["--preset", "llava-1.5-7b", "--output_dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
