"""What `benchmarks/evaluate_methods.py` and `rcp_llava.evaluation.load_data` make of their inputs before (and after)
the model runs: MME's prompt, every image checked at load, unique names for two datasets of one benchmark, VQAv2's
annotations beside a questions file, `--image_folder`, results written meanwhile by another run, and the subset
`--max_samples` takes. The model is never loaded: `load_base_model` / `evaluate_grid` are replaced by stand-ins."""

import json
import logging
import os
import re

import pytest

from conftest import load_benchmark, make_image, write_json
from rcp_llava.evaluation import load_data, score_benchmark
from rcp_llava.readers import read_benchmark, to_hf_dataset
from rcp_llava.results import write_results


def pope_folder(root, questions=2):
    """POPE in its release layout: one JSON-lines file per split, each split asking about its own image."""
    for cat in ("random", "popular", "adversarial"):
        make_image(root / f"{cat}.jpg")
        lines = [json.dumps({"question_id": i + 1, "image": f"{cat}.jpg", "text": f"Is there a {cat} {i}?",
                             "label": "yes" if i % 2 == 0 else "no"}) for i in range(questions)]
        (root / f"coco_pope_{cat}.json").write_text("\n".join(lines) + "\n")
    return root


def mme_folder(root, images=2):
    """MME's flat layout: <subtask>/<image>.png + <image>.txt, two yes/no questions per image."""
    for task in ("OCR", "color"):
        for k in range(images):
            make_image(root / task / f"{k}.png")
            (root / task / f"{k}.txt").write_text(f"Is it {task} {k}? Please answer yes or no.\tYes\n"
                                                  f"Is it not {task} {k}? Please answer yes or no.\tNo\n")
    return root


class Stand_ins:
    """`load_base_model` and `evaluate_grid` replaced: the data `main` hands over are recorded, no model loads."""

    def __init__(self, monkeypatch, during_grid=None):
        import rcp_llava.evaluation as evaluation

        self.loaded, self.data, self.grid_kwargs = 0, [], []

        def load_base_model(*args, **kwargs):
            self.loaded += 1
            return object(), None

        def evaluate_grid(base, processor, data, *args, **kwargs):
            self.data.append(data)
            self.grid_kwargs.append((args, kwargs))
            if during_grid is not None:
                during_grid()
            return {"data": data.name, "rows": []}

        monkeypatch.setattr(evaluation, "load_base_model", load_base_model)
        monkeypatch.setattr(evaluation, "evaluate_grid", evaluate_grid)
        monkeypatch.setattr(evaluation, "format_table", lambda result: f"**{result['data']}**\n")


