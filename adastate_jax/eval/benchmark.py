"""Streaming benchmarks: per-chunk latency, compile time and memory of every anchor policy, as
`launch/benchmark.py` prints them (tables of ratios measured in one run; nothing asserts a time).

Columns (and JSON keys)
  compile_s         lowering + XLA compilation of the one-chunk step (`jit_step.lower(...).compile()`)
  first_chunk_s     first call of the compiled step on a fresh carry (warm-up effects included, no compile)
  mean_ms / median_ms / p90_ms   per-chunk latency over chunks 1..N-1 (chunk 0 is first_chunk_s)
  slope_us_per_chunk             least-squares slope of latency against chunk index over chunks 1..N-1;
                                 `growth_pct` = slope * (N - 2) / median: how much later chunks cost
                                 more than early ones (a policy whose cost grew with the history would
                                 show it here; a fixed-shape carry should give ~0 up to noise)
  late_early        median latency of the last quarter of chunks 1..N-1 over that of the first quarter
                    (a robust version of the same question: ~1 when the cost does not grow)
  fps               video frames per second at the median latency (decoded frames per chunk /
                    median; latent frames when no decoder is configured); batch elements not counted
  peak_mem_mb       peak memory: the device's `peak_bytes_in_use` where `memory_stats()` exists
                    (GPU/TPU; a running peak over the whole process, not reset between policies);
                    on CPU the process's peak resident set size (`resource.getrusage` ru_maxrss,
                    also a running peak) -- `memory_source` says which
  temp_mb           XLA's temporary buffer size of the compiled step (`compiled.memory_analysis()`),
                    per policy, where the backend reports it
Policies are measured one after another in one process, so their ratios are comparable; the
absolute numbers depend on the machine and its load. Nothing here asserts a time.

Memory at several lengths (`--memory_lengths=250,1000,4000`, instead of the latency table): for
each policy, launch/rollout.py's own loop (`recorder.write_rollout`: segments of
`--segment_chunks`, video and JSON-lines records written per chunk, into a temporary folder) runs
each length on a fresh carry, after a two-segment warm-up that compiles it. Columns:
  chunks / seconds / chunks_per_s   the length, its wall time, its rate (video writing included)
  rss_peak_mb       peak resident memory of the process during that length (`writers.RssMonitor`,
                    sampled every 50 ms); `rss_ratio` = over the shortest length's peak (same policy)
  rss_growth_mb     that peak minus the resident memory when the length started
  device_peak_mb    the device's `peak_bytes_in_use` after that length (a running peak over the
                    process, so it can only rise; `device_ratio` over the shortest length's); "n/a"
                    where the backend has no `memory_stats()` (CPU)
A rollout whose memory does not grow with its length shows ratios of 1 within noise.

Owns: measuring one policy (latency table row, memory rows at several lengths) and formatting the
tables. Must not know: command-line flags, config files.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from adastate_jax import build
from adastate_jax.streaming import anchors, recorder, writers

COLUMNS = (
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
)


def peak_memory_mb() -> tuple[float, str]:
    """(peak MB, source): the device's peak_bytes_in_use when reported, else the process's peak RSS."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, f"{jax.devices()[0].platform} peak_bytes_in_use"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss_kb / 1024, "process peak RSS (resource.ru_maxrss)"


