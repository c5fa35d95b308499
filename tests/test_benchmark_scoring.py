"""How reader benchmarks are asked and scored, checked against LLaVA-1.5's eval scripts and lmms-eval: the
answer-format line of each benchmark, multiple-choice parsing, MMBench's circular evaluation, GQA's scoring, the
VizWiz image folder, reader options in a BENCHMARK:PATH spec and the refusal of splits without answers."""

import base64
import io
import json
import re
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import make_image, write_json

from rcp_llava.evaluation import generated_answers, load_data, score_benchmark
from rcp_llava.metrics import load_metric
from rcp_llava.metrics.exact_match.exact_match import mmbench_choice
from rcp_llava.readers import VqaRecord, read_benchmark


SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def png_b64():
    buf = io.BytesIO()
    Image.new("RGB", (5, 2), (0, 0, 255)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n")
    return path


def record(benchmark, question="Q?", answers=("yes",), qid="1", family="f", choices=None):
    return VqaRecord(question_id=qid, image=b"", question=question, answers=list(answers), family=family,
                     choices=choices, benchmark=benchmark)


# ----------------------------------------------------------------------------- 1. prompts


def test_every_benchmark_gets_the_official_answer_format_line():
    from rcp_llava.readers import POST_PROMPTS

    # lmms-eval post_prompt of vqav2 / gqa / pope / vizwiz_vqa / scienceqa_img / mmbench_en / mme; MME's own
    # "Please answer yes or no." is dropped first (lmms-eval's mme_doc_to_text, LLaVA-1.5's llava_mme.jsonl).
    assert POST_PROMPTS == {
        "vqav2": SHORT, "gqa": SHORT, "pope": SHORT,
        "vizwiz": "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT,
        "scienceqa_img": LETTER, "mmbench": LETTER, "mme": SHORT,
    }
    sqa = record("scienceqa_img", "Which is north?\nA. Ohio\nB. Maine", ["B"], choices=["Ohio", "Maine"])
    assert sqa.prompt == "Which is north?\nA. Ohio\nB. Maine\nAnswer with the option's letter from the given " \
                         "choices directly."
    assert sqa.question == "Which is north?\nA. Ohio\nB. Maine"  # the raw question stays
    assert record("vizwiz", "What is this?").prompt == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    mme = record("mme", "Is it red? Please answer yes or no.")
    assert mme.prompt == "Is it red?\nAnswer the question using a single word or phrase."
    assert mme.question == "Is it red? Please answer yes or no."  # the raw question stays
    assert record("", "Own question?").prompt == "Own question?"


def test_generate_asks_the_prompt_not_the_bare_question(monkeypatch):
    asked = []

    class Stop(Exception):
        pass

    def fake_prompt_batch(processor, questions, images):
        asked.extend(questions)
        raise Stop

    monkeypatch.setattr("rcp_llava.evaluation.prompt_batch", fake_prompt_batch)
    records = [VqaRecord("1", b"", "Is there a dog?", ["no"], benchmark="pope")]
    monkeypatch.setattr(VqaRecord, "load_image", lambda self: None)
    with pytest.raises(Stop):
        generated_answers(SimpleNamespace(eval=lambda: None), None, records)
    assert asked == ["Is there a dog?\nAnswer the question using a single word or phrase."]


# ----------------------------------------------------------------------------- 2. multiple choice


def test_scienceqa_answers_are_parsed_as_llava_eval_science_qa():
    records = [record("scienceqa_img", answers=["B"], qid=str(i), family="social science",
                      choices=["Ohio", "Maine", "Texas"]) for i in range(6)]
    # eval_science_qa.py: a letter, "X. ...", "The answer is X" count; "B." (too short for "X. "), a lower-case
    # letter and the option text do not
    predictions = ["B", "B. Maine", "The answer is B.", "b", "Maine", "B."]
    result = score_benchmark("scienceqa_img", predictions, records)
    assert result == {"score": 0.5, "groups": {"social science": 0.5}, "metric": {"exact_match": 0.5}}
    metric = load_metric("exact_match")
    extra = ["D", "The answer is C, no. The answer is A.", "B\nBecause Maine is north.", "The answer is B",
             "The answer is F. The answer is B.", " The answer is B, Maine. "]
    out = metric.compute(predictions=predictions + extra, references=[["B"]] * 6 + [["D"], ["A"]] + [["B"]] * 4,
                         mode="scienceqa", choices=[["Ohio", "Maine", "Texas"]] * 12, return_scores=True)
    # "D" is not among 3 options (get_pred_idx -> -1). LLaVA reads "The answer is X" + one more character with
    # `findall` and takes it only when there is exactly one: two phrases are wrong (the first "The answer is X." was
    # taken), as is one ending the answer; a newline after the letter is no "X. " (it was rewritten to ". " and
    # counted right, as neither LLaVA nor lmms-eval count it)
    assert out["scores"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] + [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_mmbench_answers_are_parsed_as_can_infer():
    records = [record("mmbench", answers=["B"], qid=str(i), family="color", choices=["red", "blue"])
               for i in range(1, 7)]
    # can_infer: the one letter among the words, else the one option text in the answer; "A cat" is the letter A
    # (a quantifier only with more than 3 words), "red or blue" names two options, "b" none
    predictions = ["B", "The answer is B", "(B)", "It is blue.", "A cat", "red or blue"]
    result = score_benchmark("mmbench", predictions, records)
    assert result["score"] == 4 / 6 and result["groups"] == {"color": 4 / 6}
    metric = load_metric("exact_match")
    assert metric.compute(predictions=["b", "A dog is on the mat"], references=[["B"], ["A"]], mode="mmbench",
                          choices=[["red", "blue"], ["dog", "cat"]], return_scores=True)["scores"] == [0.0, 1.0]
    # The article rule's edge: three words keep the letter, a fourth makes "A" an article (and no option is named)
    assert [mmbench_choice(p, ["red", "blue"]) for p in ("A is right", "A is right here")] == ["A", None]


def test_multiple_choice_modes_check_their_arguments():
    metric = load_metric("exact_match")
    with pytest.raises(ValueError, match=re.escape("exact_match: mode='mmbench' needs `choices`, one list of option "
                                                   "texts per prediction (1); got None.")):
        metric.compute(predictions=["A"], references=[["A"]], mode="mmbench")
    with pytest.raises(ValueError, match=re.escape("exact_match: `mode` is 'letters'; use one of ['normalized', "
                                                   "'gqa', 'scienceqa', 'mmbench'].")):
        metric.compute(predictions=["A"], references=[["A"]], mode="letters")


# ----------------------------------------------------------------------------- 3. MMBench circular


def test_mmbench_is_scored_circularly(tmp_path):
    img = png_b64()
    path = write_tsv(tmp_path / "mmbench_dev.tsv", MMB_HEADER, [
        [1, "What colour?", "nan", "red", "blue", "", "", "A", "color", "perception", img],
        [1000001, "What colour?", "nan", "blue", "red", "", "", "B", "color", "perception", "1"],
        [2, "Shape?", "nan", "square", "circle", "", "", "A", "shape", "perception", img],
        [1000002, "Shape?", "nan", "circle", "square", "", "", "B", "shape", "perception", "2"],
        [2000002, "Shape?", "nan", "circle", "square", "", "", "B", "shape", "perception", "2"],
    ])
    records = read_benchmark("mmbench", path)
    # question 1 fails its rotated copy; question 2 passes all three copies
    result = score_benchmark("mmbench", ["A", "A", "A", "B", "B"], records)
    assert result == {"score": 0.5, "groups": {"color": 0.0, "shape": 1.0},
                      "metric": {"exact_match": 0.5, "per_row_exact_match": 0.8, "num_questions": 2, "num_rows": 5}}


# ----------------------------------------------------------------------------- 7. GQA


def test_gqa_is_scored_as_llava_convert_gqa_for_eval():
    records = [record("gqa", answers=[a], qid=str(i), family="query")
               for i, a in enumerate(["table", "t-shirt", "2", "table", "yes"])]
    # rstrip('.').lower() then ==: no article dropping, no number words, no punctuation removal
    result = score_benchmark("gqa", ["the table", "t shirt", "two", "Table..", "Yes"], records)
    assert result == {"score": 0.4, "groups": {"query": 0.4}, "metric": {"exact_match": 0.4}}


# ----------------------------------------------------------------------------- 4. VizWiz layout


def test_vizwiz_images_are_found_in_the_distributed_layout(tmp_path):
    row = {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answer_type": "other",
           "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10}
    ann = write_json(tmp_path / "Annotations" / "val.json", [row])
    make_image(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    assert read_benchmark("vizwiz", tmp_path)[0].image == str(tmp_path / "val" / "VizWiz_val_00000000.jpg")
    # the split is the JSON's stem, not always val
    train = write_json(tmp_path / "Annotations" / "train.json", [dict(row, image="VizWiz_train_00000000.jpg")])
    make_image(tmp_path / "train" / "VizWiz_train_00000000.jpg")
    assert read_benchmark("vizwiz", train)[0].image == str(tmp_path / "train" / "VizWiz_train_00000000.jpg")
    (tmp_path / "val" / "VizWiz_val_00000000.jpg").unlink()
    tried = ", ".join(str(p) for p in (tmp_path / "Annotations" / "val", tmp_path / "val", tmp_path / "Annotations"))
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"vizwiz: the first image of {ann}, 'VizWiz_val_00000000.jpg', is in none of {tried}; pass image_dir= "
            f"(the folder of the 'val' images; in a BENCHMARK:PATH spec 'vizwiz:{ann},image_dir=DIR'). "
            "Expected layout -- ")):
        read_benchmark("vizwiz", ann)
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"vizwiz: image_dir '{tmp_path / 'train'}' lacks the first image of {ann}, 'VizWiz_val_00000000.jpg'; "
            "pass the folder of the 'val' images.")):
        read_benchmark("vizwiz", ann, image_dir=tmp_path / "train")


