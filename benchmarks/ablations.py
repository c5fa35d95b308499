r"""Ablation runner (the paper's Tables IV, V, VI, VII): train each variant with `train_rcp.py`, evaluate all at the
same budget, write one markdown table + JSON.

    python benchmarks/ablations.py                                    # the main job's testbed (deep), every variant (hours)
    python benchmarks/ablations.py --variants full no_repair_loss attention_topk --max_steps 150 \
        --max_eval_samples 300 --name ablations_tiny
    python benchmarks/ablations.py --variants full pruners=1 pruners=1,2 adapters=3 adapters=   # Tables V / VII
    python benchmarks/ablations.py --train_args "--base_model DIR --dataset_name_or_path DATA ..." --dataset DATA

Variants (each a `train_rcp` run = the main job's flags + the variant's, in WORK_DIR/NAME/VARIANT, default outputs/ablations/):

| variant | what changes | paper |
|---|---|---|
| `full` | nothing (the main job) | RCP |
| `no_repair_loss` | `--lambda_repair 0` | w/o repair loss |
| `mean_only_repair` | `--repair_loss_mean_only true` | mean-only repair loss |
| `no_adapters` | no repair adapters (`repair_layers=[]`; the repair loss still acts on the last layer) | w/o adapter |
| `adapters_off` | `full`'s model evaluated with its adapters disabled (no training) | (inference-only) |
| `attention_topk` | no training: `pruning_method="attention_topk"`, `full`'s layers and counts, no adapters | Top-K |
| `pruners=A,B` | `--pruning_layers A,B` | Table V (pruner count/placement) |
| `adapters=A,B`, `adapters=` | `--repair_layers A,B`; empty: none | Table VII (adapter placement) |
| `old_init` | the plug-ins start as before issue 15: adapter gate 0, pruner bias 0 | (issue 15 item 2) |
| `old_repair_loss` | `--repair_loss_pooling sample` (W2 per sample) | (item 3) |
| `old_sparsity` | `--sparsity_reduction sample --sparsity_schedule linear --sparsity_warmup_ratio 0.3` | (item 4) |
| `old_gumbel` | `--gumbel_schedule geometric` (noise always on) | (item 5) |
| `no_grad_floor` | the key mask's renormalisation without the backward floor | (item 9) |
| `old_recipe` | all five above at once | (this project before issue 15) |
| `lambda_repair=X` | `--lambda_repair X` | paper 40, code 3 |
| `detach_prior` | `--detach_prior true` | (item 9) |
| `clip=X` | `--max_grad_norm X` (0: no clipping) | |

`train_rcp.py --repair_layers ''` cannot express "no adapters" (an empty value means "the default"), so the runner
calls `train_rcp.run_job` with `repair_layers=[]` set on the parsed arguments: the same code path as `main`.

Every trained variant is evaluated (first-token accuracy on the test split of a DatasetDict `--dataset`, or every row
of a folder without splits: the table names which) at the FIXED counts of `--budget`
(`rcp_llava.schedule.rcp_keep_counts`: the average over the layers from the first pruner is k = budget * N)
and with its adaptive threshold; "Table VI" is the `full` variant's adaptive kept tokens per pruning layer, % of N.

Trained variants live in `--work_dir/NAME/VARIANT` and are reused on a rerun only when they were trained with the
same flags from the same base weights (`ablation_source.json`); otherwise they are trained again.
"""

import argparse
import copy
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager

import torch

from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                               write_results)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINED = {
    "full": [],
    "no_repair_loss": ["--lambda_repair", "0"],
    "mean_only_repair": ["--repair_loss_mean_only", "true"],
    "no_adapters": None,  # repair_layers=[] on the parsed job arguments
}
UNTRAINED = {"adapters_off", "attention_topk"}  # derived from `full`
# The recipe before issue 15, one change at a time: train flags, and module patches applied while training.
OLD = {
    "old_init": ([], {"old_init": True}),
    "old_repair_loss": (["--repair_loss_pooling", "sample"], {}),
    "old_sparsity": (["--sparsity_reduction", "sample", "--sparsity_schedule", "linear", "--sparsity_warmup_ratio",
                      "0.3"], {}),
    "old_gumbel": (["--gumbel_schedule", "geometric"], {}),
    "no_grad_floor": ([], {"no_grad_floor": True}),
}
OLD["old_recipe"] = ([f for flags, _ in OLD.values() for f in flags], {k: v for _, p in OLD.values() for k, v in p.items()})
DEFAULT_VARIANTS = ["full", "no_repair_loss", "mean_only_repair", "no_adapters", "adapters_off", "attention_topk",
                    "pruners=1", "pruners=1,2", "adapters=3", "adapters=2"]


