"""Training: the loss terms (pure functions) and the Trainer mechanics (issue 4)."""

import json
import math
import os
import re
import textwrap

import pytest
import torch

import train_rcp
from conftest import randomize_plugin_parameters, sentencepiece_like_processor
from train_rcp import (
    RcpDataCollator, RcpTrainer, RcpTrainingArguments, gaussian_w2, sparsity_loss, task_loss, w2_repair_loss,
)


# -- loss terms ------------------------------------------------------------------------------------


def test_task_loss_hand_computed():
    # One target: position 0 predicts label[1] = 2 with logits [0, 0, ln 3] -> p = 3/5.
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 2] = math.log(3.0)
    labels = torch.tensor([[-100, 2]])
    assert torch.isclose(task_loss(logits, labels), torch.tensor(-math.log(3 / 5)))
    # Normalised by the window's token count when given.
    assert torch.isclose(task_loss(logits, labels, num_items=4), torch.tensor(-math.log(3 / 5) / 4))
    # No target at all (every answer cut by max_length, or a text-only micro-batch): 0, not 0 / 0
    assert task_loss(logits, torch.full((1, 2), -100)).item() == 0.0


def test_w2_is_finite_at_its_edges_and_computed_in_float32():
    """The numerics `gaussian_w2` guards: a constant student, whose float32 variance rounds below 0 (0.7 * 0.7 -
    0.7^2), is a 0 spread, not NaN; a one-position sample (variance 0, sqrt's infinite slope) and a sample with no
    position back-propagate finite gradients; half-precision states are compared in float32."""
    constant = gaussian_w2(torch.full((1, 5, 4), 0.7), torch.zeros(1, 5, 4), torch.ones(1, 5, dtype=torch.bool))
    assert constant.item() == pytest.approx(0.49, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    for mask in (torch.tensor([[True, False, False]]), torch.tensor([[True, True, False], [False, False, False]])):
        student = torch.randn(mask.shape[0], 3, 4, generator=g, requires_grad=True)
        gaussian_w2(student, torch.randn(mask.shape[0], 3, 4, generator=g), mask).sum().backward()
        assert torch.isfinite(student.grad).all(), mask.tolist()
    half = (torch.randn(2, 8, 16, generator=g) * 10).bfloat16(), (torch.randn(2, 8, 16, generator=g) * 10).bfloat16()
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert torch.equal(gaussian_w2(*half, mask), gaussian_w2(half[0].float(), half[1].float(), mask))


def test_w2_zero_for_identical_and_hand_computed():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]]).bool()
    assert torch.allclose(gaussian_w2(h, h, mask), torch.zeros(2), atol=1e-5)
    # Sample 0 only: teacher positions [0, 2] in every dim (mu 1, std 1), student [1, 1] (mu 1, std 0).
    teacher = torch.tensor([[[0.0] * 4, [2.0] * 4]])
    student = torch.tensor([[[1.0] * 4, [1.0] * 4]])
    w2 = gaussian_w2(student, teacher, torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(w2, torch.tensor([1.0]), atol=1e-5)  # (0 + 4 * (0 - 1)^2) / 4
    # Shifted means: (4 * 3^2) / 4 = 9.
    assert torch.allclose(gaussian_w2(student + 3, student, torch.ones(1, 2, dtype=torch.bool)),
                          torch.tensor([9.0]), atol=1e-4)


def test_w2_repair_loss_gradients_flow_and_average():
    s = torch.randn(3, 4, 8, requires_grad=True)
    t = torch.randn(3, 4, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss = w2_repair_loss([s, s * 2], [t, t], mask)
    loss.backward()
    assert s.grad.abs().sum() > 0
    per_layer = (gaussian_w2(s, t, mask) + gaussian_w2(s * 2, t, mask)) / 2
    assert torch.isclose(loss, per_layer.mean())
    # A window of 6 samples: this batch's share is sum / 6.
    assert torch.isclose(w2_repair_loss([s], [t], mask, num_samples=6), gaussian_w2(s, t, mask).sum() / 6)
    # Mean-only variant ignores the spread.
    spread = torch.tensor([[[0.0], [2.0]]])
    flat = torch.tensor([[[1.0], [1.0]]])
    assert w2_repair_loss([flat], [spread], torch.ones(1, 2, dtype=torch.bool), mean_only=True) == 0


def test_sparsity_loss_hand_computed():
    retention = torch.tensor([[1.0, 0.5, 0.25, 0.25], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    loss = sparsity_loss(retention, target=0.25, has_image=torch.tensor([True, False]))
    assert torch.isclose(loss, torch.tensor(abs(0.5 - 0.25) / 2))  # only row 0 counts, / 2 samples
    loss.backward()
    assert torch.allclose(retention.grad[0], torch.full((4,), 0.25 / 2))
    assert torch.equal(retention.grad[1], torch.zeros(4))


def test_annealing_schedule():
    assert train_rcp.annealed(1.5, 0.2, 0.0) == 1.5
    assert math.isclose(train_rcp.annealed(1.5, 0.2, 1.0), 0.2)
    assert math.isclose(train_rcp.annealed(1.5, 0.2, 0.5), math.sqrt(1.5 * 0.2))


def test_training_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="`lambda_repair` must be a finite number >= 0, got -1"):
        RcpTrainingArguments(output_dir=str(tmp_path), lambda_repair=-1)
    with pytest.raises(ValueError, match="`sparsity_layers` is 'some'"):
        RcpTrainingArguments(output_dir=str(tmp_path), sparsity_layers="some")
    # both names: transformers 5.23 made `gradient_checkpointing` a deprecated alias of `activation_checkpointing`
    # (the check read the old name only, and its message named it to a user who passed the new one)
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        with pytest.raises(ValueError, match=r"^`activation_checkpointing=True` \(or its old name "
                                             r"`gradient_checkpointing`\) is not supported"):
            RcpTrainingArguments(output_dir=str(tmp_path), **{name: True})
    with pytest.raises(ValueError, match="`repair_loss_layers` must be integers, e.g. '1,13,25' or '1 13 25'"):
        RcpTrainingArguments(output_dir=str(tmp_path), repair_loss_layers="a,b")
    args = RcpTrainingArguments(output_dir=str(tmp_path))
    # The authors' code: lambda_repair 3.0 on pooled moments (the paper prints 40; issue 15).
    assert (args.lambda_task, args.lambda_repair, args.lambda_sparse) == (1.5, 3.0, 200.0)
    assert (args.repair_loss_pooling, args.sparsity_reduction, args.gumbel_schedule, args.sparsity_schedule,
            args.sparsity_warmup_ratio) == ("batch", "batch", "authors", "cosine", 0.1)
    with pytest.raises(ValueError, match=r"`repair_loss_pooling` is 'all'; use one of \['batch', 'sample'\]"):
        RcpTrainingArguments(output_dir=str(tmp_path), repair_loss_pooling="all")
    with pytest.raises(ValueError, match=r"`gumbel_noise_ratio` must be in \[0, 1\], got 2"):
        RcpTrainingArguments(output_dir=str(tmp_path), gumbel_noise_ratio=2)
    # Training by epochs with no epoch trained nothing and saved the untrained plug-ins as trained (as max_steps 0).
    with pytest.raises(ValueError, match=r"^`num_train_epochs` is 0 and `max_steps` is -1 \(train by epochs\): give "
                                         r"a positive number of epochs, or a positive `max_steps`\.$"):
        RcpTrainingArguments(output_dir=str(tmp_path), num_train_epochs=0)
    assert RcpTrainingArguments(output_dir=str(tmp_path), num_train_epochs=0, max_steps=3).max_steps == 3
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "cosine_with_min_lr"])
def test_every_lr_schedule_builds_with_the_default_kwargs(tmp_path, schedule):
    """The min-LR floor was the default kwargs of every schedule: `--lr_scheduler_type linear` (or `cosine`, the
    paper's) failed at train() with "unexpected keyword argument 'min_lr_rate'" after the model had loaded."""
    from transformers import get_scheduler

    args = RcpTrainingArguments(output_dir=str(tmp_path), lr_scheduler_type=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    last = optimizer.param_groups[0]["lr"]
    assert last == pytest.approx({"linear": 0.0, "cosine": 0.0, "constant": 1.0, "cosine_with_min_lr": 0.1}[schedule])
    explicit = RcpTrainingArguments(output_dir=str(tmp_path), lr_scheduler_kwargs='{"min_lr_rate": 0.3}')
    assert explicit.lr_scheduler_kwargs == {"min_lr_rate": 0.3}


# -- Trainer mechanics on the micro testbed --------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    """A micro testbed (random stock LLaVA + processor + 8 generated samples) as an RCP model factory."""
    from configuration_rcp_llava import RcpLlavaConfig
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.testbed import build_dataset, build_model_config, build_processor, get_preset

    preset = get_preset("micro")
    processor = build_processor(preset)
    stock = build_model_config(preset, processor.tokenizer).to_dict()
    dataset = build_dataset("micro", seed=0)["train"]

    def make(seed=0, **overrides):
        kwargs = dict(pruning_layers=[1], repair_layers=[1], pruner_hidden_size=8, repair_bottleneck_size=8,
                      visual_token_budget=preset.num_visual_tokens / 4, query_dropout=0.0,
                      pruner_dropout=0.0)
        kwargs.update(overrides)
        torch.manual_seed(seed)
        config = RcpLlavaConfig(**{k: v for k, v in stock.items() if k != "model_type"}, **kwargs)
        return RcpLlavaForConditionalGeneration(config)

    return make, processor, dataset


def make_trainer(micro, out, model=None, **arg_overrides):
    make, processor, dataset = micro
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                  logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], seed=0,
                  disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    kwargs.update(arg_overrides)
    args = RcpTrainingArguments(**kwargs)
    collator = RcpDataCollator(processor)
    return RcpTrainer(model=model or make(), args=args, train_dataset=dataset, data_collator=collator)


def test_a_batch_without_the_collators_masks_trains_on_the_same_positions(micro, tmp_path):
    """A collator that gives only `labels` (a stock one): the student ran with labels=None, so its pruners read the
    answer tokens as question text (teacher forcing leaked the answer into the selection) and its adapters repaired
    only the last position, while the repair loss compared every answer position. The masks now come from the
    labels, as the collator builds them: the same loss, term by term."""
    # Fixed counts and trained-like pruners, which rank by the question: untrained adaptive ones keep every token,
    # and then which rows are the question changes nothing.
    model = micro[0](pruning_keep_counts=[16])
    randomize_plugin_parameters(model, seed=3)
    trainer = make_trainer(micro, tmp_path, model=model)
    _, processor, dataset = micro
    batch = RcpDataCollator(processor)([dataset[0], dataset[1]])
    labels_only = {k: v for k, v in batch.items() if k not in ("question_mask", "answer_mask")}
    trainer.model.eval()  # no Gumbel noise, no dropout: two forwards of one batch are comparable
    with torch.no_grad():
        given = trainer.compute_loss(trainer.model, dict(batch))
        derived = trainer.compute_loss(trainer.model, labels_only)
        # the answer read as question text selects other tokens: what the masks from the labels prevent
        leaked = trainer.compute_loss(trainer.model, {**batch, "question_mask": batch["attention_mask"].bool()})
    assert torch.equal(given, derived)
    assert trainer._eval_parts[0][1] == trainer._eval_parts[1][1]
    assert trainer._eval_parts[0][1]["retention"] < 1 and not torch.equal(given, leaked)


def test_collator_builds_labels_and_masks(micro):
    _, processor, dataset = micro
    batch = RcpDataCollator(processor)([dataset[0], dataset[1]])
    tok = processor.tokenizer
    for i in range(2):
        answer_ids = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        assert tok.decode(answer_ids[:-1]).strip() == dataset[i]["answer"]
        assert answer_ids[-1] == tok.eos_token_id
        # answer_mask marks the positions that predict the answer tokens
        predicted = batch["input_ids"][i][1:][batch["answer_mask"][i][:-1]]
        assert predicted.tolist() == answer_ids
        question = tok.decode(batch["input_ids"][i][batch["question_mask"][i]].tolist())
        assert dataset[i]["question"].split()[0] in question and "ASSISTANT" in question
        assert not (batch["question_mask"][i] & (batch["labels"][i] != -100)).any()


@pytest.mark.parametrize("add_eos_token, bos_is_eos", [(False, False), (True, False), (False, True)])
def test_a_tokenizer_appending_eos_trains_conversation_rows(add_eos_token, bos_is_eos):
    """--llava_json's rows are conversations (lists), one turn included: a tokenizer appending EOS to every text ended
    each answer-boundary prefix with an EOS the full text does not hold there, and every row was refused as a token
    merge. Labelled: exactly each answer and the EOS the template puts after it."""
    from PIL import Image

    processor = sentencepiece_like_processor("ASSISTANT:", add_eos_token)
    tok = processor.tokenizer
    if bos_is_eos:  # GPT-NeoX-style: "" encodes to [EOS], which is no appended EOS (the answers' EOS was dropped)
        tok.bos_token, tok.add_bos_token = tok.eos_token, True
        assert tok("")["input_ids"] == [tok.eos_token_id]
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    batch = RcpDataCollator(processor)([
        {"image": image, "question": ["How many cats?"], "answer": ["There are two cats."]},
        {"image": image, "question": ["What colour?", "How many cats?"], "answer": ["Red", "There are two cats"]}])
    for i, answers in enumerate([["There are two cats."], ["Red", "There are two cats"]]):
        labelled = tok.decode(batch["input_ids"][i][batch["labels"][i] != -100].tolist())
        assert labelled.replace(" ", "") == "".join(f"{a}{tok.eos_token}" for a in answers).replace(" ", "")


@pytest.mark.parametrize("generation_prompt, add_eos_token", [("ASSISTANT:", False), ("ASSISTANT: ", False),
                                                              ("ASSISTANT:", True)])
def test_the_answer_starts_where_the_full_text_leaves_its_prompt(generation_prompt, add_eos_token):
    """The collator counted the prompt's own tokens to find the answer. When those are not a prefix of the full
    text's (a generation prompt ending in a space that "▁There" absorbs, a tokenizer appending EOS), the answer's
    first token went into `question_mask` (the pruners read it) and was never trained."""
    from PIL import Image

    processor = sentencepiece_like_processor(generation_prompt, add_eos_token)
    tok = processor.tokenizer
    example = {"image": Image.new("RGB", (8, 8), (255, 0, 0)), "question": "How many cats?",
               "answer": "There are two cats"}
    batch = RcpDataCollator(processor)([example, {**example, "question": "What colour?", "answer": "Red"}])
    for i, answer in enumerate(["There are two cats", "Red"]):
        labelled = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        question = batch["input_ids"][i][batch["question_mask"][i]].tolist()
        assert tok.decode(labelled, skip_special_tokens=True).strip() == answer
        first = tok.decode(labelled[:1]).strip()
        assert first and answer.startswith(first)  # the answer's first token is trained
        assert tok.decode(question).rstrip().endswith("ASSISTANT:")
        assert labelled[-1] == tok.eos_token_id


@pytest.mark.parametrize("generation_prompt, add_eos_token, bos_in_template", [
    ("ASSISTANT:", False, False), ("ASSISTANT: ", False, False), ("ASSISTANT:", True, False),
    ("ASSISTANT:", False, True), ("ASSISTANT: ", True, True)])
def test_the_collator_runs_the_image_processor_once_and_finds_the_answers_the_two_pass_way(
        generation_prompt, add_eos_token, bos_in_template, monkeypatch):
    """The collator ran the processor on the prompts alone, images and all, to find where each answer starts: the
    image processor twice per batch. It now compares the prompts' text tokens with the full texts' and adds the
    placeholder's expansion. Its batch must be the two-pass one, exactly: here against that reference, with rows of
    different lengths (left padding), an answer the prompt's last token absorbs and a tokenizer appending EOS."""
    from PIL import Image

    from rcp_llava.data import encode_texts, shared_prefix_length

    processor = sentencepiece_like_processor(generation_prompt, add_eos_token, bos_in_template=bos_in_template)
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    rows = [{"image": image, "question": "How many cats are there?", "answer": "There are two cats."},
            {"image": image, "question": "What colour?", "answer": "Red"},
            {"image": image, "question": "Cats?", "answer": "two"}]
    collator = RcpDataCollator(processor)
    calls, preprocess = [], type(processor.image_processor).preprocess
    monkeypatch.setattr(type(processor.image_processor), "preprocess",
                        lambda self, images, *a, **k: calls.append(len(images)) or preprocess(self, images, *a, **k))
    batch = collator(rows)
    assert calls == [3]
    # the reference: the prompts through the processor too, compared token by token after the left padding
    monkeypatch.undo()
    prompts, fulls = zip(*(collator.texts(r) for r in rows))
    full = encode_texts(processor, fulls, [image] * 3, return_tensors="pt", padding=True)
    alone = encode_texts(processor, prompts, [image] * 3, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], full["input_ids"])
    seq, width = full["input_ids"].shape[1], alone["input_ids"].shape[1]
    for i in range(3):
        pad, prompt_pad = seq - int(full["attention_mask"][i].sum()), width - int(alone["attention_mask"][i].sum())
        start = pad + shared_prefix_length(full["input_ids"][i, pad:], alone["input_ids"][i, prompt_pad:])
        assert (batch["labels"][i] != -100).nonzero()[0].item() == start, i
    assert batch["answer_mask"].sum(1).tolist() == (batch["labels"] != -100).sum(1).tolist()


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_answer_starts_counts_only_the_expanded_placeholders_of_any_number_of_images(num_images):
    """`answer_starts` shifts the text tokens' shared length by the tokens the processor expanded each placeholder
    into: the batch's image ids less the placeholders in the text. The collator has one image per row, but lmms-eval's
    `loglikelihood` also scores text-only documents (ScienceQA) and several images (`pruning_method=none`): a shift
    that assumed one placeholder ("- 1") put the continuation one token late with no image and one early with two.
    Here against the two-pass reference (the prompts through the processor too), rows left-padded."""
    from PIL import Image

    from rcp_llava.data import answer_starts, encode_texts, prompt_messages, shared_prefix_length

    processor = sentencepiece_like_processor("ASSISTANT:")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    questions, answers = ["How many cats are there?", "Red?"], [" There are two cats", " two"]
    prompts = [processor.apply_chat_template(prompt_messages(q, num_images=num_images), add_generation_prompt=True)
               for q in questions]
    fulls = [p + a for p, a in zip(prompts, answers)]
    images = [Image.new("RGB", (8, 8), (255, 0, 0))] * (2 * num_images) or None
    full = encode_texts(processor, fulls, images, return_tensors="pt", padding=True)
    alone = encode_texts(processor, prompts, images, return_tensors="pt", padding=True)
    lengths = full["attention_mask"].sum(1)
    starts = answer_starts(processor.tokenizer, full["input_ids"], lengths, fulls, prompts, image_id).tolist()
    seq, width = full["input_ids"].shape[1], alone["input_ids"].shape[1]
    expected = []
    for i in range(2):
        pad, prompt_pad = seq - int(lengths[i]), width - int(alone["attention_mask"][i].sum())
        expected.append(pad + shared_prefix_length(full["input_ids"][i, pad:], alone["input_ids"][i, prompt_pad:]))
    assert starts == expected
    for i, answer in enumerate(answers):  # and the tokens from there are the answer's
        assert processor.tokenizer.decode(full["input_ids"][i, starts[i]:]).strip() == answer.strip()
    assert int((full["input_ids"] == image_id).sum()) == 2 * num_images * (0 if num_images == 0 else 4)


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_a_single_turn_answer_is_trained_with_one_eos(add_eos_token):
    """A tokenizer appending EOS to every text (`add_eos_token`) ended each single-turn row with the answer's EOS and
    its own, and both were trained ("Red</s></s>": EOS predicted after EOS), where the same row as a one-turn
    conversation trains one. Labelled now: the answer and one EOS, as the conversation path, whichever the row."""
    from PIL import Image

    processor = sentencepiece_like_processor("ASSISTANT:", add_eos_token)
    tok = processor.tokenizer
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    rows = [{"image": image, "question": "How many cats?", "answer": "There are two cats"},
            {"image": image, "question": "What colour?", "answer": "Red"}]
    single = RcpDataCollator(processor)(rows)
    for i, row in enumerate(rows):
        labelled = single["input_ids"][i][single["labels"][i] != -100].tolist()
        assert tok.decode(labelled).replace(" ", "") == (row["answer"] + tok.eos_token).replace(" ", "")
        conversation = RcpDataCollator(processor)([{**row, "question": [row["question"]], "answer": [row["answer"]]}])
        assert labelled == conversation["input_ids"][0][conversation["labels"][0] != -100].tolist()
        # the input keeps the tokenizer's own EOS (as the conversation's): only its label changed
        assert single["input_ids"][i][-2:].tolist().count(tok.eos_token_id) == 1 + add_eos_token
    assert single["answer_mask"].sum(1).tolist() == [len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1
                                                     for r in rows]