# ----------------------------------------------------------------------------- 5. reader options in the spec


def _pope_llava_layout(root):
    make_image(root / "val2014" / "COCO_val2014_000000310196.jpg")
    for cat in ("random", "popular", "adversarial"):
        (root / "coco").mkdir(parents=True, exist_ok=True)
        (root / "coco" / f"coco_pope_{cat}.json").write_text(json.dumps(
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog?", "label": "no"}))
    return root


def test_load_data_takes_reader_options_and_checks_the_first_image(tmp_path):
    from rcp_llava.evaluation import parse_benchmark_spec

    root = _pope_llava_layout(tmp_path / "pope")
    # LLaVA's layout (images elsewhere) failed only in load_image, after the model had loaded
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"pope: 1 of the 1 image files of --data 'pope:{root / 'coco'}' do not exist "
            f"({root / 'coco' / 'COCO_val2014_000000310196.jpg'}; the first for question 'adversarial/1'); pass the "
            f"folder that holds them: pope:{root / 'coco'},image_dir=DIR.")):
        load_data(f"pope:{root / 'coco'}")
    data = load_data(f"pope:{root / 'coco'},image_dir={root / 'val2014'}")
    assert [r.question_id for r in data.rows] == ["adversarial/1", "popular/1", "random/1"]
    assert data.rows[0].image == str(root / "val2014" / "COCO_val2014_000000310196.jpg")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"--data 'pope:{root},images=x': the pope reader has no option 'images'; its options are ['image_dir'] "
            "(pope:PATH,OPTION=VALUE,...).")):
        load_data(f"pope:{root},images=x")
    with pytest.raises(ValueError, match=re.escape("gives the option 'image_dir' twice; give it once.")):
        load_data(f"pope:{root},image_dir=a,image_dir=b")
    assert parse_benchmark_spec("mme:/d/MME,subtasks=OCR+color") == ("mme", "/d/MME", {"subtasks": ["OCR", "color"]})
    assert parse_benchmark_spec("pope:/d/a,b/coco") == ("pope", "/d/a,b/coco", {})  # a comma in a path stays