def variant_spec(name):
    """`(train flags, job overrides, needs training)` of a variant name."""
    if name in OLD:
        return list(OLD[name][0]), {}, True
    for prefix, flag in (("lambda_repair=", "--lambda_repair"), ("clip=", "--max_grad_norm")):
        if name.startswith(prefix):
            return [flag, name.split("=", 1)[1]], {}, True
    if name == "detach_prior":
        return ["--detach_prior", "true"], {}, True
    if name in TRAINED:
        if name == "no_adapters":
            return [], {"repair_layers": []}, True
        return list(TRAINED[name]), {}, True
    if name in UNTRAINED:
        return [], {}, False
    if name.startswith("pruners="):
        layers = name.split("=", 1)[1]
        if not layers:
            raise ValueError("`pruners=` needs at least one layer (RCP needs a pruner).")
        return ["--pruning_layers", layers], {}, True
    if name.startswith("adapters="):
        layers = name.split("=", 1)[1]
        return ([], {"repair_layers": []}, True) if not layers else (["--repair_layers", layers], {}, True)
    raise ValueError(f"Unknown variant {name!r}; use {sorted(TRAINED) + sorted(UNTRAINED) + sorted(OLD)}, "
                     "detach_prior, pruners=A,B, adapters=A,B, lambda_repair=X or clip=X.")


@contextmanager
def patched(name):
    """Module patches of an `OLD` variant while it trains: the earlier initialisation (gate 0, bias 0) and/or no
    backward floor in the key mask's renormalisation."""
    import modeling_rcp_llava as m

    patches = OLD[name][1] if name in OLD else {}
    saved = (m.RcpRepairAdapter.gate_init, m.RcpPruner.bias_init, m.RENORM_GRAD_FLOOR)
    if patches.get("old_init"):
        m.RcpRepairAdapter.gate_init, m.RcpPruner.bias_init = 0.0, 0.0
    if patches.get("no_grad_floor"):
        m.RENORM_GRAD_FLOOR = torch.finfo(torch.float32).tiny
    try:
        yield
    finally:
        m.RcpRepairAdapter.gate_init, m.RcpPruner.bias_init, m.RENORM_GRAD_FLOOR = saved


def slug(name):
    return name.replace("=", "_").replace(",", "-") or "none"


def variant_argv(name, base_args, out_dir, max_steps=None):
    """The `train_rcp.py` arguments of variant `name`: the main job's flags, the variant's, where it goes."""
    flags, _, _ = variant_spec(name)
    argv = list(base_args) + flags + ["--output_dir", out_dir, "--test_split", "none", "--report_to", "none"]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps)]
    return argv


def variant_job(name, argv, parser=None):
    """`train_rcp.py`'s (job, training) arguments of variant `name` run with `argv`: parsed by train_rcp's own parser
    (`parser`, default a fresh one), the variant's job fields set. Training a variant again replaces its earlier
    run (other flags or another base), which `--overwrite_output_dir` says to train_rcp. One home for the training
    (`train_variant`) and the check before any trains (`check_variants`)."""
    import train_rcp

    parser = parser or train_rcp.build_parser()
    job, args = parser.parse_args_into_dataclasses(args=argv + ["--overwrite_output_dir", "true"])
    for key, value in variant_spec(name)[1].items():
        setattr(job, key, value)
    return job, args


