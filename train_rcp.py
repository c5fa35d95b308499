"""Train RCP plug-ins (pruners + delayed repair adapters) against the frozen full-token teacher.

    python train_rcp.py                                   # the main job: deep testbed, 1/9 budget, evaluate
    python train_rcp.py --max_steps 50 --output_dir runs/quick
    python train_rcp.py --base_model llava-hf/llava-1.5-7b-hf --dataset_name_or_path my_vqa \
        --image_column image --question_column question --answer_column answer \
        --visual_token_budget 64 --output_dir runs/7b     # layers: the paper placement [1,13,25] / [22,29]
    python train_rcp.py --budgets 1/3,2/9,1/9           # one plug-in set per budget
    python train_rcp.py --base_model llava-hf/llava-1.5-7b-hf --llava_json data/llava_instruct.json \
        --image_folder data/images ...
    accelerate launch --multi_gpu --num_processes 2 train_rcp.py ...  # DDP (on CPU add --use_cpu --ddp_backend gloo;
                                                                     # the Trainer handles DeepSpeed/FSDP too)

Only the plug-ins train; the backbone stays frozen, and it is also the teacher: the same model run with
pruning and repair off under `no_grad`. The loss is (RCP.md section 4)

    L = 1.5 * L_task + 3 * L_repair + 200 * L_sparse        (the authors' code; the paper prints lambda_repair 40)

L_task: next-token cross-entropy on the answer tokens and EOS (a token mean; the authors' a per-sample one);
L_repair: W2 distance between diagonal Gaussians whose moments are pooled over every answer position of the batch
(all ranks), at the repair layers, on their repaired output; L_sparse: distance of the batch-mean visual-token
retention (over all decoder layers) from the target, which is cosine-annealed from 1 to `visual_token_budget / N`
over the first 10% of the steps. The Gumbel-Sigmoid temperature goes 1.5 -> 0.2 linearly over 60% of the steps,
stays at 0.2 with noise to 80%, and the last 20% train without noise, on the inference rule. (All as the authors'
code does, but for L_task's mean: authors-code-facts.md.)
The loss terms are the pure functions `task_loss`, `pooled_w2_repair_loss` / `w2_repair_loss` and
`batch_sparsity_loss` / `sparsity_loss` below, the schedules `gumbel_schedule` and `target_retention_at` (the W2 of Eq. 18,
`gaussian_w2`, is shared with the drift evaluation and lives in `rcp_llava.losses`). This file holds the losses,
`RcpTrainingArguments`, `RcpTrainer` and its schedule callbacks, and the main job; the data (`RcpDataCollator`)
is `rcp_llava.data`, the evaluation `rcp_llava.evaluation`, budgets and counts `rcp_llava.schedule`.
"""

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint
from transformers.utils import logging

from configuration_rcp_llava import visual_tokens_per_image
from modeling_rcp_llava import (
    PLUGIN_PREFIX, RCP_CONFIG_NAME, RCP_PLUGINS_NAME, RcpLlavaForConditionalGeneration, atomic_write,
    check_model_source, write_text,
)
from rcp_llava.checkpoints import STAGING_PREFIX, AtomicCheckpointMixin
from rcp_llava.data import (
    RcpDataCollator, check_dataset, dataset_from_messages, default_answer_mask, load_llava_json, read_json_records,
)
from rcp_llava.evaluation import (
    EvalData, evaluate_model, mcnemar, method_model, method_overrides, random_keep_masks_fn,
)
from rcp_llava.losses import LayerOutputs, gaussian_w2
from rcp_llava.testbed import MAIN_PRESET


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------
# Loss terms: pure functions
# ------------------------------------------------------------------------------------------------


