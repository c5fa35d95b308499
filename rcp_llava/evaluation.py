"""Evaluate pruning methods side by side: methods x budgets on one shared backbone (the paper's Table I).

    from rcp_llava.evaluation import evaluate_grid, format_table, load_base_model, load_data
    base, processor = load_base_model("outputs/rcp_deep/model")  # the main job's, on its testbed
    result = evaluate_grid(base, processor, load_data("testbed", max_samples=500), methods=["none", "rcp", "vispruner"],
                           budgets=["1/3", "2/9", "1/9"])
    print(format_table(result))

Budgets are fractions of the N visual tokens of an image; a method at budget b keeps k = `budget_count(b, N)`
(b * N rounded half up, at least 1):

* `vispruner`, `random`: k tokens before the LLM (`pre_llm_keep_count=k`): every decoder layer sees k.
* `fastv`: k tokens after the layer K (`pruning_layers=[K]`, `pruning_keep_counts=[k]`); layers before K see N.
* `attention_topk`: the RCP model's pruning layers with the counts below, ranked by the LLM's own attention.
* `rcp`: the trained plug-ins with FIXED keep counts whose average over the layers from the first pruner equals
  k (`rcp_llava.schedule.rcp_keep_counts`): the proportions between stages are those of the paper's Table VI
  (16.72 : 4.59 : 1.44 % retained after its three pruners), interpolated log-linearly over the relative pruner
  index when the model has another number of pruning layers; counts are integers, non-increasing, at most N and
  at least 1: the real-valued solution rounded, then nudged one stage by +-1 at a time while the average gets
  closer to k (a local search: the average lands within about 0.1 token of k on the testbeds, not always as close
  as integers allow -- a change of two stages at once can reach k exactly). Plus one row `rcp (adaptive)`: the
  trained threshold (Eq. 8), keeping whatever it keeps.
* `none`: once, all N tokens.

Every row reports the average visual tokens per decoder layer over ALL layers and over the layers from the first
pruning point on (identical for pre-LLM methods); a method that prunes late at k keeps more tokens in total than
one that prunes before the LLM at k, and the two columns say so.

Scoring (`evaluate_model`, the one evaluator: this grid, the ablations and `train_rcp.py`'s main job use it): on
rows in the testbed format whose answers are one token each (the testbed's) the greedy first token, read from one
prefill with physical discard (`first_token_predictions`); when any reference spans several tokens (a user's own
data), greedy `generate` up to the longest reference, each row's answer cut to its reference's token count and
matched exactly (`greedy_answer_predictions`); on a reader benchmark (`rcp_llava.readers`) `generate` with left
padding, decoded and scored with the benchmark's metric (`BENCHMARK_METRIC`). Its result is one schema, `{"score",
"n", "groups", "predictions", "kept_per_point", "tokens_per_layer", ...}` (see `evaluate_model`).

Budgets, keep counts and token accounting live in `rcp_llava.schedule`; prompts in `rcp_llava.data`.
"""

import copy
import math
import os
import re
from contextlib import contextmanager

import torch

from configuration_rcp_llava import PRUNING_METHODS, default_fastv_layer
from modeling_rcp_llava import (
    RcpLlavaForConditionalGeneration,
    check_model_source,
    fresh_plugins,
    share_backbone,
)
from rcp_llava.data import RcpDataCollator, _column_batches, load_image, prompt_batch
from rcp_llava.flops import decoder_layer_flops
from rcp_llava.losses import LayerOutputs, gaussian_w2
from rcp_llava.schedule import (  # noqa: F401 -- budget_count, parse_budget, ... are also read from here
    TABLE_VI_RETENTION,
    average_tokens,
    budget_count,
    kept_tokens_per_layer,
    parse_budget,
    rcp_keep_counts,
    round_count,
    scheduled_tokens_per_layer,
    stage_proportions,
)


DEFAULT_BUDGETS = ("1/3", "2/9", "1/9")
# Headline number of each reader metric (the table's score for that benchmark).
METRIC_KEY = {"vqa_accuracy": "vqa_accuracy", "exact_match": "exact_match", "pope": "f1", "mme": "perception_score"}


def headline_key(metric_name, families):
    """The key of the table's score for reader metric `metric_name` on records of these families: `METRIC_KEY`'s,
    except MME data of cognition sub-tasks only (`subtasks=`), whose perception total is 0 for every method: its
    cognition total, as MME reports the two apart."""
    from rcp_llava.metrics.mme.mme import PERCEPTION_SUBTASKS

    perception = {t.lower() for t in PERCEPTION_SUBTASKS}
    if metric_name == "mme" and not {str(f).lower() for f in families} & perception:  # the metric ignores case too
        return "cognition_score"
    return METRIC_KEY[metric_name]


# ------------------------------------------------------------------------------------------------
# Budgets -> per-method configurations
# ------------------------------------------------------------------------------------------------


def available_methods():
    """The pruning methods the grid can evaluate: every registered `pruning_method` (a method registered at run
    time with `modeling_rcp_llava.register_pruning_method` included)."""
    return tuple(PRUNING_METHODS)


def _method_spec(method):
    if method not in PRUNING_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {list(available_methods())}.")
    return PRUNING_METHODS[method]


def uses_rcp_placement(spec):
    """In-decoder methods without a placement of their own (not pre-LLM, not single-layer like FastV) prune at the
    RCP model's layers."""
    return spec.in_decoder and not spec.pre_llm and spec.max_pruning_layers != 1


def method_overrides(method, k, config, fastv_layer=None, flop_matched=False):
    """Config overrides of `method` at k kept visual tokens, for a model shaped like `config`, read from the
    method's registered `PruningMethod`: a method that can prune before the LLM does so (`pre_llm_keep_count=k`);
    a single-layer method (FastV) prunes before `fastv_layer` (default `default_fastv_layer`); any other in-decoder
    method prunes at the RCP model's layers with the counts of `rcp_keep_counts`, and keeps the repair adapters
    if it has plug-ins.

    flop_matched: k is the mean number of visual tokens over ALL decoder layers (the paper's budget, equal decoder
    compute for every method; issue 16), not over the layers from the first pruner: the in-decoder counts are
    `rcp_llava.flops.keep_counts_for_budget` (the layers before the first pruner hold all N tokens, the stages
    keep the Table VI proportions), FastV keeps `(k L - N K) / (L - K)` after its layer K (the default K, or the
    largest smaller K that can reach k when `fastv_layer` is not given). A budget the placement cannot reach
    raises a ValueError (`planned_rows` reports such a cell instead of running it).

    `config` is the loaded (RCP) model's config: its pruning / repair layers are RCP's placement.
    """
    from rcp_llava.flops import keep_counts_for_budget

    spec = _method_spec(method)
    num_layers = config.text_config.num_hidden_layers
    n = config.num_visual_tokens
    baseline = dict(pruning_method=method, repair_layers=[], pruning_keep_counts=None, pre_llm_keep_count=None)
    if not spec.prunes:
        return dict(baseline, pruning_layers=[])
    if spec.pre_llm:
        return dict(baseline, pruning_layers=[], pre_llm_keep_count=k)
    if spec.max_pruning_layers == 1:
        layer = default_fastv_layer(num_layers) if fastv_layer is None else fastv_layer
        if not flop_matched:
            return dict(baseline, pruning_layers=[layer], pruning_keep_counts=[k])
        candidates = [layer] if fastv_layer is not None else range(layer, 0, -1)
        for layer in candidates:  # the largest K <= the default whose count is at least 1
            count = min(n, round_count((k * num_layers - n * layer) / (num_layers - layer)))
            if k * num_layers - n * layer >= num_layers - layer:
                return dict(baseline, pruning_layers=[layer], pruning_keep_counts=[count])
        raise ValueError(f"{method!r} cannot average {k} visual tokens over all {num_layers} layers: its layer "
                         f"{candidates[-1]} alone holds {n} for {candidates[-1]} layer(s).")
    layers = list(config.pruning_layers)
    if not layers:
        raise ValueError(f"{method!r} needs the model's RCP pruning layers, but the model has none.")
    if spec.max_pruning_layers is not None and len(layers) > spec.max_pruning_layers:
        raise ValueError(f"{method!r} prunes at most {spec.max_pruning_layers} layers; the RCP model has {layers}.")
    if flop_matched:
        counts = keep_counts_for_budget(num_layers, n, layers, k, stage_proportions(len(layers)))
    else:
        counts = rcp_keep_counts(k, layers, num_layers, n)
    repair = list(config.repair_layers) if spec.plugins else []
    return dict(baseline, pruning_layers=layers, repair_layers=repair, pruning_keep_counts=counts)


