"""Tests of the benchmark readers on tiny files written in each benchmark's exact layout."""

import base64
import io
import json
import re

import pytest
from PIL import Image

from conftest import make_image, write_json

from rcp_llava.readers import (
    BENCHMARK_METRIC,
    BENCHMARKS,
    VqaRecord,
    canonical_benchmark,
    format_multiple_choice,
    read_benchmark,
    read_gqa,
    read_mmbench,
    read_mme,
    read_pope,
    read_scienceqa_img,
    read_vizwiz,
    read_vqav2,
    to_hf_dataset,
)


def png_bytes(size=(5, 2), color=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- VQAv2


@pytest.fixture
def vqav2_dir(tmp_path):
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "How many cats?", "question_id": 42000},
            {"image_id": 7, "question": "Is it red?", "question_id": 7001},
        ],
    })
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 42000, "image_id": 42, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 7001, "image_id": 7, "answer_type": "yes/no", "question_type": "is it",
         "answers": [{"answer": "yes" if i < 8 else "no", "answer_confidence": "yes", "answer_id": i + 1}
                     for i in range(10)]},
    ]})
    make_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", size=(6, 4))
    return tmp_path


def test_vqav2_test_dev_questions_read_the_test2015_images(tmp_path):
    """VQAv2's test-dev split has no images of its own: its questions (data_subtype "test-dev2015") are about the
    test2015 images, named COCO_test2015_<id>.jpg in test2015/ (as LLaVA's llava_vqav2_mscoco_test-dev2015 reads)."""
    write_json(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
               {"data_subtype": "test-dev2015", "questions": [{"question_id": 7, "image_id": 1, "question": "Q?"}]})
    make_image(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg", size=(3, 4))
    (record,) = read_vqav2(tmp_path)
    assert record.image == str(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg")
    assert record.load_image().size == (3, 4) and record.answers == []


def test_vqav2_folder(vqav2_dir):
    records = read_vqav2(vqav2_dir)
    assert [r.question_id for r in records] == ["42000", "7001"]
    first = records[0]
    assert first.image.endswith("val2014/COCO_val2014_000000000042.jpg")
    assert first.answers == ["2"] * 10 and first.family == "number" and first.benchmark == "vqav2"
    assert records[1].answers.count("yes") == 8 and records[1].family == "yes/no"
    assert first.load_image().size == (6, 4)
    # the image of the second question is not on disk: the error names its path
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000007.jpg"):
        records[1].load_image()


def test_vqav2_questions_file_without_annotations(vqav2_dir):
    # A questions file finds the annotations of its subtype beside it (it used to read none there: the folder's
    # test-dev questions made folder mode ambiguous, and the file mode then lost the answers); elsewhere, none.
    records = read_vqav2(vqav2_dir / "v2_OpenEnded_mscoco_val2014_questions.json",
                         image_dir=vqav2_dir / "val2014")
    assert [r.answers[:1] for r in records] == [["2"], ["yes"]]
    (vqav2_dir / "v2_mscoco_val2014_annotations.json").rename(vqav2_dir / "elsewhere.json")
    records = read_vqav2(vqav2_dir / "v2_OpenEnded_mscoco_val2014_questions.json",
                         image_dir=vqav2_dir / "val2014")
    assert [r.answers for r in records] == [[], []]


def test_vqav2_bad_input(tmp_path, vqav2_dir):
    write_json(tmp_path / "bad" / "questions.json", [{"question": "?"}])
    with pytest.raises(ValueError, match=r"questions.json: expected a JSON object with a 'questions' list"):
        read_vqav2(tmp_path / "bad" / "questions.json")
    with pytest.raises(FileNotFoundError, match=r"no file matching '\*questions\*.json' in .*empty"):
        (tmp_path / "empty").mkdir()
        read_vqav2(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        read_vqav2(vqav2_dir, image_dir=vqav2_dir / "nowhere")


# ----------------------------------------------------------------------------- GQA


def test_gqa(tmp_path):
    path = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no",
                      "fullAnswer": "No, it is clear.", "types": {"structural": "verify", "semantic": "attr"}},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the shirt?", "answer": "girl",
                      "types": {"structural": "query"}},
    })
    make_image(tmp_path / "images" / "n161313.jpg")
    records = read_gqa(path)
    assert [(r.question_id, r.answers, r.family) for r in records] == [
        ("201307251", ["no"], "verify"), ("201640614", ["girl"], "query")]
    assert records[0].image_id == "n161313" and records[0].load_image().size == (4, 3)
    assert read_benchmark("GQA", tmp_path)[1].question == "Who is wearing the shirt?"