def test_training_smoke_writes_plugin_only_checkpoints_and_keeps_backbone_bit_identical(micro, tmp_path):
    make, _, _ = micro
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(train_rcp.PLUGIN_PREFIX)}
    plugins_before = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    trainer = make_trainer(micro, tmp_path, model=model)
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    files = set(os.listdir(ckpt))
    assert {"rcp_plugins.safetensors", "rcp_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            "rng_state.pth"} <= files
    assert not any(f.startswith("model") for f in files)  # plug-ins only
    for key, value in model.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, plugins_before[k]) for k, v in model.plugin_state_dict().items())
    logs = [entry for entry in trainer.state.log_history if "task_loss" in entry]
    assert len(logs) == 4
    for key in ("task_loss", "repair_loss", "sparsity_loss", "retention", "target_retention", "gumbel_temperature"):
        assert key in logs[0], key
    assert logs[0]["gumbel_temperature"] == pytest.approx(1.5) and logs[-1]["gumbel_temperature"] < 1.5
    config = json.loads((ckpt / "rcp_config.json").read_text())
    assert config["pruning_layers"] == [1] and config["hidden_size"] == model.config.text_config.hidden_size


def test_saved_configs_keep_the_users_gumbel_temperature(micro, tmp_path):
    """The annealed tau is the trainer's runtime state: it reaches the student as a forward argument, and every
    saved config (checkpoint, the job's model/ and plugins/) holds the value the user chose."""
    make, processor, _ = micro
    model = make(gumbel_temperature=0.7)
    trainer = make_trainer(micro, tmp_path, model=model, max_steps=2, save_steps=2)
    trainer.train()
    logged = [entry["gumbel_temperature"] for entry in trainer.state.log_history if "gumbel_temperature" in entry]
    half = 1.5 + (0.2 - 1.5) * (0.5 / 0.6)  # step 1 of 2: linear over the first 60% of training
    assert logged[0] == pytest.approx(1.5) and logged[-1] == pytest.approx(half)
    assert trainer.gumbel_temperature == pytest.approx(half)
    assert model.config.gumbel_temperature == 0.7
    train_rcp.save_job_folders(model, processor, str(tmp_path / "job"))
    for path in (tmp_path / "job" / "model" / "config.json", tmp_path / "job" / "plugins" / "rcp_config.json",
                 tmp_path / "checkpoint-2" / "rcp_config.json"):
        assert json.loads(path.read_text())["gumbel_temperature"] == 0.7, path


