# Copyright 2025 The rcp-llava authors. Licensed under the Apache License, Version 2.0.
"""Readers for locally held VQA benchmark files.

Every reader turns one benchmark, in the layout it is distributed in, into a list of
uniform :class:`VqaRecord` objects; images stay lazy (a path, or encoded bytes for
MMBench) until :meth:`VqaRecord.load_image` is called::

    from rcp_llava.readers import read_benchmark, to_hf_dataset
    records = read_benchmark("pope", "data/pope/coco_pope_random.json", image_dir="data/coco/val2014")
    ds = to_hf_dataset(records)   # columns: image, question, prompt, answers, family, ...

The model is asked ``record.prompt``: the question (``record.question``, kept verbatim: for multiple choice
with its lettered options) followed by the answer-format line LLaVA-1.5's evaluation files and lmms-eval append
for that benchmark (``POST_PROMPTS``: "Answer the question using a single word or phrase." for VQAv2, GQA, POPE
and VizWiz, the latter after "When the provided information is insufficient, respond with 'Unanswerable'.";
"Answer with the option's letter from the given choices directly." for ScienceQA-IMG and MMBench; for MME the
short-answer line too, in place of the "Please answer yes or no." its questions end in, as lmms-eval's
``mme_doc_to_text`` and LLaVA-1.5's llava_mme.jsonl ask it).

Bad input raises ``FileNotFoundError`` (missing file or folder) or ``ValueError``
(malformed content, or a file / split that holds no questions), naming the path and the
layout that was expected. A UTF-8 byte-order mark at the start of a file (Windows editors
write one) is ignored by every reader, as pandas already does for the MMBench TSV.
"""

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from transformers.utils import logging


logger = logging.get_logger(__name__)

PathLike = Union[str, Path]

BENCHMARKS: List[str] = ["vqav2", "gqa", "pope", "scienceqa_img", "vizwiz", "mme", "mmbench"]

# The shipped metric (``rcp_llava.metrics.load_metric`` name) that scores each benchmark.
BENCHMARK_METRIC: Dict[str, str] = {
    "vqav2": "vqa_accuracy",
    "gqa": "exact_match",
    "pope": "pope",
    "scienceqa_img": "exact_match",
    "vizwiz": "vqa_accuracy",
    "mme": "mme",
    "mmbench": "exact_match",
}

# The answer-format line appended to each benchmark's question (`VqaRecord.prompt`), as LLaVA-1.5's question files
# (llava_vqav2_mscoco_test-dev2015.jsonl, llava_gqa_testdev_balanced.jsonl, llava_pope_test.jsonl,
# vizwiz/llava_test.jsonl; --single-pred-prompt of model_vqa_science.py / model_vqa_mmbench.py) and lmms-eval's
# tasks (post_prompt of vqav2, gqa, pope, vizwiz_vqa, scienceqa_img, mmbench_en) write it. MME's questions end in
# "Please answer yes or no."; both of those drop it and append the short-answer line instead (lmms-eval
# tasks/mme/utils.py `mme_doc_to_text` + mme.yaml's post_prompt; LLaVA-1.5's llava_mme.jsonl asks
# "Is there a cat?\nAnswer the question using a single word or phrase."): `VqaRecord.prompt` does the same.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
POST_PROMPTS: Dict[str, str] = {
    "vqav2": SHORT_ANSWER,
    "gqa": SHORT_ANSWER,
    "pope": SHORT_ANSWER,
    "scienceqa_img": OPTION_LETTER_ANSWER,
    "vizwiz": "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER,
    "mme": SHORT_ANSWER,
    "mmbench": OPTION_LETTER_ANSWER,
}
# Removed from an MME question before its answer-format line (lmms-eval's `replace_prompt`): the model would
# otherwise be told two answer formats at once.
MME_YES_NO_PROMPT = "Please answer yes or no."

