"""lmms-eval model `rcp_llava`: batched generation with visual-token pruning, on stock transformers classes.

    pip install -e ".[lmms]"
    python -m lmms_eval --model rcp_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plugins=USER/rcp-plugins-64,budget=64 \\
        --tasks pope,gqa --batch_size 8 --output_path logs/

lmms-eval finds the model through its entry-point group `lmms_eval.models` (declared in setup.cfg: `manifest`
below), so nothing in lmms-eval is patched. Model arguments (`--model_args key=value,...`):

- `pretrained`: a stock LLaVA or an RCP checkpoint (Hub id or folder); `plugins`: an RCP plug-in folder or repo
  to put on a stock `pretrained` (`RcpLlavaForConditionalGeneration.from_base`); `revision`, `plugins_revision`.
- `pruning_method`: `rcp` (default), `attention_topk`, `fastv`, `random`, `vispruner` or `none`.
- the budget: `budget` (visual tokens, or a fraction like `1/9` of the image's tokens), given to every method the
  way `benchmarks/evaluate_methods.py` does (`rcp_llava.evaluation.method_overrides`; `flop_matched=true` for the
  mean over all decoder layers); or `pruning_keep_counts=93:25:8` for fixed counts at the model's pruning layers.
  Without either, the checkpoint's own setting (RCP's adaptive threshold when it has no counts).
- `dtype` (`auto`, `bfloat16`, ...), `max_new_tokens` (default when a task gives none: 128). The batch size and
  the device are lmms-eval's own flags, `--batch_size` and `--device` (default cuda if available): lmms-eval passes
  them beside `--model_args`, so naming them there too is its "got multiple values" error. Data-parallel runs
  (`accelerate launch -m lmms_eval ...`): lmms-eval shards the requests by rank, and each rank puts the model on
  its own GPU (cuda:LOCAL_RANK for `--device cuda`).

A task's `do_sample: false` keeps generation greedy whatever its `temperature` (MM-Vet gives 0.2 with
`do_sample: false`); otherwise a temperature above 0 samples, as in lmms-eval's `llava_hf`. A task's `until` strings
cut the answer, except "\n\n": lmms-eval gives that one to every task that names none, and `llava_hf` ignores
`until` altogether, so honouring it cut MM-Vet's long answers after their first paragraph (lmms-eval's Qwen2.5-VL
model drops it the same way).

A document may have no image (ScienceQA's text-only questions): its row runs unpruned in the batch. Several images
in one prompt run with `pruning_method=none` only; the pruning methods take one image per prompt.

Each document with an image records its visual tokens per decoder layer (`visual_tokens_per_layer`: the mean over
all layers, the project's equal-compute budget), also by task (`visual_tokens_by_task`: lmms-eval sends every
task's requests in one call), once per call of the model (a multiple-choice document's requests, and the copies of
its last request that lmms-eval runs on a data-parallel rank with fewer documents, are one document);
`visual_token_summary()` logs their means after each request type, since lmms-eval's results hold the scores only,
and still answers after lmms-eval's `clean()` has deleted the model. Data-parallel, each rank records and logs its
own documents.

`generate_until` runs batched (left padding, requests sorted by length and grouped by generation arguments);
`loglikelihood` scores a continuation one request at a time. A local task built from the project's testbed
(`write_testbed_task`) lets the whole path run offline: `python -m rcp_llava.lmms_eval_model --write_task DIR`.
"""

import json
import os
import re
import textwrap
from fractions import Fraction

import torch
from tqdm import tqdm

try:  # the model needs lmms-eval; the task writer below (`--write_task`) does not
    from lmms_eval import utils
    from lmms_eval.api.model import lmms
    from loguru import logger as eval_logger  # lmms-eval's own log (its models write there)
except ImportError as err:  # pragma: no cover - exercised where lmms-eval is absent
    utils, lmms, eval_logger, _LMMS_MISSING = None, object, None, err
else:
    _LMMS_MISSING = None

from transformers.utils import logging