def test_job_folders_replace_another_runs_only_with_overwrite(micro, tmp_path):
    """--overwrite_output_dir reaches both of the job's folders: without it another run's plug-ins are refused,
    with it they are replaced (the model folder's save refused them whatever the flag said)."""
    from safetensors.torch import load_file

    make, processor, _ = micro
    out = str(tmp_path / "job")
    train_rcp.save_job_folders(make(), processor, out)
    other = make(pruner_hidden_size=16)
    with pytest.raises(FileExistsError, match="already holds"):
        train_rcp.save_job_folders(other, processor, out)
    train_rcp.save_job_folders(other, processor, out, overwrite=True)
    for folder in ("model", "plugins"):
        config = json.loads((tmp_path / "job" / folder / ("config.json" if folder == "model" else "rcp_config.json"))
                            .read_text())
        assert config["pruner_hidden_size"] == 16, folder
    saved = load_file(tmp_path / "job" / "plugins" / "rcp_plugins.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in other.plugin_state_dict().items())


def test_resume_reproduces_the_uninterrupted_run(micro, tmp_path):
    make, _, _ = micro
    full = make_trainer(micro, tmp_path / "full", model=make())
    full.train()
    first = make_trainer(micro, tmp_path / "part", model=make(), max_steps=4)
    first.train()
    # Same backbone (it comes from the base checkpoint), scrambled plug-ins: they must come from the checkpoint.
    scrambled = make()
    with torch.no_grad():
        for p in scrambled.plugin_parameters():
            p.add_(torch.randn_like(p))
    resumed = make_trainer(micro, tmp_path / "part", model=scrambled)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    a, b = full.model.plugin_state_dict(), resumed.model.plugin_state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_keeps_every_steps_gradient_norm(micro, tmp_path):
    """Was: `grad_norms` held only the resumed call's steps (a 3-step run resumed after step 1 recorded 2 norms, a
    finished run resumed recorded none), and resuming a run that ended mid-epoch trained a batch past max_steps."""
    make, _, _ = micro
    first = make_trainer(micro, tmp_path, model=make(), max_steps=3, save_steps=1)
    first.train()
    norms = first.grad_norms
    assert len(norms) == 3
    for step in (1, 2, 3):  # each checkpoint records the norms up to its step
        assert json.loads((tmp_path / f"checkpoint-{step}" / "grad_norms.json").read_text()) == norms[:step]
    resumed = make_trainer(micro, tmp_path, model=make(), max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.grad_norms == norms  # the resumed run is bit-identical, so are its norms
    scrambled = make()  # same backbone; the plug-ins must come from the checkpoint
    with torch.no_grad():
        for p in scrambled.plugin_parameters():
            p.add_(torch.randn_like(p))
    finished = make_trainer(micro, tmp_path, model=scrambled, max_steps=3, save_steps=1)
    finished.train(resume_from_checkpoint=True)  # checkpoint-3: the run is over
    assert finished.grad_norms == norms and finished.state.global_step == 3
    assert not (tmp_path / "checkpoint-4").exists()
    a, b = first.model.plugin_state_dict(), finished.model.plugin_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint written before the norms were kept: its steps are recorded as unknown, not left out.
    (tmp_path / "checkpoint-2" / "grad_norms.json").unlink()
    old = make_trainer(micro, tmp_path, model=make(), max_steps=3, save_steps=1)
    old.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert old.grad_norms == [None, None, norms[2]]
    summary = train_rcp.grad_norm_summary(old.grad_norms)
    assert summary["steps"] == 1 and summary["unrecorded_steps"] == 2 and summary["max"] == norms[2]


def test_resuming_a_finished_run_by_epochs_trains_nothing(micro, tmp_path):
    """A run by epochs (--max_steps -1) that ended mid-epoch (1.5 epochs: 6 steps of 4 per epoch), resumed, trained
    a 7th step past its schedules and wrote checkpoint-7: the finished-run check read --max_steps alone."""
    make, _, _ = micro
    common = dict(max_steps=-1, num_train_epochs=1.5, save_steps=3)
    first = make_trainer(micro, tmp_path, model=make(), **common)
    first.train()
    assert first.state.global_step == 6 and len(first.grad_norms) == 6
    resumed = make_trainer(micro, tmp_path, model=make(), **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6 and resumed.grad_norms == first.grad_norms
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-6"]
    a, b = first.model.plugin_state_dict(), resumed.model.plugin_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # more epochs given to the resume: the run goes on from step 6 (to 2 epochs, 8 steps)
    longer = make_trainer(micro, tmp_path, model=make(), **{**common, "num_train_epochs": 2})
    longer.train(resume_from_checkpoint=True)
    assert longer.state.global_step == 8


def test_resuming_a_run_whose_batch_auto_find_batch_size_halved_trains_on(micro, tmp_path):
    """The finished-run check counted the steps at the command line's batch size; `Trainer.train` resumes at the
    batch size `auto_find_batch_size` had settled on (the checkpoint's): a run halved to batch 1 and stopped at step
    4 of 8 was declared finished at 4 of 4 and trained nothing."""
    from transformers import TrainerCallback

    class StopAtFour(TrainerCallback):  # the job killed after step 4
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    make, _, _ = micro
    common = dict(max_steps=-1, num_train_epochs=1, save_steps=2)
    halved = make_trainer(micro, tmp_path, model=make(), per_device_train_batch_size=1, **common)
    halved.add_callback(StopAtFour())
    halved.train()
    assert (halved.state.global_step, halved.state.max_steps) == (4, 8)
    resumed = make_trainer(micro, tmp_path, model=make(), per_device_train_batch_size=2, auto_find_batch_size=True,
                           **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8


def test_gradient_accumulation_equals_the_larger_batch(micro, tmp_path):
    """Exact for the per-sample losses. The authors' pooled repair moments and batch-mean retention are taken per
    micro-batch (as in their code), so with those the accumulated step is close to, not equal to, the larger batch."""
    common = dict(max_steps=1, optim="sgd", learning_rate=1.0, gumbel_noise=False, save_strategy="no",
                  lr_scheduler_type="constant", lr_scheduler_kwargs={}, repair_loss_pooling="sample",
                  sparsity_reduction="sample", **ACTIVE_TERMS)
    big = make_trainer(micro, tmp_path / "big", model=_trained_like(micro), per_device_train_batch_size=4, **common)
    big.train()
    small = make_trainer(micro, tmp_path / "small", model=_trained_like(micro), per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, **common)
    small.train()
    _assert_every_term_active(big)
    start = _trained_like(micro).plugin_state_dict()
    a, b = big.model.plugin_state_dict(), small.model.plugin_state_dict()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
        moved += int(not torch.equal(a[key], start[key]))
    assert moved > 0


# Every loss term with a gradient in a one-step run: no sparsity warm-up (its target starts at 1.0, where untrained
# pruners keep everything: a zero term) and no clipping (it rescaled both runs alike and hid a doubled term).
ACTIVE_TERMS = dict(sparsity_warmup_ratio=0.0, max_grad_norm=0.0)


def _trained_like(micro, seed=0):
    """The micro model with plug-ins as after training: the adapters acting (the repair loss non-zero)."""
    model = micro[0]()
    randomize_plugin_parameters(model, seed)
    return model


def _assert_every_term_active(trainer):
    log = next(e for e in trainer.state.log_history if "task_loss" in e)
    assert log["sparsity_loss"] > 0.01 and log["repair_loss"] > 1e-3, log


def test_trainer_refuses_a_model_without_plugins(micro, tmp_path):
    make, _, _ = micro
    with pytest.raises(ValueError, match="no plug-in parameters to train"):
        make_trainer(micro, tmp_path, model=make(pruning_method="none"))


def test_missing_columns_are_reported_before_training(micro):
    _, processor, dataset = micro
    collator = RcpDataCollator(processor, question_column="prompt")
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt'\]"):
        train_rcp.check_dataset(dataset, collator)


def test_schedule_arguments_reach_the_trainer_and_ratios_take_their_closed_ends(tmp_path):
    """`--sparsity_schedule linear` reaches the target the callback sets (the cosine default was used whatever the
    flag said), and the ratio flags accept both ends of [0, 1]."""
    from types import SimpleNamespace

    config = SimpleNamespace(visual_token_budget=1.6, num_visual_tokens=16)  # final retention 0.1
    trainer = SimpleNamespace(model=SimpleNamespace(config=config),
                              accelerator=SimpleNamespace(unwrap_model=lambda model: model))
    args = RcpTrainingArguments(output_dir=str(tmp_path), sparsity_warmup_ratio=0.1, sparsity_schedule="linear",
                                report_to=[])
    train_rcp.TargetRetentionCallback(trainer).on_step_begin(args, SimpleNamespace(global_step=1, max_steps=40), None)
    assert trainer.target_retention == pytest.approx(1 + (0.1 - 1) * 0.25)  # a quarter of the warm-up: 0.775
    for ratio in (0.0, 1.0):
        RcpTrainingArguments(output_dir=str(tmp_path), sparsity_warmup_ratio=ratio, gumbel_anneal_ratio=ratio,
                             gumbel_noise_ratio=ratio, report_to=[])


def test_fixed_counts_from_measured_means():
    """The main job's "RCP at its own mean counts" rows: Python's round (as the committed results were made), at
    least 1, and non-increasing against every earlier count (the masks are cumulative)."""
    assert train_rcp.fixed_counts_from([35.4, 10.5, 2.5]) == [35, 10, 2]
    assert train_rcp.fixed_counts_from([3.2, 0.3]) == [3, 1]
    assert train_rcp.fixed_counts_from([9.7, 3.6]) == [10, 4]  # rounded, not truncated
    # a later count above an earlier, smaller one is capped by it even when the one in between is larger
    assert train_rcp.fixed_counts_from([10, 5, 7, 6]) == [10, 5, 5, 5]


def test_answers_longer_than_max_length_are_reported(micro):
    _, processor, dataset = micro
    with pytest.raises(ValueError, match=r"Example 0 .* above `max_length=10`"):
        train_rcp.check_dataset(dataset, RcpDataCollator(processor), max_length=10)


def _llava_records(tmp_path, records):
    from PIL import Image

    (tmp_path / "images").mkdir(exist_ok=True)
    for name in {r["image"] for r in records if "image" in r}:
        noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        Image.fromarray(noise.numpy()).save(tmp_path / "images" / name)  # ~12 kB: a truncation cuts its pixels
    (tmp_path / "data.json").write_text(json.dumps(records))
    return str(tmp_path / "data.json"), str(tmp_path / "images")


def _record(rid, image, *turns):
    return {"id": rid, **({"image": image} if image else {}), "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": ("<image>\n" if k == 0 else "") + t}
        for k, t in enumerate(turns)]}


def test_a_llava_json_error_after_loading_names_the_record_not_the_renumbered_row(micro, tmp_path):
    """`load_llava_json` skips text-only records and expands pairs, so check_dataset's "Example 2" (or "Example 5"
    with pairs) was no record of the file, and the whole 300-word conversation went into the message."""
    from rcp_llava.data import load_llava_json

    _, processor, _ = micro
    path, images = _llava_records(tmp_path, [
        _record("r0", "a.png", "What colour?", "red"), _record("r1", None, "Hi?", "Hello."),
        _record("r2", "a.png", "What shape?", "round"),
        _record("r3", "a.png", "What colour?", "red", "And?", "yes " * 300)])
    for turns, row, record in (("conversation", 2, "record 3 (id 'r3')"),
                               ("pairs", 3, "record 3 (id 'r3'), turns 2-3")):
        with pytest.raises(ValueError, match=rf"^Example {row} \({re.escape(record)}\) of the 'train' split is \d+ "
                                             r"tokens long") as refused:
            train_rcp.check_dataset(load_llava_json(path, images, turns=turns), RcpDataCollator(processor),
                                    max_length=200, name="'train' split")
        assert len(str(refused.value)) < 400 and "yes " * 20 not in str(refused.value)  # cut at 60 characters


def test_an_unreadable_image_is_named_by_its_example_in_the_batch(micro, tmp_path):
    """A truncated file passes `load_llava_json`'s header check; the collator then ended the run, after the model
    loaded, with a bare "image file is truncated" naming no record or path."""
    from rcp_llava.data import load_llava_json

    _, processor, _ = micro
    path, images = _llava_records(tmp_path, [_record("r0", "a.png", "What colour?", "red"),
                                             _record("r1", "b.png", "What shape?", "round")])
    with open(os.path.join(images, "b.png"), "r+b") as f:
        f.truncate(200)  # the header stays readable, the pixels do not
    rows = load_llava_json(path, images)
    collator = RcpDataCollator(processor)
    assert collator([rows[0]])["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=rf"^An example's image {re.escape(repr(os.path.join(images, 'b.png')))} "
                                         r"cannot be read \(image file is truncated.*\): the file is missing, "
                                         r"truncated or corrupt; replace it or drop the example\. The example: "
                                         r"record 1 \(id 'r1'\), question 'What shape\?', answer "
                                         r"'round' \(position 1 in this batch\)\.$"):  # single-turn: plain strings
        collator([rows[0], rows[1]])
    os.remove(os.path.join(images, "b.png"))  # deleted after loading: FileNotFoundError, named the same way
    with pytest.raises(FileNotFoundError, match=r"^An example's image .*b\.png' cannot be read .*record 1"):
        collator([rows[1]])


def test_max_length_counts_the_image_tokens_as_the_collator_does(micro):
    """check_dataset read `processor.num_image_tokens`, which a LlavaProcessor lacks: it counted 0 of the 64 image
    tokens, passed max_length=40, and the collator then refused the same examples mid-training, naming none."""
    from rcp_llava.data import image_token_count

    _, processor, dataset = micro
    assert image_token_count(processor) == 64
    lengths = [int(RcpDataCollator(processor)([row])["attention_mask"].sum()) for row in dataset]
    assert lengths == [76, 78, 76, 77, 76, 77, 77, 76]
    train_rcp.check_dataset(dataset, RcpDataCollator(processor), max_length=78)  # the longest fits exactly
    with pytest.raises(ValueError, match=r"^Example 1 of the 'train' split is 78 tokens long \(64 of them the "
                                         r"image's; answer 'cross'\), above `max_length=77`: raise --max_length"):
        train_rcp.check_dataset(dataset, RcpDataCollator(processor), max_length=77, name="'train' split")
    # the collator names the example of its batch too
    with pytest.raises(ValueError, match=r"^Example 1 of this batch \(id 1, question 'what shape is the small red "
                                         r"object\?', answer 'cross'\) is 78 tokens \(64 of them the image's\), "
                                         r"above `max_length=77`"):
        RcpDataCollator(processor, max_length=77)([dataset[0], dataset[1]])
    fits = RcpDataCollator(processor, max_length=78)([dataset[0], dataset[1]])  # the longest exactly max_length
    assert fits["attention_mask"].sum(1).tolist() == [76, 78]


def test_a_tokenizer_without_a_pad_token_is_named_before_training(micro):
    """Every data check passed, the model loaded and training started; then the first batch failed in the
    processor ("Asking to pad but the tokenizer does not have a padding token")."""
    import copy

    _, processor, dataset = micro
    processor = copy.deepcopy(processor)
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="does not have a padding token"):  # what the collator met mid-training
        RcpDataCollator(processor)([dataset[0], dataset[1]])
    fallback = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    with pytest.raises(ValueError, match="^" + re.escape(
            "The processor's tokenizer has no pad token, which the collator needs to pad the 'train' split's "
            f"batches. Give it one and save the processor with the base model: `processor.tokenizer.pad_token = "
            f"{fallback!r}` (the padding is masked out), then `processor.save_pretrained(DIR)`.") + "$"):
        train_rcp.check_dataset(dataset, RcpDataCollator(processor), name="'train' split")
    with pytest.raises(ValueError, match="does not have a padding token"):  # one example is padded too
        RcpDataCollator(processor)([dataset[0]])
    with pytest.raises(ValueError, match="^The processor's tokenizer has no pad token"):
        train_rcp.check_dataset(dataset.select([0]), RcpDataCollator(processor))


def _three_rows(dataset, column, values):
    """The first three rows of `dataset` as a new `datasets.Dataset`, `column` set to `values` (one per row)."""
    from datasets import Dataset

    rows = [dict(dataset[i]) for i in range(3)]
    for row, value in zip(rows, values):
        row[column] = value
    return Dataset.from_list(rows)


@pytest.mark.parametrize("column, value, error, match", [
    # a text-only row of a mixed dataset: "only a single or a list of entries is supported" mid-training
    ("image", None, ValueError, r"'image' is None: the example has no image, and RCP prunes the image's tokens\. "
                                r"Drop text-only rows \(e\.g\. `dataset\.filter\(lambda r: r\['image'\] is not "
                                r"None\)`\)\."),
    # trained silently as the text "None"
    ("question", None, ValueError, r"'question' is None: the question is missing \(it would train as the text "
                                   r"'None'\)\. Drop the example or fix the column \(`--question_column`\)\."),
    # without max_length it passed; with it, "is 3: ... an empty answer would train on EOS alone"
    ("answer", 3, TypeError, r"'answer' is 3 \(int\), not a string: the answer is trained as text\. Cast the column "
                             r"to strings \(e\.g\. `dataset\.map\(lambda r: \{'answer': str\(r\['answer'\]\)\}\)`\) or "
                             r"fix the column \(`--answer_column`\)\."),
    ("answer", "  ", ValueError, r"'answer' is '  ': RCP trains on the answer tokens, so an empty answer would train "
                                 r"on EOS alone\. Drop the example or fix the column \(`--answer_column`\)\."),
    # the processor expanded it: "Found 2 <image> tokens and 1 images" mid-training
    ("answer", "a <image> here", ValueError, r"'answer' 'a <image> here' holds the image placeholder '<image>', "
                                             r"which the processor would expand into image tokens\. Fix the answer or "
                                             r"drop the example\."),
    ("question", "<image> <image> compare them", ValueError,
     r"'question' '<image> <image> compare them' holds 2 '<image>' placeholders: RCP trains on one image per "
     r"question\. Drop multi-image examples\."),
], ids=["image_none", "question_none", "answer_int", "answer_blank", "answer_image_token", "two_image_tokens"])
def test_rows_the_collator_cannot_train_on_are_named_before_training(micro, column, value, error, match):
    """Without max_length check_dataset returned after the column names: these rows passed it, then crashed
    mid-training naming nothing (or trained on wrong text). check_dataset names the row before the model loads;
    the collator names its position in the batch."""
    _, processor, dataset = micro
    collator = RcpDataCollator(processor)
    good = dataset[0][column]
    # an integer answer column holds integers only (counting answers), so its first row is the one named
    values, index = ([3, 4, 5], 0) if value == 3 else ([good, value, good], 1)
    with pytest.raises(error, match=rf"^Example {index} of the 'train' split: its {match}$"):
        train_rcp.check_dataset(_three_rows(dataset, column, values), collator, name="'train' split")
    with pytest.raises(error, match=rf"^An example's {match} The example: .*\(position 1 in this batch\)\.$"):
        collator([dataset[0], dict(dataset[1], **{column: value})])


@pytest.mark.parametrize("question", [float("nan"), 7], ids=["nan", "int"])
def test_a_question_that_is_not_a_string_is_refused(micro, question):
    """It trained as the text 'nan' / '7'."""
    _, processor, dataset = micro
    with pytest.raises(TypeError, match=rf"^An example's 'question' is {re.escape(repr(question))} "
                                        rf"\({type(question).__name__}\), not a string: it would train as the text "
                                        rf"{re.escape(repr(str(question)))}\. Drop the example or fix the column"):
        RcpDataCollator(processor)([dict(dataset[0], question=question)])


def test_a_nan_answer_is_named_missing(micro):
    """A NaN answer (an empty table cell) was told to cast the column with `str()`, which trains the text 'nan'."""
    _, processor, dataset = micro
    with pytest.raises(ValueError, match=r"^An example's 'answer' is NaN: the answer is missing \(an empty cell of a "
                                         r"table\)\. Drop the example or fix the column \(`--answer_column`\)\."):
        RcpDataCollator(processor)([dict(dataset[0], answer=float("nan"))])


def test_a_question_list_needs_an_answer_list(micro):
    """A list of questions is a multi-turn conversation now (it trained as the text "['what', 'colour']", then was
    refused as not a string): with a single answer it is refused as a mismatch, naming both columns."""
    _, processor, dataset = micro
    with pytest.raises(TypeError, match=r"^An example's 'question' and 'answer' must both be lists \(one entry per "
                                        r"turn of a conversation\) or both strings, got list and str\."):
        RcpDataCollator(processor)([dict(dataset[0], question=["what", "colour"])])


def test_an_image_column_that_cannot_hold_one_image_per_example_is_refused(micro):
    from datasets import Dataset

    _, processor, dataset = micro
    rows = {"image": [1, 2], "question": ["a", "b"], "answer": ["x", "y"]}
    with pytest.raises(TypeError, match=r"^The dataset's 'image' column holds int64 values, not images"):
        train_rcp.check_dataset(Dataset.from_dict(rows), RcpDataCollator(processor))
    paths = Dataset.from_dict(dict(rows, image=[["a.png", "b.png"], ["c.png"]]))
    with pytest.raises(TypeError, match=r"^The dataset's 'image' column holds lists \(.*\): RCP trains on one image"):
        train_rcp.check_dataset(paths, RcpDataCollator(processor))


def test_a_llava_style_image_placeholder_in_the_question_is_removed(micro):
    """LLaVA-style HF data writes "<image>\\nWhat ...": the collator counted it as a second image mid-training
    ("Found 2 <image> tokens and 1 images"); it is removed as load_llava_json removes it, in training and in
    evaluation prompts alike."""
    from rcp_llava.data import prompt_batch

    _, processor, dataset = micro
    collator = RcpDataCollator(processor)
    llava = dict(dataset[0], question="<image>\n" + dataset[0]["question"])
    train_rcp.check_dataset(_three_rows(dataset, "question", [llava["question"]] * 3), collator, max_length=78)
    assert collator.texts(llava) == collator.texts(dataset[0])
    plain, placeholder = collator([dataset[0]]), collator([llava])
    assert plain.keys() == placeholder.keys()
    assert all(torch.equal(plain[k], placeholder[k]) for k in plain)
    image = dataset[0]["image"]
    assert torch.equal(prompt_batch(processor, [llava["question"]], [image])["input_ids"],
                       prompt_batch(processor, [dataset[0]["question"]], [image])["input_ids"])


def test_a_conversations_first_question_may_hold_the_llava_placeholder(micro):
    """`load_llava_json` strips the "<image>" of a record's first question, but a conversation given as lists (a
    Hub dataset in LLaVA's style) keeps it: the first question is where the image goes, so it is removed there and
    the batch is the one without it. Only a later turn's placeholder is a second image (refused)."""
    _, processor, dataset = micro
    collator = RcpDataCollator(processor)
    e0, e1 = dataset[0], dataset[1]
    plain = {**e0, "question": [e0["question"], e1["question"]], "answer": [e0["answer"], e1["answer"]]}
    llava = {**plain, "question": ["<image>\n" + e0["question"], e1["question"]]}
    assert collator.problem(llava) is None
    ours, reference = collator([llava]), collator([plain])
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_a_template_whose_turns_do_not_extend_each_other_is_refused():
    """The collator cuts the answers out of the rendered text by prefixes: a generation prompt that is not the start
    of the rendered answer turn, or a conversation whose next turn re-renders the earlier ones (here a count of the
    user turns written first), has no such cut, and trained on misplaced labels silently. Both are refused."""
    from PIL import Image

    image = Image.new("RGB", (8, 8), (255, 0, 0))
    renamed = sentencepiece_like_processor("BOT:")  # the prompt ends "BOT:", the answer turn "ASSISTANT: ..."
    with pytest.raises(ValueError, match=r"^The chat template does not render the prompt as a prefix of the full "
                                         r"conversation\.$"):
        RcpDataCollator(renamed)([{"image": image, "question": "How many cats?", "answer": "two"}])
    counted = sentencepiece_like_processor("ASSISTANT:")
    counted.chat_template = ("{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
                             + counted.chat_template)
    collator = RcpDataCollator(counted)
    one = {"image": image, "question": ["How many cats?"], "answer": ["two"]}
    collator([one])  # one turn extends nothing: trained
    with pytest.raises(ValueError, match=r"^The chat template does not render turn 1 of a conversation as an "
                                         r"extension of the turns before it; it cannot be trained as one sequence\.$"):
        collator([{**one, "question": ["How many cats?", "What colour?"], "answer": ["two", "Red"]}])


def test_position_ids_count_the_real_tokens_from_zero():
    """RoPE positions as `generate` counts them for the prompt: 0 at each row's first real token, whatever its left
    padding (the padding itself at 0). Counted from 1, every prefill position was one past the one `generate` then
    continues from."""
    from rcp_llava.data import position_ids_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(mask.bool()).tolist() == position_ids_from_mask(mask).tolist()


def test_encoded_and_undecoded_image_cells_load_as_the_decoded_image(micro, tmp_path):
    """Raw bytes and `datasets.Image(decode=False)`-style cells reached the processor as they were ("only a single
    or a list of entries is supported ... got type=<class 'bytes'>") mid-training."""
    from datasets import Dataset

    _, processor, dataset = micro
    collator = RcpDataCollator(processor)
    dataset[0]["image"].save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    reference = collator([dataset[0]])["pixel_values"]
    for cell in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "x.png")},
                 str(tmp_path / "x.png")):
        assert torch.equal(collator([dict(dataset[0], image=cell)])["pixel_values"], reference)
    rows = [dict(dataset[i], image={"bytes": data, "path": None}) for i in range(2)]
    train_rcp.check_dataset(Dataset.from_list(rows), collator)
    rows[1]["image"] = {"bytes": None, "path": None}  # an undecoded cell holding nothing
    with pytest.raises(ValueError, match=r"^Example 1 of the dataset: its 'image' is \{'bytes': None, 'path': None\}: "
                                         r"the example has no image"):
        train_rcp.check_dataset(Dataset.from_list(rows), collator)


