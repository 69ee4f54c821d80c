"""What an evaluation leaves behind: tables (markdown + JSON), metric-vs-time and attention-share
plots, and side-by-side videos of several arms on the same prompt and seed.

Owns:
- `markdown_table` (columns: horizon, arm, train_seed, n, then every metric as `mean [lo, hi]`,
  † where the decoded camera positions are unreliable), `report_dict` / `write` (results.md,
  results.json, metrics_vs_time.png, attention_share.png in an output directory) and `replot`
  (the plots again from a results.json);
- plots: `plot_metrics_vs_time`, `plot_attention`;
- `side_by_side` / `write_side_by_side`: N labelled videos in one grid, each upscaled (nearest) to a
  readable size, a label strip above and a caption strip under each (e.g. `progress_captions`:
  progression and anchor pull so far), written as gif and mp4 through `adastate_jax.video`.
Committed outputs carry no absolute paths of the machine that made them: paths in tables, JSON and
the command line are written relative to a base directory (`portable`), plot titles carry none.

Must not know: models, rollouts, how videos were made (it reads `harness.Results` and arrays).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from adastate_jax import files
from adastate_jax import video as video_lib
from adastate_jax.eval import harness
from adastate_jax.eval.harness import CURVES, METRICS, POSITION_METRICS, REFERENCES
from adastate_jax.streaming.anchors import GROUP_NAMES

CODE_CONF_RELIABLE = 0.5  # below this mean code confidence, decoded positions are flagged (†) in the table
PROGRESSION_YLIM = (-1.5, 2.5)  # plot range of the per-chunk progression (undecodable videos leave it)
COLUMNS = ["horizon", "arm", "train_seed", "n", *METRICS]

# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------

_ABSOLUTE = re.compile(r"(?<![\w.~])/[\w.+\-/]+")


def portable(text: str, base: str | None = None) -> str:
    """`text` with every absolute path rewritten relative to `base` (default: the working
    directory), e.g. '--out=<cwd>/runs/x' -> '--out=runs/x'."""
    base = os.path.abspath(base or os.getcwd())

    def rel(m):
        path = m.group(0)
        tail = "/" if path.endswith("/") and len(path) > 1 else ""
        return os.path.relpath(path, base) + tail

    return _ABSOLUTE.sub(rel, text)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def fmt(stat: Mapping) -> str:
    if stat["mean"] is None or not np.isfinite(stat["mean"]):
        return "n/a"
    if stat["lo"] is None or not np.isfinite(stat["lo"]):
        return f"{stat['mean']:.3g}"
    return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def _seed_cell(seed) -> str:
    return "-" if seed is None else str(seed)


def unreliable(row: Mapping) -> dict[str, bool]:
    """{metric: True} where the row's mean code confidence is below CODE_CONF_RELIABLE and the
    metric depends on decoded camera positions (the † of the table)."""
    conf = row["code_conf"]["mean"]
    low = conf is not None and conf < CODE_CONF_RELIABLE  # NaN compares False
    return {m: bool(low and m in POSITION_METRICS and fmt(row[m]) != "n/a") for m in METRICS}


def markdown_table(rows: Sequence[Mapping], frames_of, resamples: int) -> str:
    """The results table with its notes; `frames_of(horizon)` gives the frames of a horizon."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        flag = unreliable(r)
        cells = [f"{r['horizon']}x ({frames_of(r['horizon'])} fr)", r["arm"], _seed_cell(r["train_seed"])]
        cells += [str(r["videos"])] + [fmt(r[m]) + (" †" if flag[m] else "") for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Mean over videos (prompt x sampling seed) [95% percentile bootstrap interval, {resamples} "
        "resamples of the videos]. Rows with train_seed `all` pool an arm's training seeds: the mean of "
        "the per-seed means, its interval bootstrapped over training seeds and then videos. "
        "train_seed `-`: untrained or unknown (references, random initialisation). n/a: undefined for "
        f"every video of the row. †: mean code confidence below {CODE_CONF_RELIABLE}: the decoded "
        "camera positions these metrics use are unreliable.",
        "",
    ] + [f"- **{m}**: {d}" for m, d in METRICS.items()]
    return "\n".join(lines + notes) + "\n"


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(f"{x:.6g}") if np.isfinite(x) else None  # 6 significant digits keep the file small
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary(results: harness.Results) -> str:
    """One line naming what was evaluated (no paths: plot titles and headers use it)."""
    seeds = sum(len(v) for v in results.train_seeds.values())
    if results.mode == "random":
        return f"random initialisation, {len(results.arms)} arms (untrained: videos are noise)"
    if results.mode == "videos":
        return f"videos on disk, {len(results.arms)} arms"
    return f"trained checkpoints, {len(results.arms)} arms, {seeds} models"


def report_dict(results: harness.Results, base: str | None = None, **extra) -> dict:
    """results.json's content (JSON-safe): settings, the held-out set, rows, per-video values,
    curves and attention shares; checkpoint paths relative to `base`; `extra` added on top."""
    s, geo = results.settings, results.geometry

    def frames_of(h):
        return geo.frames(h * s.horizon_chunks)

    models = [dict(m, path=m["path"] and portable(m["path"], base)) for m in results.models]
    models = [dict(m, source=m["source"] and portable(m["source"], base)) for m in models]
    out = dict(
        mode=results.mode,
        summary=summary(results),
        models=models,
        arms=results.arms,
        train_seeds=results.train_seeds,
        horizons=list(s.horizons),
        horizon_chunks=s.horizon_chunks,
        frames_per_chunk=geo.frames_per_chunk,
        horizon_frames={str(h): frames_of(h) for h in s.horizons},
        seeds=list(s.seeds),
        fps=s.fps,
        bootstrap_resamples=s.resamples,
        confidence_interval="95% percentile bootstrap over videos (prompt x sampling seed), "
        "scipy.stats.bootstrap with numpy seed 0; rows with train_seed 'all': over training seeds and "
        "then videos (harness.hierarchical_bootstrap, seed 0)",
        panworld=dataclasses.asdict(results.panworld),
        clips=[dict(index=c.index, label=c.label, prompt=c.prompt) for c in results.clips],
        metrics=METRICS,
        columns=COLUMNS,
        rows=results.rows,
        per_video=results.records,
        curves_at_longest_horizon=dict(
            names=list(CURVES),
            per_source_mean={
                k: [harness.nanmean_axis0(c[:, j]) for j in range(len(CURVES))]
                for k, c in results.curves.items()
            },
        ),
        attention_share=dict(
            groups=list(GROUP_NAMES),
            policies={m["arm"]: m["policy"] for m in results.models},
            per_arm_chunk_group={a: x.mean(axis=(0, 2)) for a, x in results.attention.items()},
        ),
    )
    out.update(extra)
    return json_safe(out)


def _models_md(report: Mapping) -> str:
    lines = []
    for m in report["models"]:
        if m["path"]:
            seed = _seed_cell(m["train_seed"])
            lines.append(f"- `{m['arm']}` (policy {m['policy']}, train_seed {seed}): `{m['path']}`")
    return ("\n".join(lines) + "\n\n") if lines else ""


def write(out_dir: str, results: harness.Results, base: str | None = None, **extra) -> dict:
    """results.md, results.json and the plots in `out_dir`. -> the report dict (as in results.json)"""
    os.makedirs(out_dir, exist_ok=True)
    s = results.settings
    plots = []
    title = (
        f"{summary(results)}; {len(results.clips)} prompts x {len(s.seeds)} seeds; {max(s.horizons)}x horizon"
    )
    if results.curves:
        plots.append("metrics_vs_time.png")
        plot_metrics_vs_time(
            os.path.join(out_dir, plots[-1]), results.curves, results.sources, s.horizon_chunks, title
        )
    if results.attention:
        plots.append("attention_share.png")
        policies = {m["arm"]: m["policy"] for m in results.models}
        plot_attention(os.path.join(out_dir, plots[-1]), results.attention, s.horizon_chunks, title, policies)
    report = report_dict(results, base, plots=plots, **extra)
    table = markdown_table(results.rows, lambda h: results.geometry.frames(h * s.horizon_chunks), s.resamples)
    md = f"# PanWorld evaluation: {report['summary']}\n\n{_models_md(report)}{table}"
    files.write_text_atomic(os.path.join(out_dir, "results.md"), md)
    # compact JSON: results.md is the human-readable view
    files.write_text_atomic(os.path.join(out_dir, "results.json"), json.dumps(report, separators=(",", ":")))
    report["table"] = table
    return report


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_vs_time(
    path: str, curves: Mapping[str, np.ndarray], sources, horizon_chunks: int, title: str
):
    """Per-chunk progression, anchor pull and code confidence (mean over videos), one line per
    source; `curves[source]` is [video, len(CURVES), chunk]. References are drawn dashed on top."""
    plt = _pyplot()
    names = [
        ("progression", "progression ratio (per chunk)"),
        ("pull", "anchor pull"),
        ("code_conf", "code confidence"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    clipped = False
    for j, (_, label) in enumerate(names):
        ax = axes[j]
        for s in sources:
            if s not in curves:
                continue
            mean = harness.nanmean_axis0(curves[s][:, j])  # [chunk], over videos
            if not np.isfinite(mean).any():
                continue
            if j == 0 and np.nanmax(np.abs(mean)) > PROGRESSION_YLIM[1]:
                clipped = True
            if s in REFERENCES:  # drawn on top: the yardsticks stay visible under noisy policies
                ax.plot(np.arange(mean.size), mean, "--", lw=2, zorder=3, label=s)
            else:
                ax.plot(np.arange(mean.size), mean, "-", lw=0.9, alpha=0.8, label=s)
        ax.axvline(horizon_chunks - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("chunk")
        ax.set_title(label)
    axes[0].set_ylim(*PROGRESSION_YLIM)
    if clipped:
        axes[0].set_title(
            f"{names[0][1]}\n(y clipped to {PROGRESSION_YLIM}: some curves leave it)", fontsize=9
        )
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_attention(
    path: str, attention: Mapping[str, np.ndarray], horizon_chunks: int, title: str, policies=None
):
    """Share of attention on anchor/state, window and current chunk per chunk, one panel per arm;
    `attention[arm]` is [rollout, chunk, layer, group] (averaged over rollouts and layers)."""
    plt = _pyplot()
    policies = dict(policies or {})
    arms = list(attention)
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.2), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        share = np.asarray(attention[arm]).mean(axis=(0, 2))  # [chunk, group]
        state = policies.get(arm, arm) == "adastate"
        for g, name in enumerate(GROUP_NAMES):
            ax.plot(share[:, g], label="state" if (state and g == 0) else name)
        ax.axvline(horizon_chunks - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(arm)
        ax.set_xlabel("chunk")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attention share")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def replot(results_json: str, title: str | None = None) -> list[str]:
    """Draw the plots of a results.json again beside it (from its per-source mean curves and mean
    attention shares; results.json files written before arms existed are read too). -> paths"""
    with open(results_json) as fh:
        report = json.load(fh)
    out_dir = os.path.dirname(results_json)
    nan = float("nan")

    def array(x):
        return np.asarray([[nan if v is None else v for v in row] for row in x], np.float64)

    curves = {
        k: array(v)[None] for k, v in report["curves_at_longest_horizon"]["per_source_mean"].items()
    }  # [1 video, curve, chunk]: the mean of one row is the row
    arms = report.get("arms") or report.get("policies") or []
    att = report.get("attention_share", {})
    shares = att.get("per_arm_chunk_group") or att.get("per_policy_chunk_group") or {}
    attention = {k: array(v)[None, :, None] for k, v in shares.items()}  # [1, chunk, 1 layer, group]
    if title is None:
        what = report.get("summary") or f"{report['mode'].split(' ')[0]}: {', '.join(arms)}"
        title = (
            f"{what}; {len(report['clips'])} prompts x {len(report['seeds'])} seeds; "
            f"{max(report['horizons'])}x horizon"
        )
    written = []
    if curves:
        written.append(os.path.join(out_dir, "metrics_vs_time.png"))
        plot_metrics_vs_time(written[-1], curves, [*arms, *REFERENCES], report["horizon_chunks"], title)
    if attention:
        written.append(os.path.join(out_dir, "attention_share.png"))
        plot_attention(written[-1], attention, report["horizon_chunks"], title, att.get("policies"))
    return written


# ----------------------------------------------------------------------------------------------
# Side-by-side videos
# ----------------------------------------------------------------------------------------------

FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
STRIP_BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (255, 255, 255)


def _nan_text(x: float, fmt_: str) -> str:
    return "n/a" if not np.isfinite(x) else format(x, fmt_)


def progress_captions(scores: Mapping[str, np.ndarray]) -> list[str]:
    """Per-frame two-line captions from `harness.running_scores`: progression and anchor pull so far."""
    prog, pull = np.asarray(scores["progression"]), np.asarray(scores["pull"])
    return [f"prog {_nan_text(p, '.2f')}\npull {_nan_text(q, '+.2f')}" for p, q in zip(prog, pull)]


@dataclasses.dataclass
class Grid:
    """Side-by-side frames [T, H, W, 3] uint8 and, per input video, the boxes (y0, x0, y1, x1) of
    its label strip, its upscaled tile and its caption strip."""

    frames: np.ndarray
    labels: list[tuple[int, int, int, int]]
    tiles: list[tuple[int, int, int, int]]
    captions: list[tuple[int, int, int, int]]


def _font_scale(texts: Sequence[str], width: int) -> float:
    """Largest Hershey scale (<= 0.5, >= 0.3) at which every line of `texts` fits in `width`."""
    import cv2

    lines = [line for t in texts for line in t.split("\n")] or [""]
    scale = 0.5
    while scale > 0.3:
        if max(cv2.getTextSize(line, FONT, scale, 1)[0][0] for line in lines) <= width - 4:
            break
        scale -= 0.05
    return scale


def _text_strip(text: str, width: int, height: int, scale: float, line_height: int) -> np.ndarray:
    import cv2

    strip = np.empty((height, width, 3), np.uint8)
    strip[:] = STRIP_BACKGROUND
    for i, line in enumerate(text.split("\n")):
        y = (i + 1) * line_height - max(2, line_height // 4)
        cv2.putText(strip, line, (2, y), FONT, scale, TEXT_COLOUR, 1, cv2.LINE_AA)
    return strip


def side_by_side(
    videos: Sequence[np.ndarray],
    labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    *,
    columns: int | None = None,
    min_tile: int = 128,
    gap: int = 4,
) -> Grid:
    """N videos [T, H, W, 3] (floats in [-1, 1] or uint8, all the same shape) in a grid of
    `columns` (default: one row), each upscaled by an integer factor (nearest) so its short side is
    >= `min_tile`, with `labels[i]` in a strip above it and `captions[i][t]` (lines split at
    '\\n') in a strip under it at frame t. -> Grid"""
    import cv2

    if not videos or len(labels) != len(videos):
        raise ValueError(f"side_by_side: {len(videos)} videos and {len(labels)} labels")
    frames = [v if np.asarray(v).dtype == np.uint8 else video_lib.to_uint8(v) for v in videos]
    for i, f in enumerate(frames):
        if f.ndim != 4 or f.shape[-1] != 3 or f.shape != frames[0].shape:
            raise ValueError(
                f"side_by_side: video {i} ({labels[i]!r}) is {f.shape}, video 0 is {frames[0].shape}"
            )
    t = frames[0].shape[0]
    if captions is not None:
        if len(captions) != len(videos):
            raise ValueError(f"side_by_side: {len(captions)} caption lists for {len(videos)} videos")
        for i, c in enumerate(captions):
            if len(c) != t:
                raise ValueError(
                    f"side_by_side: video {i} ({labels[i]!r}) has {len(c)} captions for {t} frames"
                )
    tiles = [video_lib.upscale(f, min_tile) for f in frames]
    tile_h, tile_w = tiles[0].shape[1:3]
    scale = _font_scale(list(labels) + [c for cs in (captions or []) for c in cs], tile_w)
    (_, text_h), base = cv2.getTextSize("Ag", FONT, scale, 1)
    line_h = text_h + base + 4
    label_h = line_h
    caption_lines = max((c.count("\n") + 1 for cs in (captions or []) for c in cs), default=0)
    caption_h = caption_lines * line_h
    cell_h, cell_w = label_h + tile_h + caption_h, tile_w
    cols = max(1, min(len(videos), columns or len(videos)))
    rows = math.ceil(len(videos) / cols)
    height = rows * cell_h + (rows - 1) * gap
    width = cols * cell_w + (cols - 1) * gap
    out = np.zeros((t, height, width, 3), np.uint8)
    boxes_label, boxes_tile, boxes_caption = [], [], []
    for i, tile in enumerate(tiles):
        y0 = (i // cols) * (cell_h + gap)
        x0 = (i % cols) * (cell_w + gap)
        out[:, y0 : y0 + label_h, x0 : x0 + cell_w] = _text_strip(labels[i], cell_w, label_h, scale, line_h)
        out[:, y0 + label_h : y0 + label_h + tile_h, x0 : x0 + cell_w] = tile
        boxes_label.append((y0, x0, y0 + label_h, x0 + cell_w))
        boxes_tile.append((y0 + label_h, x0, y0 + label_h + tile_h, x0 + cell_w))
        cy = y0 + label_h + tile_h
        boxes_caption.append((cy, x0, cy + caption_h, x0 + cell_w))
        if caption_h:
            drawn = {}
            for k, text in enumerate(captions[i]):
                if text not in drawn:
                    drawn[text] = _text_strip(text, cell_w, caption_h, scale, line_h)
                out[k, cy : cy + caption_h, x0 : x0 + cell_w] = drawn[text]
    return Grid(out, boxes_label, boxes_tile, boxes_caption)


def write_side_by_side(
    path: str,
    videos: Sequence[np.ndarray],
    labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    *,
    fps: float = 8.0,
    formats: Sequence[str] = (".gif", ".mp4"),
    **grid_kw,
) -> list[str]:
    """`side_by_side` written to `path` without its extension + each of `formats`. -> paths written"""
    grid = side_by_side(videos, labels, captions, **grid_kw)
    stem = os.path.splitext(path)[0]
    written = [video_lib.write_video(stem + ext, grid.frames, fps=fps) for ext in formats]
    return list(dict.fromkeys(written))