def test_gqa_bad_input(tmp_path):
    write_json(tmp_path / "q.json", {"1": {"question": "no image id"}})
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"q.json: entry '1' lacks 'imageId'"):
        read_gqa(tmp_path / "q.json")
    with pytest.raises(FileNotFoundError, match="JSON file not found: .*missing.json.*GQA:"):
        read_gqa(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_gqa(tmp_path / "broken.json")


# ----------------------------------------------------------------------------- POPE


def write_pope(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_pope_folder_categories(tmp_path):
    img = "COCO_val2014_000000310196.jpg"
    write_pope(tmp_path / "coco_pope_random.json", [
        {"question_id": 1, "image": img, "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": img, "text": "Is there a cat in the image?", "label": "no"},
    ])
    write_pope(tmp_path / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": img, "text": "Is there a skis in the image?", "label": "no"},
    ])
    (tmp_path / "notes.json").write_text("{}")  # ignored: no split in its name
    make_image(tmp_path / "val2014" / img)
    records = read_pope(tmp_path, image_dir=tmp_path / "val2014")
    assert [(r.question_id, r.family, r.answers) for r in records] == [
        ("adversarial/1", "adversarial", ["no"]), ("random/1", "random", ["yes"]), ("random/2", "random", ["no"])]
    assert records[0].question == "Is there a skis in the image?"
    assert records[0].load_image().size == (4, 3)
    single = read_pope(tmp_path / "coco_pope_random.json", image_dir=tmp_path / "val2014")
    assert {r.family for r in single} == {"random"} and len(single) == 2
    # the JSON Lines name of a split counts in a folder too, and a label is read in any case ("Yes" -> "yes", which
    # the POPE metric compares with its parsed yes / no)
    write_pope(tmp_path / "coco_pope_popular.jsonl", [
        {"question_id": 1, "image": img, "text": "Is there a dog in the image?", "label": "Yes"}])
    records = read_pope(tmp_path, image_dir=tmp_path / "val2014")
    assert [(r.family, r.answers) for r in records if r.family == "popular"] == [("popular", ["yes"])]
    assert sorted({r.family for r in records}) == ["adversarial", "popular", "random"]


def test_pope_bad_input(tmp_path):
    write_pope(tmp_path / "coco_pope_popular.json", [{"question_id": 1, "image": "x.jpg", "text": "?"}])
    with pytest.raises(ValueError, match=r"coco_pope_popular.json: line .* lacks one of .*'label'"):
        read_pope(tmp_path / "coco_pope_popular.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no random/popular/adversarial .* in .*empty"):
        read_pope(tmp_path / "empty")
    # each line is parsed alone, so the decoder's "line 1" named the wrong line of the file
    good = json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "label": "yes"})
    (tmp_path / "coco_pope_random.json").write_text(good + "\n\n" + good[:-1] + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random.json: line 3 is not JSON \(Expecting ',' delimiter at "
                                         r"column \d+\)\. Expected layout"):
        read_pope(tmp_path / "coco_pope_random.json")
    # a file that is one JSON array (as some POPE copies are) is read whole; a broken one was called "not JSON
    # lines", a format it never claimed to be
    second = good.replace('"question_id": 1', '"question_id": 2')
    (tmp_path / "coco_pope_random.json").write_text(f"[{good},\n {second}]")
    assert [r.question_id for r in read_pope(tmp_path / "coco_pope_random.json")] == ["random/1", "random/2"]
    (tmp_path / "coco_pope_random.json").write_text(f"[{good},\n {good}")
    with pytest.raises(ValueError, match=r"coco_pope_random.json: starts with '\[' but is not a JSON array \(Expecting "
                                         r"',' delimiter at line 2 column \d+\); write one JSON object per line or a "
                                         r"valid array\. Expected layout"):
        read_pope(tmp_path / "coco_pope_random.json")
    # a row whose text holds U+2028 (JSON allows it raw) is one line, not two
    row = {"question_id": 1, "image": "x.jpg", "text": "Is there a\u2028cat?", "label": "yes"}
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r.question for r in read_pope(tmp_path / "coco_pope_random.json")] == ["Is there a\u2028cat?"]


# ----------------------------------------------------------------------------- ScienceQA-IMG


