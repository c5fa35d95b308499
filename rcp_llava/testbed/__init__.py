"""A procedurally generated VQA task and a small stock LLaVA trained on it from scratch.

Pruning methods can only be judged on a model that actually sees; no weights or datasets can be downloaded, so
the testbed builds its own: scenes of 6-8 coloured shapes, five question families with one-word answers, the
evidence patches of every answer, and a LLaVA (CLIP tower + projector + Llama) trained on them.

    from rcp_llava.testbed import build_testbed, load_testbed, evaluate_accuracy, oracle_keep
    out = build_testbed("tiny")                       # ~/.cache/rcp_llava/testbed/tiny, reused once built
    model, processor, dataset = load_testbed(out)
    evaluate_accuracy(model, processor, dataset["test"], keep_fn=oracle_keep(1 / 9))
"""

from .build import build_testbed, load_testbed, pruning_table
from .data import FEATURES, build_dataset
from .evaluate import (
    evaluate_accuracy,
    oracle_keep,
    patch_saliency,
    predict,
    pruned_inputs,
    random_keep,
    saliency_keep,
)
from .presets import BUDGET_FRACTIONS, MAIN_PRESET, PRESETS, StageSpec, TestbedPreset, default_cache_dir, get_preset
from .scenes import FAMILIES, NEGATIVE_TYPES, Scene, SceneObject, generate_scene, make_question, make_sample
from .text import CHAT_TEMPLATE, build_model_config, build_processor, build_tokenizer, prompt_messages
from .train import STAGES, train_testbed_model


__all__ = [
    "BUDGET_FRACTIONS", "CHAT_TEMPLATE", "FAMILIES", "FEATURES", "MAIN_PRESET", "NEGATIVE_TYPES", "PRESETS", "STAGES",
    "Scene",
    "SceneObject", "StageSpec", "TestbedPreset", "build_dataset", "build_model_config", "build_processor",
    "build_testbed", "build_tokenizer", "default_cache_dir", "evaluate_accuracy", "generate_scene", "get_preset",
    "load_testbed", "make_question", "make_sample", "oracle_keep", "patch_saliency", "predict", "prompt_messages",
    "pruned_inputs", "pruning_table", "random_keep", "saliency_keep", "train_testbed_model",
]
