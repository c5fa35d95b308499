"""Smoke tests of the benchmark scripts (never pass/fail on timings)."""

import json
import os
import pathlib
import re
import shlex
import statistics
import sys

import pytest

from conftest import ROOT, load_benchmark


def table_row(method, **fields):
    """One efficiency result row as `main` writes it (a GPU-shaped full-token row), for rendering tests; `fields`
    override or add to it."""
    return {"method": method, "batch_size": 1, "budget": 576, "dtype": "bfloat16",
            "avg_visual_tokens_per_layer": 576.0, "prefill_ms": 30.0, "prefill_x_full": 1.0, "prefill_x_ideal": None,
            "decode_ms_per_token": 20.0, "end_to_end_ms": 640.0, "kv_cache_mib": 320.0, "kv_cache_analytic_mib": 320.0,
            "peak_memory_mib": None, "selection_ms": 0.0, "analytic_tflops": 8.9, "flops_ratio": 1.0,
            "aten_calls": 3543, "aten_calls_selection": 0, "decode_step_aten_calls": 2459, "decode_step_syncs": 0,
            **fields}


def table_args(tmp_path, new_tokens):
    """The command-line arguments `write_outputs` reads, writing into `tmp_path` (tiny preset, CPU names)."""
    import argparse

    return argparse.Namespace(preset="tiny", repeats=1, new_tokens=new_tokens, threads=1, overwrite=True, tag="",
                              output_dir=str(tmp_path))


def test_efficiency_benchmark_smoke(tmp_path, monkeypatch):
    efficiency = load_benchmark("efficiency")

    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "3",
                                      "--new_tokens", "3", "--budgets", "64", "--output_dir", str(tmp_path)])
    efficiency.main()
    data = json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"full", "rcp-64", "ideal-64", "vispruner-64", "random-64", "fastv-64"}
    rows = {r["method"]: r for r in data["results"]}
    # Same per-layer token counts and KV cache for RCP and its ideal; pruning shrinks the cache.
    assert rows["rcp-64"]["avg_visual_tokens_per_layer"] == rows["ideal-64"]["avg_visual_tokens_per_layer"]
    assert rows["rcp-64"]["kv_cache_mib"] == pytest.approx(rows["ideal-64"]["kv_cache_mib"])
    assert rows["vispruner-64"]["kv_cache_mib"] < rows["full"]["kv_cache_mib"]
    assert rows["rcp-64"]["flops_ratio"] < 1 and rows["full"]["flops_ratio"] == 1
    assert (tmp_path / "efficiency_tiny_cpu.md").read_text().startswith("# Efficiency, preset `tiny`")
    assert (tmp_path / "efficiency_tiny_cpu.png").stat().st_size > 1000
    # Dispatch side by side: the ideal pays compaction but no selection, RCP both; the unpruned model neither.
    assert rows["full"]["aten_calls"] < rows["ideal-64"]["aten_calls"] < rows["rcp-64"]["aten_calls"]
    assert rows["full"]["aten_calls_selection"] == rows["ideal-64"]["aten_calls_selection"] == 0
    assert rows["rcp-64"]["aten_calls_selection"] > 3 * 50 and rows["vispruner-64"]["aten_calls_selection"] > 0
    assert "| aten calls (in selection) | step calls (syncs) |\n" in (tmp_path / "efficiency_tiny_cpu.md").read_text()
    # GPU kernel times exist only on CUDA: None in every CPU row, and no column for them
    assert {(row["prefill_kernel_ms"], row["decode_step_kernel_ms"], row["prefill_gpu_kernels"],
             row["decode_step_gpu_kernels"]) for row in rows.values()} == {(None, None, None, None)}
    assert "GPU kernels" not in (tmp_path / "efficiency_tiny_cpu.md").read_text()
    # A decode step: the stock model's syncs none for its mask (generate's prompt is unpadded), nor may a pruned one;
    # RCP's repair adapters dispatch more than the unpruned step.
    assert {row["decode_step_syncs"] for row in rows.values()} == {0}
    assert rows["rcp-64"]["decode_step_aten_calls"] > rows["full"]["decode_step_aten_calls"] > 100
    # Every method at RCP's mean visual tokens per layer (issue 19), and the measured KV cache is the analytic one.
    for name in ("vispruner-64", "random-64", "fastv-64"):
        assert abs(rows[name]["avg_visual_tokens_per_layer"] - rows["rcp-64"]["avg_visual_tokens_per_layer"]) <= 0.5
    # ... the mean over all 4 decoder layers of the schedule's per-layer counts (the table's *visual tok/layer*)
    schedules = efficiency.method_configs("tiny", [64])
    assert rows["full"]["avg_visual_tokens_per_layer"] == efficiency.num_visual_tokens("tiny") == 144
    assert rows["rcp-64"]["avg_visual_tokens_per_layer"] == sum(schedules["rcp-64"][1]) / 4
    for row in rows.values():
        assert row["kv_cache_mib"] == pytest.approx(row["kv_cache_analytic_mib"], rel=1e-12), row["method"]
        # the prefill column: the median of the method's timed prefills (not its end-to-end runs, not their mean)
        assert row["prefill_ms"] == pytest.approx(statistics.median(row["prefill_ms_runs"]), rel=1e-12), row["method"]
    # Ratios are medians of the per-round ratios (each run over the reference's run in the same round).
    runs = {name: row["prefill_ms_runs"] for name, row in rows.items()}
    assert rows["vispruner-64"]["prefill_x_ideal"] is None
    # net of reused: less than the selection's whole share wherever the pruning layer reuses the prior's work
    assert 0 < rows["rcp-64"]["selection_net_share"] < rows["rcp-64"]["selection_share"]
    assert 0 < rows["rcp-64"]["selection_reused_ms"] < rows["rcp-64"]["selection_ms"]
    assert 0 < rows["rcp-64"]["selection_net_ms"] < rows["rcp-64"]["selection_ms"]
    assert rows["rcp-64"]["selection_share"] == pytest.approx(
        statistics.median(a / b for a, b in zip(rows["rcp-64"]["selection_ms_runs"], runs["rcp-64"])))
    assert rows["rcp-64"]["prefill_x_ideal"] == pytest.approx(
        statistics.median(a / b for a, b in zip(runs["rcp-64"], runs["ideal-64"])))
    assert rows["fastv-64"]["prefill_x_full"] == pytest.approx(
        statistics.median(a / b for a, b in zip(runs["fastv-64"], runs["full"])))
    # Decode time per token is timed inside each generate: one clock reading per new token (the first after the
    # prefill), so 2 steps of 3 new tokens, positive and inside that run's end-to-end time by construction (not a
    # timing threshold; it was e2e minus a separately timed prefill, which could go negative).
    for name, row in rows.items():
        assert row["decode_clock_readings"] == [3, 3, 3], name
        steps = row["decode_ms_per_token_runs"]
        assert len(steps) == 3 and min(steps) > 0, name
        assert row["decode_ms_per_token"] == pytest.approx(statistics.median(steps))
        assert row["decode_ms_per_token"] * 2 < row["end_to_end_ms"], name
        # the end-to-end column: the median of the method's own timed generate runs, each holding its decode steps
        runs = row["end_to_end_ms_runs"]
        assert len(runs) == 3 and row["end_to_end_ms"] == pytest.approx(statistics.median(runs), rel=1e-12), name
        assert all(step * 2 < run for step, run in zip(steps, runs)), name
    # the table's ratios: each method over `full` (prefill: the median per-round ratio; decode: ms/tok over full's)
    table = (tmp_path / "efficiency_tiny_cpu.md").read_text().splitlines()
    cells = next(line for line in table if line.startswith("| rcp-64 |")).split(" | ")
    assert cells[3] == f"{rows['rcp-64']['prefill_x_full']:.3f}"
    assert cells[5] == f"{rows['rcp-64']['decode_ms_per_token'] / rows['full']['decode_ms_per_token']:.3f}"


