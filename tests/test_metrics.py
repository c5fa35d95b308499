"""Tests of the shipped `evaluate` metric modules (hand-computed expected values)."""

import pytest

from rcp_llava.metrics import METRIC_NAMES, load_metric
from rcp_llava.metrics.exact_match.exact_match import normalize_text
from rcp_llava.metrics.mme.mme import parse_mme_answer
from rcp_llava.metrics.pope.pope import parse_pope_answer
from rcp_llava.metrics.vqa_accuracy.vqa_accuracy import normalize_vqa_answer, process_punctuation, vqa_score


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in METRIC_NAMES}


# ----------------------------------------------------------------------------- loading


def test_all_metrics_load_offline_with_info(metrics):
    assert METRIC_NAMES == ["vqa_accuracy", "exact_match", "pope", "mme"]
    for name, metric in metrics.items():
        assert metric.citation.strip().startswith("@"), name
        assert len(metric.description) > 100, name
        assert "predictions" in metric.features and "references" in metric.features, name
    assert set(metrics["mme"].features) == {"predictions", "references", "subtasks", "image_ids"}


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'.*vqa_accuracy"):
        load_metric("bleu")


# ----------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # manualMap
        ("none", "0"),
        ("The dog.", "dog"),  # article + trailing period
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("Yes!", "yes"),  # '!' touches no space -> replaced by a space, then stripped by split
        ("t-shirt", "t shirt"),  # '-' not next to a space -> becomes a space
        ("1,000", "1000"),  # digit,digit -> every punct mark removed
        ("hello, world", "hello world"),  # ', ' -> ',' removed
        ("red,blue", "red blue"),  # ',' alone -> space
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("  two\ndogs\t", "2 dogs"),
    ],
)
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_process_punctuation_keeps_case_and_articles():
    # processPunctuation alone does not lower-case or drop articles (the official
    # script applies only this step to disagreeing references).
    assert process_punctuation("The T-Shirt.") == "The T Shirt"


def test_vqa_leave_one_out_two_matches():
    # 10 answers, 2 equal the prediction.  Leave-one-out over the 10 annotators:
    #   removing one of the 2 matching annotators -> 1 match left -> min(1, 1/3) = 1/3  (x2)
    #   removing one of the 8 others             -> 2 matches    -> min(1, 2/3) = 2/3  (x8)
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_score("two", answers) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 1 x 0 + 9 x 1/3 = 3 -> 0.3
        (3, 0.9),  # 3 x 2/3 + 7 x 1 = 9 -> 0.9
        (4, 1.0),  # every subset keeps >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_match_counts(n_match, expected):
    answers = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_score("cat", answers) == pytest.approx(expected)


def test_vqa_fewer_than_ten_answers():
    # answers [cat, cat, dog], prediction cat:
    #   drop cat -> 1 match -> 1/3 ; drop cat -> 1/3 ; drop dog -> 2 matches -> 2/3
    #   mean = (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_vqa_single_reference_is_exact_match():
    assert vqa_score("Yes.", ["yes"]) == 1.0
    assert vqa_score("no", ["yes"]) == 0.0


def test_vqa_official_vs_full_reference_processing(metrics):
    metric = metrics["vqa_accuracy"]
    # Official quirk: unanimous references are left untouched, the prediction becomes "t shirt".
    official = metric.compute(predictions=["t-shirt"], references=[["t-shirt"] * 10])
    full = metric.compute(predictions=["t-shirt"], references=[["t-shirt"] * 10], reference_processing="full")
    assert official["vqa_accuracy"] == 0.0
    assert full["vqa_accuracy"] == 1.0
    # Full processing also maps number words in references.
    assert vqa_score("2", ["two"] * 10, "full") == 1.0
    assert vqa_score("2", ["two"] * 10, "official") == 0.0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("2", ["two"] * 5 + ["2"] + ["3"] * 4, 1.0),  # 0.3: the references kept "two"
    ("A can of soup.", ["a can of soup"] * 8 + ["can of soup"] * 2, 1.0),  # 0.6: they kept the article
    ("None", ["none"] * 7 + ["0"] * 3, 1.0),  # 0.9: "none" is "0" once normalised
    ("three", ["3"] * 4 + ["three"] * 6, 1.0),
    ("none", ["none"] * 10, 0.0),  # unanimous references are compared as they are, the prediction normalised
    ("t shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
])
def test_vqa_official_normalises_disagreeing_references_as_vqaeval_since_a013f00(prediction, answers, expected):
    """The official vqaEval.py (a013f00, "Fixed processing answers bug") normalises the references -- punctuation,
    number words, articles -- when the annotators disagree; the earlier revision this followed gave them the
    punctuation step alone, so a prediction equal to the annotators' answers lost credit."""
    assert vqa_score(prediction, answers) == pytest.approx(expected)
    assert vqa_score(prediction, answers, "full") == pytest.approx(1.0)  # lmms-eval's: both sides, always


