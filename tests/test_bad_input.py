"""Bad input across the public surface (issue 17, first part): each case asserts the error type and the message
that names the argument, the value and the fix. Cases that silently ran on nonsense before are marked `was silent`."""

import base64
import io
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

from conftest import NUM_VISUAL, ROOT, make_batch, make_model, tiny_config


# -- training arguments --------------------------------------------------------------------------------


TRAINING_ARGS = [
    ({"lambda_sparse": math.nan}, r"`lambda_sparse` must be a finite number >= 0, got nan"),  # was silent
    ({"lambda_task": math.inf}, r"`lambda_task` must be a finite number >= 0, got inf"),  # was silent
    ({"lambda_repair": -1.0}, r"`lambda_repair` must be a finite number >= 0, got -1"),
    ({"gumbel_temperature_end": 0.0}, r"`gumbel_temperature_end` must be a finite number > 0, got 0"),
    ({"gumbel_temperature_start": math.nan}, r"`gumbel_temperature_start` must be a finite number > 0, got nan"),
    ({"max_steps": 0}, r"`max_steps` is 0: give a positive number of steps, or -1"),  # was: trained anyway
    ({"per_device_train_batch_size": 0}, r"`per_device_train_batch_size` must be a positive integer, got 0"),
    ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` must be a positive integer, got 0"),
    ({"learning_rate": math.nan}, r"`learning_rate` must be a finite number > 0, got nan"),
    ({"seed": -1}, r"`seed` must be in \[0, 2\*\*32 - 1\], got -1"),  # was set_seed's error, after the model loaded
    ({"data_seed": 2 ** 32}, r"`data_seed` must be in \[0, 2\*\*32 - 1\], got 4294967296"),
    ({"sparsity_warmup_ratio": 1.5}, r"`sparsity_warmup_ratio` must be in \[0, 1\], got 1.5"),
    ({"gumbel_noise_ratio": math.nan}, r"`gumbel_noise_ratio` must be in \[0, 1\], got nan"),
    ({"gumbel_anneal_ratio": -0.1}, r"`gumbel_anneal_ratio` must be in \[0, 1\], got -0.1"),
    ({"repair_loss_pooling": "all"}, r"`repair_loss_pooling` is 'all'; use one of \['batch', 'sample'\]"),
    ({"sparsity_reduction": "mean"}, r"`sparsity_reduction` is 'mean'; use one of \['batch', 'sample'\]"),
    ({"gumbel_schedule": "cosine"}, r"`gumbel_schedule` is 'cosine'; use one of \['authors', 'geometric'\]"),
    ({"sparsity_schedule": "exp"}, r"`sparsity_schedule` is 'exp'; use one of \['cosine', 'linear'\]"),
    ({"sparsity_layers": "some"}, r"`sparsity_layers` is 'some'; use 'all' or 'from_first_pruner'"),
    ({"repair_loss_layers": "a,b"}, r"`repair_loss_layers` must be integers, e.g. '1,13,25' or '1 13 25', got 'a,b'"),
]


@pytest.mark.parametrize("overrides, match", TRAINING_ARGS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                                  for o, _ in TRAINING_ARGS])
def test_training_arguments(tmp_path, overrides, match):
    from train_rcp import RcpTrainingArguments

    with pytest.raises(ValueError, match=match):
        RcpTrainingArguments(output_dir=str(tmp_path), report_to=[], **overrides)


# -- config and placements -----------------------------------------------------------------------------


CONFIGS = [
    ({"gumbel_temperature": math.inf}, ValueError, r"`gumbel_temperature` must be a positive float, got inf"),
    ({"pruner_hidden_size": 18, "pruner_num_heads": 4}, ValueError,
     r"`pruner_num_heads` \(4\) must divide `pruner_hidden_size` \(18\)"),
    ({"pruner_num_heads": 0}, ValueError, r"`pruner_num_heads` must be a positive int, got 0"),
    ({"pruner_dropout": 1.0}, ValueError, r"`pruner_dropout` must be a float in \[0, 1\), got 1.0"),
    ({"query_dropout": math.nan}, ValueError, r"`query_dropout` must be a float in \[0, 1\), got nan"),
    ({"pruning_layers": [1, 9]}, ValueError, r"`pruning_layers` contains \[9\], but the text model has 4 layers"),
    ({"repair_layers": [0]}, ValueError, r"`repair_layers` starts at 0, before the first pruning layer 1"),
]


@pytest.mark.parametrize("overrides, error, match", CONFIGS, ids=[next(iter(o)) for o, _, _ in CONFIGS])
def test_config(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize("args, match", [
    ((1,), r"`num_layers` must be an int >= 2 .* got 1"),
    ((32.0,), r"`num_layers` must be an int >= 2 .* got 32.0"),
    ((32, 1.5), r"`budget_fraction` must be a fraction of the visual tokens in \(0, 1\], got 1.5"),
    ((32, math.nan), r"`budget_fraction` must be a fraction of the visual tokens in \(0, 1\], got nan"),
])
def test_paper_placement(args, match):
    from configuration_rcp_llava import paper_placement

    with pytest.raises(ValueError, match=match):
        paper_placement(*args)


# -- forward ---------------------------------------------------------------------------------------------


def _masks(kind):
    keep = torch.ones(1, 2, NUM_VISUAL, dtype=torch.bool)
    if kind == "float":
        return keep.float()  # was silent: read as "keep" wherever non-zero
    if kind == "not_cumulative":
        keep[0, 0, 3] = False  # dropped at the first point, kept at the second: was silent
        return keep
    return keep[:, :1]  # one point for two


@pytest.mark.parametrize("kind, error, match", [
    ("float", TypeError, r"`visual_keep_masks` must be a bool tensor \(True = keep\), got torch.float32"),
    ("not_cumulative", ValueError, r"`visual_keep_masks` is not cumulative: a token kept at a later pruning point"),
    ("shape", ValueError, r"`visual_keep_masks` has shape \(1, 1, 16\), expected \(1, 2, 16\)"),
])
def test_visual_keep_masks(kind, error, match):
    model = make_model()
    batch = make_batch([(1, 3, True)])
    with pytest.raises(error, match=match), torch.no_grad():
        model(**batch, visual_keep_masks=_masks(kind))


def test_gumbel_temperature_argument_must_be_finite():
    model = make_model().train()
    with pytest.raises(ValueError, match=r"The `gumbel_temperature` argument must be a positive float, got inf"):
        model(**make_batch([(1, 3, True)]), gumbel_temperature=math.inf)


# -- training data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["", "   ", None], ids=["empty", "blank", "none"])
def test_an_empty_answer_is_refused(answer):
    """Was silent: an empty answer trained on EOS alone."""
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.testbed import build_dataset, build_processor, get_preset

    row = dict(build_dataset("micro", seed=0)["train"][0], answer=answer)
    with pytest.raises(ValueError, match=rf"An example's 'answer' is {answer!r}: .* Drop the example or fix"):
        RcpDataCollator(build_processor(get_preset("micro")))([row])


# -- readers ---------------------------------------------------------------------------------------------


def _pope(tmp_path, rows):
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scienceqa(tmp_path, answer):
    (tmp_path / "problems.json").write_text(json.dumps({"5": {
        "question": "Q?", "choices": ["a", "b"], "answer": answer, "hint": "", "image": "image.png",
        "subject": "s", "split": "test"}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["5"]}))
    (tmp_path / "images" / "test" / "5").mkdir(parents=True)
    return tmp_path


def _mmbench(tmp_path, answer):
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    row = [7, "Q?", "", "x", "y", "z", "w", answer, "c", "l2", img]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\t".join(header) + "\n" + "\t".join(map(str, row)) + "\n")
    return path


READERS = [
    ("pope_maybe", lambda t: ("pope", _pope(t, [{"question_id": 3, "image": "x.jpg", "text": "?", "label": "maybe"}])),
     r"coco_pope_random.json: question_id 3: label 'maybe' is not 'yes' or 'no'"),  # was silent
    ("pope_empty", lambda t: ("pope", _pope(t, [])), r"coco_pope_random.json: no questions in the file"),
    ("sqa_minus_one", lambda t: ("scienceqa_img", _scienceqa(t, -1)),
     r"problems.json: problem 5: answer index -1 is outside its 2 choices"),  # was silent (read as the last)
    ("sqa_beyond", lambda t: ("scienceqa_img", _scienceqa(t, 2)),
     r"problems.json: problem 5: answer index 2 is outside its 2 choices"),
    ("mmbench_e", lambda t: ("mmbench", _mmbench(t, "E")),
     r"mmbench.tsv: row index 7: answer 'E' is not one of its options \['A', 'B', 'C', 'D'\]"),  # was silent
]


@pytest.mark.parametrize("make, match", [(m, r) for _, m, r in READERS], ids=[c for c, _, _ in READERS])
def test_readers(tmp_path, make, match):
    from rcp_llava.readers import read_benchmark

    name, path = make(tmp_path)
    with pytest.raises(ValueError, match=match):
        read_benchmark(name, path)


@pytest.mark.parametrize("limit", [-1, 0, 1.5, True])
def test_read_benchmark_limit(tmp_path, limit):
    from rcp_llava.readers import read_benchmark

    with pytest.raises(ValueError, match=rf"`limit` is {limit!r}; use a positive number of records, or None"):
        read_benchmark("pope", tmp_path, limit=limit)  # checked before the files are read


# -- command lines ---------------------------------------------------------------------------------------------


def test_budgets_with_a_fixed_budget_is_refused(tmp_path):
    import train_rcp

    with pytest.raises(ValueError, match=r"--budgets trains one set per budget fraction: leave "
                                         r"--visual_token_budget and --pruning_keep_counts unset"):
        train_rcp.main(["--budgets", "1/3,1/9", "--visual_token_budget", "16", "--output_dir", str(tmp_path),
                        "--report_to", "none"])


def test_resume_from_checkpoint_false_is_no_resume_to_the_folder_check(tmp_path):
    """Was: the folder check took the string "false" as a resume and let the run replace the one in the folder."""
    import train_rcp

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics.json\)\. Pass --overwrite_output_dir"):
        train_rcp.main(["--base_model", str(tmp_path / "nothing"), "--output_dir", str(out), "--report_to", "none",
                        "--resume_from_checkpoint", "false"])
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("flag, value", [("max_eval_samples", "0"), ("max_eval_samples", "-2"),
                                         ("max_train_samples", "0"), ("max_train_samples", "-3")])
def test_sample_limits_below_one_are_refused(tmp_path, flag, value):
    """Was: --max_eval_samples 0 failed in the final evaluation (an IndexError), after training and before anything
    was saved; --max_train_samples 0 trained on every example, -3 on none ("the 'train' split is empty")."""
    import train_rcp

    with pytest.raises(ValueError, match=rf"^--{flag} {value}: give a positive number of examples, or leave it "
                                         r"unset for all\.$"):
        train_rcp.main([f"--{flag}", value, "--output_dir", str(tmp_path), "--report_to", "none"])


@pytest.mark.parametrize("flag", ["--max_step", "--per_device_train_batch"])
def test_abbreviated_flags_are_refused(tmp_path, flag):
    """Was: argparse took `--max_step 2` as --max_steps, and the main job then put its own 400 steps in its place
    (a flag the user gave, as they typed it, is what keeps the job's default away). Now an unknown flag, refused
    as HfArgumentParser refuses one."""
    import train_rcp

    with pytest.raises(ValueError, match=rf"^Some specified arguments are not used by the HfArgumentParser: "
                                         rf"\['{flag}', '2'\]$"):
        train_rcp.main([flag, "2", "--output_dir", str(tmp_path), "--report_to", "none"])


def test_do_train_false_is_refused(tmp_path):
    """Was: read nowhere, so the run trained anyway."""
    import train_rcp

    with pytest.raises(ValueError, match=r"^--do_train false: this script always trains the plug-ins\. To score "
                                         r"plug-ins without training, load them"):
        train_rcp.main(["--do_train", "false", "--output_dir", str(tmp_path), "--report_to", "none"])


def test_budgets_check_every_budgets_folder_before_the_first_trains(tmp_path):
    """Was: budget 1/8 trained and saved completely, and only then was budget 1/2's folder found to hold a run."""
    import train_rcp

    (tmp_path / "budget_1_2").mkdir()
    (tmp_path / "budget_1_2" / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"^--output_dir '.*budget_1_2' already holds a run \(metrics.json\)"):
        train_rcp.main(["--budgets", "1/8,1/2", "--base_model", str(tmp_path / "nothing"), "--output_dir",
                        str(tmp_path), "--report_to", "none"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget_1_2"]


@pytest.mark.parametrize("text, error, match", [
    ("1/3", ValueError, r"--plugins_per_budget item '1/3' is not BUDGET=FOLDER"),
    ("1/3=", ValueError, r"--plugins_per_budget item '1/3=' is not BUDGET=FOLDER"),
    ("1/3=/no/such/folder", FileNotFoundError, r"--plugins_per_budget: no plug-in folder '/no/such/folder' for 1/3"),
    # the last folder of a repeated budget was used, silently
    ("1/3=.,1/3=.", ValueError, r"^--plugins_per_budget names budget '1/3' twice \(as '1/3' too\): give one plug-in "
                                r"folder per budget\.$"),
    ("1/3=.,0.3333333=.", ValueError, r"^--plugins_per_budget names budget '0.3333333' twice \(as '1/3' too\)"),
])
def test_plugins_per_budget_argument(text, error, match):
    from conftest import load_benchmark

    with pytest.raises(error, match=match):
        load_benchmark("evaluate_methods").parse_plugins_per_budget(text)


# -- nothing the user saved is lost ------------------------------------------------------------------------------


def test_save_plugins_refuses_another_models_plugins(tmp_path):
    make_model(pruning_layers=[1, 2]).save_plugins(tmp_path)
    with pytest.raises(FileExistsError, match=r"already holds plug-ins of another model \(pruning_layers: \[1, 2\] -> "
                                              r"\[1, 3\]\).*pass `overwrite=True`"):
        make_model(pruning_layers=[1, 3]).save_plugins(tmp_path)


@pytest.mark.parametrize("field, first, second", [("pruner_num_heads", 4, 2), ("num_pruning_queries", 16, 8)])
def test_save_plugins_refuses_plugins_that_differ_only_in_heads_or_queries(tmp_path, field, first, second):
    """The same placement and sizes, another head count (no tensor shape shows it) or query count: other plug-ins,
    which `save_plugins` replaced unasked while `save_pretrained` refused them."""
    make_model(pruning_layers=[1, 2], **{field: first}).save_plugins(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=rf"already holds plug-ins of another model \({field}: {first} -> "
                                              rf"{second}\).*pass `overwrite=True`"):
        make_model(pruning_layers=[1, 2], **{field: second}).save_plugins(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_plugins_reads_an_older_record_through_the_defaults(tmp_path):
    """An rcp_config.json written before `num_pruning_queries` / `pruner_num_heads` were recorded describes plug-ins
    built with their defaults: updating them is allowed, another head count is refused with the default named."""
    from configuration_rcp_llava import RcpLlavaConfig

    make_model(pruning_layers=[1, 2]).save_plugins(tmp_path)
    path = tmp_path / "rcp_config.json"
    record = json.loads(path.read_text())
    assert record["pruner_num_heads"] == RcpLlavaConfig.pruner_num_heads == 4
    del record["num_pruning_queries"], record["pruner_num_heads"]
    path.write_text(json.dumps(record))
    make_model(seed=1, pruning_layers=[1, 2]).save_plugins(tmp_path)  # the same plug-ins, updated
    assert json.loads(path.read_text())["pruner_num_heads"] == 4
    path.write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match=r"\(pruner_num_heads: 4 -> 2\)"):
        make_model(pruning_layers=[1, 2], pruner_num_heads=2).save_plugins(tmp_path)


@pytest.mark.parametrize("text, reason", [("[1, 2]", "a JSON list, not an object"), ("{oops", "Expecting")])
def test_save_plugins_over_an_unreadable_record_names_it(tmp_path, text, reason):
    (tmp_path / "rcp_config.json").write_text(text)
    with pytest.raises(FileExistsError, match=rf"holds a rcp_config.json that cannot be read \({reason}.*\), so this "
                                              r"save cannot tell.*pass `overwrite=True`"):
        make_model(pruning_layers=[1, 2]).save_plugins(tmp_path)
    assert (tmp_path / "rcp_config.json").read_text() == text and not (tmp_path / "rcp_plugins.safetensors").exists()


def test_save_plugins_into_the_same_models_folder_and_with_overwrite(tmp_path):
    from safetensors.torch import load_file

    make_model(pruning_layers=[1, 2]).save_plugins(tmp_path)
    make_model(seed=1, pruning_layers=[1, 2]).save_plugins(tmp_path)  # same model: an update, allowed
    other = make_model(seed=2, pruning_layers=[1, 3])
    other.save_plugins(tmp_path, overwrite=True)
    saved = load_file(tmp_path / "rcp_plugins.safetensors")
    assert torch.equal(saved["model.rcp_plugins.pruners.3.bias"], other.model.rcp_plugins.pruners["3"].bias.detach())


def test_an_interrupted_plugin_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Fault injection: the weights write fails (disk full) - the earlier checkpoint is intact, no temporary file."""
    import modeling_rcp_llava as m

    model = make_model(pruning_layers=[1, 2])
    model.save_plugins(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m, "_save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        make_model(seed=3, pruning_layers=[1, 2]).save_plugins(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _run_script(module, script, argv, monkeypatch):
    """A benchmark script's `main` on `argv` (efficiency.py reads `sys.argv`)."""
    if script == "efficiency":
        monkeypatch.setattr("sys.argv", ["efficiency.py"] + argv)
        return module.main()
    return module.main(argv)


@pytest.mark.parametrize("script, argv, existing", [
    ("evaluate_methods", ["--model", "{tmp}/none", "--name", "t"], "t.json"),
    ("ablations", ["--name", "t"], "t.md"),
    ("calibrate_retention", ["--model", "{tmp}/none", "--name", "t"], "t.json"),
    ("figures", ["--table", "{tmp}/x.json", "--name", "t"], "accuracy_vs_tokens_t.png"),
    ("efficiency", ["--preset", "tiny", "--device", "cpu"], "efficiency_tiny_cpu.md"),
])
def test_benchmark_scripts_refuse_to_overwrite_results(tmp_path, monkeypatch, script, argv, existing):
    """Twice with the same name replaced the earlier results (was silent); checked before anything loads."""
    from conftest import load_benchmark

    (tmp_path / existing).write_text("{}")
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--output_dir", str(tmp_path)]
    module = load_benchmark(script)
    flags = "--tag / --output_dir" if script == "efficiency" else "--name / --output_dir"  # efficiency has no --name
    with pytest.raises(FileExistsError, match=rf"{existing} already exist: choose another {flags} or "
                                              r"pass --overwrite"):
        _run_script(module, script, argv, monkeypatch)
    assert (tmp_path / existing).read_text() == "{}"


@pytest.mark.parametrize("script, argv", [
    ("evaluate_methods", ["--model", "{tmp}/none", "--name", "t"]),
    ("ablations", ["--name", "t"]),
    ("calibrate_retention", ["--model", "{tmp}/none", "--name", "t"]),
    ("figures", ["--table", "{tmp}/x.json", "--name", "t"]),
    ("efficiency", ["--preset", "tiny", "--device", "cpu"]),
    ("headroom_split", ["--model", "{tmp}/none", "--data", "{tmp}/none", "--name", "t"]),
    ("selection_signal", ["--model", "{tmp}/none", "--data", "{tmp}/none", "--name", "t"]),
    ("testbed_diagnostics", ["--folder", "{tmp}", "--name", "t"]),
])
def test_benchmark_scripts_refuse_an_output_dir_they_cannot_write_before_anything_loads(tmp_path, monkeypatch,
                                                                                         script, argv):
    """`--output_dir` naming a file failed at the write, after the whole run, with a bare FileExistsError from
    os.makedirs; it is refused before the model (here: a folder that does not exist) is read."""
    from conftest import load_benchmark

    (tmp_path / "results.md").write_text("mine")
    (tmp_path / "dataset").mkdir()  # testbed_diagnostics checks its --folder's layout first
    (tmp_path / "model").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--output_dir", str(tmp_path / "results.md" / "sub")]
    module = load_benchmark(script)
    with pytest.raises(NotADirectoryError, match=r"^--output_dir '.*results.md/sub': '.*results.md' is a file, so "
                                                 r"the results cannot be written there\. Choose another --output_dir"):
        _run_script(module, script, argv, monkeypatch)
    assert (tmp_path / "results.md").read_text() == "mine"


def test_recorded_commands_are_quoted_for_the_shell():
    """`--subsets 'none;0'` was recorded as `--subsets none;0`: pasted, that ran `--subsets none` and a command 0."""
    import shlex

    from rcp_llava.results import command_line

    argv = ["--subsets", "none;0", "--name", "my run", "--budgets", "1/9"]
    recorded = command_line(os.path.join(ROOT, "benchmarks", "headroom_split.py"), argv)
    assert recorded == "python benchmarks/headroom_split.py --subsets 'none;0' --name 'my run' --budgets 1/9"
    assert shlex.split(recorded)[2:] == argv


def test_a_command_run_outside_the_repository_records_where_it_ran(tmp_path, monkeypatch):
    """Run from another folder, the record said `python benchmarks/NAME.py --data rel/path`, which names files that
    exist only relative to where it ran."""
    import shlex

    from rcp_llava.results import command_line

    script = os.path.join(ROOT, "benchmarks", "evaluate_methods.py")
    (tmp_path / "my dir").mkdir()
    monkeypatch.chdir(tmp_path / "my dir")
    recorded = command_line(script, ["--data", "testbed/dataset"])
    assert recorded == f"cd {shlex.quote(str(tmp_path / 'my dir'))} && python {shlex.quote(script)} --data testbed/dataset"
    assert "my dir'" in recorded  # quoted: the folder's name has a space
    # quoted there too: `none;0` unquoted is two commands when pasted
    assert command_line(script, ["--subsets", "none;0"]).endswith(" --subsets 'none;0'")
    monkeypatch.chdir(ROOT)
    assert command_line(script, ["--data", "x"]) == "python benchmarks/evaluate_methods.py --data x"
    # without `argv`, the arguments the script ran with: sys.argv after the script's own path
    monkeypatch.setattr("sys.argv", [script, "--data", "d"])
    assert command_line(script) == "python benchmarks/evaluate_methods.py --data d"


@pytest.mark.parametrize("script", ["evaluate_methods", "ablations", "calibrate_retention", "figures", "efficiency"])
def test_benchmark_scripts_do_not_default_to_the_committed_results(script):
    """By default they wrote into the committed benchmarks/results/."""
    import argparse
    from unittest import mock

    from conftest import load_benchmark

    module = load_benchmark(script)
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["defaults"] = {a.dest: a.default for a in self._actions}
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        module.main([]) if script != "efficiency" else module.main()
    assert seen["defaults"]["output_dir"] == "outputs/benchmarks"


# -- loading ------------------------------------------------------------------------------------------------------


def _stock_folder(tmp_path, pickle=False):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    shape = tiny_config()
    config = LlavaConfig(text_config=shape.text_config.to_dict(), vision_config=shape.vision_config.to_dict(),
                         image_token_index=shape.image_token_index, image_seq_length=NUM_VISUAL)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    if pickle:  # a folder with only pytorch_model.bin, as older checkpoints ship
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    return tmp_path


def test_a_pickle_only_base_folder_is_refused(tmp_path):
    """Was silent: the project promises safetensors only."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    folder = _stock_folder(tmp_path, pickle=True)
    with pytest.raises(ValueError, match=r"holds only pickle weights \(pytorch_model.bin\); rcp-llava loads "
                                         r"safetensors only"):
        RcpLlavaForConditionalGeneration.from_pretrained(folder, pruning_method="none")


@pytest.mark.parametrize("entry", ["from_pretrained", "from_base", "load_base_model"])
def test_a_missing_local_folder_is_named(tmp_path, entry):
    """Was: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.evaluation import load_base_model

    missing = str(tmp_path / "no" / "such" / "model")
    call = {"from_pretrained": RcpLlavaForConditionalGeneration.from_pretrained,
            "from_base": RcpLlavaForConditionalGeneration.from_base, "load_base_model": load_base_model}[entry]
    with pytest.raises(FileNotFoundError, match=r"no such folder \(and it is not a Hub repo id of the form "
                                                r"'user/name'\)"):
        call(missing)


def test_train_rcp_names_a_missing_base_model(tmp_path):
    import train_rcp

    with pytest.raises(FileNotFoundError, match=r"`--base_model` '\./nowhere/model': no such folder"):
        train_rcp.main(["--base_model", "./nowhere/model", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])


# -- resuming -----------------------------------------------------------------------------------------------------


def _checkpoint(root, step, complete=True):
    from train_rcp import CHECKPOINT_FILES

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES[: len(CHECKPOINT_FILES) if complete else 1]:
        (folder / name).write_text("x")
    return folder


def test_resume_skips_an_incomplete_newest_checkpoint(tmp_path, caplog):
    from train_rcp import resolve_resume

    good = _checkpoint(tmp_path, 200)
    _checkpoint(tmp_path, 400, complete=False)  # interrupted while being written
    assert resolve_resume("true", str(tmp_path)) == str(good)


def test_resuming_a_checkpoint_without_optimizer_state_warns(tmp_path, caplog):
    """--save_only_model checkpoints hold no optimizer.pt / scheduler.pt: the Trainer resumed from fresh ones without
    a word, so the run silently differed from an uninterrupted one. A full checkpoint resumes quietly."""
    from train_rcp import resolve_resume

    folder = _checkpoint(tmp_path, 200)
    for value in ("last", str(folder)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert resolve_resume(value, str(tmp_path)) == str(folder)
        assert (f"resuming from {folder}, which has no optimizer.pt, scheduler.pt (saved with --save_only_model?): "
                "the plug-ins and the step count resume, the optimizer and the learning-rate schedule start afresh"
                in caplog.text), value
    (folder / "optimizer.pt").write_text("x")
    (folder / "scheduler.pt").write_text("x")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resolve_resume("last", str(tmp_path)) == str(folder)
    assert "start afresh" not in caplog.text


@pytest.mark.parametrize("value, error, match", [
    ("last", FileNotFoundError, r"--resume_from_checkpoint last: no complete checkpoint-N in"),
    ("{root}/checkpoint-400", ValueError, r"checkpoint-400' is incomplete \(no rcp_config.json, trainer_state.json\)"),
    ("{root}/checkpoint-9", FileNotFoundError, r"checkpoint-9': no such folder"),
    # the run's folder itself, not a checkpoint: "interrupted while being written" sent the user astray
    ("{root}", ValueError, r"^--resume_from_checkpoint '.*' is a run's output folder \(it holds checkpoint-400\), not a "
                           r"checkpoint: give one of its checkpoint-N folders, or `last` with --output_dir set to it\.$"),
    ("{root}/finished", ValueError, r"'.*finished' is a run's output folder \(it holds no checkpoint-N\), not a "),
])
def test_resume_refuses_what_cannot_be_resumed(tmp_path, value, error, match):
    from train_rcp import resolve_resume

    _checkpoint(tmp_path, 400, complete=False)
    (tmp_path / "finished").mkdir()  # a run saved without checkpoints: its metrics.json only
    (tmp_path / "finished" / "metrics.json").write_text("{}")
    with pytest.raises(error, match=match):
        resolve_resume(value.format(root=tmp_path), str(tmp_path))


# -- more entry points ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 1, 16, 16)], ids=["3d", "one_channel"])
def test_pixel_values_shape(shape):
    """Was a deep torch error from the vision tower's patch convolution."""
    model = make_model()
    batch = dict(make_batch([(1, 3, True)]), pixel_values=torch.randn(*shape))
    with pytest.raises(ValueError, match=r"`pixel_values` must be \(num_images, 3, height, width\), got "
                                         + str(shape).replace("(", r"\(").replace(")", r"\)")):
        model(**batch)


def test_a_misspelt_config_key_warns(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["pruning_layer"] = data.pop("pruning_layers")
    data["pruning_keep_counts"] = None  # the adaptive threshold: the default layers load without counts
    (tmp_path / "config.json").write_text(json.dumps(data))
    from configuration_rcp_llava import RcpLlavaConfig

    with pytest.warns(UserWarning, match=r"unknown key 'pruning_layer': did you mean 'pruning_layers'\?"):
        RcpLlavaConfig.from_pretrained(tmp_path)


def test_an_empty_training_split_is_refused():
    from rcp_llava.data import RcpDataCollator, check_dataset
    from rcp_llava.testbed import build_dataset, build_processor, get_preset

    empty = build_dataset("micro", seed=0)["train"].select([])
    with pytest.raises(ValueError, match=r"The 'train' split is empty: there is nothing to train on"):
        check_dataset(empty, RcpDataCollator(build_processor(get_preset("micro"))), name="'train' split")


def test_a_streaming_dataset_is_named_by_check_dataset():
    """`check_dataset` on an `IterableDataset` (streaming) failed with "object of type 'IterableDataset' has no len()"
    (a probe); RcpTrainer itself trains on one."""
    from rcp_llava.data import RcpDataCollator, check_dataset
    from rcp_llava.testbed import build_dataset, build_processor, get_preset

    rows = build_dataset("micro", seed=0)["train"]
    collator = RcpDataCollator(build_processor(get_preset("micro")))
    with pytest.raises(TypeError, match=r"^`check_dataset` checks a map-style `datasets.Dataset` up front, but the "
                                        r"'train' split is a streaming IterableDataset\. Check a sample of it"):
        check_dataset(rows.to_iterable_dataset(), collator, name="'train' split")
    from datasets import Dataset

    check_dataset(Dataset.from_list(list(rows.to_iterable_dataset().take(3))), collator)  # the advice works


@pytest.mark.parametrize("flag", ["--batch_size", "--max_samples", "--max_new_tokens", "--threads"])
def test_evaluate_methods_counts(tmp_path, flag, capsys):
    """Was "range() arg 3 must not be zero" after the model had loaded; then a ValueError after parsing; now the
    parser's own error, as every other script's counts (`results.positive_int`)."""
    from conftest import load_benchmark

    with pytest.raises(SystemExit) as exit_:
        load_benchmark("evaluate_methods").main(["--model", str(tmp_path), "--output_dir", str(tmp_path), flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a whole number >= 1, got '0'" in capsys.readouterr().err


def test_generate_names_an_all_zero_attention_row():
    """Was told to "pad on the left", which it was."""
    model = make_model()
    batch = make_batch([(1, 3, True), (2, 3, True)])
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"`attention_mask` row\(s\) \[1\] are all zeros: the prompt has no token"):
        model.generate(**batch, max_new_tokens=2)


@pytest.mark.parametrize("name", ["rcp", "vispruner", "fastv"])
def test_a_prompt_that_ends_on_its_image_is_refused(name):
    """Crashed with "cannot reshape tensor of 0 elements" (the first pruner dropped the token standing in for the
    question); a surviving pruner would also have moved the position the next token is read from."""
    from test_baselines import METHODS

    model = make_model(**METHODS.get(name, {}))
    batch = make_batch([(2, 0, True)])
    with pytest.raises(ValueError, match=r"Row 0 of the batch ends on its image: a pruner could drop the last prompt "
                                         r"token.*pruning_method='none'"), torch.no_grad():
        model(**batch)


def test_a_question_mask_without_text_is_refused():
    model = make_model()
    batch = make_batch([(2, 3, True)])
    only_image = batch["input_ids"] == 99
    with pytest.raises(ValueError, match=r"Row 0 of the batch has an image but `question_mask` marks no text token"), \
            torch.no_grad():
        model(**batch, question_mask=only_image)


def test_an_answer_right_after_the_image_conditions_on_the_text_before_it():
    """With labels on every token after the image, the pruners read the last text token before it (was: the
    last token of the row, an answer token)."""
    batch = make_batch([(2, 3, True)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]
    before_image = torch.zeros_like(labels, dtype=torch.bool)
    before_image[0, 2] = True  # BOS, 2 prefix tokens, then the image
    all_before = torch.zeros_like(labels, dtype=torch.bool)
    all_before[0, :3] = True
    # the adaptive threshold (Eq. 8) reads the logits' values, not only their order: the query rows show there
    for counts in ([10, 5], None):
        model = make_model(seed=3, randomize_plugins=True, pruning_keep_counts=counts)
        with torch.no_grad():
            default = model(**batch, labels=labels)
            explicit = model(**batch, labels=labels, question_mask=before_image)
            every_text_token = model(**batch, labels=labels, question_mask=all_before)
        torch.testing.assert_close(default.logits, explicit.logits, rtol=0, atol=0)
        assert torch.equal(default.keep_masks, explicit.keep_masks)
    assert not torch.equal(default.keep_masks, every_text_token.keep_masks)  # the last one alone, not all


def test_an_answer_right_after_the_image_gives_a_flat_prior(monkeypatch):
    """What the README says of that fallback: the text before the image attends to no visual token, so Eq. 4's prior
    is flat at every point -- one value for every token, 0 up to the centring's rounding (RCP ranks by its learned
    scores alone) -- and attention top-k keeps the first tokens in raster order."""
    from modeling_rcp_llava import RcpPruner

    batch = make_batch([(2, 3, True)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -3:] = batch["input_ids"][0, -3:]
    priors, forward = [], RcpPruner.forward
    monkeypatch.setattr(RcpPruner, "forward", lambda self, visual, valid, question, q_valid, prior:
                        priors.append((prior, valid)) or forward(self, visual, valid, question, q_valid, prior))
    with torch.no_grad():
        make_model(seed=3, randomize_plugins=True)(**batch, labels=labels)
        topk = make_model(pruning_method="attention_topk", repair_layers=[])(**batch, labels=labels).keep_masks
    assert len(priors) == 2 and all(p[v].unique().numel() == 1 and p[v].abs().max() < 1e-5 for p, v in priors)
    first = torch.zeros(1, 2, NUM_VISUAL, dtype=torch.bool)
    first[0, 0, :10], first[0, 1, :5] = True, True
    assert torch.equal(topk, first)


# -- evaluate_methods: the grid is checked before the model loads ------------------------------------------------


@pytest.mark.parametrize("flags, error, match", [
    (["--methods", "rcp,fastvv"], ValueError, r"--methods 'rcp,fastvv': unknown method\(s\) \['fastvv'\]; choose from"),
    (["--budgets", "1/3,1/0"], ValueError, r"Budget '1/0' is not a fraction like '1/3' or '0.25'"),
    (["--budgets", "2"], ValueError, r"Budget '2' must be a fraction of the visual tokens in \(0, 1\]"),
    # was reported as `pruning_layers`, after the model and the data had loaded
    (["--fastv_layer", "4"], ValueError, r"--fastv_layer 4 is outside \[1, 3\]: FastV prunes before decoder layer K"),
    (["--fastv_layer", "0"], ValueError, r"--fastv_layer 0 is outside \[1, 3\]"),
    # each cell ran twice and printed a duplicate row
    (["--methods", "rcp,fastv,rcp"], ValueError, r"--methods names \['rcp'\] more than once; give each once"),
    (["--budgets", "1/3,1/9,1/3"], ValueError, r"--budgets names \['1/3'\] more than once"),
    # a reader's error came after the model had loaded
    (["--data", "gqa:{tmp}/empty.json"], ValueError, r"no questions"),
    # without attention_topk the oracle added no row, and the run ended with exit 0
    (["--oracle"], ValueError, r"^--oracle adds a row per attention_topk row \(its layers and counts\), but --methods "
                               r"'none,rcp,vispruner,fastv,random' has no attention_topk; add it"),
    # both came after the model had loaded (and, for the oracle, after the earlier datasets were evaluated)
    (["--oracle", "--methods", "attention_topk", "--data", "gqa:{tmp}/gqa.json"], ValueError,
     r"^--oracle needs testbed data \(its evidence patches\), but --data \['gqa:.*gqa.json'\] are not testbed"),
    (["--plugins_per_budget", "1/9={tmp}", "--budgets", "1/3"], ValueError,
     r"^--plugins_per_budget names budget '1/9', which is not among --budgets '1/3'; add it there or drop it here"),
    # both spellings of one budget ran, two identical rows
    (["--budgets", "1/3,0.3333333"], ValueError, r"^--budgets names one budget twice, as '1/3' and '0.3333333'"),
    # recorded in the command and ignored
    (["--methods", "none,vispruner", "--fastv_layer", "1"], ValueError,
     r"^--fastv_layer sets the layer K of a single-layer method \(fastv\), but --methods 'none,vispruner' has none; "
     r"add fastv or drop --fastv_layer\.$"),
    # added RCP rows to a grid without rcp
    (["--methods", "none,vispruner", "--plugins_per_budget", "1/3={tmp}", "--budgets", "1/3"], ValueError,
     r"^--plugins_per_budget gives RCP's plug-ins per budget, but --methods 'none,vispruner' has no rcp; add it or "
     r"drop --plugins_per_budget\.$"),
    # refused in the grid's plan, after the model had loaded
    (["--data", "gqa:{tmp}/gqa.json"], ValueError, r"^--methods \['rcp'\] prune at an RCP model's layers, but --model "
                                                   r"'.*stock' is a stock 'llava' checkpoint: give --plugins"),
])
def test_evaluate_methods_checks_the_grid_before_loading(tmp_path, monkeypatch, flags, error, match):
    from conftest import load_benchmark

    import rcp_llava.evaluation as evaluation

    folder = _stock_folder(tmp_path / "stock")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "gqa.json").write_text(json.dumps({"q1": {"imageId": "1", "question": "What colour?", "answer": "red"}}))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "1.jpg")
    monkeypatch.setattr(evaluation, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(error, match=match):
        load_benchmark("evaluate_methods").main(["--model", str(folder), "--output_dir", str(tmp_path)] + flags)


# -- LLaVA-style JSON ---------------------------------------------------------------------------------------------


def _llava_json(tmp_path, records=None, image=True):
    (tmp_path / "images").mkdir(exist_ok=True)
    if image:
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    records = records if records is not None else [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "A cat."}]}]
    (tmp_path / "data.json").write_text(records if isinstance(records, str) else json.dumps(records))
    return tmp_path / "data.json"


def _turn(speaker, value):
    return {"from": speaker, "value": value}


def test_llava_json_reads_every_turn_and_the_chat_role_names(tmp_path):
    """A multi-turn record is one row of turns (`turns="conversation"`, the default since multi-turn training: LLaVA
    trains a conversation as one sequence) or one row per human/gpt pair (`turns="pairs"`, what every record gave
    before); "user"/"assistant" are taken as "human"/"gpt"."""
    from rcp_llava.data import load_llava_json

    path = _llava_json(tmp_path, [
        {"image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "A cat."),
                                             _turn("human", "Where?"), _turn("gpt", " Inside. ")]},
        {"image": "a.png", "conversations": [_turn("user", "Colour?<image>"), _turn("assistant", "Grey.")]}])
    rows = load_llava_json(str(path), str(tmp_path / "images"), turns="pairs")
    assert [(r["question"], r["answer"]) for r in rows] == [("What?", "A cat."), ("Where?", "Inside."),
                                                            ("Colour?", "Grey.")]
    rows = load_llava_json(str(path), str(tmp_path / "images"))
    assert [(r["question"], r["answer"]) for r in rows] == [(["What?", "Where?"], ["A cat.", "Inside."]),
                                                            (["Colour?"], ["Grey."])]
    with pytest.raises(ValueError, match=r"^--llava_turns 'all': use 'conversation' \(one sequence per record\) or "
                                         r"'pairs'"):
        load_llava_json(str(path), str(tmp_path / "images"), turns="all")


def test_llava_json_with_a_relative_image_folder_finds_its_images(tmp_path, monkeypatch):
    """As the README writes it (`--image_folder images/`), the collator looked in images/images/."""
    from rcp_llava.data import load_image, load_llava_json

    _llava_json(tmp_path)
    monkeypatch.chdir(tmp_path)
    rows = load_llava_json("data.json", "images/")
    assert rows[0]["image"] == str(tmp_path / "images" / "a.png")
    # what RcpDataCollator(image_folder="images/") then does with the row (it joined the folder a second time)
    assert load_image(rows[0]["image"], "images/").size == (8, 8)


@pytest.mark.parametrize("name, lines", [("data.jsonl", 1), ("data.jsonl", 2), ("data.json", 2)])
def test_llava_json_lines_are_read_as_the_list(tmp_path, name, lines):
    """LLaVA-style data is also shipped as JSON Lines: --llava_json called it "not valid JSON" (several lines) or
    "must hold a non-empty JSON list ... got dict" (one), and --dataset_name_or_path read it as a table and asked for
    question / answer columns instead of pointing to --llava_json."""
    import train_rcp
    from rcp_llava.data import load_llava_json

    record = {"id": "r", "image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "A cat.")]}
    listed = load_llava_json(str(_llava_json(tmp_path, [record] * lines)), str(tmp_path / "images"))
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(record) for _ in range(lines)) + "\n")
    rows = load_llava_json(str(path), str(tmp_path / "images"))
    assert rows.to_list() == listed.to_list() and len(rows) == lines
    if name.endswith(".jsonl"):
        with pytest.raises(ValueError, match=r"is a LLaVA-style JSON \(records with 'conversations'\): pass it as "
                                             r"--llava_json"):
            train_rcp.load_splits(str(path))
    path.write_text("{not json}\n{}\n")
    with pytest.raises(ValueError, match=r"is not valid JSON .*or JSON Lines, one record per line"):
        load_llava_json(str(path), str(tmp_path / "images"))
    # a broken JSON document keeps its own error's position (not line 1 of a JSON Lines reading)
    broken = json.dumps([record, record], indent=1)[:-2] + ",\n]"  # a trailing comma, far below line 1
    (tmp_path / "broken.json").write_text(broken)
    with pytest.raises(json.JSONDecodeError) as original:
        json.loads(broken)
    assert original.value.lineno > 1
    with pytest.raises(ValueError, match=re.escape(f"is not valid JSON ({original.value});")):
        load_llava_json(str(tmp_path / "broken.json"), str(tmp_path / "images"))


def test_llava_json_names_the_record_of_an_image_placeholder_in_an_answer(tmp_path):
    """Was found by check_dataset, as "Example 1 of the 'train' split": its row in the rebuilt dataset, which is not
    the record's number once text-only records are skipped or pairs expanded, and without its id."""
    from rcp_llava.data import load_llava_json

    good = {"image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "A cat.")]}
    bad = {"id": "rec-42", "image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"),
                                                               _turn("gpt", "blue, see <image>")]}
    path = _llava_json(tmp_path, [{"conversations": [_turn("human", "Hi?"), _turn("gpt", "Hello.")]}, good, bad])
    for turns in ("conversation", "pairs"):
        with pytest.raises(ValueError, match=rf"^Record 2 \(id 'rec-42'\) of {re.escape(str(path))}: turn 1 \(gpt\) "
                                             r"holds the image placeholder '<image>' in its answer 'blue, see "
                                             r"<image>'; the image goes with the first question\."):
            load_llava_json(str(path), str(tmp_path / "images"), turns=turns)


def test_a_llava_style_dataset_folder_is_pointed_to_llava_json(tmp_path):
    """A folder (or Hub dataset) of LLaVA records loads as columns id / image / conversations, and the user was told to
    rename columns, which cannot turn turns into a question and an answer."""
    from datasets import Dataset
    from transformers import AutoProcessor

    from rcp_llava.data import RcpDataCollator, check_dataset
    from rcp_llava.testbed import build_processor, get_preset

    rows = Dataset.from_list([{"id": "a", "image": "a.png", "conversations": [_turn("human", "<image>\nQ?"),
                                                                             _turn("gpt", "A.")]}])
    collator = RcpDataCollator(build_processor(get_preset("micro")))
    with pytest.raises(ValueError, match=r"^The dataset has no column\(s\) \['question', 'answer'\]; it has "
                                         r"\['conversations', 'id', 'image'\]\. Its 'conversations' column holds "
                                         r"LLaVA-style records: give the JSON file itself with --llava_json"):
        check_dataset(rows, collator)
    with pytest.raises(ValueError, match=r"Name the right ones with --image_column"):  # other columns: as before
        check_dataset(rows.rename_column("conversations", "turns"), collator)


def test_llava_json_skips_text_only_records_and_says_so(tmp_path, caplog):
    """llava_v1_5_mix665k.json holds text-only (ShareGPT) records: the whole file was refused with "Record 2 lacks
    'image' or 'conversations'". They are skipped and counted; a file of nothing else is refused."""
    from rcp_llava.data import load_llava_json

    image = {"id": "a", "image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "A cat.")]}
    text = {"id": "t", "conversations": [_turn("human", "Hi?"), _turn("gpt", "Hello.")]}
    path = _llava_json(tmp_path, [image, text, image, {**text, "id": "u"}])
    rows = load_llava_json(str(path), str(tmp_path / "images"))
    assert [r["answer"] for r in rows] == ["A cat.", "A cat."]  # single-turn throughout: plain strings
    assert (f"{path}: skipped 2 text-only record(s) of 4 (no 'image'; RCP trains on image questions), e.g. Record "
            "1 (id 't'), Record 3 (id 'u').") in caplog.text
    with pytest.raises(ValueError, match=r"Every record of .*data.json is text-only \(no 'image'\)"):
        load_llava_json(str(_llava_json(tmp_path, [text])), str(tmp_path / "images"))
    with pytest.raises(ValueError, match=r"Record 1 of .*data.json is not a dict with 'conversations' \(and "
                                         r"'image'\), got 'a.png'"):
        load_llava_json(str(_llava_json(tmp_path, [image, "a.png"])), str(tmp_path / "images"))


def test_batch_eval_metrics_is_refused_before_anything_loads(micro_testbed, tmp_path, monkeypatch):
    """transformers calls compute_metrics per batch with `compute_result` under --batch_eval_metrics, which
    answer_metrics does not take: the run failed in its first evaluation, after the model had loaded."""
    from transformers import AutoConfig

    import train_rcp

    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("the base model was read"))
    with pytest.raises(ValueError, match=r"^--batch_eval_metrics is not supported here: the answer metrics "
                                         r"\(answer_metrics\) score the whole evaluation at once"):
        train_rcp.main(["--base_model", str(micro_testbed / "model"), "--dataset_name_or_path",
                        str(micro_testbed / "dataset"), "--pruning_layers", "1", "--repair_layers", "1",
                        "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "--max_steps", "1",
                        "--eval_strategy", "steps", "--eval_steps", "1", "--batch_eval_metrics"])
    assert not (tmp_path / "out").exists()


def test_a_multi_turn_test_split_is_refused_before_training(micro_testbed, tmp_path):
    """The final evaluation scores one question per image: a test split of conversations failed after training."""
    from datasets import load_from_disk

    import train_rcp

    splits = load_from_disk(str(micro_testbed / "dataset"))
    splits["test"] = splits["test"].map(lambda r: {"question": [r["question"]], "answer": [r["answer"]]})
    splits.save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"^--test_split 'test' holds multi-turn rows \(lists of questions\): the "
                                         r"final evaluation scores one question per image"):
        train_rcp.main(["--base_model", str(micro_testbed / "model"), "--dataset_name_or_path", str(tmp_path / "data"),
                        "--pruning_layers", "1", "--repair_layers", "1", "--output_dir", str(tmp_path / "out"),
                        "--report_to", "none", "--use_cpu", "--max_steps", "1"])
    assert not (tmp_path / "out").exists()
    from rcp_llava.evaluation import load_data

    with pytest.raises(ValueError, match=r"split 'test' holds multi-turn rows \(lists of questions\): the evaluation "
                                         r"scores one question per image"):
        load_data(str(tmp_path / "data"), split="test")


@pytest.mark.parametrize("rows_given, row, shown", [
    (lambda i, answer: ["a", "a"], 0, r"\['a', 'a'\]"),  # a list column: every row
    (lambda i, answer: None if i == 2 else answer, 2, "None"),
])
def test_a_dataset_folder_whose_answers_are_not_text_is_refused_when_read(micro_testbed, tmp_path, rows_given, row,
                                                                          shown):
    """`load_data` (`evaluate_methods.py --data DIR`) checked a testbed-format folder's columns but not their values:
    a list or null answer was scored as its repr ("['a', 'a']", "None"), and a list switched the scoring mode."""
    from datasets import Dataset, load_from_disk

    from rcp_llava.evaluation import load_data

    splits = load_from_disk(str(micro_testbed / "dataset"))
    rows = splits["test"].select(range(3)).to_list()
    splits["test"] = Dataset.from_list([dict(r, answer=rows_given(i, r["answer"])) for i, r in enumerate(rows)])
    splits.save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=rf"data split 'test': row {row}'s 'answer' is {shown}, not text; the testbed "
                                         r"format holds one question and one answer string per row\.$"):
        load_data(str(tmp_path / "data"), split="test")


def test_conversations_are_read_turn_by_turn_and_checked(micro_testbed):
    """The rules of TRL's messages format and of conversation rows, each pinned: a user turn's text parts join with a
    newline, an odd turn count and an empty conversation are refused, a split mixing one- and two-turn rows keeps
    every row's turns, and an undecoded image cell reads its embedded bytes before its (maybe absent) path."""
    from datasets import Dataset
    from transformers import AutoProcessor

    from rcp_llava.data import RcpDataCollator, dataset_from_messages, load_image, turns_from_messages

    def user(*texts):
        return {"role": "user", "content": [{"type": "image"}] + [{"type": "text", "text": t} for t in texts]}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    assert turns_from_messages([user("Look.", "What colour?"), assistant("Red")], ["img"]) == (
        "img", ["Look.\nWhat colour?"], ["Red"])
    with pytest.raises(ValueError, match=r"^a row: its messages hold 3 user / assistant turns; a conversation needs a "
                                         r"user question then its assistant answer, at least once\.$"):
        turns_from_messages([user("Q1"), assistant("A1"), user("Q2")], ["img"])
    mixed = dataset_from_messages(Dataset.from_list([
        {"messages": [user("Q1"), assistant("A1")], "images": ["x.png"]},
        {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")], "images": ["y.png"]}]))
    assert [(row["question"], row["answer"]) for row in mixed] == [(["Q1"], ["A1"]), (["Q1", "Q2"], ["A1", "A2"])]
    collator = RcpDataCollator(AutoProcessor.from_pretrained(micro_testbed / "model"))
    assert collator.text_problem({"question": [], "answer": []}) == (
        ValueError, "'question' holds 0 turn(s) and 'answer' 0: a conversation needs one answer per question, at "
                    "least one turn.")
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), "red").save(buffer, format="PNG")
    # datasets.Image(decode=False) of an embedded image: the path is where it came from, not where it is
    assert load_image({"bytes": buffer.getvalue(), "path": "photo_000.png"}).size == (5, 3)


def test_trl_messages_and_images_datasets_train(micro_testbed, tmp_path):
    """TRL's conversational vision format (`messages` + `images`, as HuggingFaceH4/llava-instruct-mix-vsft) was
    refused ("the 'images' column holds lists ... Keep one image per example"): it is read as one conversation per
    row; single-turn splits become plain questions, so the final evaluation runs on them."""
    from datasets import DatasetDict, load_from_disk

    import train_rcp
    from rcp_llava.data import dataset_from_messages, turns_from_messages

    source = load_from_disk(str(micro_testbed / "dataset"))

    def to_trl(rows, turns):
        def convert(row, index):
            messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
            for k in range(turns):
                content = [{"type": "text", "text": row["question"]}]
                messages += [{"role": "user", "content": ([{"type": "image", "text": None}] if k == 0 else [])
                              + content},
                             {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
            return {"messages": messages, "images": [row["image"]]}
        return rows.map(convert, with_indices=True, remove_columns=rows.column_names)

    data = DatasetDict({"train": to_trl(source["train"], 2), "test": to_trl(source["test"].select(range(4)), 1)})
    data.save_to_disk(str(tmp_path / "trl"))
    converted = dataset_from_messages(data["train"])
    assert converted[0]["question"] == [source["train"][0]["question"]] * 2
    assert converted[0]["answer"] == [source["train"][0]["answer"]] * 2
    assert converted[0]["image"].size == source["train"][0]["image"].size
    assert dataset_from_messages(data["test"])[0]["question"] == source["test"][0]["question"]  # single-turn: a string
    metrics = train_rcp.main([
        "--base_model", str(micro_testbed / "model"), "--dataset_name_or_path", str(tmp_path / "trl"),
        "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8", "--repair_bottleneck_size", "8",
        "--budget_fraction", "0.25", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu",
        "--max_steps", "1", "--per_device_train_batch_size", "2"])
    assert metrics["rcp"]["n"] == 4 and (tmp_path / "out" / "plugins" / "rcp_plugins.safetensors").is_file()
    with pytest.raises(ValueError, match=r"^Row 3 holds 2 images: RCP trains on one image per conversation"):
        turns_from_messages(data["train"][0]["messages"], data["train"][0]["images"] * 2, where="Row 3")
    with pytest.raises(ValueError, match=r"^Row 0: message 0 is from 'assistant', expected 'user'"):
        turns_from_messages(data["train"][0]["messages"][2:] + data["train"][0]["messages"][1:2],
                            data["train"][0]["images"], where="Row 0")


def test_dataset_paths_load_as_datasets_reads_them(tmp_path):
    """A saved single `Dataset` was searched row by row for a 'train' split and every row (images decoded) printed in
    the error; a Hub-style folder (parquet under data/) was 'neither a Dataset nor a DatasetDict directory'; a LLaVA
    JSON given as --dataset_name_or_path was 'Couldn't find any data file' although it exists."""
    from datasets import Dataset, DatasetDict

    from train_rcp import load_splits

    rows = {"question": ["q1", "q2"], "answer": ["a1", "a2"]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    assert list(load_splits(str(tmp_path / "single"), "mine")) == ["mine"]
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dict"))
    assert sorted(load_splits(str(tmp_path / "dict"))) == ["test", "train"]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    hub = load_splits(str(tmp_path / "hub"))
    assert list(hub) == ["train"] and hub["train"]["answer"] == ["a1", "a2"]
    Dataset.from_dict(rows).to_json(str(tmp_path / "rows.jsonl"))
    assert load_splits(str(tmp_path / "rows.jsonl"))["train"]["question"] == ["q1", "q2"]
    # the loader as datasets picks it from the name: a .tsv was read as a one-column CSV ('question\tanswer'), a
    # .ndjson or compressed file was looked up on the Hub as a builder named 'ndjson' / 'gz'
    import gzip

    (tmp_path / "files").mkdir()
    lines = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(rows["question"], rows["answer"]))
    (tmp_path / "files" / "rows.tsv").write_text("question\tanswer\nq1\ta1\nq2\ta2\n")
    (tmp_path / "files" / "rows.ndjson").write_text(lines)
    with gzip.open(tmp_path / "files" / "rows.jsonl.gz", "wt") as f:
        f.write(lines)
    with gzip.open(tmp_path / "files" / "rows.csv.gz", "wt") as f:
        f.write("question,answer\nq1,a1\nq2,a2\n")
    (tmp_path / "files" / "ROWS.JSONL").write_text(lines)
    # the file alone, whatever is beside it (a review: reading it as its folder's data file let a helper module, a
    # README's front matter that is not YAML, or the case of its extension refuse it)
    (tmp_path / "files" / "files.py").write_text("HELPER = 1\n")
    (tmp_path / "files" / "README.md").write_text("---\nNotes: run this: then that\n---\n")
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "files" / "rows.Parquet"))  # datasets' own map: parquet
    for name in ("rows.tsv", "rows.ndjson", "rows.jsonl.gz", "rows.csv.gz", "ROWS.JSONL", "rows.Parquet"):
        split = load_splits(str(tmp_path / "files" / name))["train"]
        assert split.column_names == ["question", "answer"] and split["answer"] == ["a1", "a2"], name
    # a file no builder reads: 'xyz' was looked up on the Hub as a dataset's name, and a file without an extension
    # failed with a bare IndexError inside datasets
    (tmp_path / "files" / "rows.xyz").write_text(lines)
    (tmp_path / "files" / "rows").write_text(lines)
    for name, what in (("rows.xyz", "the extension '.xyz'"), ("rows", "no extension")):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"--dataset_name_or_path {str(tmp_path / 'files' / name)!r} is a file with {what}, which no "
                "`datasets` builder reads: name it by its format (.json, .jsonl, .csv, .tsv, .txt, .parquet, .arrow), "
                "or pass its folder or a `save_to_disk` folder.")):
            load_splits(str(tmp_path / "files" / name))
    path = _llava_json(tmp_path)
    with pytest.raises(ValueError, match=r"is a LLaVA-style JSON \(records with 'conversations'\): pass it as "
                                         r"--llava_json \(with --image_folder"):
        load_splits(str(path))


@pytest.mark.parametrize("case, error, match", [
    ("no_file", FileNotFoundError, r"--llava_json: no file '.*missing.json'"),
    ("no_folder", FileNotFoundError, r"--image_folder: no folder '.*nowhere'"),
    ("bad_json", ValueError, r"data.json is not valid JSON \(Expecting"),
    ("not_a_list", ValueError, r"data.json must hold a non-empty JSON list of records .* got dict"),
    ("empty", ValueError, r"data.json must hold a non-empty JSON list of records .* got list \(empty\)"),
    ("no_image", FileNotFoundError, r"Record 0 of .*data.json: no image file '.*a.png'"),
    ("one_turn", ValueError, r"Record 0 of .*data.json: 'conversations' must be a list of at least one human"),
    # os.path.join raised a bare TypeError ("join() argument must be str ... not 'list'") naming no record
    ("image_list", TypeError, r"Record 1 \(id 'b'\) of .*data.json: 'image' is \['a.png', 'a.png'\] \(list\), "
                              r"expected one image path as a string: .* Drop text-only or multi-image records\."),
    ("image_null", TypeError, r"Record 1 \(id 'b'\) of .*data.json: 'image' is None \(NoneType\), expected one"),
    # text saved as .png passed the existence check, then PIL.UnidentifiedImageError stopped training mid-run
    ("corrupt_image", ValueError, r"Record 1 \(id 'b'\) of .*data.json: the image file '.*images/bad.png' cannot "
                                  r"be read as an image \(cannot identify image file .*\)\. Replace the file"),
    # question and answer swapped: "Found total 3 <image> tokens and 2 images" mid-training
    ("gpt_first", ValueError, r"Record 1 \(id 'b'\) of .*data.json: turn 0 is from 'gpt', expected 'human' "
                              r"\(or 'user'\): turns alternate human, gpt, human, gpt"),
    ("two_questions", ValueError, r"Record 1 \(id 'b'\) of .*data.json: turn 1 is from 'human', expected 'gpt' "),
    ("no_from", ValueError, r"Record 1 \(id 'b'\) of .*data.json: turn 0 is from None, expected 'human'"),
    # the unanswered question was dropped silently
    ("unanswered", ValueError, r"Record 1 \(id 'b'\) of .*data.json: the last turn \(2\) is a human question "
                               r"without a gpt answer\. Add the answer or drop the turn\."),
    # the collator refused it, but only after the model had loaded
    ("empty_answer", ValueError, r"Record 1 \(id 'b'\) of .*data.json: turn 1 \(gpt\) is an empty answer '  '"),
])
def test_llava_json_is_checked_up_front(tmp_path, case, error, match):
    from rcp_llava.data import load_llava_json

    good = {"id": "a", "image": "a.png", "conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "A cat.")]}
    bad = {  # record 1, after a good one: the message names the record that is wrong
        "image_list": {"image": ["a.png", "a.png"]}, "image_null": {"image": None},
        "corrupt_image": {"image": "bad.png"},
        "gpt_first": {"conversations": [_turn("gpt", "A cat."), _turn("human", "<image>\nWhat?")]},
        "two_questions": {"conversations": [_turn("human", "<image>\nWhat?"), _turn("human", "Where?")]},
        "no_from": {"conversations": [{"value": "<image>\nWhat?"}, _turn("gpt", "A cat.")]},
        "unanswered": {"conversations": good["conversations"] + [_turn("human", "And?")]},
        "empty_answer": {"conversations": [_turn("human", "<image>\nWhat?"), _turn("gpt", "  ")]},
    }
    records = {"bad_json": "[{", "not_a_list": {"image": "a.png"}, "empty": [],
               "one_turn": [{"image": "a.png", "conversations": [{"from": "human", "value": "Hi"}]}]}.get(case)
    if case in bad:
        records = [good, {**good, "id": "b", **bad[case]}]
    path = _llava_json(tmp_path, records, image=case != "no_image")
    (tmp_path / "images" / "bad.png").write_text("not an image")
    folder = tmp_path / ("nowhere" if case == "no_folder" else "images")
    with pytest.raises(error, match=match):
        load_llava_json(str(tmp_path / "missing.json") if case == "no_file" else str(path), str(folder))


# -- truncated / corrupt files are named, before the model loads ------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("entry", ["from_pretrained", "from_base"])
def test_a_truncated_base_weights_file_is_named(tmp_path, entry):
    """Was "Error while deserializing header: incomplete metadata" without the file."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    folder = _stock_folder(tmp_path)
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file \(.*\): it is "
                                         r"truncated or corrupt. Download or save it again"):
        getattr(RcpLlavaForConditionalGeneration, entry)(str(folder))


@pytest.mark.parametrize("broken, match", [
    ("rcp_plugins.safetensors", r"rcp_plugins.safetensors is not a readable safetensors file"),
    ("rcp_config.json", r"rcp_config.json is not valid JSON \(.*\): it is truncated or was edited by hand"),
])
def test_a_broken_plugin_file_is_named_before_the_base_loads(tmp_path, monkeypatch, broken, match):
    """A truncated plug-in file was reported (without its path) only after the whole base model had loaded."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    base = _stock_folder(tmp_path / "base")
    make_model().save_plugins(tmp_path / "plugins", base_model_name_or_path=str(base))
    _truncate(tmp_path / "plugins" / broken)
    monkeypatch.setattr(RcpLlavaForConditionalGeneration, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("loaded the base model first")))
    with pytest.raises(ValueError, match=match):
        RcpLlavaForConditionalGeneration.from_base(str(base), plugins=str(tmp_path / "plugins"))


@pytest.fixture(scope="module")
def micro_testbed(tmp_path_factory):
    from rcp_llava.testbed import build_testbed

    return build_testbed("micro", output_dir=tmp_path_factory.mktemp("bad_input") / "testbed", pruning_eval=False)


def _train_argv(folder, out, *extra, base=None):
    return ["--base_model", str(base or folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "true", "--max_eval_samples", "4", "--pruning_layers", "1", "--repair_layers", "1",
            "--pruner_hidden_size", "8", "--repair_bottleneck_size", "8", *extra]


def test_train_rcp_takes_an_rcp_folder_as_base_model(micro_testbed, tmp_path):
    """An RCP folder as --base_model asked for trust_remote_code (which the CLI cannot pass): it loads as rcp_llava
    (registered by the package) and its plug-ins keep training."""
    import train_rcp
    from transformers import AutoProcessor

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    folder = micro_testbed
    rcp = RcpLlavaForConditionalGeneration.from_pretrained(folder / "model", pruning_layers=[1], repair_layers=[1],
                                                          pruner_hidden_size=8, repair_bottleneck_size=8)
    rcp.save_pretrained(tmp_path / "rcp")
    AutoProcessor.from_pretrained(folder / "model").save_pretrained(tmp_path / "rcp")
    train_rcp.main(_train_argv(folder, tmp_path / "out", "--max_steps", "1", "--save_strategy", "no",
                               base=tmp_path / "rcp"))
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["model_type"] == "rcp_llava" and saved["pruning_layers"] == [1]


def test_train_rcp_refuses_a_plugin_folder_as_base_model(micro_testbed, tmp_path):
    """Was transformers' "Unrecognized model in ... Should have a `model_type` key" for a `save_plugins` folder."""
    import train_rcp

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    base = str(micro_testbed / "model")
    rcp = RcpLlavaForConditionalGeneration.from_pretrained(base, pruning_layers=[1], repair_layers=[1],
                                                          pruner_hidden_size=8, repair_bottleneck_size=8)
    rcp.save_plugins(tmp_path / "plugins")
    with pytest.raises(ValueError, match=(
            rf"--base_model '{tmp_path}/plugins' is an RCP plug-in folder \(rcp_config.json \+ "
            rf"rcp_plugins.safetensors, written by `save_plugins`\), not a model\. To train new plug-ins, pass its "
            rf"recorded base model '{base}' as --base_model\. .*`RcpLlavaForConditionalGeneration.from_base\('{base}', "
            rf"plugins='{tmp_path}/plugins'\).save_pretrained\(DIR\)`")):
        train_rcp.main(_train_argv(micro_testbed, tmp_path / "out", "--max_steps", "1", base=tmp_path / "plugins"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- checkpoints: a checkpoint-N folder exists only once complete -------------------------------------------------


def test_sigint_while_a_checkpoint_is_written_leaves_the_previous_ones(micro_testbed, tmp_path, monkeypatch):
    """Fault injection: a real SIGINT (Ctrl-C) while checkpoint-2's RNG state is written. Before, checkpoint-2 was
    left without trainer_state.json and `get_last_checkpoint` picked it."""
    import os
    import signal

    import train_rcp
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    real = Trainer._save_rng_state

    def interrupted(self, output_dir):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, output_dir)

    out = tmp_path / "run"
    argv = _train_argv(micro_testbed, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_rcp.main(argv)
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no checkpoint-2, no tmp- leftover
    assert {"rcp_config.json", "rcp_plugins.safetensors", "trainer_state.json", "rng_state.pth"} <= set(
        os.listdir(out / "checkpoint-1"))
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    train_rcp.main(argv + ["--resume_from_checkpoint", "last"])
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_checkpoint_rotation_counts_the_newest_checkpoint(micro_testbed, tmp_path):
    import os

    import train_rcp

    out = tmp_path / "run"
    train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                               "--save_total_limit", "2"))
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-2", "checkpoint-3"]