def test_efficiency_interleaves_the_methods_every_other_round_reversed(tmp_path, monkeypatch):
    """Each round runs every method once, the odd rounds in reverse order (round 0 the warm-up), so no method always
    runs right after the same one: the side-by-side ratios rest on it, and a run order that drifted (one method's
    rounds all first, or the same order every round) would still give every column a value."""
    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    efficiency = load_benchmark("efficiency")
    order, forward = [], RcpLlavaForConditionalGeneration.forward

    def recording(self, *args, **kwargs):  # the timed prefills: use_cache, one logit, no cache given
        if kwargs.get("use_cache") and kwargs.get("logits_to_keep") == 1 and kwargs.get("past_key_values") is None:
            order.append((self.config.pruning_method, "visual_keep_masks" in kwargs))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RcpLlavaForConditionalGeneration, "forward", recording)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "3",
                                      "--new_tokens", "0", "--budgets", "64", "--output_dir", str(tmp_path)])
    with torch.no_grad():
        efficiency.main()
    names = [r["method"] for r in json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())["results"]]
    assert names == ["full", "rcp-64", "ideal-64", "vispruner-64", "random-64", "fastv-64"]
    label = {"full": ("none", False), "rcp-64": ("rcp", False), "ideal-64": ("rcp", True),
             "vispruner-64": ("vispruner", False), "random-64": ("random", False), "fastv-64": ("fastv", False)}
    forwards, backwards = [label[n] for n in names], [label[n] for n in reversed(names)]
    # 4 rounds (the warm-up and 3 timed), then one counted prefill per method (`aten_calls`, in the table's order)
    assert order == forwards + backwards + forwards + backwards + forwards


def test_efficiency_profiles_kernel_times_only_after_every_timing(tmp_path, monkeypatch, capsys):
    """A profiler session can leave CUPTI hooked into later kernel launches (pytorch/pytorch#144455), so the GPU
    kernel times are profiled once every batch size is timed: no timed prefill follows a profile. Each row's profile
    gets its own model and inputs (the ideal's with RCP's kept sets, at its batch size), and the final table carries
    the values (a CUDA run's `kernel_times`, stood in for on the CPU)."""
    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    efficiency = load_benchmark("efficiency")
    events, forward = [], RcpLlavaForConditionalGeneration.forward

    def recording(self, *args, **kwargs):
        if kwargs.get("use_cache") and kwargs.get("logits_to_keep") == 1 and kwargs.get("past_key_values") is None:
            events.append("forward")
        return forward(self, *args, **kwargs)

    def kernel_times(model, inputs):
        masks = inputs.get("visual_keep_masks")
        events.append(("profile", model.config.pruning_method, inputs["input_ids"].shape[0],
                       None if masks is None else masks.shape[0], inputs["use_cache"], inputs["logits_to_keep"]))
        if model.config.pruning_method == "fastv" and inputs["input_ids"].shape[0] == 2:
            raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")  # a profile that fails costs its own cells only
        return {"prefill": 10.0 + len(events), "step": 0.5, "prefill_kernels": 900 + len(events), "step_kernels": 40}

    monkeypatch.setattr(RcpLlavaForConditionalGeneration, "forward", recording)
    monkeypatch.setattr(efficiency, "kernel_times", kernel_times)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1,2", "--repeats", "1",
                                      "--new_tokens", "0", "--budgets", "64", "--output_dir", str(tmp_path)])
    efficiency.main()  # no grad mode of the test's own: main's profiles are under no_grad by themselves
    assert "GPU kernel times of fastv-64 at batch 2 not measured: RuntimeError('CUPTI_ERROR_NOT_INITIALIZED')" in (
        capsys.readouterr().err)
    profiles = [e for e in events if e != "forward"]
    assert events[-len(profiles):] == profiles and len(profiles) == 12  # all after the last timed forward
    methods = {"full": "none", "rcp-64": "rcp", "ideal-64": "rcp", "vispruner-64": "vispruner",
               "random-64": "random", "fastv-64": "fastv"}
    # the ideal's profile replays RCP's kept sets of its own batch size
    assert profiles == [("profile", kind, bsz, bsz if name == "ideal-64" else None, True, 1)
                        for bsz in (1, 2) for name, kind in methods.items()]
    data = json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())
    rows, failed = data["results"], (2, "fastv-64")
    assert data["pending_kernel_batch_sizes"] == []
    assert [(r["batch_size"], r["method"], r["decode_step_kernel_ms"]) for r in rows] == [
        (bsz, name, None if (bsz, name) == failed else 0.5) for bsz in (1, 2) for name in methods]
    first = len(events) - len(profiles)  # the value each profile returned: 10 + the events recorded by then
    assert [r["prefill_kernel_ms"] for r in rows] == [
        None if (r["batch_size"], r["method"]) == failed else 10.0 + first + i for i, r in enumerate(rows, 1)]
    assert [(r["prefill_gpu_kernels"], r["decode_step_gpu_kernels"]) for r in rows] == [
        (None, None) if (r["batch_size"], r["method"]) == failed else (900 + first + i, 40)
        for i, r in enumerate(rows, 1)]
    table = (tmp_path / "efficiency_tiny_cpu.md").read_text()
    assert f"| {10.0 + first + 1:.2f} (×full 1.000) / 0.50 ({900 + first + 1} / 40 kernels) |" in table
    assert "Incomplete" not in table
    fastv = [line for line in table.splitlines() if line.startswith("| fastv-64 |")]  # batch 1, then batch 2
    assert len(fastv) == 2 and fastv[0].endswith(" / 40 kernels) |") and fastv[1].endswith("| n/a |")
    assert "GPU kernel times pending" not in table


def test_efficiency_tables_say_the_gpu_kernel_times_are_pending(tmp_path, monkeypatch):
    """Before the profiles (written after each batch size's timing, on CUDA) both files say which batch sizes'
    kernel times are still to come."""
    import torch

    efficiency = load_benchmark("efficiency")
    row = table_row("full", decode_ms_per_token=None, end_to_end_ms=None, prefill_kernel_ms=None,
                    decode_step_kernel_ms=None)
    monkeypatch.setattr(sys, "argv", ["efficiency.py"])
    efficiency.write_outputs([row], table_args(tmp_path, new_tokens=0), torch.device("cpu"), pending=[8],
                             kernels_pending=[1, 8])
    table = (tmp_path / "efficiency_tiny_cpu.md").read_text()
    assert "**GPU kernel times pending** for batch sizes 1, 8: profiled once every batch size is timed" in table
    data = json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())
    assert data["pending_batch_sizes"] == [8] and data["pending_kernel_batch_sizes"] == [1, 8]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: the profiler's real GPU events")
def test_device_kernel_ms_reads_real_gpu_events_within_the_wall_clock():
    """On a GPU: a matmul's profiled kernel time is positive and no longer than the CUDA events around it (one
    stream's busy time cannot exceed the wall clock); a profile with no GPU work reads None, not 0."""
    import torch

    efficiency = load_benchmark("efficiency")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start.record()
        for _ in range(4):
            a @ a
        end.record()
        torch.cuda.synchronize()
    busy = efficiency.device_kernel_ms(prof.events())
    assert 0 < busy <= start.elapsed_time(end) * 1.02
    assert len(efficiency.gpu_events(prof.events())) >= 4  # one GEMM kernel per product at least
    with torch.profiler.profile(activities=activities) as prof:
        torch.ones(3).sum()
    assert efficiency.device_kernel_ms(prof.events()) is None


