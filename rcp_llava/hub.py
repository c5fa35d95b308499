"""Sharing RCP-LLaVA models on the Hugging Face Hub: model cards and uploads.

- `build_model_card(...)` writes the README.md of a saved folder with `huggingface_hub`'s `ModelCard` /
  `ModelCardData`: base model, `library_name: transformers`, `pipeline_tag: image-text-to-text`, tags, the
  pruning configuration, the average kept visual tokens, the evaluation table (model-index) and a usage snippet.
- `push_rcp_folder(folder, repo_id, plugins_only=...)` uploads a full model folder (`save_pretrained`) or a
  plug-in-only folder (`save_plugins`) with `huggingface_hub`, and fails with a clear message when offline.
- One plug-in set per budget in one repo: each set pushed into a folder of its own (`path_in_repo`, its card built
  with `subfolder`), the repo's root card listing them (`build_budgets_card`, `push_model_card`); a set loads with
  `from_base(base, plugins=repo_id, subfolder=...)`.
- The tiny demo model lives in `rcp_llava.demo` (it imports this module for its model card; this module does not
  import it).

Nothing here is a Hub file: the remote-code pair (`configuration_rcp_llava.py`, `modeling_rcp_llava.py`) never
imports this module.
"""

import json
import math
import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from modeling_rcp_llava import (
    PRUNING_FIELDS, RCP_CONFIG_NAME, RCP_LLAVA_VERSION, RCP_PLUGINS_NAME, looks_like_local_path,
)


logger = logging.get_logger(__name__)

MODEL_CARD_NAME = "README.md"
DEFAULT_TAGS = ("rcp-llava", "llava", "visual-token-pruning", "token-pruning", "image-text-to-text")
PRUNING_TAGS = ("visual-token-pruning", "token-pruning")  # not on a card whose method prunes nothing ("none")
# The fields only RCP's plug-ins read, and the baselines' own: a card's table lists what its method reads (its
# metadata keeps every field, so a config can be rebuilt from it).
PLUGIN_FIELDS = ("repair_layers", "num_pruning_queries", "query_dropout", "pruner_dropout", "gumbel_temperature",
                 "pruner_hidden_size", "pruner_num_heads", "repair_bottleneck_size")
