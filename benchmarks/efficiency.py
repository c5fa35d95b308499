"""Efficiency benchmark: prefill, decode, end-to-end time, memory, KV cache and FLOPs, every method side by side.

    python benchmarks/efficiency.py                                   # mid CPU preset, batch 1 and 8
    python benchmarks/efficiency.py --preset tiny --batch_sizes 1 --repeats 2      # smoke run
    python benchmarks/efficiency.py --preset llava-1.5-7b --batch_sizes 1,8        # GPU, bf16, random weights

Methods: the full model; RCP at the paper's three schedules (fixed keep counts, so that timing does not depend
on what random weights would keep); the *ideal* for each RCP schedule -- the same model and the same per-layer
token counts with the kept sets given, i.e. no token selection at all; and VisPruner and random pruning before the
LLM and FastV at the same mean number of visual tokens per decoder layer as that RCP schedule (FastV where its
layer allows). Each number is the median of `--repeats` runs after warm-up, all methods interleaved round by
round in one process, so ratios are measured side by side.

Schedules. RCP's pruners and repair adapters sit where the authors put them (`paper_placement`: before 0-based
layers 1 / 13 / 25 of 32 at 64 tokens, 4 / 14 / 24 at 128 and 192; the paper prints them counted from 1), scaled by
relative depth on shallower decoders. The keep counts make the mean over ALL decoder layers equal the budget (the
paper's definition), with the proportions between the stages of Table VI's 64-token row for every budget
(`stage_proportions`; its 128 and 192 rows keep other shares per stage: 347/43/9 at 192 where these keep 286/78/25,
which average 192.0 visual tokens per layer where Table VI's counts average 196.1, with 1.8% more decoder FLOPs)
(`keep_counts_for_budget`). Where the budget is
below what the layers before the first pruner already cost (64 of 576 on 8 layers: layer 0 alone averages 72), the
32-layer counts are kept and the reported tokens per layer say what the schedule costs; the baselines are matched
to that, not to the name.

Beside the times: the aten calls each prefill and decode step dispatches (and the host syncs among them), and on
CUDA each method's GPU kernel time for one prefill and one step (the profiler, once every timing is done): where
the host's dispatch outlasts the kernels (a GPU at batch 1), the wall clock follows the calls and the kernel time
says what the work itself costs.
"""

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, LlamaConfig, LogitsProcessor, LogitsProcessorList

from configuration_rcp_llava import RcpLlavaConfig, default_fastv_layer, paper_placement, visual_tokens_per_layer
from modeling_rcp_llava import PrunedPrefill, RcpLlavaForConditionalGeneration, RcpPlugins
from rcp_llava.evaluation import method_overrides
from rcp_llava.flops import analytic_kv_bytes, keep_counts_for_budget, kv_cache_bytes, llava_flops
from rcp_llava.schedule import round_count, stage_proportions
from rcp_llava.results import (DEFAULT_OUTPUT_DIR, command_line, positive_int, refuse_existing, result_name,
                               save_figure, write_results)


PRESETS = {
    "tiny": dict(vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=48, patch_size=4),
                 text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128),
                 text_tokens=20, dtype="float32", plugin_size=8),
    "mid": dict(vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                            image_size=336, patch_size=14),
                text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
                text_tokens=40, dtype="float32", plugin_size=56),
    # mid at LLaVA-1.5-7B's depth: the paper's placements unscaled, on a CPU
    "mid-32": dict(vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                               image_size=336, patch_size=14),
                   text=dict(hidden_size=512, num_hidden_layers=32, num_attention_heads=8, intermediate_size=1376),
                   text_tokens=40, dtype="float32", plugin_size=56),
    "llava-1.5-7b": dict(vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768),
                         text=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   intermediate_size=11008),
                         text_tokens=64, dtype="bfloat16", plugin_size=512),
}

# The presets a CPU can run (the 7B shape is the GPU table's: its fp32 models do not fit in host memory twice).
CPU_PRESETS = sorted(p for p in PRESETS if p != "llava-1.5-7b")
PAPER_VISUAL_TOKENS, PAPER_LAYERS = 576, 32
VOCAB = 32064
FAMILIES = ("full", "rcp", "ideal", "vispruner", "random", "fastv")