def test_step_clock_passes_scores_through_and_times_the_steps_between_readings():
    import torch

    efficiency = load_benchmark("efficiency")
    clock = efficiency.StepClock(torch.device("cpu"))
    scores = torch.randn(2, 5)
    assert clock(torch.zeros(2, 3, dtype=torch.long), scores) is scores and len(clock.times) == 1
    assert clock.per_token() is None  # one reading: the prefill's token, no step yet
    clock.times = [10.0, 10.5, 11.0, 12.5]
    assert clock.per_token() == pytest.approx(2.5 / 3)


def test_aten_counter_counts_calls_and_host_syncs():
    import torch

    efficiency = load_benchmark("efficiency")
    x = torch.arange(6.0)
    with efficiency.AtenCounter() as counter:
        y = x * 2  # one call, no sync
        y.sum().item(), y[y > 2], y.tolist()  # sum + item; gt + boolean index (nonzero inside); tolist
    assert counter.syncs == 3 and counter.total >= 5
    x.tolist(), x.sum().item()
    assert counter.syncs == 3 and torch.Tensor.tolist(x) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # put back on leaving
    with efficiency.AtenCounter("meta") as on_meta:  # a model on another device: host tensors' tolist is no sync
        x.tolist(), x.to("cpu"), x.clone().copy_(x)
    assert on_meta.syncs == 0 and on_meta.total == 2  # clone, copy_ (host to host); `to` a no-op


def test_sync_kind_counts_a_copy_to_the_host_only_from_another_device():
    """`.to("cpu")` of a device tensor waits for the device; a host-to-host `_to_copy` (a dtype change on the CPU) does
    not, and counting it inflated the *syncs* of CPU runs."""
    import torch

    efficiency = load_benchmark("efficiency")
    to_copy, cpu = torch.ops.aten._to_copy.default, torch.device("cpu")
    assert efficiency.sync_kind(to_copy, (torch.empty(2, device="meta"),), {"device": cpu}) == "device_to_host"
    assert efficiency.sync_kind(to_copy, (torch.zeros(2),), {"device": cpu, "dtype": torch.float64}) is None
    assert efficiency.sync_kind(to_copy, (torch.empty(2, device="meta"),), {"dtype": torch.float64}) is None

def test_device_kernel_ms_sums_the_gpu_events_self_time_only():
    """The GPU's busy time: self device time of the events that ran on the GPU (kernels, copies), as the profiler's
    table totals it -- not the CPU ops that launched them (their device time is the same kernels again), nor user
    annotations spanning them."""
    from types import SimpleNamespace

    import torch

    efficiency = load_benchmark("efficiency")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, self_device_time_total=1500, is_user_annotation=False),  # a kernel
              SimpleNamespace(device_type=cuda, self_device_time_total=250, is_user_annotation=False),   # a memcpy
              SimpleNamespace(device_type=cpu, self_device_time_total=1750, is_user_annotation=False),   # aten::mm
              SimpleNamespace(device_type=cuda, self_device_time_total=9000, is_user_annotation=True)]   # a range
    assert efficiency.device_kernel_ms(events) == 1.75
    # no GPU event at all (a profiler that recorded no kernels): unknown, not free
    assert efficiency.device_kernel_ms([]) is None and efficiency.device_kernel_ms(events[2:]) is None


def test_kernel_times_take_medians_of_pairs_each_step_on_a_fresh_cache():
    """Each of `repeats` profiled pairs runs a prefill, then one decode step on that prefill's own cache (a step
    appends to the cache it gets: reusing one would time steps on a growing cache); the times are the medians, the
    GPU event counts the lower medians, and a profile that saw no GPU event makes its median None."""
    import torch

    from conftest import make_batch, make_model

    efficiency = load_benchmark("efficiency")
    model = make_model()
    batch = make_batch([(2, 5, True)])
    lengths, scripted = [], iter([(5.0, 40), (1.0, 9), (7.0, 44), (3.0, 11), (12.0, 42), (8.0, 10)])

    def measure(run):
        out = run()
        lengths.append((out.logits.shape[1], out.past_key_values.get_seq_length()))
        return (*next(scripted), out)

    times = efficiency.kernel_times(model, {**batch, "use_cache": True, "logits_to_keep": 1}, measure=measure)
    # prefill, step, prefill, step, ...: each step one token on its own prefill's cache (never a grown one's)
    seen = lengths[0][1]
    assert lengths == [(1, seen), (1, seen + 1)] * 3
    assert times == {"prefill": 7.0, "step": 3.0, "prefill_kernels": 42, "step_kernels": 10}  # medians, not means
    scripted = iter([(5.0, 40), (None, 0), (7.0, 44), (3.0, 11), (12.0, 42), (8.0, 10)])
    times = efficiency.kernel_times(model, {**batch, "use_cache": True, "logits_to_keep": 1}, measure=measure)
    assert times["step"] is None and times["prefill"] == 7.0
    assert efficiency.kernel_times(model, batch) is None  # the real profiler off CUDA: nothing measured


def test_kernel_times_are_none_off_cuda_and_the_column_appears_only_with_them(tmp_path, monkeypatch):
    """On the CPU `kernel_times` measures nothing (None); a table whose rows hold GPU kernel times gets a column
    'prefill (xfull) / step' for them, with n/a where a row lacks them."""
    import torch

    from conftest import make_model

    efficiency = load_benchmark("efficiency")
    model = make_model()
    assert efficiency.kernel_times(model, {"input_ids": torch.tensor([[1, 2]])}) is None
    results = [table_row("full", prefill_kernel_ms=16.0, decode_step_kernel_ms=3.5),
               table_row("random-64", prefill_kernel_ms=4.0, decode_step_kernel_ms=3.25),
               table_row("fastv-64", prefill_kernel_ms=None, decode_step_kernel_ms=None)]
    monkeypatch.setattr(sys, "argv", ["efficiency.py"])
    efficiency.write_outputs(results, table_args(tmp_path, new_tokens=32), torch.device("cpu"))
    table = (tmp_path / "efficiency_tiny_cpu.md").read_text()
    assert "| step calls (syncs) | GPU kernels ms (prefill / step) |\n|---|" in table
    assert "*GPU kernels ms*: the device's busy time" in table
    lines = table.splitlines()
    assert next(line for line in lines if line.startswith("| full |")).endswith(
        "| 2459 (0) | 16.00 (×full 1.000) / 3.50 |")
    assert next(line for line in lines if line.startswith("| random-64 |")).endswith(
        "| 2459 (0) | 4.00 (×full 0.250) / 3.25 |")
    assert next(line for line in lines if line.startswith("| fastv-64 |")).endswith("| 2459 (0) | n/a |")
    # one part measured: the other reads n/a; no ratio against a full row without a prefill kernel time
    assert efficiency.kernel_cell({"prefill_kernel_ms": None, "decode_step_kernel_ms": 3.0}, results[0]) == \
        "n/a / 3.00"
    assert efficiency.kernel_cell({"prefill_kernel_ms": 4.0, "decode_step_kernel_ms": None}, results[2]) == \
        "4.00 / n/a"
    # with the GPU events counted (a CUDA run's rows), in brackets
    counted = {"prefill_kernel_ms": 8.0, "decode_step_kernel_ms": 3.0, "prefill_gpu_kernels": 4100,
               "decode_step_gpu_kernels": 2300}
    assert efficiency.kernel_cell(counted, results[0]) == "8.00 (×full 0.500) / 3.00 (4100 / 2300 kernels)"
    header = next(line for line in lines if line.startswith("| method |"))
    assert header.count("|") == lines[lines.index(header) + 1].count("|")


