r"""Evaluate anchor policies on held-out PanWorld prompts: results table (markdown + JSON) and plots.

  python launch/evaluate.py --config=configs/tiny.py --out_dir=outputs/eval
  python launch/evaluate.py --checkpoints=window:ckpt/window,adastate:ckpt/adastate --horizons=1,2,4,8
  python launch/evaluate.py --videos_dir=outputs/rollouts --horizon_chunks=7

What it does
1. Held-out set: `--clips_per_label` PanWorld clips for each camera label in `--labels` (all eight
   camera paths by default), from a PanWorld seed (`--world_seed`) that training does not use,
   rendered at the frame size the model decodes to (the tiny config decodes 16x16, so the held-out
   worlds are built at 16x16 with proportionally smaller sprites; the ground truth and the
   generated videos are then scored at one size and the comparison is valid).
2. Sources, each scored at every horizon in `--horizons` (multiples of `--horizon_chunks`, the
   training horizon in chunks):
   - one row per anchor policy: rolled out from the checkpoint given for it in `--checkpoints`
     (`policy:DIR,...`), or from one shared random initialisation when `--checkpoints` is empty (a
     warning says so: the videos are then noise and every PanWorld metric of them is meaningless,
     though honestly computed). A rollout is text-to-video: it is conditioned on the prompt only, so
     it cannot show the held-out world. Every policy is rolled out once per seed in `--seeds` to
     the longest horizon, all prompts in one batch; shorter horizons are prefixes (generation is
     causal, so a prefix equals a shorter rollout). Or, with `--videos_dir`, videos already on disk
     (see `load_video_dir`).
   - sanity rows from the held-out set itself: `ground_truth` (the clips), `frozen` (the first
     frame repeated) and `snap_back` (the requested path for the first half of the horizon, then
     the camera jumps back to its start and repeats it).
3. Metrics per video (`adastate_jax.eval.metrics`; see METRICS for one line each), aggregated per
   (source, horizon) as the mean over videos (prompt x seed) with a percentile bootstrap 95%
   confidence interval (`--bootstrap` resamples of the videos with replacement, seed 0). Undefined
   values are NaN (`null` in JSON) and left out of means: progression for the static prompt,
   return-to-start for static and back-and-forth, fidelity where the world is unknown.
4. Outputs in `--out_dir`: `results.md` (the table), `results.json` (settings, the table, every
   per-video value, the per-chunk curves and attention shares), `metrics_vs_time.png`
   (progression, anchor pull and code confidence per chunk at the longest horizon, one line per
   source) and `attention_share.png` (share of attention mass on anchor/state, window and current
   chunk per chunk, one panel per policy, from the rollout instrumentation).

Table columns (`results.md`): horizon (x training horizon, frames), source, n (videos), then every
metric of METRICS as `mean [lo, hi]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adastate_jax.config import cli  # noqa: E402
from adastate_jax.data import panworld  # noqa: E402
from adastate_jax.eval import metrics  # noqa: E402

_CONFIG = cli.define("configs/tiny.py")
flags.DEFINE_string(
    "checkpoints",
    "",
    "Comma-separated policy:DIR pairs (e.g. window:ckpt/w,adastate:ckpt/a); empty: random init.",
)
flags.DEFINE_string(
    "policies", "window,full,sink,ema_sink,adastate", "Policies to roll out when --checkpoints is empty."
)
flags.DEFINE_string("videos_dir", "", "Score videos on disk instead of rolling out (see load_video_dir).")
flags.DEFINE_string("horizons", "1,2,4,8", "Horizons as multiples of --horizon_chunks.")
flags.DEFINE_integer("horizon_chunks", 7, "Training horizon in chunks (7 chunks x 3 latent frames = 21).")
flags.DEFINE_string("seeds", "0,1,2", "Rollout seeds (one rollout of every prompt per seed and policy).")
flags.DEFINE_string("labels", "", "PanWorld camera labels to evaluate (comma-separated ints); empty: all.")
flags.DEFINE_integer("clips_per_label", 1, "Held-out clips (worlds) per camera label.")
flags.DEFINE_integer("world_seed", 1000, "PanWorld seed of the held-out set (training uses config seed 0).")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("fps", 16.0, "Frame rate the videos stand for (DD-DIS samples at ~8 fps).")
flags.DEFINE_string("frame_size", "", "HxW of the frames to score (--videos_dir; default from the config).")
flags.DEFINE_integer("frames_per_chunk", 0, "Pixel frames per chunk (--videos_dir; default from the config).")
flags.DEFINE_bool("instrument", True, "Record attention shares per chunk (reference attention path).")
flags.DEFINE_string("vae_checkpoint", "", "Wan VAE weights when config.vae.kind='wan'.")
flags.DEFINE_string("out_dir", "outputs/eval", "Directory for results.md, results.json and the PNGs.")
FLAGS = flags.FLAGS

POLICIES = ("window", "full", "sink", "ema_sink", "adastate")
REFERENCES = ("ground_truth", "frozen", "snap_back")
PROGRESSION_YLIM = (-1.5, 2.5)  # plot range of the per-chunk progression (undecodable videos leave it)
CODE_CONF_RELIABLE = 0.5  # below this mean code confidence, decoded positions are flagged (†) in the table
POSITION_METRICS = ("progression", "return", "flicker", "psnr", "ssim")  # use the decoded camera position
PSNR_CAP_DB = 60.0  # per-frame PSNR cap (an exact match would be +inf and break the mean)

# name -> one-line definition (the README and results.md use these lines).
METRICS = {
    "progression": "progression ratio: decoded camera motion along the requested direction / requested "
    "motion (1 ideal, 0 frozen; NaN for static)",
    "pull": "anchor pull: SSIM(frame t, frame 0) minus the same for the ground-truth clip, mean over t >= 1 "
    "(0 ideal, > 0 held back toward the start)",
    "return": "return-to-start: share of pan videos whose decoded position retreats by > W/4 from its "
    "furthest point (0 ideal)",
    "dd_dis": "DD-DIS: share of videos judged dynamic (VBench dynamic-degree rule, OpenCV DIS flow)",
    "flicker": "mean |frame t - frame t-1 shifted by the decoded camera step| in [-1, 1] units (lower is "
    "steadier)",
    "code_conf": "position-code confidence, mean over frames (~1: a valid PanWorld view; ~0: no code, so "
    "decoded positions are meaningless)",
    "conf_drift": "quality drift of the code confidence: mean of the last 15% of frames minus the first 15%",
    "psnr": f"fidelity: PSNR (dB, per frame capped at {PSNR_CAP_DB:g}) against the ground-truth crop at the "
    "decoded position (only where the world is known)",
    "ssim": "fidelity: SSIM against the ground-truth crop at the decoded position (only where the world "
    "is known)",
}


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def _int_list(name: str, text: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise app.UsageError(f"--{name}={text!r}: expected comma-separated integers") from None
    if not values or min(values) < minimum:
        raise app.UsageError(f"--{name}={text!r}: expected integers >= {minimum}")
    return values


def parse_checkpoints(text: str) -> dict[str, str]:
    """'window:DIR,adastate:DIR' -> {policy: DIR}; names the bad entry."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        policy, sep, path = item.partition(":")
        if not sep or not path:
            raise app.UsageError(f"--checkpoints entry {item!r} is not policy:DIR")
        if policy not in POLICIES:
            raise app.UsageError(
                f"--checkpoints entry {item!r}: unknown policy {policy!r}; choose {POLICIES}"
            )
        if not os.path.isdir(path):
            raise app.UsageError(f"--checkpoints entry {item!r}: {path} is not a directory")
        out[policy] = path
    return out


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise app.UsageError(f"--policies={text!r}: unknown policies {bad}; choose from {POLICIES}")
    return names