def num_visual_tokens(preset):
    """Visual tokens per image of `preset`: (image size / patch size) squared."""
    vision = PRESETS[preset]["vision"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def build_config(preset, **pruning):
    spec = PRESETS[preset]
    text = LlamaConfig(vocab_size=VOCAB, pad_token_id=0, **spec["text"])
    return RcpLlavaConfig(
        text_config=text.to_dict(), vision_config=CLIPVisionConfig(**spec["vision"]).to_dict(),
        image_token_index=VOCAB - 1, image_seq_length=num_visual_tokens(preset),
        **pruning,
    )


def make_inputs(preset, batch_size, device="cpu", dtype=torch.float32):
    """The benchmark's prompt of `preset`: BOS, the image's visual tokens, then `text_tokens - 1` random text tokens,
    every row unpadded; random pixels. Draws from torch's global generator (seed it first)."""
    spec = PRESETS[preset]
    n = num_visual_tokens(preset)
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), torch.full((batch_size, n), VOCAB - 1),
                     torch.randint(3, 1000, (batch_size, spec["text_tokens"] - 1))], dim=1).to(device)
    size = spec["vision"]["image_size"]
    pixels = torch.randn(batch_size, 3, size, size).to(device, dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def rcp_schedule(num_layers, num_visual_tokens, budget):
    """(pruning layers, repair layers, keep counts, whether the budget is met) of the paper's schedule named by
    `budget` (visual tokens of 576) on a decoder of `num_layers` layers with `num_visual_tokens` per image."""
    layers, repair = paper_placement(num_layers, budget / PAPER_VISUAL_TOKENS)
    proportions = stage_proportions(len(layers))
    tokens = round_count(budget * num_visual_tokens / PAPER_VISUAL_TOKENS)
    try:
        return layers, repair, keep_counts_for_budget(num_layers, num_visual_tokens, layers, tokens, proportions), True
    except ValueError as unreachable:  # below the cost of the layers before the first pruner: the 32-layer counts,
        # scaled to this image's tokens (capped at N unscaled, "128" kept 134 of tiny's 144, more than "64" or "192")
        paper_layers, _ = paper_placement(PAPER_LAYERS, budget / PAPER_VISUAL_TOKENS)
        try:
            counts = keep_counts_for_budget(PAPER_LAYERS, PAPER_VISUAL_TOKENS, paper_layers, budget, proportions)
        except ValueError:
            raise unreachable from None  # the preset's own placement is the reason, not the 32-layer one
        scaled = [min(round_count(c * num_visual_tokens / PAPER_VISUAL_TOKENS), num_visual_tokens) for c in counts]
        return layers, repair, scaled, False


def method_configs(preset, budgets, families=FAMILIES):
    """name -> (config overrides, per-layer visual token counts, forced-masks flag, budget), every method of a
    budget at RCP's mean visual tokens per layer."""
    layers_total = PRESETS[preset]["text"]["num_hidden_layers"]
    n = num_visual_tokens(preset)
    methods = {"full": (dict(pruning_method="none", pruning_layers=[1], repair_layers=[]), [n] * layers_total,
                        False, n)}
    fastv_layer = default_fastv_layer(layers_total)
    full_config = build_config(preset, **methods["full"][0])
    plugin_size = PRESETS[preset]["plugin_size"]
    for budget in budgets:
        layers, repair, counts, _ = rcp_schedule(layers_total, n, budget)
        rcp = dict(pruning_method="rcp", pruning_layers=layers, repair_layers=repair, pruning_keep_counts=counts,
                   pruner_hidden_size=plugin_size, repair_bottleneck_size=plugin_size)
        per_layer = visual_tokens_per_layer(layers_total, n, layers, counts)
        mean = sum(per_layer) / layers_total
        methods[f"rcp-{budget}"] = (rcp, per_layer, False, budget)
        methods[f"ideal-{budget}"] = (rcp, per_layer, True, budget)
        matched = round_count(mean)
        methods[f"vispruner-{budget}"] = (dict(pruning_method="vispruner", pre_llm_keep_count=matched),
                                          [matched] * layers_total, False, budget)
        methods[f"random-{budget}"] = (dict(pruning_method="random", pre_llm_keep_count=matched),
                                       [matched] * layers_total, False, budget)
        try:  # FastV's count after its layer for the same mean over all layers (as evaluate_methods --flop_matched)
            fastv = method_overrides("fastv", mean, full_config, fastv_layer=fastv_layer, flop_matched=True)
        except ValueError:  # the layers before FastV's alone hold more: no FastV cell at this budget
            fastv = None
        if fastv is not None:
            methods[f"fastv-{budget}"] = (fastv, visual_tokens_per_layer(layers_total, n, [fastv_layer],
                                                                         fastv["pruning_keep_counts"]), False, budget)
    return {name: spec for name, spec in methods.items() if name.split("-")[0] in families}


def device_clock(device):
    """`(now, seconds)` for timing spans on `device` without waiting for it: `now()` is a CUDA event recorded on a
    GPU, `time.perf_counter()` on a CPU; `seconds(start, end)` the time between two readings, read once the device
    has finished."""
    if torch.device(device).type != "cuda":
        # looked up at each reading, as the timer did: a stand-in clock patched in later still applies
        return lambda: time.perf_counter(), lambda start, end: end - start

    def now():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    return now, lambda start, end: start.elapsed_time(end) / 1e3


class SelectionTimer:
    """Times one model's token selection inside its forwards, without waiting for the device: CUDA events on a GPU
    (read once the forward's own sync is done), `time.perf_counter` on a CPU.

    Per run (`reset`, forward, `totals`): the spans inside `_select_tokens`, and the part of them the pruning layer
    then reads instead of computing it. RCP's prior runs the pruning layer's `input_layernorm` and `self_attn.k_proj`
    on the whole sequence and the layer reuses their kept rows (`PrunedPrefill.given_inputs`): those two calls are
    timed (hooks that exist only during this model's selection: the backbone is shared by every method's model),
    and once the layer runs, time x kept rows / all rows counts as reused (the dropped rows stay selection cost).
    """

    def __init__(self, device):
        self._now, self._seconds = device_clock(device)
        self.reset()

    def reset(self):
        self.spans = []  # (start, end) per selection
        self.reused = []  # ((start, end), kept rows / all rows) per reused call

    def wrap(self, model):
        """Time `model`'s selections from now on; returns the original `_select_tokens` (to put back)."""
        original = model.model._select_tokens

        def select_tokens(selector, ctx):
            layer, calls = ctx.layer, []  # calls: (start, end, rows) of the layer's norm / k_proj in this selection

            def before(module, args):
                module._rcp_started = self._now()

            def after(module, args, output):
                calls.append((module._rcp_started, self._now(), args[0].shape[0] * args[0].shape[1]))

            modules = (layer.input_layernorm, layer.self_attn.k_proj)
            handles = [m.register_forward_pre_hook(before) for m in modules]
            handles += [m.register_forward_hook(after) for m in modules]
            start = self._now()
            try:
                out = original(selector, ctx)
            finally:
                end = self._now()
                for handle in handles:
                    handle.remove()
            self.spans.append((start, end))
            if calls:
                def layer_runs(module, args, kwargs):  # once: the layer on its kept rows
                    hidden = args[0] if args else kwargs["hidden_states"]
                    kept = hidden.shape[0] * hidden.shape[1]
                    self.reused += [((s, e), kept / rows) for s, e, rows in calls]
                    once.remove()

                once = layer.register_forward_pre_hook(layer_runs, with_kwargs=True)
            return out

        model.model._select_tokens = select_tokens
        return original

    def totals(self):
        """(selection seconds, reused seconds) since `reset`; call after the device finished the forward."""
        selection = sum(self._seconds(s, e) for s, e in self.spans)
        return selection, sum(self._seconds(s, e) * share for (s, e), share in self.reused)


# Ops whose result the host must read before it can go on (a pipeline stall on a GPU): these, indexing by a boolean
# mask, a copy from the device to the host, and `Tensor.tolist` (which on a CPU tensor dispatches nothing: counted at
# the Python level when the counted model runs on a CPU; a device tensor's dispatches a copy to the host).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "equal", "is_nonzero"}
BOOLEAN_INDEX_OPS = {"index", "index_put_", "index_put", "_index_put_impl_"}


def sync_kind(func, args, kwargs):
    """The kind of host sync the aten call `func(*args, **kwargs)` is (its op name, "boolean_index" or
    "device_to_host"), or None."""
    name = func.__name__.split(".")[0]
    if name in SYNC_OPS:
        return name
    if name in BOOLEAN_INDEX_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]):
        return "boolean_index"  # the output's size is the mask's count: nonzero inside
    if name == "_to_copy":  # tensor.to("cpu") / .cpu() of a device tensor
        device = kwargs.get("device")
        if args[0].device.type != "cpu" and device is not None and torch.device(device).type == "cpu":
            return "device_to_host"
    if name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":  # into a host tensor
        return "device_to_host"
    return None