def test_aten_calls_split_a_prefill_into_layers_pruning_and_the_rest():
    """selection_profile's *outside* column: the prefill's calls less the decoder layers' and the pruning points'
    (selection and compaction), so that the three parts add up to the total."""
    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    efficiency = load_benchmark("efficiency")
    overrides = efficiency.method_configs("tiny", [64], {"full", "rcp"})["rcp-64"][0]
    torch.manual_seed(0)
    model = RcpLlavaForConditionalGeneration(efficiency.build_config("tiny", **overrides)).eval()
    calls = efficiency.aten_calls(model, {**efficiency.make_inputs("tiny", 1), "use_cache": True, "logits_to_keep": 1})
    pruning = sum(p["selection"] + p["prune"] for p in calls["points"])
    assert len(calls["points"]) == 3 and pruning > 0 and calls["outside"] > 0
    assert calls["layers"] + pruning + calls["outside"] == calls["total"]
    assert calls["per_layer"] == calls["layers"] / 4

def test_efficiency_writes_after_every_batch_size(tmp_path, monkeypatch):
    """A run stopped at a time limit (a lent device's) keeps the batch sizes it measured: the table is written after
    each one, marked incomplete until the last."""
    efficiency = load_benchmark("efficiency")
    written, original = [], efficiency.write_outputs

    def record(results, args, device, pending=(), stem=None, kernels_pending=()):
        written_stem = original(results, args, device, pending, stem=stem, kernels_pending=kernels_pending)
        stem = tmp_path / "efficiency_tiny_cpu"
        data = json.loads(stem.with_suffix(".json").read_text())
        written.append(({r["batch_size"] for r in data["results"]}, data["pending_batch_sizes"],
                        "**Incomplete**: batch sizes 2 not measured yet" in stem.with_suffix(".md").read_text()))
        assert data["pending_kernel_batch_sizes"] == []  # on the CPU no kernel times are measured, none pending
        return written_stem

    monkeypatch.setattr(efficiency, "write_outputs", record)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1,2", "--repeats", "1",
                                      "--new_tokens", "0", "--budgets", "64", "--methods", "rcp,ideal",
                                      "--output_dir", str(tmp_path)])
    efficiency.main()
    assert written == [({1}, [2], True), ({1, 2}, [], False)]
    # at batch 2 too, the measured KV cache is the analytic one of that batch size
    rows = json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())["results"]
    assert {r["batch_size"] for r in rows} == {1, 2}
    for row in rows:
        assert row["kv_cache_mib"] == pytest.approx(row["kv_cache_analytic_mib"], rel=1e-12), row


def test_efficiency_times_the_ideal_with_rcps_kept_sets(tmp_path, monkeypatch):
    """The ideal's timed prefills, not only its call count, are given RCP's kept sets: timed without them it would run
    RCP's own selection, and *×ideal* would compare RCP with itself."""
    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    efficiency = load_benchmark("efficiency")
    given, forward = [], RcpLlavaForConditionalGeneration.forward

    def record(self, *args, **kwargs):
        given.append(kwargs.get("visual_keep_masks") is not None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RcpLlavaForConditionalGeneration, "forward", record)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "2",
                                      "--new_tokens", "0", "--budgets", "64", "--methods", "ideal",
                                      "--output_dir", str(tmp_path)])
    efficiency.main()
    assert sum(given) == 3 + 1  # the warm-up and 2 timed rounds, then the call count

def test_efficiency_keeps_a_table_another_run_wrote_meanwhile_and_rewrites_its_own(tmp_path, monkeypatch):
    """Its writes replaced whatever was at the name (overwrite=True): a table another run wrote there after the
    start-up check was lost. Now the first write goes beside it (NAME-2), and the later ones replace that one."""
    efficiency = load_benchmark("efficiency")
    original, stems = efficiency.write_results, []

    def write_results(stem, *args, **kwargs):
        if not stems:  # the other run finishes just before this one's first write
            (tmp_path / "efficiency_tiny_cpu.md").write_text("the other run\n")
        stems.append(original(stem, *args, **kwargs))
        return stems[-1]

    monkeypatch.setattr(efficiency, "write_results", write_results)
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1,2", "--repeats", "1",
                                      "--new_tokens", "0", "--budgets", "64", "--methods", "rcp",
                                      "--output_dir", str(tmp_path)])
    efficiency.main()
    mine = str(tmp_path / "efficiency_tiny_cpu-2")
    assert stems == [mine, mine]
    assert (tmp_path / "efficiency_tiny_cpu.md").read_text() == "the other run\n"
    assert json.loads((tmp_path / "efficiency_tiny_cpu-2.json").read_text())["pending_batch_sizes"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficiency_tiny_cpu-2.json", "efficiency_tiny_cpu-2.md",
                                                          "efficiency_tiny_cpu-2.png", "efficiency_tiny_cpu.md"]


def test_efficiency_counts_the_pruning_layers_reused_work_by_kept_rows(monkeypatch):
    """The 'net of reused' column: the pruning layer's `input_layernorm` / `k_proj` calls made during selection count
    as reused in the proportion of the rows the layer then runs on; no other call is timed. A clock that advances 1
    per reading makes every timed call last exactly 1 s, so the expected values follow from the keep counts alone."""
    import itertools
    import time

    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    efficiency = load_benchmark("efficiency")
    overrides = efficiency.method_configs("tiny", [64], {"full", "rcp"})["rcp-64"][0]
    model = RcpLlavaForConditionalGeneration(efficiency.build_config("tiny", **overrides)).eval()
    timer = efficiency.SelectionTimer(torch.device("cpu"))
    original = timer.wrap(model)
    n, text = model.config.num_visual_tokens, efficiency.PRESETS["tiny"]["text_tokens"]
    ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, n), efficiency.VOCAB - 1),
                     torch.randint(3, 1000, (1, text - 1))], dim=1)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 48, 48))
    clock = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    with torch.no_grad():
        model(**inputs)
    monkeypatch.undo()
    expected, alive = [], n
    for kept in model.config.point_keep_counts:
        rows, after = text + alive, text + kept
        expected += [after / rows] * 2  # the layer's norm and its key projection, each 1 s
        alive = kept
    # Exactly two timed calls per pruning point: the other layers' norms and projections (and the pruning layers'
    # own, on their kept rows) are not selection.
    assert [share for _, share in timer.reused] == pytest.approx(expected, rel=1e-12)
    assert all(end - start == 1.0 for (start, end), _ in timer.reused)
    assert len(timer.spans) == len(model.config.pruning_layers)
    selection, reused = timer.totals()
    assert reused == pytest.approx(sum(expected)) and selection > reused
    # no hook outlives its selection: a forward of the unwrapped model times nothing
    timer.reset()
    model.model._select_tokens = original
    with torch.no_grad():
        model(**inputs)
    assert timer.spans == [] and timer.reused == []
    layers = model.model.language_model.layers
    assert all(not layer._forward_pre_hooks and not layer.input_layernorm._forward_hooks
               and not layer.self_attn.k_proj._forward_hooks for layer in layers)