LAYOUTS: Dict[str, str] = {
    "vqav2": (
        "VQAv2: a questions JSON {'questions': [{'question_id', 'image_id', 'question'}, ...], 'data_subtype': "
        "'val2014'} (or a folder holding one '*questions*.json' and optionally one '*annotations*.json'), an "
        "annotations JSON {'annotations': [{'question_id', 'answers': [{'answer', ...}], 'answer_type', ...}]} "
        "and an image folder with COCO_<subtype>_<12-digit image_id>.jpg files"
    ),
    "gqa": (
        "GQA: a questions JSON (e.g. testdev_balanced_questions.json) mapping question id -> {'imageId', "
        "'question', 'answer', 'types': {...}, ...}, images as <image_dir>/<imageId>.jpg (default image_dir: "
        "'images/' next to the JSON)"
    ),
    "pope": (
        "POPE: JSON-lines files (e.g. coco_pope_random.json) with one {'question_id', 'image', 'text', "
        "'label': 'yes'|'no'} object per line, the split (random/popular/adversarial) in the file name, or a "
        "folder of such files; images in image_dir"
    ),
    "scienceqa_img": (
        "ScienceQA: a folder with problems.json (pid -> {'question', 'choices', 'answer': int, 'hint', "
        "'image', 'subject', ...}) and pid_splits.json ({'train': [pid, ...], 'test': [...], ...}); images "
        "as <image_dir>/<pid>/image.png (default image_dir: images/<split>/ or <split>/ in that folder, else "
        "those of each problem's own split: minival reads images/val/)"
    ),
    "vizwiz": (
        "VizWiz: an annotation JSON (e.g. Annotations/val.json) holding a list of {'image', 'question', 'answers': "
        "[{'answer', 'answer_confidence'}], 'answerable', 'answer_type'} objects; images in image_dir "
        "(default: the folder named after the JSON's stem, e.g. 'val/', next to the JSON or next to its folder, "
        "else the JSON's folder)"
    ),
    "mme": (
        "MME: a folder with one sub-folder per sub-task, either <subtask>/images/<img> + "
        "<subtask>/questions_answers_YN/<img stem>.txt, or flat <subtask>/<img>.png|jpg + "
        "<subtask>/<img stem>.txt; each txt line is 'question<TAB>Yes|No'"
    ),
    "mmbench": (
        "MMBench: a TSV file with a header row and columns index, question, hint, A, B, C, D, answer, "
        "category, l2-category, image (base64-encoded)"
    ),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".webp")
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass
class VqaRecord:
    """One benchmark question with a lazily loaded image.

    Attributes:
        question_id: unique id within the benchmark (always a string).
        image: path to the image file, or the encoded image bytes (MMBench).
        question: the question text (raw: no answer-format line); for multiple choice it already lists the
            lettered options. The model is asked :attr:`prompt`.
        answers: reference answers (10 annotators for VQAv2 / VizWiz, the option letter for
            multiple choice, "yes"/"no" for POPE / MME); empty when the split has none.
        family: question family / category used for breakdowns (answer type, POPE split,
            MME sub-task, ScienceQA subject, MMBench category, ...).
        choices: option texts for multiple-choice benchmarks, else ``None``.
        benchmark: the benchmark name (one of ``BENCHMARKS``).
        image_id: image identifier (groups the questions of one image, e.g. for MME acc+).
    """

    question_id: str
    image: Union[str, bytes]
    question: str
    answers: List[str]
    family: str = ""
    choices: Optional[List[str]] = None
    benchmark: str = ""
    image_id: str = ""

    @property
    def prompt(self) -> str:
        """What the model is asked: :attr:`question` + the benchmark's answer-format line (``POST_PROMPTS``); an
        MME question first loses its "Please answer yes or no." (``MME_YES_NO_PROMPT``), as lmms-eval's
        ``mme_doc_to_text`` removes it."""
        question = self.question
        if self.benchmark == "mme":
            question = question.replace(MME_YES_NO_PROMPT, "").strip()
        return question + POST_PROMPTS.get(self.benchmark, "")

    def load_image(self):
        """Open the image as an RGB ``PIL.Image.Image``, turned upright by its EXIF orientation as
        ``datasets.Image`` decodes it (a rotated photo came out sideways from a path, upright from a dataset)."""
        if isinstance(self.image, (bytes, bytearray)):
            return open_rgb(io.BytesIO(self.image))
        path = Path(self.image)
        if not path.is_file():
            raise FileNotFoundError(
                f"Image file not found: {path} (question {self.question_id!r} of {self.benchmark or 'a benchmark'}); "
                f"expected layout -- {LAYOUTS.get(self.benchmark, 'an image file at that path')}"
            )
        return open_rgb(path)


def open_rgb(source):
    """The image file (path or file object) `source` as RGB, rotated by its EXIF orientation exactly as
    ``datasets.Image.decode_example`` does (only when the tag is there: untagged images are left bit-identical).
    Every reader of an image file (``VqaRecord.load_image``, ``rcp_llava.data.load_image``) opens it here."""
    from PIL import ExifTags, Image, ImageOps

    with Image.open(source) as img:
        if img.getexif().get(ExifTags.Base.Orientation) is not None:
            return ImageOps.exif_transpose(img).convert("RGB")
        return img.convert("RGB")


# ----------------------------------------------------------------------------- helpers


