"""A chat template that writes the tokenizer's BOS itself (Llama-3's, Mistral's), with a tokenizer that adds one too,
gets it once: the processor's own call added a second, which every training, evaluation and lmms-eval prompt got.
The reference is transformers' `ProcessorMixin.apply_chat_template(tokenize=True)`, which leaves special tokens out
when the rendered text starts with BOS."""

import pytest
import torch
from conftest import sentencepiece_like_processor
from PIL import Image

from rcp_llava.data import RcpDataCollator, encode_texts, prompt_batch, special_tokens_kwargs


def _example(question="How many cats?", answer="There are two cats"):
    return {"image": Image.new("RGB", (8, 8), (255, 0, 0)), "question": question, "answer": answer}


def _unpadded(ids, attention):
    return ids[attention.bool()].tolist()


def _reference(processor, text, image):
    """transformers' own tokenization of a chat-rendered text (`apply_chat_template(tokenize=True)`'s rule)."""
    return processor(images=[image], text=[text], add_special_tokens=False)["input_ids"][0]


def test_collator_writes_one_bos_and_trains_the_answer():
    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    tok = processor.tokenizer
    collator = RcpDataCollator(processor)
    examples = [_example(), _example("What colour?", "Red")]
    batch = collator(examples)
    for i, (example, answer) in enumerate(zip(examples, ["There are two cats", "Red"])):
        ids = _unpadded(batch["input_ids"][i], batch["attention_mask"][i])
        assert ids == _reference(processor, collator.texts(example)[1], example["image"])
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        labelled = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        assert tok.decode(labelled, skip_special_tokens=True).strip() == answer
        assert labelled[-1] == tok.eos_token_id
        question = batch["input_ids"][i][batch["question_mask"][i]].tolist()
        assert tok.decode(question).rstrip().endswith("ASSISTANT:")


def test_multi_turn_conversation_writes_one_bos_and_trains_both_answers():
    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    tok = processor.tokenizer
    collator = RcpDataCollator(processor)
    example = {"image": Image.new("RGB", (8, 8)), "question": ["How many cats?", "What colour?"],
               "answer": ["There are two cats", "Red"]}
    batch = collator([example])
    ids = _unpadded(batch["input_ids"][0], batch["attention_mask"][0])
    assert ids == _reference(processor, collator.conversation(example)[0], example["image"])
    assert ids.count(tok.bos_token_id) == 1
    labelled = tok.decode(batch["input_ids"][0][batch["labels"][0] != -100].tolist())
    assert labelled.replace(" ", "") == "Therearetwocats</s>Red</s>"


def test_prompt_batch_writes_one_bos():
    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    image = Image.new("RGB", (8, 8))
    batch = prompt_batch(processor, ["How many cats?", "What colour?"], [image, image])
    for i, question in enumerate(["How many cats?", "What colour?"]):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True)
        ids = _unpadded(batch["input_ids"][i], batch["attention_mask"][i])
        assert ids == _reference(processor, text, image) and ids.count(processor.tokenizer.bos_token_id) == 1


def test_special_tokens_kwargs_decides_per_batch():
    tok = sentencepiece_like_processor("ASSISTANT:").tokenizer
    assert special_tokens_kwargs(tok, ["<s>USER: a", "<s>USER: b"]) == {"add_special_tokens": False}
    assert special_tokens_kwargs(tok, ["USER: a", "USER: b"]) == {}
    assert special_tokens_kwargs(tok, []) == {}
    with pytest.raises(ValueError, match=r"BOS \('<s>'\) at the start of 1 of 2 texts"):
        special_tokens_kwargs(tok, ["<s>USER: a", "USER: b"])


def test_a_tokenizer_without_bos_keeps_its_special_tokens():
    """A tokenizer with no BOS (Qwen2's) writes none, so no text starts with it: its special tokens stay on (`{}`).
    Read as "every text starts with the empty BOS", they were switched off, and an EOS it appends was lost."""
    tok = sentencepiece_like_processor("ASSISTANT:").tokenizer
    tok.bos_token = None
    assert tok.bos_token is None
    assert special_tokens_kwargs(tok, ["USER: a", "USER: b"]) == {}