def test_a_resumed_run_records_every_steps_gradient_norm(micro_testbed, tmp_path):
    """Was: grad_norms.json and metrics.json's `grad_norm` covered only the resumed steps, and resuming the finished
    run wrote `[]` / None over its record (after training one batch past --max_steps, into checkpoint-4)."""
    import os
    import shutil

    import train_rcp

    out = tmp_path / "run"
    argv = _train_argv(micro_testbed, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
    train_rcp.main(argv)
    norms = json.loads((out / "grad_norms.json").read_text())
    summary = json.loads((out / "metrics.json").read_text())["grad_norm"]
    assert len(norms) == 3 and summary["steps"] == 3
    train_rcp.main(argv + ["--resume_from_checkpoint", "last"])  # the finished run
    assert json.loads((out / "grad_norms.json").read_text()) == norms
    assert json.loads((out / "metrics.json").read_text())["grad_norm"] == summary
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in ("checkpoint-2", "checkpoint-3"):  # interrupted after step 1
        shutil.rmtree(out / name)
    train_rcp.main(argv + ["--resume_from_checkpoint", "last"])
    assert json.loads((out / "grad_norms.json").read_text()) == norms  # training is bit-identical: so are the norms
    assert json.loads((out / "metrics.json").read_text())["grad_norm"] == summary


def test_overwrite_output_dir_deletes_the_previous_runs_checkpoints(micro_testbed, tmp_path):
    """Was: the old run's checkpoint-2 and -3 stayed beside the new run's checkpoint-1, and `--resume_from_checkpoint
    last` then resumed the old run."""
    import os

    import train_rcp

    out = tmp_path / "run"
    train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"))
    (out / "tmp-checkpoint-4").mkdir()  # left by an interrupted save

    def checkpoints():
        return sorted(n for n in os.listdir(out) if "checkpoint" in n)

    # A run that fails its checks deletes nothing.
    with pytest.raises(ValueError, match="--eval_split 'dev'"):
        train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1", "--overwrite_output_dir", "--do_eval",
                                   "--eval_split", "dev"))
    assert checkpoints() == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "tmp-checkpoint-4"]
    # Nor one the Trainer refuses when it builds its scheduler, after everything has loaded (was: deleted just before
    # `train()`, so these checkpoints were gone).
    with pytest.raises(ValueError, match="min_lr"):
        train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1", "--overwrite_output_dir",
                                   "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", "{}"))
    assert checkpoints() == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "tmp-checkpoint-4"]
    train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1", "--overwrite_output_dir"))
    assert checkpoints() == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1  # the new run's
    assert train_rcp.resolve_resume("last", str(out)) == str(out / "checkpoint-1")