def test_scienceqa_img(tmp_path):
    write_json(tmp_path / "problems.json", {
        "5": {"question": "Which of these states is farthest north?", "choices": ["Ohio", "Maine", "Texas"],
              "answer": 1, "hint": "", "image": "image.png", "subject": "social science", "split": "test"},
        "6": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
              "image": None, "subject": "language science", "split": "test"},
        "9": {"question": "Which magnet pair attracts?", "choices": ["pair 1", "pair 2"], "answer": 0,
              "hint": "Two pairs of magnets are shown.", "image": "image.png", "subject": "natural science",
              "split": "test"},
        "11": {"question": "Train question", "choices": ["a", "b"], "answer": 0, "hint": "",
               "image": "image.png", "subject": "natural science", "split": "train"},
    })
    write_json(tmp_path / "pid_splits.json", {"train": ["11"], "test": ["5", "6", "9"]})
    make_image(tmp_path / "images" / "test" / "5" / "image.png", size=(8, 8))
    records = read_scienceqa_img(tmp_path)
    assert [r.question_id for r in records] == ["5", "9"]  # "6" has no image, "11" is train
    sqa5, sqa9 = records
    assert sqa5.answers == ["B"] and sqa5.choices == ["Ohio", "Maine", "Texas"]
    assert sqa5.question == "Which of these states is farthest north?\nA. Ohio\nB. Maine\nC. Texas"
    assert sqa9.question == "Context: Two pairs of magnets are shown.\nWhich magnet pair attracts?\nA. pair 1\nB. pair 2"
    assert sqa9.answers == ["A"] and sqa9.family == "natural science"
    assert sqa5.load_image().size == (8, 8)
    with pytest.raises(ValueError, match=r"pid_splits.json: no split 'dev' \(available: \['test', 'train'\]\)"):
        read_scienceqa_img(tmp_path, split="dev")
    with pytest.raises(FileNotFoundError, match="image folder not found: tried .*images/train"):
        read_scienceqa_img(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="JSON file not found: .*problems.json"):
        read_scienceqa_img(tmp_path / "images")


def test_scienceqa_img_subset_splits_read_their_problems_images_and_a_wrong_folder_is_named(tmp_path):
    """The release has images/train, val and test only: `split=minival` (part of val) failed, "image folder not
    found: tried images/minival", and `trainval` could not be read; each problem's own split now names its folder.
    A mistyped folder was reported as its parent's problems.json."""
    problem = {"question": "Which is north?", "choices": ["Ohio", "Maine"], "answer": 1, "hint": "",
               "image": "image.png", "subject": "social science"}
    write_json(tmp_path / "problems.json", {"5": {**problem, "split": "val"}, "7": {**problem, "split": "train"}})
    write_json(tmp_path / "pid_splits.json", {"val": ["5"], "minival": ["5"], "train": ["7"], "trainval": ["7", "5"]})
    make_image(tmp_path / "images" / "val" / "5" / "image.png", size=(3, 3))
    make_image(tmp_path / "images" / "train" / "7" / "image.png", size=(6, 6))
    (minival,) = read_scienceqa_img(tmp_path, split="minival")
    assert minival.image == str(tmp_path / "images" / "val" / "5" / "image.png")
    assert [r.load_image().size for r in read_scienceqa_img(tmp_path, split="trainval")] == [(6, 6), (3, 3)]
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope' / 'scienceqa'}")):
        read_scienceqa_img(tmp_path / "nope" / "scienceqa")


# ----------------------------------------------------------------------------- VizWiz