def test_efficiency_schedules_use_the_authors_placements():
    """The paper's schedules on 32 layers: pruners before 0-based layers 1 / 13 / 25 at 64 tokens, 4 / 14 / 24 at
    128 and 192, adapters after 22 / 29, and counts whose mean over all 32 layers is the budget."""
    efficiency = load_benchmark("efficiency")
    methods = efficiency.method_configs("llava-1.5-7b", [192, 128, 64])
    for budget, layers in ((192, [4, 14, 24]), (128, [4, 14, 24]), (64, [1, 13, 25])):
        overrides, per_layer, _, _ = methods[f"rcp-{budget}"]
        assert overrides["pruning_layers"] == layers and overrides["repair_layers"] == [22, 29]
        assert sum(per_layer) / 32 == pytest.approx(budget, abs=0.5)
        assert methods[f"vispruner-{budget}"][0]["pre_llm_keep_count"] == budget
        fastv = methods[f"fastv-{budget}"]
        assert fastv[0]["pruning_layers"] == [2] and sum(fastv[1]) / 32 == pytest.approx(budget, abs=0.5)
    # 8 layers cannot reach 64 of 576 (layer 0 alone averages 72): the 32-layer counts, baselines matched to them
    mid = efficiency.method_configs("mid", [64])
    mean = sum(mid["rcp-64"][1]) / 8
    assert mid["rcp-64"][0]["pruning_keep_counts"] == methods["rcp-64"][0]["pruning_keep_counts"]
    assert mean > 72 and mid["vispruner-64"][0]["pre_llm_keep_count"] == round(mean)


def test_efficiency_methods_keep_only_the_families_asked_for():
    """`--methods` names the families timed (`full` always): the others are neither built nor in the table."""
    efficiency = load_benchmark("efficiency")
    assert list(efficiency.method_configs("tiny", [64], {"full", "rcp"})) == ["full", "rcp-64"]
    assert list(efficiency.method_configs("tiny", [64, 192], {"full", "vispruner", "fastv"})) == [
        "full", "vispruner-64", "fastv-64", "vispruner-192", "fastv-192"]
    assert len(efficiency.method_configs("tiny", [64])) == 6


def test_efficiency_ideal_brings_the_rcp_it_replays(capsys, monkeypatch):
    """`--methods ideal` times RCP too: the ideal is given RCP's kept sets, which only RCP's model computes."""
    efficiency = load_benchmark("efficiency")
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--budgets", "64", "--methods", "ideal",
                                      "--device", "cpu", "--dry_run"])
    efficiency.main()
    out = capsys.readouterr().out
    assert "dry run: 3 methods of preset tiny built on the meta device: full, rcp-64, ideal-64" in out

def _fake_wheel(folder, name, version, source, requires=()):
    """A pure-Python wheel of package `name` whose `__init__.py` is `source` (what pip needs to install it)."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{name}/__init__.py": source,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{needs}",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def _gpu_check(*args, env=None):
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_gpu_check_runs_on_cpu(tmp_path):
    """`benchmarks/gpu_check.sh --cpu`: the GPU script's steps on the tiny shape, with a carried wheel installed
    into the scratch site (as on a lent device, which reaches no registry) and nothing else installed."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _fake_wheel(wheels, "rcp_carried_probe", "1.0", "VALUE = 1\n")
    result = _gpu_check("--cpu", str(tmp_path / "out"), env={"RCP_WHEELS": str(wheels), "RCP_SITE": str(site)})
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "efficiency_tiny_cpu.json").read_text())
    assert {r["method"] for r in data["results"]} == {"full", "rcp-64", "ideal-64", "vispruner-64", "random-64",
                                                      "fastv-64"}
    assert {r["batch_size"] for r in data["results"]} == {1, 2}
    assert f"installed the carried wheels into {site}: rcp_carried_probe-1.0-py3-none-any.whl" in result.stdout
    assert (site / "rcp_carried_probe" / "__init__.py").read_text() == "VALUE = 1\n"
    assert "gpu_check: transformers 5.23" in result.stdout and "gpu_check: done" in result.stdout
    assert "dry run: 16 methods of preset llava-1.5-7b built on the meta device" in result.stdout
    # the CUDA-only tests ran first, with the checkout and the carried wheels importable; here every one skips
    report = (tmp_path / "out" / "cuda_tests.txt").read_text()
    last = report.splitlines()[-1]
    functions = len(re.findall(r"^def test_", (pathlib.Path(ROOT) / "tests" / "test_cuda.py").read_text(), re.M))
    skipped = re.match(r"(\d+) skipped in ", last)
    assert skipped and int(skipped.group(1)) >= functions >= 7, report[-500:]  # each test at least once
    assert f"gpu_check: tests/test_cuda.py exit 0: {last} ({tmp_path / 'out'}/cuda_tests.txt)" in result.stdout


@pytest.mark.parametrize("preset", ["tiny", "mid", "mid-32", "llava-1.5-7b"])
def test_efficiency_dry_run_builds_every_method(preset, capsys, monkeypatch):
    """Every method of every preset builds (configs validate, plug-ins construct), the GPU preset included: its
    pruner was once 4096 // 9 = 455 wide with 4 heads, which the config refuses -- found only by reading."""
    efficiency = load_benchmark("efficiency")
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", preset, "--dry_run", "--output_dir", "/nonexistent"])
    efficiency.main()
    assert f"dry run: 16 methods of preset {preset} built on the meta device" in capsys.readouterr().out
    rcp = efficiency.method_configs(preset, [64])["rcp-64"][0]
    # the authors' plug-in widths (512) at LLaVA-1.5-7B's width; scaled on the small presets
    assert rcp["pruner_hidden_size"] == rcp["repair_bottleneck_size"] == {"tiny": 8, "mid": 56, "mid-32": 56,
                                                                          "llava-1.5-7b": 512}[preset]