# ----------------------------------------------------------------------------------------------
# Held-out set
# ----------------------------------------------------------------------------------------------


def panworld_config(height: int, width: int, seed: int) -> panworld.PanWorldConfig:
    """PanWorld at the model's frame size: sprites scaled with the height (12 px at 32 px) and kept
    below the code band; everything else at the PanWorld defaults."""
    default = panworld.PanWorldConfig()
    room = height - default.code_band_height - default.sprite_margin
    sprite = max(3, min(room, round(default.sprite_size * height / default.frame_height)))
    return panworld.PanWorldConfig(frame_height=height, frame_width=width, sprite_size=sprite, seed=seed)


@dataclasses.dataclass
class Clip:
    """A held-out clip at the longest horizon: its world, label, prompt and camera path."""

    index: int
    label: int
    prompt: str
    world: panworld.World
    camera_x: np.ndarray  # [T_max] ground truth
    video: np.ndarray  # [T_max, H, W, 3]


def held_out_clips(pw: panworld.PanWorldConfig, labels: list[int], per_label: int, frames: int) -> list[Clip]:
    clips = []
    for k in range(per_label):
        for label in labels:
            index = k * pw.num_labels + label
            c = panworld.make_clip(pw, index, num_frames=frames, label=label)
            clips.append(Clip(index, label, c["prompt"], c["world"], c["camera_x"], c["video"]))
    return clips