from configuration_rcp_llava import PRUNING_METHODS
from modeling_rcp_llava import RcpLlavaForConditionalGeneration, atomic_write, write_text
from rcp_llava.data import (answer_starts, appends_eos, encode_texts, prompt_messages, saved_splits,
                            special_tokens_kwargs)
from rcp_llava.evaluation import method_model, method_overrides, uses_rcp_placement
from rcp_llava.schedule import average_tokens, budget_count, kept_tokens_per_layer, parse_budget


logger = logging.get_logger(__name__)
MODEL_ID = "rcp_llava"
# llava-hf's LLaVA-1.5 chat template (its `chat_template.json`), for a processor saved without one. lmms-eval's
# `llava_hf` falls back to a Vicuna template instead, which also puts Vicuna's system prompt ("A chat between a
# curious user and an artificial intelligence assistant. ...") before "USER:"; llava-hf's own checkpoints ship the
# template below, so their prompts are llava_hf's.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def manifest():
    """The `lmms_eval.models` entry point's payload (setup.cfg)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="rcp_llava.lmms_eval_model.RcpLlava")


def budget_tokens(budget, num_visual_tokens):
    """`budget` as visual tokens: a count (`64`, `1`) or a fraction of the image's tokens (`1/9`, `0.25`, `1.0`).
    A whole number is always a count: `budget=1` keeps one token (read as the fraction 1 it kept all of them)."""
    text = str(budget).strip()
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"rcp_llava: `budget` {budget!r} is neither a token count (64) nor a fraction (1/9).") from None
    if value <= 0:
        raise ValueError(f"rcp_llava: `budget` {budget!r} must be a positive token count or fraction.")
    if num_visual_tokens is None:  # syntax only, before the model (and so the image's token count) is known
        return None
    if text.isdigit() and not 1 <= value <= num_visual_tokens:
        raise ValueError(f"rcp_llava: `budget` {budget!r} must be between 1 and the {num_visual_tokens} visual tokens.")
    if value > 1 or text.isdigit():
        if value != int(value) or value > num_visual_tokens:
            raise ValueError(f"rcp_llava: `budget` {budget!r} must be a whole number of the {num_visual_tokens} "
                             "visual tokens, or a fraction of them.")
        return int(value)
    return budget_count(parse_budget(text)[1], num_visual_tokens)


def _as_bool(value, name):
    """lmms-eval passes model arguments as strings (or what its parser made of them): `true` / `false` and the like."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"rcp_llava: `{name}` is {value!r}; use true or false.")
    return text in ("1", "true", "yes")


def _as_int(value, name, minimum=1):
    """A whole-number model argument (`max_new_tokens`, `batch_size`), named in the error."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"rcp_llava: `{name}` is {value!r}; give a whole number >= {minimum}.")
    return number


def process_device(device, environ=None):
    """The device this process evaluates on: `device` (lmms-eval's `--device`; default cuda when available), a bare
    "cuda" read as this process's own GPU, cuda:LOCAL_RANK, when lmms-eval runs data-parallel (`accelerate launch` and
    torchrun set WORLD_SIZE and LOCAL_RANK; lmms-eval shards the requests by rank itself): every rank loaded the
    model on cuda:0, where llava_hf binds each rank to its GPU."""
    environ = os.environ if environ is None else environ
    name = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda" and int(environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def _as_dtype(value):
    """`auto` (None: the checkpoint's own) or a torch floating dtype by name (`bfloat16`, `torch.float16`)."""
    if value in (None, "", "auto"):
        return None
    if isinstance(value, torch.dtype):
        return value
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(value).strip().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"rcp_llava: `dtype` is {value!r}; use auto, float32, bfloat16 or float16.")
    return dtype


def _keep_counts(value):
    """`pruning_keep_counts=93:25:8` (or `93,25,8` from Python) as a list of counts, named in the error."""
    parts = [c.strip() for c in str(value).replace(",", ":").split(":") if c.strip()]
    if not parts or not all(c.isdigit() for c in parts):
        raise ValueError(f"rcp_llava: `pruning_keep_counts` is {value!r}; give one count per pruning layer, "
                         "separated by ':', e.g. 93:25:8.")
    return [int(c) for c in parts]