def _stub_atomic_trainer(tmp_path, write=lambda folder: None):
    """`AtomicCheckpointMixin` over a stub of `Trainer._save_checkpoint` that writes model.safetensors ("new") into the
    folder the module global names, as the Trainer does; `write(folder)` runs there before it returns."""
    from types import SimpleNamespace

    import transformers.trainer as hf_trainer

    from rcp_llava.checkpoints import AtomicCheckpointMixin

    class Stock:
        def _save_checkpoint(self, model, trial):
            folder = tmp_path / f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(exist_ok=True)
            (folder / "model.safetensors").write_text("new")
            write(folder)

    class Trainer(AtomicCheckpointMixin, Stock):
        def _get_output_dir(self, trial):
            return str(tmp_path)

    trainer = Trainer()
    trainer.state = SimpleNamespace(global_step=5, best_model_checkpoint=None)
    trainer.args = SimpleNamespace(should_save=True, push_to_hub=False, save_total_limit=None)
    trainer.accelerator = SimpleNamespace(wait_for_everyone=lambda: None)
    return trainer


def test_a_save_at_an_interrupted_step_starts_from_an_empty_staging_folder(tmp_path):
    """A resumed run saving the step an interrupted save left `tmp-checkpoint-N` for: that folder's files are the
    old save's, and renamed along they became part of the new checkpoint-N (a stale optimizer.pt beside new
    weights). The save starts from an empty staging folder."""
    (tmp_path / "tmp-checkpoint-5").mkdir()
    (tmp_path / "tmp-checkpoint-5" / "optimizer.pt").write_text("stale")
    _stub_atomic_trainer(tmp_path)._save_checkpoint(None, None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    assert os.listdir(tmp_path / "checkpoint-5") == ["model.safetensors"]


def test_a_resave_of_a_step_replaces_its_checkpoint_and_the_prefix_is_restored(tmp_path):
    """A run resumed from an earlier checkpoint saves a step whose checkpoint-N exists: the new save replaces it whole.
    Without removing the old folder first (a mutation audit) renaming onto it failed ("Directory not empty"), and no
    test noticed. After each save, and after a failed one, `transformers.trainer.PREFIX_CHECKPOINT_DIR` is
    "checkpoint" again (the Trainer's push reads it to leave checkpoint-N folders out of the repo root)."""
    import transformers.trainer as hf_trainer

    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "optimizer.pt").write_text("the earlier run's")
    _stub_atomic_trainer(tmp_path)._save_checkpoint(None, None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_text() == "new"
    assert os.listdir(tmp_path / "checkpoint-5") == ["model.safetensors"]
    assert hf_trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"

    def fail(folder):
        raise OSError("disk full")

    (tmp_path / "failed").mkdir()
    with pytest.raises(OSError, match="disk full"):
        _stub_atomic_trainer(tmp_path / "failed", write=fail)._save_checkpoint(None, None)
    assert hf_trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert os.listdir(tmp_path / "failed") == []  # the staging folder removed, no checkpoint-5


def test_budget_runs_keep_earlier_budgets_in_the_summary_and_report_the_steps_epochs_took(micro_testbed, tmp_path):
    """Was: a second --budgets run into the same folder wrote budgets.json with its own budgets only (the first
    run's, whose folder stays, was dropped), and a run by epochs reported "max_steps": -1."""
    import train_rcp

    train_rcp.main(["--budgets", "1/2", *_train_argv(micro_testbed, tmp_path, "--max_steps", "1")])
    first = json.loads((tmp_path / "budgets.json").read_text())
    assert list(first) == ["1/2"] and first["1/2"]["max_steps"] == 1
    train_rcp.main(["--budgets", "1/4", *_train_argv(micro_testbed, tmp_path, "--max_steps", "-1",
                                                      "--num_train_epochs", "1", "--max_train_samples", "4")])
    summary = json.loads((tmp_path / "budgets.json").read_text())
    assert list(summary) == ["1/2", "1/4"] and summary["1/2"] == first["1/2"]
    assert summary["1/4"]["max_steps"] == 2  # 4 examples, batch 2, one epoch
    assert json.loads((tmp_path / "budget_1_4" / "metrics.json").read_text()) == summary["1/4"]


def test_an_interrupted_budget_sweep_resumes_with_last(micro_testbed, tmp_path, capsys):
    """`--budgets ... --resume_from_checkpoint last` after a sweep stopped during its first budget: that budget
    resumes and the one it had not reached starts fresh (was: refused for the budget without a checkpoint, with the
    advice to start without resuming, which the stopped budget's folder then refused)."""
    import shutil

    import train_rcp

    argv = ["--budgets", "1/2,1/4", *_train_argv(micro_testbed, tmp_path, "--max_steps", "2", "--save_strategy",
                                                 "steps", "--save_steps", "1")]
    from safetensors.torch import load_file

    train_rcp.main(argv)
    plugins = load_file(tmp_path / "budget_1_2" / "plugins" / "rcp_plugins.safetensors")
    # stopped after budget 1/2's first step: its later checkpoint and outputs, and budget 1/4, never written
    for name in ("checkpoint-2", "plugins", "model"):
        shutil.rmtree(tmp_path / "budget_1_2" / name)
    for name in ("metrics.json", "grad_norms.json", "budgets.json"):
        (tmp_path / ("budget_1_2/" + name if name != "budgets.json" else name)).unlink()
    shutil.rmtree(tmp_path / "budget_1_4")
    capsys.readouterr()
    results = train_rcp.main(argv + ["--resume_from_checkpoint", "last"])
    assert f"[train_rcp] --budgets: {tmp_path / 'budget_1_4'} has no checkpoint to resume; budget 1/4 starts fresh." \
        in capsys.readouterr().out
    resumed = load_file(tmp_path / "budget_1_2" / "plugins" / "rcp_plugins.safetensors")
    assert resumed.keys() == plugins.keys() and all(torch.equal(resumed[k], plugins[k]) for k in plugins)  # as if
    # uninterrupted (tensors: safetensors orders its header's metadata differently from one process to the next)
    assert sorted(results) == ["1/2", "1/4"] and (tmp_path / "budget_1_4" / "checkpoint-2").is_dir()


def test_a_checkpoint_path_resumes_its_own_budget_of_a_sweep_only(micro_testbed, tmp_path):
    """`--budgets ... --resume_from_checkpoint budget_1_4/checkpoint-1` went to every budget: the finished 1/2 was
    trained again from 1/4's checkpoint and its plug-ins, model and metrics replaced, with no warning. The path now
    resumes its own budget; the finished one loads as with `last`; a path in no budget's folder is refused."""
    import shutil

    import train_rcp
    from safetensors.torch import load_file

    argv = ["--budgets", "1/2,1/4", *_train_argv(micro_testbed, tmp_path, "--max_steps", "2", "--save_strategy",
                                                 "steps", "--save_steps", "1")]
    train_rcp.main(argv + ["--resume_from_checkpoint", "false"])  # no resume, as for one job (not a path)
    plugins = {label: load_file(tmp_path / f"budget_{label}" / "plugins" / "rcp_plugins.safetensors")
               for label in ("1_2", "1_4")}
    # stopped after budget 1/4's first step
    for name in ("checkpoint-2", "plugins", "model"):
        shutil.rmtree(tmp_path / "budget_1_4" / name)
    for name in ("budget_1_4/metrics.json", "budget_1_4/grad_norms.json", "budgets.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match=r"^--resume_from_checkpoint '.*elsewhere' is in none of the budgets' "
                                         r"folders \(.*budget_1_2, .*budget_1_4\): with --budgets give a checkpoint "
                                         r"inside one of them"):
        train_rcp.main(argv + ["--resume_from_checkpoint", str(tmp_path / "elsewhere")])
    results = train_rcp.main(argv + ["--resume_from_checkpoint", str(tmp_path / "budget_1_4" / "checkpoint-1")])
    assert sorted(results) == ["1/2", "1/4"]
    for label, before in plugins.items():  # 1/2 as it was, 1/4 as if uninterrupted
        after = load_file(tmp_path / f"budget_{label}" / "plugins" / "rcp_plugins.safetensors")
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), label