def latency_stats(latencies_s: np.ndarray) -> dict:
    """Per-chunk latency statistics of chunks 1..N-1 (chunk 0 is the first chunk)."""
    steady = np.asarray(latencies_s[1:], np.float64)
    idx = np.arange(1, len(latencies_s))
    slope = float(np.polyfit(idx, steady, 1)[0]) if steady.size >= 2 else float("nan")
    median = float(np.median(steady))
    quarter = max(1, steady.size // 4)
    return dict(
        mean_ms=1e3 * float(steady.mean()),
        median_ms=1e3 * median,
        p90_ms=1e3 * float(np.percentile(steady, 90)),
        slope_us_per_chunk=1e6 * slope,
        growth_pct=100.0 * slope * max(steady.size - 1, 1) / median,
        late_early=float(np.median(steady[-quarter:]) / np.median(steady[:quarter])),
    )


def benchmark_policy(exp, policy, dit, decoder, decoder_params, table, num_chunks: int) -> dict:
    """One policy's row of the latency table: `num_chunks` chunks of the compiled one-chunk step."""
    streamer = build.streamer(exp, dit.graphdef, decoder_=decoder, anchor=policy)
    stream_cfg, params = streamer.stream_cfg, dit.params
    pid = jnp.int32(0)

    carry = streamer.init_carry(params, table, jax.random.key(exp.seed), decoder_params=decoder_params)
    t0 = time.perf_counter()
    compiled = streamer.jit_step.lower(params, carry, pid, table, None, decoder_params).compile()
    compile_s = time.perf_counter() - t0
    temp_mb = float("nan")
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            temp_mb = analysis.temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass

    latencies, frames_per_chunk = [], 0
    for _ in tqdm(range(num_chunks), desc=f"{policy:>8}", unit="chunk", leave=False):
        t = time.perf_counter()
        carry, out = compiled(params, carry, pid, table, None, decoder_params)
        video = out.latents if out.frames is None else out.frames  # [B, T, ...]
        jax.block_until_ready(video)
        latencies.append(time.perf_counter() - t)
        frames_per_chunk = video.shape[1]
    stats = latency_stats(np.asarray(latencies))
    peak, source = peak_memory_mb()
    return dict(
        policy=policy,
        layout=anchors.describe_layout(stream_cfg),
        compile_s=compile_s,
        first_chunk_s=latencies[0],
        **stats,
        fps=frames_per_chunk / (stats["median_ms"] / 1e3),
        frames_per_chunk=frames_per_chunk,
        peak_mem_mb=peak,
        memory_source=source,
        temp_mb=temp_mb,
        chunk_latency_ms=[round(1e3 * x, 4) for x in latencies],
    )


def json_safe(x):
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    widths = [max(len(c), 10) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for r in rows:
        cells = []
        for c, w in zip(columns, widths):
            v = r[c]
            text = v if isinstance(v, str) else str(v) if isinstance(v, int | np.integer) else f"{v:.3g}"
            cells.append(text.rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# memory at several lengths
# ---------------------------------------------------------------------------------------------
MEMORY_COLUMNS = (
    "policy",
    "chunks",
    "seconds",
    "chunks_per_s",
    "rss_peak_mb",
    "rss_ratio",
    "rss_growth_mb",
    "device_peak_mb",
    "device_ratio",
)


def device_peak_mb() -> float | str:
    """The device's peak_bytes_in_use in MB, or "n/a" where memory_stats() is not reported."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
        stats = None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else "n/a"


def _write(streamer, dit, table, decoder_params, num_chunks: int, folder: str, segment_chunks: int) -> dict:
    """launch/rollout.py's loop over `num_chunks` chunks into `folder`."""
    carry = streamer.init_carry(dit.params, table, jax.random.key(0), decoder_params=decoder_params)
    files = recorder.rollout_files(os.path.join(folder, "v.mp4"))
    schedule = recorder.PromptSchedule((), 1, num_chunks)
    return recorder.write_rollout(
        streamer, dit.params, carry, schedule, table, files,
        segment_chunks=segment_chunks, decoder_params=decoder_params,
    )  # fmt: skip


def memory_rows(
    exp, policy, lengths, dit, decoder, decoder_params, table, segment_chunks: int = 1
) -> list[dict]:
    """One row per length (ascending) for `policy`: time, peak host and device memory, ratios;
    launch/rollout.py's loop with segments of `segment_chunks` chunks."""
    streamer = build.streamer(exp, dit.graphdef, decoder_=decoder, anchor=policy)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: compile the segment program
        _write(streamer, dit, table, decoder_params, 2 * segment_chunks, tmp, segment_chunks)
    rows = []
    for n in lengths:
        with tempfile.TemporaryDirectory() as tmp, writers.RssMonitor() as mon:
            t0 = time.perf_counter()
            res = _write(streamer, dit, table, decoder_params, n, tmp, segment_chunks)
            seconds = time.perf_counter() - t0
        if res["num_chunks"] != n:
            raise RuntimeError(f"{policy}: {res['num_chunks']} of {n} chunks were written")
        rows.append(
            dict(
                policy=policy,
                chunks=n,
                seconds=seconds,
                chunks_per_s=n / seconds,
                rss_peak_mb=mon.peak_bytes / 2**20,
                rss_growth_mb=(mon.peak_bytes - mon.start_bytes) / 2**20,
                device_peak_mb=device_peak_mb(),
                video_frames=res["video_frames"],
            )
        )
        print(f"{policy} {n} chunks: peak RSS {rows[-1]['rss_peak_mb']:.0f} MB in {seconds:.1f} s")
    for r in rows:
        r["rss_ratio"] = r["rss_peak_mb"] / rows[0]["rss_peak_mb"]
        dev0 = rows[0]["device_peak_mb"]
        r["device_ratio"] = "n/a" if isinstance(dev0, str) else r["device_peak_mb"] / dev0
    return rows


def parse_lengths(spec: str) -> list[int]:
    """'6000,250,1000' -> [250, 1000, 6000] (--memory_lengths); ValueError naming the flag."""
    try:
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--memory_lengths={spec!r}: give chunk counts like 250,1000,4000") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--memory_lengths={spec!r}: give positive chunk counts like 250,1000,4000")
    return lengths