class RcpLlava(lmms):
    """An RCP-LLaVA model (or any pruning method of this package) behind lmms-eval's model API."""

    def __init__(self, pretrained, plugins=None, revision=None, plugins_revision=None, pruning_method="rcp",
                 budget=None, flop_matched=False, pruning_keep_counts=None, batch_size=1, device=None, dtype="auto",
                 max_new_tokens=128, **kwargs):
        if _LMMS_MISSING is not None:
            raise ImportError("rcp_llava's lmms-eval model needs lmms-eval: `pip install -e \".[lmms]\"` "
                              f"({_LMMS_MISSING}).")
        super().__init__()
        if kwargs:
            raise ValueError(f"rcp_llava: unknown model arguments {sorted(kwargs)}; see `rcp_llava.lmms_eval_model`.")
        from transformers import AutoConfig, AutoProcessor

        # The arguments' syntax is checked before the model loads; what depends on the checkpoint (a budget's range,
        # one count per pruning layer) right after it.
        self._device = process_device(device)
        dtype = _as_dtype(dtype)
        if str(batch_size).strip().startswith("auto"):
            raise ValueError(f"rcp_llava: `batch_size` {batch_size!r} is not supported; give a number "
                             "(--batch_size 8).")
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size")
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        counts = None if pruning_keep_counts in (None, "") else _keep_counts(pruning_keep_counts)
        flop_matched = _as_bool(flop_matched, "flop_matched")
        if counts is not None and budget not in (None, ""):
            raise ValueError(f"rcp_llava: give `budget` ({budget!r}) or `pruning_keep_counts` "
                             f"({pruning_keep_counts!r}), not both.")
        if flop_matched and budget in (None, ""):
            raise ValueError("rcp_llava: `flop_matched=true` sets how `budget` is met; give a `budget` too.")
        if pruning_method == "none" and (counts is not None or budget not in (None, "")):
            # Taken silently, a results file whose model_args say `budget=64` would hold the unpruned model's scores.
            given = f"budget={budget}" if counts is None else f"pruning_keep_counts={pruning_keep_counts}"
            raise ValueError(f"rcp_llava: `pruning_method=none` prunes nothing, so `{given}` would be ignored; drop it, "
                             "or name a pruning method.")
        if budget not in (None, ""):
            budget_tokens(budget, None)  # its syntax; the range needs the checkpoint's visual token count
        if pruning_method not in PRUNING_METHODS:
            raise ValueError(f"rcp_llava: `pruning_method` is {pruning_method!r}; use one of {sorted(PRUNING_METHODS)}.")
        if plugins_revision and not plugins:
            # Taken silently, the results would be the checkpoint's own plug-ins' under a revision that named others.
            raise ValueError(f"rcp_llava: `plugins_revision={plugins_revision}` is the revision of `plugins`, and no "
                             "`plugins` is given; add `plugins=` (a plug-in folder or Hub repo) or drop it.")
        hub = {"revision": revision} if revision else {}
        stock = not plugins and AutoConfig.from_pretrained(pretrained, **hub).model_type != "rcp_llava"
        if stock and PRUNING_METHODS[pruning_method].plugins:
            # A stock checkpoint has no trained plug-ins: RCP ran on freshly initialised ones, and the results file
            # named the stock model (as benchmarks/evaluate_methods.py refuses it). The training-free methods run on
            # it at the default placement, as before.
            raise ValueError(f"rcp_llava: pruning_method={pruning_method!r} runs the model's trained plug-ins, and "
                             f"{pretrained!r} is a stock LLaVA checkpoint, which has none: give `plugins=` (an RCP "
                             "plug-in folder or Hub repo) or an RCP model as `pretrained`, or run a training-free "
                             "method on it (attention_topk, vispruner, fastv, random with `budget=K`; or none).")
        # In the dtype at load, as transformers' own loading: the plug-ins stay float32 on a half-precision backbone
        # (`.to(dtype)` after the load cast them too, and the scores were no longer those of the saved model).
        loading = {"dtype": dtype} if dtype is not None else {}
        if plugins:
            model = RcpLlavaForConditionalGeneration.from_base(pretrained, plugins=plugins, revision=revision,
                                                               plugins_revision=plugins_revision, **loading)
        else:
            model = RcpLlavaForConditionalGeneration.from_pretrained(pretrained, **hub, **loading)
        model = model.to(self._device)
        overrides = {}
        if counts is not None:
            overrides = dict(pruning_method=pruning_method, pruning_keep_counts=counts)
        elif budget not in (None, ""):
            k = budget_tokens(budget, model.config.num_visual_tokens)
            try:
                overrides = method_overrides(pruning_method, k, model.config, flop_matched=flop_matched)
            except ValueError as err:  # named by the config field it set; the user gave `budget`
                raise ValueError(f"rcp_llava: `budget={budget}` ({k} tokens) with pruning_method={pruning_method!r}"
                                 f"{', flop_matched=true' if flop_matched else ''}: {err}") from None
        elif pruning_method != model.config.pruning_method:
            overrides = dict(pruning_method=pruning_method)
        try:
            self._model = method_model(model, **overrides).eval() if overrides else model.eval()
        except ValueError as err:
            spec = PRUNING_METHODS[pruning_method]
            if counts is None:  # only the method given: the config's message named fields --model_args does not take
                # A budget sets the layers of a method that prunes elsewhere; one pruning at RCP's layers needs them.
                budgeted = not uses_rcp_placement(spec) or bool(model.config.pruning_layers)
                hint = (" Give `budget=K` (visual tokens to keep, e.g. budget=64 or budget=1/9): it sets the method's "
                        "layers and counts." if budgeted else f" It prunes at the model's RCP pruning layers, and "
                        f"{pretrained!r} has none: use a checkpoint with RCP plug-ins, or another method.")
                raise ValueError(
                    f"rcp_llava: pruning_method={pruning_method!r} on {pretrained!r} (saved with pruning_method="
                    f"{model.config.pruning_method!r}, pruning layers {list(model.config.pruning_layers)}): {err}"
                    f"{hint}") from None
            # A method that prunes elsewhere was told of config fields (`pre_llm_keep_count`, `pruning_layers`) that
            # `--model_args` does not take: the user gave counts for the model's pruning layers.
            elsewhere = (not spec.in_decoder) or spec.max_pruning_layers == 1
            hint = (f" The counts are kept tokens at the model's pruning layers {list(model.config.pruning_layers)}; "
                    "for a method that prunes elsewhere (vispruner before the LLM, fastv at one layer) give "
                    "`budget=K` instead." if elsewhere else "")
            raise ValueError(f"rcp_llava: `pruning_keep_counts={pruning_keep_counts}` with pruning_method="
                             f"{pruning_method!r}: {err}{hint}") from None
        self.processor = AutoProcessor.from_pretrained(pretrained, **hub)
        if self.processor.chat_template is None:  # apply_chat_template raised on every request
            logger.warning(f"rcp_llava: {pretrained!r} has no chat template; using LLaVA-1.5's (llava-hf's).")
            self.processor.chat_template = LLAVA_15_CHAT_TEMPLATE
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:  # a batch is padded: transformers' "Asking to pad" at the first request
            if tokenizer.eos_token is None:
                raise ValueError(f"rcp_llava: the tokenizer of {pretrained!r} has neither a pad nor an EOS token, and "
                                 "batches are padded; save it with a pad token (tokenizer.pad_token = ...).")
            logger.warning(f"rcp_llava: the tokenizer of {pretrained!r} has no pad token; padding with its EOS token "
                           f"{tokenizer.eos_token!r} (left padding, masked out), as llava_hf generates with EOS.")
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        # This process's place in a data-parallel run (`accelerate launch` and torchrun set RANK and WORLD_SIZE), where
        # lmms-eval shards the documents: its 0.7.0 evaluator sizes each rank's padding by `lm.rank`, which was 0 on
        # every rank (0.7.3 sets both on the model itself, from the same variables).
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        # Each document's visual tokens per decoder layer (mean over the layers), in the order they ran, and per task:
        # lmms-eval's results hold the scores only, and a comparison at equal compute needs these too
        # (`visual_token_summary`). What the summary reads of the model is kept here: lmms-eval's `clean()` deletes
        # the model once its requests have run, before a user reads the summary.
        self.visual_tokens_per_layer = []
        self.visual_tokens_by_task = {}
        self._num_visual_tokens = model.config.num_visual_tokens
        self._pruning_method = self._model.config.pruning_method

    # -- lmms-eval's properties ------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # -- requests ----------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, task, split, doc_id):
        """The document's images as a list: none (a text-only question), one, or several (unpruned only)."""
        visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        images = [v.convert("RGB") for v in visuals if hasattr(v, "convert")]
        kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
        if len(images) != len(visuals):
            raise ValueError(f"rcp_llava: visuals must be images (PIL images); {task}/{split} doc {doc_id} gives "
                             f"{len(visuals)} visual(s) ({kinds}), {len(images)} of them image(s).")
        if len(images) > 1 and self.model.config.pruning_method != "none":
            raise ValueError(f"rcp_llava: pruning_method={self.model.config.pruning_method!r} prunes one image per "
                             f"prompt; {task}/{split} doc {doc_id} gives {len(images)} images. Evaluate this task with "
                             "pruning_method=none, or leave it out.")
        return images

    def _encode(self, images, prompts):
        """The processor's batch (left-padded) on the model's device, pixel values in the model's dtype. `images`
        holds each prompt's list of images (possibly empty), in the order of the prompts' image tokens."""
        flat = [image for row in images for image in row]
        inputs = encode_texts(self.processor, prompts, flat or None, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _record_visual_tokens(self, images, keys, recorded):
        """Append the visual tokens per decoder layer of the documents the model just ran (`images`: each one's list,
        in batch order; `keys`: each one's (task, split, doc id)), read from its `last_pruning_info`; documents
        without an image are left out, and so is a document this call has recorded already (`recorded`, the call's
        keys so far): lmms-eval's data-parallel padding (a rank with fewer documents runs copies of its last request)
        and a multiple-choice document's requests (one per choice, the same prompt) are one document."""
        config, info = self.model.config, self.model.last_pruning_info
        if info is None:  # nothing pruned: every layer reads all of each image's tokens
            per_doc = [config.num_visual_tokens * len(row) for row in images]
        else:
            rows = kept_tokens_per_layer(config, info.kept_counts, len(info.has_image), info.has_image)
            copies = len(rows) // len(images)  # generate's beams / return sequences repeat each row in place
            per_doc = [average_tokens(rows[i * copies]) for i in range(len(images))]
        for tokens, row, key in zip(per_doc, images, keys):
            if row and key not in recorded:
                recorded.add(key)
                self.visual_tokens_per_layer.append(tokens)
                self.visual_tokens_by_task.setdefault(key[0], []).append(tokens)

    def visual_token_summary(self):
        """`{"documents", "mean_visual_tokens_per_layer", "num_visual_tokens", "per_task"}` over the documents with an
        image so far (the mean over all decoder layers, the project's equal-compute budget; "per_task": the same two
        for each task, as lmms-eval runs several in one call), and logs it. Readable after lmms-eval's `clean()`. In a
        data-parallel run each rank holds and logs its own documents (the log says which rank): lmms-eval gathers
        its scores, not these."""

        def mean(done):
            return {"documents": len(done), "mean_visual_tokens_per_layer": sum(done) / len(done) if done else None}

        done = self.visual_tokens_per_layer
        summary = {**mean(done), "num_visual_tokens": self._num_visual_tokens,
                   "per_task": {task: mean(values) for task, values in sorted(self.visual_tokens_by_task.items())}}
        if done:
            tasks = "; ".join(f"{task}: {s['mean_visual_tokens_per_layer']:.2f} over {s['documents']}"
                              for task, s in summary["per_task"].items())
            # lmms-eval sets `_rank` / `_world_size` on the model from the launcher's environment (0.7.3's evaluator)
            rank = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
            eval_logger.info(f"rcp_llava{rank}: {len(done)} documents with an image read "
                             f"{summary['mean_visual_tokens_per_layer']:.2f} visual tokens per decoder layer on "
                             "average "
                             f"(of {summary['num_visual_tokens']} per image; pruning_method="
                             f"{self._pruning_method!r}; by task: {tasks})")
        return summary

    def _prompt(self, context, num_images=1):
        # The images go first, as the processor's chat template places them (tasks that write "<image>" themselves
        # get it removed from the text: the template adds one per image).
        question = context.replace(self.processor.image_token, "").strip()
        return self.processor.apply_chat_template(prompt_messages(question, num_images=num_images),
                                                  add_generation_prompt=True)

    @torch.no_grad()
    def generate_until(self, requests):
        results, recorded = [], set()

        def by_length(args):
            return -len(self.tokenizer.encode(args[0])), args[0]

        ordered = utils.Collator([r.args for r in requests], by_length, grouping=True)
        batches = ordered.get_batched(n=self.batch_size, batch_fn=None)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="rcp_llava responding")
        for batch in batches:
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*batch)
            gen_kwargs = dict(all_gen_kwargs[0])  # the Collator groups requests with equal generation arguments
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until = [stop for stop in until if stop != "\n\n"]  # lmms-eval's default for every task (docstring)
            images = [self._visuals(doc_to_visual[i], tasks[i], splits[i], doc_ids[i]) for i in range(len(batch))]
            inputs = self._encode(images, [self._prompt(c, len(row)) for c, row in zip(contexts, images)])
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            # A task's explicit `do_sample: false` wins over its temperature (as lmms-eval's llava_onevision reads it)
            sample = temperature > 0 and _as_bool(gen_kwargs.get("do_sample", True), "do_sample")
            max_new = gen_kwargs.get("max_new_tokens")  # a task may give None: the model's default, as in llava_hf
            max_new = self.max_new_tokens if max_new is None else _as_int(max_new, "max_new_tokens")
            generate = dict(max_new_tokens=max_new,
                            num_beams=int(gen_kwargs.get("num_beams", 1) or 1), do_sample=sample,
                            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eot_token_id)
            if sample:
                generate.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
            out = self.model.generate(**inputs, **generate)
            self._record_visual_tokens(images, list(zip(tasks, splits, doc_ids)), recorded)
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for text in texts:
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                results.append(text.strip())
            bar.update(len(batch))
        bar.close()
        self.visual_token_summary()
        return ordered.get_original(results)

    @torch.no_grad()
    def loglikelihood(self, requests):
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding gives
        exactly the continuation (one request at a time; the continuation is labelled, so the pruners condition
        on the question as in training)."""
        results, recorded = [], set()
        for context, continuation, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(images))
            full = self._encode([images], [prompt + continuation])
            ids = full["input_ids"][0]
            # Where the continuation's tokens begin (the collator's rule): counting the prompt's own tokens dropped
            # a continuation's first token when it absorbs the prompt's trailing space ("▁There").
            start = int(answer_starts(self.tokenizer, full["input_ids"].cpu(), [len(ids)], [prompt + continuation],
                                      [prompt], self.tokenizer.convert_tokens_to_ids(self.processor.image_token))[0])
            # A tokenizer that appends EOS to every text (`add_eos_token`) ends the prompt alone with it too: that
            # EOS is not the continuation's, so it is neither scored nor required of a greedy match.
            eos = self.tokenizer.eos_token_id
            appended = appends_eos(self.tokenizer, special_tokens_kwargs(self.tokenizer, [prompt]))
            tail = int(appended and int(ids[-1]) == eos and start < len(ids) - 1)
            labels = full["input_ids"].clone()
            labels[:, :start] = -100
            labels[:, len(ids) - tail:] = -100
            # (1, T', V): pruned visual positions are gone, but the continuation is the last text, right-aligned
            logits = self.model(**full, labels=labels).logits
            self._record_visual_tokens([images], [(task, split, doc_id)], recorded)
            target = ids[start:len(ids) - tail]  # (C,)
            stop = logits.shape[1] - 1 - tail
            scores = logits[0, stop - target.shape[0]:stop].float().log_softmax(-1)  # the continuation's predictions
            logprob = scores.gather(-1, target.unsqueeze(-1)).sum()
            greedy = bool((scores.argmax(-1) == target).all())
            results.append((float(logprob), greedy))
        self.visual_token_summary()
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("rcp_llava: multi-round generation is not implemented.")


# ------------------------------------------------------------------------------------------------
# A local task from the testbed (offline)
# ------------------------------------------------------------------------------------------------


TASK_UTILS = '''\
"""doc_to_* functions of the rcp_testbed task (written by rcp_llava.lmms_eval_model.write_testbed_task)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    # The testbed's answers are one word: the first generated word against it (the project's first-token score).
    words = results[0].strip().split()
    return {"exact_match": float(bool(words) and words[0] == str(doc["answer"]).strip())}
