"""Are the ODE-init targets PanWorld videos? Score stored teacher trajectories before training on them.

Owns `score_trajectories(exp, directory, max_clips)`: decodes the teacher's clean result (`x0`) of
the first `max_clips` records of a stored-trajectory directory (`data/trajectories.py`) with the
run's codec (`config.vae`), rebuilds each record's PanWorld clip from its clip index (record i of
the unshuffled PanWorld source is `panworld.make_clip(config.data.panworld, i)`) and scores the video
against it with the evaluation's own per-video metrics (`harness.score_video`: progression,
return-to-start, code confidence, flicker). `format_table` prints one row per prompt.

Why it exists: whole-clip (diffusion-forcing) ODE solutions of the PanWorld teacher had code
confidence 0.60-0.77 and camera motion unrelated to the prompts, while the same teacher streaming
chunk by chunk pans as asked; students regressed on them produced noise (README "Training"). The
generator (`launch/make_ode_trajectories.py --score_clips`) prints this table when it finishes.

Must not know: how the trajectories were generated, models, training.
"""

from __future__ import annotations

import numpy as np

from adastate_jax.data import panworld
from adastate_jax.data import trajectories as tj
from adastate_jax.eval import harness

COLUMNS = ("progression", "return", "code_conf", "flicker")
FPS = 16.0  # only the DD-DIS score reads it (not reported here)


def _codec(exp):
    """The run's codec module (`config.vae`), built once per scoring call."""
    from adastate_jax import build

    module = build.vae_module(exp)
    if module is None:
        raise ValueError("config.vae.kind='none': the targets are not decodable to frames")
    return module


def _decode(module, latents: np.ndarray) -> np.ndarray:
    """[F, h, w, C] latents -> [F, H, W, 3] frames in [-1, 1]."""
    import jax.numpy as jnp

    return np.asarray(module.decode(jnp.asarray(latents, jnp.float32)[None])[0], np.float32)


def score_trajectories(exp, directory: str, max_clips: int = 256) -> list[dict]:
    """Scores of the first `max_clips` records of a stored-trajectory directory (`score_records`)."""
    entries = tj.resolve_paths([directory])
    meta = entries[0][1]
    source = tj.TrajectorySource(
        [f for f, _, _, _ in entries], meta["trajectory_shape"], meta["text_format"], meta["storage_dtype"]
    )
    return score_records(exp, (source[i] for i in range(min(max_clips, len(source)))))


def score_records(exp, records) -> list[dict]:
    """records: dicts with the teacher's clean result `latents` [F, h, w, C] and the clip `index`.
    -> [{index, label, prompt, progression, return, code_conf, flicker}] in the order given."""
    if exp.data is None or exp.data.source != "panworld":
        raise ValueError(
            f"config.data.source={getattr(exp.data, 'source', None)!r}: scoring targets needs the PanWorld "
            "prompt source (the clip index names the camera path and world)"
        )
    pw = exp.data.panworld
    module = _codec(exp)
    rows = []
    for rec in records:
        video = _decode(module, rec["latents"])
        c = panworld.make_clip(pw, int(rec["index"]), num_frames=video.shape[0])
        clip = harness.Clip(int(rec["index"]), c["label"], c["prompt"], c["world"], c["camera_x"], c["video"])
        scores, _ = harness.score_video(video, clip, False, FPS, exp.stream.chunk_frames)
        row = {"index": clip.index, "label": clip.label, "prompt": clip.prompt}
        rows.append({**row, **{k: scores[k] for k in COLUMNS}})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One row per prompt (in label order) plus 'all pans': n, mean and median of each score."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["label"]):
        groups.setdefault(r["prompt"], []).append(r)
    pans = [r for r in rows if r["prompt"].startswith("pan ")]
    if pans:
        groups["all pans"] = pans
    out = []
    for name, rs in groups.items():
        row = {"prompt": name, "n": len(rs)}
        for k in COLUMNS:
            v = np.asarray([r[k] for r in rs], np.float64)
            v = v[np.isfinite(v)]
            row[k] = float(np.mean(v)) if v.size else float("nan")
            row[k + "_median"] = float(np.median(v)) if v.size else float("nan")
        out.append(row)
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table of `summary(rows)` (progression / return only mean anything for pans)."""
    lines = [
        "| prompt | n | progression (mean / median) | return | code confidence | flicker |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary(rows):
        lines.append(
            f"| {r['prompt']} | {r['n']} | {r['progression']:.2f} / {r['progression_median']:.2f} | "
            f"{r['return']:.2f} | {r['code_conf']:.3f} | {r['flicker']:.3f} |"
        )
    return "\n".join(lines)