@pytest.mark.parametrize("multi_turn", [False, True])
def test_a_bos_writing_template_with_a_tokenizer_appending_eos_trains_each_answers_eos(multi_turn):
    """With a template that writes BOS the texts are tokenized without special tokens, so a tokenizer's
    `add_eos_token` appends nothing: the last token is the answer's own EOS, and it is trained. Asking whether the
    tokenizer appends EOS with its special tokens on (not as the batch was tokenized) dropped that EOS's label."""
    processor = sentencepiece_like_processor("ASSISTANT:", add_eos_token=True, bos_in_template=True)
    tok = processor.tokenizer
    example = _example()
    if multi_turn:
        example = {**example, "question": [example["question"], "What colour?"], "answer": [example["answer"], "Red"]}
    batch = RcpDataCollator(processor)([example, _example("What colour?", "Red")])
    for i in range(2):
        ids = _unpadded(batch["input_ids"][i], batch["attention_mask"][i])
        labelled = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == (2 if multi_turn and i == 0 else 1)
        assert labelled[-1] == tok.eos_token_id
        assert labelled.count(tok.eos_token_id) == ids.count(tok.eos_token_id)
        assert batch["answer_mask"][i].sum() == len(labelled)


def test_encode_texts_keeps_the_tokenizers_bos_for_a_template_without_one():
    """llava-hf's template writes no BOS: the tokenizer's own is added, as before."""
    processor = sentencepiece_like_processor("ASSISTANT:")
    processor.tokenizer.add_bos_token = True
    image = Image.new("RGB", (8, 8))
    ids = encode_texts(processor, ["USER: <image>\nHi ASSISTANT:"], [image], return_tensors="pt")["input_ids"][0]
    assert ids.tolist() == processor(images=[image], text=["USER: <image>\nHi ASSISTANT:"])["input_ids"][0]
    assert ids.tolist().count(processor.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("multi_turn", [False, True])
def test_an_answer_quoting_eos_still_ends_with_eos(multi_turn):
    """The collator appended EOS unless the answer text held it anywhere: an answer quoting "</s>" was trained
    without its final EOS (the template did not end the turn with one)."""
    processor = sentencepiece_like_processor("ASSISTANT:")
    tok = processor.tokenizer
    answer = "There </s> are two cats"
    example = {"image": Image.new("RGB", (8, 8)), "question": "How many cats?", "answer": answer}
    if multi_turn:
        example = {**example, "question": [example["question"], "What colour?"], "answer": [answer, "Red"]}
    batch = RcpDataCollator(processor)([example])
    labelled = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
    ends = [i for i, t in enumerate(labelled) if t == tok.eos_token_id]
    if multi_turn:  # the quoted one, the first answer's end, the second answer's end
        assert len(ends) == 3 and ends[-1] == len(labelled) - 1
        assert tok.decode(labelled[ends[1] + 1:], skip_special_tokens=True).strip() == "Red"
    else:
        assert len(ends) == 2 and ends[-1] == len(labelled) - 1


def test_whitespace_a_template_writes_after_the_turns_eos_is_not_trained():
    """ChatML ends a turn "<|im_end|>\\n": the single-turn collator labelled the newline after EOS (the multi-turn
    path leaves it to the next turn). The labels end with EOS in both, and agree."""
    processor = sentencepiece_like_processor("ASSISTANT:")
    # (the toy tokenizer drops a newline; a space after EOS is its token "▁", as ChatML's newline is one)
    processor.chat_template = processor.chat_template.replace("{% endgeneration %}",
                                                              "{% endgeneration %}{{ eos_token + ' ' }}")
    tok = processor.tokenizer
    example = {"image": Image.new("RGB", (8, 8)), "question": "How many cats?", "answer": "There are two cats"}
    single = RcpDataCollator(processor)([example])
    multi = RcpDataCollator(processor)([{**example, "question": [example["question"]], "answer": [example["answer"]]}])
    for batch in (single, multi):
        labelled = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
        assert labelled[-1] == tok.eos_token_id and labelled.count(tok.eos_token_id) == 1
        assert tok.decode(labelled, skip_special_tokens=True).strip() == example["answer"]
    assert torch.equal(single["labels"], multi["labels"]) and torch.equal(single["input_ids"], multi["input_ids"])


def test_check_dataset_counts_the_tokens_the_collator_makes():
    """`check_dataset(max_length=...)` tokenized with special tokens on: with a BOS-writing template it counted two
    BOS and refused an example the collator makes exactly `max_length` long."""
    from rcp_llava.data import check_dataset

    processor = sentencepiece_like_processor("ASSISTANT:", bos_in_template=True)
    collator = RcpDataCollator(processor)
    example = _example()
    length = int(collator([example])["attention_mask"].sum())
    from datasets import Dataset

    dataset = Dataset.from_dict({k: [v] for k, v in example.items()})
    check_dataset(dataset, collator, max_length=length)
    with pytest.raises(ValueError, match=rf"is {length} tokens long"):
        check_dataset(dataset, collator, max_length=length - 1)