def test_gpu_check_refuses_a_transformers_outside_setup_cfg(tmp_path):
    """The device image's transformers (5.17 when read) imports our modules but is outside the measured range: the
    check stops before timing anything and says how to carry the right one."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "transformers", "5.17.0", "__version__ = '5.17.0'\n")
    result = _gpu_check("--cpu", str(tmp_path / "out"), env={"RCP_WHEELS": str(wheels),
                                                             "RCP_SITE": str(tmp_path / "site")})
    assert result.returncode == 1
    assert "transformers is 5.17.0" in result.stderr and "needs transformers<5.24,>=5.23 (setup.cfg)" in result.stderr
    assert "bash benchmarks/gpu_check.sh --prepare" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []

    # A carried transformers that fails its own import (an older dependency in the image): the hint names the pip
    # command that fetches a wheel for the device.
    (wheels / "transformers-5.17.0-py3-none-any.whl").unlink()
    _fake_wheel(wheels, "transformers", "5.23.0", "raise ImportError('tokenizers>=0.23.1 is required')\n")
    result = _gpu_check("--cpu", str(tmp_path / "out"), env={"RCP_WHEELS": str(wheels),
                                                             "RCP_SITE": str(tmp_path / "site2")})
    assert result.returncode == 1 and "ImportError: tokenizers>=0.23.1 is required" in result.stderr
    assert "gpu_check: transformers does not import here (above); a missing or too old package can travel" in \
        result.stderr
    assert (f"pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform "
            f"manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d {wheels} "
            "'NAME==VERSION'") in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_gpu_check_prepare_downloads_the_setup_cfg_transformers(tmp_path):
    """`--prepare` asks pip for setup.cfg's transformers range (here from a local index of two fake versions), and
    refuses a wheel folder that would hold two versions of one package (the device's pip installs neither)."""
    index, dest = tmp_path / "index", tmp_path / "whl"
    index.mkdir()
    for version in ("5.17.0", "5.23.0", "5.24.0"):
        _fake_wheel(index, "transformers", version, f"__version__ = '{version}'\n",
                    requires=["tokenizers<0.24.0,>=0.23.1", "torch>=2.4; extra == 'torch'"])
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
    result = _gpu_check("--prepare", str(dest), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == ["transformers-5.23.0-py3-none-any.whl"]
    assert "wheels to carry in" in result.stdout
    assert "gpu_check: transformers-5.23.0-py3-none-any.whl requires: tokenizers<0.24.0,>=0.23.1\n" in result.stdout
    (dest / "transformers-5.17.0-py3-none-any.whl").write_bytes((index / "transformers-5.17.0-py3-none-any.whl")
                                                                .read_bytes())
    result = _gpu_check("--prepare", str(dest), env=env)
    assert result.returncode == 1 and "several versions of ['transformers']" in result.stderr


def test_compare_prefill_smoke(tmp_path, monkeypatch):
    """The A/B script on the tiny preset, the current file against a second copy of itself: same outputs."""
    compare = load_benchmark("compare_prefill")
    import modeling_rcp_llava

    out = tmp_path / "ab.md"
    monkeypatch.setattr(sys, "argv", ["compare_prefill.py", "--old", modeling_rcp_llava.__file__, "--preset", "tiny",
                                      "--batch_sizes", "1,2", "--repeats", "1", "--methods", "full,rcp-64,fastv-64",
                                      "--output", str(out)])
    compare.main()
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
    assert [(r[0], r[1]) for r in rows] == [("| full", "1"), ("| full", "2"), ("| rcp-64", "1"), ("| rcp-64", "2"),
                                            ("| fastv-64", "1"), ("| fastv-64", "2")]
    assert all(r[-1] == "True |" for r in rows)
    # the whole command (it left out --methods and --output), an existing --output kept, bad arguments named first
    argv = sys.argv[1:]
    assert f"Command: `{shlex.join(['python', 'benchmarks/compare_prefill.py', *argv])}`" in out.read_text()
    before = out.read_text()
    with pytest.raises(FileExistsError, match=r"ab\.md already exist: choose another --output or pass --overwrite"):
        compare.main(argv)
    for flag, value, match in (("--methods", "full,rcp-100", r"^--methods 'full,rcp-100': unknown \['rcp-100'\]; use"),
                               ("--preset", "nosuch", r"^--preset 'nosuch' is unknown"),
                               ("--batch_sizes", "0", r"^--batch_sizes '0': give comma-separated whole numbers >= 1")):
        changed = argv[:argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2:]
        with pytest.raises(ValueError, match=match):
            compare.main(changed + ["--overwrite"])
    with pytest.raises(SystemExit):  # at parsing
        compare.main(argv[:argv.index("--repeats") + 1] + ["0"] + argv[argv.index("--repeats") + 2:])
    with pytest.raises(NotADirectoryError, match=r"^--output '.*ab\.md': .* is a file, so the results cannot be "
                                                 r"written there\. Choose another --output\."):
        compare.main(argv[:-1] + [str(out / "x.md")])
    assert out.read_text() == before


def test_compare_prefill_tells_a_changed_file_apart(tmp_path, monkeypatch):
    """The smoke test compares the file with itself, so its last column is True whatever the comparison does (a
    mutation audit: comparing the new outputs with themselves passed). An --old copy whose top-k keeps the lowest
    scores: the methods that rank differ (other kept sets, other logits), the unpruned row does not."""
    compare = load_benchmark("compare_prefill")
    import modeling_rcp_llava

    source = open(modeling_rcp_llava.__file__).read()
    top_k = "order = torch.sort(scores.masked_fill(~valid, float(\"-inf\")), dim=1, descending=True, stable=True)"
    final_norm = "        hidden = lm.norm(hidden)\n"  # the pruned loops' (the stock forward has its own)
    reported = "            keep_masks=outputs.keep_masks,\n"  # what the model returns as its kept sets
    inverted = "            keep_masks=None if outputs.keep_masks is None else ~outputs.keep_masks,\n"
    assert source.count(top_k) == 1 and source.count(final_norm) == 2 and source.count(reported) == 1
    for name, old_source in (("kept sets", source.replace(top_k, top_k.replace("descending=True", "descending=False"))),
                             # the same kept sets, other logits
                             ("logits", source.replace(final_norm, "        hidden = lm.norm(hidden) * 2\n")),
                             # the same logits, other kept sets reported
                             ("reported sets", source.replace(reported, inverted))):
        old = tmp_path / f"{name}.py"
        old.write_text(old_source)
        out = tmp_path / f"{name}.md"
        monkeypatch.setattr(sys, "argv", ["compare_prefill.py", "--old", str(old), "--preset", "tiny",
                                          "--batch_sizes", "1", "--repeats", "1", "--methods", "full,rcp-64,fastv-64",
                                          "--output", str(out)])
        compare.main()
        rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line]
        assert [(r[0], r[-1]) for r in rows] == [("| full", "True |"), ("| rcp-64", "False |"),
                                                 ("| fastv-64", "False |")], name


def test_testbed_report_from_metrics(tmp_path):
    report = load_benchmark("testbed_report")
    fam = {"attribute": 0.9, "counting": 0.8}
    row = lambda acc, kept: {"overall": acc, "families": fam, "kept_visual_tokens": kept, "n": 10}  # noqa: E731
    metrics = {"preset": "deep", "command": "build_testbed.py --preset deep", "num_visual_tokens": 144,
               "build_times": {"training_s": 3000.0, "evaluation_s": 100.0},
               "chance": {"attribute": 0.1, "counting": 0.25}, "test": row(0.85, 144), "validation": row(0.84, 144),
               "pruning": {"random": {"1/9": row(0.4, 16), "1/3": row(0.6, 48), "2/9": row(0.5, 32)}}}
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "metrics.json").write_text(json.dumps(metrics))
    report.main(["--folder", str(tmp_path / "tb"), "--output_dir", str(tmp_path)])
    md = (tmp_path / "testbed_deep.md").read_text()
    assert "Built by: `build_testbed.py --preset deep`" in md and "total 3100 s" in md
    assert "Test accuracy **0.850** on 10 samples" in md
    budgets = [line.split(" | ")[1] for line in md.splitlines() if line.startswith("| random |")]
    assert budgets == ["1/3", "2/9", "1/9"]
    # metrics.json as built, plus the report's own command (recorded nowhere before)
    command = f"python benchmarks/testbed_report.py --folder {tmp_path / 'tb'} --output_dir {tmp_path}"
    assert json.loads((tmp_path / "testbed_deep.json").read_text()) == {**metrics, "report_command": command}
    with pytest.raises(FileExistsError, match="testbed_deep.md"):
        report.main(["--folder", str(tmp_path / "tb"), "--output_dir", str(tmp_path)])