def test_vizwiz(tmp_path):
    answers = [{"answer": "coffee", "answer_confidence": "yes"}] * 7 + \
              [{"answer": "tea", "answer_confidence": "maybe"}] * 3
    path = write_json(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": answers,
         "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_val_00000001.jpg", "question": "Can you read it?",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10, "answerable": 0},
    ])
    make_image(tmp_path / "val" / "VizWiz_val_00000000.jpg", size=(3, 7))
    records = read_benchmark("vizwiz", path)
    assert records[0].answers == ["coffee"] * 7 + ["tea"] * 3
    assert records[0].family == "other" and records[1].family == "unanswerable"
    assert records[0].question_id == "VizWiz_val_00000000.jpg"
    assert records[0].load_image().size == (3, 7)
    write_json(tmp_path / "bad.json", {"images": []})
    with pytest.raises(ValueError, match="bad.json: expected a JSON list"):
        read_vizwiz(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- MME


@pytest.fixture
def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # nested layout, named as in the release (MME_Benchmark_release_version/artwork/questions_answers_YN)
    make_image(root / "artwork" / "images" / "10002.jpg", size=(5, 5))
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Moretto?\tYes\nIs this artwork created by Bosch?\tNo\n")
    # flat layout
    make_image(root / "OCR" / "0001.png", size=(2, 9))
    (root / "OCR" / "0001.txt").write_text("Is the word in the logo \"high\"?\tYes\nIs it \"low\"?\tNo")
    (root / "eval_tool").mkdir()  # not a sub-task: skipped
    return root


def test_mme_both_layouts(mme_root):
    records = read_mme(mme_root)
    assert [(r.family, r.question_id, r.answers) for r in records] == [
        ("OCR", "OCR/0001.png/0", ["Yes"]), ("OCR", "OCR/0001.png/1", ["No"]),
        ("artwork", "artwork/10002.jpg/0", ["Yes"]), ("artwork", "artwork/10002.jpg/1", ["No"])]
    assert records[0].question == 'Is the word in the logo "high"?'
    assert records[2].image_id == records[3].image_id == "artwork/10002.jpg"
    assert records[2].load_image().size == (5, 5) and records[0].load_image().size == (2, 9)
    assert [r.family for r in read_mme(mme_root, subtasks=["artwork"])] == ["artwork", "artwork"]
    # one name, not its letters (was "sub-task(s) ['C', 'O', 'R'] not found")
    assert [r.family for r in read_mme(mme_root, subtasks="OCR")] == ["OCR", "OCR"]


def test_mme_of_cognition_subtasks_only_heads_its_table_with_the_cognition_score(tmp_path):
    """The table's score was MME's perception total, 0 for every method when `subtasks=` chose cognition only."""
    from rcp_llava.evaluation import headline_key, score_benchmark

    root = tmp_path / "MME"
    make_image(root / "code_reasoning" / "0001.png", size=(2, 2))
    (root / "code_reasoning" / "0001.txt").write_text("Is the output 3?\tYes\nIs the output 4?\tNo\n")
    records = read_mme(root)
    result = score_benchmark("mme", ["Yes", "No"], records)
    assert result["score"] == 200.0 == result["metric"]["cognition_score"]
    assert headline_key("mme", ["code_reasoning"]) == "cognition_score"
    assert headline_key("mme", ["code_reasoning", "OCR"]) == "perception_score"  # MME's usual headline
    assert headline_key("mme", ["ocr"]) == "perception_score"  # the metric reads sub-task names in any case
    assert score_benchmark("mme", ["No", "No"], records)["score"] == 50.0  # one of two right: 50 accuracy + 0 acc+


def test_mme_reads_the_release_names_and_refuses_a_subtask_it_cannot_read(mme_root):
    """The reader looked for `questions_answer_YES_NO`, a name the release never had (it is `questions_answers_YN`):
    artwork, celebrity, landmark, posters and scene were skipped with a debug line, and the perception score covered
    the other five sub-tasks. A folder laid out by the old name still reads; a sub-task folder with no question file
    is an error, not a skip."""
    legacy = mme_root / "artwork" / "questions_answer_YES_NO"
    (mme_root / "artwork" / "questions_answers_YN").rename(legacy)
    assert [r.question_id for r in read_mme(mme_root, subtasks=["artwork"])] == ["artwork/10002.jpg/0",
                                                                                  "artwork/10002.jpg/1"]
    legacy.rename(mme_root / "artwork" / "questions_other")
    with pytest.raises(ValueError, match=r"artwork: sub-task 'artwork' holds no question files \(<image stem>.txt "
                                         r"here, or in questions_answers_YN/ beside images/\)"):
        read_mme(mme_root)


def test_mme_bad_input(mme_root, tmp_path):
    (mme_root / "OCR" / "0002.txt").write_text("Is there text?\tYes\n")
    with pytest.raises(FileNotFoundError, match="mme: no image for .*0002.txt"):
        read_mme(mme_root)
    (mme_root / "OCR" / "0002.txt").unlink()
    (mme_root / "artwork" / "questions_answers_YN" / "10002.txt").write_text("Is this by Bosch? Yes\n")
    with pytest.raises(ValueError, match=r"10002.txt: line 1 is not 'question<TAB>answer'"):
        read_mme(mme_root)
    (tmp_path / "flat_empty").mkdir()
    with pytest.raises(ValueError, match="no sub-task folder with question txt files.*MME:"):
        read_mme(tmp_path / "flat_empty")
    with pytest.raises(FileNotFoundError, match="MME root folder not found"):
        read_mme(tmp_path / "nope")


# ----------------------------------------------------------------------------- MMBench


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n")
    return path


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def test_mmbench(tmp_path):
    img = base64.b64encode(png_bytes()).decode()
    path = write_tsv(tmp_path / "mmbench_dev_20230712.tsv", MMB_HEADER, [
        [241, "What is the color of the sky?", "Look at the picture.", "red", "blue", "green", "", "B",
         "attribute_recognition", "finegrained_perception", img],
        [1000241, "Which is a fruit?", "", "car", "apple", "", "", "B", "object_localization",
         "coarse_perception", "241"],  # image cell refers to row 241
    ])
    records = read_mmbench(path)
    first, second = records
    assert first.question_id == "241" and first.answers == ["B"] and first.choices == ["red", "blue", "green"]
    assert first.question == "Look at the picture.\nWhat is the color of the sky?\nA. red\nB. blue\nC. green"
    assert first.family == "attribute_recognition" and isinstance(first.image, bytes)
    assert first.load_image().size == (5, 2)
    assert second.question == "Which is a fruit?\nA. car\nB. apple" and second.image == first.image
    # pandas writes an empty hint or option cell of the release's TSV as "nan": neither a hint nor an option
    nan = write_tsv(tmp_path / "nan.tsv", MMB_HEADER, [
        [7, "Which?", "nan", "red", "blue", "nan", "nan", "A", "color", "attribute", img]])
    (record,) = read_mmbench(nan)
    assert record.question == "Which?\nA. red\nB. blue" and record.choices == ["red", "blue"]


def test_mmbench_bad_input(tmp_path):
    path = write_tsv(tmp_path / "bad.tsv", ["index", "question", "A"], [[1, "q", "x"]])
    with pytest.raises(ValueError, match=r"bad.tsv: missing column\(s\) \['B', 'image'\]"):
        read_mmbench(path)
    path = write_tsv(tmp_path / "bad_image.tsv", MMB_HEADER,
                     [[1, "q", "", "x", "y", "", "", "A", "c", "l2", "not*base64"]])
    with pytest.raises(ValueError, match="row index 1: 'image' is not base64"):
        read_mmbench(path)
    with pytest.raises(FileNotFoundError, match="TSV file not found: .*none.tsv"):
        read_mmbench(tmp_path / "none.tsv")


# ----------------------------------------------------------------------------- malformed entries


def _vqav2_with(tmp_path, image_id=42, answer=None, repeat=False):
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": image_id, "question": "How many?", "question_id": 1}] * (2 if repeat else 1)})
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "answers": [answer or {"answer": "2"}]}]})
    (tmp_path / "val2014").mkdir()
    return tmp_path