# ------------------------------------------------------------------------------------------------
# Models: one backbone, one model per method
# ------------------------------------------------------------------------------------------------


_STRUCTURAL = ("pruning_layers", "repair_layers", "pruner_hidden_size", "repair_bottleneck_size",
               "num_pruning_queries", "pruner_num_heads")


def method_model(base, fresh_plugins=False, **overrides):
    """A model with `base`'s config changed by `overrides` that SHARES `base`'s backbone modules.

    Built on the meta device; the vision tower, projector, language model and LM head are `base`'s own modules
    (no copy), so building one model per method costs no memory and never touches `base` (its config, plug-ins
    and runtime switches stay as they are). An RCP model with `base`'s plug-in placement shares `base`'s plug-ins
    too (trained weights, other keep counts) unless `fresh_plugins=True`; any other RCP placement, and
    `fresh_plugins=True`, gets freshly initialised plug-ins (`fresh_plugins_for`). Baselines have no plug-ins.
    """
    config = copy.deepcopy(base.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"Unknown config field {key!r}.")
        setattr(config, key, list(value) if isinstance(value, tuple) else value)
    if not config.pruning_spec.plugins:
        config.repair_layers = []
    config.validate_pruning()
    with torch.device("meta"):
        model = RcpLlavaForConditionalGeneration(config)
    share_backbone(model, base)
    param = next(base.parameters())
    same_plugins = (config.pruning_spec.plugins and config.pruning_method == base.config.pruning_method
                    and all(getattr(config, f) == getattr(base.config, f) for f in _STRUCTURAL))
    if same_plugins and not fresh_plugins:
        model.model.rcp_plugins = base.model.rcp_plugins
    else:
        model.model.rcp_plugins = fresh_plugins_for(model, param.device, param.dtype)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"method_model left tensors on the meta device: {leftover[:5]}")
    return model.eval()


def fresh_plugins_for(model, device, dtype):
    """`model.config`'s plug-ins, initialised as `from_pretrained(stock LLaVA)` initialises them
    (`modeling_rcp_llava.fresh_plugins`)."""
    return fresh_plugins(model, device, dtype)


def load_base_model(model_dir, plugins=None, dtype=None, device=None):
    """`(model, processor)` from an RCP folder (`train_rcp.py`'s `OUT/model`), or a stock LLaVA folder (+ an
    optional plug-in folder). A stock folder without plug-ins loads with `pruning_method="none"` (no RCP rows)."""
    from transformers import AutoConfig, AutoProcessor

    check_model_source(model_dir, "model_dir")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if plugins is not None:
        model = RcpLlavaForConditionalGeneration.from_base(model_dir, plugins=plugins, **kwargs)
    elif AutoConfig.from_pretrained(model_dir).model_type == "rcp_llava":
        model = RcpLlavaForConditionalGeneration.from_pretrained(model_dir, **kwargs)
    else:
        model = RcpLlavaForConditionalGeneration.from_pretrained(
            model_dir, pruning_method="none", pruning_layers=[], repair_layers=[], **kwargs)
    if device is not None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


class EvalData:
    """Rows to evaluate: `kind` "testbed" (rows with an image, a question, a one-word answer and optionally a
    "family"; the column names are settable, and image paths are read relative to `image_folder`) or "benchmark"
    (`VqaRecord`s of one reader benchmark); `name` labels it in the table; `split` is the split it was read from
    (None when its source has no splits: a plain dataset folder, a benchmark whose reader takes none)."""

    def __init__(self, kind, rows, name, benchmark=None, image_column="image", question_column="question",
                 answer_column="answer", image_folder=None, split=None):
        self.kind, self.rows, self.name, self.benchmark = kind, rows, name, benchmark
        self.image_column, self.question_column, self.answer_column = image_column, question_column, answer_column
        self.image_folder, self.split = image_folder, split

    def __len__(self):
        return len(self.rows)


def testbed_dataset_dir(preset=None):
    """The dataset folder of testbed `preset` (default: the main job's), as a string; FileNotFoundError naming the
    build command when it is not built, or only half-written (an earlier version's interrupted save, which the
    build command generates again)."""
    from rcp_llava.testbed import MAIN_PRESET, PRESETS, default_cache_dir
    from rcp_llava.testbed.build import missing_dataset_file

    preset = preset or MAIN_PRESET
    if preset not in PRESETS:
        raise ValueError(f"Unknown testbed preset {preset!r} in 'testbed:{preset}'; choose one of {sorted(PRESETS)}.")
    folder = str(default_cache_dir(preset) / "dataset")
    job = "python train_rcp.py" + ("" if preset == MAIN_PRESET else f" --testbed_preset {preset}")
    build = f"`python benchmarks/build_testbed.py --preset {preset}` (or `{job}`, which builds it)"
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The {preset!r} testbed is not built ({folder}); run {build}.")
    missing = missing_dataset_file(folder)
    if missing is not None:
        raise FileNotFoundError(f"The {preset!r} testbed's dataset {folder} is incomplete ({missing} is missing: its "
                                f"save was interrupted); run {build} to generate it again.")
    return folder


def data_folder(spec):
    """`spec` as a folder: `"testbed"` / `"testbed:PRESET"` become that testbed's dataset folder
    (`testbed_dataset_dir`), anything else (a folder, a Path, BENCHMARK:PATH) comes back as a string unchanged."""
    spec = os.fspath(spec)
    if spec == "testbed" or spec.startswith("testbed:"):
        return testbed_dataset_dir(spec.partition(":")[2] or None)
    return spec


