# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""MME perception / cognition scores as an `evaluate` module.

Follows the official MME ``eval_tool/calculation.py``: answer parsing, per sub-task
accuracy and accuracy+ and score = (acc + acc+) x 100, with the official perception and
cognition sub-task lists. Self-contained: loaded by path with ``evaluate.load``.
"""

from collections import OrderedDict
from typing import Dict, List

import datasets
import evaluate
from transformers.utils import logging


logger = logging.get_logger(__name__)

_CITATION = """\
@article{fu2023mme,
  title={{MME}: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models},
  author={Fu, Chaoyou and Chen, Peixian and Shen, Yunhang and Qin, Yulei and Zhang, Mengdan and Lin, Xu and Yang, Jinrui and Zheng, Xiawu and Li, Ke and Sun, Xing and Wu, Yunsheng and Ji, Rongrong},
  journal={arXiv preprint arXiv:2306.13394},
  year={2023}
}
"""

_DESCRIPTION = """\
MME scores. Every image of a sub-task carries two yes/no questions. Per sub-task:
accuracy (over questions), accuracy+ (fraction of images whose questions are all
answered correctly) and score = (accuracy + accuracy+) x 100 (max 200). The perception
score sums the 10 perception sub-tasks (max 2000), the cognition score the 4 cognition
sub-tasks (max 800). Predictions are parsed as in the official tool: lower-cased; "yes"
or "no" as is, else "yes" if the first 4 characters contain "yes", else "no" if they
contain "no", else "other" (always wrong).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model answers.
    references (`list` of `str`): gold answers, "yes" or "no" (case-insensitive).
    subtasks (`list` of `str`): the sub-task of each question (the MME folder name, e.g.
        "existence", "OCR", "code_reasoning"; matched case-insensitively).
    image_ids (`list` of `str`): the image of each question (questions of one image are
        grouped for accuracy+).
Returns:
    perception_score, cognition_score, total_score (`float`) and `subtasks`: a dict
    sub-task -> {accuracy, accuracy_plus, score, num_questions, num_images}. Sub-tasks
    outside the official lists are scored but not added to the totals.
Examples:
    >>> metric = rcp_llava.metrics.load_metric("mme")
    >>> metric.compute(predictions=["Yes", "No"], references=["Yes", "No"],
    ...                subtasks=["color", "color"], image_ids=["000.jpg", "000.jpg"])["perception_score"]
    200.0
"""

PERCEPTION_SUBTASKS = [
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
]
COGNITION_SUBTASKS = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
_CANONICAL = {name.lower(): name for name in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS}


def parse_mme_answer(pred: str) -> str:
    """Official MME parsing of a model answer into "yes" / "no" / "other"."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _gold(ref: str) -> str:
    label = ref.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"mme: reference answers must be 'yes' or 'no', got {ref!r}")
    return label


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mme(evaluate.Metric):
    """MME per sub-task accuracy / accuracy+ and perception / cognition totals."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "subtasks": datasets.Value("string"),
                    "image_ids": datasets.Value("string"),
                }
            ),
            reference_urls=[
                "https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation",
            ],
        )

    def _compute(self, predictions: List[str], references: List[str], subtasks: List[str], image_ids: List[str]):
        if not predictions:  # an evaluation that filtered out every question has no score, not 0
            raise ValueError("mme: no predictions to score; give at least one question.")
        # subtask -> image -> list of per-question correctness
        groups: Dict[str, "OrderedDict[str, List[bool]]"] = OrderedDict()
        for pred, ref, task, image in zip(predictions, references, subtasks, image_ids):
            task = _CANONICAL.get(task.lower(), task)
            correct = parse_mme_answer(pred) == _gold(ref)
            groups.setdefault(task, OrderedDict()).setdefault(image, []).append(correct)

        per_task = {}
        for task, images in groups.items():
            odd = [img for img, qs in images.items() if len(qs) != 2]
            if odd:
                logger.warning(
                    f"mme: {len(odd)} image(s) of sub-task {task!r} do not have exactly 2 questions "
                    f"(e.g. {odd[0]!r}); accuracy+ counts an image when all its questions are right."
                )
            answers = [c for qs in images.values() for c in qs]
            acc = sum(answers) / len(answers)
            acc_plus = sum(all(qs) for qs in images.values()) / len(images)
            per_task[task] = {
                "accuracy": acc,
                "accuracy_plus": acc_plus,
                "score": (acc + acc_plus) * 100.0,
                "num_questions": len(answers),
                "num_images": len(images),
            }
        unknown = [t for t in per_task if t not in _CANONICAL.values()]
        if unknown:
            logger.warning(f"mme: sub-tasks {unknown} are not official MME sub-tasks; left out of the totals.")
        perception = sum((v["score"] for t, v in per_task.items() if t in PERCEPTION_SUBTASKS), 0.0)
        cognition = sum((v["score"] for t, v in per_task.items() if t in COGNITION_SUBTASKS), 0.0)
        return {
            "perception_score": perception,
            "cognition_score": cognition,
            "total_score": perception + cognition,
            "subtasks": per_task,
        }
