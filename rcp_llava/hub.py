"""Sharing RCP-LLaVA models on the Hugging Face Hub: model cards and uploads.

- `build_model_card(...)` writes the README.md of a saved folder with `huggingface_hub`'s `ModelCard` /
  `ModelCardData`: base model, `library_name: transformers`, `pipeline_tag: image-text-to-text`, tags, the
  pruning configuration, the average kept visual tokens, the evaluation table (model-index) and a usage snippet.
- `push_rcp_folder(folder, repo_id, plugins_only=...)` uploads a full model folder (`save_pretrained`) or a
  plug-in-only folder (`save_plugins`) with `huggingface_hub`, and fails with a clear message when offline.
- The tiny demo model lives in `rcp_llava.demo` (it imports this module for its model card; this module does not
  import it).

Nothing here is a Hub file: the remote-code pair (`configuration_rcp_llava.py`, `modeling_rcp_llava.py`) never
imports this module.
"""

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from modeling_rcp_llava import PRUNING_FIELDS, RCP_CONFIG_NAME, RCP_LLAVA_VERSION, RCP_PLUGINS_NAME


logger = logging.get_logger(__name__)

MODEL_CARD_NAME = "README.md"
DEFAULT_TAGS = ("rcp-llava", "llava", "visual-token-pruning", "token-pruning", "image-text-to-text")
# What each kind of folder holds (besides README.md); `push_rcp_folder` refuses a folder that lacks one.
FULL_MODEL_FILES = ("config.json", "configuration_rcp_llava.py", "modeling_rcp_llava.py")
PLUGIN_FILES = (RCP_CONFIG_NAME, RCP_PLUGINS_NAME)
GITHUB_URL = "https://github.com/rcp-llava/rcp-llava"


# ------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------


def load_eval_results(eval_results):
    """Evaluation results as a list of dicts `{dataset, metric, value, [dataset_type, split, kept_tokens]}`.

    `eval_results` is a path to a JSON file, or its content. Accepted shapes:
      - `{"results": [entry, ...], "average_kept_tokens": 64.0}` or a bare list of entries, an entry being
        `{"dataset": "VQAv2", "metric": "accuracy", "value": 75.6, "dataset_type": ..., "split": ...}`;
      - `{"VQAv2": {"accuracy": 75.6}, "POPE": {"f1": 85.1}}` (dataset -> metric -> value);
      - the testbed's `evaluate_accuracy` output `{"overall": 0.91, "n": ..., "kept_visual_tokens": ...}`;
      - `train_rcp.py`'s metrics.json (`{"full": {"accuracy": ...}, "rcp": {"accuracy": ...,
        "avg_visual_tokens_per_layer": ...}, ...}`): RCP's and the full model's accuracy.
    Returns `(entries, average_kept_tokens or None)`.
    """
    if eval_results is None:
        return [], None
    if isinstance(eval_results, (str, os.PathLike)):
        eval_results = json.loads(Path(eval_results).read_text(encoding="utf-8"))
    kept = None
    if isinstance(eval_results, dict):
        for key in ("average_kept_tokens", "kept_visual_tokens", "avg_kept_tokens"):
            if isinstance(eval_results.get(key), (int, float)):
                kept = float(eval_results[key])
        if "results" in eval_results:
            entries = list(eval_results["results"])
        elif isinstance(eval_results.get("rcp"), dict) and "accuracy" in eval_results["rcp"]:
            # train_rcp.py's metrics.json: one result dict per method ("full", "rcp", baselines...).
            dataset = eval_results.get("dataset", "rcp-llava testbed")
            entries = [{"dataset": dataset, "metric": "accuracy", "value": eval_results["rcp"]["accuracy"],
                        "metric_name": "accuracy (RCP)"}]
            if isinstance(eval_results.get("full"), dict) and "accuracy" in eval_results["full"]:
                entries.append({"dataset": dataset, "metric": "accuracy", "value": eval_results["full"]["accuracy"],
                                "metric_name": "accuracy (all visual tokens, plug-ins off)"})
            if isinstance(eval_results["rcp"].get("avg_visual_tokens_per_layer"), (int, float)):
                kept = float(eval_results["rcp"]["avg_visual_tokens_per_layer"])
        elif "overall" in eval_results and isinstance(eval_results["overall"], (int, float)):
            entries = [{"dataset": eval_results.get("dataset", "rcp-llava testbed"), "metric": "accuracy",
                        "value": eval_results["overall"]}]
        else:
            entries = [
                {"dataset": name, "metric": metric, "value": value}
                for name, metrics in eval_results.items() if isinstance(metrics, dict)
                for metric, value in metrics.items() if isinstance(value, (int, float))
            ]
    else:
        entries = list(eval_results)
    for e in entries:
        missing = [k for k in ("dataset", "metric", "value") if k not in e]
        if missing:
            raise ValueError(f"Evaluation entry {e} lacks {missing}; see `load_eval_results` for the format.")
    return entries, kept