@pytest.mark.slow
def test_a_budget_sweep_with_the_best_checkpoint_runs_under_torchrun(micro_testbed, tmp_path):
    """Two ranks: `--load_best_model_at_end` failed on rank 1 at the end of training (its state named the staging
    folder `tmp-checkpoint-N`, renamed on rank 0 alone), and a --budgets sweep destroyed and re-created the process
    group between budgets (a crash or a hang at the second budget, some runs in five)."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--budgets", "1/2,1/4", *_train_argv(micro_testbed, tmp_path, "--max_steps", "2", "--save_steps", "1",
                                                 "--eval_strategy", "steps", "--eval_steps", "1",
                                                 "--load_best_model_at_end", "--ddp_backend", "gloo",
                                                 "--per_device_train_batch_size", "1")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), os.path.join(root, "train_rcp.py"), *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "budgets.json").read_text())
    assert sorted(summary) == ["1/2", "1/4"]
    for label in ("1_2", "1_4"):
        state = json.loads((tmp_path / f"budget_{label}" / "checkpoint-2" / "trainer_state.json").read_text())
        assert os.path.basename(state["best_model_checkpoint"]).startswith("checkpoint-")
        assert (tmp_path / f"budget_{label}" / "plugins" / "rcp_plugins.safetensors").is_file()


def _change_the_test_split(monkeypatch, change):
    """train_rcp loads its splits with the test split passed through `change`."""
    import train_rcp

    load_splits = train_rcp.load_splits

    def changed(*args, **kwargs):
        splits = load_splits(*args, **kwargs)
        splits["test"] = change(splits["test"])
        return splits

    monkeypatch.setattr(train_rcp, "load_splits", changed)


def test_the_final_evaluations_rows_are_checked_before_training(micro_testbed, tmp_path, monkeypatch):
    """Was: only the train (and eval) split was checked; a test row without an answer was scored against None, one
    whose image was missing failed after training, before anything was saved."""
    import train_rcp

    _change_the_test_split(monkeypatch, lambda test: test.map(
        lambda row, i: {"answer": None if i == 2 else row["answer"]}, with_indices=True))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^Example 2 of the 'test' split \(the final evaluation's\): its 'answer'.* "
                                         r"\(These rows are read after training: fix them, or skip the final "
                                         r"evaluation with --test_split none\.\)$"):
        train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1"))
    assert not out.exists()
    train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1", "--max_eval_samples", "2"))  # not scored: runs


def test_calibration_on_multi_turn_rows_is_refused_before_training(micro_testbed, tmp_path, monkeypatch):
    """A --llava_json run (one split, conversation rows) calibrated on prompts holding the Python text of its
    question lists, and saved the shifted biases."""
    import train_rcp

    def conversations_only(*args, **kwargs):
        from datasets import DatasetDict

        train = DatasetDict.load_from_disk(str(micro_testbed / "dataset"))["train"].select(range(4))
        return {"train": train.map(lambda row: {"question": [row["question"]], "answer": [row["answer"]]})}

    monkeypatch.setattr(train_rcp, "load_splits", conversations_only)
    with pytest.raises(ValueError, match=r"^--calibrate_retention calibrates on the 'train' split, whose rows are "
                                         r"multi-turn \(lists of questions: --llava_json's conversations\)"):
        train_rcp.main(_train_argv(micro_testbed, tmp_path / "run", "--max_steps", "1", "--calibrate_retention"))
    assert not (tmp_path / "run").exists()


def test_a_scored_split_with_other_column_names_is_named_before_training(micro_testbed, tmp_path, monkeypatch):
    """A test split (or --calibrate_retention's split) whose question column is named otherwise failed with a bare
    KeyError ('question', or datasets' "Column 'question' doesn't exist") before the check that names the columns
    and the way out (a probe)."""
    import train_rcp

    load_splits = train_rcp.load_splits
    for split, flags, way_out in (("test", (), r"or skip the final evaluation with --test_split none"),
                                  ("validation", ("--calibrate_retention",), r"or train without --calibrate_retention")):
        def renamed(*args, _split=split, **kwargs):
            splits = load_splits(*args, **kwargs)
            splits[_split] = splits[_split].rename_column("question", "prompt")
            return splits

        monkeypatch.setattr(train_rcp, "load_splits", renamed)
        out = tmp_path / split
        with pytest.raises(ValueError, match=rf"^The '{split}' split \(.*\) has no column\(s\) \['question'\]; it has "
                                             rf"\['answer', .*'prompt'\]\. Name the right ones with --image_column / "
                                             rf"--question_column / --answer_column\. \(These rows are read after "
                                             rf"training: fix them, {way_out}\.\)$"):
            train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1", *flags))
        assert not out.exists()


def test_a_single_turn_llava_json_is_plain_rows_and_calibrates(micro_testbed, tmp_path):
    """`load_llava_json` kept a single-turn record's question and answer as one-element lists, which
    --calibrate_retention refused as "multi-turn" (the commonest LLaVA JSON could not be calibrated); single-turn
    files are plain strings now, as `dataset_from_messages` gives them, and a file with one conversation keeps lists."""
    from datasets import load_from_disk

    import train_rcp
    from rcp_llava.data import load_llava_json

    rows = load_from_disk(str(micro_testbed / "dataset"))["train"].select(range(4))
    (tmp_path / "images").mkdir()
    records = []
    for i, row in enumerate(rows):
        row["image"].save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            _turn("human", "<image>\n" + row["question"]), _turn("gpt", row["answer"])]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    loaded = load_llava_json(str(path), str(tmp_path / "images"))
    assert loaded["question"] == rows["question"] and loaded["answer"] == rows["answer"]
    mixed = records + [{**records[0], "conversations": records[0]["conversations"] * 2}]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    loaded = load_llava_json(str(tmp_path / "mixed.json"), str(tmp_path / "images"))
    assert loaded["answer"][0] == [rows["answer"][0]] and len(loaded["answer"][4]) == 2

    out = tmp_path / "run"
    argv = _train_argv(micro_testbed, out, "--max_steps", "1", "--calibrate_retention", "--save_strategy", "no")
    at = argv.index("--dataset_name_or_path")
    argv[at:at + 2] = ["--llava_json", str(path), "--image_folder", str(tmp_path / "images")]
    train_rcp.main(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["split"] == "train"


def test_llava_json_and_a_dataset_together_are_refused(micro_testbed, tmp_path, monkeypatch):
    """Was: the JSON won and the dataset (with its test split) went unread: no evaluation, no error."""
    import train_rcp

    path = _llava_json(tmp_path)
    with pytest.raises(ValueError, match=rf"^Give --llava_json \({re.escape(repr(str(path)))}\) or "
                                         r"--dataset_name_or_path \('.*dataset'\), not both"):
        train_rcp.main(_train_argv(micro_testbed, tmp_path / "run", "--llava_json", str(path)))
    # ... before anything loads or builds: the main job built the deep testbed (~50 minutes) first
    monkeypatch.setattr("rcp_llava.testbed.build_testbed", lambda *a, **k: pytest.fail("built the testbed"))
    with pytest.raises(ValueError, match=r"^Give --llava_json .* not both"):
        train_rcp.main(["--llava_json", str(path), "--dataset_name_or_path", "/data/mine", "--output_dir",
                        str(tmp_path / "run"), "--report_to", "none"])


def test_a_resumed_sweep_keeps_a_budget_that_finished_without_a_checkpoint(micro_testbed, tmp_path, capsys):
    """A budget finished with no checkpoint (fewer steps than --save_steps, or --save_strategy no) was taken for one
    not reached and refused ("already holds a run ... pass --resume_from_checkpoint", which was given)."""
    import train_rcp

    argv = _train_argv(micro_testbed, tmp_path, "--max_steps", "1", "--save_strategy", "no")
    first = train_rcp.main(["--budgets", "1/2", *argv])
    before = (tmp_path / "budget_1_2" / "metrics.json").read_text()
    capsys.readouterr()
    results = train_rcp.main(["--budgets", "1/2,1/4", *argv, "--resume_from_checkpoint", "last"])
    out = capsys.readouterr().out
    assert (f"[train_rcp] --budgets: budget 1/2 finished before ({tmp_path / 'budget_1_2' / 'metrics.json'}, no "
            "checkpoint): kept.") in out
    assert "budget 1/4 starts fresh" in out
    assert (tmp_path / "budget_1_2" / "metrics.json").read_text() == before and results["1/2"] == first["1/2"]
    assert sorted(json.loads((tmp_path / "budgets.json").read_text())) == ["1/2", "1/4"]
    # --overwrite_output_dir trains it again, as every budget (the old result was kept, reported as this run's)
    capsys.readouterr()
    train_rcp.main(["--budgets", "1/2", *argv, "--resume_from_checkpoint", "last", "--overwrite_output_dir"])
    out = capsys.readouterr().out
    assert "finished before" not in out and "[train_rcp] training the plug-ins on 1 process(es)" in out
    # an unreadable kept record is named before any budget trains
    (tmp_path / "budget_1_2" / "metrics.json").write_text('{"truncated": ')
    with pytest.raises(ValueError, match=r"budget 1/2, finished without a checkpoint\) is not readable JSON .*: pass "
                                         r"--overwrite_output_dir to train it again\.$"):
        train_rcp.main(["--budgets", "1/8,1/2", *argv, "--resume_from_checkpoint", "last"])
    assert not (tmp_path / "budget_1_8").exists()


def test_an_empty_test_split_is_refused_before_training(micro_testbed, tmp_path, monkeypatch):
    """Was: found by the final evaluation, after training (an IndexError on its empty table). (datasets 5.2 cannot
    load an empty split it saved, so the loaded splits are emptied here.)"""
    import train_rcp

    _change_the_test_split(monkeypatch, lambda test: test.select([]))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^--test_split 'test' is empty: the final evaluation scores it"):
        train_rcp.main(_train_argv(micro_testbed, out, "--max_steps", "1"))
    assert not out.exists()


# -- save_pretrained: atomic, and never over another model silently ------------------------------------------------


def _snapshot(folder):
    import os

    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_save_pretrained_refuses_another_sharded_model(tmp_path):
    """Was: transformers deleted the other model's shards and wrote this one in their place."""
    from transformers import LlavaForConditionalGeneration

    other = make_model(text_config={**tiny_config().text_config.to_dict(), "hidden_size": 64})
    LlavaForConditionalGeneration(other.config).save_pretrained(tmp_path, max_shard_size="50KB")
    before = _snapshot(tmp_path)
    assert sum(n.endswith(".safetensors") for n in before) > 1
    with pytest.raises(FileExistsError, match=r"already holds the weights of another model \(model-00001-of-.*"
                                              r"text hidden_size: 64 -> 32\)\. Save elsewhere, or pass "
                                              r"`overwrite=True`"):
        make_model().save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before


def test_save_pretrained_with_overwrite_replaces_the_shards_and_keeps_other_files(tmp_path):
    import os

    from transformers import LlavaForConditionalGeneration

    other = make_model(text_config={**tiny_config().text_config.to_dict(), "hidden_size": 64})
    LlavaForConditionalGeneration(other.config).save_pretrained(tmp_path, max_shard_size="50KB")
    (tmp_path / "processor_config.json").write_text("{}")  # saved into the folder by the user
    model = make_model()
    model.save_pretrained(tmp_path, overwrite=True)
    names = set(os.listdir(tmp_path))
    assert not any(n.startswith("model-0") for n in names) and "model.safetensors" in names  # stale shards gone
    assert (tmp_path / "processor_config.json").read_text() == "{}"
    assert not any(".tmp-" in n for n in os.listdir(tmp_path.parent))
    model.save_pretrained(tmp_path)  # the same model again: no refusal


def test_an_interrupted_save_pretrained_leaves_the_previous_model(tmp_path, monkeypatch):
    """Fault injection: the disk fills while the weights are written."""
    import errno
    import os

    import transformers.modeling_utils as modeling_utils

    make_model(seed=1).save_pretrained(tmp_path)
    before = _snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        make_model(seed=2).save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before
    assert not any(".tmp-" in n for n in os.listdir(tmp_path.parent))


def test_a_right_padded_forward_repairs_the_last_real_token():
    """Was silent: without labels the repair adapters acted on the last column, a pad column for the shorter row."""
    model = make_model(seed=4, randomize_plugins=True)
    batch = make_batch([(1, 3, True), (4, 5, True)])
    width = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask"):  # re-pad the shorter row on the right
        row = batch[key][0][batch["attention_mask"][0].bool()]
        batch[key][0] = torch.cat([row, torch.zeros(width - len(row), dtype=row.dtype)])
    last_real = torch.zeros(2, width, dtype=torch.bool)
    last_real[0, int(batch["attention_mask"][0].sum()) - 1] = True
    last_real[1, -1] = True
    with torch.no_grad():
        default = model(**batch)
        explicit = model(**batch, answer_mask=last_real)
        pad_column = torch.zeros_like(last_real)
        pad_column[:, -1] = True  # the old default
        on_the_pad = model(**batch, answer_mask=pad_column)
    torch.testing.assert_close(default.logits, explicit.logits, rtol=0, atol=0)
    assert not torch.equal(default.logits, on_the_pad.logits)  # the choice matters for this model


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "x", "", "+3"])
def test_positive_int_stops_a_bad_count_at_parsing(value, capsys):
    import argparse

    from rcp_llava.results import positive_int

    parser = argparse.ArgumentParser(prog="script.py")
    parser.add_argument("--repeats", type=positive_int)
    assert parser.parse_args(["--repeats", " 7"]).repeats == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", value])
    assert f"argument --repeats: must be a whole number >= 1, got {value!r}" in capsys.readouterr().err