def format_multiple_choice(question: str, choices: Sequence[str], hint: Optional[str] = None,
                           hint_prefix: str = "") -> str:
    """Multiple-choice prompt: optional hint line, the question, then "A. option" lines."""
    lines = []
    if hint:
        lines.append(f"{hint_prefix}{hint}")
    lines.append(question)
    lines.extend(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return "\n".join(lines)


def _require_file(path: Path, benchmark: str, what: str = "file") -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{benchmark}: {what} not found: {path}. Expected layout -- {LAYOUTS[benchmark]}")
    return path


def _require_dir(path: Path, benchmark: str, what: str = "folder") -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{benchmark}: {what} not found: {path}. Expected layout -- {LAYOUTS[benchmark]}")
    return path


def _load_json(path: Path, benchmark: str):
    _require_file(path, benchmark, "JSON file")
    try:
        # utf-8-sig: json refuses a leading BOM, which says nothing about the content; skip it as the TSV reader does.
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{benchmark}: {path} is not valid JSON ({err}). Expected layout -- {LAYOUTS[benchmark]}")


def _bad(benchmark: str, path: Path, problem: str) -> ValueError:
    return ValueError(f"{benchmark}: {path}: {problem}. Expected layout -- {LAYOUTS[benchmark]}")


def _checked(records: List[VqaRecord], benchmark: str, path: Path, answers_path: Optional[Path] = None
             ) -> List[VqaRecord]:
    """Every record's question and answers are text and its id is unique, or a ValueError names the file
    (`answers_path` for the answers, when they have their own) and the record: a JSON null or number got through and
    failed after the model had loaded (a null question in the prompt, a null answer in the metric after every
    question was generated), and a repeated id merged two questions."""
    seen = set()
    for r in records:
        if not isinstance(r.question, str) or not r.question.strip():
            raise _bad(benchmark, path, f"question {r.question_id!r}: the question is {r.question!r}, not text")
        bad = [a for a in r.answers if not isinstance(a, str)]
        if bad:
            raise _bad(benchmark, answers_path or path, f"question {r.question_id!r}: answer {bad[0]!r} is not text")
        if r.question_id in seen:
            raise _bad(benchmark, path, f"question id {r.question_id!r} appears twice")
        seen.add(r.question_id)
    return records


def _find_image(folder: Path, stem: str) -> Optional[Path]:
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _glob_one(folder: Path, pattern: str, benchmark: str, required: bool) -> Optional[Path]:
    found = sorted(folder.glob(pattern))
    if not found:
        if required:
            raise FileNotFoundError(
                f"{benchmark}: no file matching {pattern!r} in {folder}. Expected layout -- {LAYOUTS[benchmark]}"
            )
        return None
    if len(found) > 1:
        raise _bad(benchmark, folder, f"several files match {pattern!r} ({', '.join(p.name for p in found)}); "
                                      "pass the file path instead of the folder")
    return found[0]


# ----------------------------------------------------------------------------- VQAv2


def read_vqav2(path: PathLike, annotations: Optional[PathLike] = None, image_dir: Optional[PathLike] = None,
               data_subtype: Optional[str] = None) -> List[VqaRecord]:
    """Read VQAv2 (official JSON files).

    Args:
        path: the questions JSON, or a folder holding exactly one ``*questions*.json`` (and
            optionally one ``*annotations*.json``, used when ``annotations`` is not given).
        annotations: the annotations JSON. Default: for a folder, its one ``*annotations*.json``; for a questions
            file, the one ``*annotations*.json`` beside it whose name holds the questions' subtype (e.g.
            ``v2_mscoco_val2014_annotations.json`` for val2014 questions), when exactly one does. Without one,
            records have no answers (test splits).
        image_dir: folder of ``COCO_<subtype>_<image_id:012d>.jpg``; default ``<folder>/<subtype>``
            if it exists, else the folder of the questions file.
        data_subtype: e.g. ``"val2014"``; default: the questions file's ``data_subtype``.
    """
    path = Path(path)
    name = "vqav2"
    if path.is_dir():
        root = path
        questions_file = _glob_one(path, "*questions*.json", name, required=True)
        if annotations is None:
            annotations = _glob_one(path, "*annotations*.json", name, required=False)
    else:
        root = path.parent
        questions_file = path
    data = _load_json(questions_file, name)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise _bad(name, questions_file, "expected a JSON object with a 'questions' list")
    # An empty benchmark would only fail later, after the model has loaded; refuse it while the file is named.
    if not data["questions"]:
        raise _bad(name, questions_file, "no questions (the 'questions' list is empty)")
    subtype = data_subtype or data.get("data_subtype") or "val2014"
    if annotations is None and not path.is_dir():
        # A questions file beside its annotations (the folder holding test-dev questions too, which folder mode
        # refuses as ambiguous): the annotations of its own subtype, only when one file is unmistakably them.
        matching = [p for p in sorted(root.glob("*annotations*.json")) if subtype in p.name]
        if len(matching) == 1:
            annotations = matching[0]
            logger.info(f"vqav2: using the annotations {annotations} beside {questions_file}")
        elif matching:
            logger.warning(f"vqav2: several annotation files beside {questions_file} name {subtype!r} "
                           f"({', '.join(p.name for p in matching)}); none is used: pass one as annotations=")
    # test-dev questions (data_subtype "test-dev2015") use the test2015 images.
    subtype = "test2015" if subtype == "test-dev2015" else subtype

    answers_by_qid: Optional[Dict[int, dict]] = None
    if annotations is not None:
        ann_file = Path(annotations)
        ann = _load_json(ann_file, name)
        if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
            raise _bad(name, ann_file, "expected a JSON object with an 'annotations' list")
        try:
            answers_by_qid = {a["question_id"]: a for a in ann["annotations"]}
        except (KeyError, TypeError):
            raise _bad(name, ann_file, "every annotation needs a 'question_id'")

    if image_dir is None:
        image_dir = root / subtype if (root / subtype).is_dir() else root
    image_dir = _require_dir(Path(image_dir), name, "image folder")

    records = []
    for q in data["questions"]:
        try:
            qid, image_id, question = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError):
            raise _bad(name, questions_file, f"question entry {q!r} lacks 'question_id'/'image_id'/'question'")
        answers, family = [], ""
        if answers_by_qid is not None:
            if qid not in answers_by_qid:
                raise _bad(name, Path(annotations), f"no annotation for question_id {qid}")
            a = answers_by_qid[qid]
            try:
                answers = [x["answer"] for x in a.get("answers", [])]
            except (KeyError, TypeError, AttributeError):
                raise _bad(name, Path(annotations), f"the annotation of question_id {qid} has an answer without "
                                                    "'answer'")
            family = a.get("answer_type", "")
        try:
            image_number = int(image_id)
        except (TypeError, ValueError):
            raise _bad(name, questions_file, f"question_id {qid}: 'image_id' {image_id!r} is not a COCO image number")
        records.append(VqaRecord(
            question_id=str(qid),
            image=str(image_dir / f"COCO_{subtype}_{image_number:012d}.jpg"),
            question=question,
            answers=answers,
            family=family,
            benchmark=name,
            image_id=str(image_id),
        ))
    return _checked(records, name, questions_file, Path(annotations) if annotations is not None else None)


