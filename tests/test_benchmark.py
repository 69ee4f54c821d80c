"""launch/benchmark.py end to end (subprocess, tiny config, a few chunks). No timed assertions:
only that every promised number is there, finite where it must be, and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.subproc import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "benchmark.py")
COLUMNS = [
    "policy",
    "compile_s",
    "first_chunk_s",
    "mean_ms",
    "median_ms",
    "p90_ms",
    "slope_us_per_chunk",
    "growth_pct",
    "late_early",
    "fps",
    "peak_mem_mb",
    "temp_mb",
]


def _run(args, timeout=180):
    env = child_env()
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_benchmark_reports_every_column_for_every_policy(tmp_path):
    out = tmp_path / "bench.json"
    res = _run(["--policies=window,adastate", "--num_chunks=6", f"--json={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    header = next(line for line in res.stdout.splitlines() if line.strip().startswith("policy"))
    assert header.split() == COLUMNS
    report = json.loads(out.read_text())
    assert report["columns"] == COLUMNS
    assert [r["policy"] for r in report["results"]] == ["window", "adastate"]
    for r in report["results"]:
        for c in COLUMNS[1:-1]:  # temp_mb may be unreported by a backend
            assert np.isfinite(r[c]), (r["policy"], c)
        assert len(r["chunk_latency_ms"]) == 6
        assert np.isclose(r["first_chunk_s"] * 1e3, r["chunk_latency_ms"][0], atol=1e-3)
        steady = np.asarray(r["chunk_latency_ms"][1:])
        assert np.isclose(r["median_ms"], np.median(steady), rtol=1e-3)
        assert r["p90_ms"] >= r["median_ms"] > 0
        assert np.isclose(r["fps"], r["frames_per_chunk"] / (r["median_ms"] / 1e3), rtol=1e-6)
        assert r["frames_per_chunk"] == 3  # tiny: 3 latent frames -> 3 PatchCodec frames
        assert "ru_maxrss" in r["memory_source"] or "peak_bytes_in_use" in r["memory_source"]
        assert r["peak_mem_mb"] > 0
    assert "state 1" in report["results"][1]["layout"]


def test_bad_policy_is_named():
    res = _run(["--policies=window,nope", "--num_chunks=4"], timeout=60)
    assert res.returncode != 0
    assert "--policies='window,nope'" in res.stderr + res.stdout


MEMORY_COLUMNS = [
    "policy",
    "chunks",
    "seconds",
    "chunks_per_s",
    "rss_peak_mb",
    "rss_ratio",
    "rss_growth_mb",
    "device_peak_mb",
    "device_ratio",
]


def test_memory_mode_reports_peak_host_and_device_memory_per_length(tmp_path):
    out = tmp_path / "mem.json"
    res = _run(
        ["--policies=window", "--memory_lengths=6,3", "--segment_chunks=2", f"--json={out}"], timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    header = next(line for line in res.stdout.splitlines() if line.strip().startswith("policy"))
    assert header.split() == MEMORY_COLUMNS
    report = json.loads(out.read_text())
    assert report["columns"] == MEMORY_COLUMNS and report["num_chunks"] == [3, 6]
    rows = report["results"]
    assert [(r["policy"], r["chunks"]) for r in rows] == [("window", 3), ("window", 6)]  # ascending
    for r in rows:
        assert r["video_frames"] == 3 * r["chunks"]  # launch/rollout.py's loop wrote every frame
        assert r["rss_peak_mb"] > 0 and r["rss_growth_mb"] >= 0
        assert np.isclose(r["rss_ratio"], r["rss_peak_mb"] / rows[0]["rss_peak_mb"])
        assert np.isclose(r["chunks_per_s"], r["chunks"] / r["seconds"])
        assert r["device_peak_mb"] == r["device_ratio"] == "n/a"  # CPU: no memory_stats()