def run_main(tmp_path, *argv):
    """evaluate_methods on an empty --model folder (the checks before the model need only a folder)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    return load_benchmark("evaluate_methods").main(
        ["--model", str(tmp_path / "model"), "--methods", "none", "--budgets", "1/3", "--output_dir",
         str(tmp_path / "out"), "--name", "r", "--no_progress", *argv])


# ----------------------------------------------------------------------------- 1. MME's prompt


def test_mme_is_asked_as_lmms_eval_and_llava_ask_it(tmp_path):
    records = read_benchmark("mme", mme_folder(tmp_path / "MME", images=1))
    # lmms-eval tasks/mme/utils.py mme_doc_to_text + mme.yaml post_prompt; LLaVA-1.5's llava_mme.jsonl
    assert [r.prompt for r in records[:2]] == [
        "Is it OCR 0?\nAnswer the question using a single word or phrase.",
        "Is it not OCR 0?\nAnswer the question using a single word or phrase."]
    assert records[0].question == "Is it OCR 0? Please answer yes or no."  # the raw question stays
    assert to_hf_dataset(records[:1])[0]["prompt"] == records[0].prompt
    # the short answers that prompt asks for are what the MME metric parses
    result = score_benchmark("mme", ["Yes", "no", "yes", "Yes"], records)
    assert result["groups"] == {"OCR": 200.0, "color": 50.0}  # acc + acc+, in percent


# ----------------------------------------------------------------------------- 2. every image checked at load


def test_a_missing_image_anywhere_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    pope = pope_folder(tmp_path / "pope")
    (pope / "popular.jpg").unlink()  # the second file's image: the first question's image is there
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"pope: 1 of the 3 image files of --data 'pope:{pope}' do not exist ({pope / 'popular.jpg'}; the first "
            f"for question 'popular/1'); pass the folder that holds them: pope:{pope},image_dir=DIR.") + "$"):
        load_data(f"pope:{pope}")
    images = tmp_path / "images"
    make_image(images / "random.jpg")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"pope: 2 of the 3 image files of --data 'pope:{pope},image_dir={images}' do not exist "
            f"({images / 'adversarial.jpg'}, {images / 'popular.jpg'}; the first for question 'adversarial/1'); the "
            f"image_dir given, {images}, lacks them: pass the folder that holds them.") + "$"):
        load_data(f"pope:{pope},image_dir={images}")
    # in the command, before the model and before the dataset given first (complete) is evaluated
    stand_ins = Stand_ins(monkeypatch)
    good = pope_folder(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match=re.escape(f"1 of the 3 image files of --data 'pope:{pope}'")):
        run_main(tmp_path, "--data", f"pope:{good}", "--data", f"pope:{pope}")
    assert stand_ins.loaded == 0 and stand_ins.data == []


def test_the_grid_flags_reach_evaluate_grid_for_every_dataset(tmp_path, monkeypatch):
    """--fastv_layer, --batch_size, --max_new_tokens, --flop_matched and --plugins_per_budget are checked at start-up
    and recorded in the command: each must also reach the grid of every --data (one parsed and checked but not passed
    on ran the default while the table's command said otherwise)."""
    from conftest import tiny_config

    tiny_config(num_hidden_layers=4).save_pretrained(tmp_path / "model")
    first, second = pope_folder(tmp_path / "a"), pope_folder(tmp_path / "b")
    (tmp_path / "p13").mkdir()
    stand_ins = Stand_ins(monkeypatch)
    run_main(tmp_path, "--methods", "none,fastv,rcp", "--budgets", "1/3,1/9", "--data", f"pope:{first}", "--data",
             f"pope:{second}", "--fastv_layer", "2", "--batch_size", "3", "--max_new_tokens", "5", "--flop_matched",
             "--plugins_per_budget", f"1/3={tmp_path / 'p13'}")
    assert len(stand_ins.grid_kwargs) == 2
    for args, kwargs in stand_ins.grid_kwargs:
        assert args == (["none", "fastv", "rcp"], ["1/3", "1/9"])
        assert {k: kwargs[k] for k in ("fastv_layer", "batch_size", "max_new_tokens", "flop_matched", "oracle",
                                       "plugins_per_budget", "progress")} == {
            "fastv_layer": 2, "batch_size": 3, "max_new_tokens": 5, "flop_matched": True, "oracle": False,
            "plugins_per_budget": {"1/3": str(tmp_path / "p13")}, "progress": False}
    # without the flags: the grid's defaults (FastV's K from the depth, no per-budget plug-ins)
    run_main(tmp_path, "--data", f"pope:{first}", "--name", "d")
    kwargs = stand_ins.grid_kwargs[-1][1]
    assert (kwargs["fastv_layer"], kwargs["batch_size"], kwargs["max_new_tokens"], kwargs["flop_matched"],
            kwargs["plugins_per_budget"]) == (None, 32, 16, False, None)


# ----------------------------------------------------------------------------- 3. unique names


def test_two_datasets_of_one_benchmark_are_named_by_their_specs(tmp_path, monkeypatch):
    first, second = pope_folder(tmp_path / "a"), pope_folder(tmp_path / "b")
    Stand_ins(monkeypatch)
    mme = mme_folder(tmp_path / "M")
    run_main(tmp_path, "--data", f"pope:{first}", "--data", f"pope:{second}", "--data", f"mme:{mme}")
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert [r["data"] for r in saved["results"]] == [f"pope:{first}", f"pope:{second}", "mme"]
    markdown = (tmp_path / "out" / "r.md").read_text()
    assert markdown.startswith(f"# Pruning methods x budgets: pope:{first}, pope:{second}, mme\n")
    assert load_data(f"pope:{first}").name == "pope"  # alone, a benchmark keeps its name
    with pytest.raises(ValueError, match=re.escape(f"--data names ['pope:{first}'] more than once; give each once.")):
        run_main(tmp_path, "--overwrite", "--data", f"pope:{first}", "--data", f"pope:{first}")


# ----------------------------------------------------------------------------- 4. VQAv2 annotations beside a file


def vqav2_folder(root, *annotation_names):
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014", "questions": [{"question_id": 5, "image_id": 42, "question": "How many?"}]})
    write_json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {
        "data_subtype": "test-dev2015", "questions": [{"question_id": 9, "image_id": 1, "question": "Q?"}]})
    for name in annotation_names:
        write_json(root / name, {"annotations": [
            {"question_id": 5, "answer_type": "number", "answers": [{"answer": "2"}] * 10}]})
    make_image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    return root / "v2_OpenEnded_mscoco_val2014_questions.json"