def test_load_data_passes_the_split_to_scienceqa(tmp_path):
    problem = {"question": "Which is north?", "choices": ["Ohio", "Maine"], "answer": 1, "hint": "",
               "image": "image.png", "subject": "social science"}
    write_json(tmp_path / "problems.json", {"5": problem, "6": dict(problem, answer=0)})
    write_json(tmp_path / "pid_splits.json", {"test": ["5"], "val": ["6"]})
    make_image(tmp_path / "images" / "test" / "5" / "image.png")
    make_image(tmp_path / "images" / "val" / "6" / "image.png")
    assert [r.question_id for r in load_data(f"scienceqa_img:{tmp_path}").rows] == ["5"]
    assert [(r.question_id, r.answers) for r in load_data(f"scienceqa_img:{tmp_path}", split="val").rows] == \
        [("6", ["A"])]
    assert [r.question_id for r in load_data(f"scienceqa_img:{tmp_path},split=test", split="val").rows] == ["5"]


# ----------------------------------------------------------------------------- 6. splits without answers


def test_splits_without_answers_are_refused_before_generation(tmp_path):
    viz = write_json(tmp_path / "vizwiz" / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "What?"}])
    make_image(tmp_path / "vizwiz" / "test" / "VizWiz_test_00000000.jpg")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"vizwiz: {viz} has no reference answers (1 of the 1 questions read, e.g. question "
            "'VizWiz_test_00000000.jpg'), so it cannot be scored; pass a split with answers: Annotations/val.json "
            "(test answers exist only on the EvalAI server).")):
        load_data(f"vizwiz:{viz}")
    vqa = tmp_path / "vqav2"
    write_json(vqa / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
               {"data_subtype": "test-dev2015", "questions": [{"question_id": 1, "image_id": 1, "question": "Q?"}]})
    make_image(vqa / "test2015" / "COCO_test2015_000000000001.jpg")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"vqav2: {vqa} has no reference answers (1 of the 1 questions read, e.g. question '1'), so it cannot be "
            "scored; pass a split with answers: the val2014 questions with their annotations, as "
            "',annotations=FILE' (found without it only as a folder's one '*annotations*.json', or as the one beside "
            "a questions file whose name holds its subtype, e.g. v2_mscoco_val2014_annotations.json); test-dev / "
            "test answers exist only on the EvalAI server.")):
        load_data(f"vqav2:{vqa}")
    header = [c for c in MMB_HEADER if c != "answer"]
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", header, [[3, "Which?", "", "x", "y", "", "", "c", "l2", png_b64()]])
    with pytest.raises(ValueError, match="^" + re.escape(
            f"mmbench: {tsv} has no reference answers (1 of the 1 questions read, e.g. question '3'), so it cannot "
            "be scored; pass a split with answers: the dev TSV (e.g. mmbench_dev_20230712.tsv; test answers exist "
            "only on the MMBench server).")):
        load_data(f"mmbench:{tsv}")