def test_a_missing_image_file_is_named_before_training(micro, tmp_path, monkeypatch):
    """A path column (or path-only `datasets.Image` cells) naming a file that does not exist passed check_dataset:
    the collator's open failed when training reached the example, naming neither the example nor the column."""
    from datasets import Dataset, Image

    _, processor, dataset = micro
    dataset[0]["image"].save(tmp_path / "x.png")
    rows = [dict(dataset[i], image="x.png") for i in range(3)]
    in_folder = RcpDataCollator(processor, image_folder=str(tmp_path))
    train_rcp.check_dataset(Dataset.from_list(rows), in_folder)
    rows[2]["image"] = "gone.png"
    missing = re.escape(repr(str(tmp_path / "gone.png")))
    with pytest.raises(FileNotFoundError, match=rf"^Example 2 of the 'train' split: its 'image' names the image file "
                                                rf"{missing}, which does not exist\. Fix the path or drop the example"):
        train_rcp.check_dataset(Dataset.from_list(rows), in_folder, name="'train' split")
    monkeypatch.chdir(tmp_path)  # relative to the working directory, without --image_folder
    with pytest.raises(FileNotFoundError, match=r"^Example 2 of the dataset: its 'image' names the image file "
                                                r"'gone.png', which does not exist \(a relative path, read from the "
                                                r"working directory .*: give --image_folder if the paths are relative"):
        train_rcp.check_dataset(Dataset.from_list(rows), RcpDataCollator(processor))
    # undecoded `datasets.Image` cells: a path without bytes is checked, embedded bytes are not a path
    paths = [str(tmp_path / "x.png"), str(tmp_path / "x.png"), str(tmp_path / "gone.png")]
    cast = Dataset.from_list([dict(r, image=p) for r, p in zip(rows, paths)]).cast_column("image", Image(decode=False))
    with pytest.raises(FileNotFoundError, match=rf"^Example 2 of the dataset: .* {missing}, which does not exist"):
        train_rcp.check_dataset(cast, RcpDataCollator(processor))
    data = (tmp_path / "x.png").read_bytes()
    embedded = [dict(r, image={"bytes": data, "path": str(tmp_path / "gone.png")}) for r in rows]
    train_rcp.check_dataset(Dataset.from_list(embedded), RcpDataCollator(processor))