class AtenCounter(TorchDispatchMode):
    """Counts the aten calls dispatched while it is active (`total`) and the host syncs among them, by kind
    (`sync_counts`; `syncs` their sum); `device`: where the counted model runs (on a CPU, its tensors' `tolist`
    is a sync that dispatches nothing)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.total = 0
        self.sync_counts = collections.Counter()

    @property
    def syncs(self):
        return sum(self.sync_counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.total += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.sync_counts[kind] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = original = torch.Tensor.tolist

        def tolist(tensor):
            # On a CPU `tolist` dispatches nothing, so it is counted here; a device tensor's dispatches its copy to
            # the host, counted as "device_to_host" (it was counted here too, 2 for the 1 sync that PyTorch's CUDA
            # sync debug mode reports: `tests/test_cuda.py`)
            if tensor.device.type == self.device_type == "cpu":
                self.sync_counts["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        try:
            return super().__enter__()
        except BaseException:
            torch.Tensor.tolist = original
            raise

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def aten_calls(model, inputs):
    """Aten calls (every op torch dispatches, views included) of one forward of `model` on `inputs` (a prompt with a
    cache), outside any timing: {"total", "layers" (all decoder layers), "outside" (the rest but pruning),
    "per_layer", "points": [{"selection" (None where no selection ran: given masks), "prune" (the rest of
    `PrunedPrefill.prune`)} per pruning point], "step", "step_syncs"}: the last two of one decode step on that
    forward's cache, as `generate` runs it (the next token, no attention mask: generate drops an all-ones one), and
    the host syncs among them. Where a layer's host-side dispatch outlasts its kernels (a GPU at batch 1), time
    follows these counts rather than FLOPs; each sync stops the host from queueing ahead."""
    counter, points, layers = AtenCounter(), [], [0]
    original_select, original_prune = model.model._select_tokens, PrunedPrefill.prune

    def select_tokens(selector, ctx):
        start = counter.total
        keep = original_select(selector, ctx)
        points[-1]["selection"] = counter.total - start
        return keep

    def prune(run, *args, **kwargs):
        start = counter.total
        points.append({"selection": None})
        out = original_prune(run, *args, **kwargs)
        points[-1]["prune"] = counter.total - start - (points[-1]["selection"] or 0)
        return out

    def before(module, args, kwargs):
        module._rcp_aten_start = counter.total

    def after(module, args, kwargs, output):
        layers[0] += counter.total - module._rcp_aten_start

    decoder = model.model.language_model.layers
    hooks = [h for layer in decoder for h in (layer.register_forward_pre_hook(before, with_kwargs=True),
                                               layer.register_forward_hook(after, with_kwargs=True))]
    model.model._select_tokens, PrunedPrefill.prune = select_tokens, prune
    try:
        with torch.no_grad(), counter:
            out = model(**inputs)
    finally:
        model.model._select_tokens, PrunedPrefill.prune = original_select, original_prune
        for hook in hooks:
            hook.remove()
    step = AtenCounter(model.device)
    with torch.no_grad():
        next_token = out.logits[:, -1:].argmax(-1)
        with step:
            model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    pruning = sum((p["selection"] or 0) + p["prune"] for p in points)
    return {"total": counter.total, "layers": layers[0], "outside": counter.total - layers[0] - pruning,
            "per_layer": layers[0] / len(decoder), "points": points, "step": step.total, "step_syncs": step.syncs}


def device_kernel_ms(events):
    """Milliseconds the device spent in kernels (and copies) among profiler `events`: the sum of the self device
    time of the events that ran on the GPU, as the profiler's own table totals "Self CUDA time" (kineto events;
    user annotations excluded, since they span kernels already counted). One stream runs them one after another,
    so this is the GPU's busy time, whatever the host took to queue them. None where no event ran on the GPU (a
    profiler that recorded no kernels: a 0 would read as free work)."""
    gpu = gpu_events(events)
    return sum(e.self_device_time_total for e in gpu) / 1e3 if gpu else None


def gpu_events(events):
    """The profiler `events` that ran on the GPU (kernels, copies, memsets), user annotations excluded."""
    return [e for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile_gpu(run):
    """`run()` under the profiler, the GPU drained before and after: (the GPU's busy ms, the GPU events) of what it
    queued (`device_kernel_ms`, `gpu_events`), and what `run` returned."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        result = run()
        torch.cuda.synchronize()
    events = gpu_events(prof.events())  # built once: a 7B prefill's profile holds thousands of events
    return device_kernel_ms(events), len(events), result


def kernel_times(model, inputs, repeats=3, measure=profile_gpu):
    """GPU kernel time of one prefill of `model` on `inputs` and of one decode step on its cache (as `aten_calls`
    runs them), in ms: {"prefill", "step"}, with the number of GPU events each ran ({"prefill_kernels",
    "step_kernels"}: many small kernels each take microseconds however little they compute); None off CUDA.
    Medians of `repeats` profiled pairs, each step on its own prefill's fresh cache (a step appends to the cache it
    is given), outside the timing: where the wall clock follows the host's dispatch (a GPU at batch 1), this is
    what the work itself costs -- what CUDA graphs would leave, and fused kernels shorten. `measure`: how one call
    is profiled (`profile_gpu`; another stands in for it in the CPU tests)."""
    if model.device.type != "cuda" and measure is profile_gpu:
        return None
    prefills, steps = [], []
    with torch.no_grad():
        for _ in range(repeats):
            *prefill, out = measure(lambda: model(**inputs))
            next_token = out.logits[:, -1:].argmax(-1)  # inside neither profile
            *step, _ = measure(lambda: model(input_ids=next_token, past_key_values=out.past_key_values,
                                              use_cache=True, logits_to_keep=1))
            prefills.append(prefill)
            steps.append(step)

    def median(values):  # None where a profile saw no GPU event
        return None if None in values else statistics.median(values)

    return {"prefill": median([ms for ms, _ in prefills]), "step": median([ms for ms, _ in steps]),
            "prefill_kernels": statistics.median_low([n for _, n in prefills]),
            "step_kernels": statistics.median_low([n for _, n in steps])}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock(LogitsProcessor):
    """Reads the clock each time `generate` has a new token's logits (after the device finished them): the first
    reading follows the prefill, each later one a decode step. Decode time per token is then measured inside one
    `generate`, not as its end-to-end time minus a separately timed prefill (whose run-to-run noise, with few new
    tokens, can exceed the decode time itself and make the difference negative)."""

    def __init__(self, device):
        self.device = device
        self.times = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def per_token(self):
        """Seconds per decode step (None before two readings: no step was timed)."""
        steps = len(self.times) - 1
        return (self.times[-1] - self.times[0]) / steps if steps > 0 else None


def positive_ints(text, flag):
    """'1,8' -> [1, 8]; ValueError naming `flag` unless every item is a whole number >= 1 (`--batch_sizes 0` was a
    reshape error and `--budgets abc` int()'s "invalid literal", both after the models were built)."""
    try:
        values = [positive_int(item.strip()) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise ValueError(f"{flag} {text!r}: give comma-separated whole numbers >= 1, e.g. '1,8'.")
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--budgets", default="192,128,64")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--new_tokens", type=int, default=32,
                        help="Tokens generated for the decode / end-to-end columns; 0 times the prefill alone (more "
                             "repeats in the same time, for the selection share and the ratio to the ideal).")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"Folder of efficiency_PRESET_DEVICE.md/.json/.png (default {DEFAULT_OUTPUT_DIR}; "
                             "committed tables: benchmarks/results).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing table in --output_dir.")
    parser.add_argument("--tag", default="", type=lambda value: value and result_name(value),  # a file-name part
                        help="Suffix of the output names (e.g. `flash` for a second kernel).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(FAMILIES),
                        help=f"Comma-separated method families to time (of {', '.join(FAMILIES)}); `full` always runs.")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="The decoder's attention kernel (flash_attention_2 needs the flash-attn package).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights and activations: auto = the preset's own on CUDA (bf16 for llava-1.5-7b), "
                             "float32 on the CPU. bfloat16 on the CPU fits the 7B shape in host memory (a slow check "
                             "of the GPU run's shapes and dtypes, batch 1).")
    parser.add_argument("--dry_run", action="store_true",
                        help="Build every method's config and model on the meta device, time nothing, write nothing: "
                             "checks a preset's schedules and plug-ins where it cannot run (the GPU preset on a CPU).")
    args = parser.parse_args()
    if args.new_tokens < 0:  # 0 is documented (the prefill alone); a negative count was taken as 0
        parser.error(f"argument --new_tokens: must be a whole number >= 0, got {args.new_tokens}")
    families = {"full", *(f.strip() for f in args.methods.split(",") if f.strip())}
    unknown = families - set(FAMILIES)
    if unknown:
        raise ValueError(f"--methods: unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}.")
    if "ideal" in families:
        families.add("rcp")  # the ideal replays RCP's kept sets
    # Every argument checked before the models are built (these failed after, deep in the first round).
    batch_sizes = positive_ints(args.batch_sizes, "--batch_sizes")
    budgets = positive_ints(args.budgets, "--budgets")
    n = num_visual_tokens(args.preset)
    for budget in budgets:  # 576 or 600 failed in the schedule's solver, naming no flag
        if budget >= PAPER_VISUAL_TOKENS:
            raise ValueError(f"--budgets {budget}: a budget counts the visual tokens of LLaVA-1.5's "
                             f"{PAPER_VISUAL_TOKENS} kept on average (the paper's 192, 128 and 64); "
                             f"{PAPER_VISUAL_TOKENS} or more prunes nothing. Give budgets below {PAPER_VISUAL_TOKENS}.")
        try:
            rcp_schedule(PRESETS[args.preset]["text"]["num_hidden_layers"], n, budget)
        except ValueError as err:
            raise ValueError(f"--budgets {budget}: no RCP schedule of preset {args.preset!r} reaches it. Budgets count "
                             f"visual tokens of LLaVA-1.5's {PAPER_VISUAL_TOKENS} (the paper's 192, 128 and 64). "
                             f"{err}") from None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # a torch error deep in the model's build otherwise
        raise ValueError(f"--device {args.device!r}: use cpu or cuda (cuda:N).")
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:  # the dry run builds on meta
        raise ValueError(f"--device {args.device!r}: CUDA is not available here (torch "
                         f"{torch.__version__}); pass --device cpu, or --dry_run to check the preset's schedules.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.dry_run:  # a dry run writes nothing, so earlier tables (the committed ones included) do not stop it
        refuse_existing([output_stem(args, device) + ext for ext in (".md", ".json", ".png")], args.overwrite,
                        choose="--tag / --output_dir")
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = getattr(torch, PRESETS[args.preset]["dtype"]) if device.type == "cuda" else torch.float32
    spec = PRESETS[args.preset]
    methods = method_configs(args.preset, budgets, families)
    if args.dry_run:
        with torch.device("meta"):
            for overrides, *_ in methods.values():
                RcpLlavaForConditionalGeneration(build_config(args.preset, **overrides))
        print(f"dry run: {len(methods)} methods of preset {args.preset} built on the meta device: {', '.join(methods)}")
        return

    # One backbone for every method (a 7B model fits once, not 16 times): each method's model is built on the
    # meta device, then takes the base model's backbone modules and builds only its own plug-ins.
    # Built directly on the device in its dtype: a random 7B model initialised on the host takes minutes.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = RcpLlavaForConditionalGeneration(build_config(args.preset, **methods["full"][0])).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    base.set_attn_implementation(args.attn_implementation)
    base.generation_config.pad_token_id = 0
    models = {}
    for name, (overrides, _, _, _) in methods.items():
        if name == "full":
            models[name] = base
            continue
        config = build_config(args.preset, **overrides)
        config._attn_implementation = args.attn_implementation
        with torch.device("meta"):
            model = RcpLlavaForConditionalGeneration(config)
        for attr in ("vision_tower", "multi_modal_projector", "language_model"):
            setattr(model.model, attr, getattr(base.model, attr))
        model.lm_head = base.lm_head
        model.model.rcp_plugins = RcpPlugins(config).to(device, dtype)
        with torch.no_grad():
            model.model.rcp_plugins.apply(model._init_weights)
        model.generation_config.pad_token_id = 0
        models[name] = model.eval()

    text_tokens = spec["text_tokens"]
    results, written, profile_inputs = [], None, {}
    for index, bsz in enumerate(batch_sizes):
        inputs = make_inputs(args.preset, bsz, device, dtype)
        forced = {}
        for name, (overrides, _, is_ideal, _) in methods.items():
            if is_ideal:  # the kept sets RCP chose, given to the same model: no selection
                with torch.no_grad():
                    rcp = models[name.replace("ideal", "rcp")](**inputs, use_cache=False, logits_to_keep=1)
                forced[name] = rcp.keep_masks
        # Each method's forward inputs: the ideals also get RCP's kept sets (timed runs and the call count alike).
        method_inputs = {name: {**inputs, **({"visual_keep_masks": forced[name]} if name in forced else {})}
                         for name in methods}

        timers = {name: SelectionTimer(device) for name in methods if name.startswith("rcp")}
        originals = {name: timer.wrap(models[name]) for name, timer in timers.items()}
        prefill, e2e, clocks, kv, peak, sel_per_run, reused_per_run = {}, {}, {}, {}, {}, {}, {}
        with torch.no_grad():
            for round_index in range(args.repeats + 1):  # round 0 is the warm-up
                # Every other round in reverse order: no method always runs right after the same one (the machine's
                # caches and clock then favour none of them).
                for name in (list(methods) if round_index % 2 == 0 else list(reversed(methods))):
                    model = models[name]
                    kwargs = method_inputs[name]
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    if name in timers:
                        timers[name].reset()
                    sync(device)
                    start = time.perf_counter()
                    out = model(**kwargs, use_cache=True, logits_to_keep=1)
                    sync(device)
                    t_prefill = time.perf_counter() - start
                    sel, sel_reused = timers[name].totals() if name in timers else (0.0, 0.0)
                    if round_index == 0:
                        kv[name] = kv_cache_bytes(out.past_key_values)
                    # The prefill's cache is not the generation's: freed first, so the peak holds one cache at a time
                    # (and the next method's peak none of this one's).
                    out = None
                    clock = StepClock(device)
                    start = time.perf_counter()
                    if args.new_tokens > 0:
                        model.generate(**kwargs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False, logits_processor=LogitsProcessorList([clock]))
                    sync(device)
                    t_e2e = time.perf_counter() - start
                    if round_index == 0:
                        continue
                    prefill.setdefault(name, []).append(t_prefill)
                    e2e.setdefault(name, []).append(t_e2e)
                    clocks.setdefault(name, []).append(clock)
                    sel_per_run.setdefault(name, []).append(sel)
                    reused_per_run.setdefault(name, []).append(sel_reused)
                    if device.type == "cuda":
                        peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
        for name, original in originals.items():
            models[name].model._select_tokens = original
        calls = {name: aten_calls(models[name], {**method_inputs[name], "use_cache": True, "logits_to_keep": 1})
                 for name in methods}

        full_flops = llava_flops(base.config, num_text_tokens=text_tokens, batch_size=bsz).total

        def paired_ratio(name, reference):  # median over rounds of name / reference in the same round
            return statistics.median(a / b for a, b in zip(prefill[name], prefill[reference]))

        for name, (overrides, per_layer, is_ideal, budget) in methods.items():
            tokens = [v + text_tokens for v in per_layer]
            flops = llava_flops(base.config, num_text_tokens=text_tokens, decoder_tokens_per_layer=tokens,
                                batch_size=bsz).total
            p, e = statistics.median(prefill[name]), statistics.median(e2e[name])
            steps = [clock.per_token() for clock in clocks[name]]  # seconds per decode step, per run
            decoding = args.new_tokens > 0
            results.append({
                "method": name, "batch_size": bsz, "budget": budget, "dtype": str(dtype).removeprefix("torch."),
                "avg_visual_tokens_per_layer": sum(per_layer) / len(per_layer),
                "prefill_ms": p * 1e3, "prefill_ms_runs": [t * 1e3 for t in prefill[name]],
                "prefill_x_full": paired_ratio(name, "full"),
                "prefill_x_ideal": (paired_ratio(name, name.replace("rcp", "ideal"))
                                    if name.startswith("rcp") and name.replace("rcp", "ideal") in prefill else None),
                # timed step by step inside generate (`StepClock`); None with fewer than 2 new tokens
                "decode_ms_per_token": statistics.median(steps) * 1e3 if decoding and None not in steps else None,
                "decode_ms_per_token_runs": [t * 1e3 if t is not None else None for t in steps],
                "decode_clock_readings": [len(clock.times) for clock in clocks[name]],  # per run: one per new token
                "end_to_end_ms": e * 1e3 if decoding else None,
                "end_to_end_ms_runs": [t * 1e3 for t in e2e[name]] if decoding else None,
                "kv_cache_mib": kv[name] / 2**20,
                "kv_cache_analytic_mib": analytic_kv_bytes(base.config, tokens, dtype, bsz) / 2**20,
                "peak_memory_mib": peak[name] / 2**20 if name in peak else None,
                "selection_ms": statistics.median(sel_per_run[name]) * 1e3,
                "selection_ms_runs": [t * 1e3 for t in sel_per_run[name]],
                # shares of the prefill: medians of the per-run shares (the run's selection over its own prefill)
                "selection_share": statistics.median(a / b for a, b in zip(sel_per_run[name], prefill[name])),
                "selection_net_share": statistics.median((a - r) / b for a, r, b in zip(
                    sel_per_run[name], reused_per_run[name], prefill[name])),
                # the part of it the pruning layers would have computed anyway (their kept rows' norm and keys)
                "selection_reused_ms": statistics.median(reused_per_run[name]) * 1e3,
                "selection_net_ms": statistics.median(a - b for a, b in zip(sel_per_run[name],
                                                                            reused_per_run[name])) * 1e3,
                "analytic_tflops": flops / 1e12, "flops_ratio": flops / full_flops,
                "aten_calls": calls[name]["total"],
                "aten_calls_selection": sum(p["selection"] or 0 for p in calls[name]["points"]),
                "decode_step_aten_calls": calls[name]["step"], "decode_step_syncs": calls[name]["step_syncs"],
                # GPU busy time of one prefill / decode step and the GPU events in each: filled in after every
                # batch size's timing (below)
                "prefill_kernel_ms": None, "decode_step_kernel_ms": None,
                "prefill_gpu_kernels": None, "decode_step_gpu_kernels": None,
            })
        profile_inputs[bsz] = method_inputs
        # Written after every batch size: a run stopped at its time limit (a lent device's) keeps what it measured.
        written = write_outputs(results, args, device, pending=batch_sizes[index + 1:], stem=written,
                                kernels_pending=batch_sizes if device.type == "cuda" else ())

    # The GPU's own kernel time per method, profiled only once every timing is done: a profiler session can leave
    # CUPTI hooked into every later kernel launch (pytorch/pytorch#144455), which would slow the host-bound runs
    # timed after it. Off CUDA there is nothing to measure (`kernel_times` is None; the rows keep None). Written
    # after each batch size's profiles; a profile that fails leaves its row's cells empty and loses nothing else.
    for index, bsz in enumerate(batch_sizes):
        measured = False
        for row in (r for r in results if r["batch_size"] == bsz):
            try:
                times = kernel_times(models[row["method"]], {**profile_inputs[bsz][row["method"]],
                                                              "use_cache": True, "logits_to_keep": 1})
            except Exception as err:  # noqa: BLE001 -- a profiler failure must not cost the timings above
                print(f"efficiency: GPU kernel times of {row['method']} at batch {bsz} not measured: {err!r}",
                      file=sys.stderr)
                continue
            if times is not None:
                row["prefill_kernel_ms"], row["decode_step_kernel_ms"] = times["prefill"], times["step"]
                row["prefill_gpu_kernels"], row["decode_step_gpu_kernels"] = (times["prefill_kernels"],
                                                                              times["step_kernels"])
                measured = True
        if measured:
            write_outputs(results, args, device, stem=written, kernels_pending=batch_sizes[index + 1:])


def kernel_cell(row, full):
    """'prefill / step' GPU kernel ms with the prefill's ratio to full's, and the GPU events each ran where counted;
    'n/a' where not measured."""
    prefill, step = row.get("prefill_kernel_ms"), row.get("decode_step_kernel_ms")
    if prefill is None and step is None:
        return "n/a"
    ratio = (f" (×full {prefill / full['prefill_kernel_ms']:.3f})"
             if prefill is not None and full.get("prefill_kernel_ms") else "")
    cell = (f"{prefill:.2f}{ratio}" if prefill is not None else "n/a") + (f" / {step:.2f}" if step is not None
                                                                          else " / n/a")
    counts = row.get("prefill_gpu_kernels"), row.get("decode_step_gpu_kernels")
    if None not in counts:
        cell += f" ({counts[0]} / {counts[1]} kernels)"
    return cell


def output_stem(args, device):
    tag = f"_{args.tag}" if args.tag else ""
    return os.path.join(args.output_dir,
                        f"efficiency_{args.preset}_{'gpu' if device.type == 'cuda' else 'cpu'}{tag}")


def write_outputs(results, args, device, pending=(), stem=None, kernels_pending=()):
    """The markdown / JSON / plot of `results`; `pending`: batch sizes not measured yet, `kernels_pending`: those
    whose GPU kernel times are not profiled yet (both said in both files).
    Returns the stem written, which the run's next writes pass as `stem` (they replace its own earlier table). The
    first write (stem None) replaces a table another run wrote under the same name since start-up only with
    --overwrite; without, this run's goes to `NAME-2` (`write_results`)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    first, stem = stem is None, stem or output_stem(args, device)
    command = command_line(__file__)
    lines = [f"# Efficiency, preset `{args.preset}` on {device_name}", "",
             f"Command: `{command}`. Median of {args.repeats} runs after warm-up, all methods interleaved (every "
             f"other round in reverse order); random weights in {results[0]['dtype']}; {args.new_tokens} new tokens. "
             "Ratios are against `full` at the same batch size; the prefill's ×full and ×ideal, and the selection's "
             "share of the prefill, are medians of per-run ratios (each run over the other method's run in the same "
             "round, or over its own prefill), which a drift of the machine's speed does not bias. *select*: time "
             "inside token selection; *net of reused*: minus the part of it the pruning layers then read instead of "
             "computing (their `input_layernorm` and `k_proj` on the kept rows, timed inside selection and scaled by "
             "kept / all rows). *decode ms/tok*: timed inside one `generate`, from the first new token's logits to "
             "the last's, over the steps between them (medians of the runs). *aten calls*: the ops torch dispatches "
             "in one prefill (views included; in token selection), counted once outside the timing: where a layer's "
             "host-side dispatch outlasts its kernels (a GPU at batch 1), time follows them rather than FLOPs. *step "
             "calls (syncs)*: the same for one decode step as `generate` runs it, and the host syncs among them "
             "(each stops the host from queueing ahead of "
             "a GPU).", ""]
    kernel_column = any(r.get("prefill_kernel_ms") is not None for r in results)
    if kernel_column:
        lines[-2] += (" *GPU kernels ms*: the device's busy time in one prefill / one decode step (the profiler's "
                      "kernel and copy times, summed; medians of three profiles, taken after every timing): what "
                      "the work costs without the host's dispatch; in brackets the GPU events each ran.")
    if pending:
        lines += [f"**Incomplete**: batch sizes {', '.join(map(str, pending))} not measured yet (the run was still "
                  "going, or stopped, when this was written).", ""]
    if kernels_pending:
        lines += [f"**GPU kernel times pending** for batch sizes {', '.join(map(str, kernels_pending))}: profiled "
                  "once every batch size is timed (a profiler session can slow the runs timed after it); not yet "
                  "when this was written.", ""]
    for bsz in sorted({r["batch_size"] for r in results}):
        rows = [r for r in results if r["batch_size"] == bsz]
        full = next(r for r in rows if r["method"] == "full")
        lines += [f"## Batch size {bsz}", "",
                  f"| method | visual tok/layer | prefill ms | ×full | decode ms/tok | ×full | {args.new_tokens}-tok e2e ms | "
                  "KV MiB (analytic) | peak MiB | select ms (% prefill) | net of reused ms (% prefill) | TFLOPs | "
                  "FLOPs ×full | aten calls (in selection) | step calls (syncs) |"
                  + (" GPU kernels ms (prefill / step) |" if kernel_column else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if kernel_column else "")]
        for r in rows:
            note = f" (×ideal {r['prefill_x_ideal']:.2f})" if r["prefill_x_ideal"] is not None else ""
            peak = f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "n/a"
            share = f"{r['selection_ms']:.1f} ({r['selection_share']:.1%})" if r["selection_ms"] else "–"
            net = f"{r['selection_net_ms']:.1f} ({r['selection_net_share']:.1%})" if r["selection_ms"] else "–"
            if r["decode_ms_per_token"] is None or not full["decode_ms_per_token"]:
                decode = "– | –"
            else:
                decode = (f"{r['decode_ms_per_token']:.2f} | "
                          f"{r['decode_ms_per_token'] / full['decode_ms_per_token']:.3f}")
            e2e = f"{r['end_to_end_ms']:.0f}" if r["end_to_end_ms"] is not None else "–"
            lines.append(
                f"| {r['method']} | {r['avg_visual_tokens_per_layer']:.1f} | {r['prefill_ms']:.1f}{note} | "
                f"{r['prefill_x_full']:.3f} | {decode} | {e2e} | "
                f"{r['kv_cache_mib']:.2f} ({r['kv_cache_analytic_mib']:.2f}) | {peak} | {share} | {net} | {r['analytic_tflops']:.4f} | {r['flops_ratio']:.3f} | "
                f"{r['aten_calls']} ({r['aten_calls_selection']}) | "
                f"{r['decode_step_aten_calls']} ({r['decode_step_syncs']}) |"
                + (f" {kernel_cell(r, full)} |" if kernel_column else ""))
        lines.append("")
    stem = write_results(stem, markdown="\n".join(lines), overwrite=args.overwrite or not first,
                         data={"command": command, "device": device_name, "results": results,
                               "pending_batch_sizes": list(pending),
                               "pending_kernel_batch_sizes": list(kernels_pending)})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = sorted({r["batch_size"] for r in results})
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
        markers = {"full": "s", "rcp": "o", "vispruner": "^", "random": "v", "fastv": "D"}
        for ax, bsz in zip(axes[0], sizes):
            rows = [r for r in results if r["batch_size"] == bsz]
            full = next(r for r in rows if r["method"] == "full")
            ideal = sorted((r for r in rows if r["method"].startswith("ideal")),
                           key=lambda r: r["avg_visual_tokens_per_layer"])
            if ideal:  # no selection cost: what the token counts alone buy
                ax.plot([r["avg_visual_tokens_per_layer"] for r in ideal] + [full["avg_visual_tokens_per_layer"]],
                        [1 / r["prefill_x_full"] for r in ideal] + [1.0], "k--", lw=1,
                        label="ideal (kept sets given)")
            for family, marker in markers.items():
                pts = [r for r in rows if r["method"].split("-")[0] == family]
                if not pts:
                    continue
                ax.scatter([r["avg_visual_tokens_per_layer"] for r in pts],
                           [1 / r["prefill_x_full"] for r in pts], marker=marker, s=45, label=family)
                for r in pts:
                    ax.annotate(r["method"], (r["avg_visual_tokens_per_layer"], 1 / r["prefill_x_full"]),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel("visual tokens per decoder layer (mean over all layers)")
            ax.set_ylabel("prefill speed-up over full (x)")
            ax.set_title(f"{args.preset}, batch {bsz}, {device_name}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, stem + ".png", dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    print(f"\nwrote {stem}.md / .json / .png")
    return stem


if __name__ == "__main__":
    main()
