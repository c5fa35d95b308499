r"""Training recipe of the testbed model: a stock LLaVA trained from scratch in four HF-`Trainer` stages.

1. `vision`: the CLIP vision tower learns per-patch labels (colour, shape, size, which cell of the object, image
   quadrant) through linear heads on the very hidden state LLaVA feeds its projector (patch-level supervision).
   The projector keeps its initialisation: a closed-form alignment to the attribute words was tried and left the
   decoder on the answer prior (0.365 vs 0.424 test accuracy on tiny).
2. `warmup`: vision tower frozen (from here on); projector + Llama learn to answer multi-turn conversations
   (several questions per image, loss on the answers) from token SUBSETS: every object patch plus ~10% of the
   background, original position ids (input-level pruning). The routes of binding a question to its object are
   supervised (`rcp_llava.testbed.supervision`, weight `StageSpec.attention_supervision`): without that the
   decoder stayed on the answer prior (0.42 test accuracy on tiny after 2500 steps). An optional density
   curriculum (`StageSpec.curriculum`) grows scenes from 1 object.
3. `rebalance`: the warm-up continued with a fresh optimizer on a position-heavy family mix
   (`presets.REBALANCE_FAMILIES`): position stayed at chance through the warm-up on tiny, at any mix.
4. `full`: projector + Llama on whole scenes, no attention supervision: every object patch always, and all
   visual tokens in half of the images; the other half have part of their background removed
   (`StageSpec.thinned_share`, see `SceneStream`) so that the decoder cannot count on the background's size,
   and scenes hold 2-8 objects instead of 6-8 (`StageSpec.min_objects`) so that it cannot count objects as a
   share of the objects in view. Measured on tiny (1000 test samples), oracle pruning at 1/9 minus full: -9.2
   points with whole 6-8-object images only (full 0.916), -3.3 with the thinning, -1.3 with both (full 0.910).
   Random pruning at 1/9 is unchanged by them (0.369 -> 0.372), saliency gains 2.6 (0.629 -> 0.655): they do
   not rescue pruners that lose objects.

Training scenes are streamed from the generator (`split="stream"`, disjoint from the saved splits); each stage
is resumable (`checkpoint-*` folders) and skipped once its `final/` folder exists (written as `tmp-final/` and
renamed when complete, so it exists only whole; see `STAGING_FINAL`). Each stage folder records the
recipe it was trained with (`recipe.json`: the model's shape, the seed, the stage's `StageSpec` and the recipe of
the stage it started from); a folder whose recipe differs from the one asked for is an error, never reused.
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from modeling_rcp_llava import atomic_write, write_text

from ..checkpoints import AtomicCheckpointMixin
from .evaluate import pruned_inputs
from .presets import StageSpec, TestbedPreset, get_preset
from .scenes import COLOURS, QUADRANTS, SHAPES, SIZES, make_sample, sample_rng
from .supervision import HeadAttentionProbe, attention_supervision_loss, attention_targets
from .text import build_model_config, build_processor


logger = logging.get_logger(__name__)

STAGES = ("vision", "warmup", "rebalance", "full")
SUBSET_STAGES = ("warmup", "rebalance")  # token subsets, attention supervision
# Families asked in training conversations (consecutive entries, cyclic); position (3/8) and counting (2/8) are
# oversampled. Measured on tiny after the warm-up: with one sixth each, counting 0.665 and position at chance
# (0.275); with this mix counting 0.71, position still 0.27 -- the `rebalance` stage is what teaches position.
TRAIN_FAMILIES = ("attribute", "position", "counting", "position", "existence", "identity", "position", "counting")
PATCH_HEADS = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES), "part": 5,
               "quadrant": len(QUADRANTS)}
_STAGE_OFFSET = {"vision": 0, "warmup": 50_000_000, "rebalance": 75_000_000, "full": 100_000_000}


# ------------------------------------------------------------------------------------------------ data

class SceneStream(torch.utils.data.Dataset):
    """Lazily generated training scenes: item `i` is a pure function of `(seed, stage, i)`, so the Trainer's
    sampler (and its resume logic) sees an ordinary map-style dataset."""

    def __init__(self, preset: TestbedPreset, seed: int, stage: str, length: int, turns: int = 1,
                 families=TRAIN_FAMILIES, subset: bool = False, curriculum: float = 0.0, thinned_share: float = 0.0,
                 min_objects: int = 0):
        if not 0.0 <= thinned_share <= 1.0:
            raise ValueError(f"`thinned_share` must be in [0, 1], got {thinned_share}.")
        if min_objects and not 1 <= min_objects <= preset.max_objects:
            raise ValueError(f"`min_objects` must be in [1, {preset.max_objects}] (the preset's max_objects) or 0 "
                             f"for the preset's own range, got {min_objects}.")
        self.preset, self.seed, self.stage, self.length = preset, seed, stage, length
        self.turns, self.families, self.subset, self.curriculum = turns, families, subset, curriculum
        self.thinned_share, self.min_objects = thinned_share, min_objects

    def _num_objects(self, i):
        """Curriculum over scene density: during the first `curriculum` share of the stage the largest scene
        grows from 1 object to `max_objects` (sizes drawn uniformly up to it), then the preset's range, or
        `[min_objects, max_objects]` when `min_objects` is set."""
        hi = self.preset.max_objects
        progress = i / max(1, self.length)
        if progress >= self.curriculum:
            if self.min_objects:
                return lambda rng: int(rng.integers(self.min_objects, hi + 1))
            return None
        top = 1 + int((hi - 1) * progress / self.curriculum)
        return lambda rng: int(rng.integers(1, top + 1))

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        index = _STAGE_OFFSET[self.stage] + int(i)
        scene, questions = make_sample(self.preset, self.seed, "stream", index, self.families, self.turns,
                                       num_objects=self._num_objects(int(i)))
        item = {"image": scene.image, "questions": questions, "patch_labels": scene.patch_labels}
        on_object = scene.patch_labels["colour"] > 0  # (N,)
        if self.subset:
            # every object cell plus a small random share of the background (~35 tokens of 144): the decoder
            # learns to bind question words to objects far faster on short sequences (testbed notes)
            rng = sample_rng(self.seed + 1, "stream", index)
            item["keep"] = on_object | (rng.random(on_object.shape) < 0.1)
        elif self.thinned_share > 0:
            item["keep"] = self._thinned_keep(on_object, index)
        return item

    def _thinned_keep(self, on_object, index) -> np.ndarray:
        r"""`(N,)` keep mask of a whole-image sample: all True, or for a `thinned_share` of the images every
        object patch plus each background patch with probability `u**2`, `u ~ U(0, 1)` drawn per image (mean 1/3,
        so near-empty backgrounds are common). Why: trained on whole images only, the tiny decoder used the
        background tokens as an attention sink whose size it counted on -- removing background alone (every
        object kept) cost 6.5 points of position accuracy although its content was irrelevant (overwriting each
        background token with the image's mean background feature changed accuracy by 0.2 points). Objects are
        never dropped: what the image shows, and so every answer, is unchanged."""
        rng = sample_rng(self.seed + 2, "stream", index)
        if rng.random() >= self.thinned_share:
            return np.ones_like(on_object)
        return on_object | (rng.random(on_object.shape) < rng.random() ** 2)


class PatchCollator:
    def __init__(self, processor):
        self.image_processor = processor.image_processor

    def __call__(self, items):
        batch = {"pixel_values": self.image_processor([it["image"] for it in items], return_tensors="pt")[
            "pixel_values"]}
        for name in PATCH_HEADS:
            batch[name] = torch.as_tensor(np.stack([it["patch_labels"][name] for it in items]))
        return batch


class ChatCollator:
    """Multi-turn conversations about one image each; labels on every answer word and its `</s>`. With
    `attention_targets=True` the batch also carries the supervised attention rows of `attention_targets`."""

    def __init__(self, processor, attention_targets: bool = False):
        self.processor = processor
        self.attention_targets = attention_targets
        tok = processor.tokenizer
        self.assistant_id = tok.convert_tokens_to_ids("ASSISTANT")
        self.colon_id = tok.convert_tokens_to_ids(":")
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.eos_id = tok.eos_token_id

    def __call__(self, items):
        texts = []
        for it in items:
            messages = []
            for j, q in enumerate(it["questions"]):
                content = [{"type": "text", "text": q["question"]}]
                if j == 0:
                    content.insert(0, {"type": "image"})
                messages += [{"role": "user", "content": content},
                             {"role": "assistant", "content": [{"type": "text", "text": q["answer"]}]}]
            texts.append(self.processor.apply_chat_template(messages))
        self.processor.tokenizer.padding_side = "right"
        batch = dict(self.processor(text=texts, images=[it["image"] for it in items], return_tensors="pt",
                                    padding=True))
        ids = batch["input_ids"]
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[:, 2:] = (ids[:, :-2] == self.assistant_id) & (ids[:, 1:-1] == self.colon_id)
        is_eos = torch.zeros_like(answer)
        is_eos[:, 1:] = answer[:, :-1] & (ids[:, 1:] == self.eos_id)
        batch["labels"] = torch.where(answer | is_eos, ids, torch.full_like(ids, -100))
        if "keep" in items[0]:
            batch["keep"] = torch.as_tensor(np.stack([it["keep"] for it in items]))
        if self.attention_targets:
            tokens = [self.processor.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()]
            batch["attention_targets"] = attention_targets(
                tokens, batch["attention_mask"], ids == self.image_id,
                [it["patch_labels"] for it in items], batch.get("keep"))
        return batch


# ----------------------------------------------------------------------------------------------- models

class PatchProbe(nn.Module):
    """The LLaVA vision tower plus one linear head per patch label, read from the hidden state LLaVA projects."""

    def __init__(self, llava: LlavaForConditionalGeneration):
        super().__init__()
        self.vision_tower = llava.model.vision_tower
        self.feature_layer = llava.config.vision_feature_layer
        hidden = llava.config.vision_config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in PATCH_HEADS.items()})

    def forward(self, pixel_values, **labels):
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        h = out.hidden_states[self.feature_layer][:, 1:]  # (B, N, H), CLS dropped as in LLaVA's "default"
        losses = {name: F.cross_entropy(head(h).flatten(0, 1), labels[name].flatten())
                  for name, head in self.heads.items()}
        return {"loss": sum(losses.values())}


class TestbedTrainer(AtomicCheckpointMixin, Trainer):
    """`Trainer` whose batches may carry `keep (B, N)`: then the loss runs on input-level pruned sequences; and
    `attention_targets`: then `attention_supervision * attention_supervision_loss` is added (the supervised heads'
    probabilities from `HeadAttentionProbe`, the model itself on its configured kernel)."""

    def __init__(self, *args, attention_supervision: float = 0.0, supervised_layers=(0, 1, 2), **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean
        self.attention_supervision = attention_supervision
        self.supervised_layers = tuple(supervised_layers)
        self._attention_losses = []

    def log(self, logs, *args, **kwargs):
        if self._attention_losses and "loss" in logs:
            logs["attention_loss"] = round(float(np.mean(self._attention_losses)), 4)
            self._attention_losses = []
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume exactly. `Trainer` saves a LLaVA checkpoint in the llava-hf key layout (`save_pretrained`
        converts the keys) but reads it back with a plain `load_state_dict`, which matches no key: transformers
        only warned, and the stage went on from its initial weights with the schedule at the checkpoint's step.
        Read it with `from_pretrained` (which converts the keys) and copy every tensor, strictly."""
        model = model if model is not None else self.model
        if not isinstance(model, LlavaForConditionalGeneration):  # the vision stage's probe: a plain state dict
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved, info = LlavaForConditionalGeneration.from_pretrained(resume_from_checkpoint, dtype=model.dtype,
                                                                    output_loading_info=True)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        try:
            if problems:
                raise RuntimeError(f"{problems}")
            model.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"The checkpoint {resume_from_checkpoint} does not hold this stage's model ({error}). Delete it to "
                "restart the stage from its beginning."
            ) from None

    def _get_train_sampler(self, *args, **kwargs):
        # items are already random draws; reading them in order keeps the density curriculum in order
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep = inputs.pop("keep", None)
        targets = inputs.pop("attention_targets", None)
        if keep is not None:
            inputs = pruned_inputs(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                   keep, labels=inputs["labels"], padding_side="right")
        supervise = targets is not None and self.attention_supervision > 0
        if not supervise:
            outputs = model(**inputs)
        else:  # the supervised heads' probabilities beside the model's own kernel (`HeadAttentionProbe`)
            llava = self.accelerator.unwrap_model(model)
            with HeadAttentionProbe(llava, self.supervised_layers) as probe:
                outputs = model(**inputs)
            attentions = probe.attentions(inputs["attention_mask"], llava.config.text_config.num_hidden_layers)
        loss = outputs["loss"]
        if supervise:
            attention_loss = attention_supervision_loss(attentions, targets, self.supervised_layers)
            self._attention_losses.append(attention_loss.item())
            loss = loss + self.attention_supervision * attention_loss
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------------------------ stages

