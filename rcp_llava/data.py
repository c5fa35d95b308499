"""Data for RCP: the one prompt builder, the training collator, dataset checks and the LLaVA-JSON loader.

    from rcp_llava.data import RcpDataCollator, check_dataset, load_llava_json, prompt_batch
    collator = RcpDataCollator(processor)                # image/question/answer rows -> training batches
    batch = prompt_batch(processor, questions, images)   # left-padded prompts for evaluation

Every prompt (training, evaluation, the testbed) is `prompt_messages` rendered by the processor's chat template:
one place decides what the model is asked, so the trained plug-ins and the evaluators always see the same text.
"""

import json
import os

import torch


def prompt_messages(question, answer=None):
    """The single-turn conversation: the image, then the question (and, with `answer`, the assistant's turn)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def load_image(image, image_folder=None):
    """A dataset cell as an RGB image: a PIL image, or a path (relative to `image_folder` when given)."""
    from PIL import Image

    if isinstance(image, str):
        path = os.path.join(image_folder, image) if image_folder else image
        return Image.open(path).convert("RGB")
    return image.convert("RGB") if hasattr(image, "convert") else image


def position_ids_from_mask(attention_mask):
    """RoPE positions as `generate` builds them: (B, T) counted over the real tokens only, so that left padding
    never shifts a sample's positions (a padded row equals the same row alone)."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)


def default_answer_mask(labels):
    """(B, T) bool: the positions whose NEXT token is an answer token (`labels[:, t + 1] != -100`), i.e. the
    positions that predict the answer: where the repair loss compares the student with the teacher."""
    answer_mask = torch.zeros_like(labels, dtype=torch.bool)
    answer_mask[:, :-1] = labels[:, 1:] != -100
    return answer_mask


def prompt_batch(processor, questions, images):
    """Left-padded prompts (generation prompt appended) with their `position_ids`, ready for a forward."""
    processor.tokenizer.padding_side = "left"
    prompts = [processor.apply_chat_template(prompt_messages(q), add_generation_prompt=True) for q in questions]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    return batch


class RcpDataCollator:
    """Builds chat prompts with the processor's template, and the labels and masks RCP trains with.

    Each example is a dict with an image (PIL image or path), a question and an answer. Output: `input_ids`,
    `attention_mask`, `pixel_values`, `labels` (-100 outside the answer, which ends with EOS), `question_mask` (the
    text tokens after the image, before the answer) and `answer_mask` (positions whose next token is an answer
    token).
    """

    def __init__(self, processor, image_column="image", question_column="question", answer_column="answer",
                 max_length=None, image_folder=None):
        self.processor = processor
        self.image_column, self.question_column, self.answer_column = image_column, question_column, answer_column
        self.max_length = max_length
        self.image_folder = image_folder
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def texts(self, example):
        question, answer = example[self.question_column], example[self.answer_column]
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(
                f"An example's {self.answer_column!r} is {answer!r}: RCP trains on the answer tokens, so an empty "
                "answer would train on EOS alone. Drop the example or fix the column (`--answer_column`)."
            )
        prompt = self.processor.apply_chat_template(prompt_messages(question), add_generation_prompt=True)
        full = self.processor.apply_chat_template(prompt_messages(question, answer))
        if not full.startswith(prompt):
            raise ValueError("The chat template does not render the prompt as a prefix of the full conversation.")
        eos = self.processor.tokenizer.eos_token
        if eos and eos not in full[len(prompt):]:
            # The answer ends with EOS, which the task loss trains (as the authors do): llava-hf's LLaVA-1.5
            # template does not write it after the assistant turn.
            full = full.rstrip() + eos
        return prompt, full

    def load_image(self, image):
        return load_image(image, self.image_folder)

    def __call__(self, examples):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        prompts, fulls = zip(*(self.texts(e) for e in examples))
        images = [self.load_image(e[self.image_column]) for e in examples]
        batch = self.processor(images=images, text=list(fulls), return_tensors="pt", padding=True)
        prompt_ids = self.processor(images=images, text=list(prompts), return_tensors="pt", padding=True)
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        bsz, seq = input_ids.shape
        prompt_lengths = prompt_ids["attention_mask"].sum(1)  # (B,)
        lengths = attention.sum(1)
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            raise ValueError(
                f"A prompt + answer is {int(lengths.max())} tokens, above `max_length={self.max_length}`."
            )
        start = seq - lengths  # first real token (left padding)
        positions = torch.arange(seq).unsqueeze(0)  # (1, T)
        answer_start = (start + prompt_lengths).unsqueeze(1)  # (B, 1)
        is_answer = (positions >= answer_start) & attention
        labels = torch.where(is_answer, input_ids, -100)
        image = input_ids == self.image_token_id
        last_image = torch.where(image, positions, -1).max(1).values.unsqueeze(1)  # (B, 1)
        question_mask = (positions > last_image) & (positions < answer_start) & attention
        out = dict(batch)
        out.update(labels=labels, question_mask=question_mask, answer_mask=default_answer_mask(labels),
                   position_ids=position_ids_from_mask(attention))
        return out