# ----------------------------------------------------------------------------- GQA


def read_gqa(path: PathLike, image_dir: Optional[PathLike] = None) -> List[VqaRecord]:
    """Read GQA balanced questions (e.g. ``testdev_balanced_questions.json``).

    Args:
        path: the questions JSON, or a folder holding ``testdev_balanced_questions.json``.
        image_dir: folder of ``<imageId>.jpg``; default ``images/`` next to the JSON.
    Family is the structural question type (``types['structural']``: query, verify, ...).
    """
    name = "gqa"
    path = Path(path)
    if path.is_dir():
        path = path / "testdev_balanced_questions.json"
    data = _load_json(path, name)
    if not isinstance(data, dict):
        raise _bad(name, path, "expected a JSON object mapping question id -> question entry")
    if not data:
        raise _bad(name, path, "no questions (the JSON object is empty)")
    image_dir = _require_dir(Path(image_dir) if image_dir is not None else path.parent / "images", name,
                             "image folder")
    records = []
    for qid, q in data.items():
        if not isinstance(q, dict) or "imageId" not in q or "question" not in q:
            raise _bad(name, path, f"entry {qid!r} lacks 'imageId'/'question'")
        types = q.get("types") or {}
        records.append(VqaRecord(
            question_id=str(qid),
            image=str(image_dir / f"{q['imageId']}.jpg"),
            question=q["question"],
            answers=[q["answer"]] if "answer" in q else [],
            family=types.get("structural", "") if isinstance(types, dict) else "",
            benchmark=name,
            image_id=str(q["imageId"]),
        ))
    return _checked(records, name, path)


# ----------------------------------------------------------------------------- POPE

POPE_CATEGORIES = ("random", "popular", "adversarial")


def _pope_category(file: Path) -> str:
    for cat in POPE_CATEGORIES:
        if re.search(rf"(^|[^a-z]){cat}([^a-z]|$)", file.stem.lower()):
            return cat
    logger.warning(f"pope: no random/popular/adversarial in file name {file.name}; using {file.stem!r} as category")
    return file.stem


def _read_pope_file(file: Path, image_dir: Path) -> List[VqaRecord]:
    name = "pope"
    category = _pope_category(file)
    text = _require_file(file, name).read_text(encoding="utf-8-sig")  # a leading BOM is not JSON
    if text.lstrip().startswith("["):  # the whole file one JSON array, as some POPE copies are
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise _bad(name, file, f"starts with '[' but is not a JSON array ({err.msg} at line {err.lineno} "
                                   f"column {err.colno}); write one JSON object per line or a valid array") \
                from None
    else:
        rows = []
        # lines are "\n"-separated (`splitlines` also splits inside a row's U+2028, which JSON strings may hold)
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:  # its own position is on line 1 of that line
                    raise _bad(name, file, f"line {number} is not JSON ({err.msg} at column {err.colno})") \
                        from None
    records = []
    for row in rows:
        if not isinstance(row, dict) or not {"question_id", "image", "text", "label"} <= row.keys():
            raise _bad(name, file, f"line {row!r} lacks one of 'question_id', 'image', 'text', 'label'")
        for key in ("image", "text"):  # a null image crashed joining the path, a null question in the prompt
            if not isinstance(row[key], str) or not row[key].strip():
                raise _bad(name, file, f"question_id {row['question_id']}: '{key}' is {row[key]!r}, not text")
        if str(row["label"]).strip().lower() not in ("yes", "no"):
            raise _bad(name, file, f"question_id {row['question_id']}: label {row['label']!r} is not 'yes' or 'no'")
        records.append(VqaRecord(
            question_id=f"{category}/{row['question_id']}",
            image=str(image_dir / row["image"]),
            question=row["text"],
            answers=[str(row["label"]).strip().lower()],
            family=category,
            benchmark=name,
            image_id=str(row["image"]),
        ))
    if not records:
        raise _bad(name, file, "no questions in the file")
    return _checked(records, name, file)