def _pruning_table(config):
    rows = [("pruning_method", config.pruning_method)]
    rows += [(name, getattr(config, name)) for name in PRUNING_FIELDS if name != "pruning_method"]
    rows.append(("visual tokens per image", config.num_visual_tokens))
    rows.append(("decoder layers", config.text_config.num_hidden_layers))
    return "\n".join(["| field | value |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in rows])


def _results_table(entries):
    if not entries:
        return "No evaluation results were recorded for this checkpoint."
    lines = ["| dataset | split | metric | value | kept visual tokens |", "|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['dataset']} | {e.get('split', '')} | {e['metric']} | {e['value']} | "
                     f"{e.get('kept_tokens', '')} |")
    return "\n".join(lines)


def usage_snippet(repo_id, plugins_only=False, base_model=None):
    """Python code that loads and runs the checkpoint (a full folder via remote code, or plug-ins on their base)."""
    if plugins_only:
        return (
            "# pip install rcp-llava\n"
            "from PIL import Image\n"
            "from transformers import AutoProcessor\n"
            "from rcp_llava import RcpLlavaForConditionalGeneration\n\n"
            f"base_id = {base_model!r}\n"
            f"model = RcpLlavaForConditionalGeneration.from_base(base_id, plugins={repo_id!r})\n"
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
    "print(model.last_pruning_info.kept_counts)  # visual tokens kept after each pruning layer\n"
)


def build_model_card(config, repo_id, base_model=None, plugins_only=False, eval_results=None,
                     average_kept_tokens=None, training_args=None, tags=(), model_name=None, license=None):
    """A `huggingface_hub.ModelCard` for an RCP checkpoint.

    Args:
        config: the `RcpLlavaConfig` of the checkpoint (or a model, whose `.config` is used).
        repo_id: the Hub repo id (or local folder) the usage snippet loads.
        base_model: the stock LLaVA checkpoint it was built on (card metadata `base_model`).
        plugins_only: the card of a plug-in-only folder (snippet uses `from_base`).
        eval_results: evaluation JSON path or content (see `load_eval_results`) -> model-index + results table.
        average_kept_tokens: average visual tokens kept per decoder layer; defaults to the evaluation JSON's, then
            to the one implied by `pruning_keep_counts`, then to `visual_token_budget`.
        training_args: dict of training settings (e.g. `TrainingArguments.to_dict()` restricted to what matters).
    """
    config = getattr(config, "config", config)
    entries, eval_kept = load_eval_results(eval_results)
    kept = average_kept_tokens if average_kept_tokens is not None else eval_kept
    if kept is None:
        kept = config.pruned_average_tokens()
    if kept is None:
        kept = config.visual_token_budget
    model_name = model_name or str(repo_id).rstrip("/").split("/")[-1]
    results = [
        EvalResult(
            task_type="image-text-to-text", dataset_type=e.get("dataset_type", e["dataset"]),
            dataset_name=e["dataset"], metric_type=e["metric"], metric_value=e["value"],
            dataset_split=e.get("split"), metric_name=e.get("metric_name", e["metric"]),
        )
        for e in entries
    ]
    data = ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="image-text-to-text",
        tags=sorted(set(DEFAULT_TAGS) | set(tags) | ({"rcp-plugins"} if plugins_only else set())), license=license,
        model_name=model_name, eval_results=results or None,
        rcp_llava={
            "version": RCP_LLAVA_VERSION, "plugins_only": plugins_only,
            "average_kept_visual_tokens": kept, "visual_tokens_per_image": config.num_visual_tokens,
            **{name: getattr(config, name) for name in PRUNING_FIELDS},
        },
    )
    what = (
        f"RCP plug-ins (pruners + repair adapters) for [{base_model}](https://huggingface.co/{base_model})"
        if plugins_only else f"A LLaVA model with RCP visual-token pruning{f' built on `{base_model}`' if base_model else ''}"
    )
    files = (
        f"`{RCP_CONFIG_NAME}` (pruning configuration, base model, library version) and `{RCP_PLUGINS_NAME}` "
        "(plug-in weights only); the base model's weights are not included."
        if plugins_only else
        "`config.json` (with `auto_map`), `model.safetensors`, `configuration_rcp_llava.py` and "
        "`modeling_rcp_llava.py` (remote code: standard library, torch and transformers only), and the processor "
        "files."
    )
    kept_text = f"{kept:.1f}" if isinstance(kept, (int, float)) else "adaptive (not recorded)"
    training = (
        "\n".join(f"- `{k}`: {v}" for k, v in sorted(training_args.items()))
        if training_args else "No training settings were recorded."
    )
    content = f"""---
{data.to_yaml()}
---

# {model_name}

{what}, made with [rcp-llava]({GITHUB_URL}) {RCP_LLAVA_VERSION}. The Representation Consistency Pruner drops
visual tokens *inside* the decoder: learned pruners remove tokens before the pruning layers (later layers
compute on, and cache, only the kept tokens) and delayed repair adapters correct the answer positions.

**Average kept visual tokens per decoder layer:** {kept_text} (of {config.num_visual_tokens} per image).

## Files

{files}

## Usage

```python
{usage_snippet(repo_id, plugins_only=plugins_only, base_model=base_model)}```

## Pruning configuration

{_pruning_table(config)}

## Evaluation

{_results_table(entries)}

## Training

{training}
"""
    return ModelCard(content)


# ------------------------------------------------------------------------------------------------
# Push
# ------------------------------------------------------------------------------------------------


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached (offline mode, no network)."""


def _check_folder(folder, plugins_only):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model first (`save_pretrained` / `save_plugins`).")
    needed = PLUGIN_FILES if plugins_only else FULL_MODEL_FILES
    missing = [name for name in needed if not (folder / name).is_file()]
    if not plugins_only and not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    if missing:
        how = "model.save_plugins(folder)" if plugins_only else "model.save_pretrained(folder)"
        raise FileNotFoundError(f"{folder} lacks {missing}: write it with `{how}` before pushing.")
    return folder


def push_rcp_folder(folder, repo_id, plugins_only=False, token=None, private=None, commit_message=None,
                    revision=None, api=None):
    """Upload a saved RCP folder to the Hub repo `repo_id` (created if needed) and return the commit info.

    With `plugins_only=True` only `rcp_config.json`, `rcp_plugins.safetensors` and `README.md` are uploaded (a
    plug-in-only folder written by `model.save_plugins`); otherwise the whole folder (`save_pretrained` output:
    weights, config with `auto_map`, the two remote-code files, processor files, README.md). The folder is checked
    before anything is sent. Offline (`HF_HUB_OFFLINE=1`) or unreachable Hub -> `HubUnreachableError`.
    `api` is an `HfApi` (default: a new one; tests pass a fake).
    """
    from huggingface_hub import HfApi, constants

    folder = _check_folder(folder, plugins_only)
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(
            f"Cannot push {folder} to the Hub repo {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1). The folder is "
            f"complete; push it later with `push_rcp_folder({str(folder)!r}, {repo_id!r}"
            f"{', plugins_only=True' if plugins_only else ''})` or `hf upload {repo_id} {folder}`."
        )
    api = api or HfApi(token=token)
    allow = [*PLUGIN_FILES, MODEL_CARD_NAME] if plugins_only else None
    message = commit_message or f"Upload RCP-LLaVA {'plug-ins' if plugins_only else 'model'} (rcp-llava {RCP_LLAVA_VERSION})"
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), token=token, commit_message=message, allow_patterns=allow,
            revision=revision, repo_type="model",
        )
    except (OSError, ConnectionError) as err:  # requests/httpx connection errors derive from these
        if isinstance(err, HubUnreachableError):
            raise
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(err, HfHubHTTPError):  # the Hub answered (auth, permissions...): its message is the clear one
            raise
        raise HubUnreachableError(
            f"Cannot reach the Hub to push {folder} to {repo_id!r} ({type(err).__name__}: {err}). The folder is "
            "complete; push it again once online."
        ) from err


__all__ = [
    "HubUnreachableError",
    "build_model_card",
    "load_eval_results",
    "push_rcp_folder",
    "usage_snippet",
]

