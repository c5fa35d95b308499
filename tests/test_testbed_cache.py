"""The testbed cache folder (`rcp_llava.testbed.build_testbed`): interrupted saves, stale parts, concurrent builders,
and folders written by earlier versions (the deep testbed took 50 minutes to build: it must be reused as it is)."""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaProcessor

from rcp_llava.testbed import PRESETS, build_testbed, default_cache_dir, evaluate_accuracy, load_testbed


MICRO = PRESETS["micro"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A whole micro testbed, copied by the tests that change one (`_copy`)."""
    return build_testbed("micro", tmp_path_factory.mktemp("cache") / "micro", command="fixture")


def _copy(built, dest):
    shutil.copytree(built, dest)
    return dest


def _files(folder):
    """{relative path: (bytes, mtime)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights_equal(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_stage_save_leaves_no_final_folder(tmp_path, monkeypatch):
    """`final/config.json` was the done-marker, but `save_pretrained` writes it before the weights and the processor
    comes after: a build interrupted there left a `final/` that the next build reused and copied into `model/`."""
    out = tmp_path / "micro"
    original = LlavaProcessor.save_pretrained

    def cut(self, save_directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(os.fspath(save_directory))) == "full":
            raise KeyboardInterrupt("killed while the 'full' stage saves its processor")
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", cut)
    with pytest.raises(KeyboardInterrupt):
        build_testbed("micro", out, pruning_eval=False)
    monkeypatch.setattr(LlavaProcessor, "save_pretrained", original)
    assert not (out / "work" / "full" / "final").exists()
    assert (out / "work" / "full" / "checkpoint-2").is_dir() and not (out / "model").exists()
    build_testbed("micro", out, pruning_eval=False)
    assert sorted(p.name for p in (out / "work" / "full").iterdir()) == [
        "checkpoint-2", "final", "recipe.json", "threads.json"]  # the staging folder is gone
    assert AutoProcessor.from_pretrained(out / "model").chat_template
    assert _weights_equal(out / "model" / "model.safetensors", out / "work" / "full" / "final" / "model.safetensors")


def test_a_half_written_final_folder_of_an_earlier_version_is_saved_again(built, tmp_path, caplog):
    """A `final/` left by an earlier version's interrupted save (config.json, weights cut short, no processor) is
    saved again from the stage's last checkpoint -- the same weights -- instead of being copied into `model/`."""
    out = _copy(built, tmp_path / "micro")
    shutil.rmtree(out / "model")
    final = out / "work" / "full" / "final"
    for name in ("processor_config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
        (final / name).unlink()
    (final / "model.safetensors").write_bytes(b"\0" * 16)
    with caplog.at_level(logging.WARNING, logger="rcp_llava.testbed.train"):
        build_testbed("micro", out, pruning_eval=False)
    assert (f"[testbed] stage 'full': {final} is incomplete (tokenizer_config.json is missing: its save was "
            f"interrupted); removing it and saving the stage again from its last checkpoint") in caplog.text
    assert _weights_equal(out / "model" / "model.safetensors", built / "model" / "model.safetensors")
    assert AutoProcessor.from_pretrained(out / "model").chat_template


def test_an_interrupted_dataset_save_leaves_no_dataset_folder(tmp_path, monkeypatch):
    """`DatasetDict.save_to_disk` writes dataset_dict.json before the splits, and it was the done-marker: a build
    interrupted while saving a split never generated the missing split again."""
    import datasets

    out = tmp_path / "micro"
    original = datasets.Dataset.save_to_disk

    def cut(self, path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "test":
            raise KeyboardInterrupt("killed while saving the test split")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", cut)
    with pytest.raises(KeyboardInterrupt):
        build_testbed("micro", out, pruning_eval=False)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", original)
    assert not (out / "dataset").exists()
    build_testbed("micro", out, pruning_eval=False)
    assert not (out / "dataset.tmp").exists()
    _, _, dataset = load_testbed(out)
    assert {split: dataset[split].num_rows for split in dataset} == {"train": 8, "validation": 4, "test": 8}


def test_a_half_written_dataset_of_an_earlier_version_is_refused_and_generated_again(built, tmp_path, monkeypatch,
                                                                                      caplog):
    """Such a folder (dataset_dict.json, the test split without its state) is named by `load_data("testbed:...")`
    instead of loaded, and the next build generates it again."""
    from rcp_llava.evaluation import load_data

    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path))
    out = _copy(built, tmp_path / "testbed" / "micro")
    data_dir = out / "dataset"
    for name in ("state.json", "dataset_info.json"):
        (data_dir / "test" / name).unlink()
    with pytest.raises(FileNotFoundError, match=(
            rf"^The 'micro' testbed's dataset {data_dir} is incomplete \({data_dir}/test/state.json is missing: its "
            r"save was interrupted\); run `python benchmarks/build_testbed.py --preset micro` \(or `python "
            r"train_rcp.py --testbed_preset micro`, which builds it\) to generate it again\.$")):
        load_data("testbed:micro")
    with caplog.at_level(logging.WARNING, logger="rcp_llava.testbed.build"):
        build_testbed("micro")
    assert (f"[testbed] {data_dir} is incomplete ({data_dir}/test/state.json is missing: its save was interrupted); "
            f"generating it again") in caplog.text
    assert len(load_data("testbed:micro")) == MICRO.num_test
    assert (data_dir / "test" / "dataset_info.json").read_bytes() == (
        built / "dataset" / "test" / "dataset_info.json").read_bytes()


@pytest.mark.parametrize("lost", ["dataset_dict.json", "test/dataset_info.json"])
def test_a_dataset_without_its_record_or_a_splits_info_is_generated_again(built, tmp_path, caplog, lost):
    """A saved dataset is whole only with its dataset_dict.json and each split's state.json AND dataset_info.json:
    without one it is generated again, naming the file, and the build that did it is the recorded `command`. Checking
    state.json alone, taking a folder without a readable dataset_dict.json for a whole one, or counting only training
    as building (the regenerating build filed as `evaluated_by`) passed every test (a mutation audit)."""
    out = _copy(built, tmp_path / "micro")
    data_dir = out / "dataset"
    (data_dir / lost).unlink()
    with caplog.at_level(logging.WARNING, logger="rcp_llava.testbed.build"):
        build_testbed("micro", out, command="regenerate")
    assert (f"[testbed] {data_dir} is incomplete ({data_dir / lost} is missing: its save was interrupted); "
            f"generating it again") in caplog.text
    assert (data_dir / lost).read_bytes() == (built / "dataset" / lost).read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())  # the regenerating build is the command that built it
    assert (metrics["command"], "evaluated_by" in metrics) == ("regenerate", False)


def test_the_dataset_recipe_records_the_scene_generator(built, tmp_path):
    """The recipe left out the generator's settings: a resumed build of a preset whose scenes changed (same name)
    trained and evaluated on the old scenes silently."""
    saved = json.loads((built / "dataset" / "testbed_recipe.json").read_text())
    assert saved == {"preset": "micro", "seed": 0, "image_size": 32, "patch_size": 4, "object_cells": 2,
                     "min_objects": 2, "max_objects": 4, "noise_std": 0.02,
                     "sizes": {"train": 8, "validation": 4, "test": 8}}
    other = tmp_path / "other"
    shutil.copytree(built / "dataset", other / "dataset")
    changed = dataclasses.replace(MICRO, min_objects=1, max_objects=1, noise_std=0.0)
    with pytest.raises(ValueError, match=r"^The dataset in .*other/dataset was not generated by the 'micro' testbed "
                                         r"with seed 0 \(differs in max_objects, min_objects, noise_std\); build "
                                         r"into another `output_dir`, or delete .* to regenerate it\.$"):
        build_testbed(changed, other)
    assert not (other / "work").exists()  # nothing trained on it


def test_a_saved_dataset_recipe_missing_a_key_is_refused_naming_it(tmp_path):
    """Only the scene generator's settings may be missing from a saved recipe (an earlier version's); one without
    `sizes` is refused naming it. Comparing the saved keys only (a mutation audit) accepted it: a dataset of any split
    sizes was reused."""
    from rcp_llava.testbed.build import DATASET_RECIPE_FILE, check_dataset_recipe, dataset_recipe

    recipe = dataset_recipe(MICRO, 0)
    saved = {k: v for k, v in recipe.items() if k != "sizes"}
    (tmp_path / DATASET_RECIPE_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=rf"^The dataset in {re.escape(str(tmp_path))} was not generated by the "
                                         r"'micro' testbed with seed 0 \(differs in sizes\); build into another "
                                         rf"`output_dir`, or delete {re.escape(str(tmp_path))} to regenerate it\.$"):
        check_dataset_recipe(tmp_path, None, recipe)
    (tmp_path / DATASET_RECIPE_FILE).write_text(json.dumps(recipe))
    check_dataset_recipe(tmp_path, None, recipe)  # the whole recipe: accepted


def test_a_saved_dataset_recipe_with_a_setting_this_version_lacks_is_refused_naming_it(tmp_path):
    """A saved recipe recording a setting this version's does not (a newer version's generator) describes other data:
    refused, naming it. Comparing this version's keys only (a mutation audit) reused it silently."""
    from rcp_llava.testbed.build import DATASET_RECIPE_FILE, check_dataset_recipe, dataset_recipe

    recipe = dataset_recipe(MICRO, 0)
    (tmp_path / DATASET_RECIPE_FILE).write_text(json.dumps({**recipe, "object_rotation": 15}))
    with pytest.raises(ValueError, match=r"^The dataset in .* was not generated by the 'micro' testbed with seed 0 "
                                         r"\(differs in object_rotation\); build into another `output_dir`"):
        check_dataset_recipe(tmp_path, None, recipe)


def test_a_deleted_metrics_file_is_evaluated_again_under_the_callers_command(built, tmp_path):
    """metrics.json deleted (as its error message suggests) and the build run again: only evaluations are added, and
    the caller is recorded as `command`, there being no earlier one. Recording the command only when something was
    built (a mutation audit) left metrics.json without a `command`, the caller filed as `evaluated_by`."""
    out = _copy(built, tmp_path / "micro")
    (out / "metrics.json").unlink()
    build_testbed("micro", out, pruning_eval=False, command="re-evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "re-evaluate" and "evaluated_by" not in metrics
    assert list(metrics["build_times"]) == ["evaluation_s"] and metrics["test"]["n"] == MICRO.num_test


def test_an_interrupted_metrics_write_leaves_the_previous_file(built, tmp_path, monkeypatch):
    """metrics.json is written beside its place and renamed: a build killed while writing it leaves the previous
    file whole and no temporary file. Written in place (a mutation audit), it was left cut in half, and the next
    build refused the folder as invalid JSON."""
    import rcp_llava.testbed.build as build_module

    out = _copy(built, tmp_path / "micro")
    before = (out / "metrics.json").read_bytes()

    def cut(path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt("killed while writing metrics.json")

    monkeypatch.setattr(build_module, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        build_testbed("micro", out, command="a later reuse")
    assert (out / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in out.glob("metrics.json*")) == ["metrics.json"]


def test_metrics_record_the_budgets_the_token_count_and_each_familys_chance(built):
    """metrics.json's `budgets`, `num_visual_tokens` and `chance` (the report prints each family's accuracy beside
    its chance) against the preset and the scene vocabularies: attribute questions answer one of 8 colours or 2 sizes
    (1/10), identity one of 6 shapes, existence yes or no, counting zero to three, position one of 4 quadrants. No test
    read them (a mutation audit): attribute's chance as 1/8, or the fractions recorded as budgets, passed."""
    metrics = json.loads((built / "metrics.json").read_text())
    assert (metrics["preset"], metrics["seed"], metrics["num_visual_tokens"]) == ("micro", 0, 64)
    assert metrics["budgets"] == {"1/3": 21, "2/9": 14, "1/9": 7}
    assert metrics["chance"] == {"attribute": 1 / 10, "identity": 1 / 6, "existence": 1 / 2, "counting": 1 / 4,
                                 "position": 1 / 4}


def test_eval_max_samples_limits_every_evaluation_of_a_build(built, tmp_path):
    """`eval_max_samples` (build_testbed.py's `--eval_max_samples`) caps the test, validation and every pruning-table
    accuracy. Dropped from any one of them (a mutation audit), that one silently covered its whole split."""
    out = _copy(built, tmp_path / "micro")
    (out / "metrics.json").unlink()
    build_testbed("micro", out, eval_max_samples=3, command="a subset")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["test"]["n"], metrics["validation"]["n"]) == (3, 3)
    assert {name: {label: acc["n"] for label, acc in table.items()} for name, table in metrics["pruning"].items()} == {
        name: {"1/3": 3, "2/9": 3, "1/9": 3} for name in ("random", "oracle", "saliency")}


def test_the_pruning_table_evaluates_the_fractions_it_is_given(built):
    """`pruning_table(..., fractions=...)` evaluates those budgets only, each pruner keeping that share of the 64
    visual tokens; ignoring them for the preset's three (a mutation audit) passed every test."""
    from rcp_llava.testbed.build import pruning_table

    model, processor, dataset = load_testbed(built)
    table = pruning_table(model, processor, dataset["test"], batch_size=4, max_samples=2, fractions={"1/2": 0.5})
    assert {name: {label: (acc["n"], acc["kept_visual_tokens"]) for label, acc in rows.items()}
            for name, rows in table.items()} == {name: {"1/2": (2, 32.0)} for name in ("random", "oracle", "saliency")}


def test_a_later_evaluation_keeps_the_builds_times(built, tmp_path):
    """A build that only adds an evaluation (the pruning table, here) adds its `evaluation_s` to `build_times` and
    keeps the dataset's and training's times: replacing the record (a mutation audit) lost how long the build took."""
    out = _copy(built, tmp_path / "micro")
    metrics = json.loads((out / "metrics.json").read_text())
    before = metrics["build_times"]
    assert sorted(before) == ["dataset_s", "evaluation_s", "training_s"]
    del metrics["pruning"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    build_testbed("micro", out, command="add the table")
    after = json.loads((out / "metrics.json").read_text())
    assert sorted(after["build_times"]) == ["dataset_s", "evaluation_s", "training_s"]
    assert {k: after["build_times"][k] for k in ("dataset_s", "training_s")} == {
        k: before[k] for k in ("dataset_s", "training_s")}
    assert sorted(after["pruning"]) == ["oracle", "random", "saliency"] and after["evaluated_by"] == "add the table"


def test_a_model_trained_afresh_is_not_reported_as_resumed(built, tmp_path):
    """`build_resumed` describes the model it was written with: retrained from nothing (`model/` deleted and `work/`
    emptied), the new record drops it. Kept (a mutation audit: it missing from the keys dropped on retraining), or set
    for an empty `work/`, the report called a whole build's times partial."""
    out = _copy(built, tmp_path / "micro")
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**metrics, "build_resumed": True}))
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "work")
    (out / "work").mkdir()
    build_testbed("micro", out, pruning_eval=False, command="retrain")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "build_resumed" not in metrics and metrics["command"] == "retrain"
    assert sorted(metrics["build_times"]) == ["dataset_s", "evaluation_s", "training_s"]


def test_a_model_tmp_left_by_an_interrupted_copy_is_replaced(built, tmp_path):
    """`model/` is copied into `model.tmp` and renamed: a `model.tmp` an interrupted copy left is removed first. Kept
    (a mutation audit), the copy failed on it (FileExistsError) in every later build of the folder."""
    out = _copy(built, tmp_path / "micro")
    weights = (out / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "model")
    (out / "model.tmp").mkdir()
    (out / "model.tmp" / "stale.bin").write_text("half a copy")
    build_testbed("micro", out, pruning_eval=False, command="finish")
    assert not (out / "model.tmp").exists() and not (out / "model" / "stale.bin").exists()
    assert (out / "model" / "model.safetensors").read_bytes() == weights  # the stages' final model, reused


@pytest.mark.parametrize("recipe", ["without the scene settings", "none"])
def test_a_folder_of_the_earlier_format_is_reused_as_it_is(built, tmp_path, caplog, recipe):
    """A folder written before this version -- its dataset recipe without the scene settings, or without a recipe
    (the deep testbed's) and no lock file -- is reused: nothing trained, evaluated or rewritten."""
    out = _copy(built, tmp_path / "micro")
    (out / ".build.lock").unlink(missing_ok=True)
    path = out / "dataset" / "testbed_recipe.json"
    scene_fields = ("patch_size", "object_cells", "min_objects", "max_objects", "noise_std")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in scene_fields}
    if recipe == "none":
        path.unlink()
    else:
        assert sorted(old) == ["image_size", "preset", "seed", "sizes"]  # what the earlier version wrote
        path.write_text(json.dumps(old, indent=2, sort_keys=True))
    before = _files(out)
    with caplog.at_level(logging.INFO, logger="rcp_llava.testbed.build"):
        build_testbed("micro", out, command="a later reuse")
    info = (f"[testbed] {path} was written before the scene generator's settings were recorded (patch_size, "
            f"object_cells, min_objects, max_objects, noise_std): compared on image_size, preset, seed, sizes only")
    assert (info in caplog.text) == (recipe != "none")
    assert "stage '" not in caplog.text
    after = _files(out)
    assert after.pop(".build.lock")[0] == b""  # the one new file
    assert after.pop("metrics.json")[0] == before.pop("metrics.json")[0]  # rewritten with the same bytes
    assert after == before