'''


def write_testbed_task(out_dir, dataset_dir=None, split="test", name="rcp_testbed"):
    """Write an lmms-eval task `name` over a testbed dataset folder (`save_to_disk`; default: the main job's testbed's)
    into `out_dir` (`name.yaml` and its functions, `name_utils.py`); run it with `--include_path out_dir --tasks
    name`. Returns the YAML's path."""
    if dataset_dir is None:
        from rcp_llava.evaluation import testbed_dataset_dir

        dataset_dir = testbed_dataset_dir()
    dataset_dir = os.path.abspath(str(dataset_dir))
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"`dataset_dir` {dataset_dir!r} does not exist; pass a built testbed's dataset "
                                "folder (`python benchmarks/build_testbed.py --preset deep` writes one).")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
        raise ValueError(f"`name` {name!r} must be letters, digits, '_', '.' or '-': it names the task and its "
                         "YAML file.")
    splits = saved_splits(dataset_dir)
    if splits is None:
        raise ValueError(f"`dataset_dir` {dataset_dir!r} is not a saved dataset with splits (no dataset_dict.json); "
                         "pass a testbed's dataset folder.")
    if split not in splits:
        raise ValueError(f"`split` {split!r} is not in {dataset_dir!r}, which has {splits}.")
    os.makedirs(out_dir, exist_ok=True)
    # Values as JSON strings, which YAML reads back verbatim (a path with '#' or ': ' did not survive bare).
    yaml = textwrap.dedent(f"""\
        task: {json.dumps(name)}
        dataset_path: {json.dumps(dataset_dir)}
        dataset_kwargs:
          load_from_disk: true
        test_split: {json.dumps(split)}
        output_type: generate_until
        doc_to_visual: !function {name}_utils.doc_to_visual
        doc_to_text: !function {name}_utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 1
          temperature: 0
        process_results: !function {name}_utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """)
    path = os.path.join(out_dir, f"{name}.yaml")
    # Its own module, named after the task: an --include_path folder's other tasks keep their `utils.py` (which
    # this overwrote).
    atomic_write(os.path.join(out_dir, f"{name}_utils.py"), lambda tmp: write_text(tmp, TASK_UTILS))
    atomic_write(path, lambda tmp: write_text(tmp, yaml))
    return path


__all__ = ["RcpLlava", "manifest", "write_testbed_task"]


if __name__ == "__main__":  # python -m rcp_llava.lmms_eval_model --write_task DIR [--dataset FOLDER] [--split S]
    import argparse

    parser = argparse.ArgumentParser(description="Write the offline lmms-eval task over a testbed dataset.")
    parser.add_argument("--write_task", required=True, metavar="DIR")
    parser.add_argument("--dataset", default=None, help="testbed dataset folder (default: the main job's testbed's)")
    parser.add_argument("--split", default="test")
    from rcp_llava.results import result_stem

    parser.add_argument("--name", default="rcp_testbed", type=result_stem("--write_task"))  # NAME.yaml, NAME_utils.py
    a = parser.parse_args()
    print(write_testbed_task(a.write_task, a.dataset, a.split, a.name))
