# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""VQA accuracy (VQAv2 / VizWiz) as an `evaluate` module.

Answer normalisation and scoring follow the official VQA evaluation script
(``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the GT-Vision-Lab VQA API):
the ``contractions``, ``manualMap``, ``articles``, ``periodStrip``, ``commaStrip`` and
``punct`` tables are copied verbatim and ``processPunctuation`` / ``processDigitArticle``
are reproduced quirk for quirk.

This file is self-contained (it is loaded by path with ``evaluate.load``), and also
importable as ``rcp_llava.metrics.vqa_accuracy.vqa_accuracy`` for its helpers.
"""

import re
from typing import List, Sequence

import datasets
import evaluate


_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""

_DESCRIPTION = """\
VQA accuracy as defined by the official VQAv2 evaluation (and VizWiz's, which differs in
how references are compared: `reference_processing="vizwiz"`).
A predicted answer is processed as LLaVA-1.5 submits it (EvalAI's answer processor:
lower-cased, ',' and '?' deleted, "'s" split off, then newlines/tabs to spaces, punctuation
handling, number words to digits, articles removed, contractions restored). For every
annotator answer, the prediction scores min(1, #matches among the *other*
annotators / 3); the question's accuracy is the mean over these leave-one-out
subsets. With 10 annotators this is the familiar "min(#humans that said it / 3, 1)"
averaged over the 10 choose 9 subsets. With fewer answers the same formula is applied
over the answers given; with a single reference answer (where leave-one-out would
leave no annotator) the score is a plain normalised exact match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers, one per question.
    references (`list` of `list` of `str`): the annotator answers of each question
        (10 for VQAv2 / VizWiz; at least one).
    reference_processing (`str`, defaults to `"official"`): how reference answers are
        normalised. `"official"`: exactly as the official script (vqaEval.py, revision
        a013f00) scores the normalised prediction -- references normalised (punctuation,
        digits, articles) only when the annotators disagree, unanimous ones compared as they
        are (the official annotations are already normalised). `"vizwiz"`: as the VizWiz-VQA
        evaluator, references always compared as they are. `"full"`: references always get
        the punctuation / digit / article normalisation (robust for references that were not
        pre-normalised; lmms-eval's vqav2 and vizwiz tasks normalise both sides always, its
        vizwiz with the ',' / '?' / "'s" step on references too).
    return_scores (`bool`, defaults to `False`): also return the per-question scores.
Returns:
    vqa_accuracy (`float`): mean accuracy in [0, 1] (the official server reports x100).
    scores (`list` of `float`): per-question accuracies, if `return_scores=True`.
Examples:
    >>> metric = rcp_llava.metrics.load_metric("vqa_accuracy")
    >>> metric.compute(predictions=["Two"], references=[["2"] * 10])
    {'vqa_accuracy': 1.0}
"""

# ---------------------------------------------------------------------------------
# Tables copied verbatim from the official vqaEval.py (Python 3 version).
# ---------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ["a", "an", "the"]
# The official pattern: "(?!<=\d)" is a (harmless) typo for a look-behind; kept as is.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(in_text: str) -> str:
    """Official ``processPunctuation``.

    A punctuation mark is deleted when it touches a space somewhere in the text (or the
    text contains a digit-comma-digit group), otherwise it becomes a space; then periods
    not followed by a digit are deleted.
    """
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The official call is `periodStrip.sub("", outText, re.UNICODE)`, which passes
    # re.UNICODE (= 32) as the *count* argument: at most 32 periods are stripped.
    return PERIOD_STRIP.sub("", out_text, count=int(re.UNICODE))


def process_digit_article(in_text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop
    articles, restore contractions ("dont" -> "don't")."""
    out_words = []
    for word in in_text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            out_words.append(word)
    out_words = [CONTRACTIONS.get(word, word) for word in out_words]
    return " ".join(out_words)


def normalize_vqa_answer(answer: str) -> str:
    """Full official normalisation (vqaEval's punctuation, digit and article steps) of an answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def submitted_answer(prediction: str) -> str:
    """A prediction as LLaVA-1.5 submits it: its converters (convert_vqav2_for_submission.py,
    convert_vizwiz_for_submission.py) pass each answer through `EvalAIAnswerProcessor`, which first lower-cases,
    deletes every ',' and '?' and splits "'s" off ("man's" -> "man 's"), then normalises as vqaEval does. Scoring the
    normalisation alone credited "Man's" and "black,white" where LLaVA's submissions (and lmms-eval's VizWiz task,
    the same processor) get none."""
    word = prediction.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(word)


def vqa_score(prediction: str, answers: Sequence[str], reference_processing: str = "official") -> float:
    """Accuracy of one prediction against the annotator answers of one question.

    For each annotator i: ``min(1, #{j != i : answers[j] == prediction} / 3)``; the result
    is the mean over i. A single reference answer falls back to exact match.
    """
    if answers is None or isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_accuracy: a question's references are {answers!r}; give its list of annotator "
                         "answers (at least one).")
    if reference_processing not in ("official", "full", "vizwiz"):
        raise ValueError(f"reference_processing must be 'official', 'vizwiz' or 'full', got {reference_processing!r}")
    # The prediction as submitted: LLaVA's converter processes each answer before the evaluation server sees it.
    pred = submitted_answer(prediction)
    if reference_processing == "full":
        gts = [normalize_vqa_answer(a) for a in answers]
    elif reference_processing == "vizwiz":
        # The VizWiz-VQA evaluator: the prediction normalised (again), the references compared as they are, whether
        # or not the annotators agree (VQAv2's disagreement rule normalised them, crediting more than its server).
        pred = process_digit_article(process_punctuation(pred))
        gts = list(answers)
    else:
        # vqaEval.py since a013f00 ("Fixed processing answers bug"): references and prediction are normalised
        # together, punctuation and digits/articles, only when the annotators disagree. The earlier revision (which
        # this followed) gave those references the punctuation step alone, so a prediction equal to them lost
        # credit ("2" against five "two": 0.3, not 1.0; "A can of soup." against "a can of soup": 0.6).
        gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            pred = process_digit_article(process_punctuation(pred))
    if len(gts) == 1:
        return float(gts[0] == pred)
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(accs) / len(accs)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """Official VQAv2 accuracy (leave-one-annotator-out, min(1, matches / 3))."""

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
            reference_urls=["https://visualqa.org/evaluation.html", "https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions: List[str], references: List[List[str]], reference_processing="official",
                 return_scores=False):
        if not predictions:  # an evaluation that filtered out every question has no score, not 0
            raise ValueError("vqa_accuracy: no predictions to score; give at least one question.")
        scores = [vqa_score(p, r, reference_processing) for p, r in zip(predictions, references)]
        result = {"vqa_accuracy": sum(scores) / len(scores)}
        if return_scores:
            result["scores"] = scores
        return result