def test_a_vqav2_questions_file_finds_its_annotations_beside_it(tmp_path):
    # the folder holds test-dev questions too, so folder mode refuses it; the questions file is the way in
    questions = vqav2_folder(tmp_path / "one", "v2_mscoco_val2014_annotations.json",
                             "v2_mscoco_train2014_annotations.json")
    (record,) = load_data(f"vqav2:{questions}").rows
    assert (record.answers, record.family) == (["2"] * 10, "number")
    # two files of the questions' subtype: neither is guessed, and the error says how to name one
    questions = vqav2_folder(tmp_path / "two", "v2_mscoco_val2014_annotations.json",
                             "old_v1_mscoco_val2014_annotations.json")
    with pytest.raises(ValueError, match="^" + re.escape(
            f"vqav2: {questions} has no reference answers (1 of the 1 questions read, e.g. question '5'), so it "
            "cannot be scored; pass a split with answers: the val2014 questions with their annotations, as "
            "',annotations=FILE' (found without it only as a folder's one '*annotations*.json', or as the one "
            "beside a questions file whose name holds its subtype, e.g. v2_mscoco_val2014_annotations.json); "
            "test-dev / test answers exist only on the EvalAI server.") + "$"):
        load_data(f"vqav2:{questions}")
    chosen = questions.parent / "old_v1_mscoco_val2014_annotations.json"
    (record,) = load_data(f"vqav2:{questions},annotations={chosen}").rows
    assert record.answers == ["2"] * 10


# ----------------------------------------------------------------------------- 5. --image_folder


def relative_dataset(root):
    """A save_to_disk DatasetDict whose image column holds paths relative to root/imgs (as train_rcp.py trains on
    with --image_folder)."""
    from datasets import Dataset, DatasetDict

    for i in range(3):
        make_image(root / "imgs" / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": "What color?", "answer": "red"} for i in range(3)]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(root / "ds"))
    return root / "ds"


def test_image_folder_reads_a_dataset_with_relative_image_paths(tmp_path, monkeypatch):
    from rcp_llava.data import load_image

    folder = relative_dataset(tmp_path)
    stand_ins = Stand_ins(monkeypatch)
    run_main(tmp_path, "--data", str(folder), "--image_folder", str(tmp_path / "imgs"))
    (data,) = stand_ins.data
    assert data.image_folder == str(tmp_path / "imgs")
    assert load_image(data.rows[2]["image"], data.image_folder).size == (4, 3)
    # without it: refused before the model loads, naming the example, the file and --image_folder
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"Example 0 of the --data '{folder}': its 'image' names the image file '0.png', which does not exist (a "
            f"relative path, read from the working directory {os.getcwd()!r}: give --image_folder if the paths are "
            "relative to a folder). Fix the path or drop the example.")):
        run_main(tmp_path, "--overwrite", "--data", str(folder))
    assert stand_ins.loaded == 1  # the first run only
    with pytest.raises(FileNotFoundError, match=re.escape(f"image_folder {str(tmp_path / 'nowhere')!r} "
                                                          "(--image_folder) is not a folder")):
        run_main(tmp_path, "--overwrite", "--data", str(folder), "--image_folder", str(tmp_path / "nowhere"))
    pope = pope_folder(tmp_path / "pope")
    with pytest.raises(ValueError, match=re.escape("--image_folder is for dataset folders, but every --data")):
        run_main(tmp_path, "--overwrite", "--data", f"pope:{pope}", "--image_folder", str(tmp_path / "imgs"))