def new_model(preset: TestbedPreset, processor, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_model_config(preset, processor.tokenizer))


def _training_args(out_dir: Path, spec: StageSpec, seed: int, save_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, lr_scheduler_type="cosine", warmup_steps=int(spec.warmup_ratio *
        spec.max_steps), weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(1, min(50, spec.max_steps // 10)),
        save_steps=save_steps, save_total_limit=1, report_to="none", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, seed=seed, data_seed=seed,
        disable_tqdm=False, save_only_model=False,
    )


# preset fields that do not change what a stage trains (the saved splits' sizes, the evaluation batch)
_NOT_RECIPE = ("name", "stages", "num_train", "num_validation", "num_test", "eval_batch_size")
RECIPE_FILE = "recipe.json"


def stage_recipe(stage: str, preset: TestbedPreset, spec: StageSpec, seed: int, init=None) -> dict:
    """What a stage's weights are a function of: the model and scene settings, the seed, the stage's spec and,
    through `init` (the previous stage's recipe), every stage before it. JSON types, so that it compares equal to
    its saved copy."""
    model = {k: v for k, v in dataclasses.asdict(preset).items() if k not in _NOT_RECIPE}
    recipe = {"stage": stage, "seed": seed, "model": model, "spec": dataclasses.asdict(spec), "init": init}
    return json.loads(json.dumps(recipe))


def recipe_chain(preset, seed: int = 0, stages=None, specs=None) -> dict:
    """The recipe `train_testbed_model(preset, seed=seed, stages=stages, specs=specs)` records for its last stage."""
    preset = get_preset(preset)
    recipe = None
    for stage in stages or STAGES:
        recipe = stage_recipe(stage, preset, (specs or {}).get(stage) or preset.stages[stage], seed, recipe)
    return recipe


def _init_recipe(init_dir):
    """The recipe saved beside a previous stage's `final/` folder; a folder from elsewhere is named by its path."""
    if init_dir is None:
        return None
    saved = Path(init_dir).parent / RECIPE_FILE
    return read_recipe(saved) if saved.exists() else str(init_dir)


def read_recipe(path) -> dict:
    """A saved `recipe.json`; a damaged one (a hand edit, a copy cut short) is a
    `ValueError` naming the file, not a bare JSONDecodeError."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete its folder to retrain that stage.") from None


def saved_recipe_diff(path, recipe: dict):
    """Dotted keys where the recipe saved at `path` differs from `recipe` (empty if equal); None if nothing is
    saved there (a folder built before recipes were recorded)."""
    path = Path(path)
    return sorted(recipe_diff(read_recipe(path), recipe)) if path.exists() else None


def _check_recipe(stage_dir: Path, recipe: dict):
    """Raise if `stage_dir` holds a stage trained with another recipe; record the recipe of a new one."""
    saved = stage_dir / RECIPE_FILE
    diff = saved_recipe_diff(saved, recipe)
    if diff:
        raise ValueError(f"{stage_dir} was trained with another recipe than the one asked for (differs in "
                         f"{', '.join(diff)}); delete the folder to retrain that stage, or build into another "
                         f"`output_dir`.")
    if diff is not None:  # the same recipe: reused
        return
    if stage_dir.exists() and any(stage_dir.iterdir()):
        logger.warning(f"[testbed] {stage_dir} has no {RECIPE_FILE} (built before recipes were recorded): reused "
                       f"unchecked")
    else:
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(saved, lambda tmp: write_text(tmp, json.dumps(recipe, indent=2, sort_keys=True)))


def recipe_diff(old, new, prefix=""):
    """Dotted keys where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from recipe_diff(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")


# A stage's weights and processor are saved here and the folder is renamed to `final/` once both are written:
# `save_pretrained` writes config.json before the weights and the processor comes after, so `final/config.json`, the
# old done-marker, existed while the folder was half-written; an interrupted save was reused, copied to `model/`,
# and a concurrent reader loaded a config cut short.
STAGING_FINAL = "tmp-final"
# What a whole `final/` holds, in the order an earlier version wrote it: `ProcessorMixin.save_pretrained` writes
# processor_config.json last, after the weights, so a folder with every one of them was saved to the end.
_FINAL_FILES = ("config.json", ("model.safetensors", "model.safetensors.index.json"), "tokenizer_config.json",
                "processor_config.json")


def missing_final_file(final):
    """None when the stage folder `final` is whole; else the first file it lacks (an earlier version's interrupted
    save: this one renames a complete folder into place). Cheap: names only, no file is read."""
    final = Path(final)
    for names in _FINAL_FILES:
        names = (names,) if isinstance(names, str) else names
        if not any((final / name).is_file() for name in names):
            return names[0]
    return None


def run_stage(stage: str, preset, work_dir, processor, seed: int = 0, init_dir=None, save_steps: int = 200,
              spec: StageSpec = None) -> Path:
    """Run (or resume, or skip if finished) one stage; returns its `final/` folder (a LLaVA checkpoint)."""
    preset = get_preset(preset)
    spec = spec or preset.stages[stage]
    stage_dir = Path(work_dir) / stage
    final = stage_dir / "final"
    _check_recipe(stage_dir, stage_recipe(stage, preset, spec, seed, _init_recipe(init_dir)))
    if final.exists():
        missing = missing_final_file(final)
        if missing is None:
            logger.warning(f"[testbed] stage {stage!r}: reusing {final}")
            return final
        # Only an earlier version's interrupted save leaves this; the Trainer checkpoints are intact, so the stage
        # resumes from its last one (at the last step: nothing to train, the weights are saved again).
        logger.warning(f"[testbed] stage {stage!r}: {final} is incomplete ({missing} is missing: its save was "
                       f"interrupted); removing it and saving the stage again from its last checkpoint")
        shutil.rmtree(final)
    supervise = stage != "vision" and spec.attention_supervision > 0
    if init_dir is None:
        llava = new_model(preset, processor, seed)
    else:
        llava = LlavaForConditionalGeneration.from_pretrained(init_dir)
    n_items = spec.max_steps * spec.batch_size
    if stage == "vision":
        model = PatchProbe(llava)
        dataset = SceneStream(preset, seed, stage, n_items)
        collator = PatchCollator(processor)
    else:
        model = llava
        # Frozen after its own stage, as LLaVA-1.5 keeps CLIP frozen. Measured on tiny, same `full` stage: 0.900
        # test accuracy with the tower frozen, 0.872 with it trained along.
        llava.model.vision_tower.requires_grad_(False)
        dataset = SceneStream(preset, seed, stage, n_items, turns=spec.turns, families=spec.families or TRAIN_FAMILIES,
                              subset=stage in SUBSET_STAGES, curriculum=spec.curriculum,
                              thinned_share=spec.thinned_share, min_objects=spec.min_objects)
        collator = ChatCollator(processor, attention_targets=supervise)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.warning(f"[testbed] stage {stage!r}: {spec.max_steps} steps x batch {spec.batch_size}, "
                   f"{trainable / 1e6:.2f}M trainable parameters, lr {spec.learning_rate}")
    trainer = TestbedTrainer(model=model, args=_training_args(stage_dir, spec, seed, save_steps),
                             train_dataset=dataset, data_collator=collator,
                             attention_supervision=spec.attention_supervision if supervise else 0.0,
                             supervised_layers=preset.supervised_layers)
    resume = get_last_checkpoint(str(stage_dir)) if stage_dir.exists() else None
    _record_threads(stage_dir, stage, resume)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    llava.requires_grad_(True)
    staging = stage_dir / STAGING_FINAL
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
    llava.save_pretrained(staging)
    processor.save_pretrained(staging)
    os.replace(staging, final)  # a rename within one folder: `final/` appears whole or not at all
    logger.warning(f"[testbed] stage {stage!r} done in {time.time() - t0:.0f}s")
    return final


THREADS_FILE = "threads.json"


def _record_threads(stage_dir: Path, stage: str, resume):
    """Record the torch thread count each run of a stage trains on (`threads.json`), and warn when a resumed stage
    runs on another: CPU kernels reduce in a thread-count-dependent order, so a build is bit-reproducible at one
    count only (micro's whole build: 1 vs 2 threads end 1.1e-4 apart, 2 vs 2 equal) -- most likely why a deep build
    resumed after interrupted runs ended at 0.868 test accuracy where an uninterrupted one had 0.899 (its first
    run's count was not recorded)."""
    path = stage_dir / THREADS_FILE
    used = json.loads(path.read_text()) if path.exists() else []
    threads = torch.get_num_threads()
    if resume is not None and used and used[-1] != threads:
        logger.warning(f"[testbed] stage {stage!r} trained on {used[-1]} thread(s) and resumes on {threads}: the "
                       f"result will equal no uninterrupted build. Continue it on {used[-1]} thread(s) as it "
                       f"started (`benchmarks/build_testbed.py --num_threads {used[-1]}`, which sets the count itself; "
                       f"elsewhere OMP_NUM_THREADS={used[-1]} or torch.set_num_threads({used[-1]})), or delete "
                       f"{stage_dir} to retrain it.")
    if not used or used[-1] != threads:
        atomic_write(path, lambda tmp: write_text(tmp, json.dumps(used + [threads])))


def train_testbed_model(preset="tiny", work_dir=None, seed: int = 0, stages=STAGES, save_steps: int = 200,
                        specs=None) -> Path:
    """Run the stages in order, each starting from the previous one's weights; returns the last `final/`."""
    preset = get_preset(preset)
    processor = build_processor(preset)
    previous = None
    for stage in stages:
        previous = run_stage(stage, preset, work_dir, processor, seed=seed, init_dir=previous,
                             save_steps=save_steps, spec=(specs or {}).get(stage))
    return previous