def test_a_decoding_image_column_is_checked_as_datasets_opens_it(micro, tmp_path, monkeypatch):
    """`datasets.Image()` cells with a path are opened by `datasets`: URLs (which it fetches) passed check_dataset
    before the missing-file check, and a relative path is read from the working directory, not --image_folder."""
    from datasets import Dataset, Image

    _, processor, dataset = micro
    (tmp_path / "images").mkdir()
    dataset[0]["image"].save(tmp_path / "images" / "x.png")
    rows = [dict(dataset[i], image=p) for i, p in enumerate(["https://example.com/a.png", "hf://datasets/u/d/b.png",
                                                             "x.png"])]
    decoded = Dataset.from_list(rows).cast_column("image", Image())
    monkeypatch.chdir(tmp_path / "images")  # where datasets finds x.png
    train_rcp.check_dataset(decoded, RcpDataCollator(processor, image_folder=str(tmp_path / "nowhere")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^Example 2 of the dataset: its 'image' names the image file 'x.png'"):
        train_rcp.check_dataset(decoded, RcpDataCollator(processor, image_folder=str(tmp_path / "images")))


def test_a_rotated_jpeg_loads_upright_from_a_path_as_from_a_datasets_image(tmp_path):
    """A path went through PIL without `exif_transpose`, a `datasets.Image` column with it: the same JPEG came out
    64x32 from --llava_json / an image_folder column / a reader, 32x64 from a dataset."""
    import numpy as np
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    from rcp_llava.data import load_image
    from rcp_llava.readers import VqaRecord

    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left red, right blue: a rotation shows
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    decoded = Dataset.from_dict({"image": [str(path)]}).cast_column("image", ImageFeature())[0]["image"]
    assert decoded.size == (32, 64)
    for image in (load_image(str(path)), load_image(path.read_bytes()), VqaRecord("q", str(path), "?", []).load_image(),
                  VqaRecord("q", path.read_bytes(), "?", []).load_image()):
        assert image.size == (32, 64) and np.array_equal(np.asarray(image), np.asarray(decoded.convert("RGB")))


def test_main_job_end_to_end_on_a_micro_testbed(tmp_path):
    """`train_rcp.main` on a stock LLaVA folder + dataset folder: trains, evaluates, writes the output folder."""
    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    out = tmp_path / "run"
    metrics = train_rcp.main([
        "--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
        "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8", "--repair_bottleneck_size",
        "8", "--budget_fraction", "0.25", "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ])
    assert {"rcp_plugins.safetensors", "rcp_config.json"} <= set(os.listdir(out / "plugins"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out / "model"))
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("full", "rcp", "rcp_fixed_counts", "untrained_fixed_counts", "prior_fixed_counts",
                "random_fixed_counts"):
        assert 0.0 <= saved[key]["accuracy"] <= 1.0 and saved[key]["n"] == 8, key
    # RCP against its training-free prior at the same counts, paired on the same 8 samples
    paired = saved["rcp_vs_prior_fixed_counts"]
    assert (paired["a_only"] - paired["b_only"]) / 8 == pytest.approx(
        saved["rcp_fixed_counts"]["accuracy"] - saved["prior_fixed_counts"]["accuracy"])
    assert saved["rcp"]["kept_per_pruning_layer"] and saved == metrics
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    reloaded = RcpLlavaForConditionalGeneration.from_pretrained(out / "model")
    assert reloaded.config.visual_token_budget == pytest.approx(0.25 * 64)


def test_main_job_without_a_base_model_builds_the_testbed_on_first_use(tmp_path, monkeypatch, capsys):
    """No --base_model: the job builds the testbed into $RCP_LLAVA_CACHE (here the micro preset), then reuses it."""
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))

    def argv(out):
        return ["--testbed_preset", "micro", "--pruning_layers", "1", "--repair_layers", "1", "--output_dir",
                str(tmp_path / out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
                "--use_cpu", "--disable_tqdm", "true"]

    metrics = train_rcp.main(argv("run"))
    cache = tmp_path / "cache" / "testbed" / "micro"
    # No build time was measured for micro (seconds): the message names none rather than a guess.
    assert f"The 'micro' testbed is not built yet: building it into {cache} first (one time, progress below)." \
        in capsys.readouterr().out
    assert (cache / "metrics.json").exists() and (cache / "model" / "config.json").exists()
    assert metrics["base_model"] == str(cache / "model")
    assert metrics["max_steps"] == 2 and metrics["full"]["n"] == 8  # explicit flags win over the job defaults
    built = (cache / "model" / "model.safetensors").stat().st_mtime
    train_rcp.main(argv("run2"))
    assert (cache / "model" / "model.safetensors").stat().st_mtime == built  # reused, not rebuilt


def test_a_base_model_that_is_not_llava_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a 'llama' model; RCP needs a LLaVA checkpoint"):
        train_rcp.main(["--base_model", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--report_to", "none"])


def test_a_budget_above_the_visual_tokens_is_refused(micro, tmp_path):
    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    with pytest.raises(ValueError, match=r"--visual_token_budget 100.0 is outside \(0, 64\]"):
        train_rcp.main(["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
                        "--pruning_layers", "1", "--repair_layers", "1", "--visual_token_budget", "100",
                        "--output_dir", str(tmp_path / "o"), "--report_to", "none"])


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    """DDP over gloo with two CPU processes.

    `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 and 1.16 (its CPU launcher
    needs an mpirun hostfile for more), so the torchrun-based launcher is used with the Trainer on the CPU and gloo.
    """
    import subprocess
    import sys

    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    out = tmp_path / "ddp"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(root, "train_rcp.py"),
        "--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
        "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8", "--repair_bottleneck_size", "8",
        "--budget_fraction", "0.25", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size",
        "2", "--report_to", "none", "--disable_tqdm", "true", "--max_eval_samples", "4", "--use_cpu",
        "--ddp_backend", "gloo", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
        "--lambda_task", "1.5", "--lambda_repair", "3", "--lambda_sparse", "200",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # The logged loss is the ranks' mean, and so are its parts: they recompose it (they were rank 0's alone), in
    # training and in evaluation (each rank evaluates its share of the samples).
    lambdas = {"task": 1.5, "repair": 3.0, "sparsity": 200.0}
    logs = [e for e in state["log_history"] if "loss" in e] + [e for e in state["log_history"] if "eval_loss" in e]
    assert len(logs) == 3
    for log in logs:
        prefix = "eval_" if "eval_loss" in log else ""
        recomposed = sum(weight * log[f"{prefix}{name}_loss"] for name, weight in lambdas.items())
        assert recomposed == pytest.approx(log[f"{prefix}loss"], rel=1e-4), log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rcp"]["n"] == 4
    assert "[train_rcp] training the plug-ins on 2 process(es)" in result.stdout
    assert (out / "plugins" / "rcp_plugins.safetensors").exists()


DDP_STEP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from configuration_rcp_llava import RcpLlavaConfig
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration
    from rcp_llava.data import RcpDataCollator
    from rcp_llava.testbed import build_dataset, build_model_config, build_processor, get_preset
    from train_rcp import RcpTrainer, RcpTrainingArguments

    out, batch, lambdas = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3].split(",")]
    torch.set_num_threads(1)
    preset = get_preset("micro")
    processor = build_processor(preset)
    stock = build_model_config(preset, processor.tokenizer).to_dict()
    torch.manual_seed(0)
    config = RcpLlavaConfig(**{k: v for k, v in stock.items() if k != "model_type"}, pruning_layers=[1],
                            repair_layers=[1], pruner_hidden_size=8, repair_bottleneck_size=8, pruning_keep_counts=None,
                            visual_token_budget=preset.num_visual_tokens / 4, query_dropout=0.0, pruner_dropout=0.0)
    model = RcpLlavaForConditionalGeneration(config)
    with torch.no_grad():
        for pruner in model.model.rcp_plugins.pruners.values():
            pruner.bias.fill_(-3.0)  # prune: the repair loss has something to repair
    start = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    args = RcpTrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True, gumbel_noise=False,
        lambda_task=lambdas[0], lambda_repair=lambdas[1], lambda_sparse=lambdas[2],
        ddp_backend="gloo" if "RANK" in os.environ else None)
    dataset = build_dataset("micro", seed=0)["train"].select(range(4))
    trainer = RcpTrainer(model=model, args=args, train_dataset=dataset, data_collator=RcpDataCollator(processor))
    trainer.train()
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save({k: model.plugin_state_dict()[k] - start[k] for k in start}, os.path.join(out, "delta.pt"))
        logs = [e for e in trainer.state.log_history if "loss" in e]
        json.dump(logs, open(os.path.join(out, "logs.json"), "w"))
    # As train_rcp.main ends: a rank that exits while its gloo threads are alive aborts the launch ("terminate called
    # without an active exception", SIGABRT), now and then, after a step that was right.
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("lambdas", ["1,0,0", "0,1,0"])
def test_two_ranks_take_the_step_of_one_process_on_their_joint_batch(tmp_path, lambdas):
    """DDP averages the ranks' gradients, but the task loss is normalised by every rank's answer tokens and the
    pooled repair loss by every rank's positions: two ranks of batch 2 took half the step of one process on the
    same 4 samples, for both terms (sparsity's weight doubled against them), and logged half the task loss."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "step.py"
    script.write_text(DDP_STEP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    with socket.socket() as probe:  # a free port for the rendezvous (port 0 is not passed on to the workers)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runs = {"one": [sys.executable, str(script), str(tmp_path / "one"), "4", lambdas],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "two"), "2", lambdas]}
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "delta.pt") for name in runs)
    assert sum(float(v.abs().sum()) for v in one.values()) > 0  # the term moves the plug-ins
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7, msg=key)
    logs = {name: json.loads((tmp_path / name / "logs.json").read_text())[0] for name in runs}
    for part in ("loss", "task_loss", "repair_loss"):
        assert logs["two"][part] == pytest.approx(logs["one"][part], rel=1e-4), part


def test_push_to_hub_offline_writes_the_card_and_fails_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants, ModelCard

    from rcp_llava.hub import HubUnreachableError
    from rcp_llava.testbed import build_testbed

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    out = tmp_path / "run"
    argv = ["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
            "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8",
            "--repair_bottleneck_size", "8", "--budget_fraction", "0.25", "--output_dir", str(out), "--max_steps",
            "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--max_eval_samples", "2",
            "--push_to_hub", "--hub_model_id", "someone/rcp-micro", "--push_plugins_only"]
    with pytest.raises(HubUnreachableError, match=r"offline mode is on .*someone/rcp-micro"):
        train_rcp.main(argv)
    card = ModelCard.load(out / "plugins" / "README.md")
    # a plug-in card is an adapter card (issue 18; it claimed library_name transformers without a config before)
    assert card.data.library_name == "rcp-llava" and card.data.pipeline_tag == "image-text-to-text"
    # Its base here is a local folder: no Hub id for `base_model` (and so no `base_model_relation`, which needs one),
    # recorded under rcp_llava.base_model_path instead (the card linked huggingface.co/<path> before).
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and "rcp-plugins" in meta["tags"]
    assert meta["rcp_llava"]["base_model_path"] == str(folder / "model")
    assert (out / "plugins" / "rcp_plugins.safetensors").exists()  # the folder stays complete
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        train_rcp.main([a for a in argv if a not in ("--hub_model_id", "someone/rcp-micro")])
    # The finished run is not replaced by a second run into the same folder (issue 17), unless asked.
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoint-1, metrics.json, model, plugins\)"):
        train_rcp.main([a for a in argv if a not in ("--push_to_hub", "--hub_model_id", "someone/rcp-micro",
                                                     "--push_plugins_only")])
    assert (out / "plugins" / "README.md").exists()


def _fake_hub(monkeypatch):
    """Replace `huggingface_hub.HfApi` by a fake that records its calls (returned, a list): `create_repo` resolves a
    bare name to `me/NAME`; each upload records its repo, revision, the card it sends (a `ModelCard`), its
    path_in_repo and, for a folder, the folder's files and allow_patterns."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import ModelCard, constants

    calls = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return SimpleNamespace(repo_id=f"me/{repo_id}" if "/" not in repo_id else repo_id)

        def create_branch(self, repo_id, branch, **kwargs):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision=None, path_in_repo=None, **kwargs):
            calls.append(("upload_folder", repo_id, revision, ModelCard.load(os.path.join(folder_path, "README.md")),
                          path_in_repo, sorted(os.listdir(folder_path)), kwargs["allow_patterns"]))
            return "commit"

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision=None, **kwargs):
            calls.append(("upload_file", repo_id, revision, ModelCard.load(path_or_fileobj), path_in_repo))
            return "commit"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return calls


def test_push_to_hub_goes_to_the_resolved_repo_and_hub_revision(tmp_path, monkeypatch):
    """The job's push ignored --hub_revision (it went to main), and a bare --hub_model_id (transformers' Trainer
    takes one) was uploaded to as given while create_repo made user/NAME, the card's snippet naming the bare name.
    --budgets with --push_to_hub pushed every budget to the same repo root, each replacing the one before (then it
    was refused): each set now goes into a folder of its own, its card loading from it, under a root card that
    lists them; a full model per budget stays refused."""
    from rcp_llava.testbed import build_testbed

    calls = _fake_hub(monkeypatch)
    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    argv = ["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
            "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8",
            "--repair_bottleneck_size", "8", "--budget_fraction", "0.25", "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
            "--max_eval_samples", "2", "--push_to_hub", "--hub_model_id", "rcp-micro", "--hub_revision", "v2",
            "--push_plugins_only"]
    train_rcp.main(argv)
    assert [c[:3] for c in calls] == [("create_repo", "rcp-micro"), ("create_branch", "me/rcp-micro", "v2"),
                                      ("upload_folder", "me/rcp-micro", "v2")]
    card = calls[-1][3]
    assert "me/rcp-micro" in card.text and "'rcp-micro'" not in card.text
    assert calls[-1][4] is None  # a single job's set: the repo's root
    sweep = [str(tmp_path / "sweep") if a == str(tmp_path / "run") else a for a in argv
             if a not in ("--budget_fraction", "0.25")] + ["--budgets", "1/2,1/4"]
    with pytest.raises(ValueError, match=r"^--budgets with --push_to_hub pushes each budget's plug-in set into a "
                                         r"folder of --hub_model_id 'rcp-micro' \(budget_1_9/, ...\): add "
                                         r"--push_plugins_only"):
        train_rcp.main([a for a in sweep if a != "--push_plugins_only"])
    with pytest.raises(ValueError, match="^--push_to_hub needs --hub_model_id"):  # the sweep names no repo either
        train_rcp.main([a for a in sweep if a not in ("--hub_model_id", "rcp-micro")])
    with pytest.raises(ValueError, match="^--push_to_hub needs --hub_model_id"):  # an empty one names no repo
        train_rcp.main(["" if a == "rcp-micro" else a for a in sweep])
    assert not (tmp_path / "sweep").exists()  # refused before anything ran
    calls.clear()
    train_rcp.main(sweep)
    # Both sets trained before any push (the sets go up once the sweep is done), each into its own folder.
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert [(c[1], c[2], c[4]) for c in uploads] == [("me/rcp-micro", "v2", "budget_1_2"),
                                                     ("me/rcp-micro", "v2", "budget_1_4")]
    for upload, folder in zip(uploads, ("budget_1_2", "budget_1_4")):
        assert upload[6] == ["rcp_config.json", "rcp_plugins.safetensors", "README.md"]  # the plug-ins only
        meta, text = upload[3].data.to_dict(), upload[3].text
        assert meta["model_name"] == f"rcp-micro/{folder}" and meta["rcp_llava"]["subfolder"] == folder
        # the set's card loads the set from its folder of the resolved repo
        assert f"from_base(base_id, plugins='me/rcp-micro', subfolder='{folder}')" in text
        budget = json.loads((tmp_path / "sweep" / folder / "metrics.json").read_text())["visual_token_budget"]
        assert meta["rcp_llava"]["visual_token_budget"] == budget
    root_card = calls[-1]
    assert root_card[:3] == ("upload_file", "me/rcp-micro", "v2") and root_card[4] == "README.md"
    text = root_card[3].text
    assert root_card[3].data.to_dict()["rcp_llava"]["budgets"] == {"1/2": "budget_1_2", "1/4": "budget_1_4"}
    summary = json.loads((tmp_path / "sweep" / "budgets.json").read_text())
    for label, folder in (("1/2", "budget_1_2"), ("1/4", "budget_1_4")):
        rcp = summary[label]["rcp"]
        row = (f"| {label} | `{folder}` | {rcp['avg_visual_tokens_per_layer']:.4g} | {summary[label]['dataset']} | "
               f"accuracy | {rcp['accuracy']:.4g} |")
        assert row in text, row
    assert "plugins='me/rcp-micro', subfolder='budget_1_2')" in text
    assert (tmp_path / "sweep" / "README.md").read_text(encoding="utf-8") == str(root_card[3])  # written locally too