def task_loss(logits, labels, num_items=None):
    """Next-token cross-entropy on the answer tokens, averaged over the target tokens (HF's `num_items_in_batch`;
    the authors' code averages per sample, then over samples: equal when every answer has one length).

    logits: (B, T, V); labels: (B, T), -100 where there is no target (shifted inside, as in HF causal LMs).
    num_items: the number of target tokens to normalise by (the whole gradient-accumulation window);
        default: the targets in this batch. Returns a scalar.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    if num_items is None:
        num_items = (shift_labels != -100).sum()
    return total / torch.as_tensor(num_items, device=total.device).clamp_min(1)


def w2_repair_loss(student_layers, teacher_layers, answer_mask, num_samples=None, mean_only=False):
    """Repair loss: per-sample W2 at each designated layer, averaged over layers, summed over samples and
    divided by `num_samples` (default: the samples in this batch).

    student_layers / teacher_layers: sequences of (B, T, D) hidden states (same layouts); answer_mask: (B, T).
    mean_only: match the means only (the paper's "mean-only repair loss" ablation).
    """
    per_layer = [gaussian_w2(s, t, answer_mask, mean_only=mean_only)
                 for s, t in zip(student_layers, teacher_layers, strict=True)]
    per_sample = torch.stack(per_layer, 0).mean(0)  # (B,)
    if num_samples is None:
        num_samples = per_sample.shape[0]
    return per_sample.sum() / num_samples


def pooled_w2_repair_loss(student_layers, teacher_layers, answer_mask, mean_only=False, all_reduce=None):
    """Repair loss as the authors compute it: at each layer, ONE diagonal Gaussian per side whose moments are pooled
    over every answer position of the batch (and of every rank, with `all_reduce`), W2 between them (Eq. 18),
    averaged over the layers.

    student_layers / teacher_layers: sequences of (B, T, D) hidden states (same layouts); answer_mask: (B, T).
    all_reduce: sums a tensor over the ranks (returns the sum, e.g. `torch.distributed.all_reduce` on a copy);
        the moments are then those of the global batch. Only this rank's positions carry gradient: the other ranks'
        sums enter as constants (each rank back-propagates through its own positions; DDP averages the gradients).
    mean_only: match the means only (the paper's "mean-only repair loss" ablation).
    Returns a scalar (0 when no position is marked anywhere).
    """
    w = answer_mask.unsqueeze(-1).float()  # (B, T, 1)

    def pooled_sums(h):
        h = h.float()
        sums = torch.cat([(h * w).sum((0, 1)), (h * h * w).sum((0, 1))])  # (2D,)
        count = w.sum()
        if all_reduce is not None:
            both = torch.cat([sums.detach(), count.detach().view(1)])
            total = all_reduce(both.clone())
            sums = sums + (total[:-1] - both[:-1])  # other ranks' sums as constants
            count = total[-1]
        return sums, count

    per_layer = []
    for s, t in zip(student_layers, teacher_layers, strict=True):
        (s_sums, count), (t_sums, _) = pooled_sums(s), pooled_sums(t)
        dim = s.shape[-1]
        n = count.clamp_min(1.0)
        mu_s, mu_t = s_sums[:dim] / n, t_sums[:dim] / n
        # Eq. (18) as `rcp_llava.losses.diagonal_w2`, written out: that helper's per-row reduction rounds differently
        # from this full `.mean()`, and the committed issue-15 measurements were made with this one.
        loss = ((mu_s - mu_t) ** 2).mean()
        if not mean_only:
            std_s = torch.sqrt((s_sums[dim:] / n - mu_s * mu_s).clamp_min(0.0) + 1e-12)
            std_t = torch.sqrt((t_sums[dim:] / n - mu_t * mu_t).clamp_min(0.0) + 1e-12)
            loss = loss + ((std_s - std_t) ** 2).mean()
        per_layer.append(torch.where(count > 0, loss, torch.zeros_like(loss)))
    return torch.stack(per_layer).mean()


def batch_sparsity_loss(layer_retention, target, has_image=None):
    """L_sparse as the authors compute it: ONE scalar per batch, |mean over the batch of r_bar - r*| (Eqs. 19-21),
    so that single images may keep more or fewer tokens than the budget (the adaptivity the paper claims).

    layer_retention: (B, L) fraction of the visual tokens each decoder layer processes (1 before the first pruner);
    r_bar is its mean over the given layers. Rows without an image are left out (0 if no row has one).
    """
    r_bar = layer_retention.mean(1)  # (B,)
    if has_image is None:
        has_image = torch.ones_like(r_bar, dtype=torch.bool)
    weight = has_image.to(r_bar.dtype)
    mean = (r_bar * weight).sum() / weight.sum().clamp_min(1.0)
    return torch.where(has_image.any(), (mean - target).abs(), torch.zeros_like(mean))


def sparsity_loss(layer_retention, target, has_image=None, num_samples=None):
    """Per-sample variant (`--sparsity_reduction sample`): |r_bar - r*| per sample, summed and divided by
    `num_samples`.

    layer_retention: (B, L) fraction of the visual tokens each decoder layer processes (1 before the first
    pruner); r_bar is its mean over the given layers. Per sample rather than over the batch mean, so that
    gradient accumulation gives exactly the update of the larger batch. Rows without an image count 0.
    """
    r_bar = layer_retention.mean(1)  # (B,)
    per_sample = (r_bar - target).abs()
    if has_image is not None:
        per_sample = torch.where(has_image, per_sample, torch.zeros_like(per_sample))
    if num_samples is None:
        num_samples = per_sample.shape[0]
    return per_sample.sum() / num_samples


def annealed(start, end, progress):
    """Geometric interpolation from `start` to `end` as `progress` goes 0 -> 1 (clamped)."""
    progress = min(max(progress, 0.0), 1.0)
    return start * (end / start) ** progress


def gumbel_schedule(progress, start=1.5, end=0.2, anneal_until=0.6, noise_until=0.8, kind="authors"):
    """(tau, noise) of the training masks at training `progress` in [0, 1].

    "authors": tau falls linearly from `start` to `end` until `anneal_until`, then stays at `end`; logistic noise
    until `noise_until`, none afterwards (the last steps train on the inference rule, Eq. 8).
    "geometric" (this project's earlier schedule): tau geometric from `start` to `end` over all of training, noise
    always on.
    """
    progress = min(max(progress, 0.0), 1.0)
    if kind == "geometric":
        return annealed(start, end, progress), True
    if kind != "authors":
        raise ValueError(f"Unknown Gumbel schedule {kind!r}; use 'authors' or 'geometric'.")
    fraction = 1.0 if anneal_until <= 0 else min(progress / anneal_until, 1.0)
    return start + (end - start) * fraction, progress < noise_until


def target_retention_at(progress, final, warmup=0.1, kind="cosine"):
    """Target retention r* at training `progress`: from 1 to `final` over the first `warmup` of training, by a
    cosine ("cosine", the authors') or a straight line ("linear", this project's earlier schedule)."""
    if kind not in ("cosine", "linear"):
        raise ValueError(f"Unknown sparsity schedule {kind!r}; use 'cosine' or 'linear'.")
    x = 1.0 if warmup <= 0 else min(max(progress / warmup, 0.0), 1.0)
    shape = (1 - math.cos(math.pi * x)) / 2 if kind == "cosine" else x
    return 1.0 + (final - 1.0) * shape


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


@dataclass
class RcpTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the RCP losses and schedules (defaults: the paper's recipe, RCP.md section 5)."""

    lambda_task: float = field(default=1.5, metadata={"help": "Weight of the task (answer CE) loss."})
    lambda_repair: float = field(
        default=3.0, metadata={"help": "Weight of the W2 repair loss (the authors' code: 3.0 on pooled moments; the "
                                       "paper prints 40)."}
    )
    lambda_sparse: float = field(default=200.0, metadata={"help": "Weight of the sparsity loss."})
    repair_loss_layers: list[str] | None = field(
        default=None,
        metadata={"help": "Comma-separated decoder layers whose outputs the repair loss matches to the teacher "
                          "(default: the repair layers, on their repaired output, as the authors do)."},
    )
    repair_loss_mean_only: bool = field(
        default=False, metadata={"help": "Match only the means in the repair loss (ablation)."}
    )
    repair_loss_pooling: str = field(
        default="batch",
        metadata={"help": "'batch': one Gaussian per side pooled over every answer position of the batch and all "
                          "ranks (the authors'); 'sample': one per sample (this project's earlier loss)."},
    )
    sparsity_reduction: str = field(
        default="batch",
        metadata={"help": "'batch': |batch-mean retention - target| (the authors'); 'sample': the mean of per-sample "
                          "distances (pulls every image to the budget; this project's earlier loss)."},
    )
    gumbel_noise: bool = field(
        default=True, metadata={"help": "Logistic noise on the training masks (off: deterministic steps)."}
    )
    gumbel_schedule: str = field(
        default="authors",
        metadata={"help": "'authors': tau linear start -> end over --gumbel_anneal_ratio, noise until "
                          "--gumbel_noise_ratio, then none; 'geometric': tau geometric over all steps, noise always "
                          "(this project's earlier schedule)."},
    )
    gumbel_temperature_start: float = field(default=1.5, metadata={"help": "Gumbel-Sigmoid temperature at step 0."})
    gumbel_temperature_end: float = field(default=0.2, metadata={"help": "Gumbel-Sigmoid temperature at the end."})
    gumbel_anneal_ratio: float = field(default=0.6, metadata={"help": "Fraction of training over which tau anneals."})
    gumbel_noise_ratio: float = field(
        default=0.8, metadata={"help": "Fraction of training with logistic noise; the rest trains on Eq. 8's rule."}
    )
    sparsity_schedule: str = field(
        default="cosine", metadata={"help": "Target-retention warm-up shape: 'cosine' (the authors') or 'linear'."}
    )
    sparsity_warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "Fraction of training over which the target retention anneals from 1 to its target."},
    )
    detach_prior: bool = field(
        default=False,
        metadata={"help": "Stop the gradient through the attention prior (Eq. 4) into earlier pruners' masks."},
    )
    sparsity_layers: str = field(
        default="all",
        metadata={"help": "Decoder layers the retention is averaged over: 'all' (the paper) or 'from_first_pruner' "
                          "(for shallow models, where layers before the first pruner put a floor under the "
                          "all-layer average)."},
    )
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "LR schedule (paper: cosine)."})
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of the LR schedule; unset with cosine_with_min_lr: {\"min_lr_rate\": 0.1} "
                          "(cosine down to 0.1x the peak LR)."},
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (paper: 5e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay of the plug-ins (the authors' 0.01)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "LR warm-up: steps, or a fraction of them in [0, 1) (the authors': 0.1)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw columns: the collator builds the prompts itself."}
    )

    def __post_init__(self):
        super().__post_init__()
        # The min-LR floor belongs to this schedule only: as a plain default it went to every schedule, and
        # `--lr_scheduler_type linear` / `cosine` failed at train() ("unexpected keyword argument 'min_lr_rate'").
        if self.lr_scheduler_kwargs is None and str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)) \
                == "cosine_with_min_lr":
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        self.check_rcp_values()

    def check_rcp_values(self):
        """Refuse values RCP's training cannot use, naming the field. Run when the arguments are built and again for
        each hyperparameter-search trial, whose values the stock Trainer sets with `setattr` (`_hp_search_setup`)."""
        for name in ("lambda_task", "lambda_repair", "lambda_sparse"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        for name in ("gumbel_temperature_start", "gumbel_temperature_end"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
        if self.max_steps == 0:
            raise ValueError("`max_steps` is 0: give a positive number of steps, or -1 to train for "
                             "`num_train_epochs` epochs.")
        if self.max_steps < 0 and not self.num_train_epochs > 0:  # as max_steps 0: no step, untrained plug-ins saved
            raise ValueError(f"`num_train_epochs` is {self.num_train_epochs} and `max_steps` is {self.max_steps} "
                             "(train by epochs): give a positive number of epochs, or a positive `max_steps`.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:  # was torch's "batch_size should be a positive integer", after loading
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate}.")
        for name in ("seed", "data_seed"):  # numpy's seed range; set_seed refused it after the model loaded, unnamed
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2 ** 32:
                raise ValueError(f"`{name}` must be in [0, 2**32 - 1], got {value}.")
        for name in ("sparsity_warmup_ratio", "gumbel_anneal_ratio", "gumbel_noise_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}.")
        for name, allowed in (("repair_loss_pooling", ("batch", "sample")), ("sparsity_reduction", ("batch", "sample")),
                              ("gumbel_schedule", ("authors", "geometric")), ("sparsity_schedule", ("cosine", "linear"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` is {getattr(self, name)!r}; use one of {list(allowed)}.")
        if self.sparsity_layers not in ("all", "from_first_pruner"):
            raise ValueError(
                f"`sparsity_layers` is {self.sparsity_layers!r}; use 'all' or 'from_first_pruner'."
            )
        if self.activation_checkpointing:  # `gradient_checkpointing`, its deprecated alias, is resolved into it
            raise ValueError(
                "`activation_checkpointing=True` (or its old name `gradient_checkpointing`) is not supported: the "
                "student's differentiable key mask would be "
                "lost in the backward recomputation. Only the small plug-ins train; leave it off."
            )
        if self.bf16_full_eval or self.fp16_full_eval:
            flag = "bf16_full_eval" if self.bf16_full_eval else "fp16_full_eval"
            raise ValueError(
                f"`{flag}=True` is not supported: for an evaluation outside training the Trainer casts the whole model, "
                "the float32 plug-ins included, to half precision in place, so the job then saved and evaluated "
                "rounded plug-ins. Evaluate under autocast (`bf16=True` / `fp16=True` cover evaluation too), or load "
                "the backbone in half precision (`dtype=` in `from_pretrained`; the plug-ins still train in float32)."
            )
        if self.label_smoothing_factor:  # the stock Trainer smooths its own loss; RCP's task loss is its own
            raise ValueError(f"`label_smoothing_factor={self.label_smoothing_factor}` is not supported: RCP's task "
                             "loss (`task_loss`) is plain cross-entropy on the answer tokens, and the setting would be "
                             "ignored. Leave it at 0.")
        if self.neftune_noise_alpha:  # the stock Trainer's hook noises the input embeddings of every training forward
            raise ValueError(f"`neftune_noise_alpha={self.neftune_noise_alpha}` is not supported: NEFTune's noise would "
                             "differ between the student and the full-token teacher of the same batch (both run in "
                             "train mode), so the repair loss would chase noise (0.0018 where it is 1e-10 at "
                             "initialisation). Leave it unset.")
        if self.remove_unused_columns:
            # The collator builds the prompts from the raw columns (image, question, answer): the stock default
            # dropped them all and `train()` failed after the model loaded.
            logger.warning("[train_rcp] `remove_unused_columns=True` would drop the image, question and answer columns "
                           "the RCP collator reads: set to False.")
            self.remove_unused_columns = False
        _parse_int_list(self.repair_loss_layers, "repair_loss_layers")  # refused now, not at the first step

    @property
    def parsed_repair_loss_layers(self):
        """`repair_loss_layers` as ints (None: the repair layers), read when used: a hyperparameter search sets the
        field on the arguments after they were built."""
        return _parse_int_list(self.repair_loss_layers, "repair_loss_layers")


def rcp_training_arguments(args):
    """`args` as `RcpTrainingArguments`, as the stock Trainer takes them: None gives the defaults (in
    `trainer_output`, the stock default folder), and a plain `TrainingArguments` keeps every value it holds, with
    RCP's own fields (losses, schedules) at their defaults, except `remove_unused_columns`, set to False: the collator
    builds the prompts from the raw columns (image, question, answer), which the stock default drops."""
    if args is None:
        return RcpTrainingArguments(output_dir="trainer_output")
    if isinstance(args, RcpTrainingArguments):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"`args` must be `RcpTrainingArguments` (or `TrainingArguments`), got {type(args).__name__}.")
    values = {f.name: copy.deepcopy(getattr(args, f.name)) for f in dataclasses.fields(TrainingArguments) if f.init}
    # A subclass's own fields (e.g. `Seq2SeqTrainingArguments.predict_with_generate`) have no place in
    # `RcpTrainingArguments`: name the ones set away from their defaults rather than drop them unannounced.
    dropped = [f.name for f in dataclasses.fields(args) if f.init and f.name not in values
               and getattr(args, f.name) != _field_default(f)]
    if dropped:
        logger.warning(f"[train_rcp] `args` is a {type(args).__name__}: its own fields {', '.join(dropped)} are not "
                       "`RcpTrainingArguments` fields and are ignored.")
    return RcpTrainingArguments(**values)


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def answer_metrics(predictions, label_ids, tokenizer):
    """Teacher-forced answer metrics of an evaluation pass (the Trainer's `compute_metrics`).

    predictions: (N, T) token ids the student predicts at each position (argmax of its logits; padding -100);
    label_ids: (N, T) the labels (-100 outside the answers). The prediction at position t is for token t + 1.
    Returns `answer_exact_match` (the shipped `exact_match` metric on the decoded answers: every answer token of a
    sample right) and `answer_token_accuracy` (over all answer tokens).
    """
    import numpy as np

    from rcp_llava.metrics import load_metric

    predictions, label_ids = np.asarray(predictions), np.asarray(label_ids)
    if predictions.shape != label_ids.shape:
        raise ValueError(f"`predictions` {predictions.shape} and `label_ids` {label_ids.shape} must be (N, T) token "
                         "ids of the same shape (argmax the logits first: `preprocess_logits_for_metrics`).")
    predicted, references, right, total = [], [], 0, 0
    for pred, labels in zip(predictions, label_ids):
        answer = labels[1:] != -100  # positions whose next token is an answer token
        got, want = pred[:-1][answer], labels[1:][answer]
        right += int((got == want).sum())
        total += int(answer.sum())
        # special tokens kept: the answers end in EOS, and skipping them scored "red <pad>" as "red </s>"
        predicted.append(tokenizer.decode([int(t) for t in got if t >= 0]).strip())
        references.append(tokenizer.decode([int(t) for t in want]).strip())
    exact = load_metric("exact_match").compute(predictions=predicted,
                                               references=[[r] for r in references])["exact_match"]
    return {"answer_exact_match": float(exact), "answer_token_accuracy": right / max(total, 1)}


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics`: keep (B, T) token ids, not (B, T, vocab) logits, across the evaluation."""
    return logits.argmax(-1)


def _parse_int_list(value, name):
    """`--layers 1,13,25`, `--layers 1 13 25` (a list of strings) or a list of ints -> [1, 13, 25]; None / '' (the
    flag's default, or given empty on the command line) -> None; an empty list (set in code) -> []."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        value = ",".join(str(v) for v in value)
        if not value.strip(", "):
            return None
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be integers, e.g. '1,13,25' or '1 13 25', got {value!r}.") from None


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


# The loss parts `compute_loss` records for the logs. A training micro-batch's task / repair / sparsity part is
# already its share of the gradient-accumulation window (normalised by the window's totals), so the window's part is
# their SUM; everything else (retention, schedule values) is a per-batch value, averaged.
WINDOW_SUMMED_PARTS = ("task_loss", "repair_loss", "sparsity_loss")


def logged_train_parts(records):
    """The training log's loss parts from per-micro-batch `records` [(optimizer step, {part: value})]: within one
    step the window-summed parts add up and the rest average; the logged value is the mean over the steps, as the
    Trainer's `loss` is (with one micro-batch per step: the plain mean)."""
    steps = {}
    for step, values in records:
        steps.setdefault(step, []).append(values)
    per_step = []
    for batches in steps.values():
        per_step.append({key: (sum(b[key] for b in batches) if key in WINDOW_SUMMED_PARTS
                               else sum(b[key] for b in batches) / len(batches)) for key in batches[0]})
    return {key: sum(v[key] for v in per_step) / len(per_step) for key in per_step[0]} if per_step else {}


def logged_eval_parts(records):
    """The evaluation's loss parts from per-batch `records` [(batch size, {part: value})]: means weighted by the
    batch sizes, as the Trainer's `eval_loss` is (it repeats each batch's loss by the nominal batch size and cuts
    the whole to the number of samples, so a short last batch counts by its size: measured, batches of 3 and 1)."""
    total = sum(size for size, _ in records)
    if not total:
        return {}
    return {key: sum(size * values[key] for size, values in records) / total for key in records[0][1]}


@contextlib.contextmanager
def backbone_dropout_off(model):
    """The frozen backbone's modules in eval mode for one loss evaluation; the plug-ins and the two models holding
    them keep their mode (Gumbel noise, query and pruner dropout). In train mode a backbone with dropout (attention,
    hidden, LoRA's) drew other masks in the teacher's pass than in the student's, so the repair loss chased that
    noise (1.3e-10 at initialisation without dropout, 8.6e-7 with attention dropout 0.1), as NEFTune's noise would.
    The teacher is the same model with its plug-ins disabled, and nothing of the backbone trains."""
    plugins = model.model.rcp_plugins
    holders = {id(model), id(model.model), *(id(m) for m in plugins.modules())}
    switched = [m for m in model.modules() if m.training and id(m) not in holders]
    for module in switched:
        module.training = False
    try:
        yield
    finally:
        for module in switched:
            module.training = True


def freeze_backbone(model):
    """Only the plug-ins (parameters under `PLUGIN_PREFIX`) train: the backbone is frozen. Plug-ins the user froze
    while leaving others trainable (the pruners, to train the repair adapters alone) stay frozen, as the stock
    Trainer and PEFT leave a user's `requires_grad` alone; all frozen (a model loaded for inference,
    `load_adapter(..., is_trainable=False)`) or none: all train."""
    plugins = {name: param for name, param in model.named_parameters() if name.startswith(PLUGIN_PREFIX)}
    frozen = {name for name, param in plugins.items() if not param.requires_grad}
    chosen = 0 < len(frozen) < len(plugins)  # the user's own split
    for name, param in model.named_parameters():
        param.requires_grad_(name in plugins and (not chosen or name not in frozen))
    if chosen:
        groups = sorted({".".join(name[len(PLUGIN_PREFIX):].split(".")[:2]) for name in frozen})
        logger.warning(f"[train_rcp] {len(frozen)} of {len(plugins)} plug-in tensors were frozen and stay frozen "
                       f"({', '.join(groups[:6])}{', ...' if len(groups) > 6 else ''}); the others train.")
    elif frozen:
        logger.warning("[train_rcp] every plug-in tensor was frozen (a model loaded for inference): they train.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "The model has no plug-in parameters to train: use `pruning_method='rcp'` with at least one pruning "
            "layer."
        )


def load_splits(dataset_path, train_split="train"):
    """The splits of `--dataset_name_or_path`: a `save_to_disk` folder (a `DatasetDict`, or one `Dataset` as the
    `train_split`), a local file or folder `datasets.load_dataset` reads (parquet / JSON / CSV / imagefolder, as on
    the Hub), or a Hub id. A saved `Dataset` used to be searched row by row for a split and every row (images
    decoded) printed in the error; a Hub-style folder was refused as 'neither a Dataset nor a DatasetDict directory'."""
    from datasets import Dataset, load_dataset, load_from_disk

    if os.path.isdir(dataset_path) and any(os.path.isfile(os.path.join(dataset_path, name))
                                           for name in ("dataset_dict.json", "state.json")):
        splits = load_from_disk(dataset_path)
        return {train_split: splits} if isinstance(splits, Dataset) else splits
    if os.path.isfile(dataset_path):
        if dataset_path.lower().endswith((".json", ".jsonl", ".ndjson")) and _is_llava_json(dataset_path):
            raise ValueError(f"--dataset_name_or_path {dataset_path!r} is a LLaVA-style JSON (records with "
                             "'conversations'): pass it as --llava_json (with --image_folder for its image paths).")
        builder, options = _file_builder(dataset_path)
        return load_dataset(builder, data_files=dataset_path, **options)
    return load_dataset(dataset_path)


# A data file's loader by its (lower-cased) extension, as `datasets` maps a Hub folder's files; others name their
# builder (parquet, arrow, ...). The file alone is read: its folder's other files (a README's front matter, a .py)
# are none of the data's business.
_FILE_BUILDERS = {"json": ("json", {}), "jsonl": ("json", {}), "ndjson": ("json", {}), "csv": ("csv", {}),
                  "tsv": ("csv", {"sep": "\t"}), "txt": ("text", {})}
_COMPRESSIONS = ("gz", "bz2", "xz", "zst", "lz4")  # `datasets` reads these through, by the inner extension


def _file_builder(path):
    """(builder, options) that `datasets.load_dataset` reads the file at `path` with: a .tsv was read as a one-column
    CSV (no tab separator) and a .ndjson / compressed .jsonl.gz went to the Hub as builders 'ndjson' / 'gz'."""
    parts = os.path.basename(path).lower().split(".")[1:]
    if parts and parts[-1] in _COMPRESSIONS:
        parts = parts[:-1]
    extension = parts[-1] if parts else ""
    if extension in _FILE_BUILDERS:
        return _FILE_BUILDERS[extension]
    builder = _datasets_builder_for(extension)
    if builder is None:  # `load_dataset` took the extension for a Hub dataset's name (or failed on '' deep inside)
        what = f"the extension {'.' + extension!r}" if extension else "no extension"
        raise ValueError(f"--dataset_name_or_path {path!r} is a file with {what}, which no `datasets` builder reads: "
                         "name it by its format (.json, .jsonl, .csv, .tsv, .txt, .parquet, .arrow), or pass its "
                         "folder or a `save_to_disk` folder.")
    return builder, {}


def _datasets_builder_for(extension):
    """The packaged builder `datasets` reads a data file of this (lower-case) extension with, as it maps a folder's
    files (parquet, arrow, ...); None for an extension it does not read."""
    try:  # `datasets`' own table; not public API, so an unknown layout falls back to the builder names
        from datasets.packaged_modules import _EXTENSION_TO_MODULE
    except ImportError:
        return extension if extension in ("parquet", "arrow") else None
    module = _EXTENSION_TO_MODULE.get("." + extension)
    return module[0] if module else None


def _rcp_columns(split, job, name):
    """A split in TRL's conversational vision format (`messages` + `images`, no question column) as RCP's columns
    (`rcp_llava.data.dataset_from_messages`); any other split as it is."""
    columns = getattr(split, "column_names", None) or []
    if {"messages", "images"} <= set(columns) and job.question_column not in columns:
        logger.warning(f"[train_rcp] the {name!r} split is in TRL's messages + images format: read as one "
                       "conversation per row, every assistant turn an answer.")
        return dataset_from_messages(split, job.image_column, job.question_column, job.answer_column)
    return split


def _is_llava_json(path):
    """Whether the JSON (or JSON Lines) file at `path` holds records whose first has 'conversations' (read whole:
    small files only reach here; a large one is read by `load_dataset` next anyway)."""
    try:
        records = read_json_records(path)
    except (ValueError, OSError):  # not JSON at all: `load_dataset` names it
        return False
    return isinstance(records, list) and bool(records) and isinstance(records[0], dict) \
        and "conversations" in records[0]


def upcast_plugins(model):
    """Plug-ins in float16 / bfloat16 (a half-precision checkpoint: `llava-hf/llava-1.5-7b-hf` is float16, and
    `from_pretrained` keeps it) train in float32, as PEFT's adapters do (`autocast_adapter_dtype`): a 5e-5 step is
    below the spacing of bf16 at the pruner bias's 2.0 (1.6e-2), so most updates rounded away. The backbone keeps
    its dtype; each plug-in computes in its own and casts at its boundaries."""
    plugins = model.model.rcp_plugins
    half = {p.dtype for p in plugins.parameters()} & {torch.float16, torch.bfloat16}
    if half:
        plugins.float()
        logger.warning(f"[train_rcp] the plug-ins train in float32 on a {model.dtype} backbone (they were "
                       f"{'/'.join(sorted(str(d).replace('torch.', '') for d in half))}, in which most small updates "
                       "round away); `save_plugins` writes them in float32.")


class RcpTrainer(AtomicCheckpointMixin, Trainer):
    """Trains the plug-ins of an `RcpLlavaForConditionalGeneration` with the RCP loss.

    The student runs in the differentiable "mask" layout (tokens stay in place, so its hidden states line up
    with the teacher's, in training and in evaluation alike); the teacher is the same model with its plug-ins
    disabled, under `no_grad`. Checkpoints hold only the plug-ins (+ optimizer, scheduler and RNG states).
    """

    # compute_loss normalises every term by the gradient-accumulation window's totals itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, **kwargs):
        if model is None and kwargs.get("model_init") is None:
            raise ValueError("`RcpTrainer` needs an `RcpLlavaForConditionalGeneration` model (`model=`, or "
                             "`model_init=` returning one).")
        if kwargs.get("compute_loss_func") is not None:  # the stock Trainer's hook: `compute_loss` below is RCP's
            raise ValueError("`compute_loss_func` is not supported: RcpTrainer's loss is RCP's (task + repair + "
                             "sparsity, `compute_loss`); weight its terms with `lambda_task` / `lambda_repair` / "
                             "`lambda_sparse`, or subclass RcpTrainer and override `compute_loss`.")
        args = rcp_training_arguments(args)
        self._rcp_args = args  # for `call_model_init`, which the stock __init__ calls before it sets `self.args`
        if model is not None:
            self._prepare_model(model)
        if kwargs.get("data_collator") is None:
            # The RCP loss needs the collator's labels and masks; the stock default (`default_data_collator`) failed
            # at the first batch ("Could not infer dtype of PngImageFile"). TRL builds it from the processor too.
            processor = kwargs.get("processing_class")
            if processor is None or getattr(processor, "tokenizer", None) is None:
                raise ValueError("`RcpTrainer` needs `data_collator=RcpDataCollator(processor)` (from "
                                 "`rcp_llava.data`), or `processing_class=processor` to build it from.")
            kwargs["data_collator"] = RcpDataCollator(processor)
        super().__init__(model=model, args=args, **kwargs)
        # Runtime training state lives here, never in `model.config` (which is what the user chose, and what
        # `save_pretrained` / `save_plugins` write): the callbacks anneal it, `compute_loss` passes it on.
        self.gumbel_temperature = args.gumbel_temperature_start
        self.gumbel_noise = args.gumbel_noise
        self.target_retention = 1.0
        self.grad_norms = []  # the plug-ins' gradient norm at every optimizer step, before any clipping
        self._window_samples = None
        self._train_parts = []  # (optimizer step, {part: value}) per micro-batch since the last training log
        self._eval_parts = []  # (batch size, {part: value}) per batch of the evaluation running now
        self.add_callback(GumbelTemperatureCallback(self))
        self.add_callback(TargetRetentionCallback(self))

    # -- loss -----------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_samples = sum(int(b["input_ids"].shape[0]) for b in batch_samples)
        return batch_samples, num_items

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.grad_norms.append(float(norm))
        return norm

    # -- training: the gradient-norm record across a resume -----------------------------------------

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, with `grad_norms` covering every optimizer step of the run, not only this call's: each
        checkpoint holds the norms up to its step (`GRAD_NORMS_NAME`) and a resume starts from them. A checkpoint at
        or past `max_steps` ends the run: its plug-ins (or the best checkpoint's, with `load_best_model_at_end`) are
        loaded and nothing trains (`Trainer.train` would train one more batch when the run ended mid-epoch)."""
        self._train_parts = []
        if self.model is not None:  # no budget, no sparsity target: refused before the optimizer and the first batch
            target_retention(self.accelerator.unwrap_model(self.model).config)
        if resume_from_checkpoint is True:  # resolved here, as `Trainer.train` does, to read its records first
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if not resume_from_checkpoint:
            self.grad_norms = []
            return super().train(resume_from_checkpoint, **kwargs)
        state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
        self.grad_norms = checkpoint_grad_norms(resume_from_checkpoint, state.global_step)
        total = self._run_steps(state)
        if not 0 < total <= state.global_step:
            return super().train(resume_from_checkpoint, **kwargs)
        logger.warning(f"[train_rcp] {resume_from_checkpoint} is at step {state.global_step} of the run's {total} "
                       "(--max_steps, or --num_train_epochs' steps): the run is finished, nothing is trained; its "
                       "plug-ins are loaded.")
        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = state
        best = state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and os.path.isdir(best):  # as `Trainer.train` ends
            self._load_best_model()
        return TrainOutput(state.global_step, 0.0, {})  # `Trainer.train`'s loss when no step ran

    def _run_steps(self, state):
        """The run's optimizer steps as `Trainer.train` sets them when resuming from `state`: --max_steps, or, for a
        run by epochs, the steps of --num_train_epochs on this data (a run that ended mid-epoch, 1.5 epochs, trained
        one batch more when resumed: only --max_steps was read), at the batch size the checkpoint ran with under
        `auto_find_batch_size`, which `Trainer.train` restores first (a halved batch has twice the steps)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        if self.args.auto_find_batch_size and state.train_batch_size is not None:
            self._train_batch_size = state.train_batch_size  # as `Trainer.train` sets it on this resume
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def _save_checkpoint_extras(self, folder):
        _write_json(os.path.join(folder, GRAD_NORMS_NAME), self.grad_norms)

    def repair_layers_for_loss(self, config):
        layers = self.args.parsed_repair_loss_layers
        if layers is None:
            layers = list(config.repair_layers) or [config.text_config.num_hidden_layers - 1]
        bad = [i for i in layers if not 0 <= i < config.text_config.num_hidden_layers]
        if bad:
            raise ValueError(f"`repair_loss_layers` contains {bad}, outside the text model's layers.")
        return layers

    def _prepare_model(self, model):
        """Check the model and set it up for RCP training: only the plug-ins train, in float32, and the prior is
        detached or not as `args.detach_prior` says."""
        if callable(getattr(type(model), "get_base_model", None)):  # a PEFT `PeftModel`
            raise ValueError(
                f"`RcpTrainer` trains RCP's plug-ins on a frozen backbone, but got a PEFT-wrapped model "
                f"({type(model).__name__}), whose parameter names it cannot read. Pass the RCP model itself: "
                "`peft_model.merge_and_unload()` (LoRA merged into the backbone; `get_base_model()` would keep PEFT's "
                "wrappers, which this trainer freezes)."
            )
        if not hasattr(model, "plugin_state_dict"):
            source = " from `model_init`" if getattr(self, "model_init", None) is not None else ""
            raise ValueError(f"`RcpTrainer` needs an `RcpLlavaForConditionalGeneration` model, got "
                             f"{type(model).__name__}{source}.")
        # PEFT wrappers inside the plug-ins (`add_adapter` with all-linear LoRA): refused now, not at the first save.
        model._check_plugins_unwrapped("RcpTrainer")
        freeze_backbone(model)
        upcast_plugins(model)
        model.model.detach_prior = self._rcp_args.detach_prior  # a switch of the model, like `train()`
        return model

    def _hp_search_setup(self, trial):
        """The stock setup of a hyperparameter-search trial: its values reach `self.args` here, after `train()` built
        the trial's model (`call_model_init`), so the model's switch is set again from them (it kept the previous
        trial's `detach_prior`)."""
        super()._hp_search_setup(trial)
        if trial is not None:
            self.args.check_rcp_values()  # a trial's `lambda_repair=-1` trained on a negative loss term
            self.accelerator.unwrap_model(self.model).model.detach_prior = self.args.detach_prior

    def call_model_init(self, trial=None):
        """`model_init`'s fresh model (the stock Trainer calls it in `__init__` and at every `train()`, e.g. for
        `hyperparameter_search`), set up as a model given to `__init__` is: without it the backbone trained."""
        return self._prepare_model(super().call_model_init(trial))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        config = unwrapped.config
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        answer_mask = inputs.get("answer_mask")
        if answer_mask is None:
            answer_mask = default_answer_mask(labels)
        loss_layers = self.repair_layers_for_loss(config)

        training = model.training
        if training:
            tau, noise, target = self.gumbel_temperature, self.gumbel_noise, self.target_retention
        else:  # evaluation scores every checkpoint on the same objective: the one the run ends at
            tau, noise, target = self.final_schedule(config)
        layer_outputs = LayerOutputs(unwrapped)  # layer i's (repaired) output, read right after each forward
        with backbone_dropout_off(unwrapped), layer_outputs, torch.no_grad(), unwrapped.plugins_disabled():
            teacher = model(**model_inputs, output_hidden_states=True, use_cache=False)
            teacher_states = layer_outputs.of(teacher, loss_layers)
        # The student always runs in the differentiable layout, in evaluation too: its hidden states must line up
        # with the teacher's (physical discard would move them).
        # Without the collator's masks the model derives the question (pruners) and answer (adapters) positions from
        # `labels`, as for any caller: given none it read the answer as question text and repaired only the last
        # position. With both masks the labels stay out (the model's own loss would go unused).
        masks_given = inputs.get("question_mask") is not None and inputs.get("answer_mask") is not None
        with backbone_dropout_off(unwrapped), layer_outputs, unwrapped.pruning_layout("mask"):
            student = model(**model_inputs, labels=None if masks_given else labels, output_hidden_states=True,
                            use_cache=False, gumbel_temperature=tau, gumbel_noise=noise)
            student_states = layer_outputs.of(student, loss_layers)

        num_samples = self._window_samples if (training and self._window_samples) else labels.shape[0]
        num_items = num_items_in_batch if training else None
        # DDP averages the ranks' gradients. Two terms are normalised over every rank: the task loss by all ranks'
        # answer tokens (`num_items_in_batch` under `average_tokens_across_devices`) and the pooled repair loss by all
        # ranks' positions; each rank's gradient of them is its share of the global one, so the average would be 1/W
        # of it (W ranks: their weights against the sparsity term fell by W). Scaled by W, as `Trainer.compute_loss`
        # scales its loss.
        ranks = self.accelerator.num_processes if training else 1
        global_tokens = args.average_tokens_across_devices and args.world_size > 1 and num_items is not None
        l_task = task_loss(student.logits, labels, num_items) * (ranks if global_tokens else 1)
        # A micro-batch's share of the window: its samples / the window's (gradient accumulation sums the shares).
        share = labels.shape[0] / num_samples
        if args.repair_loss_pooling == "batch":
            all_reduce = _all_reduce_sum(args)
            l_repair = share * pooled_w2_repair_loss(student_states, teacher_states, answer_mask,
                                                     mean_only=args.repair_loss_mean_only, all_reduce=all_reduce)
            if all_reduce is not None and ranks > 1:  # the same global value on every rank: scale its gradient only
                l_repair = l_repair * ranks - l_repair.detach() * (ranks - 1)
        else:
            l_repair = w2_repair_loss(student_states, teacher_states, answer_mask, num_samples,
                                      mean_only=args.repair_loss_mean_only)
        retention = student.layer_retention
        has_image = student.has_image
        if retention is None:  # no image in the batch: nothing was pruned
            retention = torch.ones(labels.shape[0], config.text_config.num_hidden_layers, device=labels.device)
            has_image = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        if args.sparsity_layers == "from_first_pruner":
            retention = retention[:, config.pruning_layers[0]:]
        if args.sparsity_reduction == "batch":
            l_sparse = share * batch_sparsity_loss(retention, target, has_image)
        else:
            l_sparse = sparsity_loss(retention, target, has_image, num_samples)
        loss = args.lambda_task * l_task + args.lambda_repair * l_repair + args.lambda_sparse * l_sparse
        if training and torch.is_grad_enabled() and not loss.requires_grad:
            # No image in the batch (a user's collator, one DDP rank's or one micro-batch's share): no plug-in ran,
            # and backward failed on a loss without a graph. A zero tied to the plug-ins gives them zero gradients,
            # on every rank alike.
            loss = loss + 0.0 * sum(p.sum() for p in unwrapped.parameters() if p.requires_grad)

        parts = {
            "task_loss": l_task, "repair_loss": l_repair, "sparsity_loss": l_sparse,
            "retention": retention[has_image].mean() if has_image.any() else 1.0,
            "retention_all_layers": (student.layer_retention[has_image].mean()
                                     if student.layer_retention is not None and has_image.any() else 1.0),
            "target_retention": target, "gumbel_temperature": tau,
            "gumbel_noise": noise and training,  # the pruners draw noise in training only
        }
        parts = {k: float(v.detach().float()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}
        if training:
            self._train_parts.append((self.state.global_step, parts))
        else:
            self._eval_parts.append((labels.shape[0], parts))
        return (loss, student) if return_outputs else loss

    def final_schedule(self, config):
        """`(tau, noise, target retention)` at the end of training: what evaluation uses, so that `eval_loss` is one
        objective for every checkpoint, a resumed or a fresh trainer alike (during the sparsity warm-up the target
        is near 1, and `metric_for_best_model="eval_loss"` picked warm-up checkpoints)."""
        args = self.args
        tau, _ = gumbel_schedule(1.0, args.gumbel_temperature_start, args.gumbel_temperature_end,
                                 args.gumbel_anneal_ratio, args.gumbel_noise_ratio, args.gumbel_schedule)
        if config.visual_token_budget is None:  # no target: evaluation reports the loss without one, as before
            return tau, False, 1.0
        target = target_retention_at(1.0, target_retention(config), args.sparsity_warmup_ratio, args.sparsity_schedule)
        return tau, False, target

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the training loss (the student in the mask layout against the teacher) and the student's
        logits, with the labels for `compute_metrics` (the stock step would return every output field, hidden states
        and keep masks included, as "logits")."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, student = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), student.logits.detach(), inputs["labels"]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """`Trainer.evaluation_loop` (behind `evaluate` and `predict`), with this pass's loss parts in its metrics
        under `metric_key_prefix` (`eval_task_loss`; `test_...` from `predict`; `eval_<name>_...` per dataset of a
        dict)."""
        self._eval_parts = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        # Every rank's batches, as `eval_loss` is over every rank's samples: each rank's sample-weighted sums added up.
        records = self._eval_parts
        if records and self.accelerator.num_processes > 1:
            total = sum(size for size, _ in records)
            sums = self._ranks_sum({key: sum(size * values[key] for size, values in records) for key in records[0][1]},
                                   total)
            samples = sums.pop("_samples")
            records = [(samples, {key: value / samples for key, value in sums.items()})]
        for key, value in logged_eval_parts(records).items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        self._eval_parts = []
        return output

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log (not evaluation's metrics, nor the summary `train` ends with)
            parts = logged_train_parts(self._train_parts)
            if parts and self.accelerator.num_processes > 1:
                # The logged `loss` is the ranks' mean (`Trainer._nested_gather`), so its parts are too: with rank
                # 0's alone, the parts did not add up to the loss. Every rank logs at the same step.
                sums = self._ranks_sum(parts, 1)
                processes = sums.pop("_samples")
                parts = {key: value / processes for key, value in sums.items()}
            logs.update(parts)
            self._train_parts = []
        super().log(logs, *args, **kwargs)

    def _ranks_sum(self, values, samples):
        """{key: the sum over every process of `values[key]`, "_samples": the sum of `samples`}: one all-reduce, in
        float64 (a collective: every rank calls it at the same point)."""
        keys = sorted(values)
        local = torch.tensor([values[k] for k in keys] + [samples], dtype=torch.float64, device=self.args.device)
        summed = self.accelerator.reduce(local, reduction="sum").tolist()
        return {**dict(zip(keys, summed[:-1])), "_samples": summed[-1]}

    # -- plug-in-only checkpoints ------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None):
        """What `Trainer._save` writes, with the plug-ins (`save_plugins`) for the model: the processor given as
        `processing_class` and the training arguments beside them; the main process only."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_plugins(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _push_from_checkpoint(self, checkpoint_folder):
        """`Trainer._push_from_checkpoint` (`push_to_hub` while training) uploads the output folder after copying the
        stock model files into it from the checkpoint, so the plug-ins never reached the repo: copy them too (the
        weights first, as `save_plugins` writes them), each atomically."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            for name in (RCP_PLUGINS_NAME, RCP_CONFIG_NAME):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    atomic_write(os.path.join(self.args.output_dir, name),
                                 lambda tmp, source=source: shutil.copyfile(source, tmp))
        return super()._push_from_checkpoint(checkpoint_folder)

    # Resuming needs every plug-in tensor: the model's one loader, strict (it fails before copying anything).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.accelerator.unwrap_model(model or self.model).load_plugins(resume_from_checkpoint, strict=True)

    def _load_best_model(self):
        self.accelerator.unwrap_model(self.model).load_plugins(self.state.best_model_checkpoint, strict=True)


def _all_reduce_sum(args):
    """A function summing a tensor over the ranks (None on one process): the pooled repair loss's global moments."""
    if args.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None

    def reduce(tensor):
        torch.distributed.all_reduce(tensor)
        return tensor

    return reduce


GRAD_NORMS_NAME = "grad_norms.json"  # in every checkpoint-N (the norms of steps 1..N) and in the job's folder


def checkpoint_grad_norms(checkpoint, steps):
    """The per-step gradient norms recorded in `checkpoint` (a list of `steps` floats). A checkpoint written before
    they were kept there has none: its steps are recorded as None (unknown), with a warning, rather than left out."""
    path = os.path.join(checkpoint, GRAD_NORMS_NAME)
    if not os.path.isfile(path):
        logger.warning(f"[train_rcp] {checkpoint} holds no {GRAD_NORMS_NAME} (it was written before checkpoints kept "
                       f"the gradient norms): steps 1-{steps} are recorded as null.")
        return [None] * steps
    fix = "Delete the file to resume with those steps recorded as null."
    try:
        with open(path, encoding="utf-8") as f:
            norms = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {fix}") from None
    if not isinstance(norms, list) or len(norms) != steps:
        got = f"{len(norms)} values" if isinstance(norms, list) else type(norms).__name__
        raise ValueError(f"{path} must list the gradient norms of the checkpoint's {steps} steps, got {got}. {fix}")
    return norms


def grad_norm_summary(norms):
    """Median / p99 / max of per-step gradient norms (and the max / median ratio), or None without steps. Steps
    whose norm is unknown (None: resumed from a checkpoint that did not record them) are counted apart."""
    unrecorded = sum(n is None for n in norms)
    norms = [n for n in norms if n is not None]
    if not norms:
        return None
    ordered = sorted(norms)

    def quantile(q):
        return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]

    median = quantile(0.5)
    summary = {"steps": len(norms), "median": median, "p99": quantile(0.99), "max": ordered[-1],
               "max_over_median": ordered[-1] / median if median > 0 else None}
    if unrecorded:
        summary["unrecorded_steps"] = unrecorded
    return summary


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


class GumbelTemperatureCallback(TrainerCallback):
    """Sets the trainer's Gumbel-Sigmoid temperature and noise switch (`trainer.gumbel_temperature`,
    `trainer.gumbel_noise`, Eq. 6) for each step from `gumbel_schedule`. The student forward gets them as
    arguments; `config.gumbel_temperature` stays the user's value."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps:
            tau, noise = gumbel_schedule(state.global_step / state.max_steps, args.gumbel_temperature_start,
                                         args.gumbel_temperature_end, args.gumbel_anneal_ratio, args.gumbel_noise_ratio,
                                         args.gumbel_schedule)
            self.trainer.gumbel_temperature = tau
            self.trainer.gumbel_noise = noise and args.gumbel_noise


class TargetRetentionCallback(TrainerCallback):
    """Anneals the trainer's target retention from 1 to `visual_token_budget / N` over the warm-up fraction
    (`target_retention_at`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        config = self.trainer.accelerator.unwrap_model(self.trainer.model).config
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        self.trainer.target_retention = target_retention_at(progress, target_retention(config),
                                                            args.sparsity_warmup_ratio, args.sparsity_schedule)


def target_retention(config):
    if config.visual_token_budget is None:
        raise ValueError("Training needs `visual_token_budget` (the target average visual tokens per layer), and the "
                         "model's config has none: set `model.config.visual_token_budget` (e.g. 64 of 576; "
                         "train_rcp.py: --visual_token_budget or --budgets).")
    return config.visual_token_budget / config.num_visual_tokens


# ------------------------------------------------------------------------------------------------
# The main job
# ------------------------------------------------------------------------------------------------


MAIN_TESTBED = MAIN_PRESET  # the main job's testbed (issue 16: `deep`); `tiny` (4 layers) stays a flag away
# minutes a first build takes on 2 CPU cores (measured: benchmarks/results/testbed_PRESET.md)
BUILD_MINUTES = {"tiny": 40, "deep": 50}


@dataclass
class RcpJobArguments:
    """Model, data and pruning configuration of the main job (defaults: the deep testbed at the 1/9 budget)."""

    base_model: str | None = field(
        default=None, metadata={"help": "A stock LLaVA (or RCP) checkpoint: Hub id or folder. Default: the "
                                        "--testbed_preset testbed, built on first use."}
    )
    dataset_name_or_path: str | None = field(
        default=None, metadata={"help": "A Hub dataset id, a `save_to_disk` folder, or a data folder or file "
                                          "`datasets.load_dataset` reads (parquet, JSON lines, CSV, TSV, "
                                          "imagefolder). Default: the testbed's."}
    )
    train_split: str = field(default="train", metadata={"help": "Split the plug-ins train on."})
    eval_split: str | None = field(
        default="validation",
        metadata={"help": "Split of the Trainer's evaluation (--eval_strategy, --do_eval, --load_best_model_at_end: "
                          "loss + teacher-forced answer exact match) and of --calibrate_retention."})
    test_split: str | None = field(
        default="test", metadata={"help": "Split of the final full-vs-pruned evaluation written to metrics.json "
                                          "(skipped when the dataset has no such split)."})
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the image."})
    question_column: str = field(default="question", metadata={"help": "Dataset column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Dataset column holding the answer."})
    llava_json: str | None = field(default=None, metadata={"help": "A LLaVA-style JSON instead of a dataset."})
    image_folder: str | None = field(default=None, metadata={
        "help": "Folder that relative image paths (of --llava_json or of a dataset's image column) are read from."})
    llava_turns: str = field(default="conversation", metadata={
        "help": "How --llava_json's multi-turn records train: 'conversation' (one sequence per record, every answer "
                "labelled, as LLaVA's preprocess_v1) or 'pairs' (each question/answer pair its own example)."})
    max_length: int | None = field(default=None, metadata={"help": "Refuse examples longer than this."})
    pruning_layers: list[str] | None = field(
        default=None, metadata={"help": "e.g. '1,13,25' (0-based). Default: the paper's placement for the model's "
                                        "depth and the budget (`RcpLlavaConfig.paper_placement`); the testbed's own."}
    )
    repair_layers: list[str] | None = field(
        default=None, metadata={"help": "e.g. '22,29' (0-based). Default: the paper's placement (see above)."}
    )
    visual_token_budget: float | None = field(
        default=None, metadata={"help": "Target average visual tokens per decoder layer, over all layers (default: "
                                        "--budget_fraction of N)."}
    )
    budget_fraction: float = field(default=1 / 9, metadata={"help": "Budget as a fraction of N if none given."})
    budgets: str | None = field(
        default=None,
        metadata={"help": "Train one plug-in set per budget, e.g. '1/3,2/9,1/9' (the paper's protocol): one run folder "
                          "per budget, OUTPUT_DIR/budget_1_3 ..., and a summary in OUTPUT_DIR/budgets.json. With "
                          "--push_to_hub --push_plugins_only: each set into a folder of the repo (budget_1_3/ ...) "
                          "under a root card listing them."},
    )
    pruning_keep_counts: list[str] | None = field(
        default=None,
        metadata={"help": "Train at fixed counts, e.g. '35,10,3' (straight-through top-k per pruner) instead of the "
                          "adaptive threshold (Eq. 8)."},
    )
    calibrate_retention: bool = field(
        default=False,
        metadata={"help": "After training, shift every pruner's bias by one common amount, found by bisection on the "
                          "evaluation split, so that the inference retention meets the target (within 5 percent)."},
    )
    pruner_hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the pruners' cross-attention (default: the config's; testbed: 32)."})
    repair_bottleneck_size: int | None = field(
        default=None, metadata={"help": "Bottleneck of the repair adapters (default: the config's; testbed: 32)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N examples only."})
    max_eval_samples: int | None = field(
        default=500, metadata={"help": "Evaluate (Trainer evaluation and the final one) on the first N examples."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished or started run in --output_dir: its checkpoint-N folders are deleted "
                          "once every argument, data and model check has passed, just before training (with "
                          "--resume_from_checkpoint they are the run being continued, and stay); its metrics.json, "
                          "plugins/ and model/ are replaced at the end. Without it such a folder is refused, unless "
                          "--resume_from_checkpoint."},
    )
    push_plugins_only: bool = field(
        default=False, metadata={"help": "With --push_to_hub: upload only the plug-in folder (PEFT-style)."}
    )
    model_card_license: str | None = field(
        default=None, metadata={"help": "License of the pushed model card (default: the base model's card's)."}
    )
    testbed_preset: str = field(default=MAIN_TESTBED, metadata={
        "help": "Testbed of the main job (no --base_model): 'tiny' (4 layers), 'deep' (16 layers, the paper's "
                "placement and budget over all layers) or 'paper' (deep at 576 visual tokens; a GPU build)."})

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:  # 0 meant "all" in some places; the final evaluation failed on it,
                # after training and before anything was saved
                raise ValueError(f"--{name} {value}: give a positive number of examples, or leave it unset for all.")


# Defaults of the embedded main job on a testbed (2-core CPU), applied where the user left the
# generic TrainingArguments default untouched.
TESTBED_JOB_DEFAULTS = {
    "output_dir": "outputs/rcp_tiny",
    "max_steps": 400,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-3,
    "logging_steps": 20,
    "save_steps": 200,
    "warmup_steps": 20,
    "weight_decay": 0.0,  # the recipe the committed testbed results were measured with (the library's: 0.01)
    "sparsity_layers": "from_first_pruner",
}
# Per testbed preset, one entry: `job`, what differs from the defaults above; `pruning`, the plug-in config. `tiny`
# (4 layers) places its own pruners. `deep` (16 layers, issue 16) and `paper` (its 576-token twin, GPU) keep the
# paper's placement for their depth and budget (the config's default: [1, 7, 13] / [11, 15] at 1/9), and their budget
# is the paper's, a mean over ALL decoder layers (the first pruner sits after layer 0, so 1/9 is reachable). A preset
# without an entry (`micro`, the tests') runs as tiny.
_ALL_LAYERS_JOB = {"sparsity_layers": "all"}
_SMALL_PLUGINS = {"pruner_hidden_size": 32, "repair_bottleneck_size": 32}
TESTBED_JOBS = {
    "tiny": {"job": {}, "pruning": {"pruning_layers": [1, 2, 3], "repair_layers": [2, 3], **_SMALL_PLUGINS}},
    "deep": {"job": {"output_dir": "outputs/rcp_deep", **_ALL_LAYERS_JOB}, "pruning": _SMALL_PLUGINS},
    "paper": {"job": {"output_dir": "outputs/rcp_paper", **_ALL_LAYERS_JOB}, "pruning": _SMALL_PLUGINS},
}


def _testbed_job(preset: str) -> dict:
    return TESTBED_JOBS.get(preset, TESTBED_JOBS["tiny"])


def testbed_job_defaults(preset: str) -> dict:
    """The TrainingArguments the main job sets on testbed `preset` (where the user left them untouched)."""
    return {**TESTBED_JOB_DEFAULTS, **_testbed_job(preset)["job"]}


def testbed_pruning(preset: str) -> dict:
    """The plug-in config overrides of the main job on testbed `preset` (flags given by the user win)."""
    return dict(_testbed_job(preset)["pruning"])


# `--help` groups: the project's fields by topic; argparse prints transformers' TrainingArguments (its general group,
# renamed) first.
HELP_GROUPS = {
    "RCP: pruning and plug-ins": (
        "pruning_layers", "repair_layers", "visual_token_budget", "budget_fraction", "budgets", "pruning_keep_counts",
        "calibrate_retention", "pruner_hidden_size", "repair_bottleneck_size"),
    "RCP: losses and schedules": (
        "lambda_task", "lambda_repair", "lambda_sparse", "repair_loss_layers", "repair_loss_mean_only",
        "repair_loss_pooling", "sparsity_reduction", "sparsity_layers", "sparsity_schedule", "sparsity_warmup_ratio",
        "gumbel_noise", "gumbel_schedule", "gumbel_temperature_start", "gumbel_temperature_end",
        "gumbel_anneal_ratio", "gumbel_noise_ratio", "detach_prior"),
    "data and model": (
        "base_model", "dataset_name_or_path", "llava_json", "image_folder", "llava_turns", "train_split", "eval_split",
        "test_split",
        "image_column", "question_column", "answer_column", "max_length", "max_train_samples", "max_eval_samples"),
    "testbed (the main job: no --base_model)": ("testbed_preset",),
    "output": ("overwrite_output_dir", "push_plugins_only", "model_card_license"),
}


def build_parser():
    """The job's argument parser: `RcpJobArguments` + `RcpTrainingArguments`, with `--help` in topic groups and, for
    the fields the main job sets itself, its real values next to the generic defaults."""
    import argparse

    # No abbreviated flags: the main job sets its own defaults where a flag was not given (`_explicit_flags` reads
    # the flags as typed), and `--max_step 2` was taken as max_steps=2, then replaced by the job's 400.
    parser = HfArgumentParser((RcpJobArguments, RcpTrainingArguments), description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    by_dest = {a.dest: a for a in parser._actions}
    general = parser._optionals
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            for action in [a for a in general._group_actions if a.dest == name]:
                general._group_actions.remove(action)
                group._group_actions.append(action)
    general.title = "Trainer (transformers.TrainingArguments; see its documentation)"
    main, tiny = testbed_job_defaults(MAIN_TESTBED), testbed_job_defaults("tiny")
    for key, value in main.items():
        where = f"main job ({MAIN_TESTBED} testbed): {value}" + (f", tiny testbed: {tiny[key]}" if tiny[key] != value
                                                                 else "")
        by_dest[key].help = f"{by_dest[key].help or ''} [{where}]".strip()
    return parser


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    job, args = parser.parse_args_into_dataclasses(args=argv)
    explicit = set(_explicit_flags(argv))
    result = run_budgets(job, args, explicit) if job.budgets else run_job(job, args, explicit=explicit)
    # Leave the process group cleanly, once, after the last job: a rank that exits while its gloo threads are alive
    # aborts the launch ("terminate called without an active exception"). Left inside each job, a --budgets sweep
    # re-created it between budgets and crashed or hung there under torchrun.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def check_output_dir(output_dir, overwrite=False, resume_from_checkpoint=None):
    """FileExistsError if `output_dir` already holds a run (metrics.json, plugins/, model/, checkpoint-*), unless
    `overwrite` or a resume: nothing the user saved is replaced silently. Checked before anything loads."""
    if overwrite or resume_from_checkpoint or not os.path.isdir(output_dir):
        return
    found = sorted(name for name in os.listdir(output_dir)
                   if name in ("metrics.json", "plugins", "model") or name.startswith("checkpoint-"))
    if found:
        raise FileExistsError(
            f"--output_dir {output_dir!r} already holds a run ({', '.join(found)}). Pass --overwrite_output_dir to "
            "replace it, --resume_from_checkpoint to continue it, or choose another folder."
        )


REMOVING_PREFIX = ".removing-"  # a previous run's checkpoint being deleted (--overwrite_output_dir)


def remove_previous_checkpoints(output_dir):
    """--overwrite_output_dir without a resume: delete the previous run's `checkpoint-N` folders (and leftovers of
    interrupted saves and removals), so that `--resume_from_checkpoint last` and the checkpoint rotation see only the
    new run's. Each is first renamed out of the `checkpoint-N` names (atomic), so an interrupted removal leaves no
    partial checkpoint that could be resumed from. Returns the names of the checkpoints removed."""
    if not os.path.isdir(output_dir):
        return []
    removed = sorted(n for n in os.listdir(output_dir)  # checkpoint folders only, as `resolve_resume` reads them
                     if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", n) and os.path.isdir(os.path.join(output_dir, n))
                     and not os.path.islink(os.path.join(output_dir, n)))
    for name in removed:
        target = os.path.join(output_dir, REMOVING_PREFIX + name)
        if os.path.isdir(target):  # left by an interrupted removal
            shutil.rmtree(target)
        os.replace(os.path.join(output_dir, name), target)
    for name in os.listdir(output_dir):  # never resumed from; removed so that they do not pile up
        if name.startswith((REMOVING_PREFIX, f"{STAGING_PREFIX}-")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


class RemovePreviousCheckpointsCallback(TrainerCallback):
    """--overwrite_output_dir without a resume: `remove_previous_checkpoints` at the start of training, once
    everything has loaded AND the Trainer has built its optimizer and scheduler (`on_train_begin` comes after both),
    so a run that fails any check keeps the old checkpoints: deleted before `train()`, a bad --optim_args or
    --lr_scheduler_kwargs lost them and then failed. Every rank waits for rank 0's removal."""

    def on_train_begin(self, args, state, control, **kwargs):
        from accelerate import PartialState

        if args.should_save:
            removed = remove_previous_checkpoints(args.output_dir)
            if removed:
                print(f"[train_rcp] --overwrite_output_dir: deleted the previous run's {', '.join(removed)} in "
                      f"{args.output_dir}", flush=True)
        PartialState().wait_for_everyone()


CHECKPOINT_FILES = ("rcp_plugins.safetensors", "rcp_config.json", "trainer_state.json")


def resumes_last(resume_from_checkpoint):
    """Whether --resume_from_checkpoint asks for the newest checkpoint of the output folder: "true" / "last" /
    "latest" (any case) or True."""
    return resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last", "latest")


def checkpoint_steps(output_dir):
    """The steps of the `checkpoint-N` entries in `output_dir`, newest first (none for a folder that is not there)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted((int(n.split("-")[1]) for n in names if n.startswith("checkpoint-") and n.split("-")[1].isdigit()),
                  reverse=True)


RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt")  # what --save_only_model leaves out (the Trainer's names)


def _resumed(folder):
    """`folder`, warning when it holds the plug-ins and step but not the optimizer's and scheduler's state (saved with
    --save_only_model): the Trainer then resumes from fresh ones without a word, so the run does not reproduce an
    uninterrupted one (Adam's moments restart, the schedule's step does not)."""
    missing = [f for f in RESUME_STATE_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        logger.warning(f"[train_rcp] resuming from {folder}, which has no {', '.join(missing)} (saved with "
                       "--save_only_model?): the plug-ins and the step count resume, the optimizer and the learning-"
                       "rate schedule start afresh, so the run will not match an uninterrupted one.")
    return folder


def resolve_resume(resume_from_checkpoint, output_dir):
    """The checkpoint folder to resume from. "true" / "last" (any case) or True: the newest COMPLETE checkpoint-N in
    `output_dir` (an interrupted save leaves one without all of `CHECKPOINT_FILES`: skipped with a warning naming
    it); a folder: itself, which must be complete. None / "" / "false": None."""
    if resume_from_checkpoint in (None, False, "") or str(resume_from_checkpoint).lower() == "false":
        return None
    if resumes_last(resume_from_checkpoint):
        for step in checkpoint_steps(output_dir):
            folder = os.path.join(output_dir, f"checkpoint-{step}")
            missing = [f for f in CHECKPOINT_FILES if not os.path.exists(os.path.join(folder, f))]
            if not missing:
                return _resumed(folder)
            logger.warning(f"[train_rcp] skipping the incomplete checkpoint {folder} (no {', '.join(missing)}): it "
                           "was interrupted while being written.")
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no complete checkpoint-N in "
                                f"{output_dir!r}. Start without it, or give a checkpoint folder.")
    folder = str(resume_from_checkpoint)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--resume_from_checkpoint {folder!r}: no such folder.")
    missing = [f for f in CHECKPOINT_FILES if not os.path.exists(os.path.join(folder, f))]
    steps = checkpoint_steps(folder)
    if missing and (steps or os.path.isfile(os.path.join(folder, "metrics.json"))):
        # a run's output folder, not one of its checkpoints: "interrupted while being written" sent the user astray
        held = f"checkpoint-{steps[0]}" if steps else "no checkpoint-N"
        raise ValueError(f"--resume_from_checkpoint {folder!r} is a run's output folder (it holds {held}), not a "
                         "checkpoint: give one of its checkpoint-N folders, or `last` with --output_dir set to it.")
    if missing:
        raise ValueError(f"--resume_from_checkpoint {folder!r} is incomplete (no {', '.join(missing)}): it was "
                         "interrupted while being written. Resume from an earlier checkpoint.")
    return _resumed(folder)


def unreachable_budget(config, budget, sparsity_layers):
    """The warning to give when the sparsity target cannot be met, or None. With `sparsity_layers="all"` (the paper's
    mean over every decoder layer) the layers before the first pruner keep the whole image: they alone average
    `pruning_layers[0] * N / L` visual tokens, and a budget at or below that floor leaves the sparsity loss pushing
    the pruners towards a target no schedule reaches (a 2-layer model at 1/9 ended at 900% of it, unannounced)."""
    if sparsity_layers != "all":
        return None
    num_layers, num_visual = config.text_config.num_hidden_layers, config.num_visual_tokens
    floor = config.pruning_layers[0] * num_visual / num_layers
    if budget > floor:
        return None
    return (f"--visual_token_budget {budget:g} cannot be reached: the {config.pruning_layers[0]} layer(s) before the "
            f"first pruner keep all {num_visual} visual tokens, which alone average {floor:g} per layer over all "
            f"{num_layers} layers (--sparsity_layers all). Raise the budget, prune earlier (--pruning_layers), or "
            "average from the first pruner (--sparsity_layers from_first_pruner).")


def check_not_a_plugin_folder(base_model):
    """ValueError if --base_model is a plug-in-only folder (`save_plugins`: rcp_config.json and no config.json): it
    holds no model, and transformers only said "Unrecognized model ... Should have a `model_type` key"."""
    folder = str(base_model)
    if not (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, RCP_CONFIG_NAME))
            and not os.path.isfile(os.path.join(folder, "config.json"))):
        return
    try:  # only to name the base model in the message: an unreadable record must not hide the actual problem
        with open(os.path.join(folder, RCP_CONFIG_NAME), encoding="utf-8") as f:
            recorded = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    base = repr(recorded) if recorded else "BASE"
    named = (f"its recorded base model {base}" if recorded else
             f"the LLaVA checkpoint they were trained on (its {RCP_CONFIG_NAME} records none)")
    raise ValueError(
        f"--base_model {folder!r} is an RCP plug-in folder ({RCP_CONFIG_NAME} + rcp_plugins.safetensors, written by "
        f"`save_plugins`), not a model. To train new plug-ins, pass {named} as --base_model. To train on from these "
        f"plug-ins, save them with their base as a full RCP model and pass that folder as --base_model: "
        f"`RcpLlavaForConditionalGeneration.from_base({base}, plugins={folder!r}).save_pretrained(DIR)` and "
        f"`AutoProcessor.from_pretrained({base}).save_pretrained(DIR)`."
    )


def budget_folder_name(label):
    """'1/9' -> 'budget_1_9'; '64' -> 'budget_64'."""
    return "budget_" + label.replace("/", "_").replace(".", "p")


def _check_push_target(args):
    """--push_to_hub names no repo without --hub_model_id: refused before anything loads or trains."""
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the Hub repo to upload to, e.g. user/rcp-llava-7b).")


def run_budgets(job, args, explicit):
    """The paper's protocol: one plug-in set per budget (placement and target differ by budget), each trained and
    evaluated by `run_job` into its own folder; returns and writes `{label: metrics}`. With --push_to_hub (plug-ins
    only) every set goes, once all are done, into a folder of --hub_model_id named as its local one (budget_1_9/),
    under a root card that lists them (`push_budget_sets`)."""
    from dataclasses import replace

    from rcp_llava.schedule import parse_budget

    if job.visual_token_budget is not None or job.pruning_keep_counts is not None:
        raise ValueError("--budgets trains one set per budget fraction: leave --visual_token_budget and "
                         "--pruning_keep_counts unset.")
    _check_push_target(args)  # before anything loads
    if args.push_to_hub and not job.push_plugins_only:  # a full model per budget: the backbone uploaded each time
        raise ValueError(f"--budgets with --push_to_hub pushes each budget's plug-in set into a folder of "
                         f"--hub_model_id {args.hub_model_id!r} (budget_1_9/, ...): add --push_plugins_only (a full "
                         "model per budget would upload the whole backbone once per budget), or train one budget per "
                         "job to push a full model.")
    push, args = args.push_to_hub, replace(args, push_to_hub=False)  # pushed together below, once every set is done
    if "output_dir" in explicit or job.base_model is not None:
        root = args.output_dir
    else:  # the main job's folder of the preset, + "_budgets"
        root = testbed_job_defaults(job.testbed_preset)["output_dir"] + "_budgets"
    budgets = [parse_budget(b.strip()) for b in job.budgets.split(",") if b.strip()]
    folders = {label: os.path.join(root, budget_folder_name(label)) for label, _ in budgets}
    resume = args.resume_from_checkpoint
    if resume in (False, "") or str(resume).lower() == "false":  # no resume, as `resolve_resume` reads them
        resume = None
    given_path = resume is not None and not resumes_last(resume)
    owner = None
    if given_path:
        # A checkpoint path is one budget's state: given to every budget, each (finished ones included) trained
        # again from it, replacing their results silently. It resumes the budget whose folder holds it; the others
        # go on as with `last`.
        owner = next((label for label, folder in folders.items() if os.path.commonpath(
            [os.path.abspath(resume), os.path.abspath(folder)]) == os.path.abspath(folder)), None)
        if owner is None:
            raise ValueError(f"--resume_from_checkpoint {resume!r} is in none of the budgets' folders "
                             f"({', '.join(folders.values())}): with --budgets give a checkpoint inside one of them "
                             "(OUTPUT_DIR/budget_1_9/checkpoint-N), or `last` to resume the sweep where it stopped.")
    # Resuming a sweep: the budgets it had not reached have no checkpoint and start fresh (the one stopped resumes,
    # the finished ones load). Was: refused for the first such budget, before or after the others ran.
    resumes = {label: resume if label == owner or resume is None else
               (None if not checkpoint_steps(folder) else resume if resumes_last(resume) else "last")
               for label, folder in folders.items()}
    kept = {}  # budgets that finished without a checkpoint (--save_strategy no, fewer steps than --save_steps): their
    # metrics.json is kept when the sweep resumes, read here, before any budget trains (with --overwrite_output_dir
    # they train again, as every other budget)
    for label, folder in folders.items():  # every budget's folder before the first trains (run_job: its own only)
        record = os.path.join(folder, "metrics.json")
        if resumes[label] is None and resume is not None and os.path.isfile(record) \
                and not job.overwrite_output_dir:
            try:
                with open(record, encoding="utf-8") as f:
                    kept[label] = json.load(f)
            except ValueError as error:
                raise ValueError(f"{record!r} (budget {label}, finished without a checkpoint) is not readable JSON "
                                 f"({error}): pass --overwrite_output_dir to train it again.") from None
            continue
        check_output_dir(folder, job.overwrite_output_dir, resolve_resume(resumes[label], folder))
    # Earlier runs' budgets stay in the summary (their folders stay too): only this run's entries are replaced.
    summary, previous = os.path.join(root, "budgets.json"), {}
    if os.path.isfile(summary):
        try:
            with open(summary, encoding="utf-8") as f:
                previous = json.load(f)
        except ValueError as error:
            previous = error
        if not isinstance(previous, dict):
            raise ValueError(f"{summary!r} is not a budgets summary (a JSON object of budget: metrics): move it away, "
                             "then run again.")
    results = {}
    for label, fraction in budgets:
        if label in kept:
            print(f"[train_rcp] --budgets: budget {label} finished before "
                  f"({os.path.join(folders[label], 'metrics.json')}, no checkpoint): kept.", flush=True)
            results[label] = kept[label] if args.process_index == 0 else None
            continue
        if resumes[label] is None and resume is not None:
            print(f"[train_rcp] --budgets: {folders[label]} has no checkpoint to resume; budget {label} starts "
                  "fresh.", flush=True)
        results[label] = run_job(replace(job, budgets=None, budget_fraction=fraction),
                                 replace(args, output_dir=folders[label], resume_from_checkpoint=resumes[label]),
                                 explicit=explicit | {"output_dir"})
    if results and all(r is not None for r in results.values()):
        _write_json(summary, {**previous, **results})
        if push:
            push_budget_sets(root, [(label, folders[label], results[label]) for label, _ in budgets], job, args)
    return results


def push_budget_sets(root, sets, job, args):
    """Push each budget's plug-ins (`(label, folder, metrics)` of `sets`) into the folder of --hub_model_id named as
    its local one, each with its own card, then the repo's root card listing them (written to ROOT/README.md first).
    A set's card is built from its saved model's config (a budget kept from an earlier run was not trained here)."""
    from transformers import AutoConfig

    from rcp_llava.hub import build_budgets_card, push_model_card

    for label, folder, metrics in sets:
        config = AutoConfig.from_pretrained(os.path.join(folder, "model"))
        # The set's own run's settings: a budget kept from an earlier run was trained with that run's flags, not this
        # one's (its card stated this run's seed and learning rate). A metrics.json written before they were recorded
        # holds its seed and steps only, and the card states just those.
        settings = metrics.get("training_args") or {k: metrics[k] for k in ("max_steps", "seed") if k in metrics}
        push_output(config, folder, metrics.get("base_model"), args, settings, plugins_only=True,
                    license=job.model_card_license, subfolder=os.path.basename(folder))
        print(f"[train_rcp] --budgets: budget {label}'s plug-ins pushed to {args.hub_model_id} "
              f"({os.path.basename(folder)}/).", flush=True)
    bases = {metrics.get("base_model") for _, _, metrics in sets}
    base = next(iter(bases)) if len(bases) == 1 else None  # sets on other bases (a sweep resumed elsewhere): none named
    path = os.path.join(root, "README.md")

    def card(repo_id):  # for the repo the push resolves --hub_model_id to
        built = build_budgets_card(repo_id, [(label, os.path.basename(folder), metrics) for label, folder, metrics in sets],
                                   base_model=base, license=job.model_card_license)
        atomic_write(path, lambda tmp: write_text(tmp, str(built)))

    return push_model_card(path, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                           revision=args.hub_revision, card=card)


def _write_json(path, data):
    """Write JSON atomically (`modeling_rcp_llava.atomic_write`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(data, indent=2)))


def _explicit_flags(argv):
    return [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]


def plugin_overrides(job, testbed, num_visual):
    """The `from_pretrained` overrides `job` trains with on a base of `num_visual` visual tokens: the testbed's
    placement (`testbed`), the flags' layers, counts and widths, RCP and its budget (ValueError naming the flag when
    out of range). One home: `run_job` builds its model from them, and ablations.py checks every variant's before
    any trains."""
    overrides = testbed_pruning(job.testbed_preset) if testbed else {}
    for name in ("pruning_layers", "repair_layers"):
        value = _parse_int_list(getattr(job, name), name)
        if value is not None:
            overrides[name] = value
    counts = _parse_int_list(job.pruning_keep_counts, "pruning_keep_counts")
    for name in ("pruner_hidden_size", "repair_bottleneck_size"):
        if getattr(job, name) is not None:
            overrides[name] = getattr(job, name)
    if job.visual_token_budget is not None:
        budget = job.visual_token_budget
    elif not 0 < job.budget_fraction <= 1:
        raise ValueError(
            f"--budget_fraction {job.budget_fraction} is outside (0, 1]: it is a fraction of the {num_visual} "
            "visual tokens."
        )
    else:  # a real-valued average (the sparsity target), not a count: no rounding
        budget = job.budget_fraction * num_visual
    if not 0 < budget <= num_visual:
        raise ValueError(
            f"--visual_token_budget {budget} is outside (0, {num_visual}]: the image has {num_visual} visual tokens."
        )
    overrides.update(pruning_method="rcp", visual_token_budget=float(budget), pruning_keep_counts=counts)
    return overrides


def run_job(job, args, explicit=()):
    """Build or load the base model and data, train the plug-ins, evaluate full vs pruned, write the folder."""
    from transformers import AutoConfig, AutoProcessor, set_seed

    started = time.time()
    _check_push_target(args)  # before anything loads
    if job.llava_json and job.dataset_name_or_path:  # the JSON won, and the dataset (its test split) went unread
        raise ValueError(f"Give --llava_json ({job.llava_json!r}) or --dataset_name_or_path "
                         f"({job.dataset_name_or_path!r}), not both: the JSON is the whole training data (one split).")
    if "do_train" in explicit and not args.do_train:  # the stock flag of HF's example scripts, read nowhere here
        raise ValueError("--do_train false: this script always trains the plug-ins. To score plug-ins without "
                         "training, load them (`RcpLlavaForConditionalGeneration.from_base(BASE, plugins=FOLDER)`) "
                         "and use `rcp_llava.evaluation.evaluate_methods`.")
    if args.batch_eval_metrics and (args.eval_strategy != "no" or args.do_eval or args.load_best_model_at_end):
        # transformers would call answer_metrics per batch with `compute_result`, which it does not take: an error
        # after the model loaded
        raise ValueError("--batch_eval_metrics is not supported here: the answer metrics (answer_metrics) score the "
                         "whole evaluation at once, from the token ids preprocess_logits_for_metrics keeps (not the "
                         "logits). Leave it off.")
    testbed = job.base_model is None
    if testbed:
        for key, value in testbed_job_defaults(job.testbed_preset).items():
            if key not in explicit:
                setattr(args, key, value)
        args.output_dir = os.path.abspath(args.output_dir)
    # Resolved first: "false" is a string the folder check took as a resume, and replaced the run in it silently.
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, job.overwrite_output_dir, resume)
    if testbed:
        from rcp_llava.testbed import build_testbed, default_cache_dir

        with args.main_process_first(desc="building the testbed"):
            cache = default_cache_dir(job.testbed_preset)
            if not (cache / "metrics.json").exists():
                minutes = BUILD_MINUTES.get(job.testbed_preset)  # only measured estimates (none for `micro`)
                took = f"about {minutes} minutes on 2 CPU cores; " if minutes else ""
                print(f"[train_rcp] The {job.testbed_preset!r} testbed is not built yet: building it into {cache} "
                      f"first (one time, {took}progress below).", flush=True)
            folder = build_testbed(job.testbed_preset)
        base_model = str(folder / "model")
        dataset_path = job.dataset_name_or_path or str(folder / "dataset")
    else:
        base_model = job.base_model
        dataset_path = job.dataset_name_or_path

    check_model_source(base_model, "--base_model")
    check_not_a_plugin_folder(base_model)
    base_config = AutoConfig.from_pretrained(base_model)
    if base_config.model_type not in ("llava", "rcp_llava"):
        raise ValueError(
            f"--base_model {base_model!r} is a {base_config.model_type!r} model; RCP needs a LLaVA checkpoint "
            "(model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)."
        )
    processor = AutoProcessor.from_pretrained(base_model)

    num_visual = visual_tokens_per_image(base_config)  # the config's N (+1 with the "full" feature strategy)
    overrides = plugin_overrides(job, testbed, num_visual)
    budget = overrides["visual_token_budget"]
    collator = RcpDataCollator(processor, job.image_column, job.question_column, job.answer_column,
                               max_length=job.max_length, image_folder=job.image_folder)
    if job.llava_json:
        splits = {job.train_split: load_llava_json(job.llava_json, job.image_folder, turns=job.llava_turns)}
    elif dataset_path is None:
        raise ValueError("Give --dataset_name_or_path or --llava_json (or no --base_model for the testbed).")
    else:
        splits = load_splits(dataset_path, job.train_split)
    if job.train_split not in splits:
        raise ValueError(f"The dataset has no split {job.train_split!r}; it has {list(splits)}.")
    splits = {name: _rcp_columns(split, job, name) for name, split in splits.items()}
    train = splits[job.train_split]
    if job.max_train_samples:
        train = train.select(range(min(job.max_train_samples, len(train))))
    check_dataset(train, collator, job.max_length, name=f"{job.train_split!r} split")
    evaluating = args.eval_strategy != "no" or args.do_eval or args.load_best_model_at_end
    eval_data = None
    if evaluating:  # the Trainer's own evaluation (loss + teacher-forced answer metrics) during / after training
        if job.eval_split not in splits:
            raise ValueError(f"--eval_strategy / --do_eval / --load_best_model_at_end evaluate on --eval_split "
                             f"{job.eval_split!r}, but the dataset has {list(splits)}.")
        eval_data = splits[job.eval_split]
        if job.max_eval_samples:
            eval_data = eval_data.select(range(min(job.max_eval_samples, len(eval_data))))
        check_dataset(eval_data, collator, job.max_length, name=f"{job.eval_split!r} split")
    if job.test_split in splits and not len(splits[job.test_split]):  # found after training, in the evaluator
        raise ValueError(f"--test_split {job.test_split!r} is empty: the final evaluation scores it. Give a split "
                         "with rows, or a --test_split the dataset does not have to skip it.")
    if job.test_split in splits:
        # The rows the final evaluation reads, checked as the training rows are (columns first: a split with other
        # column names was a bare KeyError here): a missing image or answer there failed after training, before
        # anything was saved.
        scored = splits[job.test_split]
        if job.max_eval_samples is not None:
            scored = scored.select(range(min(job.max_eval_samples, len(scored))))
        _check_scored_rows(scored, collator, f"{job.test_split!r} split (the final evaluation's)",
                           "or skip the final evaluation with --test_split none")
        first = splits[job.test_split][0][job.question_column]
        if isinstance(first, (list, tuple)):  # found after training, deep in the prompt builder, otherwise
            raise ValueError(f"--test_split {job.test_split!r} holds multi-turn rows (lists of questions): the final "
                             "evaluation scores one question per image. Give a single-turn split, or a --test_split "
                             "the dataset does not have to skip it.")
    if job.calibrate_retention:  # the rows `calibrate_retention` reads, before training too
        name = job.eval_split if job.eval_split in splits else job.train_split
        rows = splits[name].select(range(min(CALIBRATION_SAMPLES, len(splits[name]))))
        _check_scored_rows(rows, collator, f"{name!r} split (--calibrate_retention's)",
                           "or train without --calibrate_retention")
        if any(isinstance(q, (list, tuple)) for q in rows[job.question_column]):
            raise ValueError(f"--calibrate_retention calibrates on the {name!r} split, whose rows are multi-turn "
                             "(lists of questions: --llava_json's conversations), and the pruners select for one "
                             "question: give --llava_turns pairs, or a dataset with a single-turn --eval_split.")
    # Data checked, now the (large) model. Layers not given: the paper's placement for this depth and budget (the
    # config's default, from the budget). The plug-ins are initialised inside from_pretrained: seed first, so one
    # --seed gives one model.
    set_seed(args.seed)
    model = RcpLlavaForConditionalGeneration.from_pretrained(base_model, **overrides)
    unreachable = unreachable_budget(model.config, budget, args.sparsity_layers)
    if unreachable:
        logger.warning(f"[train_rcp] {unreachable}")

    # The folder is pushed once, complete, at the end (with its model card); the Trainer must not push checkpoints.
    push, args.push_to_hub = args.push_to_hub, False
    trainer = RcpTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=eval_data, data_collator=collator,
        compute_metrics=(lambda pred: answer_metrics(pred.predictions, pred.label_ids, processor.tokenizer))
        if evaluating else None,
        preprocess_logits_for_metrics=argmax_logits if evaluating else None,
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[train_rcp] training the plug-ins on {args.world_size} process(es): {trainable / 1e6:.3f}M "
              f"trainable parameters, {len(train)} examples, "
              f"{f'{args.max_steps} steps' if args.max_steps > 0 else f'{args.num_train_epochs:g} epoch(s)'}",
              flush=True)
    if job.overwrite_output_dir and resume is None:
        trainer.add_callback(RemovePreviousCheckpointsCallback())
    trainer.train(resume_from_checkpoint=resume)
    trainer_eval = trainer.evaluate() if args.do_eval else None  # with the best plug-ins if load_best_model_at_end
    metrics = None
    if trainer.is_world_process_zero():
        calibration = None
        if job.calibrate_retention:
            calibration = calibrate_retention(model, processor, splits, collator, job,
                                              from_first_pruner=args.sparsity_layers == "from_first_pruner")
        metrics = _evaluate_and_save(model, processor, splits, collator, job, args, base_model, budget, num_visual,
                                     started, push, trainer=trainer, calibration=calibration, trainer_eval=trainer_eval)
    # Every rank waits for rank 0's evaluation and saving (`main` leaves the process group after the last job).
    trainer.accelerator.wait_for_everyone()
    return metrics


def _check_scored_rows(rows, collator, name, way_out):
    """`check_dataset` on rows scored (not trained on) after training, its message ending with the way out: the
    training checks' advice (rename a column for every split) is not the only one for a split that is read only."""
    try:
        check_dataset(rows, collator, name=name)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise type(error)(f"{error} (These rows are read after training: fix them, {way_out}.)") from None


def _evaluate_and_save(model, processor, splits, collator, job, args, base_model, budget, num_visual, started, push,
                       trainer=None, calibration=None, trainer_eval=None):
    """Rank 0 after training: evaluate full vs pruned, write plugins/, model/ and metrics.json, push if asked."""
    test_name = job.test_split if job.test_split in splits else None
    metrics = {"base_model": base_model, "visual_token_budget": budget, "num_visual_tokens": num_visual,
               "target_retention": budget / num_visual, "sparsity_layers": args.sparsity_layers,
               "pruning_layers": list(model.config.pruning_layers), "repair_layers": list(model.config.repair_layers),
               # trained at fixed counts (--pruning_keep_counts) or with the adaptive threshold (None): the report
               # and the model card name the trained model's row by it
               "pruning_keep_counts": (list(model.config.pruning_keep_counts)
                                       if model.config.pruning_keep_counts is not None else None),
               "train_seconds": round(time.time() - started, 1),
               # the steps the run was set to take: --max_steps, or the Trainer's count for --num_train_epochs
               "max_steps": trainer.state.max_steps if trainer is not None and args.max_steps < 0 else args.max_steps,
               "seed": args.seed, "max_grad_norm": args.max_grad_norm,
               # the data trained on, and evaluated on when it has `test_split` (`evaluated_split`, else None: a
               # --llava_json file has a train split only), for the model card (rcp_llava.hub)
               "dataset": job.llava_json or job.dataset_name_or_path or f"rcp-llava testbed ({job.testbed_preset})",
               "test_split": job.test_split, "evaluated_split": test_name}
    metrics["training_args"] = card_training_args(args, metrics["max_steps"])  # what its model card states
    if trainer is not None:
        metrics["grad_norm"] = grad_norm_summary(trainer.grad_norms)
    if calibration is not None:
        metrics["calibration"] = calibration
    if trainer is not None and trainer.state.best_model_checkpoint:
        metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
        metrics["best_metric"] = trainer.state.best_metric
    if trainer_eval is not None:
        metrics["trainer_eval"] = trainer_eval
    if test_name is not None:
        metrics.update(evaluate_methods(model, processor, splits[test_name], collator, job.max_eval_samples,
                                        progress=not args.disable_tqdm))
    out = args.output_dir
    save_job_folders(model, processor, out, overwrite=job.overwrite_output_dir)
    if trainer is not None:
        _write_json(os.path.join(out, GRAD_NORMS_NAME), trainer.grad_norms)
    metrics["total_seconds"] = round(time.time() - started, 1)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    print(format_report(metrics), flush=True)
    if push:
        push_output(model, out, base_model, args, metrics["training_args"], plugins_only=job.push_plugins_only,
                    license=job.model_card_license)
    return metrics


def inference_retention(model, processor, rows, collator, from_first_pruner, batch_size=32):
    """Mean visual-token retention of `model` at inference (physical discard, Eq. 8) over `rows`, averaged over all
    decoder layers or over the layers from the first pruner (the definition the sparsity loss trained with): the
    retention `rcp_llava.evaluation.evaluate_model` reports."""
    data = EvalData("testbed", rows, "calibration", image_column=collator.image_column,
                    question_column=collator.question_column, answer_column=collator.answer_column,
                    image_folder=collator.image_folder)
    result = evaluate_model(model, processor, data, batch_size)
    return result["retention_from_first_point" if from_first_pruner else "retention_all_layers"]


CALIBRATION_SAMPLES = 256  # the rows `calibrate_retention` bisects on


def calibrate_retention(model, processor, splits, collator, job, from_first_pruner=False, tolerance=0.05,
                        max_samples=CALIBRATION_SAMPLES, steps=30):
    """Shift every pruner's bias by one common amount so that the mean inference retention on the evaluation split
    (else the training split) is within `tolerance` (relative) of the target. Retention grows with the shift, so
    bisection finds it. Returns before / after / shift; the shifted biases stay in the model (and are saved)."""
    split = job.eval_split if job.eval_split in splits else job.train_split
    data = splits[split]
    rows = [data[i] for i in range(min(max_samples, len(data)))]
    target = target_retention(model.config)
    pruners = list(model.model.rcp_plugins.pruners.values())
    original = [p.bias.detach().clone() for p in pruners]

    def measure(shift):
        with torch.no_grad():
            for p, b in zip(pruners, original):
                p.bias.copy_(b + shift)
        return inference_retention(model, processor, rows, collator, from_first_pruner)

    before = measure(0.0)
    lo, hi = -30.0, 30.0
    shift, after = 0.0, before
    for _ in range(steps):
        if abs(after - target) <= tolerance * target:
            break
        if after < target:
            lo = shift
        else:
            hi = shift
        shift = (lo + hi) / 2
        after = measure(shift)
    result = {"split": split, "n": len(rows), "target": target, "before": before, "after": after,
              "bias_shift": shift, "within_tolerance": abs(after - target) <= tolerance * target}
    print(f"[train_rcp] calibration on {len(rows)} {split!r} rows: inference retention {before:.3f} -> {after:.3f} "
          f"(target {target:.3f}), every pruner bias shifted by {shift:+.3f}", flush=True)
    return result


def save_job_folders(model, processor, out, overwrite=False):
    """Write the job's `plugins/` (plug-ins only) and `model/` (full model + processor, Hub-loadable) folders;
    `overwrite` (--overwrite_output_dir) lets them replace another run's."""
    model.save_plugins(os.path.join(out, "plugins"), overwrite=overwrite)
    model.save_pretrained(os.path.join(out, "model"), overwrite=overwrite)
    processor.save_pretrained(os.path.join(out, "model"))


CARD_TRAINING_ARGS = ("learning_rate", "max_steps", "per_device_train_batch_size", "seed", "lambda_task",
                      "lambda_repair", "lambda_sparse")


def card_training_args(args, max_steps):
    """The training settings a model card states (`CARD_TRAINING_ARGS` of `args`), recorded in the run's metrics.json
    so that a later push (a --budgets sweep resumed with --push_to_hub) states the run's own. `max_steps`: the steps
    the run took (the Trainer's count when it trained by epochs: --max_steps -1 made the card say -1)."""
    return {**{k: getattr(args, k) for k in CARD_TRAINING_ARGS}, "max_steps": max_steps}


def push_output(model, out, base_model, args, settings, plugins_only=False, license=None, subfolder=None):
    """Write a model card into the folder to upload, then upload it (`rcp_llava.hub.push_rcp_folder`). `model`: the
    trained model or its config. `settings`: the training settings the card states (`card_training_args`, from the
    run that trained the folder). `subfolder`: the repo's folder the plug-ins go into (one set per budget,
    `run_budgets`). `args` gives the Hub target (repo, token, revision, private)."""
    from rcp_llava.hub import build_model_card, push_rcp_folder

    folder = os.path.join(out, "plugins" if plugins_only else "model")

    def card(repo_id):  # for the repo the push resolves `--hub_model_id` to ("name" -> "user/name")
        build_model_card(getattr(model, "config", model), repo_id=repo_id, base_model=base_model, plugins_only=plugins_only,
                         eval_results=os.path.join(out, "metrics.json"), training_args=settings, license=license,
                         subfolder=subfolder).save(os.path.join(folder, "README.md"))

    # --hub_revision: the branch (or refs/pr/N) to push to, as the Trainer's push uses it (it went to main)
    return push_rcp_folder(folder, args.hub_model_id, plugins_only=plugins_only, token=args.hub_token,
                           private=args.hub_private_repo, revision=args.hub_revision, card=card, path_in_repo=subfolder)


# ------------------------------------------------------------------------------------------------
# Evaluation of the trained plug-ins (full vs pruned, one-word answers)
# ------------------------------------------------------------------------------------------------


def job_result(result):
    """The main job's metrics.json entry of one `rcp_llava.evaluation.evaluate_model` result: its "score" (the greedy
    first token on the testbed, the first n greedy tokens for n-token references) as "accuracy", "groups" as
    "families", and RCP's kept-token statistics (the file's documented keys,
    which `rcp_llava.hub.load_eval_results` reads)."""
    entry = {"accuracy": result["score"], "n": result["n"], "families": result["groups"]}
    if result["kept_per_point"] is not None:
        entry.update(kept_per_pruning_layer=result["kept_per_point"],
                     retention_all_layers=result["retention_all_layers"],
                     retention_from_first_pruner=result["retention_from_first_point"],
                     avg_visual_tokens_per_layer=result["avg_visual_tokens_per_layer"])
    return entry


def fixed_counts_from(kept_per_pruning_layer):
    """Integer keep counts from RCP's mean kept tokens per pruning layer (a measured average, not a budget): Python's
    `round`, at least 1, as the committed results were made, and made non-increasing (the masks are cumulative)."""
    counts = [max(1, round(c)) for c in kept_per_pruning_layer]
    return list(itertools.accumulate(counts, min))  # each count at most every earlier one, not only the last


def evaluate_methods(model, processor, dataset, collator, max_samples=None, progress=True):
    """Full model, trained RCP, and at RCP's mean counts: trained RCP, untrained plug-ins and random kept sets.

    Each is its own `method_model` over the trained model's backbone (the trained model, its config and its
    plug-ins are left as they are); all are scored by `rcp_llava.evaluation.evaluate_model`.
    """
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples)) if hasattr(dataset, "select") else dataset[:max_samples]
    data = EvalData("testbed", dataset, "test", image_column=collator.image_column,
                    question_column=collator.question_column, answer_column=collator.answer_column,
                    image_folder=collator.image_folder)
    n = model.config.num_visual_tokens

    correct = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=6 * len(data), desc="[train_rcp] evaluating full / RCP / baselines", unit="sample",
               disable=not progress)

    def score(method, name=None, **kwargs):
        result = evaluate_model(method, processor, data, progress=bar, **kwargs)
        correct[name] = result["correct"]
        return job_result(result)

    results = {"full": score(method_model(model, **method_overrides("none", n, model.config)))}
    rcp = method_model(model)  # the trained plug-ins, adaptive threshold (Eq. 8)
    results["rcp"] = score(rcp)
    counts = fixed_counts_from(results["rcp"]["kept_per_pruning_layer"])
    results["rcp_fixed_counts"] = score(method_model(model, pruning_keep_counts=counts), name="rcp")
    # Untrained plug-ins: a fresh initialisation, as from_pretrained(stock) gives.
    results["untrained_fixed_counts"] = score(method_model(model, fresh_plugins=True, pruning_keep_counts=counts))
    results["random_fixed_counts"] = score(rcp, keep_masks_fn=random_keep_masks_fn(counts, n, seed=0))
    # The training-free prior (Eq. 4, the LLM's own attention) at the same layers and counts: what RCP must beat.
    prior = method_model(model, pruning_method="attention_topk", repair_layers=[], pruning_keep_counts=counts)
    results["prior_fixed_counts"] = score(prior, name="prior")
    results["rcp_vs_prior_fixed_counts"] = mcnemar(correct["rcp"], correct["prior"])  # paired, exact
    results["fixed_counts"] = counts
    bar.close()
    return results


def evaluated_on(metrics):
    """The line above the report's accuracies: how many samples of which split they score (a default run scores the
    first --max_eval_samples 500 of a 1000-row test split; the accuracies alone did not say so). Runs before the
    split was recorded name the split asked for, or none."""
    counts = sorted({metrics[key]["n"] for key in ("full", "rcp") if isinstance(metrics.get(key), dict)
                     and "n" in metrics[key]})
    split = metrics.get("evaluated_split") or metrics.get("test_split")
    where = f"the {split!r} split" if split else "the test data (split not recorded)"
    n = " / ".join(map(str, counts)) if counts else "an unrecorded number of"
    return f"accuracies on {n} samples of {where} (the same samples for every row):"


def format_report(metrics):
    lines = [f"\nRCP on {metrics['base_model']} — budget {metrics['visual_token_budget']:.1f} of "
             f"{metrics['num_visual_tokens']} visual tokens (target retention {metrics['target_retention']:.3f} "
             f"over {metrics['sparsity_layers']} layers)", ""]
    if "full" in metrics:
        full = metrics["full"]["accuracy"]
        lines += [evaluated_on(metrics), ""]
        lines.append(f"| {'model':<34} | {'accuracy':>8} | {'% of full':>9} | {'kept per pruning layer':<24} |")
        lines.append(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 26}|")
        trained_counts = metrics.get("pruning_keep_counts")  # a fixed-count run: its own row is at those counts
        names = {"full": "full tokens",
                 "rcp": ("RCP, trained (adaptive threshold)" if not trained_counts else
                         f"RCP, trained at counts {':'.join(map(str, trained_counts))}"),
                 "rcp_fixed_counts": "RCP, trained, fixed counts",
                 "untrained_fixed_counts": "untrained plug-ins, fixed counts",
                 "prior_fixed_counts": "prior (attention top-k), fixed counts",
                 "random_fixed_counts": "random, fixed counts"}
        for key, name in names.items():
            if key not in metrics:  # runs made before the prior row existed
                continue
            if key == "rcp_fixed_counts" and trained_counts:  # the row above again: the same model at the same counts
                continue
            r = metrics[key]
            kept = ", ".join(f"{c:.1f}" for c in r.get("kept_per_pruning_layer", [])) or "all"
            relative = f"{r['accuracy'] / full:>8.1%}" if full else f"{'n/a':>9}"
            lines.append(f"| {name:<34} | {r['accuracy']:>8.3f} | {relative} | {kept:<24} |")
        paired = metrics.get("rcp_vs_prior_fixed_counts")
        if paired:
            lines += ["", f"RCP vs its prior at the same counts (exact McNemar, {metrics['rcp_fixed_counts']['n']} "
                      f"samples): {paired['a_only']} right only with RCP, {paired['b_only']} only with the prior, "
                      f"p = {paired['p_value']:.3g}"]
        rcp = metrics["rcp"]
        inference = rcp["retention_from_first_pruner" if metrics["sparsity_layers"] == "from_first_pruner"
                        else "retention_all_layers"]
        target = metrics["target_retention"]
        lines += ["", f"inference retention {inference:.3f} against the target {target:.3f} "
                  f"({inference / target:.0%} of it, over {metrics['sparsity_layers']} layers)",
                  f"retention: {rcp['retention_from_first_pruner']:.3f} over the layers from the first pruner, "
                  f"{rcp['retention_all_layers']:.3f} over all layers "
                  f"({rcp['avg_visual_tokens_per_layer']:.1f} visual tokens per layer on average)",
                  "per family (full / RCP): " + ", ".join(
                      f"{f} {metrics['full']['families'][f]:.2f}/{rcp['families'][f]:.2f}" for f in rcp["families"])]
    elif "evaluated_split" in metrics:  # runs before it was recorded evaluated or said nothing either way
        lines.append(f"nothing evaluated: the data has no {metrics['test_split']!r} split (--test_split); evaluate the "
                     "saved model with benchmarks/evaluate_methods.py")
    grad = metrics.get("grad_norm")
    if grad:
        ratio = f", max/median {grad['max_over_median']:.1f}" if grad["max_over_median"] else ""
        lines.append(f"gradient norm per step (before clipping, max_grad_norm={metrics['max_grad_norm']}): median "
                     f"{grad['median']:.3g}, p99 {grad['p99']:.3g}, max {grad['max']:.3g}{ratio}")
    if metrics.get("calibration"):
        c = metrics["calibration"]
        lines.append(f"calibration: retention {c['before']:.3f} -> {c['after']:.3f} (target {c['target']:.3f}), "
                     f"bias shift {c['bias_shift']:+.3f}")
    lines.append(f"time: {metrics['total_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