def test_metrics_are_evaluated_again_when_the_model_is_retrained(built, tmp_path):
    """metrics.json kept the replaced model's accuracy and pruning table (evaluated only when missing): deleting
    `model/` and a stage, as the error messages say, published the old numbers for the new model."""
    out = _copy(built, tmp_path / "micro")
    metrics = json.loads((out / "metrics.json").read_text())
    sentinel = {"overall": -1.0, "families": {}}
    metrics.update(test=sentinel, validation=sentinel, pruning={"random": {}}, evaluated_by="an earlier job")
    (out / "metrics.json").write_text(json.dumps(metrics))
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "work" / "full")
    import rcp_llava.testbed.build as build_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("killed while training")

    original = build_module.train_testbed_model
    build_module.train_testbed_model = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            build_testbed("micro", out)
    finally:
        build_module.train_testbed_model = original
    interrupted_metrics = json.loads((out / "metrics.json").read_text())
    assert not {"test", "validation", "pruning", "evaluated_by"} & set(interrupted_metrics)
    build_testbed("micro", out, command="retrain")
    metrics = json.loads((out / "metrics.json").read_text())
    model, processor, dataset = load_testbed(out)
    assert metrics["test"] == evaluate_accuracy(model, processor, dataset["test"], batch_size=MICRO.eval_batch_size)
    assert metrics["validation"] == evaluate_accuracy(model, processor, dataset["validation"],
                                                      batch_size=MICRO.eval_batch_size)
    assert sorted(metrics["pruning"]) == ["oracle", "random", "saliency"]
    assert sorted(metrics["pruning"]["random"]) == ["1/3", "1/9", "2/9"]
    assert metrics["command"] == "retrain" and "evaluated_by" not in metrics
    # finished on stages an earlier run trained: its times are not the build's, and the report does not sum them
    assert metrics["build_resumed"] is True and "build_resumed" not in json.loads((built / "metrics.json").read_text())
    report = _load_benchmark("testbed_report").format_report(metrics, out)
    line = report.split("Build times")[1].split("\n")[0]
    assert line.startswith(" (s) as recorded: ") and "last run reused stages an earlier run trained" in line
    assert "total " not in line


