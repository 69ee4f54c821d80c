"""launch/benchmark.py end to end (subprocess, tiny config, a few chunks) and its memory mode through
the library (`adastate_jax/eval/benchmark.py`). No timed assertions: only that every promised number
is there, finite where it must be, and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

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


def test_memory_rows_report_peak_host_and_device_memory_per_length(tmp_path):
    """--memory_lengths mode, through the library calls launch/benchmark.py makes (in process)."""
    import jax.numpy as jnp

    from adastate_jax import build
    from adastate_jax import config as config_lib
    from adastate_jax.config import cli
    from adastate_jax.eval import benchmark as bench

    lengths = bench.parse_lengths("6,3")
    assert lengths == [3, 6]  # ascending: ratios are over the shortest
    with pytest.raises(ValueError, match="--memory_lengths='0,3'"):
        bench.parse_lengths("0,3")
    exp = config_lib.parse(cli.load_file(os.path.join(ROOT, "configs", "tiny.py")))
    dit = build.dit(exp, "")
    decoder, decoder_params = build.decoder(exp, "")
    table = jnp.zeros((1, exp.stream.batch_size, exp.model.text_len, exp.model.text_dim), jnp.float32)
    rows = bench.memory_rows(exp, "window", lengths, dit, decoder, decoder_params, table, segment_chunks=2)
    header = bench.format_table(rows, bench.MEMORY_COLUMNS).splitlines()[0]
    assert header.split() == MEMORY_COLUMNS == list(bench.MEMORY_COLUMNS)
    assert [(r["policy"], r["chunks"]) for r in rows] == [("window", 3), ("window", 6)]
    for r in rows:
        assert r["video_frames"] == 3 * r["chunks"]  # launch/rollout.py's loop wrote every frame
        assert r["rss_peak_mb"] > 0 and r["rss_growth_mb"] >= 0
        assert np.isclose(r["rss_ratio"], r["rss_peak_mb"] / rows[0]["rss_peak_mb"])
        assert np.isclose(r["chunks_per_s"], r["chunks"] / r["seconds"])
        assert r["device_peak_mb"] == r["device_ratio"] == "n/a"  # CPU: no memory_stats()