def _gqa_with(tmp_path, answer="yes", question="Is it red?"):
    (tmp_path / "images").mkdir()
    return write_json(tmp_path / "testdev_balanced_questions.json",
                      {"q1": {"imageId": "n1", "question": question, "answer": answer}})


def _pope_with(tmp_path, image="x.jpg", text="Is there a cat?"):
    write_pope(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": image, "text": text, "label": "yes"}])
    return tmp_path / "coco_pope_random.json"


def _mme_with(tmp_path, lines):
    make_image(tmp_path / "OCR" / "0001.png")
    (tmp_path / "OCR" / "0001.txt").write_text(lines)
    return tmp_path


def _scienceqa_with(tmp_path, problem, split=("5",)):
    write_json(tmp_path / "problems.json", {"5": problem})
    write_json(tmp_path / "pid_splits.json", {"test": split if isinstance(split, str) else list(split)})
    (tmp_path / "images" / "test").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("read, match", [
    # a raw KeyError / int() error / AttributeError naming no file before
    (lambda t: read_vqav2(_vqav2_with(t, answer={"text": "2"})),
     r"^vqav2: .*v2_mscoco_val2014_annotations.json: the annotation of question_id 1 has an answer without 'answer'"),
    (lambda t: read_vqav2(_vqav2_with(t, image_id="abc")),
     r"^vqav2: .*questions.json: question_id 1: 'image_id' 'abc' is not a COCO image number\. Expected layout"),
    (lambda t: read_vizwiz(write_json(t / "val.json", [{"image": "a.jpg", "question": "?", "answers": [{"text": 1}]}]),
                           image_dir=(make_image(t / "val" / "a.jpg") and t / "val")),
     r"^vizwiz: .*val.json: question 'a.jpg' has an answer without 'answer'"),
    (lambda t: read_scienceqa_img(_scienceqa_with(t, "not a problem")),
     r"^scienceqa_img: .*problems.json: problem 5 is a JSON str, not an object"),
    # a string was split into one option per character, and a split string into one pid per character
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": "?", "choices": "AB", "answer": 0,
                                                      "image": "image.png"})),
     r"^scienceqa_img: .*problems.json: problem 5: 'choices' is not a list"),
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": "?", "choices": ["a", "b"], "answer": 0,
                                                      "image": "image.png"}, split="5")),
     r"^scienceqa_img: .*pid_splits.json: split 'test' is not a list of problem ids"),
    # JSON nulls and numbers where text belongs: read, then failed after the model loaded (a null question in the
    # prompt, a null answer in the metric after every question was generated) or in a path join, naming no file
    (lambda t: read_vqav2(_vqav2_with(t, answer={"answer": None})),
     r"^vqav2: .*v2_mscoco_val2014_annotations.json: question '1': answer None is not text\. Expected layout"),
    (lambda t: read_gqa(_gqa_with(t, answer=3)), r"^gqa: .*questions.json: question 'q1': answer 3 is not text"),
    (lambda t: read_gqa(_gqa_with(t, question=["a", "b"])),
     r"^gqa: .*questions.json: question 'q1': the question is \['a', 'b'\], not text"),
    (lambda t: read_pope(_pope_with(t, text=None)),
     r"^pope: .*coco_pope_random.json: question_id 1: 'text' is None, not text"),
    (lambda t: read_pope(_pope_with(t, image=None)),
     r"^pope: .*coco_pope_random.json: question_id 1: 'image' is None, not text"),
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": None, "choices": ["a", "b"], "answer": 0,
                                                      "image": "image.png"})),
     r"^scienceqa_img: .*problems.json: problem 5 lacks a valid 'question'/'choices'/'answer'"),
    # int() read 1.7 as option B and true as 1; an 11th option had no letter (a bare IndexError)
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": "?", "choices": ["a", "b"], "answer": 1.7,
                                                      "image": "image.png"})),
     r"^scienceqa_img: .*problems.json: problem 5 lacks a valid 'question'/'choices'/'answer'"),
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": "?", "choices": ["a", "b"], "answer": True,
                                                      "image": "image.png"})),
     r"^scienceqa_img: .*problems.json: problem 5 lacks a valid 'question'/'choices'/'answer'"),
    (lambda t: read_scienceqa_img(_scienceqa_with(t, {"question": "?", "choices": list("abcdefghijk"), "answer": 0,
                                                      "image": "image.png"})),
     r"^scienceqa_img: .*problems.json: problem 5 has 11 choices; options are lettered A-J \(at most 10\)"),
    # a string of answers was split into characters: 'yes' scored 0 against ['y', 'e', 's']
    (lambda t: read_vizwiz(write_json(t / "val.json", [{"image": "a.jpg", "question": "?", "answers": "yes"}]),
                           image_dir=(make_image(t / "val" / "a.jpg") and t / "val")),
     r"^vizwiz: .*val.json: question 'a.jpg': 'answers' is 'yes', not a list"),
    # a third field was taken as the answer: "Is it red?<TAB>Yes<TAB>No" read as No
    (lambda t: read_mme(_mme_with(t, "Is it red?\tYes\tNo\n")),
     r"^mme: .*0001.txt: line 1 is not 'question<TAB>answer': 'Is it red\?\\tYes\\tNo'"),
    # a repeated id merged two questions (MMBench's into one circular question)
    (lambda t: read_vqav2(_vqav2_with(t, repeat=True)),
     r"^vqav2: .*questions.json: question id '1' appears twice"),
    (lambda t: read_mmbench(write_tsv(t / "dup.tsv", MMB_HEADER, [
        [7, "Which?", "", "red", "blue", "", "", "A", "color", "attribute", base64.b64encode(png_bytes()).decode()],
        [7, "Which one?", "", "red", "blue", "", "", "B", "color", "attribute", "7"]])),
     r"^mmbench: .*dup.tsv: question id '7' appears twice"),
], ids=["vqav2-answer", "vqav2-image-id", "vizwiz-answer", "scienceqa-problem", "scienceqa-choices",
        "scienceqa-split", "vqav2-null-answer", "gqa-number-answer", "gqa-list-question", "pope-null-text",
        "pope-null-image", "scienceqa-null-question", "scienceqa-float-answer", "scienceqa-bool-answer",
        "scienceqa-11-choices", "vizwiz-string-answers", "mme-three-fields", "vqav2-repeated-id",
        "mmbench-repeated-index"])