# ----------------------------------------------------------------------------- 6. results written meanwhile


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_result_written_meanwhile_is_kept_and_this_run_goes_beside_it(tmp_path, monkeypatch, caplog, hard_links):
    if not hard_links:  # a file system without them: the check-then-rename fallback
        def no_link(src, dst):
            raise PermissionError("no hard links here")
        monkeypatch.setattr(os, "link", no_link)
    stem = str(tmp_path / "r")
    write_json(tmp_path / "r.json", {"run": "B"})
    (tmp_path / "r.md").write_text("B\n")
    (tmp_path / "r-2.md").write_text("C\n")  # a stem with one file taken is not used either
    with caplog.at_level(logging.WARNING):
        written = write_results(stem, markdown="A\n", data={"run": "A"}, overwrite=False)
    assert written == stem + "-3"
    assert json.loads((tmp_path / "r.json").read_text()) == {"run": "B"} and (tmp_path / "r.md").read_text() == "B\n"
    assert (tmp_path / "r-2.md").read_text() == "C\n" and not (tmp_path / "r-2.json").exists()
    assert json.loads((tmp_path / "r-3.json").read_text()) == {"run": "A"}
    assert (tmp_path / "r-3.md").read_text() == "A\n"
    assert f"{stem}.json, {stem}.md: written by another run while this one ran (without --overwrite); they are " \
           f"kept, and this run's results are in {stem}-3.json, {stem}-3.md." in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["r-2.md", "r-3.json", "r-3.md", "r.json", "r.md"]  # no temporary left
    # --overwrite replaces, as before
    assert write_results(stem, markdown="A\n", data={"run": "A"}, overwrite=True) == stem
    assert (tmp_path / "r.md").read_text() == "A\n"


def test_evaluate_methods_keeps_a_result_another_run_wrote_meanwhile(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def other_run():  # same --name, finished while this run evaluated
        write_json(out / "r.json", {"run": "other"})
        (out / "r.md").write_text("other\n")

    Stand_ins(monkeypatch, during_grid=other_run)
    run_main(tmp_path, "--data", f"pope:{pope_folder(tmp_path / 'pope')}")
    assert json.loads((out / "r.json").read_text()) == {"run": "other"}
    assert json.loads((out / "r-2.json").read_text())["results"][0]["data"] == "pope"
    assert capsys.readouterr().out.endswith(f"{out / 'r'}.md / {out / 'r'}.json appeared while this run ran (another "
                                            f"run's, kept): this run's results are in {out / 'r-2'}.md and "
                                            f"{out / 'r-2'}.json\nwrote {out / 'r-2'}.md and {out / 'r-2'}.json\n")


# ------------------------------------------------------------- 7. --max_samples, --split (the counts: test_bad_input)


def test_max_samples_spreads_over_families_and_keeps_mme_pairs(tmp_path):
    pope = pope_folder(tmp_path / "pope", questions=3)
    assert [r.question_id for r in load_data(f"pope:{pope}", max_samples=4).rows] == [
        "adversarial/1", "adversarial/2", "popular/1", "random/1"]
    mme = mme_folder(tmp_path / "MME")  # 2 sub-tasks x 2 images x 2 questions
    assert [r.question_id for r in load_data(f"mme:{mme}", max_samples=4).rows] == [
        "OCR/0.png/0", "OCR/0.png/1", "color/0.png/0", "color/0.png/1"]
    assert [r.question_id for r in load_data(f"mme:{mme}", max_samples=5).rows] == [
        "OCR/0.png/0", "OCR/0.png/1", "OCR/1.png/0", "color/0.png/0", "color/0.png/1"]
    from rcp_llava.readers import spread_subset

    records = read_benchmark("mme", mme)
    assert spread_subset(records, 8) == records and spread_subset(records, 100) == records


def test_a_split_no_data_is_read_by_is_refused(tmp_path, monkeypatch):
    pope = pope_folder(tmp_path / "pope")
    stand_ins = Stand_ins(monkeypatch)
    with pytest.raises(ValueError, match="^" + re.escape(
            f"--split 'val' is used by no --data (['pope:{pope}']): only a DatasetDict folder and ScienceQA-IMG "
            "(without its own ',split=') are read by split. Drop --split.") + "$"):
        run_main(tmp_path, "--data", f"pope:{pope}", "--split", "val")
    assert stand_ins.loaded == 0
    run_main(tmp_path, "--data", f"pope:{pope}")  # the default split is no one's choice: nothing to refuse
    run_main(tmp_path, "--overwrite", "--data", str(relative_dataset(tmp_path)), "--split", "test",
             "--image_folder", str(tmp_path / "imgs"))
    assert [data.split for data in stand_ins.data] == [None, "test"]