def test_selection_profile_accounts_for_every_point(tmp_path):
    """`benchmarks/selection_profile.py` on the tiny preset: one record per pruning point with the schedule's layers
    and counts, the dense calls of Eq. 4 and the pruner named, the parts adding up, the files written once."""
    efficiency = load_benchmark("efficiency")  # what the script imports by name from its own folder
    profile = load_benchmark("selection_profile")
    assert profile.efficiency is efficiency
    overrides = efficiency.method_configs("tiny", [64], {"full", "rcp"})["rcp-64"][0]
    argv = ["--preset", "tiny", "--budget", "64", "--batch_sizes", "1,2", "--repeats", "1", "--output_dir",
            str(tmp_path)]
    results = profile.main(argv)
    data = json.loads((tmp_path / "selection_profile_tiny_cpu_rcp-64.json").read_text())
    assert data["command"] == shlex.join(["python", "benchmarks/selection_profile.py", *argv])
    assert [r["batch_size"] for r in data["results"]] == [1, 2] and data["results"] == json.loads(json.dumps(results))
    text_tokens = efficiency.PRESETS["tiny"]["text_tokens"]
    for result in data["results"]:
        points = result["points"]
        assert [p["layer"] for p in points] == overrides["pruning_layers"]
        assert [p["kept"] for p in points] == overrides["pruning_keep_counts"]
        assert [p["candidates"] for p in points] == [144] + overrides["pruning_keep_counts"][:-1]
        assert all(p["rows"] == p["candidates"] + text_tokens and p["kept_rows"] == p["kept"] + text_tokens
                   for p in points)
        for p in points:
            names = {name.split(f".layers.{p['layer']}.")[-1] for name, _, _ in p["calls"]}
            assert {"input_layernorm", "self_attn.k_proj", "self_attn.q_proj"} <= names, names
            assert f"rcp_plugins.pruners.{p['layer']}.visual_proj" in names
            # the layer reuses its norm and its keys (the prior projected the whole sequence) on its kept rows
            assert p["reused_calls"] == 2
    markdown = (tmp_path / "selection_profile_tiny_cpu_rcp-64.md").read_text()
    assert markdown.startswith("# Token selection, point by point (`rcp-64`, preset `tiny`, CPU)")
    assert markdown.count("| all |") == 2
    assert markdown.count("Aten calls of one prefill (views included): RCP ") == 2

    import torch

    from modeling_rcp_llava import RcpLlavaForConditionalGeneration

    # Aten calls: the ideal selects nothing; the pruning layers of RCP dispatch exactly their key
    # projection's calls fewer than the ideal's (they read the keys from the prior; both read their input norm from
    # `prune`, where the repair context needs the normalised tokens).
    model = RcpLlavaForConditionalGeneration(efficiency.build_config("tiny", **overrides)).eval()
    layer = model.model.language_model.layers[overrides["pruning_layers"][0]]
    x = torch.randn(1, 5, model.config.text_config.hidden_size)
    counter = efficiency.AtenCounter()
    with torch.no_grad(), counter:
        layer.self_attn.k_proj(x)
    assert overrides["repair_layers"] and model.model._repair_context() is not None  # the ideal's norm: see above
    for result in data["results"]:
        rcp, ideal = result["aten_calls"]["rcp"], result["aten_calls"]["ideal"]
        assert [p["selection"] for p in ideal["points"]] == [None, None, None]  # given masks: no selection ran
        assert all(p["selection"] > 50 and p["prune"] > 50 for p in rcp["points"]), rcp["points"]
        assert ideal["layers"] - rcp["layers"] == 3 * counter.total
    with pytest.raises(FileExistsError, match="--overwrite"):
        profile.main(argv)
    with pytest.raises(ValueError, match="--batch_sizes: '1;2'"):
        profile.main(["--preset", "tiny", "--batch_sizes", "1;2", "--output_dir", str(tmp_path / "other")])


def test_efficiency_dtype_flag_runs_the_cpu_in_bfloat16(tmp_path, monkeypatch):
    """`--dtype bfloat16` on the CPU (the GPU preset's dtype, for a host-memory check of its shapes): the rows say
    the dtype, and the measured KV cache is the analytic one at 2 bytes per value -- half the float32 run's."""
    efficiency = load_benchmark("efficiency")
    sizes = {}
    for dtype in ("bfloat16", "auto"):
        out = tmp_path / dtype
        monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "1",
                                          "--new_tokens", "2", "--budgets", "64", "--methods", "rcp,ideal",
                                          "--dtype", dtype, "--output_dir", str(out)])
        efficiency.main()
        data = json.loads((out / "efficiency_tiny_cpu.json").read_text())
        assert {r["dtype"] for r in data["results"]} == {"float32" if dtype == "auto" else dtype}
        assert f"random weights in {'float32' if dtype == 'auto' else dtype};" in (
            out / "efficiency_tiny_cpu.md").read_text()
        for row in data["results"]:
            assert row["kv_cache_mib"] == pytest.approx(row["kv_cache_analytic_mib"], rel=1e-12), row["method"]
        sizes[dtype] = {r["method"]: r["kv_cache_mib"] for r in data["results"]}
        assert all(r["decode_ms_per_token"] > 0 for r in data["results"])
    assert sizes["bfloat16"] == {name: mib / 2 for name, mib in sizes["auto"].items()}


def test_efficiency_with_one_new_token_has_an_end_to_end_time_but_no_decode_step(tmp_path, monkeypatch):
    efficiency = load_benchmark("efficiency")
    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "1",
                                      "--new_tokens", "1", "--budgets", "64", "--methods", "random",
                                      "--output_dir", str(tmp_path)])
    efficiency.main()
    data = json.loads((tmp_path / "efficiency_tiny_cpu.json").read_text())
    for row in data["results"]:
        assert row["decode_ms_per_token"] is None and row["decode_ms_per_token_runs"] == [None]
        assert row["end_to_end_ms"] > 0
    table = (tmp_path / "efficiency_tiny_cpu.md").read_text()
    full_row = next(line for line in table.splitlines() if line.startswith("| full |"))
    assert full_row.split(" | ")[4:7] == ["–", "–", f"{data['results'][0]['end_to_end_ms']:.0f}"]


def test_efficiency_schedules_shrink_with_the_budget_on_every_preset():
    """A budget the preset cannot reach falls back to the 32-layer counts; on tiny (144 tokens) they were the
    576-token counts capped at N, so "128" kept 134 tokens (81.2 per layer) and "64" 93 (67.5), both above "192"
    (48.0). Scaled to the preset's tokens they keep the paper's order; an unreachable budget names the preset's
    own placement, not the 32-layer fallback's."""
    from rcp_llava.flops import visual_tokens_per_layer

    efficiency = load_benchmark("efficiency")
    for preset in ("tiny", "mid", "mid-32"):
        layers_total = efficiency.PRESETS[preset]["text"]["num_hidden_layers"]
        n = efficiency.num_visual_tokens(preset)
        means = []
        for budget in (192, 128, 64):
            layers, _, counts, _ = efficiency.rcp_schedule(layers_total, n, budget)
            assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] <= n
            means.append(sum(visual_tokens_per_layer(layers_total, n, layers, counts)) / layers_total)
        assert means == sorted(means, reverse=True), (preset, means)
    assert efficiency.rcp_schedule(4, 144, 128)[2:] == ([34, 10, 2], False)  # [134, 38, 9] / 4, rounded half up
    with pytest.raises(ValueError, match=r"cannot be reached with pruning layers \[1, 3, 6\] .* alone average 72\.0"):
        efficiency.rcp_schedule(efficiency.PRESETS["mid"]["text"]["num_hidden_layers"], 576, 10)


def test_selection_profile_summarise_takes_medians_and_splits_floor_from_other():
    """A point's columns from its jobs' times (s): medians in ms, not means; *floor* = module calls - reused; *other*
    = selection - module calls. `_by_module` sums the calls over the points by role (layer and pruner index
    dropped)."""
    load_benchmark("efficiency")  # what the script imports by name from its own folder
    profile = load_benchmark("selection_profile")
    k_proj, visual_proj = "model.language_model.layers.4.self_attn.k_proj", "model.rcp_plugins.pruners.4.visual_proj"
    record = {"point": 0, "layer": 4, "calls": [(k_proj, (1, 9, 8)), (visual_proj, (1, 5, 8))], "reused_calls": 1}
    times = {"selection": [0.010, 0.001, 0.004], ("call", 0): [0.002, 0.003, 0.0], ("call", 1): [0.004, 0.001, 0.001],
             ("reused", 0): [0.0005, 0.003, 0.001]}
    point = profile.summarise(record, times)
    assert [(name, shape) for name, shape, _ in point["calls"]] == record["calls"]
    assert [ms for _, _, ms in point["calls"]] == pytest.approx([2.0, 1.0])
    assert point["point"] == 0 and point["layer"] == 4 and point["reused_calls"] == 1
    assert point["selection_ms"] == pytest.approx(4.0) and point["module_calls_ms"] == pytest.approx(3.0)
    assert point["reused_ms"] == pytest.approx(1.0)
    assert point["floor_ms"] == pytest.approx(2.0) and point["other_ms"] == pytest.approx(1.0)
    other = {"calls": [("model.language_model.layers.7.self_attn.k_proj", (1, 4, 8), 0.5),
                       ("model.rcp_plugins.repair_context.encoder", (1, 4, 8), 0.25)]}
    assert profile._by_module([point, other]) == pytest.approx({"layer.self_attn.k_proj": 2.5,
                                                                "pruner.visual_proj": 1.0,
                                                                "model.rcp_plugins.repair_context.encoder": 0.25})


