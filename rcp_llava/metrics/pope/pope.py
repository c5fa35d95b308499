# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""POPE object-hallucination metrics as an `evaluate` module.

Answer parsing follows the official POPE ``evaluate.py`` (also LLaVA's ``eval_pope.py``).
Self-contained: loaded by path with ``evaluate.load``.
"""

from typing import Dict, List, Optional

import datasets
import evaluate


_CITATION = """\
@inproceedings{li2023evaluating,
  title={Evaluating Object Hallucination in Large Vision-Language Models},
  author={Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
  booktitle={EMNLP},
  year={2023}
}
"""

_DESCRIPTION = """\
POPE (Polling-based Object Probing Evaluation) binary metrics with "yes" as the positive
class: accuracy, precision, recall, F1 and the yes-ratio (fraction of predictions parsed
as "yes"). A free-form prediction is parsed as in the official POPE script: keep the text
before the first period, delete commas, split on spaces; the answer is "no" when one of
the words is "No", "no" or "not", otherwise "yes".
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): free-form model answers.
    references (`list` of `str`): gold labels, "yes" or "no" (case-insensitive).
    categories (`list` of `str`, *optional*): a split name per question (random /
        popular / adversarial); when given, the same metrics are also returned per split
        under `per_category`.
Returns:
    accuracy, precision, recall, f1, yes_ratio (`float`, in [0, 1]); tp, fp, tn, fn (`int`);
    per_category (`dict`), only when `categories` is given.
Examples:
    >>> metric = rcp_llava.metrics.load_metric("pope")
    >>> metric.compute(predictions=["Yes, there is.", "There is no dog."], references=["yes", "no"])["accuracy"]
    1.0
"""


def parse_pope_answer(text: str) -> str:
    """Official POPE parsing of a free-form answer into "yes" / "no"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


def _label(ref: str) -> str:
    label = ref.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"pope: reference labels must be 'yes' or 'no', got {ref!r}")
    return label


def pope_scores(pred_labels: List[str], gold_labels: List[str]) -> Dict[str, float]:
    """Confusion counts and metrics for parsed predictions vs gold labels ("yes" = positive)."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred_labels, gold_labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred_labels, gold_labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred_labels, gold_labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred_labels, gold_labels))
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total if total else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pope(evaluate.Metric):
    """POPE accuracy / precision / recall / F1 / yes-ratio."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/AoiDragon/POPE"],
        )

    def _compute(self, predictions: List[str], references: List[str], categories: Optional[List[str]] = None):
        if not predictions:  # an evaluation that filtered out every question has no score, not 0
            raise ValueError("pope: no predictions to score; give at least one question.")
        preds = [parse_pope_answer(p) for p in predictions]
        golds = [_label(r) for r in references]
        result = pope_scores(preds, golds)
        if categories is not None:
            if len(categories) != len(preds):
                raise ValueError(
                    f"pope: got {len(categories)} categories for {len(preds)} predictions; give one per question."
                )
            per_category = {}
            for cat in sorted(set(categories)):
                idx = [i for i, c in enumerate(categories) if c == cat]
                per_category[cat] = pope_scores([preds[i] for i in idx], [golds[i] for i in idx])
            result["per_category"] = per_category
        return result