def load_saved_dataset(folder, flag="--data"):
    """`datasets.load_from_disk(folder)` of an existing folder; one that holds no `save_to_disk` dataset (a testbed
    build's own folder, above its `dataset/`) is refused naming `flag` and the fix, not with datasets' "neither a
    `Dataset` directory nor a `DatasetDict` directory"."""
    from datasets import load_from_disk

    try:
        return load_from_disk(folder)
    except FileNotFoundError:
        if any(os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json")):
            raise  # a saved dataset with a file missing (a split half-copied): datasets names the file
        inner = os.path.join(folder, "dataset")
        hint = (f"; it holds {inner!r} (a testbed build's dataset): pass that" if os.path.isdir(inner) else
                "; pass a `save_to_disk` folder such as build_testbed.py's OUT/dataset")
        raise ValueError(f"{flag} {os.fspath(folder)!r} is a folder, but no `save_to_disk` dataset (no "
                         f"dataset_dict.json or state.json){hint}.") from None


def load_data(spec="testbed", split="test", max_samples=None, image_folder=None):
    """`"testbed"` (the main job's testbed, `rcp_llava.testbed.MAIN_PRESET`) or `"testbed:PRESET"` (e.g.
    `testbed:tiny`), a `save_to_disk` folder in the testbed format, or `"BENCHMARK:PATH[,OPTION=VALUE...]"` for
    `rcp_llava.readers.read_benchmark` (`parse_benchmark_spec`: e.g.
    `pope:/data/pope/coco,image_dir=/data/coco/val2014`).

    `split` is the split of a DatasetDict folder, and of a benchmark whose reader takes one (ScienceQA-IMG's
    `pid_splits.json` key) unless the spec names its own `,split=`. `max_samples` keeps the first rows of a
    folder, and records spread over a benchmark's families (`rcp_llava.readers.spread_subset`). `image_folder`:
    the folder a dataset folder's image paths are relative to (`train_rcp.py --image_folder`); a benchmark takes
    `,image_dir=` instead.

    Checked here, before any model loads: every image path of the rows kept must name a file (one stat per
    distinct path; a FileNotFoundError names how many are missing, the first of them and the fix), and every
    benchmark question needs reference answers (a split without them, such as VQAv2 test-dev, VizWiz test or
    MMBench test, is refused with a ValueError naming the file and a split that has them)."""
    from types import SimpleNamespace

    from rcp_llava.data import _check_image_column

    name = data_name(spec)
    if is_benchmark_spec(spec):
        if image_folder is not None:  # it would be ignored: benchmark readers resolve their own image paths
            raise ValueError(f"image_folder {image_folder!r} is for dataset folders; the benchmark {spec!r} takes "
                             "its image folder in the spec: BENCHMARK:PATH,image_dir=DIR.")
        return _load_benchmark(spec, split, max_samples)
    spec = data_folder(spec)
    if not os.path.isdir(spec):
        exists = os.path.exists(spec)  # a missing path is a FileNotFoundError, as the readers say it
        raise (ValueError if exists else FileNotFoundError)(
            f"--data {spec!r} is neither 'testbed', a dataset folder nor BENCHMARK:PATH"
            f"{'' if exists else ' (no such folder)'}.")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"image_folder {os.fspath(image_folder)!r} (--image_folder) is not a folder; give "
                                "the folder the dataset's image paths are relative to.")
    data = load_saved_dataset(spec)
    used_split = None
    if hasattr(data, "keys"):
        if split not in data:
            raise ValueError(f"{spec} has no split {split!r}; it has {list(data)}.")
        data, used_split = data[split], split
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    missing = {"image", "question", "answer"} - set(data.column_names)
    if missing:
        raise ValueError(f"{spec} lacks the column(s) {sorted(missing)} of the testbed format.")
    if len(data) and isinstance(data[0]["question"], (list, tuple)):  # scored as the rendered list otherwise
        raise ValueError(f"{spec} split {split!r} holds multi-turn rows (lists of questions): the evaluation "
                         "scores one question per image. Give a single-turn split.")
    for column in ("question", "answer"):  # a list or null answer was scored as its repr ("['a', 'a']", "None")
        values = data[column]
        bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
        if bad is not None:
            raise ValueError(f"{spec} split {split!r}: row {bad}'s {column!r} is {values[bad]!r}, not text; the "
                             "testbed format holds one question and one answer string per row.")
    # Image paths are opened only when a batch reaches them, after the model loaded and earlier datasets ran:
    # the training check (a stat per path, the example and --image_folder named) refuses a missing one now.
    _check_image_column(data, SimpleNamespace(image_column="image", image_folder=image_folder), f"--data {name!r}")
    return EvalData("testbed", data, name, image_folder=image_folder, split=used_split)


def data_name(spec):
    """The label of the data read from `spec` (the table's section, the JSON's "data"): the spec as given
    ("testbed", "testbed:tiny", a folder's path, "pope:/data/pope/coco"). Folders are always named so (every
    folder was "testbed"); a benchmark is named by its benchmark unless two share it (`name_uniquely`)."""
    return str(os.fspath(spec))


def name_uniquely(datasets, specs):
    """Rename, in place, the `datasets` (loaded from `specs`, in order) whose names collide to `data_name(spec)`:
    two POPE files were both "pope" in the table and the JSON. The same spec twice is a ValueError."""
    specs = [data_name(spec) for spec in specs]
    repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
    if repeated:
        raise ValueError(f"--data names {repeated} more than once; give each once.")
    names = [data.name for data in datasets]
    for data, spec in zip(datasets, specs):
        if names.count(data.name) > 1:
            data.name = spec
    return datasets


def check_split_used(split, datasets, specs, flag="--split", data_flag="--data"):
    """Refuse an explicit `split` (`flag`; None = not given) that none of `datasets` (loaded from `specs`) was read
    by: `load_data` reads a plain dataset folder whole, whatever the split, so a run on a folder of training rows
    asked for 'test' was labelled 'test'. One home for every script that takes a split (evaluate_methods.py,
    headroom_split.py)."""
    if split is not None and not any(data.split == split for data in datasets):
        raise ValueError(f"{flag} {split!r} is used by no {data_flag} ({list(map(str, specs))}): only a DatasetDict "
                         f"folder and ScienceQA-IMG (without its own ',split=') are read by split. Drop {flag}.")


def split_read(data):
    """What a result file says was evaluated: the split `data` was read from, or that its source has none."""
    return f"split {data.split!r}" if data.split is not None else "no split: the folder's rows, read whole"


def is_benchmark_spec(spec):
    """Whether `load_data` reads `spec` as BENCHMARK:PATH (not 'testbed[:PRESET]', not an existing folder)."""
    spec = os.fspath(spec)
    return not (spec == "testbed" or spec.startswith("testbed:")) and not os.path.isdir(spec) and ":" in spec


# A reader option in a BENCHMARK:PATH spec: ",NAME=" (a comma in a path not followed by NAME= stays in the path).
_SPEC_OPTION = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_]*=)")

# Where the reference answers of each benchmark are, for the error on an answer-less split.
_SPLITS_WITH_ANSWERS = {
    "vqav2": "the val2014 questions with their annotations, as ',annotations=FILE' (found without it only as a "
             "folder's one '*annotations*.json', or as the one beside a questions file whose name holds its "
             "subtype, e.g. v2_mscoco_val2014_annotations.json); test-dev / test answers exist only on the EvalAI "
             "server",
    "gqa": "testdev_balanced_questions.json (questions with an 'answer'); the submission / test questions have none",
    "vizwiz": "Annotations/val.json (test answers exist only on the EvalAI server)",
    "mmbench": "the dev TSV (e.g. mmbench_dev_20230712.tsv; test answers exist only on the MMBench server)",
}


def parse_benchmark_spec(spec, split=None):
    """`"BENCHMARK:PATH[,OPTION=VALUE...]"` -> `(benchmark, path, reader options)`.

    OPTIONs are the reader's arguments after `path` (`rcp_llava.readers.reader_options`: `image_dir` for VQAv2,
    GQA, POPE, ScienceQA-IMG and VizWiz, `annotations` / `data_subtype` for VQAv2, `split` for ScienceQA-IMG,
    `subtasks` for MME, several joined by '+'). `split` (load_data's) is passed to a reader that takes a split,
    unless the spec names one. An unknown, repeated or empty option is a ValueError naming it and the options."""
    from rcp_llava.readers import canonical_benchmark, reader_options

    name, _, rest = os.fspath(spec).partition(":")
    name = canonical_benchmark(name)
    path, *items = _SPEC_OPTION.split(rest)
    if not path:
        raise ValueError(f"--data {spec!r} names no PATH; write {name}:PATH[,OPTION=VALUE...].")
    allowed = reader_options(name)
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ValueError(f"--data {spec!r}: the {name} reader has no option {key!r}; its options are {allowed} "
                             f"({name}:PATH,OPTION=VALUE,...).")
        if key in options:
            raise ValueError(f"--data {spec!r} gives the option {key!r} twice; give it once.")
        if not value:
            raise ValueError(f"--data {spec!r}: the option {key!r} is empty; write {key}=VALUE.")
        options[key] = value.split("+") if key == "subtasks" else value
    if "split" in allowed and "split" not in options and split is not None:
        options["split"] = split
    return name, path, options