METHOD_FIELDS = {"random": ("pruning_seed",), "vispruner": ("vispruner_important_ratio",), "fastv": ("fastv_query",)}
# What each kind of folder holds (besides README.md); `push_rcp_folder` refuses a folder that lacks one.
FULL_MODEL_FILES = ("config.json", "configuration_rcp_llava.py", "modeling_rcp_llava.py")
PLUGIN_FILES = (RCP_CONFIG_NAME, RCP_PLUGINS_NAME)
# A full folder's processor (one file of each group), which the card's usage snippet loads from the repo itself.
PROCESSOR_FILES = (("processor_config.json", "preprocessor_config.json"),
                   ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
GITHUB_URL = "https://github.com/rcp-llava/rcp-llava"


# ------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------


TESTBED_DATASET = "rcp-llava testbed"
# Keys every train_rcp.py metrics.json has, with or without an evaluation ("rcp" only with a test split).
TRAIN_RCP_KEYS = frozenset({"base_model", "max_steps", "pruning_layers", "repair_layers"})
BASELINE_NAMES = {"none": "full model (all visual tokens)", "full": "full model (all visual tokens)"}
# The average kept visual tokens of an evaluation JSON: the documented key first, then the aliases other tools write.
KEPT_TOKEN_KEYS = ("average_kept_tokens", "kept_visual_tokens", "avg_kept_tokens")
# A Hub dataset id `owner/name`; anything else in `dataset_type` (a local path, a bare name) is no model-index dataset.
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What each training-free method keeps (the card's description); a method registered by a user is named only.
METHOD_TEXT = {
    "vispruner": "VisPruner (the vision encoder's [CLS]-attention important tokens plus similarity-deduplicated "
                 "diverse ones)",
    "fastv": "FastV (the tokens the prompt attends to most, measured at the layer before)",
    "random": "A seeded uniform random subset (`pruning_seed`)",
    "attention_topk": "The LLM's own question-to-visual attention (the top tokens at each pruning layer: RCP's "
                      "prior alone, Eq. 4)",
}


def _short(value, limit=160):
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + " ..."


def _finite_number(value):
    # bool is an int, and json reads NaN / Infinity: none of them is a measured value
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_hub_dataset_id(value):
    return isinstance(value, str) and bool(HUB_DATASET_ID.match(value)) and ".." not in value


def load_eval_results(eval_results, checkpoint=None):
    """Evaluation results as a list of dicts `{dataset, metric, value}` plus, where known, `method`, `budget`,
    `tokens_per_layer`, `dataset_type` (a Hub dataset id), `split`, `kept_tokens`, and `baseline` (True for rows
    that are not this checkpoint's own result, e.g. the full model: they go in the card's text, not model-index).

    `eval_results` is a path to a JSON file, or its content. Accepted shapes:
      - `{"results": [entry, ...], "average_kept_tokens": 64.0}` or a bare list of entries, an entry being
        `{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6, "dataset_type": ..., "split": ...}`;
      - `{"VQAv2": {"accuracy": 75.6}, "POPE": {"f1": 85.1}}` (dataset -> metric -> value: every top-level key
        but the kept-token ones is a dataset, every value a finite number);
      - the testbed's `evaluate_accuracy` output `{"overall": 0.91, "n": ..., "kept_visual_tokens": ...}` (a stock
        model's, or `pruning_method="none"`: it measures no model's own pruning, and `build_model_card` refuses it
        for a pruning config);
      - `train_rcp.py`'s metrics.json: RCP's accuracy (this checkpoint), the full model's and the training-free
        prior's at RCP's counts (baselines);
      - `benchmarks/evaluate_methods.py`'s JSON: its RCP rows (this checkpoint), every other row as a baseline; with
        `--plugins_per_budget`, only the rows of the set in local folder `checkpoint` (the card's `repo_id`) are
        this checkpoint's, else those of the evaluated model (`--model` / `--plugins`), and the other sets' RCP rows
        are baselines.
    The average kept visual tokens come from `average_kept_tokens` (else the aliases `kept_visual_tokens`,
    `avg_kept_tokens`). Every entry's `value` must be a finite number and its `tokens_per_layer` / `kept_tokens` a
    number >= 0 or None; a baseline entry must name its `method` (ValueError otherwise).
    Returns `(entries, average_kept_tokens or None)`.
    """
    if eval_results is None:
        return [], None
    if isinstance(eval_results, (str, os.PathLike)):
        path = Path(eval_results)
        if not path.is_file():
            raise FileNotFoundError(f"`eval_results`: no file {str(path)!r}.")
        try:
            eval_results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"`eval_results` file {str(path)!r} is not valid JSON ({err}).") from None
    kept = None
    if isinstance(eval_results, dict):
        # The first key present wins: the documented one over its aliases (the last alias used to win).
        key = next((k for k in KEPT_TOKEN_KEYS if eval_results.get(k) is not None), None)
        if key is not None:
            if not _finite_number(eval_results[key]) or eval_results[key] < 0:
                raise ValueError(
                    f"`eval_results[{key!r}]` is {_short(repr(eval_results[key]))}: it must be the average number of "
                    "visual tokens kept per decoder layer, a finite number >= 0 (e.g. 64.0), or null if not measured."
                )
            kept = float(eval_results[key])
        results = eval_results.get("results")
        if isinstance(results, list) and results and all(isinstance(r, dict) and "rows" in r for r in results):
            entries = _evaluate_methods_entries(results, checkpoint)
            rcp = [e for e in entries if not e["baseline"] and e.get("tokens_per_layer") is not None]
            if kept is None and len(rcp) == 1:
                kept = rcp[0]["tokens_per_layer"]
        elif "results" in eval_results:
            entries = list(results)
        elif (isinstance(eval_results.get("rcp"), dict) and "accuracy" in eval_results["rcp"]) or \
                TRAIN_RCP_KEYS <= eval_results.keys():
            entries, job_kept = _train_rcp_entries(eval_results)
            kept = job_kept if job_kept is not None else kept
        elif "overall" in eval_results and isinstance(eval_results["overall"], (int, float)):
            entries = [{"dataset": eval_results.get("dataset", TESTBED_DATASET), "metric": "accuracy",
                        "value": eval_results["overall"], "source": "evaluate_accuracy"}]
        else:
            datasets = {name: metrics for name, metrics in eval_results.items() if name not in KEPT_TOKEN_KEYS}
            if not any(isinstance(metrics, dict) for metrics in datasets.values()):
                raise ValueError(
                    f"`eval_results` is not a format `build_model_card` knows (top-level keys: "
                    f"{_short(sorted(eval_results))}); see `rcp_llava.hub.load_eval_results`."
                )
            # dataset -> metric -> value, strictly: a key skipped here (a `meta` block, a metric left null) used to
            # vanish or become a result row without a word.
            entries = []
            for name, metrics in datasets.items():
                if not isinstance(metrics, dict) or not metrics:
                    raise ValueError(
                        f"`eval_results[{name!r}]` is {_short(repr(metrics))}, not a dict of metric -> value: in the "
                        f"dataset -> metric -> value format every top-level key but {list(KEPT_TOKEN_KEYS)} is a "
                        f"dataset, e.g. {{\"VQAv2\": {{\"accuracy\": 75.6}}}}; move {name!r} out of the file."
                    )
                for metric, value in metrics.items():
                    if not _finite_number(value):
                        raise ValueError(
                            f"`eval_results[{name!r}][{metric!r}]` is {_short(repr(value))}, not a finite number: "
                            f"give the measured value (e.g. 75.6), or drop the metric {metric!r}."
                        )
                    entries.append({"dataset": name, "metric": metric, "value": value})
    elif isinstance(eval_results, list):
        entries = list(eval_results)
    else:
        raise TypeError(f"`eval_results` must be a path, a dict or a list, got {type(eval_results).__name__}.")
    for e in entries:
        if not isinstance(e, dict):
            raise ValueError(f"Evaluation entry {_short(e)} is not a dict; see `load_eval_results` for the format.")
        missing = [k for k in ("dataset", "metric", "value") if k not in e]
        if missing:
            raise ValueError(f"Evaluation entry {_short(e)} lacks {missing}; see `load_eval_results` for the format.")
        if not _finite_number(e["value"]):  # huggingface_hub drops a null value, then fails to parse its own card
            raise ValueError(
                f"Evaluation entry {_short(e)} has `value` {_short(repr(e['value']))}: it must be a finite number "
                "(e.g. 75.6; not a string, a bool, NaN, inf or null). Give the measured value, or drop the entry."
            )
        for key in ("tokens_per_layer", "kept_tokens"):
            tokens = e.get(key)
            if tokens is not None and not (_finite_number(tokens) and tokens >= 0):
                raise ValueError(
                    f"Evaluation entry {_short(e)} has `{key}` {_short(repr(tokens))}: it must be the visual tokens "
                    "per decoder layer, a finite number >= 0 (e.g. 64.0), or null if not measured."
                )
        if e.get("method") is not None and not isinstance(e["method"], str):
            raise TypeError(f"Evaluation entry {_short(e)} has `method` {_short(repr(e['method']))}: give the "
                            "method's name as a string (e.g. \"fastv\"), or leave it out for this checkpoint's row.")
        e.setdefault("baseline", False)
        # A missing (or null) method is this checkpoint's own row, "rcp": a baseline with none would be labelled
        # "rcp (baseline)", RCP measured as a baseline beside itself.
        if e["baseline"] and not e.get("method"):
            raise ValueError(
                f"Evaluation entry {_short(e)} is a baseline without a `method`: name what it measured (e.g. "
                "\"method\": \"fastv\"), or drop `baseline` if it is this checkpoint's own result."
            )
    return entries, kept


def _train_rcp_entries(metrics):
    """train_rcp.py's metrics.json -> entries (RCP's own, then the baselines at the same budget); none when the job
    evaluated nothing (no test split: a `--llava_json` run)."""
    if not (isinstance(metrics.get("rcp"), dict) and "accuracy" in metrics["rcp"]):
        return [], None
    # train_rcp.py records the data it evaluated on; files written before it did were the testbed's.
    dataset = metrics.get("dataset") or TESTBED_DATASET
    n, budget = metrics.get("num_visual_tokens"), metrics.get("visual_token_budget")
    budget_text = f"{budget:g} of {n} tokens" if isinstance(budget, (int, float)) and n else ""
    if budget_text and metrics.get("sparsity_layers") == "from_first_pruner":  # beside tokens / layer over all layers
        budget_text += " (mean from the first pruner)"
    rcp = metrics["rcp"]
    kept = rcp.get("avg_visual_tokens_per_layer")
    kept = float(kept) if isinstance(kept, (int, float)) else None
    # A Hub dataset id ("owner/name") goes to model-index as its `dataset_type`, with the split the job scored (the
    # card had neither: no training job's card held a model-index, and its split column was empty).
    split = metrics.get("evaluated_split") or metrics.get("test_split")
    # a local folder or --llava_json file named like "data/vqa" is no Hub dataset
    hub_id = dataset if not (os.path.exists(dataset) or str(dataset).endswith(".json")) else None
    # A run trained at fixed counts (--pruning_keep_counts, recorded since) evaluated at them, not with the adaptive
    # threshold; its "rcp_fixed_counts" row is then the same model at the same counts again.
    trained_counts = metrics.get("pruning_keep_counts")
    label = f"rcp (fixed counts {':'.join(map(str, trained_counts))})" if trained_counts else "rcp (adaptive)"
    entries = [{"dataset": dataset, "metric": "accuracy", "value": rcp["accuracy"], "method": label,
                "budget": budget_text, "tokens_per_layer": kept, "baseline": False, "dataset_type": hub_id,
                "split": split}]
    if isinstance(metrics.get("full"), dict) and "accuracy" in metrics["full"]:
        entries.append({"dataset": dataset, "metric": "accuracy", "value": metrics["full"]["accuracy"],
                        "method": BASELINE_NAMES["full"], "budget": "", "tokens_per_layer": n, "baseline": True,
                        "split": split})
    for key, method in (("rcp_fixed_counts", "rcp (fixed counts)"),
                        ("prior_fixed_counts", "attention_topk (RCP's prior alone, same counts)")):
        if key == "rcp_fixed_counts" and trained_counts:
            continue
        if isinstance(metrics.get(key), dict) and "accuracy" in metrics[key]:
            entries.append({"dataset": dataset, "metric": "accuracy", "value": metrics[key]["accuracy"],
                            "method": method, "budget": budget_text,
                            "tokens_per_layer": metrics[key].get("avg_visual_tokens_per_layer"),
                            "baseline": key != "rcp_fixed_counts", "split": split})  # model-index: the row above
    return entries, kept


def _same_folder(a, b):
    """True if `a` and `b` name one existing local folder (a Hub id, or a folder since moved, names none)."""
    try:
        return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _evaluate_methods_entries(results, checkpoint=None):
    """benchmarks/evaluate_methods.py's JSON `results` -> entries: RCP rows are this checkpoint's.

    A block run with `--plugins_per_budget` scored other plug-in sets at the budgets it maps: those rows are the
    checkpoint's own only when `checkpoint` (the card's `repo_id`) is the same local folder as the set; otherwise they
    are other models measured beside it (the card had put every set's score in this checkpoint's model-index), and
    the rows at the budgets it does not map are the evaluated model's. An adaptive row ("rcp (adaptive)", or
    "rcp (adaptive, 1/9)" for a per-budget set) is marked `adaptive`."""
    entries = []
    for b, block in enumerate(results):
        dataset = TESTBED_DATASET if block.get("kind") == "testbed" else block.get("data", "unknown")
        metric = block.get("metric", "first-token accuracy" if block.get("kind") == "testbed" else "score")
        per_budget = block.get("plugins_per_budget") or {}
        own_set = next((label for label, folder in per_budget.items()
                        if checkpoint is not None and _same_folder(folder, checkpoint)), None)
        for r, row in enumerate(block["rows"]):
            if not isinstance(row.get("score"), (int, float)):
                continue
            method = row.get("label") or row.get("method")
            if not method:  # no name to put on the row, and no way to tell RCP's own from a baseline
                raise ValueError(
                    f"`eval_results`: row {r} of results block {b} (data {block.get('data', dataset)!r}) has neither "
                    f"'label' nor 'method' ({_short(row)}): name the method each row measured, as "
                    "benchmarks/evaluate_methods.py writes it."
                )
            budget = str(row.get("budget", ""))
            adaptive = budget == "adaptive" or str(row.get("label", "")).startswith("rcp (adaptive")
            # the plug-in set a per-budget RCP row ran (its budget label, "1/9 (k=64)" or "1/9"), else the model's
            plugin_set = (next((label for label in per_budget if budget.split(" (")[0] == label), None)
                          if row.get("method") == "rcp" else None)
            own = row.get("method") == "rcp" and plugin_set == own_set
            if row.get("method") == "rcp" and plugin_set is not None and not adaptive and not own:
                method = f"rcp (plug-ins trained for {plugin_set})"  # beside "rcp": another checkpoint's row
            entries.append({"dataset": dataset, "metric": metric, "value": row["score"],
                            "method": BASELINE_NAMES.get(method, method), "budget": budget,
                            "tokens_per_layer": row.get("avg_tokens_all_layers"),
                            "baseline": not own, "adaptive": adaptive})
    return entries


def _card_fields(config):
    """The pruning fields `config`'s method reads, in the config's order (`pruning_method` first)."""
    spec = config.pruning_spec
    names = {"pruning_method"}
    if spec.prunes:
        names.add("visual_token_budget")
    if spec.in_decoder and config.pruning_layers:
        names.update(("pruning_layers", "pruning_keep_counts"))
    if spec.pre_llm and config.pre_llm_keep_count is not None:
        names.add("pre_llm_keep_count")
    if spec.plugins:
        names.update(PLUGIN_FIELDS)
    names.update(METHOD_FIELDS.get(spec.name, ()))
    return [name for name in PRUNING_FIELDS if name in names]


def _pruning_table(config):
    rows = [(name, getattr(config, name)) for name in _card_fields(config)]
    rows.append(("visual tokens per image", config.num_visual_tokens))
    rows.append(("decoder layers", config.text_config.num_hidden_layers))
    return "\n".join(["| field | value |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in rows])


def _fmt(value):
    """A float as the card shows it: four significant digits in [0, 1) (an accuracy), two decimals above (MME's
    0-2000 scores: four digits made 1510.75 and 1510.60 both "1511", 12345.6 "1.235e+04")."""
    if isinstance(value, float):
        if abs(value) >= 1:
            return f"{value:.2f}".rstrip("0").rstrip(".")
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table_row(cells):
    """One Markdown table row. A '|' in a cell ("vqa|val", "acc|norm") split its row into extra columns: escaped, as
    Markdown tables take it."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _base_kind(base_model):
    """`(local_base, hub_base)`: a local folder as the base (the testbed job's `<output>/model`) is no Hub id, so a
    card gives it no link to huggingface.co/<path> and no `base_model` metadata (the Hub reads it as a repo id) and
    names the folder instead; `hub_base` is the base as a Hub id, None for a local one."""
    local_base = bool(base_model) and (os.path.exists(str(base_model)) or looks_like_local_path(str(base_model)))
    return local_base, None if local_base else base_model


def _default_model_name(repo_id, subfolder=None):
    """A card's default title: the repo's name, with the set's folder (`NAME/SUBFOLDER`) for one set of several."""
    return "/".join([str(repo_id).rstrip("/").split("/")[-1], *([subfolder] if subfolder else [])])


def _results_table(entries):
    if not entries:
        return "No evaluation results were recorded for this checkpoint."
    lines = ["| method | budget | visual tokens / layer | dataset | split | metric | value |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        # A missing or null method is this checkpoint's row (`load_eval_results` refuses a baseline without one).
        method = (e.get("method") or "rcp") + (" (baseline)" if e.get("baseline") else "")
        tokens = e.get("tokens_per_layer", e.get("kept_tokens"))
        cells = [method, _fmt(e.get("budget")), _fmt(float(tokens)) if tokens is not None else "", e["dataset"],
                 _fmt(e.get("split")), e["metric"], _fmt(e["value"])]
        lines.append(_table_row(cells))
    return "\n".join(lines) + ("\n\nRows marked *baseline* are other models or methods measured beside this "
                               "checkpoint; only this checkpoint's own rows are in the card's model-index."
                               if any(e.get("baseline") for e in entries) else "")


def base_model_license(base_model):
    """The license in the base model's card: a local folder's README.md, or the Hub's card data (one request, a
    five-second timeout, skipped offline). None when it cannot be read."""
    if not base_model:
        return None
    folder = Path(str(base_model))
    if folder.is_dir():
        readme = folder / MODEL_CARD_NAME
        if readme.is_file():
            try:
                return ModelCard.load(readme).data.license
            except Exception:  # a card without YAML metadata
                return None
        return None
    from huggingface_hub import constants, model_info

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        data = model_info(str(base_model), timeout=5).card_data
    except Exception:  # offline, private, no such repo: the caller passes `license=`
        return None
    return getattr(data, "license", None) if data is not None else None


BASE_MODEL_PLACEHOLDER = "BASE_MODEL"


def check_subfolder(subfolder, argument="subfolder"):
    """`subfolder` as a folder inside a repo ("budget_1_9", "sets/rcp-64"), else a ValueError naming `argument`: an
    absolute path, a '..' or an empty part would name no folder of the repo (or one outside it)."""
    if not isinstance(subfolder, str):
        raise TypeError(f"`{argument}` must be a string (a folder inside the repo, e.g. 'budget_1_9'), not "
                        f"{type(subfolder).__name__} {subfolder!r}.")
    parts = subfolder.split("/")
    if subfolder.startswith("/") or "\\" in subfolder or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"`{argument}={subfolder!r}` is not a folder inside the repo: give a relative path of plain "
                         "names joined by '/', e.g. 'budget_1_9' (no leading '/', no '.', '..' or empty part).")
    return subfolder


def _check_card_subfolder(subfolder, plugins_only):
    """A card's `subfolder`: None, or a folder inside the repo (`check_subfolder`) for a plug-in set only."""
    if subfolder is None:
        return
    check_subfolder(subfolder)
    if not plugins_only:
        raise ValueError(f"`subfolder={subfolder!r}` is where a plug-in set lives in its repo; a full model's card has "
                         "none: pass `plugins_only=True`, or no `subfolder`.")


def usage_snippet(repo_id, plugins_only=False, base_model=None, subfolder=None):
    """Python code that loads and runs the checkpoint (a full folder via remote code, or plug-ins on their base).

    A plug-in snippet without `base_model` sets `base_id` to the placeholder "BASE_MODEL" for the reader to replace
    (`from_base(None, ...)` cannot load anything, and the plug-ins only fit the base they were trained on).
    `subfolder`: the folder of the repo that holds the plug-ins (one set per budget, `build_budgets_card`).
    """
    _check_card_subfolder(subfolder, plugins_only)
    if plugins_only:
        where = f", subfolder={subfolder!r}" if subfolder else ""
        base_line = (
            f"base_id = {base_model!r}\n" if base_model else
            f"base_id = {BASE_MODEL_PLACEHOLDER!r}  # not recorded: replace with the LLaVA checkpoint these plug-ins "
            "were trained on\n"
        )
        return (
            "# pip install rcp-llava\n"
            "from PIL import Image\n"
            "from transformers import AutoProcessor\n"
            "from rcp_llava import RcpLlavaForConditionalGeneration\n\n"
            + base_line +
            f"model = RcpLlavaForConditionalGeneration.from_base(base_id, plugins={repo_id!r}{where})\n"
            "processor = AutoProcessor.from_pretrained(base_id)\n"
            + _SNIPPET_RUN
        )
    return (
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f"model_id = {repo_id!r}\n"
        "model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True)\n"
        "# trust_remote_code here too: the tokenizer loader reads config.json, whose auto_map names the remote code\n"
        "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)\n"
        + _SNIPPET_RUN
    )


_SNIPPET_RUN = (
    'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]\n'
    "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
    'inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt")\n'
    "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
    'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    "info = model.last_pruning_info  # unset when nothing was pruned (pruning_method='none', a prompt without image)\n"
    "print(info.kept_counts if info else 'no visual token pruned')  # visual tokens kept at each pruning point\n"
)


def build_model_card(config, repo_id, base_model=None, plugins_only=False, eval_results=None,
                     average_kept_tokens=None, training_args=None, tags=(), model_name=None, license=None,
                     subfolder=None):
    """A `huggingface_hub.ModelCard` for an RCP checkpoint.

    Args:
        config: the `RcpLlavaConfig` of the checkpoint (or a model, whose `.config` is used).
        repo_id: the Hub repo id (or local folder) the usage snippet loads.
        base_model: the stock LLaVA checkpoint it was built on (card metadata `base_model`). A plug-in card
            without it says the base was not recorded, its snippet has a "BASE_MODEL" placeholder, and a warning
            is logged.
        plugins_only: the card of a plug-in-only folder (snippet uses `from_base`).
        eval_results: evaluation JSON path or content (see `load_eval_results`) -> model-index + results table.
        average_kept_tokens: average visual tokens kept per decoder layer (measured); defaults to the evaluation
            JSON's, then to the one implied by `pruning_keep_counts`. RCP's adaptive threshold without either: the
            card states `visual_token_budget` as the target, not as a kept count (metadata
            `average_kept_visual_tokens: null`), since the count the threshold keeps depends on the image.
        training_args: dict of training settings (e.g. `TrainingArguments.to_dict()` restricted to what matters).
        tags: extra tags, a string (one tag) or a list of strings.
        license: the card's license; default: the base model's (`base_model_license`), else none (with a warning).
        subfolder: the folder of `repo_id` that holds these plug-ins (one set per budget, beside the others; see
            `build_budgets_card`): the snippet loads from it and the default `model_name` is `NAME/SUBFOLDER`.

    model-index holds only this checkpoint's own results on datasets with a Hub id (`dataset_type` "owner/name");
    baselines (the full model, other methods) and local datasets (the testbed) are in the card's results table.
    A plug-in-only card is an adapter card: `library_name: rcp-llava`, `base_model_relation: adapter`.
    The card describes the config's `pruning_method`: RCP's plug-ins, a training-free method, or no pruning.
    """
    config = getattr(config, "config", config)
    config.validate_pruning()  # a field edited after construction: the card would state what no model runs
    spec = config.pruning_spec
    _check_card_subfolder(subfolder, plugins_only)
    if plugins_only and not spec.plugins:
        raise ValueError(
            f"`plugins_only=True`, but `pruning_method={config.pruning_method!r}` has no plug-ins (its model saves no "
            "plug-in tensors): build the card of the full folder (`plugins_only=False`), or use `pruning_method='rcp'`."
        )
    # One string is one tag, as transformers' card helpers take it (a set of a string is its characters).
    tags = [tags] if isinstance(tags, str) else () if tags is None else tags
    bad = [t for t in (tags if isinstance(tags, (list, tuple, set, frozenset)) else [tags]) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"`tags` must be a string or a list of strings, but holds {bad[0]!r} "
                        f"({type(bad[0]).__name__}); pass e.g. `tags=['my-tag']`.")
    entries, eval_kept = load_eval_results(eval_results, checkpoint=repo_id)
    if spec.prunes and any(e.get("source") == "evaluate_accuracy" for e in entries):
        # It feeds the model embeddings with the image already merged (input-level pruning by `keep_fn`): the
        # model's own method never prunes there, so the card stated the unpruned accuracy and token count as its own.
        raise ValueError(
            f"`eval_results` is the testbed's `evaluate_accuracy` output, which measures the model without its own "
            f"pruning (`pruning_method={config.pruning_method!r}` never runs there): evaluate this "
            "checkpoint with `rcp_llava.evaluation.evaluate_model` / `benchmarks/evaluate_methods.py`, or pass "
            "train_rcp.py's metrics.json."
        )
    kept = average_kept_tokens if average_kept_tokens is not None else eval_kept
    if kept is None and spec.plugins and config.pruning_keep_counts is None:
        # evaluate_methods.py measures adaptive RCP beside its fixed-count rows: the adaptive row is this checkpoint's
        # own count (the card said "not measured" beside a table that held it). Only when unambiguous: one dataset's,
        # or the same on every dataset (several datasets' differing counts have no single average to state).
        adaptive = {e["tokens_per_layer"] for e in entries
                    if not e.get("baseline") and (e.get("adaptive") or e.get("budget") == "adaptive")
                    and e.get("tokens_per_layer") is not None}
        if len(adaptive) == 1:
            (kept,) = adaptive
    n = config.num_visual_tokens
    if kept is not None and not (_finite_number(kept) and 0 <= kept <= n):
        # A count above the model's tokens is another model's result (or a typo): the card would state it as this one's.
        source = ("`average_kept_tokens`" if average_kept_tokens is not None
                  else "The evaluation results' average kept tokens")
        raise ValueError(
            f"{source} is {kept!r}, but this model has {n} visual tokens per image: the average kept per decoder "
            f"layer must be a number in [0, {n}]. Give the count measured on this checkpoint, or none (the card then "
            "uses the config's keep counts)."
        )
    if kept is None:
        kept = config.pruned_average_tokens()
    kept = round(float(kept), 1) if isinstance(kept, (int, float)) else None
    # Adaptive RCP with nothing measured: only the budget is known, and the threshold may keep far more or fewer
    # tokens than it (the training loss pulls towards it, inference does not enforce it), so the card calls it the
    # target and records no kept count.
    target = config.visual_token_budget if kept is None else None
    local_base, hub_base = _base_kind(base_model)
    if plugins_only and not base_model:
        logger.warning("build_model_card: a plug-in card without `base_model`; the card says the base was not "
                       "recorded and its usage snippet has a 'BASE_MODEL' placeholder. Pass `base_model=`.")
    if license is None:
        license = base_model_license(base_model)
        if license is None:
            logger.warning("build_model_card: no license given and none found in the base model's card; pass "
                           "`license=` (e.g. the base model's, 'llama2' for llava-1.5).")
    model_name = model_name or _default_model_name(repo_id, subfolder)
    built_on = f" built on `{base_model}`" if base_model else ""
    results = [
        EvalResult(
            task_type="image-text-to-text", dataset_type=e["dataset_type"],
            dataset_name=e["dataset"], metric_type=e["metric"], metric_value=e["value"],
            dataset_split=e.get("split"), metric_name=e.get("metric_name", e["metric"]),
        )
        for e in entries
        if not e.get("baseline") and _is_hub_dataset_id(e.get("dataset_type"))
    ]
    data = ModelCardData(
        base_model=hub_base, library_name="rcp-llava" if plugins_only else "transformers",
        pipeline_tag="image-text-to-text",
        tags=sorted((set(DEFAULT_TAGS) - (set() if spec.prunes else set(PRUNING_TAGS))) | set(tags)
                    | ({"rcp-plugins"} if plugins_only else set())), license=license,
        model_name=model_name, eval_results=results or None,
        **({"base_model_relation": "adapter"} if plugins_only and hub_base else {}),
        rcp_llava={
            "version": RCP_LLAVA_VERSION, "plugins_only": plugins_only,
            **({"subfolder": subfolder} if subfolder else {}),
            **({"base_model_path": str(base_model)} if local_base else {}),
            "average_kept_visual_tokens": kept, "visual_tokens_per_image": config.num_visual_tokens,
            **{name: getattr(config, name) for name in PRUNING_FIELDS},
        },
    )
    what = (
        f"RCP plug-ins (pruners + repair adapters) for [{base_model}](https://huggingface.co/{base_model})"
        if plugins_only and hub_base else
        f"RCP plug-ins (pruners + repair adapters) for the local LLaVA checkpoint `{base_model}` (not a Hub id: "
        "replace it in the usage snippet with the checkpoint's Hub id when you share them)"
        if plugins_only and local_base else
        "RCP plug-ins (pruners + repair adapters) for a LLaVA base model that was not recorded (replace "
        f"`{BASE_MODEL_PLACEHOLDER}` in the usage snippet with the checkpoint they were trained on)"
        if plugins_only else f"A LLaVA model with RCP visual-token pruning{built_on}"
        if spec.plugins else
        f"A LLaVA model{built_on} with visual-token pruning off (`pruning_method={config.pruning_method!r}`)"
        if not spec.prunes else
        f"A LLaVA model{built_on} with training-free visual-token pruning (`pruning_method={config.pruning_method!r}`)"
    )
    files = (
        f"`{RCP_CONFIG_NAME}` (pruning configuration, base model, library version) and `{RCP_PLUGINS_NAME}` "
        "(plug-in weights only); the base model's weights are not included."
        + (f" They live in the folder `{subfolder}` of the repo, beside the sets of other budgets (the repo's own "
           "README.md lists them)." if subfolder else "")
        if plugins_only else
        "`config.json` (with `auto_map`), `model.safetensors`, `configuration_rcp_llava.py` and "
        "`modeling_rcp_llava.py` (remote code: standard library, torch and transformers only), and the processor "
        "files."
    )
    num_layers = config.text_config.num_hidden_layers
    if spec.plugins:
        how = ("The Representation Consistency Pruner drops\nvisual tokens *inside* the decoder: learned pruners "
               "remove tokens before the pruning layers (later layers\ncompute on, and cache, only the kept tokens) "
               "and delayed repair adapters correct the answer positions.")
    elif not spec.prunes:
        how = ("It runs the stock LLaVA forward: every visual token\nreaches every decoder layer, and no pruner or "
               "repair adapter is used.")
    else:
        # `pruning_points`' 0 is the pre-LLM point (the config refuses a pruning layer 0, and both kinds at once)
        where = (f"before the language model (the decoder sees only the {config.pre_llm_keep_count} kept of the {n} "
                 "visual tokens from layer 0)" if 0 in config.pruning_points else
                 f"*inside* the decoder, before layer(s) {config.pruning_layers} (0-based; later layers compute on, "
                 "and cache, only the kept tokens)")
        method_text = METHOD_TEXT.get(config.pruning_method, f"`{config.pruning_method}`")
        how = (f"{method_text} chooses the visual tokens\nto keep {where}. It is training-free: no learned pruners and "
               "no repair adapters.")
    if kept is not None:
        kept_text = (f"{kept:.1f} (the mean over all {num_layers} decoder layers, the paper's budget definition) "
                     f"(of {n} per image).")
    elif isinstance(target, (int, float)):
        kept_text = (f"not measured for this card. The target is {float(target):.1f} of {n} per image "
                     f"(`visual_token_budget`, the mean over all {num_layers} decoder layers, the paper's budget "
                     "definition), but RCP's adaptive threshold keeps a number that depends on the image (the usage "
                     "snippet prints the counts kept for one image).")
    else:
        kept_text = f"adaptive (not recorded) (of {n} per image)."
    training = (
        "\n".join(f"- `{k}`: {v}" for k, v in sorted(training_args.items()))
        if training_args else "No training settings were recorded."
    )
    content = f"""---
{data.to_yaml()}
---

# {model_name}

{what}, made with [rcp-llava]({GITHUB_URL}) {RCP_LLAVA_VERSION}. {how}

**Average kept visual tokens per decoder layer:** {kept_text}

## Files

{files}

## Usage

```python
{usage_snippet(repo_id, plugins_only=plugins_only, base_model=base_model, subfolder=subfolder)}```

## Pruning configuration

{_pruning_table(config)}

## Evaluation

{_results_table(entries)}

## Training

{training}
"""
    return ModelCard(content)


def build_budgets_card(repo_id, sets, base_model=None, license=None, model_name=None):
    """The root README of a repo that holds one RCP plug-in set per budget, each in a folder of its own with its own
    card (`build_model_card(..., subfolder=...)`; `train_rcp.py --budgets ... --push_to_hub --push_plugins_only`
    writes both): which set is where, its kept visual tokens and its own results, and how to load one.

    sets: a list of `(budget, subfolder, eval_results)`, `eval_results` as `build_model_card` takes it (train_rcp.py's
    metrics.json) or None. The card has no model-index: each set's results stand in its table row (the Hub would read
    one model-index entry per set as results of one model).
    """
    if not isinstance(sets, (list, tuple)) or not sets:
        raise ValueError(f"`sets` must be a non-empty list of (budget, subfolder, eval_results), not {sets!r}.")
    rows, seen = [], {}
    for item in sets:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise ValueError(f"Each of `sets` is (budget, subfolder, eval_results), not {_short(item)}.")
        budget, subfolder, eval_results = item
        check_subfolder(subfolder, "sets' subfolder")
        if subfolder in seen:  # two sets in one folder: the second upload replaced the first
            raise ValueError(f"Budgets {seen[subfolder]!r} and {budget!r} both name the subfolder {subfolder!r}: give "
                             "each plug-in set a folder of its own.")
        seen[subfolder] = budget
        entries, kept = load_eval_results(eval_results)
        own = next((e for e in entries if not e.get("baseline")), None)
        tokens = kept if kept is not None else (own or {}).get("tokens_per_layer")
        cells = [str(budget), f"`{subfolder}`", _fmt(float(tokens)) if tokens is not None else "",
                 *((own["dataset"], own["metric"], _fmt(own["value"])) if own else ("", "", ""))]
        rows.append(_table_row(cells))
    local_base, hub_base = _base_kind(base_model)
    if license is None:
        license = base_model_license(base_model)
    model_name = model_name or _default_model_name(repo_id)
    data = ModelCardData(
        base_model=hub_base, library_name="rcp-llava", pipeline_tag="image-text-to-text",
        tags=sorted(set(DEFAULT_TAGS) | {"rcp-plugins"}), license=license, model_name=model_name,
        **({"base_model_relation": "adapter"} if hub_base else {}),
        rcp_llava={"version": RCP_LLAVA_VERSION, "plugins_only": True,
                   **({"base_model_path": str(base_model)} if local_base else {}),
                   "budgets": {str(budget): subfolder for budget, subfolder, _ in sets}},
    )
    base_text = (f"[{base_model}](https://huggingface.co/{base_model})" if hub_base else
                 f"the local LLaVA checkpoint `{base_model}`" if base_model else "a LLaVA base model that was not recorded")
    content = f"""---
{data.to_yaml()}
---

# {model_name}

RCP plug-ins (pruners + repair adapters) for {base_text}, one set per visual-token budget, made with
[rcp-llava]({GITHUB_URL}) {RCP_LLAVA_VERSION}. Each set was trained for its own budget (the paper's protocol: the
pruners' placement and target differ by budget) and lives in its own folder, with its own README.md (pruning
configuration, results beside the full model and the training-free prior, training settings). The base model's
weights are not included.

| budget | folder | visual tokens / layer | dataset | metric | value |
|---|---|---|---|---|---|
{chr(10).join(rows)}

*visual tokens / layer*: the mean kept over all decoder layers (the paper's budget definition), as measured.

## Usage

Load a set with its folder as `subfolder`:

```python
{usage_snippet(repo_id, plugins_only=True, base_model=base_model, subfolder=sets[0][1])}```
"""
    return ModelCard(content)


# ------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached (offline mode, no network)."""


def _is_unreachable(err):
    """Whether `err` says the Hub did not answer at all (no network, DNS, timeout), as opposed to an HTTP answer.

    requests' connection errors derive from OSError / ConnectionError; httpx's (huggingface_hub >= 1.0 uses httpx,
    or a fork of it such as `httpx2`) derive from neither, only from `httpx.TransportError`. httpx is not imported by
    name (which package, if any, depends on the huggingface_hub version): its transport errors are recognised by
    class name and module in the exception's class hierarchy.
    """
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):  # the Hub answered (auth, permissions...): its message is the clear one
        return False
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # a local file the upload could not read: not the network
    if isinstance(err, (OSError, ConnectionError)):
        return True
    return any(cls.__name__ == "TransportError" and cls.__module__.split(".")[0].startswith("httpx")
               for cls in type(err).__mro__)


def _check_folder(folder, plugins_only):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model first (`save_pretrained` / `save_plugins`).")
    needed = PLUGIN_FILES if plugins_only else FULL_MODEL_FILES
    missing = [name for name in needed if not (folder / name).is_file()]
    # rcp_plugins.safetensors holds the plug-ins alone, not the model's weights.
    weights = [p for p in folder.glob("*.safetensors") if p.name != RCP_PLUGINS_NAME]
    if not plugins_only and not weights and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    if missing:
        how = "model.save_plugins(folder)" if plugins_only else "model.save_pretrained(folder)"
        plugin_folder = not plugins_only and (folder / RCP_PLUGINS_NAME).is_file()
        raise FileNotFoundError(
            f"{folder} lacks {missing}: write it with `{how}` before pushing"
            + (f", or, as it holds {RCP_PLUGINS_NAME} (the plug-ins alone), push it as a plug-in folder with "
               f"`push_rcp_folder({str(folder)!r}, repo_id, plugins_only=True)`." if plugin_folder else ".")
        )
    if plugins_only:
        return folder
    # The card's usage snippet runs `AutoProcessor.from_pretrained(model_id, trust_remote_code=True)` on this repo.
    if not all(any((folder / name).is_file() for name in group) for group in PROCESSOR_FILES):
        raise FileNotFoundError(
            f"{folder} has no processor files (one of {list(PROCESSOR_FILES[0])} and one of "
            f"{list(PROCESSOR_FILES[1])}), but the model card's usage snippet loads the processor from the repo: "
            "write them with `processor.save_pretrained(folder)` before pushing."
        )
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): write the folder with "
                         "`RcpLlavaForConditionalGeneration.save_pretrained(folder)` before pushing.") from None
    # Without auto_map, `from_pretrained(..., trust_remote_code=True)` finds no remote code for the two .py files.
    if not isinstance(config, dict) or not config.get("auto_map"):
        raise ValueError(
            f"{config_path} has no `auto_map`, so `from_pretrained(model_id, trust_remote_code=True)` (the card's "
            "usage snippet) cannot load the remote code: write the folder with "
            "`RcpLlavaForConditionalGeneration.save_pretrained(folder)`, which adds it, before pushing."
        )
    return folder


# Files of a Trainer's state, never part of a pushed model (the Trainer's push ignores checkpoint-* as well).
TRAINING_STATE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "tmp-checkpoint-*", "tmp-checkpoint-*/**", "optimizer.pt",
                           "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin")