def test_a_resumed_sweep_pushes_the_budget_it_kept_from_an_earlier_run(tmp_path, monkeypatch, capsys):
    """A --budgets sweep resumed with --push_to_hub --push_plugins_only, one budget finished (without a checkpoint)
    by an earlier run: that set is kept, not trained again, and must still go up into its folder with its own card
    and be listed in the root card (dropping kept sets from the push left the root card naming a folder never
    uploaded). The kept set's card is its own run's: its config, base, and the steps it took by epochs (this run's
    --max_steps is -1); the --model_card_license goes on every card. The base moved since the earlier run: each set's
    card names its own, the root card none (the sets were trained on two)."""
    import shutil

    from rcp_llava.testbed import build_testbed

    calls = _fake_hub(monkeypatch)
    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    sweep, moved = tmp_path / "sweep", tmp_path / "moved" / "model"
    argv = ["--dataset_name_or_path", str(folder / "dataset"), "--pruning_layers", "1", "--repair_layers", "1",
            "--pruner_hidden_size", "8", "--repair_bottleneck_size", "8", "--output_dir", str(sweep), "--max_steps",
            "-1", "--num_train_epochs", "1", "--max_train_samples", "4", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--use_cpu", "--max_eval_samples", "2", "--save_strategy", "no"]
    first = train_rcp.main(argv + ["--base_model", str(folder / "model"), "--budgets", "1/2", "--seed", "3",
                                   "--learning_rate", "0.002"])  # not pushed
    assert calls == [] and first["1/2"]["max_steps"] == 2  # 4 examples, batch 2, one epoch
    plugins = (sweep / "budget_1_2" / "plugins" / "rcp_plugins.safetensors").read_bytes()
    shutil.copytree(folder / "model", moved)
    capsys.readouterr()
    results = train_rcp.main(argv + ["--base_model", str(moved), "--budgets", "1/2,1/4", "--resume_from_checkpoint",
                                     "last", "--push_to_hub", "--hub_model_id", "rcp-micro", "--hub_revision", "v2",
                                     "--push_plugins_only", "--model_card_license", "mit", "--seed", "7",
                                     "--learning_rate", "0.5"])
    assert "budget 1/2 finished before" in capsys.readouterr().out  # kept, not trained again
    assert (sweep / "budget_1_2" / "plugins" / "rcp_plugins.safetensors").read_bytes() == plugins
    assert results["1/2"] == first["1/2"] and json.loads((sweep / "budgets.json").read_text()) == results
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert [(c[1], c[2], c[4]) for c in uploads] == [("me/rcp-micro", "v2", "budget_1_2"),
                                                     ("me/rcp-micro", "v2", "budget_1_4")]
    for upload, label, base in zip(uploads, ("1/2", "1/4"), (folder / "model", moved)):
        name = train_rcp.budget_folder_name(label)
        assert upload[5] == ["README.md", "rcp_config.json", "rcp_plugins.safetensors"]  # the set's own plug-ins
        card, meta = upload[3], upload[3].data.to_dict()
        assert meta["model_name"] == f"rcp-micro/{name}" and meta["rcp_llava"]["subfolder"] == name
        assert f"from_base(base_id, plugins='me/rcp-micro', subfolder='{name}')" in card.text
        assert meta["rcp_llava"]["visual_token_budget"] == results[label]["visual_token_budget"]
        assert meta["rcp_llava"]["average_kept_visual_tokens"] == round(
            results[label]["rcp"]["avg_visual_tokens_per_layer"], 1)
        assert meta["rcp_llava"]["base_model_path"] == str(base) and meta["license"] == "mit"
        assert "- `max_steps`: 2\n" in card.text  # the steps its epoch took, not -1
        # the settings of the run that trained the set (the kept set's card stated this run's seed and rate)
        seed, rate = ("3", "0.002") if label == "1/2" else ("7", "0.5")
        assert f"- `seed`: {seed}\n" in card.text and f"- `learning_rate`: {rate}\n" in card.text, label
    assert results["1/2"]["visual_token_budget"] != results["1/4"]["visual_token_budget"]
    root = calls[-1]
    assert root[:3] == ("upload_file", "me/rcp-micro", "v2") and root[4] == "README.md"
    meta = root[3].data.to_dict()
    assert meta["rcp_llava"]["budgets"] == {"1/2": "budget_1_2", "1/4": "budget_1_4"} and meta["license"] == "mit"
    assert "base_model_path" not in meta["rcp_llava"] and "a LLaVA base model that was not recorded" in root[3].text
    for label in ("1/2", "1/4"):
        rcp = results[label]["rcp"]
        row = (f"| {label} | `{train_rcp.budget_folder_name(label)}` | {rcp['avg_visual_tokens_per_layer']:.4g} | "
               f"{results[label]['dataset']} | accuracy | {rcp['accuracy']:.4g} |")
        assert row in root[3].text, row
    # A set whose metrics.json predates the recorded settings: its card states the seed and steps it does record,
    # nothing of this run's.
    metrics_file = sweep / "budget_1_2" / "metrics.json"
    metrics_file.write_text(json.dumps({k: v for k, v in json.loads(metrics_file.read_text()).items()
                                        if k != "training_args"}))
    calls.clear()
    train_rcp.main(argv + ["--base_model", str(moved), "--budgets", "1/2,1/4", "--resume_from_checkpoint", "last",
                           "--push_to_hub", "--hub_model_id", "rcp-micro", "--push_plugins_only", "--seed", "9"])
    card = next(c[3] for c in calls if c[0] == "upload_folder" and c[4] == "budget_1_2")
    assert card.text.split("## Training\n\n")[1].strip() == "- `max_steps`: 2\n- `seed`: 3"


def test_a_non_main_rank_of_a_resumed_sweep_writes_and_pushes_nothing(tmp_path, monkeypatch):
    """Under torchrun every rank runs `run_budgets`; rank 0 alone writes the summary and pushes (its `run_job`
    returns the metrics, the others' None). A budget kept from an earlier run (finished without a checkpoint) is read
    by every rank, so a non-main rank must drop its record too: in a resumed sweep whose budgets were ALL kept, a rank
    holding the records would rewrite budgets.json and push every set, once per process, racing rank 0. The ranks are
    faked (`process_index`, which `TrainingArguments` reads from accelerate's state); nothing trains, nothing loads."""
    calls = _fake_hub(monkeypatch)
    sweep = tmp_path / "sweep"
    records = {label: {"visual_token_budget": budget, "seed": 3, "max_steps": 2}
               for label, budget in (("1/2", 8.0), ("1/4", 4.0))}
    for label, record in records.items():  # each budget finished by an earlier run, without a checkpoint
        (sweep / train_rcp.budget_folder_name(label)).mkdir(parents=True)
        (sweep / train_rcp.budget_folder_name(label) / "metrics.json").write_text(json.dumps(record))
    earlier = {"1/9": {"visual_token_budget": 1.8}}  # an earlier sweep's summary: its entries stay
    (sweep / "budgets.json").write_text(json.dumps(earlier))
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    monkeypatch.setattr(train_rcp, "run_job", lambda *a, **k: pytest.fail("a kept budget was trained again"))
    argv = ["--output_dir", str(sweep), "--budgets", "1/2,1/4", "--resume_from_checkpoint", "last", "--report_to",
            "none", "--use_cpu"]
    push = ["--push_to_hub", "--hub_model_id", "rcp-micro", "--push_plugins_only"]
    monkeypatch.setattr(RcpTrainingArguments, "process_index", property(lambda self: 1))
    for extra in ([], push):
        # a non-main rank's results, as its run_job's: None
        assert train_rcp.main(argv + extra) == {"1/2": None, "1/4": None}, extra
        assert calls == []  # no push: rank 0 pushes once
        after = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
        assert after == before, extra  # nothing written: no budgets.json, no root README.md, the records untouched
    # Rank 0, the same sweep (no push: the records hold no model to push): the kept records go into the summary.
    monkeypatch.setattr(RcpTrainingArguments, "process_index", property(lambda self: 0))
    assert train_rcp.main(argv) == records
    assert json.loads((sweep / "budgets.json").read_text()) == {**earlier, **records}


def test_a_non_main_rank_trains_a_budget_but_leaves_its_saving_to_rank_0(tmp_path, monkeypatch):
    """The same resumed sweep, budget 1/2 kept and 1/4 trained, on a non-main rank (faked as above): the rank trains
    1/4 with the others (its real `run_job`, one step) but writes none of its folder's files -- evaluation, plugins/,
    model/ and metrics.json are rank 0's -- nor the summary, and returns None for both budgets."""
    from rcp_llava.testbed import build_testbed

    calls = _fake_hub(monkeypatch)
    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    sweep = tmp_path / "sweep"
    (sweep / "budget_1_2").mkdir(parents=True)
    (sweep / "budget_1_2" / "metrics.json").write_text(json.dumps({"visual_token_budget": 8.0}))
    trained = []
    real_train = train_rcp.RcpTrainer.train
    monkeypatch.setattr(train_rcp.RcpTrainer, "train",
                        lambda self, **kw: trained.append(self.args.output_dir) or real_train(self, **kw))
    monkeypatch.setattr(RcpTrainingArguments, "process_index", property(lambda self: 1))
    results = train_rcp.main(["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
                              "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8",
                              "--repair_bottleneck_size", "8", "--output_dir", str(sweep), "--max_steps", "1",
                              "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
                              "--max_eval_samples", "2", "--save_strategy", "no", "--budgets", "1/2,1/4",
                              "--resume_from_checkpoint", "last", "--push_to_hub", "--hub_model_id", "rcp-micro",
                              "--push_plugins_only"])
    assert results == {"1/2": None, "1/4": None}
    assert trained == [str(sweep / "budget_1_4")]  # the rank did train the budget not kept
    assert calls == []
    files = sorted(str(p.relative_to(sweep)) for p in sweep.rglob("*") if p.is_file())
    assert files == ["budget_1_2/metrics.json"], files  # no budget_1_4/{metrics.json,plugins,model}, no budgets.json


def test_a_training_jobs_card_puts_a_hub_dataset_in_model_index_with_its_split(tmp_path, monkeypatch):
    """No training job's card held a model-index: its entries had no `dataset_type` (the card's Hub-dataset test), and
    their split column was empty. A local folder named like owner/name is no Hub dataset."""
    from rcp_llava.hub import build_model_card
    from rcp_llava.demo import build_demo_model

    config = build_demo_model().config
    metrics = {"dataset": "someone/vqa-onewords", "evaluated_split": "test", "num_visual_tokens": 16,
               "visual_token_budget": 4.0, "rcp": {"accuracy": 0.71, "avg_visual_tokens_per_layer": 4.0},
               "rcp_fixed_counts": {"accuracy": 0.70, "avg_visual_tokens_per_layer": 4.0},
               "full": {"accuracy": 0.8}}
    card = build_model_card(config, repo_id="me/rcp", base_model="llava-hf/llava-1.5-7b-hf", eval_results=metrics,
                            license="llama2")
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_value) == ("someone/vqa-onewords", "test", 0.71)
    assert "| someone/vqa-onewords | test |" in card.text
    # a relative local folder that reads as a Hub id (an absolute path never matched the id pattern)
    (tmp_path / "someone" / "vqa-local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = build_model_card(config, repo_id="me/rcp", base_model="llava-hf/llava-1.5-7b-hf", license="llama2",
                             eval_results={**metrics, "dataset": "someone/vqa-local"})
    assert not local.data.eval_results
    assert build_model_card(config, repo_id="me/rcp", base_model="llava-hf/llava-1.5-7b-hf", license="llama2",
                            eval_results={**metrics, "dataset": "someone/vqa-remote"}).data.eval_results


def test_the_deep_testbed_job_budgets_over_all_layers_at_the_papers_placement(tmp_path, monkeypatch):
    """`--testbed_preset deep` (issue 16): the paper's placement for the depth and budget (the config default, not
    tiny's [1, 2, 3]) and the sparsity target over ALL layers. The deep build itself is stubbed by a 16-layer
    micro-sized testbed (the build is an hour)."""
    import dataclasses

    import rcp_llava.testbed as testbed
    from rcp_llava.testbed import PRESETS, build_testbed

    deep_micro = dataclasses.replace(PRESETS["micro"], name="deep", text_layers=16, supervised_layers=(3, 4, 5))
    folder = build_testbed(deep_micro, tmp_path / "deep", pruning_eval=False)
    monkeypatch.setattr(testbed, "build_testbed", lambda preset: folder)
    monkeypatch.setenv("RCP_LLAVA_CACHE", str(tmp_path / "cache"))
    metrics = train_rcp.main(["--testbed_preset", "deep", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                              "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
                              "--disable_tqdm", "true", "--max_eval_samples", "4"])
    assert metrics["sparsity_layers"] == "all"
    assert (metrics["pruning_layers"], metrics["repair_layers"]) == ([1, 7, 13], [11, 15])  # paper_placement(16, 1/9)
    assert metrics["target_retention"] == pytest.approx(1 / 9)


@pytest.mark.parametrize("argv, root", [([], "outputs/rcp_deep_budgets"),
                                        (["--testbed_preset", "tiny"], "outputs/rcp_tiny_budgets"),
                                        (["--output_dir", "mine"], "mine")])
