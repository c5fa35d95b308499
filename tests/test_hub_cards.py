"""Model cards and the push check on input the card code used to take wrongly (a read-only probe): evaluation entries
without a usable value, method or token count, the dataset -> metric -> value format, the kept-token keys, Hub
dataset ids, tags, cards of every pruning method, train_rcp.py's dataset name, and incomplete full-model folders."""

import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest

import train_rcp
from modeling_rcp_llava import RCP_LLAVA_VERSION, RCP_PLUGINS_NAME
from rcp_llava import demo, hub


def card(eval_results=None, config=None, **kwargs):
    return hub.build_model_card(config or demo.demo_config(), "u/x", license="mit", eval_results=eval_results,
                                **kwargs)


def rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("| field") and not line.startswith("| `")]


# ------------------------------------------------------------------------------------------------
# Evaluation entries
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(None, "None"), ("75.6", "'75.6'"), (True, "True"), (math.nan, "nan"),
                                          (math.inf, "inf")])
def test_an_entry_value_must_be_a_finite_number(value, shown):
    """A null value with a Hub dataset_type crashed in huggingface_hub ("Invalid model_index ... KeyError 'value'");
    a string, a bool or NaN went into the card as a result."""
    entry = {"dataset": "VQAv2", "metric": "accuracy", "value": value, "dataset_type": "HuggingFaceM4/VQAv2"}
    with pytest.raises(ValueError) as err:
        card([entry])
    assert str(err.value) == (
        f"Evaluation entry {hub._short(entry)} has `value` {shown}: it must be a finite number (e.g. 75.6; not a "
        "string, a bool, NaN, inf or null). Give the measured value, or drop the entry.")


def test_a_null_method_is_this_checkpoints_own_row():
    """`"method": None` crashed the results table (NoneType + str); it reads as a missing method: RCP's row."""
    text = card([{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6, "method": None}]).text
    assert rows(text) == ["| rcp |  |  | VQAv2 |  | accuracy | 75.6 |"]


def test_an_evaluate_methods_row_without_label_or_method_is_refused():
    evaluation = {"results": [{"data": "testbed", "kind": "testbed", "rows": [
        {"label": "rcp", "method": "rcp", "budget": "1/9", "avg_tokens_all_layers": 4.0, "score": 0.6},
        {"budget": "1/9", "avg_tokens_all_layers": 4.0, "score": 0.5}]}]}
    with pytest.raises(ValueError) as err:
        card(evaluation)
    assert str(err.value) == (
        "`eval_results`: row 1 of results block 0 (data 'testbed') has neither 'label' nor 'method' "
        '({"budget": "1/9", "avg_tokens_all_layers": 4.0, "score": 0.5}): name the method each row measured, as '
        "benchmarks/evaluate_methods.py writes it.")


@pytest.mark.parametrize("key, tokens, shown", [("tokens_per_layer", "n/a", "'n/a'"), ("tokens_per_layer", -1, "-1"),
                                                ("kept_tokens", math.nan, "nan")])
def test_tokens_per_layer_must_be_a_count(key, tokens, shown):
    """A non-numeric `tokens_per_layer` crashed the table with float()'s "could not convert string to float"."""
    entry = {"dataset": "VQAv2", "metric": "accuracy", "value": 75.6, key: tokens}
    with pytest.raises(ValueError) as err:
        hub.load_eval_results([entry])
    assert str(err.value) == (
        f"Evaluation entry {hub._short(entry)} has `{key}` {shown}: it must be the visual tokens per decoder layer, "
        "a finite number >= 0 (e.g. 64.0), or null if not measured.")


def test_a_baseline_must_name_its_method():
    """A baseline row without a method was labelled "rcp (baseline)": RCP as a baseline beside itself."""
    entry = {"dataset": "VQAv2", "metric": "accuracy", "value": 70.1, "baseline": True}
    with pytest.raises(ValueError) as err:
        card([{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6}, entry])
    assert str(err.value) == (
        f"Evaluation entry {hub._short(entry)} is a baseline without a `method`: name what it measured (e.g. "
        '"method": "fastv"), or drop `baseline` if it is this checkpoint\'s own result.')


# ------------------------------------------------------------------------------------------------
# The dataset -> metric -> value format and the kept-token keys
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ({"VQAv2": {"accuracy": None}},
     "`eval_results['VQAv2']['accuracy']` is None, not a finite number: give the measured value (e.g. 75.6), or drop "
     "the metric 'accuracy'."),
    ({"VQAv2": {"accuracy": 75.6}, "meta": {"seed": 0, "note": "first run"}},
     "`eval_results['meta']['note']` is 'first run', not a finite number: give the measured value (e.g. 75.6), or "
     "drop the metric 'note'."),
    ({"VQAv2": {"accuracy": 75.6}, "command": "python eval.py"},
     "`eval_results['command']` is 'python eval.py', not a dict of metric -> value: in the dataset -> metric -> "
     "value format every top-level key but ['average_kept_tokens', 'kept_visual_tokens', 'avg_kept_tokens'] is a "
     "dataset, e.g. {\"VQAv2\": {\"accuracy\": 75.6}}; move 'command' out of the file."),
])
def test_the_dataset_metric_value_format_is_strict(content, message):
    """A null metric gave "not a format build_model_card knows"; other keys were dropped, or became result rows."""
    with pytest.raises(ValueError) as err:
        hub.load_eval_results(content)
    assert str(err.value) == message


@pytest.mark.parametrize("content, kept", [
    ({"average_kept_tokens": 5.0, "avg_kept_tokens": 9.0}, 5.0),
    ({"avg_kept_tokens": 9.0, "kept_visual_tokens": 7.0}, 7.0),
    ({"average_kept_tokens": None, "kept_visual_tokens": 6.0, "avg_kept_tokens": 9.0}, 6.0),
])
def test_the_documented_kept_token_key_wins(content, kept):
    """The last alias present used to win over `average_kept_tokens`."""
    results = [{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6}]
    assert hub.load_eval_results({"results": results, **content}) == (results, kept)
    meta = card({"results": results, **content}).data.to_dict()["rcp_llava"]
    assert meta["average_kept_visual_tokens"] == kept