def check_variants(variants, base_args, work, max_steps=None):
    """Parse every trained variant's `train_rcp.py` arguments with train_rcp's own parser and build the plug-in
    config they give (from the base model's config.json, or the testbed preset's config when it is not built yet;
    no weights), as `train_rcp.run_job` does, before any variant trains: `lambda_repair=abc`, `clip=x` or
    `pruners=1,a` passed the name check and failed only when that variant's job started, after the earlier
    variants had trained. A base model that is neither (a Hub id) has its flags parsed, its layers not checked."""
    import train_rcp
    from configuration_rcp_llava import RcpLlavaConfig

    def refuse(message):  # argparse's error() prints the usage and exits; a ValueError names the variant instead
        raise ValueError(message)

    for name in variants:
        flags, _, trained = variant_spec(name)
        if not trained:
            continue
        parser = train_rcp.build_parser()
        parser.error = refuse
        try:
            job, _ = variant_job(name, variant_argv(name, base_args, os.path.join(work, slug(name)), max_steps), parser)
            base = base_config_dict(job)
            if base is None:
                continue
            num_visual = RcpLlavaConfig.from_dict(copy.deepcopy(base)).num_visual_tokens
            # train_rcp.run_job's plug-in overrides (it builds the model with them, after loading data and weights),
            # as `from_pretrained(base, **overrides)` builds it: merged in before the defaults and the checks
            overrides = train_rcp.plugin_overrides(job, job.base_model is None, num_visual)
            RcpLlavaConfig.from_dict(copy.deepcopy(base), **overrides)
        except (TypeError, ValueError) as error:
            shown = shlex.join(flags) or "no flags of its own"
            raise ValueError(f"variant {name!r} ({shown}, after --train_args): train_rcp.py would refuse it: {error} "
                             "Checked before any variant trains; fix the variant or --train_args.") from None


def base_config_dict(job):
    """The config dict `train_rcp.run_job` builds variant `job`'s model from: --base_model's config.json, or the
    testbed preset's model (its saved config once built; before that the one the build will save). None for a Hub
    id (not fetched for a check)."""
    from configuration_rcp_llava import RcpLlavaConfig

    if job.base_model is not None:
        folder = job.base_model
    else:
        from rcp_llava.testbed import build_model_config, build_tokenizer, default_cache_dir, get_preset

        folder = default_cache_dir(job.testbed_preset) / "model"
        if not (folder / "config.json").is_file():
            return {**build_model_config(get_preset(job.testbed_preset), build_tokenizer()).to_dict(),
                    "model_type": RcpLlavaConfig.model_type}
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    return RcpLlavaConfig.get_config_dict(str(folder))[0]  # a stock LLaVA's read as rcp_llava, as from_pretrained


def train_variant(name, base_args, out_dir, max_steps=None, reuse=True):
    """Train one variant with `train_rcp.run_job`; returns (model folder, seconds, argv). Reuses a finished run."""
    import train_rcp

    argv = variant_argv(name, base_args, out_dir, max_steps)
    model_dir = os.path.join(out_dir, "model")
    source_file = os.path.join(out_dir, "ablation_source.json")
    source = {"argv": argv, "base_weights": base_weights_fingerprint(argv)}
    if reuse and os.path.isfile(os.path.join(model_dir, "config.json")):
        try:
            previous = json.load(open(source_file)) if os.path.isfile(source_file) else None
        except json.JSONDecodeError:  # a half-written file of a run killed at the write (before it was atomic)
            previous = None
        if previous == source:
            return model_dir, None, argv
        # the saved variant holds the whole model: reusing it after the base model was rebuilt (same path, new
        # weights) or with other flags would evaluate a stale backbone
        print(f"[ablations] {out_dir}: trained from another base model or other flags; training it again",
              flush=True)
    job, args = variant_job(name, argv)
    started = time.time()
    with patched(name):
        train_rcp.run_job(job, args, explicit=set(train_rcp._explicit_flags(argv)))
    # Atomic: a run killed at this write left a truncated file that the next run's json.load failed on.
    write_results(os.path.splitext(source_file)[0], data=source)
    return model_dir, round(time.time() - started, 1), argv


def job_testbed(argv):
    """The testbed a `train_rcp.py` run with `argv` trains on: its `--testbed_preset`, else the main job's default
    (`MAIN_PRESET`; once issue 16 made it `deep`, this runner still assumed `tiny` and would have evaluated
    deep-trained variants on the tiny testbed's data)."""
    from rcp_llava.testbed import MAIN_PRESET

    return flag_value(argv, "--testbed_preset") or MAIN_PRESET


