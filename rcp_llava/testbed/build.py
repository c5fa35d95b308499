"""`build_testbed`: dataset + trained model + metrics in one folder, reusing whatever is already built."""

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from datasets import DatasetDict, load_from_disk
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging

from modeling_rcp_llava import atomic_write, write_text

from .data import build_dataset
from .evaluate import evaluate_accuracy, oracle_keep, random_keep, saliency_keep
from .presets import BUDGET_FRACTIONS, default_cache_dir, get_preset
from .scenes import COLOURS, COUNT_WORDS, QUADRANTS, SHAPES, SIZES
from .train import RECIPE_FILE, STAGES, recipe_chain, saved_recipe_diff, train_testbed_model


logger = logging.get_logger(__name__)

# Uniform chance of each family (attribute mixes colour and size questions 70/30 -> 1/10 over its answers).
CHANCE = {"attribute": 1 / (len(COLOURS) + len(SIZES)), "identity": 1 / len(SHAPES), "existence": 0.5,
          "counting": 1 / len(COUNT_WORDS), "position": 1 / len(QUADRANTS)}
PRUNERS = {"random": random_keep, "oracle": oracle_keep, "saliency": saliency_keep}


def pruning_table(model, processor, dataset, batch_size=64, max_samples=None, fractions=None) -> dict:
    """`{pruner: {budget: accuracy dict}}` for the random / oracle / saliency keep functions."""
    fractions = fractions or BUDGET_FRACTIONS
    table = {}
    for name, make in PRUNERS.items():
        table[name] = {}
        for label, fraction in fractions.items():
            t0 = time.time()
            acc = evaluate_accuracy(model, processor, dataset, batch_size=batch_size, keep_fn=make(fraction),
                                    max_samples=max_samples)
            table[name][label] = acc
            logger.warning(f"[testbed] pruning {name:8s} {label}: {acc['overall']:.3f} "
                           f"({acc['kept_visual_tokens']:.0f} tokens, {time.time() - t0:.0f}s)")
    return table


def build_testbed(preset="tiny", output_dir=None, seed: int = 0, pruning_eval: bool = True,
                  eval_max_samples=None, save_steps: int = 200, command=None) -> Path:
    r"""
    Build (or reuse) the testbed of `preset` in `output_dir` (default `default_cache_dir(preset)`):

    - `dataset/`: `DatasetDict.save_to_disk` with train / validation / test splits (images included);
    - `model/`: a llava-hf style folder (stock `LlavaForConditionalGeneration` + `AutoProcessor` load it);
    - `metrics.json`: test accuracy overall and per family, the pruning table, build times, the command;
    - `work/`: per-stage Trainer checkpoints (resumed after an interruption).

    Every part is skipped when it already exists; delete it to rebuild. Returns `output_dir`.
    """
    torch.manual_seed(seed)
    preset = get_preset(preset)
    out = Path(output_dir) if output_dir is not None else default_cache_dir(preset)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}

    t0 = time.time()
    data_dir = out / "dataset"
    if not (data_dir / "dataset_dict.json").exists():
        logger.warning(f"[testbed] generating the {preset.name} dataset in {data_dir}")
        build_dataset(preset, seed).save_to_disk(str(data_dir))
        times["dataset_s"] = round(time.time() - t0, 1)
    dataset = load_from_disk(str(data_dir))

    t0 = time.time()
    model_dir = out / "model"
    last_recipe = out / "work" / STAGES[-1] / RECIPE_FILE
    if (model_dir / "config.json").exists():
        diff = saved_recipe_diff(last_recipe, recipe_chain(preset, seed))
        if diff:
            raise ValueError(f"The model in {out} was built with another {preset.name!r} recipe than this "
                             f"version's (differs in {', '.join(diff)}); build into another `output_dir`, or "
                             f"delete {out} to rebuild it.")
        if diff is None:
            logger.warning(f"[testbed] {model_dir} was built before recipes were recorded ({last_recipe} is "
                           f"missing): reused unchecked")
    if not (model_dir / "config.json").exists():
        final = train_testbed_model(preset, out / "work", seed=seed, save_steps=save_steps)
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        tmp.rename(model_dir)
        times["training_s"] = round(time.time() - t0, 1)

    need_eval = "test" not in metrics or (pruning_eval and "pruning" not in metrics)
    if need_eval:
        t0 = time.time()
        model = LlavaForConditionalGeneration.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir)
        batch = preset.eval_batch_size
        if "test" not in metrics:
            metrics["test"] = evaluate_accuracy(model, processor, dataset["test"], batch_size=batch,
                                                max_samples=eval_max_samples)
            metrics["validation"] = evaluate_accuracy(model, processor, dataset["validation"], batch_size=batch,
                                                      max_samples=eval_max_samples)
            logger.warning(f"[testbed] test accuracy {metrics['test']['overall']:.3f} "
                           f"{metrics['test']['families']}")
        if pruning_eval and "pruning" not in metrics:
            metrics["pruning"] = pruning_table(model, processor, dataset["test"], batch_size=batch,
                                               max_samples=eval_max_samples)
        times["evaluation_s"] = round(time.time() - t0, 1)

    metrics.update({
        "preset": preset.name, "seed": seed, "num_visual_tokens": preset.num_visual_tokens,
        "budgets": {label: preset.budget(f) for label, f in BUDGET_FRACTIONS.items()},
        "chance": CHANCE,
    })
    caller = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    built = any(key != "evaluation_s" for key in times)
    if built or "command" not in metrics:  # the command that built something, not one that reused or evaluated it
        metrics["command"] = caller
    elif times:  # only evaluations were added (e.g. the pruning table by the first `train_rcp.py`)
        metrics["evaluated_by"] = caller
    metrics.setdefault("build_times", {}).update(times)
    # Atomic: two processes may finish an evaluation of the same cached testbed at once.
    atomic_write(metrics_path, lambda tmp: write_text(tmp, json.dumps(metrics, indent=2, sort_keys=True)))
    return out


def load_testbed(output_dir):
    """`(model, processor, dataset)` of a built testbed folder, with stock classes."""
    out = Path(output_dir)
    model = LlavaForConditionalGeneration.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    dataset: DatasetDict = load_from_disk(str(out / "dataset"))
    return model, processor, dataset