@pytest.mark.parametrize("value, shown", [("64", "'64'"), (True, "True"), (math.nan, "nan"), (-1.0, "-1.0")])
def test_a_kept_token_value_must_be_a_number(value, shown):
    with pytest.raises(ValueError) as err:
        hub.load_eval_results({"results": [], "average_kept_tokens": value})
    assert str(err.value) == (
        f"`eval_results['average_kept_tokens']` is {shown}: it must be the average number of visual tokens kept per "
        "decoder layer, a finite number >= 0 (e.g. 64.0), or null if not measured.")


@pytest.mark.parametrize("argument, from_json, source", [
    (17, None, "`average_kept_tokens` is 17"),
    (True, None, "`average_kept_tokens` is True"),
    ("8", None, "`average_kept_tokens` is '8'"),
    (None, 64.0, "The evaluation results' average kept tokens is 64.0"),
])
def test_a_kept_count_must_fit_the_model(argument, from_json, source):
    """The demo model has 16 visual tokens: a card stating 64 kept (another model's result) or a string is refused;
    0 and 16 are the bounds."""
    results = {"results": [{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6}], "average_kept_tokens": from_json}
    with pytest.raises(ValueError) as err:
        card(results, average_kept_tokens=argument)
    assert str(err.value) == (
        f"{source}, but this model has 16 visual tokens per image: the average kept per decoder layer must be a "
        "number in [0, 16]. Give the count measured on this checkpoint, or none (the card then uses the config's "
        "keep counts).")
    for bound in (0, 16):  # the same source at either bound is stated
        built = (card(results, average_kept_tokens=bound) if argument is not None
                 else card({**results, "average_kept_tokens": bound}))
        assert built.data.to_dict()["rcp_llava"]["average_kept_visual_tokens"] == bound


# ------------------------------------------------------------------------------------------------
# model-index, tags, method descriptions
# ------------------------------------------------------------------------------------------------


def test_only_hub_dataset_ids_go_to_model_index():
    """Anything with a "/" counted as a Hub dataset id: a local path went to model-index."""
    entries = [{"dataset": name, "metric": "accuracy", "value": 70.0 + i, "dataset_type": dataset_type}
               for i, (name, dataset_type) in enumerate([
                   ("VQAv2", "HuggingFaceM4/VQAv2"), ("local", "/local/path/data"), ("nested", "a/b/c"),
                   ("relative", "./data/vqa"), ("parent", "owner/.."), ("POPE", "lmms-lab/POPE")])]
    built = card(entries)
    index = {(r.dataset_name, r.dataset_type) for r in built.data.eval_results}
    assert index == {("VQAv2", "HuggingFaceM4/VQAv2"), ("POPE", "lmms-lab/POPE")}
    assert len(rows(built.text)) == 6  # every row stays in the card's table


def test_a_string_is_one_tag_and_other_items_are_refused():
    """`tags="my-tag"` was split into the tags "m", "y", "-", ..."""
    tags = card(tags="my-tag").data.tags
    assert tags == sorted({*hub.DEFAULT_TAGS, "my-tag"})
    assert card(tags=["a-tag", "b-tag"]).data.tags == sorted({*hub.DEFAULT_TAGS, "a-tag", "b-tag"})
    with pytest.raises(TypeError) as err:
        card(tags=["a-tag", 3])
    assert str(err.value) == "`tags` must be a string or a list of strings, but holds 3 (int); pass e.g. " \
                             "`tags=['my-tag']`."
    with pytest.raises(TypeError, match=r"^`tags` must be a string or a list of strings, but holds 7 \(int\)"):
        card(tags=7)


MADE_WITH = f", made with [rcp-llava]({hub.GITHUB_URL}) {RCP_LLAVA_VERSION}. "


@pytest.mark.parametrize("overrides, description", [
    (dict(pruning_method="none", pruning_keep_counts=None),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with visual-token pruning off (`pruning_method='none'`)"
     + MADE_WITH + "It runs the stock LLaVA forward: every visual token\nreaches every decoder layer, and no pruner "
     "or repair adapter is used.\n"),
    (dict(pruning_method="fastv", pruning_layers=[1], repair_layers=[], pruning_keep_counts=[4]),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with training-free visual-token pruning "
     "(`pruning_method='fastv'`)" + MADE_WITH + "FastV (the tokens the prompt attends to most, measured at the layer "
     "before) chooses the visual tokens\nto keep *inside* the decoder, before layer(s) [1] (0-based; later layers "
     "compute on, and cache, only the kept tokens). It is training-free: no learned pruners and no repair "
     "adapters.\n"),
    (dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
          pre_llm_keep_count=4),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with training-free visual-token pruning "
     "(`pruning_method='vispruner'`)" + MADE_WITH + "VisPruner (the vision encoder's [CLS]-attention important tokens "
     "plus similarity-deduplicated diverse ones) chooses the visual tokens\nto keep before the language model (the "
     "decoder sees only the 4 kept of the 16 visual tokens from layer 0). It is training-free: no learned pruners "
     "and no repair adapters.\n"),
    (dict(pruning_method="random", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
          pre_llm_keep_count=4),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with training-free visual-token pruning "
     "(`pruning_method='random'`)" + MADE_WITH + "A seeded uniform random subset (`pruning_seed`) chooses the visual "
     "tokens\nto keep before the language model (the decoder sees only the 4 kept of the 16 visual tokens from "
     "layer 0). It is training-free: no learned pruners and no repair adapters.\n"),
    (dict(pruning_method="random", repair_layers=[]),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with training-free visual-token pruning "
     "(`pruning_method='random'`)" + MADE_WITH + "A seeded uniform random subset (`pruning_seed`) chooses the visual "
     "tokens\nto keep *inside* the decoder, before layer(s) [1, 2] (0-based; later layers compute on, and cache, "
     "only the kept tokens). It is training-free: no learned pruners and no repair adapters.\n"),
    (dict(pruning_method="attention_topk", repair_layers=[]),
     "A LLaVA model built on `llava-hf/llava-1.5-7b-hf` with training-free visual-token pruning "
     "(`pruning_method='attention_topk'`)" + MADE_WITH + "The LLM's own question-to-visual attention (the top tokens "
     "at each pruning layer: RCP's prior alone, Eq. 4) chooses the visual tokens\nto keep *inside* the decoder, "
     "before layer(s) [1, 2] (0-based; later layers compute on, and cache, only the kept tokens). It is "
     "training-free: no learned pruners and no repair adapters.\n"),
])
def test_the_card_describes_the_configs_pruning_method(overrides, description):
    """Every card described RCP's learned pruners and repair adapters, whatever the method."""
    text = card(config=demo.demo_config(**overrides), base_model="llava-hf/llava-1.5-7b-hf").text
    assert f"\n{description}\n" in text
    assert "Representation Consistency Pruner" not in text and "repair adapters correct" not in text
    with pytest.raises(ValueError) as err:
        card(config=demo.demo_config(**overrides), base_model="llava-hf/llava-1.5-7b-hf", plugins_only=True)
    assert str(err.value) == (
        f"`plugins_only=True`, but `pruning_method={overrides['pruning_method']!r}` has no plug-ins (its model saves "
        "no plug-in tensors): build the card of the full folder (`plugins_only=False`), or use "
        "`pruning_method='rcp'`.")