@pytest.mark.parametrize("prediction, answers, official, vizwiz", [
    # LLaVA's converter splits "'s" off ("man 's"): unanimous references stay "man's", so no credit (it had 1.0)
    ("Man's", ["man's"] * 10, 0.0, 0.0),
    # ',' deleted, not spaced: "blackwhite" (1.0 before: "black white" after the punctuation step)
    ("black,white", ["black"] * 6 + ["black white"] * 4, 0.0, 0.0),
    ("Left?", ["left"] * 10, 1.0, 1.0),
    ("Two", ["2"] * 10, 1.0, 1.0),
    # disagreeing references: VQAv2's rule normalises them ("the remote" -> "remote"), VizWiz's evaluator does not
    ("the remote", ["the remote"] * 3 + ["tv remote"] * 7, 0.9, 0.0),
    ("unanswerable", ["unanswerable"] * 9 + ["blue"], 1.0, 1.0),
])
def test_vqa_predictions_are_scored_as_llava_submits_them(prediction, answers, official, vizwiz):
    """The prediction went through vqaEval's normalisation alone, where LLaVA-1.5's converters (and lmms-eval's
    VizWiz task) pass it through EvalAI's answer processor first; and VizWiz was scored with VQAv2's reference rule.
    The expected values are those of LLaVA's `EvalAIAnswerProcessor` followed by vqaEval.py a013f00, and of the
    VizWiz-VQA evaluator (references compared as they are)."""
    from rcp_llava.metrics.vqa_accuracy.vqa_accuracy import submitted_answer

    assert submitted_answer("Man's") == "man 's" and submitted_answer("black,white") == "blackwhite"
    assert vqa_score(prediction, answers) == pytest.approx(official)
    assert vqa_score(prediction, answers, "vizwiz") == pytest.approx(vizwiz)


def test_score_benchmark_scores_vizwiz_with_its_own_reference_rule_and_vqav2_with_vqaevals():
    from rcp_llava.evaluation import score_benchmark
    from rcp_llava.readers import VqaRecord

    answers = ["the remote"] * 3 + ["tv remote"] * 7
    for benchmark, expected in (("vqav2", 0.9), ("vizwiz", 0.0)):
        record = VqaRecord(question_id="1", image="x.jpg", question="What?", answers=answers, family="other",
                           benchmark=benchmark)
        assert score_benchmark(benchmark, ["the remote"], [record])["score"] == pytest.approx(expected)


def test_vqa_metric_compute_mean_and_scores(metrics):
    out = metrics["vqa_accuracy"].compute(
        predictions=["Two", "cat", "A dog."],
        references=[["2"] * 10, ["cat"] + ["dog"] * 9, ["dog"] * 10],
        return_scores=True,
    )
    assert out["scores"] == pytest.approx([1.0, 0.3, 1.0])
    assert out["vqa_accuracy"] == pytest.approx(2.3 / 3)


def test_vqa_errors():
    with pytest.raises(ValueError, match=r"^vqa_accuracy: a question's references are \[\]; give its list of "
                                         r"annotator answers \(at least one\)\.$"):
        vqa_score("cat", [])
    with pytest.raises(ValueError, match="reference_processing must be 'official', 'vizwiz' or 'full'"):
        vqa_score("cat", ["cat"], "lenient")


# ----------------------------------------------------------------------------- exact match


def test_exact_match_normalisation():
    assert normalize_text("  The Two Dogs! ") == "2 dogs"
    assert normalize_text("A") == "a"  # a bare option letter is not dropped as an article


def test_exact_match_metric(metrics):
    metric = metrics["exact_match"]
    out = metric.compute(
        predictions=["Yes.", "two dogs", "A", "The", "B", "left"],
        references=[["yes"], ["2 dogs"], ["A"], ["A"], ["A"], ["right", "left"]],
        return_scores=True,
    )
    assert out["scores"] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert out["exact_match"] == pytest.approx(4 / 6)
    raw = metric.compute(predictions=["Yes.", "yes"], references=[["yes"], ["yes"]], normalize=False)
    assert raw["exact_match"] == 0.5


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "answer, parsed",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("No, there is not.", "no"),
        ("There is not a cat.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("I don't see one", "yes"),  # "don't" is not one of the official no-words
        ("NO", "yes"),  # the official check is case-sensitive ("No", "no", "not")
        ("no,", "no"),  # commas are deleted before splitting
    ],
)
def test_pope_parsing(answer, parsed):
    assert parse_pope_answer(answer) == parsed


def test_pope_counts(metrics):
    # gold:  yes yes yes yes yes  no  no  no
    # pred:  yes yes yes no  no   yes no  no
    # TP=3 FN=2 FP=1 TN=2 ; acc = 5/8 ; precision = 3/4 ; recall = 3/5
    # F1 = 2 * 0.75 * 0.6 / 1.35 = 2/3 ; yes-ratio = 4/8
    preds = ["Yes", "yes.", "Yes, it is.", "No", "There is no dog.", "Yes", "no", "not at all"]
    golds = ["yes"] * 5 + ["no"] * 3
    out = metrics["pope"].compute(predictions=preds, references=golds)
    assert (out["tp"], out["fn"], out["fp"], out["tn"]) == (3, 2, 1, 2)
    assert out["accuracy"] == pytest.approx(0.625)
    assert out["precision"] == pytest.approx(0.75)
    assert out["recall"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.5)