def test_malformed_entries_name_the_file_and_the_entry(tmp_path, read, match):
    with pytest.raises(ValueError, match=match):
        read(tmp_path)


def test_an_mmbench_image_that_is_no_image_is_named_when_read(tmp_path):
    """Valid base64 that is no image passed every check and failed mid-evaluation in PIL, naming no row."""
    good, bad = base64.b64encode(png_bytes()).decode(), base64.b64encode(b"not an image at all").decode()
    path = write_tsv(tmp_path / "mmb.tsv", MMB_HEADER, [
        [1, "q", "", "x", "y", "", "", "A", "c", "l2", good],
        [2, "q", "", "x", "y", "", "", "A", "c", "l2", bad],
    ])
    with pytest.raises(ValueError, match=r"^mmbench: .*mmb.tsv: row index 2: 'image' decodes from base64 but is no "
                                         r"image file \(cannot identify image file"):
        read_mmbench(path)


# ----------------------------------------------------------------------------- empty files, BOM


def _empty_vqav2(tmp_path):
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [], "data_subtype": "val2014"})
    return tmp_path, "v2_OpenEnded_mscoco_val2014_questions.json: no questions (the 'questions' list is empty)"


def _empty_gqa(tmp_path):
    write_json(tmp_path / "testdev_balanced_questions.json", {})
    (tmp_path / "images").mkdir()
    return tmp_path, "testdev_balanced_questions.json: no questions (the JSON object is empty)"