# ------------------------------------------------------------------------------------------------
# train_rcp.py's metrics.json names the data it evaluated on
# ------------------------------------------------------------------------------------------------


def _job_args(tmp_path):
    """The training arguments `train_rcp._evaluate_and_save` reads (a TrainingArguments stand-in)."""
    return SimpleNamespace(sparsity_layers="all", max_steps=1, seed=0, max_grad_norm=1.0, output_dir=str(tmp_path),
                           disable_tqdm=True, learning_rate=0.001, per_device_train_batch_size=4, lambda_task=1.0,
                           lambda_repair=2.0, lambda_sparse=3.0)


@pytest.mark.parametrize("data, dataset", [
    (dict(), "rcp-llava testbed (deep)"),
    (dict(dataset_name_or_path="/data/my_vqa"), "/data/my_vqa"),
    (dict(dataset_name_or_path="lmms-lab/POPE"), "lmms-lab/POPE"),
    (dict(llava_json="data/llava_instruct.json"), "data/llava_instruct.json"),
])
def test_the_job_records_its_dataset_and_the_card_names_it(tmp_path, monkeypatch, data, dataset):
    """A run on the user's own data wrote no dataset name, and its card said "rcp-llava testbed". Only the metrics
    writing of `_evaluate_and_save` runs here: evaluation, saving and the report are stubbed."""
    evaluated = {"full": {"accuracy": 0.9, "n": 4}, "rcp": {"accuracy": 0.8, "avg_visual_tokens_per_layer": 4.0}}
    monkeypatch.setattr(train_rcp, "evaluate_methods", lambda *args, **kwargs: dict(evaluated))
    monkeypatch.setattr(train_rcp, "save_job_folders", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_rcp, "format_report", lambda metrics: "")
    job = SimpleNamespace(test_split="test", max_eval_samples=4, overwrite_output_dir=False, push_plugins_only=False,
                          model_card_license=None, testbed_preset="deep", dataset_name_or_path=None, llava_json=None,
                          base_model=None if not data else "llava-hf/llava-1.5-7b-hf")
    for key, value in data.items():
        setattr(job, key, value)
    args = _job_args(tmp_path)
    model = SimpleNamespace(config=SimpleNamespace(pruning_layers=[1, 2], repair_layers=[3], pruning_keep_counts=None))
    train_rcp._evaluate_and_save(model, None, {"test": []}, None, job, args, "base", 4.0, 16, 0.0, push=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == dataset
    # the settings its card states, recorded for a later push of the folder (a kept --budgets set)
    assert metrics["training_args"] == {"learning_rate": 0.001, "max_steps": 1, "per_device_train_batch_size": 4,
                                        "seed": 0, "lambda_task": 1.0, "lambda_repair": 2.0, "lambda_sparse": 3.0}
    # the split the job scored (the column was empty), and a Hub dataset id in model-index (no job's card had one)
    built = card(tmp_path / "metrics.json")
    assert rows(built.text) == [
        f"| rcp (adaptive) | 4 of 16 tokens | 4 | {dataset} | test | accuracy | 0.8 |",
        f"| full model (all visual tokens) (baseline) |  | 16 | {dataset} | test | accuracy | 0.9 |"]
    hub_rows = [(r.dataset_type, r.dataset_split, r.metric_value) for r in built.data.eval_results or []]
    assert hub_rows == ([("lmms-lab/POPE", "test", 0.8)] if dataset == "lmms-lab/POPE" else [])


def test_a_job_trained_at_fixed_counts_is_not_called_adaptive(tmp_path, monkeypatch):
    """A `--pruning_keep_counts` run evaluates the trained model at those counts, but its report and card called that
    row "adaptive threshold" and listed it twice (its fixed-count row is the same model at the same counts)."""
    fixed = {"accuracy": 0.8, "n": 4, "avg_visual_tokens_per_layer": 4.0, "kept_per_pruning_layer": [6.0, 3.0],
             "retention_from_first_pruner": 0.3, "retention_all_layers": 0.25, "families": {"color": 0.8}}
    evaluated = {"full": {"accuracy": 0.9, "n": 4, "families": {"color": 0.9}, "kept_per_pruning_layer": []},
                 "rcp": dict(fixed), "rcp_fixed_counts": dict(fixed),
                 "prior_fixed_counts": {**fixed, "accuracy": 0.7}, "fixed_counts": [6, 3]}
    monkeypatch.setattr(train_rcp, "evaluate_methods", lambda *args, **kwargs: dict(evaluated))
    monkeypatch.setattr(train_rcp, "save_job_folders", lambda *args, **kwargs: None)
    job = SimpleNamespace(test_split="test", max_eval_samples=4, overwrite_output_dir=False, push_plugins_only=False,
                          model_card_license=None, testbed_preset="deep", dataset_name_or_path=None, llava_json=None,
                          base_model=None)
    args = _job_args(tmp_path)
    for counts, label, report in (([6, 3], "rcp (fixed counts 6:3)", "RCP, trained at counts 6:3"),
                                  (None, "rcp (adaptive)", "RCP, trained (adaptive threshold)")):
        model = SimpleNamespace(config=SimpleNamespace(pruning_layers=[1, 2], repair_layers=[3],
                                                       pruning_keep_counts=counts))
        train_rcp._evaluate_and_save(model, None, {"test": []}, None, job, args, "base", 4.0, 16, 0.0, push=False)
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert metrics["pruning_keep_counts"] == counts
        methods = [r.split(" | ")[0] for r in rows(card(tmp_path / "metrics.json").text)]
        assert methods == ["| " + label, "| full model (all visual tokens) (baseline)"] + (
            ["| rcp (fixed counts)"] if counts is None else []) + [
            "| attention_topk (RCP's prior alone, same counts) (baseline)"]
        names = [line.split("|")[1].strip() for line in train_rcp.format_report(metrics).splitlines()
                 if line.startswith("| ") and "accuracy" not in line]
        assert names == ["full tokens", report] + (["RCP, trained, fixed counts"] if counts is None else []) + [
            "prior (attention top-k), fixed counts"]


def test_a_job_without_its_test_split_says_nothing_was_evaluated(tmp_path, monkeypatch, capsys):
    """A --llava_json run (a train split only) printed a report without results and without saying why, and its
    metrics.json named the data as if evaluated on it."""
    monkeypatch.setattr(train_rcp, "save_job_folders", lambda *args, **kwargs: None)
    job = SimpleNamespace(test_split="test", max_eval_samples=4, overwrite_output_dir=False, push_plugins_only=False,
                          model_card_license=None, testbed_preset="deep", dataset_name_or_path=None,
                          llava_json="data.json", base_model="base")
    args = _job_args(tmp_path)
    model = SimpleNamespace(config=SimpleNamespace(pruning_layers=[1, 2], repair_layers=[3], pruning_keep_counts=None))
    train_rcp._evaluate_and_save(model, None, {"train": []}, None, job, args, "base", 4.0, 16, 0.0, push=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["test_split"], metrics["evaluated_split"]) == ("data.json", "test", None)
    assert ("nothing evaluated: the data has no 'test' split (--test_split); evaluate the saved model with "
            "benchmarks/evaluate_methods.py") in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The full-model folder check of push_rcp_folder
# ------------------------------------------------------------------------------------------------


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append("create_repo")

    def upload_folder(self, **kwargs):
        self.calls.append("upload_folder")
        return "commit"


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory):
    return demo.save_demo_folder(tmp_path_factory.mktemp("cards") / "full")[0]


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_a_plugin_only_folder_is_no_full_model(full_folder, tmp_path, online):
    """rcp_plugins.safetensors matched the full-model check's "*.safetensors"."""
    folder = shutil.copytree(full_folder, tmp_path / "rcp")
    (folder / "model.safetensors").rename(folder / RCP_PLUGINS_NAME)
    api = FakeApi()
    with pytest.raises(FileNotFoundError) as err:
        hub.push_rcp_folder(folder, "me/rcp", api=api)
    assert str(err.value) == (
        f"{folder} lacks ['model.safetensors']: write it with `model.save_pretrained(folder)` before pushing, or, as "
        f"it holds {RCP_PLUGINS_NAME} (the plug-ins alone), push it as a plug-in folder with "
        f"`push_rcp_folder({str(folder)!r}, repo_id, plugins_only=True)`.")
    assert api.calls == []


