# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""Benchmark metrics shipped as local `evaluate` modules.

Each metric lives in ``rcp_llava/metrics/<name>/<name>.py`` (an ``evaluate.Metric``
subclass) and is loaded by path, so no Hub access is needed::

    from rcp_llava.metrics import load_metric
    vqa = load_metric("vqa_accuracy")
    vqa.compute(predictions=["two"], references=[["2"] * 10])  # {'vqa_accuracy': 1.0}

Metrics: ``vqa_accuracy`` (VQAv2 / VizWiz), ``exact_match`` (GQA, multiple choice),
``pope`` (POPE) and ``mme`` (MME).
"""

from pathlib import Path
from typing import List

METRICS_DIR = Path(__file__).resolve().parent

METRIC_NAMES: List[str] = ["vqa_accuracy", "exact_match", "pope", "mme"]


def metric_path(name: str) -> str:
    """Folder of the shipped `evaluate` module ``name`` (what ``evaluate.load`` is given)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; available metrics: {', '.join(METRIC_NAMES)}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """Load a shipped metric by name with ``evaluate.load(<its folder>, **kwargs)``.

    Works offline: the module is read from this package, never from the Hub.
    """
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRIC_NAMES", "METRICS_DIR", "load_metric", "metric_path"]