def _empty_pope(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text("\n\n")
    return tmp_path, "coco_pope_random.json: no questions in the file"


def _scienceqa_without_image_problems(tmp_path):
    write_json(tmp_path / "problems.json", {"6": {"question": "Which word is a noun?", "choices": ["run", "dog"],
                                                  "answer": 1, "hint": "", "image": None}})
    write_json(tmp_path / "pid_splits.json", {"test": ["6"], "val": []})
    (tmp_path / "images" / "test").mkdir(parents=True)
    return tmp_path, "pid_splits.json: no image problems in split 'test' (none of its 1 problem(s) has an 'image')"


def _empty_vizwiz(tmp_path):
    write_json(tmp_path / "val.json", [])
    return tmp_path, "val.json: no questions (the JSON list is empty)"


def _empty_mme_txt(tmp_path):
    make_image(tmp_path / "color" / "a.png")
    (tmp_path / "color" / "a.txt").write_text("\n")
    return tmp_path, "a.txt: no question lines in the file"


def _header_only_mmbench(tmp_path):
    return write_tsv(tmp_path / "mmbench_dev.tsv", MMB_HEADER, []), \
        "mmbench_dev.tsv: no questions (a header row and no data rows)"


@pytest.mark.parametrize("name, make", [
    ("vqav2", _empty_vqav2), ("gqa", _empty_gqa), ("pope", _empty_pope),
    ("scienceqa_img", _scienceqa_without_image_problems), ("vizwiz", _empty_vizwiz), ("mme", _empty_mme_txt),
    ("mmbench", _header_only_mmbench),
])
def test_a_file_without_questions_is_refused(tmp_path, name, make):
    # An empty benchmark read as [] made the evaluation fail only after the model had loaded (IndexError).
    path, problem = make(tmp_path)
    with pytest.raises(ValueError, match=rf"^{name}: .*{re.escape(problem)}\. Expected layout -- "):
        read_benchmark(name, path)


def test_scienceqa_split_without_problems_is_refused(tmp_path):
    path, _ = _scienceqa_without_image_problems(tmp_path)
    (tmp_path / "images" / "val").mkdir()
    with pytest.raises(ValueError, match=r"no image problems in split 'val' \(the split lists no problems\)"):
        read_scienceqa_img(path, split="val")


def test_mme_answers_are_checked_when_read(mme_root):
    txt = mme_root / "artwork" / "questions_answers_YN" / "10002.txt"
    # any case of yes / no is what the mme metric accepts
    txt.write_text("Is this artwork created by Moretto?\tYES\nIs this artwork created by Bosch?\tno\n")
    assert [r.answers for r in read_mme(mme_root, subtasks=["artwork"])] == [["YES"], ["no"]]
    txt.write_text("Is this artwork created by Moretto?\tYes\nIs this artwork created by Bosch?\tMaybe\n")
    with pytest.raises(ValueError, match=rf"^mme: {re.escape(str(txt))}: line 2: answer 'Maybe' is not 'Yes' or 'No'"):
        read_mme(mme_root)


def test_a_leading_bom_is_ignored_by_every_reader(tmp_path, mme_root):
    # Windows editors write a UTF-8 BOM; pandas skips it in the MMBench TSV and every other reader does the same
    # (MME kept it in the first question, the JSON readers refused the file).
    txt = mme_root / "OCR" / "0001.txt"
    txt.write_text("Is the word \"high\"?\tYes\nIs it \"low\"?\tNo\n", encoding="utf-8-sig")
    assert read_mme(mme_root, subtasks=["OCR"])[0].question == 'Is the word "high"?'

    gqa = tmp_path / "gqa" / "testdev_balanced_questions.json"
    write_json(gqa, {"1": {"imageId": "n1", "question": "Is it red?", "answer": "yes"}})
    gqa.write_text(gqa.read_text(), encoding="utf-8-sig")
    (gqa.parent / "images").mkdir()
    assert [(r.question_id, r.question) for r in read_gqa(gqa)] == [("1", "Is it red?")]

    pope = tmp_path / "pope" / "coco_pope_random.json"
    write_pope(pope, [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}])
    pope.write_text(pope.read_text(), encoding="utf-8-sig")
    assert [r.question_id for r in read_pope(pope)] == ["random/1"]

    img = base64.b64encode(png_bytes()).decode()
    tsv = write_tsv(tmp_path / "mmbench.tsv", MMB_HEADER, [[7, "Which?", "", "x", "y", "", "", "B", "c", "l2", img]])
    tsv.write_text(tsv.read_text(), encoding="utf-8-sig")
    assert [(r.question_id, r.answers) for r in read_mmbench(tsv)] == [("7", ["B"])]