def test_budget_sets_go_beside_the_presets_main_job(monkeypatch, argv, root):
    """`--budgets` without --output_dir writes next to the preset's main job (before, the deep sets landed in
    outputs/rcp_tiny_budgets)."""
    folders = []
    monkeypatch.setattr(train_rcp, "run_job", lambda job, args, explicit: folders.append(args.output_dir))
    train_rcp.main(["--budgets", "1/3,1/9"] + argv)
    assert folders == [f"{root}/budget_1_3", f"{root}/budget_1_9"]


# -- evaluation inside the Trainer (issue 18) ------------------------------------------------------------------


def test_answer_metrics_hand_computed(micro):
    """Teacher-forced: the prediction at position t is for token t + 1; only answer positions count."""
    _, processor, _ = micro
    tok = processor.tokenizer
    red, blue, eos = (tok.convert_tokens_to_ids(w) for w in ("red", "blue", tok.eos_token))
    labels = torch.tensor([[-100, -100, red, eos], [-100, -100, blue, eos], [-100, red, eos, -100],
                           [-100, -100, red, eos]])
    # row 0 right (red, </s>); row 1 wrong answer word; row 2 right, its padded column predicted -100; row 3 right
    # word, but another special token (pad) for the EOS: not every answer token right (it decoded equal, skipping both)
    pad = tok.pad_token_id
    assert pad != eos
    predictions = torch.tensor([[0, red, eos, 5], [0, red, eos, 5], [red, eos, -100, -100], [0, red, pad, 5]])
    out = train_rcp.answer_metrics(predictions.numpy(), labels.numpy(), tok)
    assert out == {"answer_exact_match": pytest.approx(2 / 4), "answer_token_accuracy": pytest.approx(6 / 8)}
    with pytest.raises(ValueError, match="argmax the logits first"):
        train_rcp.answer_metrics(torch.zeros(3, 4, 7).numpy(), labels.numpy(), tok)