def test_a_config_without_auto_map_is_refused(full_folder, tmp_path, online):
    """trust_remote_code loading (the card's snippet) needs `auto_map`; a config.json without it was pushed."""
    folder = shutil.copytree(full_folder, tmp_path / "rcp")
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    api = FakeApi()
    with pytest.raises(ValueError) as err:
        hub.push_rcp_folder(folder, "me/rcp", api=api)
    assert str(err.value) == (
        f"{folder / 'config.json'} has no `auto_map`, so `from_pretrained(model_id, trust_remote_code=True)` (the "
        "card's usage snippet) cannot load the remote code: write the folder with "
        "`RcpLlavaForConditionalGeneration.save_pretrained(folder)`, which adds it, before pushing.")
    assert api.calls == []


@pytest.mark.parametrize("removed", [("processor_config.json",), ("tokenizer.json", "tokenizer_config.json")])
def test_a_folder_without_processor_files_is_refused(full_folder, tmp_path, online, removed):
    """The card's snippet loads `AutoProcessor.from_pretrained(model_id, ...)` from the pushed repo itself."""
    folder = shutil.copytree(full_folder, tmp_path / "rcp")
    api = FakeApi()
    assert hub.push_rcp_folder(folder, "me/rcp", api=api) == "commit"  # complete: pushed
    for name in removed:
        (folder / name).unlink()
    api = FakeApi()
    with pytest.raises(FileNotFoundError) as err:
        hub.push_rcp_folder(folder, "me/rcp", api=api)
    assert str(err.value) == (
        f"{folder} has no processor files (one of ['processor_config.json', 'preprocessor_config.json'] and one of "
        "['tokenizer_config.json', 'tokenizer.json', 'tokenizer.model']), but the model card's usage snippet loads "
        "the processor from the repo: write them with `processor.save_pretrained(folder)` before pushing.")
    assert api.calls == []