def _load_benchmark(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_damaged_metrics_file_and_a_build_folder_given_as_data_are_named(built, tmp_path):
    """A cut-short metrics.json was a bare JSONDecodeError naming no file; the build's folder given where its
    dataset/ goes (`--data OUT`) was datasets' "neither a `Dataset` directory nor a `DatasetDict` directory"."""
    from rcp_llava.evaluation import load_data

    out = _copy(built, tmp_path / "micro")
    (out / "metrics.json").write_text('{"test":')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / 'metrics.json'))} is not valid JSON \(Expecting "
                                         r"value: .*\): restore it, or delete it to evaluate the built model again"):
        build_testbed("micro", out)
    with pytest.raises(ValueError, match=rf"^--data {re.escape(repr(str(out)))} is a folder, but no `save_to_disk` "
                                         rf"dataset \(no dataset_dict.json or state.json\); it holds "
                                         rf"{re.escape(repr(str(out / 'dataset')))} \(a testbed build's dataset\): "
                                         r"pass that\.$"):
        load_data(str(out))
    assert len(load_data(str(out / "dataset"), max_samples=2).rows) == 2
    # a saved dataset with a split's file missing keeps datasets' own error, which names the file
    (out / "dataset" / "test" / "state.json").unlink()
    with pytest.raises(FileNotFoundError) as missing:
        load_data(str(out / "dataset"))
    assert "is a folder, but no `save_to_disk` dataset" not in str(missing.value)