def read_pope(path: PathLike, image_dir: Optional[PathLike] = None) -> List[VqaRecord]:
    """Read POPE question files.

    Args:
        path: one JSON-lines file (``coco_pope_<split>.json``), or a folder: every
            ``*.json`` / ``*.jsonl`` file in it whose name has random / popular / adversarial.
        image_dir: COCO val2014 image folder; default: the folder of the files.
    Family is the split from the file name; question ids are ``"<split>/<question_id>"``.
    """
    name = "pope"
    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir())
                 if p.suffix in (".json", ".jsonl") and any(c in p.stem.lower() for c in POPE_CATEGORIES)]
        if not files:
            raise FileNotFoundError(f"pope: no random/popular/adversarial .json/.jsonl files in {path}. "
                                    f"Expected layout -- {LAYOUTS[name]}")
        root = path
    else:
        _require_file(path, name)
        files, root = [path], path.parent
    image_dir = _require_dir(Path(image_dir) if image_dir is not None else root, name, "image folder")
    return [record for file in files for record in _read_pope_file(file, image_dir)]


# ----------------------------------------------------------------------------- ScienceQA-IMG


def read_scienceqa_img(path: PathLike, split: str = "test", image_dir: Optional[PathLike] = None) -> List[VqaRecord]:
    """Read the image subset of ScienceQA (``problems.json`` + ``pid_splits.json``).

    Only problems with an image are kept. The question lists the lettered choices
    (``"Context: <hint>"`` first when there is a hint); the answer is the option letter;
    family is the subject (natural / social / language science).

    Args:
        path: the folder holding both JSON files (or the path of ``problems.json``).
        split: a key of ``pid_splits.json`` (``"test"``, ``"val"``, ``"minival"``, ...).
        image_dir: folder of ``<pid>/image.png``; default ``images/<split>`` or ``<split>``
            inside the folder, else each problem's own split's (the release has images/train,
            val and test only: ``minival`` is part of val, ``trainval`` of two folders).
    """
    name = "scienceqa_img"
    path = Path(path)
    if not path.is_dir() and path.suffix != ".json":  # a mistyped folder: named as given, not its parent's file
        _require_dir(path, name, "folder (problems.json + pid_splits.json)")
    root = path if path.is_dir() else path.parent
    problems = _load_json(root / "problems.json", name)
    splits = _load_json(root / "pid_splits.json", name)
    if not isinstance(problems, dict):
        raise _bad(name, root / "problems.json", "expected a JSON object mapping pid -> problem")
    if not isinstance(splits, dict) or split not in splits:
        available = sorted(splits) if isinstance(splits, dict) else []
        raise _bad(name, root / "pid_splits.json", f"no split {split!r} (available: {available})")
    def split_folder(key):  # where the release puts a split's images
        return next((c for c in (root / "images" / key, root / key) if c.is_dir()), None)

    if image_dir is not None:
        image_dir = _require_dir(Path(image_dir), name, "image folder")
    else:
        image_dir = split_folder(split)  # None: each problem's own split's folder (minival's are in val)

    if not isinstance(splits[split], list):  # a string would read as one pid per character
        raise _bad(name, root / "pid_splits.json", f"split {split!r} is not a list of problem ids")
    records = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise _bad(name, root / "problems.json", f"pid {pid} of split {split!r} is missing")
        prob = problems[pid]
        if not isinstance(prob, dict):
            raise _bad(name, root / "problems.json", f"problem {pid} is a JSON {type(prob).__name__}, not an object")
        if not prob.get("image"):
            continue
        if not isinstance(prob.get("choices"), list):  # a string would read as one option per character
            raise _bad(name, root / "problems.json", f"problem {pid}: 'choices' is not a list")
        try:
            choices = [str(c) for c in prob["choices"]]
            answer = prob["answer"]
            # an int (or its digits): int() read 1.7 as option B and true as 1
            if isinstance(answer, bool) or not isinstance(answer, (int, str)):
                raise TypeError(answer)
            index = int(answer)
            question = prob["question"]
            if not isinstance(question, str):
                raise TypeError(question)
        except (KeyError, TypeError, ValueError, IndexError):
            raise _bad(name, root / "problems.json", f"problem {pid} lacks a valid 'question'/'choices'/'answer'")
        if len(choices) > len(OPTION_LETTERS):
            raise _bad(name, root / "problems.json", f"problem {pid} has {len(choices)} choices; options are "
                                                     f"lettered {OPTION_LETTERS[0]}-{OPTION_LETTERS[-1]} (at most "
                                                     f"{len(OPTION_LETTERS)})")
        if not 0 <= index < len(choices):
            raise _bad(name, root / "problems.json",
                       f"problem {pid}: answer index {prob['answer']!r} is outside its {len(choices)} choices")
        letter = OPTION_LETTERS[index]
        folder = image_dir or split_folder(str(prob.get("split", "")))
        if folder is None:
            tried = [root / "images" / split, root / split] + [root / "images" / str(prob.get("split", ""))]
            raise FileNotFoundError(f"scienceqa_img: image folder not found: tried {', '.join(map(str, tried))} "
                                    f"(problem {pid}'s split is {prob.get('split')!r}); give ,image_dir=DIR. "
                                    f"Expected layout -- {LAYOUTS[name]}")
        records.append(VqaRecord(
            question_id=pid,
            image=str(folder / pid / prob["image"]),
            question=format_multiple_choice(question, choices, prob.get("hint"), hint_prefix="Context: "),
            answers=[letter],
            family=prob.get("subject", ""),
            choices=choices,
            benchmark=name,
            image_id=pid,
        ))
    if not records:
        # e.g. a text-only split: an empty list would only fail after the model has loaded
        found = (f"none of its {len(splits[split])} problem(s) has an 'image'" if splits[split]
                 else "the split lists no problems")
        raise _bad(name, root / "pid_splits.json", f"no image problems in split {split!r} ({found})")
    return _checked(records, name, root / "problems.json")