@pytest.mark.parametrize("value, shown", [(1510.75, "1510.75"), (1510.6, "1510.6"), (12345.6, "12345.6"),
                                          (47.0, "47"), (0.91049, "0.9105"), (0.5, "0.5")])
def test_the_table_shows_a_score_above_one_to_two_decimals(value, shown):
    """Four significant digits made MME's 1510.75 and 1510.60 both "1511", and 12345.6 "1.235e+04"."""
    text = card([{"dataset": "mme", "metric": "perception_score", "value": value}]).text
    assert rows(text) == [f"| rcp |  |  | mme |  | perception_score | {shown} |"]


def test_a_null_split_or_budget_is_an_empty_cell():
    """`"split": null` printed "None" in the table."""
    text = card([{"dataset": "VQAv2", "metric": "accuracy", "value": 0.5, "split": None, "budget": None}]).text
    assert rows(text) == ["| rcp |  |  | VQAv2 |  | accuracy | 0.5 |"]


def test_a_train_rcp_budget_says_what_it_averages():
    """A tiny job's budget is a mean from the first pruner; the card put "16 of 144 tokens" beside 47.9 visual tokens
    per layer over all layers, which read as a checkpoint keeping three times its budget."""
    metrics = {"visual_token_budget": 2.0, "num_visual_tokens": 16, "sparsity_layers": "from_first_pruner",
               "rcp": {"accuracy": 0.75, "avg_visual_tokens_per_layer": 5.9}}  # the demo model's 16 tokens
    assert rows(card(metrics).text)[0] == ("| rcp (adaptive) | 2 of 16 tokens (mean from the first pruner) | 5.9 | "
                                           f"{hub.TESTBED_DATASET} |  | accuracy | 0.75 |")
    metrics["sparsity_layers"] = "all"
    assert rows(card(metrics).text)[0].startswith("| rcp (adaptive) | 2 of 16 tokens | 5.9 |")


def test_a_job_that_evaluated_nothing_gives_a_card_without_results():
    """A `--llava_json` job has no test split, so its metrics.json has no "rcp" entry; the strict dataset -> metric
    -> value reading then refused `base_model` and the push after training crashed (a review of the change; before
    it, the card listed `grad_norm` statistics as evaluation results)."""
    metrics = {"base_model": "llava-hf/llava-1.5-7b-hf", "visual_token_budget": 7.0, "num_visual_tokens": 16,
               "pruning_layers": [1, 2], "repair_layers": [3], "max_steps": 3, "seed": 42, "dataset": "train.json",
               "grad_norm": train_rcp.grad_norm_summary([1.0, 2.0, 3.0])}
    assert hub.load_eval_results(metrics) == ([], None)
    text = card(metrics).text
    assert rows(text) == [] and "grad_norm" not in text


def test_the_usage_snippet_runs_on_every_method(tmp_path, monkeypatch):
    """The snippet ended on `model.last_pruning_info.kept_counts`, None after a `pruning_method="none"` generate
    (an AttributeError: the card's own code crashed, as the examples did)."""
    for method, overrides in {
        "none": dict(pruning_method="none", pruning_layers=None, repair_layers=None, pruning_keep_counts=None),
        "vispruner": dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
                          pre_llm_keep_count=6),
    }.items():
        folder = demo.save_demo_folder(tmp_path / method, **overrides)[0]
        demo.demo_image().save(tmp_path / "image.jpg")  # the snippet opens "image.jpg"
        monkeypatch.chdir(tmp_path)
        namespace = {}
        exec(hub.usage_snippet(str(folder)), namespace)
        info = namespace["model"].last_pruning_info
        assert (info is None) == (method == "none")