def test_selection_profile_markdown_totals_shares_and_aten_calls():
    """The table's last row sums the points and gives each part as a share of RCP's prefill (not the ideal's); the
    aten sentence counts RCP's extra calls in the ideal's decoder layers."""
    load_benchmark("efficiency")
    profile = load_benchmark("selection_profile")
    point = lambda p, ms: {"point": p, "layer": p + 1, "rows": 20, "candidates": 16, "kept": 8,  # noqa: E731
                           "kept_rows": 12, "selection_ms": 4 * ms, "module_calls_ms": 3 * ms, "reused_ms": ms,
                           "floor_ms": 2 * ms, "other_ms": ms,
                           "calls": [("model.language_model.layers.1.self_attn.k_proj", (1, 20, 8), 3 * ms)]}
    aten = {"rcp": {"total": 1300, "per_layer": 100.0, "layers": 900, "outside": 100,
                    "points": [{"selection": 200, "prune": 100}]},
            "ideal": {"total": 1100, "per_layer": 100.0, "layers": 1000, "outside": 100,
                      "points": [{"selection": None, "prune": 0}]}}
    result = {"method": "rcp-64", "preset": "tiny", "batch_size": 2, "repeats": 3, "points": [point(0, 1.0),
                                                                                           point(1, 0.5)],
              "prefill_ms": {"rcp": 50.0, "ideal": 40.0, "x_ideal": 1.3}, "aten_calls": aten}
    lines = profile.markdown([result], "python x").splitlines()
    assert "## Batch size 2: RCP prefill 50.0 ms, ideal 40.0 ms (×ideal 1.30, median of the rounds' ratios)" in lines
    assert "| 0 | 1 | 20 | 16 | 8 | 12 | 4.00 | 3.00 | 1.00 | 2.00 | 1.00 |" in lines
    assert ("| all | | | | | | 6.00 (12.0%) | 4.50 (9.0%) | 1.50 (3.0%) | **3.00 (6.0%)** | 1.50 (3.0%) |"
            in lines)
    assert "Module calls (ms, summed over the points): layer.self_attn.k_proj 4.50" in lines
    assert ("Aten calls of one prefill (views included): RCP 1300, ideal 1100 (+200: 2.0 decoder layers' worth at 100 "
            "per layer). Per pruning point, selection / rest of `prune`: RCP 200 / 100; ideal 0 / 0. In all decoder "
            "layers: RCP 900, ideal 1000 (RCP's pruning layers read their keys from the prior); outside layers and "
            "pruning: 100 and 100.") in lines


def test_selection_profile_times_on_a_scripted_clock(monkeypatch):
    """`profile` on a clock whose n-th reading lasts n**2 ms (so a mean, a kept warm-up round or an inverted or
    unpaired ratio each give other numbers): round 0 is dropped from the prefills and from every job of every point,
    RCP and the ideal alternate (the ideal first in even rounds), the columns are medians over the rounds and
    ×ideal the median of the rounds' RCP / ideal. Each job runs what it names: the selection afresh (it projects
    the keys of every row again; a cached prior made it cheaper than a real one), each recorded call on its input,
    and the reused norm and keys on the kept rows."""
    import functools

    efficiency = load_benchmark("efficiency")
    profile = load_benchmark("selection_profile")
    state = {"depth": 0, "kind": None, "ran": None}

    def record(name, module, args, output):  # the leaf modules a job runs, with their inputs' shapes
        if state["ran"] is not None:
            state["ran"].append((name, tuple(args[0].shape)))

    class Recording(profile.RcpLlavaForConditionalGeneration):
        def forward(self, *args, **kwargs):
            state["depth"] += 1
            if state["depth"] == 1:
                state["kind"] = "rcp" if kwargs.get("visual_keep_masks") is None else "ideal"
            try:
                return super().forward(*args, **kwargs)
            finally:
                state["depth"] -= 1

        def post_init(self):
            super().post_init()
            for name, module in self.model.named_modules():  # named as the records name them
                if next(module.children(), None) is None:
                    module.register_forward_hook(functools.partial(record, name))

    log = []

    def timed(fn):
        inside = state["depth"] > 0
        state["ran"] = [] if inside else None
        fn()
        seconds = (len(log) + 1) ** 2 / 1e3
        log.append(("job", seconds, state["ran"]) if inside else (state["kind"], seconds, None))
        state["ran"] = None
        return seconds

    monkeypatch.setattr(profile, "RcpLlavaForConditionalGeneration", Recording)
    monkeypatch.setattr(profile, "_timed", timed)
    repeats = 3
    points, prefill, _ = profile.profile("tiny", 64, 1, repeats)
    rounds = []
    for kind, seconds, ran in log:
        if kind != "job" and (not rounds or rounds[-1]["jobs"]):
            rounds.append({"order": [], "jobs": []})
        if kind == "job":
            rounds[-1]["jobs"].append((seconds, ran))
        else:
            rounds[-1]["order"].append(kind)
            rounds[-1][kind] = seconds
    assert len(rounds) == repeats + 1
    assert [r["order"] for r in rounds] == [["ideal", "rcp"], ["rcp", "ideal"], ["ideal", "rcp"], ["rcp", "ideal"]]
    timed_rounds = rounds[1:]
    ms = lambda values: statistics.median(values) * 1e3  # noqa: E731
    assert prefill["rcp"] == pytest.approx(ms([r["rcp"] for r in timed_rounds]))
    assert prefill["ideal"] == pytest.approx(ms([r["ideal"] for r in timed_rounds]))
    assert prefill["x_ideal"] == pytest.approx(statistics.median(r["rcp"] / r["ideal"] for r in timed_rounds))
    hidden = efficiency.build_config("tiny").text_config.hidden_size
    for r in rounds:
        start = 0
        for p in points:
            size = 1 + len(p["calls"]) + p["reused_calls"]
            block, start = r["jobs"][start:start + size], start + size
            selection, calls, reused = block[0], block[1:1 + len(p["calls"])], block[1 + len(p["calls"]):]
            layer = f"language_model.layers.{p['layer']}."
            assert (layer + "self_attn.k_proj", (1, p["rows"], hidden)) in selection[1]
            assert [ran for _, ran in calls] == [[(name, shape)] for name, shape, _ in p["calls"]]
            assert [ran for _, ran in reused] == [[(layer + "input_layernorm", (1, p["kept_rows"], hidden))],
                                                  [(layer + "self_attn.k_proj", (1, p["kept_rows"], hidden))]]
        assert start == len(r["jobs"])
    for i, p in enumerate(points):
        blocks = []
        for r in timed_rounds:
            start = sum(1 + len(q["calls"]) + q["reused_calls"] for q in points[:i])
            blocks.append([seconds for seconds, _ in r["jobs"][start:start + 1 + len(p["calls"]) + p["reused_calls"]]])
        n_calls = len(p["calls"])
        assert p["selection_ms"] == pytest.approx(ms([b[0] for b in blocks]))
        assert [c[2] for c in p["calls"]] == pytest.approx([ms([b[1 + j] for b in blocks]) for j in range(n_calls)])
        assert p["reused_ms"] == pytest.approx(sum(ms([b[1 + n_calls + j] for b in blocks]) for j in range(2)))
        assert p["floor_ms"] == pytest.approx(p["module_calls_ms"] - p["reused_ms"])
