"""Data for RCP: the one prompt builder, the training collator, dataset checks and the LLaVA-JSON loader.

    from rcp_llava.data import RcpDataCollator, check_dataset, load_llava_json, prompt_batch
    collator = RcpDataCollator(processor)                # image/question/answer rows -> training batches
    batch = prompt_batch(processor, questions, images)   # left-padded prompts for evaluation

Every prompt (training, evaluation, the testbed) is `prompt_messages` rendered by the processor's chat template:
one place decides what the model is asked, so the trained plug-ins and the evaluators always see the same text.
"""

import json
import math
import os

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


def prompt_messages(question, answer=None, num_images=1):
    """The single-turn conversation: the image (`num_images` of them: 0 for a text-only question), then the question
    (and, with `answer`, the assistant's turn)."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def shared_prefix_length(full_ids, prompt_ids):
    """How many tokens the 1-D `full_ids` (a prompt and its answer, tokenized together) share with `prompt_ids` (the
    prompt alone) from the start: where the answer's tokens begin. It is the prompt's length when its tokens are a
    prefix of the full text's (llava-hf's template and tokenizer), fewer when the answer's first token absorbs the
    prompt's end (a generation prompt ending in a space: "ASSISTANT: " + "There" -> "▁There") or the tokenizer
    appends EOS to the prompt alone. The training collator and lmms-eval's loglikelihood both find the answer so."""
    n = min(len(full_ids), len(prompt_ids))
    differ = (full_ids[:n] != prompt_ids[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def answer_starts(tokenizer, input_ids, lengths, fulls, prompts, image_token_id):
    """(B,) where each row of the processor's left-padded `input_ids` (B, T) of the texts `fulls` leaves its prompt
    `prompts[row]`: the first position `shared_prefix_length` finds them differ, on the batch's positions.

    Both texts are compared as the tokenizer's tokens alone, image placeholders unexpanded (a processor call on the
    prompts ran the image processor a second time for every batch): the placeholders lie in the prompt, before any
    difference, so the row's left padding (`lengths`, (B,) its real tokens) and the tokens the processor expanded
    them into shift the shared length onto the batch's positions. The training collator and lmms-eval's
    loglikelihood find their answers so."""
    full_special, prompt_special = special_tokens_kwargs(tokenizer, fulls), special_tokens_kwargs(tokenizer, prompts)
    seq, starts = input_ids.shape[1], []
    for row, (full, prompt) in enumerate(zip(fulls, prompts)):
        full_ids = tokenizer(full, **full_special)["input_ids"]
        prompt_ids = tokenizer(prompt, **prompt_special)["input_ids"]
        expanded = int((input_ids[row] == image_token_id).sum()) - full_ids.count(image_token_id)
        shared = shared_prefix_length(torch.tensor(full_ids), torch.tensor(prompt_ids))
        starts.append(seq - int(lengths[row]) + expanded + shared)
    return torch.tensor(starts)


def special_tokens_kwargs(tokenizer, texts):
    """`{"add_special_tokens": False}` when the rendered `texts` already begin with the tokenizer's BOS (a chat
    template that writes it, as Llama-3's and Mistral's do), else `{}`: tokenizing such a text with special tokens
    gave two BOS. transformers' `ProcessorMixin.apply_chat_template(tokenize=True)` decides the same way; the
    collator, `check_dataset`, the evaluators and lmms-eval tokenize through it (`encode_texts`), so training and
    evaluation agree (the testbed's own builder does not: its template writes no BOS)."""
    bos = tokenizer.bos_token
    starts = [bool(bos) and text.startswith(bos) for text in texts]
    if all(starts) and starts:
        return {"add_special_tokens": False}
    if any(starts):
        raise ValueError(f"The chat template wrote the tokenizer's BOS ({bos!r}) at the start of {sum(starts)} of "
                         f"{len(starts)} texts in one batch; render every text with the same template.")
    return {}


def encode_texts(processor, texts, images=None, **kwargs):
    """The processor's batch for chat-rendered `texts` (and their `images`), BOS written once
    (`special_tokens_kwargs`). kwargs go to the processor (`return_tensors`, `padding`, ...)."""
    return processor(images=images, text=list(texts), **special_tokens_kwargs(processor.tokenizer, texts), **kwargs)


def load_image(image, image_folder=None):
    """A dataset cell as an RGB image: a PIL image, a path (relative to `image_folder` when given), encoded bytes,
    or an undecoded `datasets.Image` cell (`{"bytes": ..., "path": ...}`, as `Image(decode=False)` or a struct
    column gives it).

    Files and bytes are turned upright by their EXIF orientation, as `datasets.Image` decodes them: the same
    rotated JPEG given as a path (`--llava_json`, an image_folder column) and as a `datasets.Image` column came
    out 64x32 vs 32x64. A PIL image is the caller's decoded image and is only converted to RGB."""
    import io

    from rcp_llava.readers import open_rgb

    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return open_rgb(io.BytesIO(image))
    if isinstance(image, str):
        return open_rgb(os.path.join(image_folder, image) if image_folder else image)
    return image.convert("RGB") if hasattr(image, "convert") else image


def image_problem(image, column="image"):
    """`(exception class, message)` when the cell `image` of `column` cannot be one example's image, else None; the
    message goes after the column's name. Checked before the processor sees the cell: a missing image (None, a
    text-only row of a mixed dataset) or a list failed deep inside the image processor ("only a single or a list
    of entries is supported"), naming no example."""
    if isinstance(image, dict) and not ("bytes" in image or "path" in image):
        return (TypeError, f"is a dict with keys {sorted(image)}, not an image: an undecoded image cell has "
                           "'bytes' or 'path'. Fix the column or name the image column (`--image_column`).")
    if image is None or (isinstance(image, dict) and image.get("bytes") is None and image.get("path") is None):
        return (ValueError, f"is {image!r}: the example has no image, and RCP prunes the image's tokens. Drop "
                            f"text-only rows (e.g. `dataset.filter(lambda r: r[{column!r}] is not None)`).")
    if isinstance(image, (list, tuple)):
        return (TypeError, f"is a list of {len(image)} images: RCP trains on one image per question. Drop "
                           "multi-image rows or keep one image each.")
    if isinstance(image, (bool, int, float)):
        return (TypeError, f"is {image!r} ({type(image).__name__}), not an image: give a PIL image, a path, "
                           "encoded bytes or a `datasets.Image` cell, or name the image column (`--image_column`).")
    return None


def strip_image_token(question, image_token="<image>"):
    """`question` without its LLaVA-style `<image>` placeholder (LLaVA data writes "<image>", a newline, then the
    question), stripped, as `load_llava_json` reads its records: the chat template already puts the image before
    the question, so a placeholder left in was a second image (the processor: "Found 2 <image> tokens and 1
    images"). A question without the placeholder (or not a string) is returned unchanged."""
    if isinstance(question, str) and image_token in question:
        return question.replace(image_token, "").strip()
    return question


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
    # The question as the collator trains it (a LLaVA-style `<image>` placeholder removed, `strip_image_token`).
    prompts = [processor.apply_chat_template(prompt_messages(strip_image_token(q, processor.image_token)),
                                             add_generation_prompt=True) for q in questions]
    batch = encode_texts(processor, prompts, images, return_tensors="pt", padding=True)
    batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    return batch


class RcpDataCollator:
    """Builds chat prompts with the processor's template, and the labels and masks RCP trains with.

    Each example is a dict with an image (`load_image`: a PIL image, a path, encoded bytes or an undecoded
    `datasets.Image` cell), a question (a string; a LLaVA-style `<image>` placeholder in it is removed,
    `strip_image_token`, as `load_llava_json` does) and a non-empty string answer; anything else is refused naming
    the example (`problem`). Output: `input_ids`, `attention_mask`, `pixel_values`, `labels` (-100 outside the
    answer, which ends with EOS), `question_mask` (the text tokens after the image, before the answer) and
    `answer_mask` (positions whose next token is an answer token).
    """

    def __init__(self, processor, image_column="image", question_column="question", answer_column="answer",
                 max_length=None, image_folder=None):
        self.processor = processor
        self.image_column, self.question_column, self.answer_column = image_column, question_column, answer_column
        self.max_length = max_length
        self.image_folder = image_folder
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def text_problem(self, example):
        """`(exception class, message)` for a question or answer of `example` the collator cannot train on, or None.
        The message starts with the column's name. Without these checks a None / NaN / numeric question trained as
        the text "None" / "nan" / "3", and an `<image>` in an answer failed in the processor naming nothing."""
        image_token = self.processor.image_token
        question, answer = example[self.question_column], example[self.answer_column]
        if isinstance(question, (list, tuple)) or isinstance(answer, (list, tuple)):
            return self._turns_problem(question, answer)
        if question is None:
            return (ValueError, f"{self.question_column!r} is None: the question is missing (it would train as the "
                                "text 'None'). Drop the example or fix the column (`--question_column`).")
        if not isinstance(question, str):
            return (TypeError, f"{self.question_column!r} is {question!r} ({type(question).__name__}), not a "
                               f"string: it would train as the text {str(question)!r}. Drop the example or fix the "
                               "column (`--question_column`).")
        if question.count(image_token) > 1:
            return (ValueError, f"{self.question_column!r} {_short(question)!r} holds {question.count(image_token)} "
                                f"{image_token!r} placeholders: RCP trains on one image per question. Drop "
                                "multi-image examples.")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            return (ValueError, f"{self.answer_column!r} is {answer!r}: RCP trains on the answer tokens, so an empty "
                                "answer would train on EOS alone. Drop the example or fix the column "
                                "(`--answer_column`).")
        if isinstance(answer, float) and math.isnan(answer):  # a pandas / CSV empty cell, not the text "nan"
            return (ValueError, f"{self.answer_column!r} is NaN: the answer is missing (an empty cell of a table). "
                                "Drop the example or fix the column (`--answer_column`).")
        if not isinstance(answer, str):
            return (TypeError, f"{self.answer_column!r} is {answer!r} ({type(answer).__name__}), not a string: the "
                               "answer is trained as text. Cast the column to strings (e.g. "
                               f"`dataset.map(lambda r: {{{self.answer_column!r}: str(r[{self.answer_column!r}])}})`) "
                               "or fix the column (`--answer_column`).")
        if image_token in answer:
            return (ValueError, f"{self.answer_column!r} {_short(answer)!r} holds the image placeholder "
                                f"{image_token!r}, which the processor would expand into image tokens. Fix the "
                                "answer or drop the example.")
        return None

    def _turns_problem(self, questions, answers):
        """`text_problem` of a multi-turn example: equally long lists of questions and answers, each turn a valid
        single-turn pair, the image placeholder (if any) in the first question only."""
        if not (isinstance(questions, (list, tuple)) and isinstance(answers, (list, tuple))):
            return (TypeError, f"{self.question_column!r} and {self.answer_column!r} must both be lists (one entry per "
                               "turn of a conversation) or both strings, got "
                               f"{type(questions).__name__} and {type(answers).__name__}.")
        if not questions or len(questions) != len(answers):
            return (ValueError, f"{self.question_column!r} holds {len(questions)} turn(s) and {self.answer_column!r} "
                                f"{len(answers)}: a conversation needs one answer per question, at least one turn.")
        for k, (question, answer) in enumerate(zip(questions, answers)):
            problem = self.text_problem({self.question_column: question, self.answer_column: answer})
            if problem is None and k > 0 and isinstance(question, str) and self.processor.image_token in question:
                problem = (ValueError, f"{self.question_column!r} {_short(question)!r} holds the image placeholder "
                                       f"{self.processor.image_token!r} in a later turn: the image goes with the "
                                       "first question. Drop multi-image conversations.")
            if problem is not None:
                return (problem[0], f"turn {k}: {problem[1]}")
        return None

    def problem(self, example):
        """`(exception class, message)` for anything in `example` the collator cannot train on, or None: its
        question and answer (`text_problem`), then its image cell (`image_problem`)."""
        problem = self.text_problem(example)
        if problem is None:
            image = image_problem(example[self.image_column], self.image_column)
            if image is not None:
                problem = (image[0], f"{self.image_column!r} {image[1]}")
        return problem

    def describe(self, example):
        """A short identification of `example` for error messages: its id (when it has one), question and answer."""
        parts = [f"id {example['id']!r}"] if isinstance(example.get("id"), (int, str)) else []
        if isinstance(example.get(LLAVA_RECORD_COLUMN), str):  # `load_llava_json`'s rows: the record in the file
            parts.append(example[LLAVA_RECORD_COLUMN])
        parts += [f"{c} {_short(example.get(c))!r}" for c in (self.question_column, self.answer_column)]
        return ", ".join(parts)

    def _refuse(self, problem, example, position=None):
        where = f" (position {position} in this batch)" if position is not None else ""
        raise problem[0](f"An example's {problem[1]} The example: {self.describe(example)}{where}.")

    def texts(self, example):
        problem = self.text_problem(example)
        if problem is not None:
            self._refuse(problem, example)
        question = strip_image_token(example[self.question_column], self.processor.image_token)
        answer = example[self.answer_column]
        prompt = self.processor.apply_chat_template(prompt_messages(question), add_generation_prompt=True)
        full = self.processor.apply_chat_template(prompt_messages(question, answer))
        if not full.startswith(prompt):
            raise ValueError("The chat template does not render the prompt as a prefix of the full conversation.")
        eos = self.processor.tokenizer.eos_token
        # The trained tokens end with the answer's EOS: whitespace a template writes after the turn (ChatML's "\n"
        # after <|im_end|>) belongs to the next turn, as in `conversation`'s spans; it was trained here.
        full = full.rstrip()
        # Whether the template ended the turn with EOS: `eos in reply` read an answer quoting "</s>" as ended.
        if eos and not full[len(prompt):].endswith(eos):
            # The answer ends with EOS, which the task loss trains (as the authors do): llava-hf's LLaVA-1.5
            # template does not write it after the assistant turn.
            full += eos
        return prompt, full

    def conversation(self, example):
        """A multi-turn example (`question` and `answer` lists) as `(text, spans)`: the whole conversation rendered
        with the chat template, each answer followed by EOS (LLaVA's `preprocess_v1`: "USER: <image>\nQ1 ASSISTANT:
        A1</s>USER: Q2 ASSISTANT: A2</s>"), and the (start, end) character span of each answer with its EOS, which
        are the trained tokens. The template renders each turn; a turn that does not extend the conversation
        rendered so far is refused."""
        problem = self.text_problem(example)
        if problem is not None:
            self._refuse(problem, example)
        image_token, eos = self.processor.image_token, self.processor.tokenizer.eos_token
        questions = [strip_image_token(q, image_token) for q in example[self.question_column]]
        messages = prompt_messages(questions[0])
        text, spans, rendered = "", [], ""
        for k, (question, answer) in enumerate(zip(questions, example[self.answer_column])):
            if k:
                messages = messages + [{"role": "user", "content": [{"type": "text", "text": question}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            full = self.processor.apply_chat_template(messages)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise ValueError(f"The chat template does not render turn {k} of a conversation as an extension of "
                                 "the turns before it; it cannot be trained as one sequence.")
            text += prompt[len(rendered):].lstrip() if k else prompt  # the user turn + the generation prompt
            reply = full[len(prompt):]
            if eos and not reply.rstrip().endswith(eos):  # llava-hf's LLaVA-1.5 template writes no EOS after an answer
                reply = reply.rstrip() + eos
            spans.append((len(text), len(text) + len(reply.rstrip())))  # trailing whitespace is the next turn's
            text += reply
            rendered = full
        return text.rstrip(), spans  # whitespace after the last turn: no next turn reads it (as `texts`)

    def full_text(self, example):
        """The text the collator tokenizes for `example` (single- or multi-turn)."""
        if isinstance(example[self.question_column], (list, tuple)):
            return self.conversation(example)[0]
        return self.texts(example)[1]

    def load_image(self, image):
        return load_image(image, self.image_folder)

    def load_images(self, examples):
        """The batch's images, an unreadable one named by its example (a truncated download passed the up-front
        header checks, and its bare "image file is truncated" ended a run with no record or path named)."""
        from PIL import Image

        images = []
        for position, example in enumerate(examples):
            cell = example[self.image_column]
            try:
                images.append(self.load_image(cell))
            except (OSError, Image.DecompressionBombError) as err:
                path = cell if isinstance(cell, str) else (cell.get("path") if isinstance(cell, dict) else None)
                what = f"image {path!r}" if path else f"{self.image_column!r} image"
                kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
                raise kind(f"An example's {what} cannot be read ({err}): the file is missing, truncated or corrupt; "
                           "replace it or drop the example. The example: "
                           f"{self.describe(example)} (position {position} in this batch).") from None
        return images

    def __call__(self, examples):
        for position, example in enumerate(examples):
            problem = self.problem(example)
            if problem is not None:
                self._refuse(problem, example, position)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if any(isinstance(e[self.question_column], (list, tuple)) for e in examples):
            return self._conversations(examples)
        prompts, fulls = zip(*(self.texts(e) for e in examples))
        images = self.load_images(examples)
        batch = encode_texts(self.processor, fulls, images, return_tensors="pt", padding=True)
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        seq = input_ids.shape[1]
        lengths = attention.sum(1)
        self._check_length(input_ids, lengths, examples)
        # The answer starts at the first token the full text does not share with its prompt alone: the prompt's
        # length when its tokens are a prefix (llava-hf's template), earlier when they are not -- a tokenizer that
        # appends EOS, or a prompt ending in a space or newline that the answer's first token absorbs ("ASSISTANT: "
        # + "There" -> "▁There"). Counting the prompt's tokens then put the answer's first token in the question
        # mask (the pruners read it) and left it untrained.
        positions = torch.arange(seq).unsqueeze(0)  # (1, T)
        answer_start = answer_starts(tokenizer, input_ids, lengths, fulls, prompts, self.image_token_id).unsqueeze(1)
        # The answer ends with its EOS (`texts`); a tokenizer that appends one to every text (`add_eos_token`) adds a
        # second, last in each row (left padding), which is not trained: it was (the answer "Red</s></s>"), unlike
        # in `_conversations`.
        answer_end = seq - int(appends_eos(tokenizer, special_tokens_kwargs(tokenizer, fulls)))
        return self._outputs(batch, (positions >= answer_start) & (positions < answer_end) & attention)

    def _check_length(self, input_ids, lengths, examples):
        """Refuse the batch's longest example when it is above `max_length` (the image's tokens counted)."""
        if self.max_length is not None and int(lengths.max()) > self.max_length:
            position = int(lengths.argmax())
            image_tokens = int((input_ids[position] == self.image_token_id).sum())
            raise ValueError(
                f"Example {position} of this batch ({self.describe(examples[position])}) is "
                f"{int(lengths[position])} tokens ({image_tokens} of them the image's), above "
                f"`max_length={self.max_length}`: raise --max_length or drop long answers (`check_dataset` with "
                "`max_length` names the first such example of a dataset before training)."
            )

    def _outputs(self, batch, is_answer):
        """The processor's `batch` with what RCP trains on, from `is_answer` (B, T), the answer tokens (and their
        EOS): `labels`, `question_mask` (the text after the image that is not an answer, up to the last answer:
        every user turn), `answer_mask` (the positions predicting an answer token) and `position_ids`."""
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        labels = torch.where(is_answer & attention, input_ids, -100)
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # (1, T)
        image = input_ids == self.image_token_id
        last_image = torch.where(image, positions, -1).max(1).values.unsqueeze(1)  # (B, 1)
        last_answer = torch.where(is_answer, positions, -1).max(1).values.unsqueeze(1)  # (B, 1)
        question_mask = (positions > last_image) & (positions < last_answer) & ~is_answer & attention
        out = dict(batch)
        out.update(labels=labels, question_mask=question_mask, answer_mask=default_answer_mask(labels),
                   position_ids=position_ids_from_mask(attention))
        return out

    def _conversations(self, examples):
        """`__call__` on a batch holding a multi-turn example (single-turn ones count as one-turn conversations):
        labels on every answer and its EOS (`conversation`), the question mask on the text after the image that is
        not an answer (every user turn), the answer mask on the positions predicting an answer token."""
        tokenizer = self.processor.tokenizer
        rendered = []
        for e in examples:
            turns = e if isinstance(e[self.question_column], (list, tuple)) else {
                **e, self.question_column: [e[self.question_column]], self.answer_column: [e[self.answer_column]]}
            rendered.append(self.conversation(turns))
        images = self.load_images(examples)
        texts = [text for text, _ in rendered]
        batch = encode_texts(self.processor, texts, images, return_tensors="pt", padding=True)
        special = special_tokens_kwargs(tokenizer, texts)  # the spans' tokenization below, as the batch's
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        bsz, seq = input_ids.shape
        lengths = attention.sum(1)
        self._check_length(input_ids, lengths, examples)
        is_answer = torch.zeros(bsz, seq, dtype=torch.bool)
        # A tokenizer that appends EOS to every text (`add_eos_token`) ends each prefix below with one the full text
        # holds only at its end: not a merge (it was refused as one, on every row of such a tokenizer), and not the
        # answer's (the template's own EOS after each answer is).
        eos = tokenizer.eos_token_id
        appended = appends_eos(tokenizer, special)
        for row, (text, spans) in enumerate(rendered):
            ids = tokenizer(text, **special)["input_ids"]
            # The processor expands the one image placeholder (in the first question, before every answer).
            shift = int(seq - lengths[row]) + int((input_ids[row] == self.image_token_id).sum()) - 1
            for start, end in spans:
                bounds = []
                for cut in (start, end):
                    prefix = tokenizer(text[:cut], **special)["input_ids"]
                    if appended and prefix[-1:] == [eos]:
                        prefix = prefix[:-1]
                    if ids[:len(prefix)] != prefix:
                        raise ValueError("The tokenizer merges tokens across an answer's boundary in a conversation "
                                         f"({self.describe(examples[row])}); its answer tokens cannot be told apart.")
                    bounds.append(len(prefix) + shift)
                is_answer[row, bounds[0]:bounds[1]] = True
        return self._outputs(batch, is_answer)


def appends_eos(tokenizer, special):
    """Whether `tokenizer` (called with `special`, `special_tokens_kwargs`) ends every text with EOS
    (`add_eos_token`). Read off a one-character text: "" encodes to [BOS] alone, which is EOS where BOS is EOS,
    GPT-NeoX-style."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a", **special)["input_ids"][-1:] == [eos]


def _short(value, limit=60, items=3):
    """`value` for an error message: a string cut to `limit` characters; a list (a conversation's turns) as its first
    `items` elements, each cut so, and how many there are (a whole 300-word conversation went into one message)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, (list, tuple)):
        shown = [_short(v, limit, items) for v in value[:items]]
        return shown + [f"... ({len(value)} in all)"] if len(value) > items else shown
    return value


def image_token_count(processor):
    """How many tokens the processor expands one image placeholder into (576 for llava-1.5 at 336 px, 64 on the
    micro testbed), measured by encoding one blank image at the image processor's size, as the collator's processor
    call expands it. `LlavaProcessor` has no `num_image_tokens`: read from there, the count was 0, so examples too
    long for `max_length` passed `check_dataset` and the collator refused them mid-training."""
    from PIL import Image

    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    height = size.get("height") or size.get("shortest_edge") or 336
    width = size.get("width") or height
    encoded = processor(images=[Image.new("RGB", (width, height))], text=[processor.image_token])
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(1 for t in encoded["input_ids"][0] if t == image_id)


def _column_batches(dataset, columns, batch_size=1000):
    """`(start index, [rows holding `columns` only])` over `dataset`. A `datasets.Dataset` reads just those columns
    (Arrow slices, its images never decoded), so a pass over a large set costs the text alone."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "iter"):
        start = 0
        subset = dataset.select_columns(list(dict.fromkeys(columns))).with_format(None)
        for batch in subset.iter(batch_size=batch_size):
            count = len(batch[columns[0]])
            yield start, [{c: batch[c][i] for c in columns} for i in range(count)]
            start += count
    else:
        for start in range(0, len(dataset), batch_size):
            yield start, [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]


def _check_image_column(dataset, collator, name):
    """Refuse an image column that cannot give one image per example, naming the first bad example: a column of
    numbers or of lists (several images per example), and missing cells (None: a text-only row; an undecoded cell
    with neither bytes nor a path), read from Arrow's null bitmaps so that no image is decoded or even read, and
    image paths whose file does not exist (`_check_image_file`)."""
    column = collator.image_column
    features = getattr(dataset, "features", None)
    if features is None or not hasattr(dataset, "with_format"):  # not a `datasets.Dataset`: look at every cell
        for index in range(len(dataset)):
            problem = image_problem(dataset[index][column], column)
            if problem is not None:
                raise problem[0](f"Example {index} of the {name}: its {column!r} {problem[1]}")
            _check_image_file(dataset[index][column], collator.image_folder, column, f"Example {index} of the {name}")
        return
    feature = features[column]
    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, list) or type(feature).__name__ in ("List", "LargeList", "Sequence"):
        raise TypeError(f"The {name}'s {column!r} column holds lists ({feature}): RCP trains on one image per "
                        "question. Keep one image per example, or name the image column with --image_column.")
    if type(feature).__name__ == "Value" and dtype not in ("string", "large_string", "binary", "large_binary",
                                                           "null"):
        raise TypeError(f"The {name}'s {column!r} column holds {dtype} values, not images: give a `datasets.Image` "
                        "column, image paths or encoded bytes, or name the image column with --image_column.")
    import pyarrow as pa
    import pyarrow.compute as pc

    # A decoding `datasets.Image` column hands the collator decoded images: `datasets` opened the path, from the
    # working directory (or a URL); an undecoded cell or a string path is opened by `load_image`, in `image_folder`.
    decoded = type(feature).__name__ == "Image" and getattr(feature, "decode", True)
    start = 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        cells = batch.column(column)
        missing = pc.is_null(cells)
        names = ({cells.type.field(i).name for i in range(cells.type.num_fields)} if pa.types.is_struct(cells.type)
                 else set())
        if {"bytes", "path"} <= names:  # an image cell with neither its bytes nor a path holds no image either
            missing = pc.or_(missing, pc.and_(pc.is_null(pc.struct_field(cells, "bytes")),
                                              pc.is_null(pc.struct_field(cells, "path"))))
        first = pc.index(missing, True).as_py()
        if first >= 0:
            problem = image_problem(cells[first].as_py(), column)
            raise problem[0](f"Example {start + first} of the {name}: its {column!r} {problem[1]}")
        if "path" in names:  # the paths of the cells without bytes only: embedded images are not copied out
            paths = pc.struct_field(cells, "path")
            if "bytes" in names:
                paths = pc.if_else(pc.is_null(pc.struct_field(cells, "bytes")), paths, pa.scalar(None, paths.type))
        else:
            paths = cells if pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type) else None
        for offset, path in enumerate(paths.to_pylist() if paths is not None else ()):
            if decoded and path is not None and "://" in path:
                continue  # `datasets` opens URLs (http, hf://, zip://...) itself when it decodes the cell
            _check_image_file(path, None if decoded else collator.image_folder, column,
                              f"Example {start + offset} of the {name}")
        start += len(batch)


def _check_image_file(cell, image_folder, column, example):
    """FileNotFoundError, naming `example`, when the cell is an image path (a string, or an undecoded cell with a
    path and no bytes) with no file behind it: `load_image` opens it only when the collator reaches the example,
    mid-training. A stat per path; nothing is read."""
    if isinstance(cell, dict) and cell.get("bytes") is None:
        cell = cell.get("path")
    if not isinstance(cell, str):
        return
    path = os.path.join(image_folder, cell) if image_folder else cell
    if os.path.isfile(path):
        return
    if image_folder or os.path.isabs(cell):
        where = ""
    else:
        where = (f" (a relative path, read from the working directory {os.getcwd()!r}: give --image_folder if the "
                 "paths are relative to a folder)")
    raise FileNotFoundError(f"{example}: its {column!r} names the image file {path!r}, which does not exist{where}. "
                            "Fix the path or drop the example.")


def check_dataset(dataset, collator, max_length=None, name="dataset"):
    """Fail before training, naming the example, on what the collator would refuse (or misread) mid-training: an
    empty dataset, missing columns, a missing image (a text-only row) or an image column of numbers or lists, a
    question that is not a string (None, NaN, a number: it trained as the text "None"), a question with more than
    one `<image>` (one is removed, as the collator does), an empty or non-string answer, an `<image>` in an
    answer, and with `max_length`, examples longer than `max_length` tokens, the image's included
    (`image_token_count`).

    Only the question and answer columns and the image column's null bitmap and paths are read (no image is
    decoded), so the checks cost one pass over the text and a stat per image path (a missing file is named here,
    not mid-training); `max_length` adds rendering and tokenizing every example, in batches. A corrupt image file
    is found only when the collator opens it."""
    if not hasattr(dataset, "__len__"):  # a streaming `IterableDataset`: its rows are read only by iterating
        raise TypeError(f"`check_dataset` checks a map-style `datasets.Dataset` up front, but the {name} is a "
                        f"streaming {type(dataset).__name__}. Check a sample of it "
                        "(`Dataset.from_list(list(dataset.take(1000)))`), or skip the check: the collator names a bad "
                        "example when it meets one.")
    if len(dataset) == 0:
        raise ValueError(f"The {name} is empty: there is nothing to train on. Check the split name and the data.")
    columns = set(dataset.column_names)
    needed = [collator.image_column, collator.question_column, collator.answer_column]
    missing = [c for c in needed if c not in columns]
    if missing:
        llava = ("conversations" in columns and collator.question_column not in columns and
                 collator.answer_column not in columns)  # no renaming turns its turns into question / answer
        raise ValueError(
            f"The {name} has no column(s) {missing}; it has {sorted(columns)}. " + (
                "Its 'conversations' column holds LLaVA-style records: give the JSON file itself with --llava_json "
                "(and --image_folder for its relative image paths), not --dataset_name_or_path." if llava else
                "Name the right ones with --image_column / --question_column / --answer_column.")
        )
    _check_image_column(dataset, collator, name)
    tokenizer = collator.processor.tokenizer
    if tokenizer.pad_token is None:
        # The collator asks the processor to pad every batch (left), which transformers refuses without a pad token
        # even for one example: at the first batch, after the model loaded.
        fallback = tokenizer.unk_token or tokenizer.eos_token
        raise ValueError(
            f"The processor's tokenizer has no pad token, which the collator needs to pad the {name}'s batches. Give "
            f"it one and save the processor with the base model: `processor.tokenizer.pad_token = "
            f"{fallback!r}` (the padding is masked out), then `processor.save_pretrained(DIR)`."
        )
    image_tokens = image_token_count(collator.processor) if max_length is not None else 0
    # `load_llava_json`'s rows name their record in the file: the row number drifts from it (text-only records
    # skipped, pairs expanded), and "Example 5" sent the user to another record
    record = [LLAVA_RECORD_COLUMN] if LLAVA_RECORD_COLUMN in columns else []

    def example(index, row):
        return f"Example {index}" + (f" ({row[LLAVA_RECORD_COLUMN]})" if record else "")

    for start, rows in _column_batches(dataset, [collator.question_column, collator.answer_column] + record):
        for offset, row in enumerate(rows):
            problem = collator.text_problem(row)
            if problem is not None:
                raise problem[0](f"{example(start + offset, row)} of the {name}: its {problem[1]}")
        if max_length is None:
            continue
        # Tokenized as the processor tokenizes the prompt, whose one `<image>` id it then expands into
        # `image_tokens` ids (the placeholder is a special token: its neighbours tokenize the same either way).
        texts = [collator.full_text(row) for row in rows]
        encoded = tokenizer(texts, **special_tokens_kwargs(tokenizer, texts))["input_ids"]  # as the collator
        for offset, (row, ids) in enumerate(zip(rows, encoded)):
            total = len(ids) + sum(1 for t in ids if t == collator.image_token_id) * (image_tokens - 1)
            if total > max_length:
                raise ValueError(
                    f"{example(start + offset, row)} of the {name} is {total} tokens long ({image_tokens} of them the "
                    f"image's; answer {_short(row[collator.answer_column])!r}), above `max_length={max_length}`: "
                    "raise --max_length or drop long answers."
                )


def turns_from_messages(messages, images, where="a row"):
    """TRL's conversational vision format -- `messages` [{"role", "content": [{"type": "image"} | {"type": "text",
    "text"}]}] and `images` [one image] (e.g. HuggingFaceH4/llava-instruct-mix-vsft) -- as `(image, questions,
    answers)`: a user turn's text parts joined by a newline, the assistant turns the answers; a system turn is
    dropped (RCP's prompt is the image and the question, as `prompt_messages` asks it at evaluation; llava-hf's
    LLaVA-1.5 template would write a system text before "USER:"). Raises ValueError naming `where` for what
    RCP cannot train on: no image or several, turns that do not alternate user / assistant."""
    images = list(images or [])
    if len(images) != 1:
        raise ValueError(f"{where} holds {len(images)} images: RCP trains on one image per conversation. Filter "
                         "the dataset to rows with exactly one image.")
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError(f"{where}: its messages hold {len(turns)} user / assistant turns; a conversation needs a "
                         "user question then its assistant answer, at least once.")
    questions, answers = [], []
    for k, message in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ValueError(f"{where}: message {k} is from {message.get('role')!r}, expected {expected!r}: turns "
                             "alternate user, assistant.")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        else:
            text = "\n".join(part.get("text") or "" for part in content if part.get("type") == "text").strip()
        (questions if expected == "user" else answers).append(text)
    return images[0], questions, answers


def dataset_from_messages(dataset, image_column="image", question_column="question", answer_column="answer"):
    """A `datasets.Dataset` in TRL's conversational vision format (`messages` + `images`) as RCP's columns: one
    row per conversation, the image undecoded, `question` / `answer` the lists of its turns (trained as one
    sequence). Every row is converted (and checked, `turns_from_messages`) now, before any model loads."""
    import datasets

    encoded = isinstance(getattr(dataset.features["images"], "feature", None), datasets.Image)
    if encoded:  # keep the encoded images as they are
        dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))

    def convert(messages, images, index):
        image, questions, answers = turns_from_messages(messages, images, where=f"Row {index}")
        return {image_column: image, question_column: questions, answer_column: answers}

    converted = dataset.map(convert, input_columns=["messages", "images"], with_indices=True,
                            remove_columns=[c for c in dataset.column_names if c in ("messages", "images")])
    if encoded:
        converted = converted.cast_column(image_column, datasets.Image(decode=True))
    if all(len(q) == 1 for q in converted[question_column]):  # single-turn throughout: plain strings, as evaluated
        converted = converted.map(lambda q, a: {question_column: q[0], answer_column: a[0]},
                                  input_columns=[question_column, answer_column])
    return converted


# The column of `load_llava_json`'s rows naming the record each came from ("record 3 (id 'r3')"), for
# the errors of `check_dataset` and the collator: the rows are renumbered (text-only records skipped, pairs expanded).
LLAVA_RECORD_COLUMN = "llava_record"

# The speaker names a LLaVA-style record may use: LLaVA's own ("human"/"gpt") and the chat-template ones.
LLAVA_QUESTION_ROLES = ("human", "user")
LLAVA_ANSWER_ROLES = ("gpt", "assistant")


def saved_splits(folder):
    """The split names of a `DatasetDict.save_to_disk` folder, read from its dataset_dict.json (cheap: no split is
    opened); None when `folder` holds no readable one (not such a folder, or its record is broken)."""
    try:
        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f)["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return splits if isinstance(splits, list) else None


def read_json_records(path):
    """The records of a JSON file: its value (a list, for LLaVA-style data), or for JSON Lines (a `.jsonl` file, or
    one that holds several JSON values, one per line: LLaVA-style data is shipped both ways) the list of its lines'
    values. Raises `json.JSONDecodeError` when it is neither."""
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is not JSON
        text = f.read()
    lines = [line for line in text.splitlines() if line.strip()]
    if str(path).lower().endswith(".jsonl"):
        return [json.loads(line) for line in lines]
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        try:  # JSON Lines under a .json name
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise err from None  # a broken JSON document: its own error has the right position


def load_llava_json(path, image_folder=None, turns="conversation"):
    """A LLaVA-style JSON list or JSON Lines file (`image` + `conversations` [human, gpt, ...]; `read_json_records`)
    as a `datasets.Dataset` of
    (image, question, answer) rows. `turns="conversation"` (default): one row per record, `question` and `answer`
    the lists of its turns, which `RcpDataCollator` trains as one sequence with every answer labelled (LLaVA's
    `preprocess_v1`) -- plain strings when every record is single-turn, as `dataset_from_messages` gives them;
    `turns="pairs"`: one single-turn row per human/gpt pair (a later turn then trains without the
    earlier ones). Text-only records (no `image`, as llava_v1_5_mix665k.json's ShareGPT ones) are skipped with a
    warning that counts them: there is nothing to prune.

    Image paths are resolved here, once, against `image_folder` (absolute paths returned), so the collator must
    not join the folder again (it left `images/images/...` with a relative folder). Every record and image is
    checked up front (one image path per record, each image readable, turns alternating human/gpt and ending on
    an answer): bad data is named, by record, before any model loads."""
    from datasets import Dataset
    from PIL import Image

    if turns not in ("conversation", "pairs"):
        raise ValueError(f"--llava_turns {turns!r}: use 'conversation' (one sequence per record) or 'pairs' (one "
                         "example per question/answer pair).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--llava_json: no file {path!r}. Give the path of a LLaVA-style JSON list.")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image_folder: no folder {image_folder!r} (the JSON's image paths are "
                                "relative to it).")
    try:
        records = read_json_records(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); a LLaVA-style JSON is a list of records (or JSON Lines, "
                         "one record per line).") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records with 'image' and 'conversations', "
                         f"got {type(records).__name__}{'' if records else ' (empty)'}.")
    rows = []
    readable = set()  # LLaVA sets reuse images (COCO) across records: open each file once
    text_only = []  # records without an image (llava_v1_5_mix665k.json's ShareGPT turns): nothing to prune
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "conversations" not in record:
            raise ValueError(f"Record {i} of {path} is not a dict with 'conversations' (and 'image'), got "
                             f"{_short(record)!r}.")
        named = f"Record {i}" + (f" (id {record['id']!r})" if "id" in record else "")
        where = f"{named} of {path}"
        if "image" not in record:
            text_only.append(named)
            continue
        dialog = record["conversations"]
        if (not isinstance(dialog, list) or len(dialog) < 2
                or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in dialog)):
            raise ValueError(f"{where}: 'conversations' must be a list of at least one human and one "
                             "gpt turn, each a dict with a string 'value'.")
        # The pairs are cut by position (turn 0 asks, turn 1 answers, ...): a conversation opening with the gpt
        # turn swapped question and answer (the answer's <image> then counted as a second image, mid-training).
        for k, turn in enumerate(dialog):
            expected = LLAVA_QUESTION_ROLES if k % 2 == 0 else LLAVA_ANSWER_ROLES
            if turn.get("from") not in expected:
                raise ValueError(f"{where}: turn {k} is from {turn.get('from')!r}, expected {expected[0]!r} "
                                 f"(or {expected[1]!r}): turns alternate human, gpt, human, gpt, ... (a question, "
                                 "then its answer). Fix the turns' 'from' or drop the record.")
        if len(dialog) % 2:
            # Refused rather than dropped: a question without its answer is as incomplete as a record without
            # 'conversations', and dropping it would train on less than the file says.
            raise ValueError(f"{where}: the last turn ({len(dialog) - 1}) is a human question without a gpt "
                             "answer. Add the answer or drop the turn.")
        for k in range(1, len(dialog), 2):
            if not dialog[k]["value"].strip():  # the collator refuses it too, but only mid-training
                raise ValueError(f"{where}: turn {k} (gpt) is an empty answer {dialog[k]['value']!r}: RCP trains "
                                 "on the answer tokens. Give the answer or drop the turn pair.")
            if "<image>" in dialog[k]["value"]:  # check_dataset refuses it too, by its row in the rebuilt dataset,
                # which drifts from the record's number (text-only records skipped, pairs expanded)
                raise ValueError(f"{where}: turn {k} (gpt) holds the image placeholder '<image>' in its answer "
                                 f"{_short(dialog[k]['value'])!r}; the image goes with the first question. Remove it "
                                 "from the answer or drop the record.")
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
            except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError, as is
                # an unreadable file; a decompression bomb is neither
                raise ValueError(f"{where}: the image file {image!r} cannot be read as an image ({err}). Replace "
                                 "the file or drop the record.") from None
            readable.add(image)
        questions = [strip_image_token(human["value"]).strip() for human in dialog[0::2]]
        answers = [gpt["value"].strip() for gpt in dialog[1::2]]
        source = "r" + named[1:]  # each row names its record (in the --llava_json file) for the errors after this
        if turns == "pairs":
            rows += [{"image": image, "question": q, "answer": a,
                      LLAVA_RECORD_COLUMN: f"{source}, turns {2 * k}-{2 * k + 1}"}
                     for k, (q, a) in enumerate(zip(questions, answers))]
        else:
            rows.append({"image": image, "question": questions, "answer": answers, LLAVA_RECORD_COLUMN: source})
    if text_only:
        if not rows:
            raise ValueError(f"Every record of {path} is text-only (no 'image'): RCP prunes visual tokens and trains "
                             "on image questions. Give records with an 'image'.")
        logger.warning(f"[data] {path}: skipped {len(text_only)} text-only record(s) of {len(records)} (no 'image'; "
                       f"RCP trains on image questions), e.g. {', '.join(text_only[:3])}.")
    if turns != "pairs" and all(len(row["question"]) == 1 for row in rows):
        # single-turn throughout: plain strings, as evaluated (`dataset_from_messages` does the same); one-element
        # lists read as multi-turn rows, which --calibrate_retention refused
        rows = [{**row, "question": row["question"][0], "answer": row["answer"][0]} for row in rows]
    return Dataset.from_list(rows)


__all__ = [
    "RcpDataCollator", "answer_starts", "check_dataset", "default_answer_mask", "image_problem", "image_token_count",
    "load_image", "load_llava_json", "position_ids_from_mask", "prompt_batch", "prompt_messages", "read_json_records",
    "saved_splits", "shared_prefix_length", "strip_image_token",
    "dataset_from_messages", "turns_from_messages",
]