_PAUSED_BUILDER = """
import pathlib, sys, time
import rcp_llava.testbed.build as build
out, signals = sys.argv[1], pathlib.Path(sys.argv[2])
train = build.train_testbed_model
def paused(*args, **kwargs):
    (signals / "paused").write_text("")
    while not (signals / "go").exists():
        time.sleep(0.05)
    return train(*args, **kwargs)
build.train_testbed_model = paused
build.build_testbed("micro", out, pruning_eval=False, command="first")
"""
_BUILDER = """
import sys
from rcp_llava.testbed import build_testbed
build_testbed("micro", sys.argv[1], pruning_eval=False, command="second")
"""


def _wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_second_builder_of_one_folder_waits_and_reuses_the_first_ones_build(tmp_path):
    """Two builders of one folder (two `train_rcp.py` runs on an unbuilt testbed) shared `model.tmp` and read each
    other's half-written stages, and crashed. The second now waits for the first one's lock, then reuses its build."""
    out, signals = tmp_path / "micro", tmp_path / "signals"
    signals.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def start(code, log, *args):
        with open(tmp_path / log, "w") as handle:  # a file, not a pipe: a full pipe would stall the builder
            return subprocess.Popen([sys.executable, "-c", code, str(out), *args], cwd=ROOT, env=env,
                                    stdout=handle, stderr=subprocess.STDOUT)

    def log(name):
        return (tmp_path / name).read_text()

    first = start(_PAUSED_BUILDER, "first.log", str(signals))
    second = None
    try:
        _wait_for(lambda: (signals / "paused").exists() or first.poll() is not None, 120, "the first builder")
        assert first.poll() is None, log("first.log")
        second = start(_BUILDER, "second.log")
        waiting = f"[testbed] waiting for another build of {out} to finish (it holds {out / '.build.lock'})"
        _wait_for(lambda: waiting in log("second.log") or second.poll() is not None, 120, "the second builder")
        assert waiting in log("second.log"), log("second.log")
        assert second.poll() is None and not (out / "model").exists()
        (signals / "go").write_text("")
        assert first.wait(timeout=120) == 0, log("first.log")
        assert second.wait(timeout=120) == 0, log("second.log")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert "stage 'full' done" in log("first.log") and "[testbed] stage" not in log("second.log"), log("second.log")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "first" and "evaluated_by" not in metrics  # the second one reused it unchanged
    assert not (out / "model.tmp").exists()


@pytest.mark.parametrize("variable, expected", [
    ("RCP_LLAVA_CACHE", ("cache", "testbed", "micro")),
    ("HF_HOME", ("cache", "rcp_llava", "testbed", "micro")),
    ("XDG_CACHE_HOME", ("cache", "rcp_llava", "testbed", "micro")),
])
def test_default_cache_dir_expands_the_home_folder(monkeypatch, tmp_path, variable, expected):
    """huggingface_hub expands `~` in these variables; the testbed went into a folder literally named `~`."""
    for name in ("RCP_LLAVA_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(variable, "~/cache")
    assert default_cache_dir("micro") == tmp_path.joinpath(*expected)