# `save_pretrained`'s weights (no variant): what a full push replaces on the repo.
MODEL_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def _target_repo(api, repo_id, token, private, revision, card):
    """Create `repo_id` if needed and return the id it resolves to ("name" -> "user/name"), `card` rewritten for it
    where it differs; create the branch `revision` (not a PR ref) as transformers' `push_to_hub` does: an upload to a
    branch that does not exist yet fails."""
    created = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    resolved = getattr(created, "repo_id", None) or repo_id
    if resolved != repo_id and card is not None:
        card(resolved)
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(resolved, branch=revision, token=token, exist_ok=True, repo_type="model")
    return resolved


def push_rcp_folder(folder, repo_id, plugins_only=False, token=None, private=None, commit_message=None,
                    revision=None, api=None, card=None, path_in_repo=None):
    """Upload a saved RCP folder to the Hub repo `repo_id` (created if needed) and return the commit info.

    `repo_id` may be a bare name, as transformers' `hub_model_id`: the upload goes to the repo `create_repo`
    resolves it to (`user/name`; it went to the bare name). `card(repo_id)`, if given, writes the folder's README.md
    for a repo id: first for `repo_id` (so that a folder left by a failed push is complete), then again for the
    resolved one where it differs (the card's usage snippet and model-index name the repo that holds it).

    With `plugins_only=True` only `rcp_config.json`, `rcp_plugins.safetensors` and `README.md` are uploaded (a
    plug-in-only folder written by `model.save_plugins`); otherwise the whole folder (`save_pretrained` output:
    weights, config with `auto_map`, the two remote-code files, processor files, README.md). The folder is checked
    before anything is sent. Offline (`HF_HUB_OFFLINE=1`) or unreachable Hub -> `HubUnreachableError`.
    `api` is an `HfApi` (default: a new one; tests pass a fake). `path_in_repo`: the repo's folder to upload into
    (default its root), e.g. one plug-in set per budget beside the others (`build_budgets_card`); only plug-in folders
    go into one (the card of a full model loads it from the repo's root).
    """
    from huggingface_hub import HfApi, constants

    if path_in_repo is not None:
        check_subfolder(path_in_repo, "path_in_repo")
        if not plugins_only:
            raise ValueError(f"`path_in_repo={path_in_repo!r}` uploads into a folder of the repo, which only plug-in "
                             "sets do (`from_base(..., subfolder=...)`): pass `plugins_only=True`, or push the full "
                             "model to the root of a repo of its own.")
    if card is not None:
        card(repo_id)
    folder = _check_folder(folder, plugins_only)
    again = (f"`push_rcp_folder({str(folder)!r}, {repo_id!r}{', plugins_only=True' if plugins_only else ''}"
             f"{f', path_in_repo={path_in_repo!r}' if path_in_repo else ''})` or `hf upload {repo_id} {folder}"
             f"{f' {path_in_repo}' if path_in_repo else ''}`")
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(
            f"Cannot push {folder} to the Hub repo {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). The folder is "
            f"complete; push it later with {again}."
        )
    api = api or HfApi(token=token)
    allow = [*PLUGIN_FILES, MODEL_CARD_NAME] if plugins_only else None
    message = commit_message or f"Upload RCP-LLaVA {'plug-ins' if plugins_only else 'model'} (rcp-llava {RCP_LLAVA_VERSION})"
    try:
        repo_id = _target_repo(api, repo_id, token, private, revision, card)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), token=token, commit_message=message, allow_patterns=allow,
            revision=revision, repo_type="model", path_in_repo=path_in_repo,
            # staging left by a killed save or atomic write: partial files, never part of the model; and a Trainer's
            # state in a folder that is also its output_dir (optimizer, RNG, checkpoint-N: the Trainer's own push
            # leaves checkpoints out too; training_args.bin is a pickle)
            ignore_patterns=[".rcp-save-*", ".rcp-save-*/**", "*.tmp-*", *TRAINING_STATE_PATTERNS],
            # the repo's earlier weights of the name this save writes (other shards, an index): left there, a
            # sharded push over a single file loaded the old weights, where `save_pretrained` removes them locally
            delete_patterns=None if plugins_only else list(MODEL_WEIGHT_PATTERNS),
        )
    except Exception as err:
        if isinstance(err, HubUnreachableError) or not _is_unreachable(err):
            raise
        raise HubUnreachableError(
            f"Cannot reach the Hub to push {folder} to {repo_id!r} ({type(err).__name__}: {err}). The folder is "
            f"complete; push it again once online with {again}."
        ) from err