# ----------------------------------------------------------------------------- VizWiz


def read_vizwiz(path: PathLike, image_dir: Optional[PathLike] = None) -> List[VqaRecord]:
    """Read VizWiz-VQA annotations (``val.json``).

    Args:
        path: the annotation JSON, or a folder holding ``val.json`` (or ``Annotations/val.json``).
        image_dir: image folder; default: the folder named after the JSON's stem (``val/`` for ``val.json``,
            ``train/`` for ``train.json``) next to the JSON or next to its folder (the distributed layout:
            ``<root>/Annotations/val.json`` + ``<root>/val/``), else the JSON's own folder: the first of these
            that holds the first question's image.
    Family is ``answer_type`` (``yes/no``, ``number``, ``other``, ``unanswerable``), or
    answerable / unanswerable when absent. The question id is the image file name. The first question's image
    must exist (``FileNotFoundError`` otherwise), so a wrong image folder is reported before any model loads.
    """
    name = "vizwiz"
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / "val.json", path / "Annotations" / "val.json") if p.is_file()),
                    path / "val.json")
    data = _load_json(path, name)
    if not isinstance(data, list):
        raise _bad(name, path, "expected a JSON list of question objects")
    if not data:
        raise _bad(name, path, "no questions (the JSON list is empty)")
    for row in data:
        if not isinstance(row, dict) or "image" not in row or "question" not in row:
            raise _bad(name, path, f"entry {str(row)[:200]!r} lacks 'image'/'question'")
    first = str(data[0]["image"])
    if image_dir is None:
        candidates = list(dict.fromkeys([path.parent / path.stem, path.parent.parent / path.stem, path.parent]))
        image_dir = next((c for c in candidates if (c / first).is_file()), None)
        if image_dir is None:
            raise FileNotFoundError(
                f"vizwiz: the first image of {path}, {first!r}, is in none of {', '.join(map(str, candidates))}; "
                f"pass image_dir= (the folder of the {path.stem!r} images; in a BENCHMARK:PATH spec "
                f"'vizwiz:{path},image_dir=DIR'). Expected layout -- {LAYOUTS[name]}")
    else:
        image_dir = _require_dir(Path(image_dir), name, "image folder")
        if not (image_dir / first).is_file():
            raise FileNotFoundError(
                f"vizwiz: image_dir {str(image_dir)!r} lacks the first image of {path}, {first!r}; pass the folder "
                f"of the {path.stem!r} images. Expected layout -- {LAYOUTS[name]}")
    records = []
    for row in data:
        if not isinstance(row.get("answers", []), list):  # a string would read as one answer per character
            raise _bad(name, path, f"question {row['image']!r}: 'answers' is {row['answers']!r}, not a list")
        if any(isinstance(a, dict) and "answer" not in a for a in row.get("answers", [])):
            raise _bad(name, path, f"question {row['image']!r} has an answer without 'answer'")
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row.get("answers", [])]
        family = row.get("answer_type") or ("" if "answerable" not in row
                                            else "answerable" if row["answerable"] else "unanswerable")
        records.append(VqaRecord(
            question_id=str(row["image"]),
            image=str(image_dir / row["image"]),
            question=row["question"],
            answers=answers,
            family=family,
            benchmark=name,
            image_id=str(row["image"]),
        ))
    return _checked(records, name, path)


# ----------------------------------------------------------------------------- MME