def snap_back_positions(clip: Clip, frames: int) -> np.ndarray:
    """The requested path for the first half, then a jump back to the start and the path again."""
    half = max(1, frames // 2)
    t = np.arange(frames)
    return clip.camera_x[np.where(t < half, t, t - half)]


# ----------------------------------------------------------------------------------------------
# Videos to score
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Video:
    source: str  # policy or reference name
    clip: int  # index into the held-out clips
    seed: int
    frames: np.ndarray  # [T, H, W, 3] in [-1, 1], at least as long as the longest horizon it serves
    known_world: bool  # fidelity against the clip's world is meaningful


def roll_out_policies(
    cfg, policies: dict[str, str | None], clips: list[Clip], seeds: list[int], num_chunks: int
) -> tuple[list[Video], dict[str, np.ndarray], int]:
    """Roll out every policy for every seed, all clips' prompts in one batch.

    -> (videos, attention {policy: [seed, chunk, layer, group]}, pixel frames per chunk)"""
    import jax
    import jax.numpy as jnp

    from adastate_jax import build
    from adastate_jax import config as config_lib
    from adastate_jax.streaming.rollout import attention_shares

    exp = config_lib.parse(cfg)
    if exp.vae.kind == "none":
        raise app.UsageError("config.vae.kind='none': PanWorld metrics need pixels; use 'patch' or 'wan'")
    if exp.text.kind != "words":
        raise app.UsageError(
            f"config.text.kind={exp.text.kind!r}: evaluate.py encodes PanWorld prompts with the 'words' "
            "encoder only; roll out with launch/rollout.py and pass --videos_dir instead"
        )
    batch = len(clips)
    exp = dataclasses.replace(exp, stream=dataclasses.replace(exp.stream, batch_size=batch))
    decoder, decoder_params = build.decoder(exp, FLAGS.vae_checkpoint)
    # batch element b reads clip b's prompt: a one-prompt table [1, B, T, D]
    table = jnp.asarray(build.prompt_table(exp, [c.prompt for c in clips], batch=1)[:, 0][None])
    schedule = jnp.zeros((num_chunks,), jnp.int32)

    random_dit = None
    videos, attention, frames_per_chunk = [], {}, 0
    bar = tqdm(total=len(policies) * len(seeds), desc="rollouts", unit="rollout")
    for policy, ckpt in policies.items():
        if ckpt:
            dit = build.dit(exp, ckpt)
        else:
            random_dit = random_dit or build.dit(exp)
            dit = random_dit
        params = dit.params
        streamer = build.streamer(
            exp, dit.graphdef, decoder_=decoder, instrument=FLAGS.instrument, anchor=policy
        )
        stream_cfg = streamer.stream_cfg
        shares = []
        for seed in seeds:
            bar.set_postfix(policy=policy, seed=seed)
            carry = streamer.init_carry(params, table, jax.random.key(seed), decoder_params=decoder_params)
            _, out = streamer.jit_rollout(params, carry, schedule, table, None, decoder_params)
            frames = np.asarray(out.frames)  # [N, B, Tc, H, W, 3]
            frames_per_chunk = frames.shape[2]
            frames = np.moveaxis(frames, 1, 0).reshape(batch, -1, *frames.shape[3:])[:, decoder.lead_frames :]
            videos += [Video(policy, b, seed, frames[b], known_world=False) for b in range(batch)]
            if out.key_mass is not None:
                shares.append(attention_shares(stream_cfg, np.asarray(out.key_mass)))  # [N, L, 3]
            bar.update(1)
        if shares:
            attention[policy] = np.stack(shares)
    bar.close()
    return videos, attention, frames_per_chunk


def _read_frames(path: str) -> np.ndarray:
    """mp4/gif (uint8) or npz (key 'video' or 'frames', float in [-1, 1] or uint8) -> float [T, H, W, 3]."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            key = next((k for k in ("video", "frames") if k in data), None)
            if key is None:
                raise ValueError(f"{path}: npz needs a 'video' or 'frames' array, has {list(data)}")
            frames = data[key]
    else:
        import imageio.v2 as imageio

        frames = np.stack(imageio.mimread(path, memtest=False))[..., :3]
    if frames.dtype == np.uint8:
        frames = panworld.to_float(frames)
    return np.asarray(frames, np.float32)


def _downscale(frames: np.ndarray, height: int, width: int, path: str) -> np.ndarray:
    """Undo an integer nearest-neighbour upscale (launch/rollout.py --min_size) by block means."""
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    if h % height or w % width or h // height != w // width:
        raise ValueError(
            f"{path}: frames {h}x{w} are not an integer upscale of --frame_size={height}x{width}"
        )
    k = h // height
    return frames.reshape(t, height, k, width, k, c).mean(axis=(2, 4))


def load_video_dir(directory: str, clips: list[Clip], height: int, width: int):
    """Videos on disk, described by the JSON files of `directory`, in either form:
    - the JSON that launch/rollout.py writes beside each video (`video`, `prompts`,
      `prompt_schedule` without switches, `seed`, `config.stream.anchor`, optional
      `attention_share` [chunk, layer, group]);
    - a manifest `{"videos": [{"path", "policy", "prompt", "seed", optional "world_index"}]}`,
      paths relative to the directory (mp4/gif, or npz with a 'video' array in [-1, 1]).
    A video is compared with the held-out clip of its prompt (`world_index`-th clip of that label
    when given). -> (videos, attention {policy: [video, chunk, layer, group]})"""
    entries = []
    names = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    if not names:
        raise app.UsageError(f"--videos_dir={directory}: no .json file describing the videos")
    for name in names:
        with open(os.path.join(directory, name)) as fh:
            meta = json.load(fh)
        if isinstance(meta, dict) and "videos" in meta:
            for e in meta["videos"]:
                entries.append(dict(e, path=os.path.join(directory, e["path"])))
        elif isinstance(meta, dict) and "video" in meta and "prompts" in meta:
            schedule = meta.get("prompt_schedule") or [0]
            if len(set(schedule)) != 1:
                raise ValueError(f"{name}: prompt switches cannot be scored against one PanWorld path")
            path = meta["video"]
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(directory, os.path.basename(path))
            entries.append(
                dict(
                    path=path,
                    policy=meta["config"]["stream"]["anchor"],
                    prompt=meta["prompts"][schedule[0]],
                    seed=int(meta.get("seed", 0)),
                    attention_share=meta.get("attention_share"),
                )
            )
    videos, attention = [], {}
    for e in tqdm(entries, desc="reading videos", unit="video"):
        label = panworld.prompt_to_label(e["prompt"])
        matches = [i for i, c in enumerate(clips) if c.label == label]
        if not matches:
            raise ValueError(f"{e['path']}: prompt {e['prompt']!r} (label {label}) is not among --labels")
        clip = matches[min(int(e.get("world_index", 0)), len(matches) - 1)]
        frames = _downscale(_read_frames(e["path"]), height, width, e["path"])
        videos.append(Video(str(e["policy"]), clip, int(e.get("seed", 0)), frames, known_world=False))
        if e.get("attention_share") is not None:
            attention.setdefault(str(e["policy"]), []).append(np.asarray(e["attention_share"], np.float64))
    attention = {
        k: np.stack(v) for k, v in attention.items() if len({np.shape(a) for a in v}) == 1
    }  # videos of unequal length: no stacked curve
    return videos, attention


def reference_videos(clips: list[Clip], frames: int) -> list[Video]:
    """Ground truth and frozen at the longest horizon (prefixes serve shorter ones); snap-back is
    rendered per horizon (see `score_all`)."""
    out = []
    for i, c in enumerate(clips):
        out.append(Video("ground_truth", i, 0, c.video[:frames], known_world=True))
        out.append(Video("frozen", i, 0, np.repeat(c.video[:1], frames, axis=0), known_world=True))
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def score_video(video: np.ndarray, clip: Clip, known_world: bool, fps: float, frames_per_chunk: int):
    """Per-video metrics (METRICS) and per-chunk curves for one video of T frames against the
    first T frames of `clip`. -> (scores {name: float}, curves {name: [num_chunks]})"""
    pw = clip.world.config
    t = video.shape[0]
    truth_x = clip.camera_x[:t]
    x = metrics.decoded_camera_x(video, pw)  # [T] unwrapped
    confidence = metrics.code_confidence(video, pw)  # [T]
    direction = panworld.requested_direction(clip.label, pw)
    scores = {
        "progression": float(metrics.progression_ratio(x, truth_x, pw.world_width)),
        "pull": metrics.anchor_pull(video, clip.video[:t]),
        "return": float(metrics.returned_to_start(x, direction, pw.frame_width, pw.world_width))
        if direction
        else float("nan"),
        "dd_dis": float(metrics.dd_dis_is_dynamic(video, fps)),
        "flicker": _nanmean(metrics.flicker(video, x)),
        "code_conf": float(confidence.mean()),
        "conf_drift": metrics.quality_drift(confidence),
        "psnr": float("nan"),
        "ssim": float("nan"),
    }
    if known_world:
        fid = metrics.fidelity(video, clip.world, x)
        scores["psnr"] = float(np.minimum(fid["psnr"], PSNR_CAP_DB).mean())
        scores["ssim"] = float(fid["ssim"].mean())

    # per chunk: frames of chunk c plus the last frame before it
    pull_curve = metrics.anchor_pull_curve(video, clip.video[:t])
    curves = {"progression": [], "pull": [], "code_conf": []}
    for start in range(0, t, frames_per_chunk):
        lo, hi = max(0, start - 1), min(t, start + frames_per_chunk)
        if hi - lo >= 2:
            curves["progression"].append(
                float(metrics.progression_ratio(x[lo:hi], truth_x[lo:hi], pw.world_width))
            )
        else:
            curves["progression"].append(float("nan"))
        curves["pull"].append(float(pull_curve[start:hi].mean()))
        curves["code_conf"].append(float(confidence[start:hi].mean()))
    return scores, curves


def _nanmean(x) -> float:
    """Mean of the finite entries; NaN (without a warning) when there is none."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    return float(x[finite].mean()) if finite.any() else float("nan")


def _nanmean_axis0(x: np.ndarray) -> np.ndarray:
    """Column means of the finite entries of [N, K]; NaN where a column has none."""
    finite = np.isfinite(x)
    count = finite.sum(0)
    total = np.where(finite, x, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap_ci(values, resamples: int, rng: np.random.Generator) -> dict:
    """Mean of the finite values and its percentile bootstrap 95% interval (NaN if < 2 values)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
    if v.size == 1 or resamples <= 0:
        return dict(mean=float(v.mean()), lo=float("nan"), hi=float("nan"), n=int(v.size))
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return dict(mean=float(v.mean()), lo=float(lo), hi=float(hi), n=int(v.size))


def score_all(videos, clips, horizons, horizon_chunks, frames_per_chunk, lead_frames, fps):
    """Score every video at every horizon it is long enough for (snap-back rendered per horizon).
    -> (records: list of dict(source, horizon, clip, seed, scores), curves {source: [video, chunk]})"""
    records, curves = [], {}
    longest = max(horizons)
    jobs = []
    for h in horizons:
        frames = h * horizon_chunks * frames_per_chunk - lead_frames
        for v in videos:
            if v.frames.shape[0] >= frames:
                jobs.append((h, frames, v))
        for i, c in enumerate(clips):
            snap = panworld.render_clip(c.world, snap_back_positions(c, frames))
            jobs.append((h, frames, Video("snap_back", i, 0, snap, known_world=True)))
    for h, frames, v in tqdm(jobs, desc="scoring", unit="video"):
        scores, c = score_video(v.frames[:frames], clips[v.clip], v.known_world, fps, frames_per_chunk)
        records.append(dict(source=v.source, horizon=h, clip=v.clip, seed=v.seed, scores=scores))
        if h == longest:
            curves.setdefault(v.source, []).append([c[k] for k in ("progression", "pull", "code_conf")])
    return records, {k: np.asarray(v, np.float64) for k, v in curves.items()}  # [video, 3, chunk]


def aggregate(records, sources, horizons, resamples: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for h in horizons:
        for s in sources:
            rec = [r for r in records if r["source"] == s and r["horizon"] == h]
            if not rec:
                continue
            row = dict(source=s, horizon=h, videos=len(rec))
            for m in METRICS:
                row[m] = bootstrap_ci([r["scores"][m] for r in rec], resamples, rng)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _fmt(stat: dict) -> str:
    if not np.isfinite(stat["mean"]):
        return "n/a"
    if not np.isfinite(stat["lo"]):
        return f"{stat['mean']:.3g}"
    return f"{stat['mean']:.3g} [{stat['lo']:.3g}, {stat['hi']:.3g}]"


def markdown_table(rows, frames_of, resamples: int) -> str:
    head = ["horizon", "source", "n"] + list(METRICS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['horizon']}x ({frames_of(r['horizon'])} fr)", r["source"], str(r["videos"])]
        unreadable = r["code_conf"]["mean"] < CODE_CONF_RELIABLE  # NaN compares False
        flag = {m: unreadable and m in POSITION_METRICS and np.isfinite(r[m]["mean"]) for m in METRICS}
        marked = [_fmt(r[m]) + (" †" if flag[m] else "") for m in METRICS]
        lines.append("| " + " | ".join(cells + marked) + " |")
    notes = [
        "",
        f"Mean over videos (prompt x seed) [95% percentile bootstrap interval, {resamples} resamples of "
        "the videos]; n/a: undefined for every video of the row. †: mean code confidence below "
        f"{CODE_CONF_RELIABLE}: the decoded camera positions these metrics use are unreliable.",
        "",
    ] + [f"- **{m}**: {d}" for m, d in METRICS.items()]
    return "\n".join(lines + notes) + "\n"


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(f"{x:.6g}") if np.isfinite(x) else None  # 6 significant digits keep the file small
    if isinstance(x, np.integer):
        return int(x)
    return x


def plot_metrics_vs_time(path, curves, sources, horizon_chunks, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            mean = _nanmean_axis0(curves[s][:, j])  # [chunk], over videos
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


def plot_attention(path, attention, horizon_chunks, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adastate_jax.streaming.anchors import GROUP_NAMES

    policies = list(attention)
    fig, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 3.2), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], policies):
        share = attention[p].mean(axis=(0, 2))  # [chunk, group], mean over seeds and layers
        for g, name in enumerate(GROUP_NAMES):
            ax.plot(share[:, g], label="state" if (p == "adastate" and g == 0) else name)
        ax.axvline(horizon_chunks - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(p)
        ax.set_xlabel("chunk")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attention share")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _model_frame_size(cfg) -> tuple[int, int]:
    factor = {"patch": int(cfg.vae.patch.patch), "wan": 8}.get(cfg.vae.kind)
    if factor is None:
        raise app.UsageError("config.vae.kind='none': pass --frame_size=HxW")
    return cfg.stream.latent_h * factor, cfg.stream.latent_w * factor


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    t_start = time.perf_counter()
    cfg = _CONFIG.value
    horizons = sorted(set(_int_list("horizons", FLAGS.horizons, 1)))
    seeds = _int_list("seeds", FLAGS.seeds, 0)
    if FLAGS.horizon_chunks < 1:
        raise app.UsageError(f"--horizon_chunks={FLAGS.horizon_chunks} must be >= 1")
    if FLAGS.clips_per_label < 1:
        raise app.UsageError(f"--clips_per_label={FLAGS.clips_per_label} must be >= 1")
    if FLAGS.bootstrap < 0:
        raise app.UsageError(f"--bootstrap={FLAGS.bootstrap} must be >= 0")
    num_labels = panworld.PanWorldConfig().num_labels
    labels = _int_list("labels", FLAGS.labels, 0) if FLAGS.labels else list(range(num_labels))
    if max(labels) >= num_labels:
        raise app.UsageError(f"--labels={FLAGS.labels!r}: labels are 0..{num_labels - 1}")
    checkpoints = parse_checkpoints(FLAGS.checkpoints)
    if FLAGS.videos_dir and checkpoints:
        raise app.UsageError("--videos_dir and --checkpoints are exclusive")
    if FLAGS.videos_dir and not os.path.isdir(FLAGS.videos_dir):
        raise app.UsageError(f"--videos_dir={FLAGS.videos_dir} is not a directory")

    if FLAGS.frame_size:
        try:
            height, width = (int(v) for v in FLAGS.frame_size.lower().split("x"))
        except ValueError:
            raise app.UsageError(f"--frame_size={FLAGS.frame_size!r}: expected HxW, e.g. 16x16") from None
    else:
        height, width = _model_frame_size(cfg)
    try:
        pw = panworld_config(height, width, FLAGS.world_seed)
    except ValueError as e:
        raise app.UsageError(f"--frame_size {height}x{width} cannot hold a PanWorld view: {e}") from None

    lead = {"wan": 3}.get(cfg.vae.kind, 0)
    temporal = {"wan": 4}.get(cfg.vae.kind, 1)
    frames_per_chunk = FLAGS.frames_per_chunk or cfg.stream.chunk_frames * temporal
    num_chunks = max(horizons) * FLAGS.horizon_chunks
    max_frames = num_chunks * frames_per_chunk - lead
    clips = held_out_clips(pw, labels, FLAGS.clips_per_label, max_frames)
    print(
        f"held-out set: {len(clips)} PanWorld clips (seed {FLAGS.world_seed}, {height}x{width}, "
        f"labels {labels}), "
        f"horizons {horizons} x {FLAGS.horizon_chunks} chunks, up to {max_frames} frames"
    )

    if FLAGS.videos_dir:
        videos, attention = load_video_dir(FLAGS.videos_dir, clips, height, width)
        policies = sorted({v.source for v in videos})
        mode = f"videos from {FLAGS.videos_dir}"
    else:
        if checkpoints:
            todo = dict(checkpoints)
            mode = "checkpoints " + ", ".join(f"{k}:{v}" for k, v in todo.items())
        else:
            todo = {p: None for p in parse_policies(FLAGS.policies)}
            mode = "random initialisation (untrained: videos are noise, PanWorld metrics meaningless)"
            print(
                "warning: no --checkpoints: every policy rolls out the same randomly initialised DiT; "
                "its videos are noise, so its metrics show the pipeline, not the method"
            )
        videos, attention, got = roll_out_policies(cfg, todo, clips, seeds, num_chunks)
        if got != frames_per_chunk:
            raise ValueError(f"decoded {got} frames per chunk, expected {frames_per_chunk} from the config")
        shape = videos[0].frames.shape[1:3]
        if shape != (height, width):
            raise ValueError(
                f"decoded frames are {shape}, the held-out set {height}x{width}: pass --frame_size"
            )
        policies = list(todo)

    videos += reference_videos(clips, max_frames)
    records, curves = score_all(
        videos, clips, horizons, FLAGS.horizon_chunks, frames_per_chunk, lead, FLAGS.fps
    )
    sources = policies + list(REFERENCES)
    rows = aggregate(records, sources, horizons, FLAGS.bootstrap)

    def frames_of(h):
        return h * FLAGS.horizon_chunks * frames_per_chunk - lead

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    table = markdown_table(rows, frames_of, FLAGS.bootstrap)
    with open(os.path.join(FLAGS.out_dir, "results.md"), "w") as fh:
        fh.write(f"# PanWorld evaluation: {mode}\n\n{table}")
    title = f"{mode.split(' (')[0]}; {len(clips)} prompts x {len(seeds)} seeds; {max(horizons)}x horizon"
    plots = []
    if curves:
        plots.append(os.path.join(FLAGS.out_dir, "metrics_vs_time.png"))
        plot_metrics_vs_time(plots[-1], curves, sources, FLAGS.horizon_chunks, title)
    if attention:
        plots.append(os.path.join(FLAGS.out_dir, "attention_share.png"))
        plot_attention(plots[-1], attention, FLAGS.horizon_chunks, title)

    import jax

    from adastate_jax.streaming.anchors import GROUP_NAMES

    report = dict(
        command=" ".join(sys.argv),
        mode=mode,
        config=json.loads(cfg.to_json_best_effort()),
        checkpoints=checkpoints or None,
        policies=policies,
        horizons=horizons,
        horizon_chunks=FLAGS.horizon_chunks,
        frames_per_chunk=frames_per_chunk,
        horizon_frames={str(h): frames_of(h) for h in horizons},
        seeds=seeds,
        fps=FLAGS.fps,
        bootstrap_resamples=FLAGS.bootstrap,
        confidence_interval="95% percentile bootstrap over videos (prompt x seed), numpy seed 0",
        panworld=dataclasses.asdict(pw),
        clips=[dict(index=c.index, label=c.label, prompt=c.prompt) for c in clips],
        metrics=METRICS,
        columns=["horizon", "source", "n"] + list(METRICS),
        rows=rows,
        per_video=records,
        curves_at_longest_horizon=dict(
            names=["progression", "pull", "code_conf"],
            per_source_mean={s: [_nanmean_axis0(c[:, j]) for j in range(3)] for s, c in curves.items()},
        ),
        attention_share=dict(
            groups=list(GROUP_NAMES),
            per_policy_chunk_group={p: a.mean(axis=(0, 2)) for p, a in attention.items()},
        ),
        plots=[os.path.basename(p) for p in plots],
        device=str(jax.devices()[0]),
        seconds=round(time.perf_counter() - t_start, 1),
    )
    report = _json_safe(report)
    with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as fh:
        json.dump(report, fh, separators=(",", ":"))  # compact: results.md is the human-readable view
    print(table)
    print(
        f"wrote {FLAGS.out_dir}/results.md, results.json, {', '.join(os.path.basename(p) for p in plots)} "
        f"in {report['seconds']} s"
    )


if __name__ == "__main__":
    cli.run(main)