def push_model_card(path, repo_id, token=None, private=None, commit_message=None, revision=None, api=None, card=None):
    """Upload the card file `path` as the README.md of the Hub repo `repo_id` (created if needed) and return the
    commit info: the root card of a repo of plug-in sets (`build_budgets_card`). `card(repo_id)`, if given, writes
    `path` for a repo id, first for `repo_id`, then for the one `create_repo` resolves it to where they differ, as in
    `push_rcp_folder`. Offline or unreachable Hub -> `HubUnreachableError`, naming the call that uploads it later."""
    from huggingface_hub import HfApi, constants

    if card is not None:
        card(repo_id)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No card file {str(path)!r} to push: write it first (`card.save(path)`).")
    again = f"`push_model_card({str(path)!r}, {repo_id!r})` or `hf upload {repo_id} {path} {MODEL_CARD_NAME}`"
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(f"Cannot push the card {str(path)!r} to the Hub repo {repo_id!r}: offline mode is "
                                  f"on (HF_HUB_OFFLINE=1). Push it later with {again}.")
    api = api or HfApi(token=token)
    try:
        repo_id = _target_repo(api, repo_id, token, private, revision, card)
        return api.upload_file(path_or_fileobj=str(path), path_in_repo=MODEL_CARD_NAME, repo_id=repo_id, token=token,
                               commit_message=commit_message or f"Update the model card (rcp-llava {RCP_LLAVA_VERSION})",
                               revision=revision, repo_type="model")
    except Exception as err:
        if isinstance(err, HubUnreachableError) or not _is_unreachable(err):
            raise
        raise HubUnreachableError(f"Cannot reach the Hub to push the card {str(path)!r} to {repo_id!r} "
                                  f"({type(err).__name__}: {err}). Push it again once online with {again}.") from err


__all__ = [
    "HubUnreachableError",
    "base_model_license",
    "build_budgets_card",
    "build_model_card",
    "check_subfolder",
    "load_eval_results",
    "push_model_card",
    "push_rcp_folder",
    "usage_snippet",
]