def _parse_mme_txt(txt: Path) -> List[tuple]:
    pairs = []
    # utf-8-sig: a BOM would otherwise become the start of the first question
    for lineno, line in enumerate(txt.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        # exactly two fields: a third was taken as the answer ("Is it red?<TAB>Yes<TAB>No" read as No)
        if len(parts) != 2 or not parts[0].strip() or not parts[-1].strip():
            raise _bad("mme", txt, f"line {lineno} is not 'question<TAB>answer': {line!r}")
        answer = parts[-1].strip()
        # The mme metric accepts only yes / no (any case) and would refuse anything else after all generation.
        if answer.lower() not in ("yes", "no"):
            raise _bad("mme", txt, f"line {lineno}: answer {answer!r} is not 'Yes' or 'No'")
        pairs.append((parts[0].strip(), answer))
    if not pairs:
        raise _bad("mme", txt, "no question lines in the file")
    return pairs


MME_QUESTION_FOLDERS = ("questions_answers_YN", "questions_answer_YES_NO")


def read_mme(path: PathLike, subtasks: Optional[Sequence[str]] = None) -> List[VqaRecord]:
    """Read MME from its release folder (``MME_Benchmark_release_version``).

    Both layouts of the release are accepted per sub-task: ``images/`` + ``questions_answers_YN/``
    (artwork, celebrity, landmark, posters, scene), or flat ``<image>.png|jpg`` + ``<image>.txt``
    pairs. Family is the sub-task (folder name); ``image_id`` is ``"<subtask>/<image file>"`` (the
    acc+ group). A folder named after one of MME's 14 sub-tasks that holds no question file is an
    error: it was skipped, and the score covered the others only.

    Args:
        path: the MME root folder (one sub-folder per sub-task).
        subtasks: optional subset of sub-task folder names to read.
    """
    from rcp_llava.metrics.mme.mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS

    name = "mme"
    root = _require_dir(Path(path), name, "MME root folder")
    if isinstance(subtasks, str):  # one name, not its letters ("OCR" read as 'C', 'O', 'R')
        subtasks = [subtasks]
    wanted = set(subtasks) if subtasks is not None else None
    records = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        task = task_dir.name
        if wanted is not None and task not in wanted:
            continue
        # The release's name (LLaVA's convert_answer_to_mme.py reads it); the second is the one this reader expected
        # before, a name the release never had: the five nested sub-tasks were skipped, the score was over the rest.
        nested = [task_dir / n for n in MME_QUESTION_FOLDERS if (task_dir / n).is_dir()]
        if nested:
            txt_dir, img_dir = nested[0], task_dir / "images"
            _require_dir(img_dir, name, f"image folder of sub-task {task!r}")
        else:
            txt_dir = img_dir = task_dir
        txts = sorted(txt_dir.glob("*.txt"))
        if not txts and task in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS:
            raise _bad(name, task_dir, f"sub-task {task!r} holds no question files (<image stem>.txt here, or in "
                                       f"{MME_QUESTION_FOLDERS[0]}/ beside images/)")
        if not txts:
            logger.debug(f"mme: skipping {task_dir} (no question txt files)")
            continue
        for txt in txts:
            image = _find_image(img_dir, txt.stem)
            if image is None:
                raise FileNotFoundError(f"mme: no image for {txt} (looked for {img_dir / txt.stem}"
                                        f"{{{','.join(IMAGE_EXTENSIONS)}}}). Expected layout -- {LAYOUTS[name]}")
            for i, (question, answer) in enumerate(_parse_mme_txt(txt)):
                records.append(VqaRecord(
                    question_id=f"{task}/{image.name}/{i}",
                    image=str(image),
                    question=question,
                    answers=[answer],
                    family=task,
                    benchmark=name,
                    image_id=f"{task}/{image.name}",
                ))
    if wanted is not None and wanted - {r.family for r in records}:
        raise _bad(name, root, f"sub-task(s) {sorted(wanted - {r.family for r in records})} not found")
    if not records:
        raise _bad(name, root, "no sub-task folder with question txt files")
    return _checked(records, name, root)


# ----------------------------------------------------------------------------- MMBench


def read_mmbench(path: PathLike) -> List[VqaRecord]:
    """Read an MMBench TSV (e.g. ``mmbench_dev_20230712.tsv``).

    Options are the non-empty ``A``..``D`` (and ``E``.. when present) columns; the question
    is ``hint`` (if any), the question and the lettered options; the answer is the letter
    (no answers on the test split). Family is ``category``. Images are the base64-decoded
    bytes; an ``image`` cell holding another row's ``index`` reuses that row's image.
    """
    import pandas as pd

    name = "mmbench"
    path = _require_file(Path(path), name, "TSV file")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise _bad(name, path, f"cannot be parsed as TSV ({err})")
    missing = [c for c in ("index", "question", "A", "B", "image") if c not in table.columns]
    if missing:
        raise _bad(name, path, f"missing column(s) {missing} (found {list(table.columns)})")
    if table.empty:
        raise _bad(name, path, "no questions (a header row and no data rows)")
    letters = [c for c in OPTION_LETTERS if c in table.columns]
    images_by_index = {row["index"]: row["image"] for _, row in table.iterrows() if len(row["image"]) > 64}

    from PIL import Image, UnidentifiedImageError

    records, opened = [], set()  # the cells already opened (circular copies share their row's)
    for _, row in table.iterrows():
        cell = row["image"]
        if len(cell) <= 64 and cell in images_by_index:
            cell = images_by_index[cell]
        try:
            image = base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(name, path, f"row index {row['index']}: 'image' is not base64")
        if not image:
            raise _bad(name, path, f"row index {row['index']}: empty 'image'")
        if cell not in opened:  # the header only: a bad cell is named here, not mid-evaluation
            try:
                with Image.open(io.BytesIO(image)):
                    pass
            except (UnidentifiedImageError, OSError) as err:
                raise _bad(name, path, f"row index {row['index']}: 'image' decodes from base64 but is no image "
                                       f"file ({err})")
            opened.add(cell)
        choices, used = [], []
        for letter in letters:
            option = row[letter].strip()
            if option and option.lower() != "nan":
                choices.append(option)
                used.append(letter)
        if used != list(OPTION_LETTERS[: len(used)]):
            raise _bad(name, path, f"row index {row['index']}: options {used} are not contiguous from A")
        hint = row.get("hint", "").strip()
        hint = "" if hint.lower() == "nan" else hint
        answer = row.get("answer", "").strip()
        if answer and answer not in used:
            raise _bad(name, path, f"row index {row['index']}: answer {answer!r} is not one of its options {used}")
        records.append(VqaRecord(
            question_id=str(row["index"]),
            image=image,
            question=format_multiple_choice(row["question"], choices, hint or None),
            answers=[answer] if answer else [],
            family=row.get("category", ""),
            choices=choices,
            benchmark=name,
            image_id=str(row["index"]),
        ))
    return _checked(records, name, path)


# ----------------------------------------------------------------------------- dispatch

_READERS: Dict[str, Callable[..., List[VqaRecord]]] = {
    "vqav2": read_vqav2,
    "gqa": read_gqa,
    "pope": read_pope,
    "scienceqa_img": read_scienceqa_img,
    "vizwiz": read_vizwiz,
    "mme": read_mme,
    "mmbench": read_mmbench,
}
_ALIASES = {"vqa_v2": "vqav2", "scienceqa": "scienceqa_img", "sqa": "scienceqa_img", "sqa_img": "scienceqa_img",
            "vizwiz_vqa": "vizwiz"}


def canonical_benchmark(name: str) -> str:
    """Canonical benchmark name (case-insensitive, ``-`` = ``_``, a few aliases)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _READERS:
        raise ValueError(f"Unknown benchmark {name!r}; available benchmarks: {', '.join(BENCHMARKS)}")
    return key


def reader_options(name: str) -> List[str]:
    """The options ``read_benchmark(name, path, **options)`` passes on: the reader's arguments after ``path``
    (e.g. ``["image_dir"]`` for POPE, ``["split", "image_dir"]`` for ScienceQA-IMG)."""
    import inspect

    return [p for p in inspect.signature(_READERS[canonical_benchmark(name)]).parameters if p != "path"]


def read_benchmark(name: str, path: PathLike, limit: Optional[int] = None, **kwargs) -> List[VqaRecord]:
    """Read benchmark ``name`` from ``path`` with its reader (``kwargs`` go to the reader).

    ``limit`` keeps ``limit`` records spread over the families (``spread_subset``: quick runs).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` is {limit!r}; use a positive number of records, or None for all of them.")
    records = _READERS[canonical_benchmark(name)](path, **kwargs)
    return records if limit is None else spread_subset(records, limit)


def spread_subset(records: Sequence[VqaRecord], limit: int) -> List[VqaRecord]:
    """At most ``limit`` of ``records``, taken in turn from each family (POPE split, MME sub-task, answer type, ...,
    in order of first appearance; within a family in file order) and returned in file order. The first ``limit``
    records scored only the first POPE file or MME sub-task of a folder. Deterministic.

    MME's two questions of one image (``image_id``) are taken together, since acc+ scores them as a pair; only the
    last image taken may lose its second question, when the pairs do not fill ``limit`` exactly."""
    if limit >= len(records):
        return list(records)
    units: Dict[str, Dict[str, List[int]]] = {}  # family -> {unit key -> record positions}
    for i, r in enumerate(records):
        key = r.image_id if r.benchmark == "mme" else str(i)
        units.setdefault(r.family, {}).setdefault(key, []).append(i)
    queues = [iter(family.values()) for family in units.values()]
    chosen: List[int] = []
    while len(chosen) < limit:  # limit < len(records): the families cannot run dry first
        for queue in queues:
            unit = next(queue, None)
            if unit is not None and len(chosen) < limit:
                chosen.extend(unit[: limit - len(chosen)])
    return [records[i] for i in sorted(chosen)]


def to_hf_dataset(records: Sequence[VqaRecord]):
    """Build a ``datasets.Dataset`` (columns question_id, image, question, answers, family,
    benchmark, choices, image_id); the ``image`` column is a lazily decoded ``Image``."""
    import datasets

    features = datasets.Features({
        "question_id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "prompt": datasets.Value("string"),  # what the model is asked: the question + the answer-format line
        "answers": datasets.Sequence(datasets.Value("string")),
        "family": datasets.Value("string"),
        "benchmark": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "image_id": datasets.Value("string"),
    })
    columns = {key: [] for key in features}
    for r in records:
        columns["question_id"].append(r.question_id)
        if isinstance(r.image, (bytes, bytearray)):
            columns["image"].append({"path": None, "bytes": bytes(r.image)})
        else:
            columns["image"].append({"path": str(r.image), "bytes": None})
        columns["question"].append(r.question)
        columns["prompt"].append(r.prompt)
        columns["answers"].append(list(r.answers))
        columns["family"].append(r.family)
        columns["benchmark"].append(r.benchmark)
        columns["choices"].append(list(r.choices) if r.choices is not None else None)
        columns["image_id"].append(r.image_id)
    return datasets.Dataset.from_dict(columns, features=features)


__all__ = [
    "BENCHMARKS", "BENCHMARK_METRIC", "LAYOUTS", "POST_PROMPTS", "VqaRecord", "canonical_benchmark",
    "format_multiple_choice", "open_rgb", "read_benchmark", "read_gqa", "read_mmbench", "read_mme", "read_pope",
    "read_scienceqa_img", "read_vizwiz", "read_vqav2", "reader_options", "spread_subset", "to_hf_dataset",
]
