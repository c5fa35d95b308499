# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""Normalised exact match (GQA, multiple-choice letters) as an `evaluate` module.

Self-contained: loaded by path with ``evaluate.load``.
"""

import re
import string
from typing import List, Sequence

import datasets
import evaluate


_CITATION = """\
@inproceedings{hudson2019gqa,
  title={{GQA}: A New Dataset for Real-World Visual Reasoning and Compositional Question Answering},
  author={Hudson, Drew A. and Manning, Christopher D.},
  booktitle={CVPR},
  year={2019}
}
"""

_DESCRIPTION = """\
Normalised exact match: a prediction is correct when, after normalisation, it equals
one of the question's reference answers. Normalisation (on both sides): lower-case,
newlines, tabs and punctuation turned into spaces, number words "zero".."ten" mapped to
digits, the articles "a", "an", "the" dropped (unless that would leave nothing, so that
a bare option letter "A" survives), whitespace collapsed. This is the metric used for
GQA testdev-balanced accuracy (the official GQA script compares lower-cased strings;
LLaVA strips a trailing period first).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers.
    references (`list` of `list` of `str`): acceptable answers per question (at least one).
    normalize (`bool`, defaults to `True`): apply the normalisation; `False` compares the
        stripped strings verbatim.
    return_scores (`bool`, defaults to `False`): also return per-question 0/1 scores.
Returns:
    exact_match (`float`): fraction of questions answered exactly, in [0, 1].
    scores (`list` of `float`): per-question scores, if `return_scores=True`.
Examples:
    >>> metric = rcp_llava.metrics.load_metric("exact_match")
    >>> metric.compute(predictions=["Yes."], references=[["yes"]])
    {'exact_match': 1.0}
"""

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
_PUNCT_RE = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_text(text: str) -> str:
    """Lower-case, strip punctuation, map number words, drop articles, collapse spaces."""
    text = _PUNCT_RE.sub(" ", text.lower().replace("\n", " ").replace("\t", " "))
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    kept = [w for w in words if w not in ARTICLES]
    return " ".join(kept if kept else words)


def exact_match_score(prediction: str, references: Sequence[str], normalize: bool = True) -> float:
    """1.0 when the (normalised) prediction equals any (normalised) reference."""
    if len(references) == 0:
        raise ValueError("exact_match: a question has no reference answers; at least one is needed.")
    norm = normalize_text if normalize else str.strip
    pred = norm(prediction)
    return float(any(norm(ref) == pred for ref in references))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Normalised exact match against any of several references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://cs.stanford.edu/people/dorarad/gqa/evaluate.html"],
        )

    def _compute(self, predictions: List[str], references: List[List[str]], normalize=True, return_scores=False):
        scores = [exact_match_score(p, r, normalize) for p, r in zip(predictions, references)]
        result = {"exact_match": sum(scores) / len(scores) if scores else 0.0}
        if return_scores:
            result["scores"] = scores
        return result