def _load_benchmark(spec, split, max_samples):
    """`load_data` on a BENCHMARK:PATH spec: the records, refused when a question has no reference answer or an
    image file is missing (both would otherwise fail after the model loaded and, for answers, after generation)."""
    from rcp_llava.readers import read_benchmark, reader_options

    name, path, options = parse_benchmark_spec(spec, split)
    records = read_benchmark(name, path, limit=max_samples, **options)
    unanswered = [r for r in records if not r.answers]
    if unanswered:
        where = _SPLITS_WITH_ANSWERS.get(name, "a file whose questions have reference answers")
        raise ValueError(f"{name}: {path} has no reference answers ({len(unanswered)} of the {len(records)} questions "
                         f"read, e.g. question {unanswered[0].question_id!r}), so it cannot be scored; pass a split "
                         f"with answers: {where}.")
    # Every image, not the first alone: one missing in the middle failed mid-run and lost every dataset evaluated
    # before it. A stat per distinct path (POPE asks several questions per image); encoded images need none.
    paths = {}  # distinct path -> its first question
    for r in records:
        if not isinstance(r.image, (bytes, bytearray)):
            paths.setdefault(r.image, r.question_id)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        if "image_dir" not in reader_options(name):
            fix = "check the benchmark folder"
        elif "image_dir" in options:
            fix = f"the image_dir given, {options['image_dir']}, lacks them: pass the folder that holds them"
        else:
            fix = f"pass the folder that holds them: {name}:{path},image_dir=DIR"
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{name}: {len(missing)} of the {len(paths)} image files of --data {spec!r} do not "
                                f"exist ({shown}; the first for question {paths[missing[0]]!r}); {fix}.")
    return EvalData("benchmark", records, name, benchmark=name,
                    split=options.get("split") if "split" in reader_options(name) else None)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


@contextmanager
def pruning_layout(model, layout):
    """Run `model` in the pruning `layout` ("discard", "mask" or None), then restore the layout it had: an
    evaluator never leaves a model it was given changed."""
    inner = model.model
    previous = inner.pruning_layout
    inner.pruning_layout = layout
    try:
        yield model
    finally:
        inner.pruning_layout = previous


@torch.no_grad()
def first_token_predictions(model, processor, rows, keep_masks=None, image_column="image", question_column="question",
                            image_folder=None):
    """Greedy first answer token of each testbed row: one prefill with physical discard. The testbed's answers are
    one token, so this IS `generate`'s answer (longer references: `greedy_answer_predictions`).

    keep_masks: (B, P, N) bool kept sets that replace the method's own choice (`visual_keep_masks`).
    Returns `(predictions, kept_counts (B, P) or None, layer_retention (B, num_layers) or None)`.
    """
    model.eval()
    images = [load_image(r[image_column], image_folder) for r in rows]
    batch = prompt_batch(processor, [r[question_column] for r in rows], images)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if keep_masks is not None:
        keep_masks = keep_masks.to(device)
    with pruning_layout(model, "discard"):
        out = model(**batch, visual_keep_masks=keep_masks, use_cache=False, logits_to_keep=1)
    ids = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    predictions = [p.strip() for p in processor.tokenizer.batch_decode(ids)]
    return predictions, out.kept_counts, out.layer_retention