def default_evaluation_data(argv):
    """(spec, image_folder): what the variants of a `train_rcp.py` run with `argv` are scored on without --dataset.
    The test split of the data they train on (its `--image_folder` too), else the testbed's; ValueError when that
    data has no test split `load_data` reads the way train_rcp reads the training data (was: the deep testbed's,
    whatever the variants trained on -- then a single-split folder was scored on its own training rows)."""
    llava_json = flag_value(argv, "--llava_json")  # train_rcp trains on it before any --dataset_name_or_path
    trained_on = flag_value(argv, "--dataset_name_or_path")
    if llava_json is not None:
        raise ValueError(f"--dataset: the variants train on --train_args' --llava_json {llava_json!r}, which has no "
                         "test split to default to; give the evaluation data with --dataset.")
    if trained_on is None:
        if flag_value(argv, "--base_model") is not None:
            raise ValueError("--dataset: the variants train from --train_args' --base_model on no "
                             "--dataset_name_or_path, so there is no test split to default to; give the evaluation "
                             "data with --dataset.")
        return f"testbed:{job_testbed(argv)}", None
    from rcp_llava.data import saved_splits

    if "test" not in (saved_splits(trained_on) or []):
        raise ValueError(f"--dataset: the variants train on --train_args' --dataset_name_or_path {trained_on!r}, "
                         "which is not a `save_to_disk` DatasetDict folder with a 'test' split (a Hub id, a data "
                         "file, or one split's folder would be scored on the wrong rows or not at all); give the "
                         "evaluation data with --dataset.")
    return trained_on, flag_value(argv, "--image_folder")