def test_eval_strategy_steps_evaluates_and_keeps_the_best_plugins(tmp_path):
    """`--eval_strategy steps` evaluates on --eval_split (loss + answer metrics) during training, and with
    `--load_best_model_at_end` the saved plug-ins are the best checkpoint's, not the last step's."""
    from safetensors.torch import load_file

    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    out = tmp_path / "run"
    metrics = train_rcp.main([
        "--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
        "--pruning_layers", "1", "--repair_layers", "1", "--pruner_hidden_size", "8", "--repair_bottleneck_size",
        "8", "--budget_fraction", "0.25", "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "0.05",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2", "--load_best_model_at_end",
        "--metric_for_best_model", "eval_loss", "--do_eval",
        # the highest loss is "best": a checkpoint other than the last (the loss falls), or loading no best checkpoint
        # at all would pass
        "--greater_is_better", "true",
    ])
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    for e in evals:
        assert 0.0 <= e["eval_answer_exact_match"] <= 1.0 and 0.0 <= e["eval_answer_token_accuracy"] <= 1.0
        assert "eval_retention" in e and "eval_task_loss" in e
    best = max(evals, key=lambda e: e["eval_loss"])
    assert best["step"] != 6
    assert metrics["best_model_checkpoint"] == str(out / f"checkpoint-{best['step']}")
    # the best checkpoint's own state names it by its final name (a resume from it reads that), not the staging
    # folder it was written in
    own = json.loads((out / f"checkpoint-{best['step']}" / "trainer_state.json").read_text())
    assert own["best_model_checkpoint"] == str(out / f"checkpoint-{best['step']}")
    assert metrics["trainer_eval"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    saved = load_file(out / "plugins" / "rcp_plugins.safetensors")
    best_saved = load_file(out / f"checkpoint-{best['step']}" / "rcp_plugins.safetensors")
    assert saved.keys() == best_saved.keys() and all(torch.equal(saved[k], best_saved[k]) for k in saved)
    last = load_file(out / "checkpoint-6" / "rcp_plugins.safetensors")
    assert not all(torch.equal(saved[k], last[k]) for k in saved)


def test_evaluating_without_the_eval_split_is_refused_before_training(tmp_path):
    from rcp_llava.testbed import build_testbed

    folder = build_testbed("micro", output_dir=tmp_path / "testbed", pruning_eval=False)
    with pytest.raises(ValueError, match="--eval_split 'dev'"):
        train_rcp.main(["--base_model", str(folder / "model"), "--dataset_name_or_path", str(folder / "dataset"),
                        "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--use_cpu",
                        "--eval_strategy", "steps", "--eval_split", "dev"])


# -- the command line (issue 18) ------------------------------------------------------------------------------


def test_training_arguments_default_to_the_authors_optimiser_and_the_testbed_job_to_its_measured_recipe(tmp_path):
    """The authors train with weight decay 0.01 and a 10% warm-up (the Trainer's defaults are 0 and 0); the embedded
    testbed job keeps what its committed results were measured with."""
    args = RcpTrainingArguments(output_dir=str(tmp_path))
    assert (args.weight_decay, args.warmup_steps, args.learning_rate) == (0.01, 0.1, 5e-5)
    job = train_rcp.testbed_job_defaults("deep")
    assert (job["weight_decay"], job["warmup_steps"], job["learning_rate"]) == (0.0, 20, 1e-3)


def test_help_is_grouped_shows_the_main_jobs_real_defaults_and_explains_every_project_field():
    parser = train_rcp.build_parser()
    text = parser.format_help()
    for title in train_rcp.HELP_GROUPS:
        assert f"\n{title}:\n" in text, title
    assert "Trainer (transformers.TrainingArguments" in text
    # what the no-argument main job actually uses, beside the generic default
    for flag, value in (("--max_steps", "400"), ("--per_device_train_batch_size", "16"), ("--learning_rate", "0.001"),
                        ("--output_dir", "outputs/rcp_deep")):
        block = text[text.index(f"  {flag} "):]
        block = block[:block.index("\n  --")]
        assert f"main job (deep testbed): {value}" in " ".join(block.split()), (flag, block)
    assert "main job (deep testbed): outputs/rcp_deep, tiny testbed: outputs/rcp_tiny" in " ".join(text.split())
    assert "--testbed_preset TESTBED_PRESET" in text and "(default: deep)" in " ".join(text.split())
    groups = {g.title: g for g in parser._action_groups}
    for title in train_rcp.HELP_GROUPS:
        for action in groups[title]._group_actions:
            assert action.help and len(action.help) > 10, action.dest
    assert "--save_safetensors" not in text and "--no_save_safetensors" not in text  # a dead flag, removed


@pytest.mark.parametrize("argv", [["--pruning_layers", "1,13,25"], ["--pruning_layers", "1", "13", "25"]])
def test_layer_lists_take_commas_or_separate_integers(argv):
    job, _ = train_rcp.build_parser().parse_args_into_dataclasses(args=argv + ["--output_dir", "x"])
    assert train_rcp._parse_int_list(job.pruning_layers, "pruning_layers") == [1, 13, 25]
    with pytest.raises(ValueError, match="must be integers, e.g. '1,13,25' or '1 13 25'"):
        train_rcp._parse_int_list(["1", "x"], "pruning_layers")


def test_bf16_mixed_precision_trains(micro, tmp_path):
    """`--bf16` runs the forward under autocast: before 5ea4dc4 the Eq. (4) prior's bf16 product overflowed its
    float32 mask value ("value cannot be converted to type c10::BFloat16 without overflow") on the first step."""
    make, _, _ = micro
    model = make()
    plugins_before = {k: v.clone() for k, v in model.plugin_state_dict().items()}
    trainer = make_trainer(micro, tmp_path, model=model, bf16=True, max_steps=2, save_strategy="no")
    trainer.train()
    losses = [entry["task_loss"] for entry in trainer.state.log_history if "task_loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(v, plugins_before[k]) for k, v in model.plugin_state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed precision: the weights stay float32


# -- what the Trainer reports (logs, evaluate, predict) and accepts (args), as the stock Trainer does -----------------


def test_logged_parts_sum_a_windows_micro_batches_and_weight_eval_batches():
    records = [(0, {"task_loss": 1.0, "retention": 0.5}), (0, {"task_loss": 2.0, "retention": 0.7}),
               (1, {"task_loss": 4.0, "retention": 0.2})]
    logged = train_rcp.logged_train_parts(records)  # step 0: 1 + 2 = 3 and (0.5 + 0.7) / 2; step 1: 4 and 0.2
    assert logged == pytest.approx({"task_loss": 3.5, "retention": 0.4})
    assert train_rcp.logged_train_parts([]) == {}
    logged = train_rcp.logged_eval_parts([(3, {"task_loss": 1.0}), (1, {"task_loss": 5.0})])
    assert logged == pytest.approx({"task_loss": 2.0})  # (3 * 1 + 1 * 5) / 4, as eval_loss weights its batches
    assert train_rcp.logged_eval_parts([]) == {}


def test_gradient_accumulation_logs_the_loss_parts_of_the_larger_batch(micro, tmp_path):
    """Each micro-batch's part is its share of the window, and the log averaged the shares: batch 2 x 2 logged
    task_loss 2.014 where batch 4 logged 4.028 (the loss and the update were already equal)."""
    common = dict(max_steps=1, optim="sgd", learning_rate=1e-9, gumbel_noise=False, save_strategy="no",
                  lr_scheduler_type="constant", lr_scheduler_kwargs={}, repair_loss_pooling="sample",
                  sparsity_reduction="sample", **ACTIVE_TERMS)
    logs = {}
    for name, overrides in (("batch 4", dict(per_device_train_batch_size=4)),
                            ("2 x 2", dict(per_device_train_batch_size=2, gradient_accumulation_steps=2))):
        trainer = make_trainer(micro, tmp_path / name, model=_trained_like(micro), **common, **overrides)
        trainer.train()
        _assert_every_term_active(trainer)
        logs[name] = next(e for e in trainer.state.log_history if "task_loss" in e)
    args = trainer.args
    for name, log in logs.items():  # the parts recompose the logged loss
        recomposed = (args.lambda_task * log["task_loss"] + args.lambda_repair * log["repair_loss"]
                      + args.lambda_sparse * log["sparsity_loss"])
        assert recomposed == pytest.approx(log["loss"], rel=1e-4), name
    for key in ("loss", "task_loss", "repair_loss", "sparsity_loss", "retention"):
        assert logs["2 x 2"][key] == pytest.approx(logs["batch 4"][key], rel=1e-4), key
    # --gumbel_noise False turns the schedule's noise off (step 0 of 1 is inside its noisy 80%)
    assert logs["2 x 2"]["gumbel_noise"] == logs["batch 4"]["gumbel_noise"] == 0.0


def test_evaluation_reports_its_parts_under_its_own_prefix_and_at_the_runs_final_targets(micro, tmp_path):
    """The parts were added to a log with an `eval_` key only: `evaluate(metric_key_prefix="test")` and `predict`
    reported none and left theirs to be averaged into the next evaluation; with a dict of eval sets the second
    overwrote the first's `eval_task_loss`. And the sparsity target is annealed runtime state: a finished run gave
    eval_loss 155.96, the same checkpoint resumed 5.96 (target 1.0), and `metric_for_best_model="eval_loss"` picked
    warm-up checkpoints. Evaluation now uses the schedule's end values, for every trainer."""
    make, processor, dataset = micro
    first, second = dataset.select(range(4)), dataset.select(range(4, 8))
    trainer = make_trainer(micro, tmp_path / "run", model=make(), max_steps=2, save_steps=2, gumbel_noise_ratio=0.5,
                           per_device_eval_batch_size=3)  # batches of 3 and 1: the parts still recompose eval_loss
    trainer.train()
    # training drew noise at step 0 of 2 and none from half-way (--gumbel_noise_ratio 0.5); evaluation none
    assert [e["gumbel_noise"] for e in trainer.state.log_history if "gumbel_noise" in e] == [1.0, 0.0]
    metrics = trainer.evaluate(first)
    target = trainer.model.config.visual_token_budget / trainer.model.config.num_visual_tokens
    assert metrics["eval_target_retention"] == pytest.approx(target)
    assert metrics["eval_gumbel_temperature"] == pytest.approx(trainer.args.gumbel_temperature_end)
    assert metrics["eval_gumbel_noise"] == 0.0  # the pruners draw no noise in evaluation
    args = trainer.args
    recomposed = (args.lambda_task * metrics["eval_task_loss"] + args.lambda_repair * metrics["eval_repair_loss"]
                  + args.lambda_sparse * metrics["eval_sparsity_loss"])
    assert recomposed == pytest.approx(metrics["eval_loss"], rel=1e-4)
    test = trainer.evaluate(first, metric_key_prefix="test")
    assert test["test_task_loss"] == pytest.approx(metrics["eval_task_loss"]) and "eval_task_loss" not in test
    predicted = trainer.predict(first).metrics
    assert predicted["test_task_loss"] == pytest.approx(metrics["eval_task_loss"])
    after = trainer.evaluate(first)  # nothing of `test` / `predict` averaged in
    assert {k: v for k, v in after.items() if "_per_second" not in k and "runtime" not in k} == pytest.approx(
        {k: v for k, v in metrics.items() if "_per_second" not in k and "runtime" not in k})
    both = trainer.evaluate({"a": first, "b": second})
    assert both["eval_a_task_loss"] == pytest.approx(metrics["eval_task_loss"])
    assert both["eval_b_task_loss"] == pytest.approx(trainer.evaluate(second)["eval_task_loss"])
    # a fresh trainer on the finished checkpoint scores it as the run did (it had target 1.0, tau at the start)
    fresh = make_trainer(micro, tmp_path / "fresh", model=make(), max_steps=2, per_device_eval_batch_size=3)
    fresh.model.load_plugins(tmp_path / "run" / "checkpoint-2", strict=True)
    assert all(torch.equal(v, trainer.model.plugin_state_dict()[k]) for k, v in fresh.model.plugin_state_dict().items())
    again = fresh.evaluate(first)
    for key in ("eval_loss", "eval_task_loss", "eval_sparsity_loss", "eval_target_retention"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5), key


def test_a_model_without_a_budget_still_evaluates(micro, tmp_path):
    """`visual_token_budget=None` is a valid config ("no target"): evaluation uses target 1.0, as it did before the
    end-of-schedule values (a review: final_schedule raised "Training needs `visual_token_budget`")."""
    make, _, dataset = micro
    trainer = make_trainer(micro, tmp_path, model=make(visual_token_budget=None), max_steps=1)
    metrics = trainer.evaluate(dataset.select(range(2)))
    assert metrics["eval_target_retention"] == 1.0 and math.isfinite(metrics["eval_loss"])


def test_training_without_a_budget_is_refused_before_the_first_step(micro, tmp_path):
    """Without `visual_token_budget` the sparsity loss has no target: `train()` ran the optimizer's creation, the
    dataloader and the first batch's callbacks before the target's read refused it. It is now refused first, with
    the fix named; evaluation without one stays allowed (the test above)."""
    make, _, _ = micro
    trainer = make_trainer(micro, tmp_path, model=make(visual_token_budget=None), max_steps=1)
    with pytest.raises(ValueError, match=r"Training needs `visual_token_budget` .* has none: set "
                                         r"`model\.config\.visual_token_budget` \(e\.g\. 64 of 576; train_rcp\.py: "
                                         r"--visual_token_budget or --budgets\)"):
        trainer.train()
    assert trainer.optimizer is None and trainer.state.global_step == 0 and not any(tmp_path.iterdir())


def test_the_train_summary_holds_no_leftover_parts(micro, tmp_path):
    """With logging_steps 2 of 3 steps, step 3's parts landed in `TrainOutput.metrics` beside train_runtime."""
    trainer = make_trainer(micro, tmp_path, max_steps=3, logging_steps=2, save_strategy="no")
    output = trainer.train()
    assert "task_loss" not in output.metrics and "train_loss" in output.metrics
    assert [e["step"] for e in trainer.state.log_history if "task_loss" in e] == [2]


def test_the_trainer_takes_stock_training_arguments_or_none(micro, tmp_path, monkeypatch, caplog):
    """`args=TrainingArguments(...)` and `args=None` crashed ("no attribute 'detach_prior'") after freezing the
    backbone; the stock Trainer takes both. RCP's own fields take their defaults."""
    from transformers import TrainingArguments

    make, processor, dataset = micro
    collator = RcpDataCollator(processor)
    stock = TrainingArguments(output_dir=str(tmp_path / "stock"), max_steps=1, report_to=[], use_cpu=True,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = RcpTrainer(model=make(), args=stock, train_dataset=dataset, data_collator=collator)
    assert type(trainer.args) is RcpTrainingArguments and trainer.args.lambda_sparse == 200.0
    assert (trainer.args.output_dir, trainer.args.gradient_accumulation_steps) == (str(tmp_path / "stock"), 2)
    assert trainer.args.remove_unused_columns is False  # the collator reads the raw columns
    assert "remove_unused_columns=True" in caplog.text
    trainer.train()
    assert (tmp_path / "stock" / "checkpoint-1" / "rcp_plugins.safetensors").is_file()
    monkeypatch.chdir(tmp_path)
    assert RcpTrainer(model=make(), args=None, data_collator=collator).args.output_dir == "trainer_output"
    model = make()
    with pytest.raises(TypeError, match=r"^`args` must be `RcpTrainingArguments` \(or `TrainingArguments`\), got dict"):
        RcpTrainer(model=model, args={"output_dir": "x"})
    assert any(p.requires_grad for n, p in model.named_parameters() if not n.startswith(train_rcp.PLUGIN_PREFIX))


def test_a_training_arguments_subclass_names_the_fields_it_loses(micro, tmp_path, caplog):
    """`Seq2SeqTrainingArguments(predict_with_generate=True, ...)` lost its own fields without a word."""
    from transformers import Seq2SeqTrainingArguments

    make, processor, dataset = micro
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                    remove_unused_columns=False, predict_with_generate=True,
                                    generation_max_length=7)
    trainer = RcpTrainer(model=make(), args=args, train_dataset=dataset, data_collator=RcpDataCollator(processor))
    assert type(trainer.args) is RcpTrainingArguments and trainer.args.max_steps == 1
    assert ("its own fields predict_with_generate, generation_max_length are not `RcpTrainingArguments` fields "
            "and are ignored") in caplog.text
    caplog.clear()
    RcpTrainer(model=make(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                            remove_unused_columns=False),
               train_dataset=dataset, data_collator=RcpDataCollator(processor))
    assert "are ignored" not in caplog.text  # at their defaults, nothing is lost


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plugins_of_a_half_precision_checkpoint_train_in_float32(micro, tmp_path, dtype, caplog):
    """A half-precision checkpoint (llava-hf's 7B is float16) gave bf16 / fp16 plug-ins: at lr 5e-5 the pruner bias
    (2.0, bf16 spacing 1.6e-2) never moved and most parameters kept their values, with finite losses. They now train
    in float32, as PEFT's adapters do, on the backbone in its own dtype."""
    from safetensors.torch import load_file

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    make, processor, dataset = micro
    make().save_pretrained(tmp_path / "fp32")
    # from_pretrained keeps the plug-ins float32 on a half backbone now; a cast of the whole model still halves them
    model = RcpLlavaForConditionalGeneration.from_pretrained(tmp_path / "fp32", dtype=dtype).to(dtype)
    assert {p.dtype for p in model.plugin_parameters()} == {dtype}
    before = {k: v.float().clone() for k, v in model.plugin_state_dict().items()}
    trainer = make_trainer(micro, tmp_path / "run", model=model, max_steps=3, learning_rate=5e-5, warmup_steps=0,
                           save_strategy="no")
    assert f"the plug-ins train in float32 on a {dtype} backbone" in caplog.text
    assert {p.dtype for p in model.plugin_parameters()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith(train_rcp.PLUGIN_PREFIX)} == {dtype}
    trainer.train()
    after = model.plugin_state_dict()
    assert after["model.rcp_plugins.pruners.1.bias"] != 2.0  # a float32 step (bf16 rounded it back to 2.0)
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    assert changed > 0.9 * sum(v.numel() for v in before.values())
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    model.save_plugins(tmp_path / "plugins")
    saved = load_file(tmp_path / "plugins" / "rcp_plugins.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    with torch.no_grad():  # and the half-precision backbone runs them, in both layouts
        batch = RcpDataCollator(processor)([dataset[0], dataset[1]])
        batch = {k: v for k, v in batch.items() if k not in ("labels",)}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        model.eval()
        assert torch.isfinite(model(**batch).logits).all()


def test_full_half_precision_evaluation_is_refused_and_unused_columns_kept(tmp_path, caplog):
    """`bf16_full_eval` made the job's evaluation after training cast the model in place (Trainer.evaluation_loop),
    so plugins/ and model/ were saved in bf16; `remove_unused_columns=True` failed at `train()`, after the model
    loaded, where a plain `TrainingArguments` was already set to False."""
    for flag in ("bf16_full_eval", "fp16_full_eval"):
        with pytest.raises(ValueError, match=rf"^`{flag}=True` is not supported: for an evaluation outside training the "
                                             "Trainer casts the whole model"):
            RcpTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{flag: True})
    args = RcpTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=True)
    assert args.remove_unused_columns is False and "remove_unused_columns=True" in caplog.text


def test_multi_turn_conversations_train_as_one_sequence(micro, tmp_path):
    """A LLaVA conversation (lists of questions and answers, `load_llava_json`'s default rows) is one sequence with
    every answer and its EOS labelled, as LLaVA's preprocess_v1 builds it; each turn pair was its own example, a later
    turn trained without the earlier ones. A one-turn list is exactly the single-turn example."""
    import copy

    from rcp_llava.lmms_eval_model import LLAVA_15_CHAT_TEMPLATE

    make, processor, dataset = micro
    collator = RcpDataCollator(processor)
    e0, e1 = dataset[0], dataset[1]
    single = collator([e0, e1])
    listed = collator([{**e, "question": [e["question"]], "answer": [e["answer"]]} for e in (e0, e1)])
    assert single.keys() == listed.keys() and all(torch.equal(single[k], listed[k]) for k in single)

    two = {**e0, "question": [e0["question"], e1["question"]], "answer": [e0["answer"], e1["answer"]]}
    text, spans = collator.conversation(two)
    # (the template's space after the last EOS is no one's: left out, as the single-turn text leaves it out)
    assert text == (f"USER: <image> {e0['question']} ASSISTANT: {e0['answer']}</s> USER: {e1['question']} "
                    f"ASSISTANT: {e1['answer']}</s>")
    assert [text[a:b] for a, b in spans] == [f" {e0['answer']}</s>", f" {e1['answer']}</s>"]
    batch = collator([two, e1])
    tok = processor.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tok.decode(ids[labels != -100]) == f"{e0['answer']} </s> {e1['answer']} </s>"
    assert tok.decode(ids[batch["question_mask"][0]]) == tok.decode(tok(
        f"{e0['question']} ASSISTANT: USER: {e1['question']} ASSISTANT:", add_special_tokens=False)["input_ids"])
    assert torch.equal(batch["answer_mask"][0][:-1], labels[1:] != -100)
    for key in ("input_ids", "labels", "question_mask", "answer_mask"):  # a single-turn row beside it: unchanged
        assert torch.equal(batch[key][1][batch["attention_mask"][1].bool()],
                           single[key][1][single["attention_mask"][1].bool()]), key

    # llava-hf's template writes no EOS after an answer: each gets one, as LLaVA's "A1</s>USER: Q2" separator
    hf = copy.deepcopy(processor)
    hf.chat_template = LLAVA_15_CHAT_TEMPLATE
    text, spans = RcpDataCollator(hf).conversation(two)
    assert text == (f"USER: <image>\n{e0['question']} ASSISTANT: {e0['answer']}</s>USER: {e1['question']} "
                    f"ASSISTANT: {e1['answer']}</s>")
    # A template that writes the turns' separator before the next user turn instead of after the answer trains on
    # the same text: the EOS takes the separator's place wherever the template puts it
    leading = copy.deepcopy(hf)
    leading.chat_template = LLAVA_15_CHAT_TEMPLATE.replace(
        "{{ message['role'].upper() + ': '}}",
        "{{ (' ' if message['role'] == 'user' and not loop.first else '') + message['role'].upper() + ': '}}",
    ).replace("{% generation %}{{ content['text'] + ' '}}", "{% generation %}{{ content['text'] }}")
    assert leading.chat_template != hf.chat_template
    assert RcpDataCollator(leading).conversation(two)[0] == text

    with pytest.raises(ValueError, match=r"'question' holds 2 turn\(s\) and 'answer' 1: a conversation needs one "
                                         r"answer per question"):
        collator([{**two, "answer": two["answer"][:1]}])
    with pytest.raises(ValueError, match=r"turn 1: 'question' .* holds the image placeholder '<image>' in a later turn"):
        collator([{**two, "question": [two["question"][0], "<image> and?"]}])

    from datasets import Dataset

    rows = Dataset.from_list([{**dataset[i], "question": [dataset[i]["question"], dataset[i + 1]["question"]],
                               "answer": [dataset[i]["answer"], dataset[i + 1]["answer"]]} for i in range(0, 8, 2)])
    train_rcp.check_dataset(rows, collator, max_length=512)
    trainer = RcpTrainer(model=make(), args=RcpTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1), train_dataset=rows, data_collator=collator)
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_save_model_writes_the_processor_given_as_processing_class(micro, tmp_path):
    """`Trainer._save` saves `processing_class` beside the model; the plug-in-only `_save` left it out."""
    make, processor, dataset = micro
    trainer = make_trainer(micro, tmp_path / "run", max_steps=1, save_strategy="no")
    trainer.processing_class = processor
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"rcp_plugins.safetensors", "rcp_config.json", "training_args.bin", "processor_config.json"} <= files
    assert not any(f.startswith("model") for f in files)
    assert type(processor).from_pretrained(tmp_path / "saved").tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_an_unreachable_sparsity_target_is_named():
    """A 2-layer model whose first pruner sits before layer 1 keeps the whole image in layer 0: over all layers it
    averages at least N / 2 visual tokens, so a budget of N / 9 ended training at 900% of its target, unannounced."""
    from conftest import tiny_config

    config = tiny_config(pruning_layers=[1, 2], repair_layers=[2, 3])  # 4 layers, 16 visual tokens: floor 4
    assert train_rcp.unreachable_budget(config, 4.5, "all") is None
    assert train_rcp.unreachable_budget(config, 16 / 9, "from_first_pruner") is None
    assert train_rcp.unreachable_budget(config, 4.0, "all") == (
        "--visual_token_budget 4 cannot be reached: the 1 layer(s) before the first pruner keep all 16 visual tokens, "
        "which alone average 4 per layer over all 4 layers (--sparsity_layers all). Raise the budget, prune earlier "
        "(--pruning_layers), or average from the first pruner (--sparsity_layers from_first_pruner).")


def test_overwrite_removes_checkpoint_folders_only(tmp_path):
    """`--overwrite_output_dir` renamed anything named `checkpoint-*`: a user's notes file or a link was hidden as
    `.removing-...` and, rmtree failing on it silently, kept there. Only `checkpoint-<step>` folders go."""
    for name in ("checkpoint-1", "checkpoint-20"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-notes.txt").write_text("mine")
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-5").symlink_to(tmp_path / "checkpoint-best")
    assert train_rcp.remove_previous_checkpoints(str(tmp_path)) == ["checkpoint-1", "checkpoint-20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "checkpoint-best", "checkpoint-notes.txt"]
