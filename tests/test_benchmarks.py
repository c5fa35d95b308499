"""Smoke tests of the benchmark scripts (never pass/fail on timings)."""

import json
import sys

import pytest

from conftest import load_benchmark


def test_efficiency_benchmark_smoke(tmp_path, monkeypatch):
    efficiency = load_benchmark("efficiency")

    monkeypatch.setattr(sys, "argv", ["efficiency.py", "--preset", "tiny", "--batch_sizes", "1", "--repeats", "1",
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