@pytest.mark.parametrize("overrides, fields, prunes", [
    (dict(), ["pruning_method", "pruning_layers", "repair_layers", "num_pruning_queries", "query_dropout",
              "pruner_dropout", "gumbel_temperature", "visual_token_budget", "pruning_keep_counts",
              "pruner_hidden_size", "pruner_num_heads", "repair_bottleneck_size"], True),
    (dict(pruning_method="none"), ["pruning_method"], False),
    (dict(pruning_method="fastv", repair_layers=[], pruning_layers=[1], pruning_keep_counts=[4]),
     ["pruning_method", "pruning_layers", "visual_token_budget", "pruning_keep_counts", "fastv_query"], True),
    (dict(pruning_method="vispruner", pruning_layers=[], repair_layers=[], pruning_keep_counts=None,
          pre_llm_keep_count=4),
     ["pruning_method", "visual_token_budget", "pre_llm_keep_count", "vispruner_important_ratio"], True),
    (dict(pruning_method="random", repair_layers=[]),
     ["pruning_method", "pruning_layers", "visual_token_budget", "pruning_keep_counts", "pruning_seed"], True),
    (dict(pruning_method="attention_topk", repair_layers=[]),
     ["pruning_method", "pruning_layers", "visual_token_budget", "pruning_keep_counts"], True),
])
def test_the_cards_table_lists_the_fields_its_method_reads(overrides, fields, prunes):
    """Every card's table listed all 16 pruning fields: a FastV card showed RCP's query dropout and adapter width,
    and a `none` card its pruning layers, which no forward of that model reads; a `none` card was also tagged
    visual-token-pruning. The metadata still holds every field (a config can be rebuilt from it)."""
    from configuration_rcp_llava import PRUNING_FIELDS

    made = card(config=demo.demo_config(**overrides), base_model="llava-hf/llava-1.5-7b-hf")
    table = made.text.split("| field | value |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert [row.split("`")[1] for row in table] == fields + ["visual tokens per image", "decoder layers"]
    assert ("visual-token-pruning" in made.data.tags) == ("token-pruning" in made.data.tags) == prunes
    assert set(PRUNING_FIELDS) <= set(made.data.rcp_llava)


def test_card_reading_edges(tmp_path, monkeypatch):
    """Edges of the card's reading of evaluation results, each pinned where a mutation of it passed every other
    test: a budget label with its count still names the plug-in set it belongs to, two adaptive rows give no single
    average (which one would it be?), a local base model folder is not written as a Hub id, 0 tokens per layer is a
    value, and a negative number keeps its decimals."""
    from conftest import tiny_config

    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir(), other.mkdir()
    result = {"results": [{"data": "x/y", "plugins_per_budget": {"1/9": str(other)}, "rows": [
        {"method": "rcp", "label": "rcp", "budget": "1/9 (k=64)", "score": 0.7}]}]}
    (entry,), _ = hub.load_eval_results(result, checkpoint=str(mine))
    assert (entry["method"], entry["baseline"]) == ("rcp (plug-ins trained for 1/9)", True)  # another set's score
    adaptive = {"results": [{"data": name, "rows": [{"method": "rcp", "label": "rcp (adaptive)", "budget": "adaptive",
                                                     "score": 0.7, "avg_tokens_all_layers": tokens}]}
                            for name, tokens in (("a/b", 5.0), ("c/d", 9.0))]}
    card = hub.build_model_card(tiny_config(pruning_keep_counts=None), "me/rcp", base_model="llava-hf/llava-1.5-7b-hf",
                                eval_results=adaptive, license="llama2")
    assert card.data.to_dict()["rcp_llava"]["average_kept_visual_tokens"] is None
    # the same count on every dataset (evaluate_methods.py over several --data): that count, not "not measured"
    for entry in adaptive["results"]:
        entry["rows"][0]["avg_tokens_all_layers"] = 6.0
    card = hub.build_model_card(tiny_config(pruning_keep_counts=None), "me/rcp", base_model="llava-hf/llava-1.5-7b-hf",
                                eval_results=adaptive, license="llama2")
    assert card.data.to_dict()["rcp_llava"]["average_kept_visual_tokens"] == 6.0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llava").mkdir(parents=True)
    card = hub.build_model_card(tiny_config(), "me/rcp", base_model="models/llava", license="mit")
    assert card.data.to_dict().get("base_model") is None  # a folder here, though it looks like an "owner/name" id
    assert hub.load_eval_results([{"dataset": "d", "metric": "acc", "value": 0.5,
                                   "tokens_per_layer": 0}])[0][0]["tokens_per_layer"] == 0
    assert hub._fmt(-1510.75) == "-1510.75"



# ------------------------------------------------------------------------------------------------
# One plug-in set per budget in one repo (train_rcp.py --budgets --push_to_hub --push_plugins_only)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subfolder, error", [
    ("/budget_1_9", ValueError), ("a/../b", ValueError), ("", ValueError), ("a//b", ValueError), ("./a", ValueError),
    ("a\\b", ValueError), (3, TypeError), (None, TypeError)])
def test_a_subfolder_must_be_a_folder_inside_the_repo(subfolder, error):
    """An absolute path, '..' or an empty part names no folder of the repo (or one outside it)."""
    with pytest.raises(error, match=r"^`path_in_repo(=|` must be a string)"):
        hub.check_subfolder(subfolder, "path_in_repo")
    assert hub.check_subfolder("sets/budget_1_9") == "sets/budget_1_9"


def test_only_a_plugin_set_lives_in_a_subfolder(full_folder, online):
    """A full model's card and push load it from the repo's root: a subfolder there would be loaded from nowhere."""
    with pytest.raises(ValueError, match=r"^`subfolder='budget_1_9'` is where a plug-in set lives in its repo; a full "
                                         r"model's card has none: pass `plugins_only=True`, or no `subfolder`.$"):
        card(subfolder="budget_1_9")
    api, written = FakeApi(), []
    with pytest.raises(ValueError, match=r"^`path_in_repo='budget_1_9'` uploads into a folder of the repo, which only "
                                         r"plug-in sets do"):
        hub.push_rcp_folder(full_folder, "me/rcp", api=api, path_in_repo="budget_1_9", card=written.append)
    assert api.calls == [] and written == []  # refused before the card or anything else


def test_a_plugin_set_is_pushed_into_its_folder(tmp_path, online, monkeypatch):
    """`path_in_repo` reaches the upload (the set lands in its folder, not over the root's), and the offline message
    gives the call that pushes it there later."""
    from huggingface_hub import constants

    folder = tmp_path / "budget_1_9"
    demo.build_demo_model().save_plugins(folder)
    seen = {}

    class Api(FakeApi):
        def upload_folder(self, **kwargs):
            seen.update(kwargs)
            return "commit"

    assert hub.push_rcp_folder(folder, "me/rcp", plugins_only=True, api=Api(), path_in_repo="budget_1_9") == "commit"
    assert seen["path_in_repo"] == "budget_1_9" and seen["folder_path"] == str(folder)
    assert seen["allow_patterns"] == ["rcp_config.json", "rcp_plugins.safetensors", "README.md"]
    hub.push_rcp_folder(folder, "me/rcp", plugins_only=True, api=Api())
    assert seen["path_in_repo"] is None  # the root, as before
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubUnreachableError) as err:
        hub.push_rcp_folder(folder, "me/rcp", plugins_only=True, path_in_repo="budget_1_9")
    assert str(err.value).endswith(
        f"push it later with `push_rcp_folder({str(folder)!r}, 'me/rcp', plugins_only=True, path_in_repo="
        f"'budget_1_9')` or `hf upload me/rcp {folder} budget_1_9`.")


def budget_sets():
    """train_rcp.py metrics of two budgets' sets."""
    def metrics(budget, kept, accuracy):
        return {"base_model": "llava-hf/llava-1.5-7b-hf", "max_steps": 3, "pruning_layers": [1], "repair_layers": [2],
                "num_visual_tokens": 16, "visual_token_budget": budget, "dataset": "lmms-lab/VQAv2",
                "rcp": {"accuracy": accuracy, "avg_visual_tokens_per_layer": kept},
                "full": {"accuracy": 0.9}}
    return [("1/2", "budget_1_2", metrics(8.0, 7.93, 0.875)), ("1/4", "budget_1_4", metrics(4.0, 4.25, 0.8125))]


def set_rows(text):
    return [row for row in rows(text) if not row.startswith("| budget ")]


def test_the_budgets_card_lists_each_set_with_its_folder():
    """The root card of a repo of plug-in sets: one row per set (its own kept tokens and result, not the full
    model's), a Hub base as an adapter's, no model-index (the Hub would read the sets' results as one model's)."""
    built = hub.build_budgets_card("me/rcp", budget_sets(), base_model="llava-hf/llava-1.5-7b-hf", license="llama2")
    assert set_rows(built.text) == ["| 1/2 | `budget_1_2` | 7.93 | lmms-lab/VQAv2 | accuracy | 0.875 |",
                                "| 1/4 | `budget_1_4` | 4.25 | lmms-lab/VQAv2 | accuracy | 0.8125 |"]
    meta = built.data.to_dict()
    assert meta["base_model"] == "llava-hf/llava-1.5-7b-hf" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "rcp-llava" and "rcp-plugins" in meta["tags"] and meta["license"] == "llama2"
    assert meta["rcp_llava"]["budgets"] == {"1/2": "budget_1_2", "1/4": "budget_1_4"} and "model-index" not in meta
    assert ("from_base(base_id, plugins='me/rcp', subfolder='budget_1_2')" in built.text
            and "base_id = 'llava-hf/llava-1.5-7b-hf'" in built.text)
    local = hub.build_budgets_card("me/rcp", budget_sets()[:1], base_model="outputs/rcp/model", license="llama2")
    meta = local.data.to_dict()  # a local base: no Hub link or metadata, the folder named
    assert "base_model" not in meta and meta["rcp_llava"]["base_model_path"] == "outputs/rcp/model"
    assert set_rows(hub.build_budgets_card("me/rcp", [("1/9", "budget_1_9", None)], license="llama2").text) == [
        "| 1/9 | `budget_1_9` |  |  |  |  |"]  # a set whose job evaluated nothing


def test_the_budgets_card_refuses_sets_that_would_overwrite_each_other():
    sets = budget_sets()
    with pytest.raises(ValueError, match=r"^Budgets '1/2' and '1/4' both name the subfolder 'budget_1_2': give each "
                                         r"plug-in set a folder of its own.$"):
        hub.build_budgets_card("me/rcp", [sets[0], ("1/4", "budget_1_2", sets[1][2])])
    for bad in ([], None, [("1/2", "budget_1_2")]):
        with pytest.raises(ValueError, match=r"^(`sets` must be a non-empty list of|Each of `sets` is) \(budget, subfolder, "
                                             r"eval_results\)"):
            hub.build_budgets_card("me/rcp", bad)
    with pytest.raises(ValueError, match=r"^`sets' subfolder='\.\./x'` is not a folder inside the repo"):
        hub.build_budgets_card("me/rcp", [("1/2", "../x", None)])


def test_the_budgets_cards_snippet_loads_the_set_of_its_folder(tmp_path, monkeypatch):
    """The root card's snippet, run verbatim on a local repo of two sets, loads the first set's plug-ins (the other
    folder holds other values) on the base and generates."""
    import torch

    base, model, _ = demo.save_demo_folder(tmp_path / "base")
    repo = tmp_path / "repo"
    model.save_plugins(repo / "budget_1_2")
    with torch.no_grad():
        for param in model.plugin_parameters():
            param.add_(1.0)
    model.save_plugins(repo / "budget_1_4")
    built = hub.build_budgets_card(str(repo), [("1/2", "budget_1_2", None), ("1/4", "budget_1_4", None)],
                                   base_model=str(base), license="apache-2.0")
    snippet = built.text.split("```python\n")[1].split("```")[0]
    demo.demo_image().save(tmp_path / "image.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(snippet, namespace)
    first = dict(demo.build_demo_model().named_parameters())  # the seed-0 model saved first (unchanged values)
    loaded = dict(namespace["model"].named_parameters())
    names = [name for name, _ in namespace["model"].named_parameters() if "rcp_plugins" in name]
    assert names and all(torch.equal(loaded[name], first[name]) for name in names)


def test_a_root_card_is_pushed_to_the_resolved_repo(tmp_path, online, monkeypatch):
    """`push_model_card` writes the card for the repo a bare name resolves to before uploading it as README.md, and
    says how to push it later when offline or when the file is missing."""
    from types import SimpleNamespace as NS

    from huggingface_hub import constants

    calls, written = [], []
    path = tmp_path / "README.md"

    class Api:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return NS(repo_id="me/rcp")

        def create_branch(self, repo_id, branch, **kwargs):
            calls.append(("create_branch", repo_id, branch))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision=None, **kwargs):
            calls.append(("upload_file", open(path_or_fileobj).read(), path_in_repo, repo_id, revision))
            return "commit"

    def card(repo_id):
        written.append(repo_id)
        path.write_text(f"card of {repo_id}")

    assert hub.push_model_card(path, "rcp", api=Api(), card=card, revision="v2") == "commit"
    assert written == ["rcp", "me/rcp"]
    assert calls == [("create_repo", "rcp"), ("create_branch", "me/rcp", "v2"),
                     ("upload_file", "card of me/rcp", "README.md", "me/rcp", "v2")]
    with pytest.raises(FileNotFoundError, match=r"^No card file '.*nothing.md' to push: write it first"):
        hub.push_model_card(tmp_path / "nothing.md", "me/rcp", api=Api())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubUnreachableError) as err:
        hub.push_model_card(path, "me/rcp")
    assert str(err.value).endswith(f"Push it later with `push_model_card({str(path)!r}, 'me/rcp')` or "
                                   f"`hf upload me/rcp {path} README.md`.")


@pytest.mark.parametrize("subfolder", ["", "../budget_1_9", "/budget_1_9"])
def test_a_sets_card_checks_its_subfolder_before_anything_else(subfolder, monkeypatch):
    """A set card's `subfolder` is a folder inside the repo: '' (the repo's root is `subfolder=None`), a '..' or an
    absolute path gave a snippet loading the plug-ins from no folder of the repo. It is refused before the base
    model's license is looked up (a Hub request), by the card and by its snippet alike."""
    monkeypatch.setattr(hub, "base_model_license", lambda base: pytest.fail("looked up the base model's license"))
    message = rf"^`subfolder={re.escape(repr(subfolder))}` is not a folder inside the repo"
    with pytest.raises(ValueError, match=message):
        hub.build_model_card(demo.demo_config(), "me/rcp", base_model="llava-hf/llava-1.5-7b-hf", plugins_only=True,
                             subfolder=subfolder)
    with pytest.raises(ValueError, match=message):
        hub.usage_snippet("me/rcp", plugins_only=True, subfolder=subfolder)


def test_a_sets_card_names_the_folder_it_loads_from():
    """A set card (one set per budget in one repo) says where its set lives, loads it from there, and is titled
    NAME/SUBFOLDER; without a subfolder nothing of it appears."""
    built = card(plugins_only=True, base_model="llava-hf/llava-1.5-7b-hf", subfolder="sets/budget_1_9")
    meta = built.data.to_dict()
    assert meta["model_name"] == "x/sets/budget_1_9" and meta["rcp_llava"]["subfolder"] == "sets/budget_1_9"
    assert ("They live in the folder `sets/budget_1_9` of the repo, beside the sets of other budgets (the repo's own "
            "README.md lists them).") in built.text
    assert "from_base(base_id, plugins='u/x', subfolder='sets/budget_1_9')" in built.text
    root = card(plugins_only=True, base_model="llava-hf/llava-1.5-7b-hf")
    assert root.data.to_dict()["model_name"] == "x" and "subfolder" not in root.data.to_dict()["rcp_llava"]
    assert "They live in the folder" not in root.text and "from_base(base_id, plugins='u/x')" in root.text


def test_the_budgets_cards_row_is_the_sets_own_result():
    """A set's row shows its own result (not a baseline listed before it, e.g. the full model) and its measured kept
    tokens (`average_kept_tokens`, where its entries have none); a '|' stays in its cell; a budget given as a number
    is listed under its text, as YAML keys are read back."""
    results = {"results": [{"dataset": "VQAv2", "metric": "accuracy", "value": 0.9, "method": "full model",
                            "baseline": True},
                           {"dataset": "vqa|val", "metric": "accuracy", "value": 0.5}],
               "average_kept_tokens": 6.5}
    built = hub.build_budgets_card("me/rcp", [(64, "budget_64", results)], license="llama2")
    assert set_rows(built.text) == [r"| 64 | `budget_64` | 6.5 | vqa\|val | accuracy | 0.5 |"]
    assert built.data.to_dict()["rcp_llava"]["budgets"] == {"64": "budget_64"}


def test_the_budgets_card_takes_the_base_models_license(tmp_path):
    """As a set's card does (`base_model_license`): without `license=`, the root card takes the local base's."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    assert hub.build_budgets_card("me/rcp", budget_sets()[:1], base_model=str(base)).data.license == "apache-2.0"
    given = hub.build_budgets_card("me/rcp", budget_sets()[:1], base_model=str(base), license="mit")
    assert given.data.license == "mit"


def test_a_plugin_sets_folder_in_the_repo_is_checked_before_anything_else(tmp_path, online):
    """`push_rcp_folder(path_in_repo=...)` with a '..' or an absolute path would upload outside the repo's folders
    (or nowhere): refused before the card is written or the Hub is called."""
    folder = tmp_path / "budget_1_9"
    demo.build_demo_model().save_plugins(folder)
    for bad in ("../budget_1_9", "/budget_1_9", ""):
        api, written = FakeApi(), []
        with pytest.raises(ValueError, match=rf"^`path_in_repo={re.escape(repr(bad))}` is not a folder inside the "
                                             r"repo"):
            hub.push_rcp_folder(folder, "me/rcp", plugins_only=True, api=api, path_in_repo=bad, card=written.append)
        assert api.calls == [] and written == []


def test_a_root_card_push_without_network_is_a_clear_error(tmp_path, online):
    """The Hub not answering (a connection error) is `HubUnreachableError`, naming the call that pushes the card
    later, as for a plug-in folder; the token reaches the upload."""
    path = tmp_path / "README.md"
    path.write_text("card", encoding="utf-8")
    uploads = []

    class Api:
        def __init__(self, fail):
            self.fail = fail

        def create_repo(self, repo_id, **kwargs):
            if self.fail:
                raise ConnectionError("no route to host")
            return SimpleNamespace(repo_id=repo_id)

        def upload_file(self, **kwargs):
            uploads.append(kwargs)
            return "commit"

    with pytest.raises(hub.HubUnreachableError, match=r"^Cannot reach the Hub to push the card .*README.md' to "
                                                      r"'me/rcp' \(ConnectionError: no route to host\)\. Push it "
                                                      r"again once online with `push_model_card\("):
        hub.push_model_card(path, "me/rcp", api=Api(fail=True))
    assert hub.push_model_card(path, "me/rcp", api=Api(fail=False), token="hf_x") == "commit"
    assert uploads[0]["token"] == "hf_x" and uploads[0]["path_in_repo"] == "README.md"