@torch.no_grad()
def greedy_answer_predictions(model, processor, rows, token_counts, keep_masks=None, image_column="image",
                              question_column="question", image_folder=None):
    """Greedy answers of testbed-format rows whose references are `token_counts` tokens long: `generate` (greedy,
    left padding, physical discard; `keep_masks` forces the kept sets of the prefill, as in
    `first_token_predictions`) for the longest count, each row's answer cut to its own count and decoded. A
    reference of n tokens thus matches when the model's first n greedy tokens decode to it: the first-token rule
    applied to every answer token (a one-token reference is scored exactly as `first_token_predictions` scores it).
    """
    model.eval()
    images = [load_image(r[image_column], image_folder) for r in rows]
    batch = prompt_batch(processor, [r[question_column] for r in rows], images)
    batch.pop("position_ids")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    forced = {} if keep_masks is None else {"visual_keep_masks": keep_masks.to(device)}
    with pruning_layout(model, "discard"):
        out = model.generate(**batch, max_new_tokens=max(token_counts), do_sample=False, **forced)
    answers = out[:, batch["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(answers[i, :n], skip_special_tokens=True).strip()
            for i, n in enumerate(token_counts)]


def reference_token_counts(processor, answers):
    """Tokens of each reference answer as the model writes it (no special tokens), at least 1."""
    if not answers:
        return []
    return [max(1, len(ids)) for ids in processor.tokenizer(list(answers), add_special_tokens=False)["input_ids"]]


def _column(rows, name):
    """Column `name` of testbed rows as a list: a `datasets.Dataset` reads the column alone (no image decoded)."""
    return [row[name] for _, batch in _column_batches(rows, [name]) for row in batch]


@torch.no_grad()
def generated_answers(model, processor, records, max_new_tokens=16):
    """`generate` (greedy, left padding) on reader records, each asked its `prompt` (the question + the benchmark's
    answer-format line, `rcp_llava.readers.POST_PROMPTS`). Returns `(answers, kept_counts (B, P) or None)`."""
    model.eval()
    batch = prompt_batch(processor, [r.prompt for r in records], [r.load_image() for r in records])
    batch.pop("position_ids")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with pruning_layout(model, "discard"):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    info = model.last_pruning_info if model._pruning_active() and model.config.pruning_points else None
    counts = info.kept_counts if info is not None else None
    return [t.strip() for t in texts], counts


# How exact_match reads each benchmark's predictions (its `mode`): as that benchmark's official scorer does.
EXACT_MATCH_MODE = {"gqa": "gqa", "scienceqa_img": "scienceqa", "mmbench": "mmbench"}
CIRCULAR_STRIDE = 1_000_000  # MMBench: rows whose index differs by multiples of 1e6 are one question's copies


def circular_questions(records):
    """MMBench circular evaluation's questions: `[(family, [record positions])]` in order of first appearance, the
    copies of one question being the rows whose integer index is equal modulo 1e6 (lmms-eval mmbench_evals.py,
    VLMEvalKit). The family is that of the main row (index < 1e6), else of the first copy; a non-integer id is its
    own question."""
    positions, family = {}, {}
    for i, r in enumerate(records):
        try:
            index = int(r.question_id)
            key, main = index % CIRCULAR_STRIDE, index < CIRCULAR_STRIDE
        except ValueError:
            key, main = r.question_id, True
        positions.setdefault(key, []).append(i)
        if main or key not in family:
            family[key] = r.family
    return [(family[k], v) for k, v in positions.items()]


def score_benchmark(benchmark, predictions, records):
    """`{"score": headline, "groups": {family: score}, "metric": full result}` with the benchmark's metric.

    exact_match reads the predictions as the benchmark's official scorer does (`EXACT_MATCH_MODE`): GQA as LLaVA's
    convert_gqa_for_eval.py (trailing '.' stripped, lower-cased, compared verbatim), ScienceQA-IMG as LLaVA's
    eval_science_qa.py and MMBench as its `can_infer` (the option letter, or the one option text named), both
    against the record's choices. MMBench is scored circularly: a question (its rows equal modulo 1e6) counts as
    right only when every copy is; its "exact_match" is that accuracy over questions, "per_row_exact_match" the
    accuracy over rows, "num_questions" / "num_rows" the counts."""
    from rcp_llava.metrics import load_metric
    from rcp_llava.readers import BENCHMARK_METRIC

    name = BENCHMARK_METRIC[benchmark]
    metric = load_metric(name)
    key = headline_key(name, [r.family for r in records])
    if name == "pope":
        result = metric.compute(predictions=predictions, references=[r.answers[0] for r in records],
                                categories=[r.family for r in records])
        groups = {c: v[key] for c, v in result.get("per_category", {}).items()}
    elif name == "mme":
        result = metric.compute(predictions=predictions, references=[r.answers[0] for r in records],
                                subtasks=[r.family for r in records], image_ids=[r.image_id for r in records])
        groups = {t: v["score"] for t, v in result.get("subtasks", {}).items()}
    else:
        kwargs = {}
        mode = EXACT_MATCH_MODE.get(benchmark) if name == "exact_match" else None
        if mode is not None:
            kwargs["mode"] = mode
        if mode in ("scienceqa", "mmbench"):
            kwargs["choices"] = [list(r.choices or []) for r in records]
        if benchmark == "vizwiz":  # its own evaluator's reference rule, not VQAv2's
            kwargs["reference_processing"] = "vizwiz"
        result = metric.compute(predictions=predictions, references=[list(r.answers) for r in records],
                                return_scores=True, **kwargs)
        scores, families = result.pop("scores"), [r.family for r in records]
        if benchmark == "mmbench":
            questions = circular_questions(records)
            result = {key: sum(all(scores[i] for i in rows) for _, rows in questions) / len(questions),
                      "per_row_exact_match": result[key], "num_questions": len(questions), "num_rows": len(records)}
            scores = [float(all(scores[i] for i in rows)) for _, rows in questions]
            families = [family for family, _ in questions]
        groups = {}
        for family in sorted(set(families)):
            idx = [i for i, f in enumerate(families) if f == family]
            groups[family or "all"] = sum(scores[i] for i in idx) / len(idx)
    return {"score": float(result[key]), "groups": groups, "metric": result}


def evaluate_model(model, processor, data, batch_size=32, max_new_tokens=16, progress=None, keep_masks_fn=None):
    """Score one method model on `data` (`EvalData`): THE evaluator of the project, one result schema.

    keep_masks_fn(batch_index, rows) -> (B, P, N) bool forces the kept sets of each batch of `rows` (testbed rows
    only; e.g. `random_keep_masks_fn`, `oracle_keep_masks_fn`). Returns:

    - "score": on testbed rows the accuracy of the greedy answer: its first token when every reference is one token
      (the testbed), else its first n tokens for a reference of n tokens (`greedy_answer_predictions`; scoring the
      first token alone against a longer reference scored 0 whatever the model said); "scoring" says which
      ("first token" / "greedy answer tokens"). The benchmark's headline metric otherwise;
      "groups": the same per family; "n"; "predictions"; "metric": the benchmark's full result (benchmarks);
    - "kept_per_point": mean kept visual tokens after each pruning point (None: nothing pruned);
      "tokens_per_layer": mean visual tokens each decoder layer processed (from the kept counts);
    - testbed rows with pruning: "retention_all_layers", "retention_from_first_point" and
      "avg_visual_tokens_per_layer", from the model's own `layer_retention` (float32, as the main job reports).
    """
    predictions, per_layer, kept, retention = [], [], [], []
    rows = data.rows
    if not len(rows):  # was an IndexError on the empty per-layer table, after every batch ran
        raise ValueError(f"evaluate_model: {data.name!r} has no rows to score. Give data with at least one row.")
    if keep_masks_fn is not None and data.kind != "testbed":
        raise ValueError("`keep_masks_fn` forces the kept sets of a prefill; it needs testbed rows.")
    if data.kind == "testbed":
        references = [str(a).strip() for a in _column(rows, data.answer_column)]
        answer_tokens = reference_token_counts(processor, references)
        multi_token = max(answer_tokens, default=1) > 1
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = [rows[i] for i in range(start, min(len(rows), start + batch_size))]
        if data.kind == "testbed":
            forced = keep_masks_fn(b, chunk) if keep_masks_fn is not None else None
            pred, counts, layer_retention = first_token_predictions(
                model, processor, chunk, keep_masks=forced, image_column=data.image_column,
                question_column=data.question_column, image_folder=data.image_folder)
            if multi_token:
                # The prefill above still gives the kept counts and the model's own layer retention (which
                # `generate` does not return); the answers are the greedy generation's.
                pred = greedy_answer_predictions(
                    model, processor, chunk, answer_tokens[start:start + len(chunk)], keep_masks=forced,
                    image_column=data.image_column, question_column=data.question_column,
                    image_folder=data.image_folder)
            if layer_retention is not None:
                retention.append(layer_retention)
        else:
            pred, counts = generated_answers(model, processor, chunk, max_new_tokens)
        predictions += pred
        per_layer += kept_tokens_per_layer(model.config, counts, len(chunk))
        if counts is not None:
            kept.append(counts.float().cpu())
        if progress is not None:
            progress.update(len(chunk))
    num_layers = len(per_layer[0])
    mean_layers = [sum(s[i] for s in per_layer) / len(per_layer) for i in range(num_layers)]
    result = {"n": len(predictions), "tokens_per_layer": mean_layers,
              "kept_per_point": torch.cat(kept).mean(0).tolist() if kept else None}
    if retention:
        retention = torch.cat(retention)  # (n, num_layers)
        first = model.config.pruning_points[0]
        result.update(retention_all_layers=float(retention.mean()),
                      retention_from_first_point=float(retention[:, first:].mean()),
                      avg_visual_tokens_per_layer=float(retention.mean() * model.config.num_visual_tokens))
    if data.kind == "testbed":
        correct = [float(p == reference) for p, reference in zip(predictions, references)]
        groups = {}
        for ok, r in zip(correct, rows):
            groups.setdefault(r.get("family") or "all", []).append(ok)
        result.update(score=sum(correct) / len(correct),
                      groups={g: sum(v) / len(v) for g, v in sorted(groups.items())},
                      correct=[int(c) for c in correct], group_of=[r.get("family") or "all" for r in rows],
                      scoring="greedy answer tokens" if multi_token else "first token")
    else:
        result.update(score_benchmark(data.benchmark, predictions, list(rows)))
    result["predictions"] = predictions
    return result


def random_keep_masks_fn(counts, num_visual_tokens, seed=0):
    """`keep_masks_fn` for random pruning at fixed per-point counts: nested uniform subsets (`nested_random_masks`),
    one seeded draw per batch (seed + batch index), so a rerun draws the same kept sets."""

    def fn(batch_index, rows):
        return nested_random_masks(counts, len(rows), num_visual_tokens, seed=seed + batch_index)

    return fn


def oracle_order(row, num_visual_tokens, seed=0):
    """The in-decoder oracle's preference over one testbed row's visual tokens (raster indices, best first): the
    evidence patches, then the other objects' patches (distractors stay: filling with background first would leak
    the answer), then background, in a seeded random order inside each group. Needs "evidence_patches" and
    "object_patches" (the testbed format)."""
    import numpy as np

    rng = np.random.default_rng([seed, int(row["id"]), 2])
    evidence = sorted(set(row["evidence_patches"]))
    objects = sorted(set(row["object_patches"]) - set(evidence))
    rest = sorted(set(range(num_visual_tokens)) - set(evidence) - set(objects))
    return [int(i) for group in (evidence, objects, rest) for i in rng.permutation(np.array(group, dtype=np.int64))]


def oracle_keep_masks_fn(counts, num_visual_tokens, seed=0):
    """`keep_masks_fn` of the in-decoder oracle at fixed per-point counts (issue 16's prior headroom): point p keeps
    the first `counts[p]` tokens of each row's `oracle_order`, so the masks are cumulative."""

    def fn(batch_index, rows):
        masks = torch.zeros(len(rows), len(counts), num_visual_tokens, dtype=torch.bool)
        for b, row in enumerate(rows):
            order = oracle_order(row, num_visual_tokens, seed)
            for p, count in enumerate(counts):
                masks[b, p, order[:count]] = True
        return masks

    return fn


# ------------------------------------------------------------------------------------------------
# Methods x budgets
# ------------------------------------------------------------------------------------------------


def _placement_view(config, plugins_dir):
    """`config` as `method_overrides` reads it, with the pruning / repair layers of the plug-in set in `plugins_dir`
    (a set trained for one budget has that budget's placement)."""
    from types import SimpleNamespace

    from modeling_rcp_llava import read_plugin_config

    plugin_config = read_plugin_config(plugins_dir)
    return SimpleNamespace(text_config=config.text_config, num_visual_tokens=config.num_visual_tokens,
                           pruning_layers=plugin_config["pruning_layers"], repair_layers=plugin_config["repair_layers"])


def planned_rows(base, methods, budgets, fastv_layer=None, flop_matched=False, plugins_per_budget=None):
    """`([(label, method, budget_label, k, overrides)] in table order, [infeasible cells])`. With
    `plugins_per_budget`, the in-decoder methods at that budget use that set's placement (so the prior,
    `attention_topk`, prunes where that RCP set prunes)."""
    n = base.config.num_visual_tokens
    has_rcp = base.config.pruning_spec.plugins and bool(base.config.pruning_layers)
    plan, infeasible = [], []
    for method in methods:
        if uses_rcp_placement(_method_spec(method)) and not has_rcp:
            raise ValueError(f"Method {method!r} needs an RCP model (pruning layers); {base.name_or_path!r} "
                             "has none: give an RCP folder or --plugins.")
        if method == "none":
            plan.append(("none", "none", "full", n, method_overrides("none", n, base.config)))
            continue
        for label in budgets:
            label, fraction = parse_budget(label)
            k = budget_count(fraction, n)
            config = base.config
            if plugins_per_budget and label in plugins_per_budget and uses_rcp_placement(_method_spec(method)):
                config = _placement_view(base.config, plugins_per_budget[label])
            try:
                overrides = method_overrides(method, k, config, fastv_layer, flop_matched=flop_matched)
            except ValueError as err:
                if not flop_matched:
                    raise
                infeasible.append({"method": method, "budget": label, "k": k, "reason": str(err)})
                continue
            plan.append((method, method, label, k, overrides))
        if _method_spec(method).plugins:  # plug-in methods also run their own adaptive threshold (Eq. 8)
            plan.append((f"{method} (adaptive)", method, "adaptive", None,
                         dict(pruning_method=method, pruning_keep_counts=None, pre_llm_keep_count=None)))
    return plan, infeasible


def budget_plugin_model(base, overrides, plugins_dir):
    """`method_model(base, **overrides)` with the plug-ins of `plugins_dir` (a set trained for one budget), loaded
    strictly; the set's own pruning / repair layers replace the overrides'."""
    from modeling_rcp_llava import read_plugin_config

    plugin_config = read_plugin_config(plugins_dir)
    overrides = dict(overrides, pruning_layers=plugin_config["pruning_layers"],
                     repair_layers=plugin_config["repair_layers"])
    for name in ("pruner_hidden_size", "repair_bottleneck_size", "num_pruning_queries", "pruner_num_heads"):
        if name in plugin_config:
            overrides[name] = plugin_config[name]
    counts = overrides.get("pruning_keep_counts")
    if counts is not None and len(counts) != len(overrides["pruning_layers"]):
        raise ValueError(f"The plug-ins in {str(plugins_dir)!r} prune at {overrides['pruning_layers']}, but the "
                         f"grid's counts {counts} are for another placement.")
    model = method_model(base, fresh_plugins=True, **overrides)
    model.load_plugins(plugins_dir, strict=True)
    return model


def mcnemar(correct_a, correct_b):
    """Exact McNemar test of two paired 0/1 outcome lists: `{"a_only", "b_only", "p_value"}` (two-sided binomial
    test on the discordant pairs; p = 1 when there are none)."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"Paired outcomes differ in length: {len(correct_a)} vs {len(correct_b)}.")
    for name, outcomes in (("correct_a", correct_a), ("correct_b", correct_b)):
        # counted by truth value, "0" or 0.5 would count as right: a wrong p-value, not an error
        bad = [v for v in outcomes if isinstance(v, str) or v not in (0, 1)]
        if bad:
            raise ValueError(f"`{name}` must hold 0/1 (or bool) outcomes, got {bad[0]!r}.")
    a_only = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    b_only = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    n, low = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def paired_tests(rows, reference="rcp"):
    """For every budget: the `reference` method's row at that budget's counts (label `reference`) against each other
    row at that budget, overall and per group (McNemar on the per-sample outcomes). Rows need "correct" and
    "group_of". A per-budget adaptive row (`rcp (adaptive, 1/3)`) is compared with, never a reference: it keeps its
    own number of tokens, so its tests against the baselines were at another compute, and each pair with the
    fixed-count row appeared twice, once each way round."""
    out = []
    for ref in rows:
        if (ref["method"] != reference or ref["label"] != reference or ref["budget"] in ("full", "adaptive")
                or "correct" not in ref):
            continue
        for other in rows:
            if other is ref or other["budget"] != ref["budget"] or "correct" not in other:
                continue
            test = {"budget": ref["budget"], "reference": ref["label"], "method": other["label"],
                    "delta": ref["score"] - other["score"], **mcnemar(ref["correct"], other["correct"]),
                    "groups": {}}
            for g in sorted(set(ref["group_of"])):
                idx = [i for i, x in enumerate(ref["group_of"]) if x == g]
                a, b = [ref["correct"][i] for i in idx], [other["correct"][i] for i in idx]
                test["groups"][g] = {"delta": (sum(a) - sum(b)) / len(idx), **mcnemar(a, b)}
            out.append(test)
    return out


def mean_text_tokens(processor, data, max_rows=200):
    """Mean number of non-image prompt tokens (chat markup + question) over the first `max_rows` rows of `data`:
    the text part of the prefill the decoder FLOPs are counted at."""
    from rcp_llava.data import prompt_messages

    n = min(max_rows, len(data))
    if n == 0:
        return 0
    rows = data.rows
    if data.kind != "testbed":
        questions = [rows[i].prompt for i in range(n)]  # what the model is asked, the answer-format line included
    elif hasattr(rows, "select"):  # a datasets.Dataset: read the column alone, without decoding the images
        questions = rows.select(range(n))[data.question_column]
    else:
        questions = [rows[i][data.question_column] for i in range(n)]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    lengths = []
    for question in questions:
        text = processor.apply_chat_template(prompt_messages(str(question)), add_generation_prompt=True)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths.append(sum(1 for t in ids if t != image_id))
    return round(sum(lengths) / len(lengths))


def evaluate_grid(base, processor, data, methods=("none", "rcp", "vispruner", "fastv", "random"),
                  budgets=DEFAULT_BUDGETS, batch_size=32, max_new_tokens=16, fastv_layer=None, progress=True,
                  plugins_per_budget=None, flop_matched=False, oracle=False):
    """Every method at every budget on `data`, one shared backbone. Returns `{"rows": [...], ...}`; each row has
    the score, per-group scores, % of the full model (overall and per group; "none" must be among the methods
    for these), the mean kept counts per pruning point and the average visual tokens per layer.

    plugins_per_budget: `{budget label: plug-in folder}`, one RCP set trained per budget (the paper's protocol):
    the "rcp" rows at that budget (fixed counts and, as "rcp (adaptive, <budget>)", its own adaptive threshold) use
    that set instead of the base model's plug-ins. Testbed rows also get McNemar tests of RCP against every other
    method at the same budget (`result["paired_tests"]`).

    flop_matched: every method at budget b averages b * N visual tokens over ALL decoder layers (equal decoder
    compute; `method_overrides`); cells a placement cannot reach are listed in `result["infeasible"]`. Each row
    also carries its analytic prefill decoder FLOPs per sample (`decoder_gflops`, at the data's mean prompt
    length). oracle: testbed rows also get an `oracle (in-decoder)` row per budget: `attention_topk`'s layers and
    counts with the kept sets forced to evidence first, then other objects (`oracle_keep_masks_fn`); oracle minus
    `attention_topk` is the prior's headroom."""
    from tqdm.auto import tqdm

    if plugins_per_budget and "rcp" not in methods:  # its rows are RCP's: they were added to a grid that asked for none
        raise ValueError(f"`plugins_per_budget` gives RCP's plug-ins per budget, but `methods` {list(methods)} has no "
                         "'rcp'; add it or drop `plugins_per_budget`.")
    config = base.config
    num_layers, n = config.text_config.num_hidden_layers, config.num_visual_tokens
    plugins_per_budget = {parse_budget(k)[0]: v for k, v in (plugins_per_budget or {}).items()}
    plan, infeasible = planned_rows(base, methods, budgets, fastv_layer, flop_matched, plugins_per_budget)
    if oracle:
        if data.kind != "testbed":
            raise ValueError("`oracle` needs testbed rows (their evidence patches).")
        if "attention_topk" not in methods:  # its rows go at attention_topk's layers and counts: none were added
            raise ValueError(f"`oracle` adds a row per `attention_topk` row (its layers and counts), but `methods` "
                             f"{list(methods)} has no 'attention_topk'; add it.")
        at = max((i for i, row in enumerate(plan) if row[1] == "attention_topk"), default=len(plan) - 1) + 1
        for label, method, budget, k, overrides in [r for r in plan if r[1] == "attention_topk"]:
            plan.insert(at, ("oracle (in-decoder)", "oracle", budget, k, overrides))
            at += 1
    if plugins_per_budget:
        unknown = sorted(set(plugins_per_budget) - {parse_budget(b)[0] for b in budgets})
        if unknown:
            raise ValueError(f"`plugins_per_budget` names budgets {unknown} that are not among {list(budgets)}.")
        plan = [row for row in plan if not (row[1] == "rcp" and row[2] == "adaptive")]
        at = max((i for i, row in enumerate(plan) if row[1] == "rcp"), default=len(plan) - 1) + 1
        for label in plugins_per_budget:
            adaptive = dict(pruning_method="rcp", pruning_keep_counts=None, pre_llm_keep_count=None)
            plan.insert(at, (f"rcp (adaptive, {label})", "rcp", label, None, adaptive))
            at += 1
    text_tokens = mean_text_tokens(processor, data)
    bar = tqdm(total=len(plan) * len(data), desc="methods x budgets", unit="sample", disable=not progress)
    rows, scoring = [], "first token"
    for label, method, budget, k, overrides in plan:
        if method == "rcp" and budget in plugins_per_budget:
            model = budget_plugin_model(base, overrides, plugins_per_budget[budget])
        else:
            model = method_model(base, **overrides)
        bar.set_postfix_str(f"{label} @ {budget}")
        forced = (oracle_keep_masks_fn(overrides["pruning_keep_counts"], n) if method == "oracle" else None)
        result = evaluate_model(model, processor, data, batch_size, max_new_tokens, progress=bar,
                                keep_masks_fn=forced)
        scoring = result.get("scoring", scoring)
        points = model.config.pruning_points
        first = points[0] if points else num_layers
        per_layer = result["tokens_per_layer"]
        rows.append({
            "label": label, "method": method, "budget": budget, "k": k,
            "pruning_points": points, "keep_counts": model.config.point_keep_counts,
            "repair_layers": list(model.config.repair_layers),
            "kept_per_point": result["kept_per_point"],
            "avg_tokens_all_layers": average_tokens(per_layer),
            "avg_tokens_from_first_point": average_tokens(per_layer, first) if points else float(n),
            "tokens_per_layer": per_layer,
            "decoder_gflops": sum(decoder_layer_flops(config, text_tokens + round(v)) for v in per_layer) / 1e9,
            "score": result["score"], "groups": result["groups"], "n": result["n"],
            **({"metric": result["metric"]} if "metric" in result else {}),
            **({"correct": result["correct"], "group_of": result["group_of"]} if "correct" in result else {}),
        })
    bar.close()
    add_relative(rows)
    retention = None
    adaptive = next((r for r in rows if r["budget"] == "adaptive"), None)
    if adaptive is not None and adaptive["kept_per_point"]:
        retention = {"pruning_layers": adaptive["pruning_points"],
                     "kept": adaptive["kept_per_point"],
                     "percent_of_n": [100 * c / n for c in adaptive["kept_per_point"]]}
    return {"data": data.name, "kind": data.kind, "num_samples": len(data), "num_visual_tokens": n,
            "num_layers": num_layers, "model": str(base.name_or_path), "rows": rows,
            "per_layer_retention": retention, "paired_tests": paired_tests(rows),
            "plugins_per_budget": {k: str(v) for k, v in plugins_per_budget.items()} or None,
            "flop_matched": flop_matched, "infeasible": infeasible, "mean_text_tokens": text_tokens,
            "metric": (("first-token accuracy" if scoring == "first token" else "greedy-answer accuracy")
                       if data.kind == "testbed" else headline_key(_metric_name(data), [r.family for r in data.rows]))}


def add_relative(rows):
    """Set each row's "relative" (score / the "none" row's score), "groups_relative" and "mean_group_relative"
    (the paper's "Avg.": mean over groups of the per-group ratio). None where the full score is 0 or missing."""
    full = next((r for r in rows if r["method"] == "none"), None)
    for r in rows:
        if full is None:
            r["relative"], r["groups_relative"], r["mean_group_relative"] = None, None, None
            continue
        r["relative"] = r["score"] / full["score"] if full["score"] else None
        rel = {g: (v / full["groups"][g] if full["groups"].get(g) else None) for g, v in r["groups"].items()}
        r["groups_relative"] = rel
        valid = [v for v in rel.values() if v is not None]
        r["mean_group_relative"] = sum(valid) / len(valid) if valid else None
    return rows


def _metric_name(data):
    from rcp_llava.readers import BENCHMARK_METRIC

    return BENCHMARK_METRIC[data.benchmark]


def _fmt(value, pattern="{:.3f}"):
    return "–" if value is None else pattern.format(value)


def format_table(result, command=None):
    """The Table-I-style markdown of `evaluate_grid`'s result."""
    rows = result["rows"]
    groups = sorted({g for r in rows for g in r["groups"]})
    n, num_layers = result["num_visual_tokens"], result["num_layers"]
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    questions = next((r["metric"]["num_questions"] for r in rows if "num_questions" in r.get("metric", {})), None)
    samples = (f"{result['num_samples']} rows = {questions} circular questions" if questions is not None
               else f"{result['num_samples']} samples")  # MMBench scores its questions, each over its copies
    # A result written before the FLOPs were recorded (no row has "decoder_gflops") keeps the layout it was
    # written in: a column of dashes and a sentence about FLOPs at "0 text tokens" would describe nothing it holds.
    gflops = any("decoder_gflops" in r for r in rows)
    lines += [f"**{result['data']}** ({samples}, {result['metric']}), model "
              f"`{result['model']}`: N = {n} visual tokens, {num_layers} decoder layers. Per-group cells: absolute "
              "score (% of full). *tok/layer (all)*: visual tokens per decoder layer averaged over all layers; "
              "*(from 1st)*: over the layers from the first pruning point on (0 = before the LLM)."
              + (" *decoder GFLOPs*: analytic prefill FLOPs of the decoder per sample at the mean prompt length "
                 f"({result.get('mean_text_tokens', 0)} text tokens)." if gflops else ""), ""]
    if result.get("flop_matched"):
        lines += ["**FLOP-matched**: at budget b every method averages b * N visual tokens over ALL decoder layers "
                  "(the paper's definition: equal decoder compute).", ""]
    head = ["method", "budget", "kept per pruning point", "tok/layer (all)", "tok/layer (from 1st)",
            *(["decoder GFLOPs"] if gflops else []), *groups, "overall", "% of full", "mean % of full over groups"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for r in rows:
        if r["kept_per_point"] is None:
            kept = "all"
        else:
            kept = ", ".join(f"{c:.1f}@{p}" for c, p in zip(r["kept_per_point"], r["pruning_points"]))
        budget = r["budget"] if r["k"] is None or r["budget"] == "full" else f"{r['budget']} (k={r['k']})"
        cells = [r["label"], budget, kept, f"{r['avg_tokens_all_layers']:.1f}",
                 f"{r['avg_tokens_from_first_point']:.1f}"]
        if gflops:
            cells.append(_fmt(r.get("decoder_gflops"), "{:.4f}"))
        for g in groups:
            v = r["groups"].get(g)
            rel = (r["groups_relative"] or {}).get(g)
            cells.append("–" if v is None else f"{v:.3f} ({_fmt(rel, '{:.0%}')})")
        cells += [f"{r['score']:.3f}", _fmt(r["relative"], "{:.1%}"), _fmt(r["mean_group_relative"], "{:.1%}")]
        lines.append("| " + " | ".join(cells) + " |")
    for cell in result.get("infeasible") or []:
        lines.append(f"\n*{cell['method']} at {cell['budget']} (k={cell['k']}) not run*: {cell['reason']}")
    retention = result.get("per_layer_retention")
    if retention:
        lines += ["", "Per-layer retention of the trained RCP (adaptive threshold; the paper's Table VI at 64 of 576 "
                  "tokens: 16.72% / 4.59% / 1.44%):", "",
                  "| pruning layer | " + " | ".join(str(p) for p in retention["pruning_layers"]) + " |",
                  "|---|" + "---|" * len(retention["pruning_layers"]),
                  "| kept tokens | " + " | ".join(f"{c:.1f}" for c in retention["kept"]) + " |",
                  "| % of N | " + " | ".join(f"{p:.2f}%" for p in retention["percent_of_n"]) + " |"]
    tests = result.get("paired_tests")
    if tests:
        if result.get("flop_matched"):
            # The fixed-count rows are matched; a per-budget adaptive row (`rcp (adaptive, 1/3)`) keeps its own count,
            # so the compute column stays: it says which tests are at equal compute.
            lines += ["", "Paired tests (exact McNemar on the same samples): RCP minus each method at the same budget, "
                      "overall and per group; the fixed-count rows are FLOP-matched (up to their integer keep "
                      "counts), an adaptive row keeps its own number of tokens (*compute*: tokens per layer over all "
                      "layers, RCP's vs the other's); *a/b*: samples only RCP / only the other method gets right.", ""]
        else:
            # Without --flop_matched a budget fixes k, not the compute: RCP keeps all N tokens up to its first
            # pruner, a pre-LLM method none, so "the same budget" was read as equal compute when it is not.
            lines += ["", "Paired tests (exact McNemar on the same samples): RCP minus each method at the same budget "
                      "label, overall and per group; **not FLOP-matched**: the budget fixes the kept count k, not the "
                      "compute, so the two rows of a test may average different visual tokens over all decoder layers "
                      "(*compute*: tokens per layer over all layers, RCP's vs the other's); *a/b*: samples only RCP / "
                      "only the other method gets right.", ""]
        compute = {(r["label"], r["budget"]): r["avg_tokens_all_layers"] for r in rows}
        # matched by `method_overrides` up to rounding (each side within half a token per layer of the budget); an
        # adaptive row (k None) keeps what its threshold keeps
        matched = {(r["label"], r["budget"]) for r in rows if result.get("flop_matched") and r.get("k") is not None}
        lines += ["| budget | RCP | vs | " + ("compute | " if compute else "") + "Δ overall | a/b | p | "
                  + " | ".join(f"Δ {g} (p)" for g in groups) + " |",
                  "|" + "---|" * (6 + bool(compute) + len(groups))]
        for t in tests:
            per_group = [f"{t['groups'][g]['delta']:+.3f} ({t['groups'][g]['p_value']:.2g})" if g in t["groups"]
                         else "–" for g in groups]
            cost = ""
            if compute:
                mine, other = compute.get((t["reference"], t["budget"])), compute.get((t["method"], t["budget"]))
                if mine is None or other is None:
                    cost = "– | "
                elif abs(mine - other) < 0.05:
                    cost = f"equal: {mine:.1f} tokens/layer | "
                elif {(t["reference"], t["budget"]), (t["method"], t["budget"])} <= matched and abs(mine - other) < 1:
                    cost = (f"matched up to integer counts: {t['reference']} {mine:.1f} vs {t['method']} {other:.1f} "
                            "tokens/layer | ")
                else:
                    cost = (f"not FLOP-matched: {t['reference']} {mine:.1f} vs {t['method']} {other:.1f} "
                            "tokens/layer | ")
            lines.append(f"| {t['budget']} | {t['reference']} | {t['method']} | {cost}{t['delta']:+.3f} | "
                         f"{t['a_only']}/{t['b_only']} | {t['p_value']:.3g} | " + " | ".join(per_group) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Representation drift (Figs. 1 and 3) and masks (Fig. 4)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def representation_drift(model, processor, rows, forced=None):
    """Per decoder layer, the mean over samples of W2 (Eq. 18, `rcp_llava.losses.gaussian_w2`) between the pruned
    model's answer-position hidden states and the full model's.

    Runs in the "mask" layout (tokens stay in place, so positions line up with the full model) in eval mode.
    Returns `{"with_repair": [...], "without_repair": [...], "keep_masks": (B, P, N), "forced": {...}}`;
    `forced` maps a name to (B, P, N) kept sets given to the same model run without repair (e.g. attention
    top-k or random kept sets at the same counts), each with its drift curve in `result["forced"]`.
    """
    model.eval()
    collator = RcpDataCollator(processor)
    batch = collator([{"image": r["image"], "question": r["question"], "answer": r["answer"]} for r in rows])
    answer_mask = batch["answer_mask"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    layers = range(model.config.text_config.num_hidden_layers)
    with pruning_layout(model, "mask"), LayerOutputs(model) as outputs:
        with model.plugins_disabled():
            full = outputs.of(model(**inputs, output_hidden_states=True, use_cache=False), layers)

        def drift(output):  # of the forward just run: each layer's own output against the full model's
            return [float(gaussian_w2(h, f, answer_mask).mean()) for h, f in zip(outputs.of(output, layers), full)]

        pruned = model(**inputs, output_hidden_states=True, use_cache=False)
        result = {"with_repair": drift(pruned), "keep_masks": pruned.keep_masks}
        with model.plugins_disabled(pruning=False, repair=True):
            result["without_repair"] = drift(model(**inputs, output_hidden_states=True, use_cache=False))
            result["forced"] = {}
            for name, masks in (forced or {}).items():
                result["forced"][name] = drift(model(**inputs, output_hidden_states=True, use_cache=False,
                                                     visual_keep_masks=masks))
    return result


@torch.no_grad()
def keep_masks_of(model, processor, rows):
    """`(B, P, N)` cumulative keep masks `model` chooses for testbed rows (discard layout), and its points."""
    model.eval()
    batch = prompt_batch(processor, [r["question"] for r in rows], [r["image"].convert("RGB") for r in rows])
    with pruning_layout(model, "discard"):
        out = model(**batch, use_cache=False, logits_to_keep=1)
    return out.keep_masks, list(model.config.pruning_points)


def nested_random_masks(counts, batch_size, num_visual_tokens, seed=0):
    """(B, P, N) nested uniform random subsets with `counts[p]` tokens after point p."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch_size, len(counts), num_visual_tokens, dtype=torch.bool)
    for b in range(batch_size):
        order = torch.randperm(num_visual_tokens, generator=g)
        for p, c in enumerate(counts):
            masks[b, p, order[:c]] = True
    return masks


__all__ = [
    "DEFAULT_BUDGETS", "EvalData", "available_methods", "add_relative", "budget_plugin_model", "default_fastv_layer",
    "evaluate_grid", "evaluate_model", "mcnemar", "paired_tests",
    "first_token_predictions", "format_table", "fresh_plugins_for", "generated_answers", "greedy_answer_predictions",
    "keep_masks_of",
    "check_split_used", "data_name", "is_benchmark_spec", "load_base_model", "load_data", "method_model",
    "name_uniquely", "split_read",
    "method_overrides", "nested_random_masks", "planned_rows",
    "oracle_keep_masks_fn", "oracle_order", "parse_benchmark_spec", "pruning_layout", "random_keep_masks_fn",
    "reference_token_counts",
    "representation_drift", "score_benchmark",
]