def test_publish_gives_each_writer_a_temporary_with_the_files_suffix(tmp_path):
    """A figure's format follows its file's suffix (`save_figure`): the temporary `publish` hands `write` ends in the
    final file's suffix, so a figure written through it is a PNG, where a `.tmp-PID` suffix was no format at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rcp_llava.results import publish, save_figure

    seen, fig = [], plt.figure()
    written = publish([(str(tmp_path / "drift.png"), lambda tmp, final: seen.append(tmp) or save_figure(fig, tmp))])
    plt.close(fig)
    assert written == [str(tmp_path / "drift.png")] and os.path.splitext(seen[0])[1] == ".png"
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["drift.png"]


def test_counts_and_names_given_in_code_are_checked_as_on_the_command_line():
    """`positive_int` and `result_name` are argparse types, also called directly: a float count is no whole number
    (int(2.5) made it 2), and '..' or a path is no file name (they wrote outside --output_dir)."""
    import argparse

    from rcp_llava.results import positive_int, result_name

    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be a whole number >= 1, got 2\.5$"):
        positive_int(2.5)
    assert positive_int(3) == 3 and result_name("run-1") == "run-1"
    for bad in ("..", ".", "a/b", " "):
        with pytest.raises(argparse.ArgumentTypeError, match="^must be a file name stem"):
            result_name(bad)