def check_dataset(dataset, collator, max_length=None, name="dataset"):
    """Fail before training on an empty dataset, missing columns or answers that do not fit `max_length`."""
    if len(dataset) == 0:
        raise ValueError(f"The {name} is empty: there is nothing to train on. Check the split name and the data.")
    columns = set(dataset.column_names)
    needed = [collator.image_column, collator.question_column, collator.answer_column]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"The {name} has no column(s) {missing}; it has {sorted(columns)}. Name the right ones with "
            "--image_column / --question_column / --answer_column."
        )
    if max_length is None:
        return
    tokenizer = collator.processor.tokenizer
    image_tokens = getattr(collator.processor, "num_image_tokens", None) or 0
    for index in range(len(dataset)):
        row = dataset[index]
        _, full = collator.texts(row)
        text_tokens = len(tokenizer(full.replace(collator.processor.image_token, ""))["input_ids"])
        total = text_tokens + image_tokens
        if total > max_length:
            raise ValueError(
                f"Example {index} of the {name} is {total} tokens long (answer {row[collator.answer_column]!r}), "
                f"above `max_length={max_length}`: raise --max_length or drop long answers."
            )


# The speaker names a LLaVA-style record may use: LLaVA's own ("human"/"gpt") and the chat-template ones.
LLAVA_QUESTION_ROLES = ("human", "user")
LLAVA_ANSWER_ROLES = ("gpt", "assistant")


def load_llava_json(path, image_folder=None):
    """A LLaVA-style JSON list (`image` + `conversations` [human, gpt, ...]) as a `datasets.Dataset` of
    (image, question, answer) rows, one per human/gpt turn pair.

    Image paths are resolved here, once, against `image_folder` (absolute paths returned), so the collator must
    not join the folder again (it left `images/images/...` with a relative folder). Every record and image is
    checked up front (one image path per record, each image readable, turns alternating human/gpt and ending on
    an answer): bad data is named, by record, before any model loads."""
    from datasets import Dataset
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--llava_json: no file {path!r}. Give the path of a LLaVA-style JSON list.")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image_folder: no folder {image_folder!r} (the JSON's image paths are "
                                "relative to it).")
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); a LLaVA-style JSON is a list of records.") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records with 'image' and 'conversations', "
                         f"got {type(records).__name__}{'' if records else ' (empty)'}.")
    rows = []
    readable = set()  # LLaVA sets reuse images (COCO) across records: open each file once
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or "conversations" not in record:
            raise ValueError(f"Record {i} of {path} lacks 'image' or 'conversations'.")
        where = f"Record {i}" + (f" (id {record['id']!r})" if "id" in record else "") + f" of {path}"
        turns = record["conversations"]
        if (not isinstance(turns, list) or len(turns) < 2
                or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)):
            raise ValueError(f"{where}: 'conversations' must be a list of at least one human and one "
                             "gpt turn, each a dict with a string 'value'.")
        # The pairs are cut by position (turn 0 asks, turn 1 answers, ...): a conversation opening with the gpt
        # turn swapped question and answer (the answer's <image> then counted as a second image, mid-training).
        for k, turn in enumerate(turns):
            expected = LLAVA_QUESTION_ROLES if k % 2 == 0 else LLAVA_ANSWER_ROLES
            if turn.get("from") not in expected:
                raise ValueError(f"{where}: turn {k} is from {turn.get('from')!r}, expected {expected[0]!r} "
                                 f"(or {expected[1]!r}): turns alternate human, gpt, human, gpt, ... (a question, "
                                 "then its answer). Fix the turns' 'from' or drop the record.")
        if len(turns) % 2:
            # Refused rather than dropped: a question without its answer is as incomplete as a record without
            # 'conversations', and dropping it would train on less than the file says.
            raise ValueError(f"{where}: the last turn ({len(turns) - 1}) is a human question without a gpt "
                             "answer. Add the answer or drop the turn.")
        for k in range(1, len(turns), 2):
            if not turns[k]["value"].strip():  # the collator refuses it too, but only mid-training
                raise ValueError(f"{where}: turn {k} (gpt) is an empty answer {turns[k]['value']!r}: RCP trains "
                                 "on the answer tokens. Give the answer or drop the turn pair.")
        name = record["image"]
        if not isinstance(name, str):  # os.path.join raised a bare TypeError that named no record
            raise TypeError(f"{where}: 'image' is {name!r} ({type(name).__name__}), expected one image path as a "
                            "string: RCP trains on one image per question. Drop text-only or multi-image records.")
        image = os.path.abspath(os.path.join(image_folder, name) if image_folder else name)
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: no image file {image!r}"
                                    + ("" if image_folder else " (give --image_folder if the paths are relative "
                                       "to a folder)") + ".")
        if image not in readable:
            # `open` reads the header only (lazy), so this stays cheap over a large set; `verify` would read every
            # file whole. It catches what is not an image at all, which the collator only found mid-training.
            try:
                with Image.open(image):
                    pass
            except OSError as err:  # UnidentifiedImageError is an OSError, as is an unreadable file
                raise ValueError(f"{where}: the image file {image!r} cannot be read as an image ({err}). Replace "
                                 "the file or drop the record.") from None
            readable.add(image)
        for human, gpt in zip(turns[0::2], turns[1::2]):
            question = human["value"].replace("<image>", "").strip()
            rows.append({"image": image, "question": question, "answer": gpt["value"].strip()})
    return Dataset.from_list(rows)


__all__ = [
    "RcpDataCollator", "check_dataset", "default_answer_mask", "load_image", "load_llava_json",
    "position_ids_from_mask", "prompt_batch", "prompt_messages",
]