# ----------------------------------------------------------------------------- dispatch + HF dataset


def test_dispatch_names():
    assert BENCHMARKS == ["vqav2", "gqa", "pope", "scienceqa_img", "vizwiz", "mme", "mmbench"]
    assert set(BENCHMARK_METRIC) == set(BENCHMARKS)
    with pytest.raises(ValueError, match="Unknown benchmark 'coco'; available benchmarks: vqav2, gqa"):
        read_benchmark("coco", ".")


def test_read_benchmark_alias_and_limit(mme_root):
    assert len(read_benchmark("MME", mme_root, limit=3)) == 3


def test_format_multiple_choice():
    assert format_multiple_choice("Q?", ["x", "y"], "H", hint_prefix="Context: ") == "Context: H\nQ?\nA. x\nB. y"


def test_to_hf_dataset(mme_root, tmp_path):
    records = read_mme(mme_root)[:2] + [
        VqaRecord(question_id="m1", image=png_bytes(size=(3, 3)), question="Q?\nA. x\nB. y", answers=["A"],
                  family="cat", choices=["x", "y"], benchmark="mmbench")]
    ds = to_hf_dataset(records)
    assert set(ds.column_names) == {"question_id", "image", "question", "prompt", "answers", "family", "benchmark",
                                    "choices", "image_id"}
    # the prompt the evaluator asks (a dataset built from the records asked the bare question)
    assert ds[2]["prompt"] == "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    # MME gets the short-answer line (in place of a "Please answer yes or no.", which this question lacks), as
    # lmms-eval and LLaVA-1.5 ask MME
    assert ds[0]["prompt"] == ds[0]["question"] + "\nAnswer the question using a single word or phrase."
    assert len(ds) == 3
    assert ds[0]["image"].size == (2, 9)  # lazily decoded from the path
    assert ds[2]["image"].size == (3, 3)  # decoded from bytes
    assert ds[0]["choices"] is None and ds[2]["choices"] == ["x", "y"]
    assert ds[1]["answers"] == ["No"] and ds[2]["family"] == "cat"


def test_load_data_names_a_missing_folder_as_missing(tmp_path):
    """A wrong dataset path was a ValueError, where every reader says FileNotFoundError for a missing path."""
    from rcp_llava.evaluation import load_data

    with pytest.raises(FileNotFoundError, match=r"^--data '.*/no_such_dataset' is neither 'testbed', a dataset folder "
                                                r"nor BENCHMARK:PATH \(no such folder\)\.$"):
        load_data(str(tmp_path / "no_such_dataset"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"^--data '.*/afile' is neither 'testbed', a dataset folder nor "
                                         r"BENCHMARK:PATH\.$"):
        load_data(str(tmp_path / "afile"))


def test_benchmark_names_and_specs_are_read_as_the_cli_documents(tmp_path):
    from rcp_llava.evaluation import parse_benchmark_spec

    assert canonical_benchmark("scienceqa-img") == canonical_benchmark("ScienceQA_IMG") == "scienceqa_img"
    with pytest.raises(ValueError, match=r"^--data 'pope:/d/p,image_dir=': the option 'image_dir' is empty"):
        parse_benchmark_spec("pope:/d/p,image_dir=")
    # an MME line whose question is empty is no question (it was a record asking '')
    make_image(tmp_path / "mme" / "OCR" / "a.png")
    (tmp_path / "mme" / "OCR" / "a.txt").write_text("\tYes\n")
    with pytest.raises(ValueError, match=r"a\.txt: line 1 is not 'question<TAB>answer'"):
        read_mme(tmp_path / "mme")

