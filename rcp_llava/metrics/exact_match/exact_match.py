# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""Exact match (GQA, multiple-choice letters) as an `evaluate` module, in the variants the official scorers use.

Self-contained: loaded by path with ``evaluate.load``.
"""

import re
import string
from typing import List, Optional, Sequence

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

`mode` picks how a prediction is read, as each benchmark's official scorer reads it:

- "normalized" (default): the normalisation above (lenient; `normalize=False` compares stripped strings).
- "gqa": LLaVA-1.5's GQA protocol (scripts/convert_gqa_for_eval.py, then the GQA evaluator): the prediction with
  trailing periods stripped and lower-cased, compared verbatim with the reference ("the table" is not "table").
- "scienceqa": LLaVA-1.5's llava/eval/eval_science_qa.py: the option letter is the (stripped) prediction itself
  when it is one letter among the question's options, or its first letter when it starts with "X. ", or X in the
  one "The answer is X" followed by a character (two such phrases, or none, are wrong); anything else is wrong
  ("B." and "B\nbecause ..." are wrong there, as in LLaVA; lmms-eval's scienceqa_img accepts "B."). Needs
  `choices`.
- "mmbench": MMBench's answer extraction without its GPT fallback (lmms-eval mmbench_evals.py / VLMEvalKit
  `can_infer`): the one option letter standing alone (or as "X." "X," "X:" "X)" "(X)" ":X" ...) among the words of
  the prediction, else the one option whose text occurs in the lower-cased prediction; anything else is wrong
  (the GPT matcher is not called). Needs `choices`.

In the multiple-choice modes a reference is the option letter.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers.
    references (`list` of `list` of `str`): acceptable answers per question (at least one).
    normalize (`bool`, defaults to `True`): apply the normalisation; `False` compares the
        stripped strings verbatim.
    return_scores (`bool`, defaults to `False`): also return per-question 0/1 scores.
    mode (`str`, defaults to `"normalized"`): "normalized", "gqa", "scienceqa" or "mmbench" (see above).
    choices (`list` of `list` of `str`): the option texts of each question; required by "scienceqa" / "mmbench".
Returns:
    exact_match (`float`): fraction of questions answered exactly, in [0, 1].
    scores (`list` of `float`): per-question scores, if `return_scores=True`.
Examples:
    >>> metric = rcp_llava.metrics.load_metric("exact_match")
    >>> metric.compute(predictions=["Yes."], references=[["yes"]])
    {'exact_match': 1.0}
    >>> metric.compute(predictions=["B. Maine"], references=[["B"]], mode="scienceqa", choices=[["Ohio", "Maine"]])
    {'exact_match': 1.0}
"""

MODES = ("normalized", "gqa", "scienceqa", "mmbench")
OPTION_LETTERS = "ABCDEFGHIJ"

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


def _check_references(references):
    if references is None or isinstance(references, str) or len(references) == 0:
        raise ValueError(f"exact_match: a question's references are {references!r}; give its list of reference "
                         "answers (at least one).")


def exact_match_score(prediction: str, references: Sequence[str], normalize: bool = True) -> float:
    """1.0 when the (normalised) prediction equals any (normalised) reference."""
    _check_references(references)
    norm = normalize_text if normalize else str.strip
    pred = norm(prediction)
    return float(any(norm(ref) == pred for ref in references))


def gqa_prediction(prediction: str) -> str:
    """LLaVA-1.5's scripts/convert_gqa_for_eval.py: ``text.rstrip('.').lower()``."""
    return prediction.rstrip(".").lower()


def scienceqa_choice(prediction: str, num_choices: int) -> Optional[str]:
    """The option letter LLaVA-1.5's eval_science_qa.py reads from `prediction` (None: "FAILED")."""
    options = ("A", "B", "C", "D", "E")  # a list, as in LLaVA: "" and "AB" are not options
    text = prediction.strip()  # model_vqa_science.py strips the decoded answer; nothing else is rewritten
    if text in options:
        answer = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        answer = text[0]
    else:
        # LLaVA's `re.compile(r'The answer is ([A-Z]).').findall`: a letter and one more character, any letter
        # (get_pred_idx refuses F-Z below), and exactly one such phrase in the answer
        found = re.findall(r"The answer is ([A-Z]).", text)
        answer = found[0] if len(found) == 1 else None
    # get_pred_idx: only a letter of this question's options counts
    return answer if answer is not None and answer in options[:num_choices] else None


_MMBENCH_AFFIXES = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                    (":", ","), (":", "."), (":", ")"), (":", ")."))


def mmbench_choice(prediction: str, choices: Sequence[str]) -> Optional[str]:
    """MMBench's `can_infer` (lmms-eval mmbench_evals.py, VLMEvalKit): an option letter, else a unique option text;
    None when neither is found (MMBench would then ask GPT; here the answer is wrong)."""
    letters = "ABCDE"  # can_infer_option(answer, num_choice=5)
    splits = [x.strip() for x in prediction.split()]

    def count(prefix="", suffix=""):
        return sum(prefix + c + suffix in splits for c in letters)

    if count() == 1:
        for ch in letters:
            if "A" in splits and len(splits) > 3:  # "A" may be an article
                break
            if ch in splits:
                return ch
    for prefix, suffix in _MMBENCH_AFFIXES:
        if count(prefix, suffix) == 1:
            for ch in letters:
                if prefix + ch + suffix in splits:
                    return ch
    lowered = prediction.lower()  # can_infer_text
    candidates = [OPTION_LETTERS[i] for i, option in enumerate(choices) if str(option).lower() in lowered]
    return candidates[0] if len(candidates) == 1 else None


def choice_score(prediction: str, references: Sequence[str], choices: Sequence[str], mode: str) -> float:
    """1.0 when the option letter read from `prediction` (`mode` "scienceqa" or "mmbench") is a reference letter."""
    _check_references(references)
    if choices is None or isinstance(choices, str):
        raise ValueError(f"exact_match: mode={mode!r} needs each question's list of option texts, got {choices!r}.")
    letter = scienceqa_choice(prediction, len(choices)) if mode == "scienceqa" else mmbench_choice(prediction, choices)
    return float(letter is not None and letter in [str(r).strip() for r in references])


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

    def _compute(self, predictions: List[str], references: List[List[str]], normalize=True, return_scores=False,
                 mode="normalized", choices=None):
        if mode not in MODES:
            raise ValueError(f"exact_match: `mode` is {mode!r}; use one of {list(MODES)}.")
        if not predictions:  # an evaluation that filtered out every question has no score, not 0
            raise ValueError("exact_match: no predictions to score; give at least one question.")
        if mode in ("scienceqa", "mmbench"):
            if choices is None or len(choices) != len(predictions):
                got = "None" if choices is None else f"{len(choices)} option lists"
                raise ValueError(f"exact_match: mode={mode!r} needs `choices`, one list of option texts per "
                                 f"prediction ({len(predictions)}); got {got}.")
            scores = [choice_score(p, r, c, mode) for p, r, c in zip(predictions, references, choices)]
        elif mode == "gqa":
            for r in references:
                _check_references(r)
            scores = [float(any(gqa_prediction(p) == ref for ref in r)) for p, r in zip(predictions, references)]
        else:
            scores = [exact_match_score(p, r, normalize) for p, r in zip(predictions, references)]
        result = {"exact_match": sum(scores) / len(scores)}
        if return_scores:
            result["scores"] = scores
        return result