def test_pope_per_category_and_bad_label(metrics):
    out = metrics["pope"].compute(
        predictions=["yes", "no", "yes", "yes"], references=["yes", "no", "no", "no"],
        categories=["random", "random", "adversarial", "adversarial"],
    )
    assert out["per_category"]["random"]["accuracy"] == 1.0
    assert out["per_category"]["adversarial"]["accuracy"] == 0.0
    assert out["per_category"]["adversarial"]["yes_ratio"] == 1.0
    assert out["per_category"]["adversarial"]["precision"] == 0.0  # TP=0, FP=2
    with pytest.raises(ValueError, match="'yes' or 'no', got 'maybe'"):
        metrics["pope"].compute(predictions=["yes"], references=["maybe"])


# ----------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    "answer, parsed",
    [("Yes", "yes"), ("No", "no"), ("Yes, it is.", "yes"), ("Not really", "no"), ("I think yes", "other"),
     ("Ok no", "other"), ("Oh yes", "other"), ("I no", "no")],  # only the first four characters are read
)
def test_mme_parsing(answer, parsed):
    assert parse_mme_answer(answer) == parsed


def test_mme_scores(metrics):
    # color: img1 both right, img2 one right -> acc 3/4, acc+ 1/2 -> (0.75 + 0.5) * 100 = 125
    # ocr (any case -> "OCR", perception): img1 both right -> 200
    # code_reasoning: img1 "I think yes" (other -> wrong) + right -> acc 1/2, acc+ 0 -> 50
    # my_task (unofficial): scored, not in totals
    preds = ["Yes", "No", "Yes", "Yes", "yes", "no", "I think yes", "No", "yes", "yes"]
    golds = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No", "Yes", "Yes"]
    tasks = ["color"] * 4 + ["ocr"] * 2 + ["code_reasoning"] * 2 + ["my_task"] * 2
    images = ["1.jpg", "1.jpg", "2.jpg", "2.jpg", "1.jpg", "1.jpg", "1.png", "1.png", "x", "x"]
    out = metrics["mme"].compute(predictions=preds, references=golds, subtasks=tasks, image_ids=images)
    sub = out["subtasks"]
    assert sub["color"]["accuracy"] == pytest.approx(0.75)
    assert sub["color"]["accuracy_plus"] == pytest.approx(0.5)
    assert sub["color"]["score"] == pytest.approx(125.0)
    assert sub["OCR"]["score"] == pytest.approx(200.0)
    assert sub["code_reasoning"]["score"] == pytest.approx(50.0)
    assert sub["my_task"]["score"] == pytest.approx(200.0)
    assert out["perception_score"] == pytest.approx(325.0)
    assert out["cognition_score"] == pytest.approx(50.0)
    assert out["total_score"] == pytest.approx(375.0)


def test_mme_bad_reference(metrics):
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metrics["mme"].compute(predictions=["yes"], references=["A"], subtasks=["color"], image_ids=["1"])


# ----------------------------------------------------------------------------- input that has no score


@pytest.mark.parametrize("name, kwargs", [
    ("vqa_accuracy", {}), ("exact_match", {}), ("pope", {}), ("mme", {"subtasks": [], "image_ids": []}),
])
def test_an_empty_evaluation_has_no_score(metrics, name, kwargs):
    """It scored 0.0 (POPE and MME all zeros): an evaluation that filtered out every question looked measured."""
    with pytest.raises(ValueError, match=rf"^{name}: no predictions to score; give at least one question\.$"):
        metrics[name].compute(predictions=[], references=[], **kwargs)


@pytest.mark.parametrize("name, kwargs, match", [
    ("vqa_accuracy", {}, r"^vqa_accuracy: a question's references are None; give its list of annotator answers"),
    ("exact_match", {}, r"^exact_match: a question's references are None; give its list of reference answers"),
    ("exact_match", {"mode": "gqa"}, r"^exact_match: a question's references are None"),
])
def test_a_missing_reference_list_is_named(name, kwargs, match):
    """A None reference list was a bare "object of type 'NoneType' has no len()". (Computed on the scoring
    functions: `evaluate`'s own feature check refuses None cells before `_compute` in some versions.)"""
    metric = load_metric(name)
    with pytest.raises(ValueError, match=match):
        metric._compute(predictions=["cat"], references=[None], **kwargs)


def test_mmbench_options_must_be_a_list(metrics):
    """`choices=[None]` in mmbench mode: "'NoneType' object is not iterable"."""
    with pytest.raises(ValueError, match=r"^exact_match: mode='mmbench' needs each question's list of option texts, "
                                         r"got None\.$"):
        metrics["exact_match"].compute(predictions=["A"], references=[["A"]], mode="mmbench", choices=[None])


def test_load_metric_passes_its_keyword_arguments_to_evaluate():
    """`load_metric(name, **kwargs)` is `evaluate.load(<folder>, **kwargs)`: an `experiment_id` (what separates two
    concurrent evaluations' cache files) reaches the metric."""
    metric = load_metric("exact_match", experiment_id="audit-run")
    assert metric.experiment_id == "audit-run"