def flag_value(argv, flag):
    """The last value of `flag` in `argv`, written `FLAG VALUE` or `FLAG=VALUE` (both parse in `train_rcp.py`, and
    the last one wins there too); None when absent."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def base_weights_fingerprint(argv):
    """Name, size and modification time of the base model's weight files (`--base_model DIR`, or the testbed
    model the job builds): what tells a reusable variant from one trained on an earlier base."""
    base = flag_value(argv, "--base_model")
    if base is None:
        from rcp_llava.testbed import default_cache_dir

        base = str(default_cache_dir(job_testbed(argv)) / "model")
    if not os.path.isdir(base):
        return base  # a Hub id: its weights are pinned by the id (and the local cache) alone
    files = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    return [[f, os.path.getsize(os.path.join(base, f)), os.stat(os.path.join(base, f)).st_mtime_ns] for f in files]


def evaluate_variant(base, processor, data, budget, batch_size, repair=True, method="rcp"):
    """Fixed counts at `budget` and (for RCP) the adaptive threshold. Returns a dict."""
    from rcp_llava.evaluation import evaluate_model, method_model, method_overrides
    from rcp_llava.schedule import average_tokens, budget_count, parse_budget

    _, fraction = parse_budget(budget)
    k = budget_count(fraction, base.config.num_visual_tokens)
    out = {}
    modes = {"fixed": method_overrides(method, k, base.config)}
    if method == "rcp":
        modes["adaptive"] = dict(pruning_keep_counts=None)
    for mode, overrides in modes.items():
        model = method_model(base, **overrides)
        if repair:
            result = evaluate_model(model, processor, data, batch_size)
        else:
            with model.plugins_disabled(pruning=False, repair=True):
                result = evaluate_model(model, processor, data, batch_size)
        first = model.config.pruning_points[0]
        out[mode] = {"score": result["score"], "groups": result["groups"], "n": result["n"],
                     "correct": result.get("correct"),  # per sample, for the paired tests
                     "keep_counts": model.config.pruning_keep_counts, "kept_per_point": result["kept_per_point"],
                     "pruning_layers": list(model.config.pruning_layers),
                     "repair_layers": list(model.config.repair_layers) if repair else [],
                     "avg_tokens_all_layers": average_tokens(result["tokens_per_layer"]),
                     "avg_tokens_from_first_point": average_tokens(result["tokens_per_layer"], first)}
    return out


def is_data_spec(spec):
    """Whether `load_data` reads `spec` as data: an existing folder, 'testbed' / 'testbed:PRESET' or BENCHMARK:PATH
    (their own errors, e.g. an unbuilt testbed, come from `load_data`)."""
    spec = os.fspath(spec)
    return os.path.isdir(spec) or spec == "testbed" or ":" in spec


def run(variants, base_args, output_dir, name, budget="1/9", max_steps=None, max_eval_samples=None, dataset=None,
        batch_size=32, reuse=True, command=None, work_dir=None, overwrite=True):
    from rcp_llava.evaluation import (evaluate_model, load_base_model, load_data, method_model, method_overrides,
                                      split_read)
    from rcp_llava.schedule import parse_budget

    # Default: the testbed the variants train on. Not built yet (a fresh machine): read after the first variant's
    # training, which builds it. A --dataset that is not there, or a testbed no variant builds (the jobs train
    # from --base_model), fails now, before any training.
    if not variants:
        raise ValueError("variants: none given; name at least one, e.g. " + " ".join(DEFAULT_VARIANTS) + ".")
    # The budget and the data's form are checked before any training (a bad --budget failed after the first
    # variant's, and a --dataset path that is not there was reported by load_data as a bad `--data`).
    try:
        parse_budget(budget)
    except ValueError as error:
        raise ValueError(f"--budget {budget!r}: {error}") from None
    if dataset is not None and not is_data_spec(dataset):
        raise FileNotFoundError(f"--dataset {dataset!r} is neither a dataset folder, 'testbed', 'testbed:PRESET' nor "
                                "BENCHMARK:PATH; pass e.g. the testbed's dataset folder (build_testbed.py's "
                                "OUT/dataset).")
    variants = list(dict.fromkeys(variants))
    if any(v in UNTRAINED for v in variants) and "full" not in variants:
        variants.insert(0, "full")
    for v in variants:
        variant_spec(v)  # fail on a bad name before any training, and before the data (an unbuilt testbed)
    spec, image_folder, trained_on = dataset, None, None
    if dataset is None:
        spec, image_folder = default_evaluation_data(base_args)
        trained_on = spec if not spec.startswith("testbed:") else None
    try:
        data = load_data(spec, split="test", max_samples=max_eval_samples, image_folder=image_folder)
    except FileNotFoundError:
        if dataset is not None or trained_on is not None or flag_value(base_args, "--base_model") is not None:
            raise
        data = None
    trained_order = [v for v in variants if v not in UNTRAINED] + [v for v in variants if v in UNTRAINED]
    # trained variants (full model folders) stay out of the results folder, which holds small text/PNG files only
    work = os.path.join(work_dir or os.path.join(ROOT, "outputs", "ablations"), name)
    check_variants(variants, base_args, work, max_steps)  # and their values
    rows, full_score, n = {}, None, None
    for v in trained_order:
        source = "full" if v in UNTRAINED else v
        model_dir, seconds, argv = train_variant(source, base_args, os.path.join(work, slug(source)), max_steps,
                                                 reuse=reuse or v in UNTRAINED)
        base, processor = load_base_model(model_dir)
        if data is None:
            data = load_data(spec, split="test", max_samples=max_eval_samples, image_folder=image_folder)
        # N from the model, not the data: a folder without the testbed's grid_size column, or a BENCHMARK:PATH
        # spec, failed at the write (KeyError, or Table VI's percent of None) after every variant had trained.
        n = base.config.num_visual_tokens
        if full_score is None:
            none = method_model(base, **method_overrides("none", base.config.num_visual_tokens, base.config))
            full_score = evaluate_model(none, processor, data, batch_size)
        if v == "attention_topk":
            result = evaluate_variant(base, processor, data, budget, batch_size, method="attention_topk")
        else:
            result = evaluate_variant(base, processor, data, budget, batch_size, repair=v != "adapters_off")
        metrics_file = os.path.join(os.path.dirname(model_dir), "metrics.json")
        run_metrics = json.load(open(metrics_file)) if os.path.isfile(metrics_file) else {}
        rows[v] = {"variant": v, "trained": v not in UNTRAINED, "train_seconds": seconds,
                   "train_argv": argv if v not in UNTRAINED else None,
                   "max_steps": max_steps, "grad_norm": run_metrics.get("grad_norm") if v not in UNTRAINED else None,
                   "target_retention": run_metrics.get("target_retention"), **result}
    ordered = [rows[v] for v in variants]
    table6 = None
    if "full" in rows and rows["full"].get("adaptive", {}).get("kept_per_point"):
        kept = rows["full"]["adaptive"]["kept_per_point"]
        table6 = {"pruning_layers": rows["full"]["adaptive"]["pruning_layers"], "kept": kept,
                  "percent_of_n": [100 * c / n for c in kept]}
    paired_with_full(ordered)
    result = {"command": command, "budget": budget, "max_steps": max_steps, "num_eval_samples": len(data),
              "split": split_read(data),  # load_data reads a folder without splits whole, whatever it was asked
              "data": os.fspath(spec),
              "num_visual_tokens": n, "full_model": {"score": full_score["score"], "groups": full_score["groups"]},
              "variants": ordered, "table6": table6}
    # overwrite=False (main without --overwrite): a result another run wrote under NAME since start-up is kept
    write_results(os.path.join(output_dir, name), markdown=format_ablations(result), data=result, overwrite=overwrite)
    return result


def paired_with_full(rows):
    """Add `vs_full` to every other variant's fixed-count result: exact McNemar against `full`'s fixed-count
    predictions on the same samples (`{"a_only", "b_only", "p_value"}`; None without per-sample outcomes)."""
    from rcp_llava.evaluation import mcnemar

    full = next((r["fixed"].get("correct") for r in rows if r["variant"] == "full"), None)
    for r in rows:
        mine = r["fixed"].get("correct")
        r["fixed"]["vs_full"] = (mcnemar(mine, full) if r["variant"] != "full" and full is not None
                                 and mine is not None else None)


def steps_label(max_steps):
    """How long the variants trained, said as `--max_steps` means it to train_rcp: a positive count, or (-1, any
    negative) `num_train_epochs` epochs (it showed as "-1 steps")."""
    if max_steps is None:
        return "the main job's steps"
    return f"{max_steps} steps" if max_steps > 0 else "the job's `num_train_epochs` epochs"


def equal_fixed_compute(variants, tolerance=0.05):
    """Whether every variant's fixed-count row averages the same visual tokens over ALL decoder layers: the same
    first pruning layer (counts averaging k from it on) and, where recorded, the same measured mean within
    `tolerance` tokens (rounding the counts to whole tokens can move it). A `pruners=A,B` variant whose first
    pruner differs keeps all N tokens up to it: more compute, or less, than `full`."""
    firsts = {tuple(r["fixed"]["pruning_layers"][:1]) for r in variants}
    means = [r["fixed"]["avg_tokens_all_layers"] for r in variants if "avg_tokens_all_layers" in r["fixed"]]
    return len(firsts) <= 1 and (not means or max(means) - min(means) <= tolerance)


def format_ablations(result):
    full = result["full_model"]["score"]
    steps = steps_label(result["max_steps"])
    variants = result["variants"]
    equal = equal_fixed_compute(variants)
    full_tokens = next((r["fixed"].get("avg_tokens_all_layers") for r in variants if r["variant"] == "full"), None)

    def rel(score):
        return f"{score / full:.1%}" if full else "–"

    if equal:
        compute = ("every variant prunes first at the same layer, so all average the same visual tokens over all "
                   "layers")
    else:  # a paired test against `full` is then not an equal-compute comparison, and must not read as one
        compute = ("the variants do NOT all average the same visual tokens over all layers (*tok/layer (all)*: their "
                   "fixed-count means; a variant whose first pruner differs keeps all N tokens up to it), so they are "
                   "not at equal compute: a *vs full* test at another compute than `full`'s names both")
    # Results written before the split was recorded asked for "test" (a folder without splits is read whole).
    split = result.get("split", "test")
    samples = (f"{result['num_eval_samples']} test samples" if "split" not in result
               else f"{result['num_eval_samples']} samples ({split})")
    if "data" in result:  # recorded since the default became the variants' own training data
        samples += f" of `{result['data']}`"
    lines = [f"# Ablations (Tables IV / V / VII analogs), budget {result['budget']} of "
             f"N = {result['num_visual_tokens']}",
             "", f"Command: `{result['command']}`", "",
             f"Each trained variant: `train_rcp.py` with {steps} (labelled below), evaluated on "
             f"{samples} (first-token accuracy). *fixed*: keep counts whose average "
             f"over the layers from the first pruner is k ({compute}); *adaptive*: the trained threshold. *vs full*: "
             "exact McNemar of the fixed-count predictions against `full`'s on the same samples (samples only this "
             f"variant / only `full` gets right, p). Full model: {full:.3f}.", "",
             "| variant | trained | pruning layers | repair layers | fixed counts | "
             + ("" if equal else "tok/layer (all), fixed | ") + "acc (fixed) | % of full | "
             "vs full (fixed) | acc (adaptive) | % of full | adaptive kept per pruning layer | adaptive tok/layer (from 1st / all) | "
             "retention / target | grad norm median / p99 / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("" if equal else "---|")]
    for r in variants:
        fixed = r["fixed"]
        adaptive = r.get("adaptive")
        trained = (("yes" if r["max_steps"] is None else f"yes ({steps_label(r['max_steps'])})") if r["trained"]
                   else "no (uses `full`)")
        cells = [r["variant"], trained, str(fixed["pruning_layers"]), str(fixed["repair_layers"] or "none"),
                 str(fixed["keep_counts"])]
        tokens = fixed.get("avg_tokens_all_layers")
        if not equal:
            cells.append("–" if tokens is None else f"{tokens:.1f}")
        cells += [f"{fixed['score']:.3f}", rel(fixed["score"])]
        test = fixed.get("vs_full")
        cell = f"{test['a_only']}/{test['b_only']}, p {test['p_value']:.2g}" if test else "–"
        if test and not equal:
            if tokens is None or full_tokens is None:
                cell += " (compute not recorded)"
            elif abs(tokens - full_tokens) > 0.05:
                cell += f" (not equal compute: {tokens:.1f} vs full's {full_tokens:.1f} tok/layer)"
        cells.append(cell)
        if adaptive:
            kept = ", ".join(f"{c:.1f}" for c in adaptive["kept_per_point"])
            cells += [f"{adaptive['score']:.3f}", rel(adaptive["score"]), kept,
                      f"{adaptive['avg_tokens_from_first_point']:.1f} / {adaptive['avg_tokens_all_layers']:.1f}"]
            target = r.get("target_retention")
            n = result["num_visual_tokens"]
            cells.append(f"{adaptive['avg_tokens_from_first_point'] / n:.3f} / {target:.3f}" if target and n else "–")
        else:
            cells += ["–", "–", "–", "–", "–"]
        g = r.get("grad_norm")
        cells.append(f"{g['median']:.3g} / {g['p99']:.3g} / {g['max']:.3g}" if g else "–")
        lines.append("| " + " | ".join(cells) + " |")
    table6 = result.get("table6")
    if table6:
        lines += ["", "## Per-layer retention (Table VI analog): `full`, adaptive threshold", "",
                  "| pruning layer | " + " | ".join(str(p) for p in table6["pruning_layers"]) + " |",
                  "|---|" + "---|" * len(table6["pruning_layers"]),
                  "| kept tokens | " + " | ".join(f"{c:.1f}" for c in table6["kept"]) + " |",
                  "| % of N | " + " | ".join(f"{p:.2f}%" for p in table6["percent_of_n"]) + " |",
                  "", "Paper (LLaVA-1.5-7B, 64 of 576): 16.72% / 4.59% / 1.44% after layers 2 / 14 / 26."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--budget", default="1/9", help="Evaluation budget (fraction of N).")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="Training steps per variant (default: the job's; -1: train_rcp's `num_train_epochs`).")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None)
    parser.add_argument("--train_args", default="", help="Extra train_rcp.py flags for every variant (one string).")
    parser.add_argument("--dataset", default=None,
                        help="Evaluation data (default: the test split of the data the variants train on: the "
                             "--dataset_name_or_path in --train_args when it is a save_to_disk DatasetDict with one, "
                             "with its --image_folder; with no dataset there, the testbed's, --testbed_preset there "
                             "or the main job's; otherwise give it).")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of NAME.md / NAME.json (default {DEFAULT_OUTPUT_DIR}; committed tables: "
                             "benchmarks/results).")
    parser.add_argument("--name", type=result_name, default="ablations")
    parser.add_argument("--overwrite", action="store_true", help="Replace NAME.md / NAME.json in --output_dir.")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "ablations"),
                        help="Where the trained variants go (WORK_DIR/NAME/VARIANT); reused on a rerun with the same flags "
                             "and base weights, trained again otherwise.")
    parser.add_argument("--no_reuse", action="store_true", help="Retrain variants whose folder already exists.")
    parser.add_argument("--threads", type=positive_int, default=None)
    args = parser.parse_args(argv)
    if args.max_steps == 0:  # train_rcp refuses it too, but only once the first variant's job starts
        parser.error("argument --max_steps: 0 trains nothing; give a positive number of steps, or -1 to train for "
                     "`num_train_epochs` epochs")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    stem = os.path.join(args.output_dir, args.name)
    refuse_existing([stem + ".md", stem + ".json"], args.overwrite)  # before hours of training
    result = run(args.variants, shlex.split(args.train_args), args.output_dir, args.name, budget=args.budget,
                 max_steps=args.max_steps, max_eval_samples=args.max_eval_samples, dataset=args.dataset,
                 batch_size=args.batch_size, reuse=not args.no_reuse, command=command, work_dir=args.work_dir,
                 overwrite=args.overwrite)
    print(format_ablations(result))
    return result


if __name__ == "__main__":
    main()
