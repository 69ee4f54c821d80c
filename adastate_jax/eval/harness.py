"""The PanWorld evaluation harness: held-out clips, rollouts of every model of every arm, reference
videos, per-video scores and curves, and their aggregation with bootstrap intervals.

Owns:
- the held-out set (`held_out_clips`): `clips_per_label` PanWorld clips per camera label from a
  PanWorld seed training does not use, rendered at the frame size the model decodes to;
- rolling out (`roll_out`): every `arms.Model` (arm, checkpoint, train seed) for every sampling
  seed, all clips' prompts in one batch, to the longest horizon (shorter horizons are prefixes:
  generation is causal). Models are assembled only through `adastate_jax.build`;
- videos on disk (`load_video_dir`) and the sanity references `ground_truth` (the clips), `frozen`
  (the first frame repeated) and `snap_back` (the requested path for the first half of the horizon,
  then a jump back to the start);
- scoring (`score_video`, `running_scores`): the metrics of METRICS per video, per-chunk curves,
  and per-frame running progression / anchor pull (the captions of side-by-side videos);
- aggregation (`aggregate`): one row per (arm, horizon, train_seed) and per (arm, horizon) over
  training seeds, each metric as mean with a 95% percentile bootstrap interval: over videos
  (`bootstrap_ci`, `scipy.stats.bootstrap`), or over training seeds and then videos
  (`hierarchical_bootstrap`) when an arm has several training seeds.
Undefined values are NaN and left out of means: progression for the static prompt, return-to-start
for static and back-and-forth, fidelity where the world is unknown.

Must not know: command lines, file formats of the outputs (tables and plots are `eval.report`),
how models are loaded (`build` does that), training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from adastate_jax.data import panworld
from adastate_jax.eval import metrics
from adastate_jax.eval.arms import Model
from adastate_jax.streaming import recorder

REFERENCES = ("ground_truth", "frozen", "snap_back")
POSITION_METRICS = ("progression", "return", "flicker", "psnr", "ssim")  # use the decoded camera position
PSNR_CAP_DB = 60.0  # per-frame PSNR cap (an exact match would be +inf and break the mean)
CURVES = ("progression", "pull", "code_conf")  # per-chunk curves at the longest horizon
CONFIDENCE = 0.95
ALL_SEEDS = "all"  # train_seed of a row pooled over an arm's training seeds

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
# Settings and pixel geometry
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is evaluated: horizons (multiples of `horizon_chunks`, the training horizon in chunks),
    sampling seeds, camera labels (empty: all), held-out clips per label and their PanWorld seed,
    bootstrap resamples, the frame rate the videos stand for (DD-DIS), attention instrumentation."""

    horizons: tuple[int, ...] = (1, 2, 4, 8)
    horizon_chunks: int = 7
    seeds: tuple[int, ...] = (0, 1, 2)
    labels: tuple[int, ...] = ()
    clips_per_label: int = 1
    world_seed: int = 1000
    resamples: int = 1000
    fps: float = 16.0
    instrument: bool = True

    def __post_init__(self):
        num_labels = panworld.PanWorldConfig().num_labels
        object.__setattr__(self, "horizons", tuple(sorted(set(self.horizons))))
        object.__setattr__(self, "labels", tuple(self.labels) or tuple(range(num_labels)))
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"horizons={self.horizons}: expected integers >= 1")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"seeds={self.seeds}: expected integers >= 0")
        if min(self.labels) < 0 or max(self.labels) >= num_labels:
            raise ValueError(f"labels={self.labels}: labels are 0..{num_labels - 1}")
        for name in ("horizon_chunks", "clips_per_label"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.resamples < 0:
            raise ValueError(f"bootstrap resamples={self.resamples}: must be >= 0")

    @property
    def num_chunks(self) -> int:
        """Chunks of the longest horizon."""
        return max(self.horizons) * self.horizon_chunks


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Decoded pixels: frame size, frames per chunk and the decoder's lead frames (dropped)."""

    height: int
    width: int
    frames_per_chunk: int
    lead_frames: int = 0

    def frames(self, chunks: int) -> int:
        return chunks * self.frames_per_chunk - self.lead_frames


def geometry(exp, frame_size: tuple[int, int] | None = None, frames_per_chunk: int = 0) -> Geometry:
    """The pixel geometry `config.vae` decodes to (`frame_size` / `frames_per_chunk` override it)."""
    kind, sc = exp.vae.kind, exp.stream
    if kind == "patch":
        spatial, temporal, lead = exp.vae.patch.patch, 1, 0
    elif kind == "wan":
        wan = exp.vae.wan
        spatial, temporal, lead = wan.spatial_factor, wan.temporal_factor, wan.lead_frames
    else:
        if frame_size is None:
            raise ValueError("config.vae.kind='none': give the frame size of the videos (--frame_size=HxW)")
        spatial, temporal, lead = 0, 1, 0
    height, width = frame_size or (sc.latent_h * spatial, sc.latent_w * spatial)
    return Geometry(height, width, frames_per_chunk or sc.chunk_frames * temporal, lead)


# ----------------------------------------------------------------------------------------------
# Held-out set
# ----------------------------------------------------------------------------------------------


def panworld_config(height: int, width: int, seed: int) -> panworld.PanWorldConfig:
    """PanWorld at the model's frame size: sprites scaled with the height (12 px at 32 px) and kept
    below the code band; everything else at the PanWorld defaults."""
    default = panworld.PanWorldConfig()
    room = height - default.code_band_height - default.sprite_margin
    sprite = max(3, min(room, round(default.sprite_size * height / default.frame_height)))
    try:
        return panworld.PanWorldConfig(frame_height=height, frame_width=width, sprite_size=sprite, seed=seed)
    except ValueError as e:
        raise ValueError(f"frame size {height}x{width} cannot hold a PanWorld view: {e}") from None


@dataclasses.dataclass
class Clip:
    """A held-out clip at the longest horizon: its world, label, prompt and camera path."""

    index: int
    label: int
    prompt: str
    world: panworld.World
    camera_x: np.ndarray  # [T_max] ground truth
    video: np.ndarray  # [T_max, H, W, 3]


def held_out_clips(
    pw: panworld.PanWorldConfig, labels: Sequence[int], per_label: int, frames: int
) -> list[Clip]:
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
    source: str  # arm or reference name
    clip: int  # index into the held-out clips
    seed: int  # sampling seed
    frames: np.ndarray  # [T, H, W, 3] in [-1, 1], at least as long as the longest horizon it serves
    known_world: bool  # fidelity against the clip's world is meaningful
    train_seed: int | None = None  # the training seed of the model that made it


def roll_out(
    exp,
    models: Sequence[Model],
    clips: Sequence[Clip],
    seeds: Sequence[int],
    num_chunks: int,
    *,
    vae_checkpoint: str = "",
    instrument: bool = True,
) -> tuple[list[Video], dict[str, np.ndarray], dict[tuple, str], int]:
    """Roll out every model for every seed, all clips' prompts in one batch (batch element b reads
    clip b's prompt). Models without a path share one random initialisation (`build.dit`).

    -> (videos, attention {arm: [model x seed, chunk, layer, group]}, DiT source per
        (arm, train_seed), pixel frames per chunk)"""
    import jax
    import jax.numpy as jnp

    from adastate_jax import build
    from adastate_jax.streaming.rollout import attention_shares

    if exp.vae.kind == "none":
        raise ValueError("config.vae.kind='none': PanWorld metrics need pixels; use 'patch' or 'wan'")
    if exp.text.kind != "words":
        raise ValueError(
            f"config.text.kind={exp.text.kind!r}: the harness encodes PanWorld prompts with the 'words' "
            "encoder only; roll out with launch/rollout.py and score the videos with --videos_dir"
        )
    batch = len(clips)
    exp = dataclasses.replace(exp, stream=dataclasses.replace(exp.stream, batch_size=batch))
    decoder, decoder_params = build.decoder(exp, vae_checkpoint)
    table = jnp.asarray(
        build.prompt_table(exp, [c.prompt for c in clips], batch=1)[:, 0][None]
    )  # [1, B, T, D]
    schedule = jnp.zeros((num_chunks,), jnp.int32)

    random_dit, streamers = None, {}
    videos, shares, sources, frames_per_chunk = [], {}, {}, 0
    bar = tqdm(total=len(models) * len(seeds), desc="rollouts", unit="rollout")
    for model in models:
        if model.path:
            dit = build.dit(exp, model.path)
        else:
            random_dit = random_dit or build.dit(exp)
            dit = random_dit
        sources[(model.arm.name, model.train_seed)] = dit.source
        if model.arm not in streamers:  # one Streamer (one compilation) per arm, shared by its models
            streamers[model.arm] = build.streamer(
                exp, dit.graphdef, decoder_=decoder, instrument=instrument, **model.arm.overrides
            )
        streamer = streamers[model.arm]
        for seed in seeds:
            bar.set_postfix(arm=model.arm.name, train_seed=model.train_seed, seed=seed)
            carry = streamer.init_carry(
                dit.params, table, jax.random.key(seed), decoder_params=decoder_params
            )
            _, out = streamer.jit_rollout(dit.params, carry, schedule, table, None, decoder_params)
            frames = np.asarray(out.frames)  # [N, B, Tc, H, W, 3]
            frames_per_chunk = frames.shape[2]
            frames = np.moveaxis(frames, 1, 0).reshape(batch, -1, *frames.shape[3:])[:, decoder.lead_frames :]
            videos += [
                Video(model.arm.name, b, seed, frames[b], known_world=False, train_seed=model.train_seed)
                for b in range(batch)
            ]
            if out.key_mass is not None:
                share = attention_shares(streamer.stream_cfg, np.asarray(out.key_mass))  # [N, L, 3]
                shares.setdefault(model.arm.name, []).append(share)
            bar.update(1)
    bar.close()
    return videos, {k: np.stack(v) for k, v in shares.items()}, sources, frames_per_chunk


def read_frames(path: str) -> np.ndarray:
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


def downscale(frames: np.ndarray, height: int, width: int, path: str) -> np.ndarray:
    """Undo an integer nearest-neighbour upscale (launch/rollout.py --min_size) by block means."""
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    if h % height or w % width or h // height != w // width:
        raise ValueError(
            f"{path}: frames {h}x{w} are not an integer upscale of the frame size {height}x{width}"
        )
    k = h // height
    return frames.reshape(t, height, k, width, k, c).mean(axis=(2, 4))


def _video_dir_entries(directory: str) -> list[dict]:
    names = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    if not names:
        raise ValueError(f"--videos_dir={directory}: no .json file describing the videos")
    entries = []
    for name in names:
        with open(os.path.join(directory, name)) as fh:
            meta = json.load(fh)
        if isinstance(meta, dict) and "records" in meta:  # launch/rollout.py: per-chunk records beside it
            meta = recorder.read_rollout(os.path.join(directory, name))
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
    return entries


def load_video_dir(directory: str, clips: Sequence[Clip], height: int, width: int):
    """Videos on disk, described by the JSON files of `directory`, in either form:
    - the JSON that launch/rollout.py writes beside each video (`video`, `prompts`,
      `prompt_schedule` without switches, `seed`, `config.stream.anchor`, optional
      `attention_share` [chunk, layer, group]);
    - a manifest `{"videos": [{"path", "policy", "prompt", "seed", optional "world_index",
      optional "train_seed"}]}`, paths relative to the directory (mp4/gif, or npz with a 'video'
      array in [-1, 1]); `policy` is the row (arm) name.
    A video is compared with the held-out clip of its prompt (`world_index`-th clip of that label
    when given). -> (videos, attention {arm: [video, chunk, layer, group]})"""
    videos, attention = [], {}
    for e in tqdm(_video_dir_entries(directory), desc="reading videos", unit="video"):
        label = panworld.prompt_to_label(e["prompt"])
        matches = [i for i, c in enumerate(clips) if c.label == label]
        if not matches:
            raise ValueError(f"{e['path']}: prompt {e['prompt']!r} (label {label}) is not among the labels")
        clip = matches[min(int(e.get("world_index", 0)), len(matches) - 1)]
        frames = downscale(read_frames(e["path"]), height, width, e["path"])
        train_seed = None if e.get("train_seed") is None else int(e["train_seed"])
        videos.append(
            Video(
                str(e["policy"]),
                clip,
                int(e.get("seed", 0)),
                frames,
                known_world=False,
                train_seed=train_seed,
            )
        )
        if e.get("attention_share") is not None:
            attention.setdefault(str(e["policy"]), []).append(np.asarray(e["attention_share"], np.float64))
    attention = {
        k: np.stack(v) for k, v in attention.items() if len({np.shape(a) for a in v}) == 1
    }  # videos of unequal length: no stacked curve
    return videos, attention


def reference_videos(clips: Sequence[Clip], frames: int) -> list[Video]:
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


def nanmean(x) -> float:
    """Mean of the finite entries; NaN (without a warning) when there is none."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    return float(x[finite].mean()) if finite.any() else float("nan")


def nanmean_axis0(x: np.ndarray) -> np.ndarray:
    """Column means of the finite entries of [N, K]; NaN where a column has none."""
    finite = np.isfinite(x)
    count = finite.sum(0)
    total = np.where(finite, x, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def score_video(video: np.ndarray, clip: Clip, known_world: bool, fps: float, frames_per_chunk: int):
    """Per-video metrics (METRICS) and per-chunk curves (CURVES) for one video of T frames against
    the first T frames of `clip`. Chunk c's progression uses its frames and the frame before it.
    -> (scores {name: float}, curves {name: [num_chunks]})"""
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
        "flicker": nanmean(metrics.flicker(video, x)),
        "code_conf": float(confidence.mean()),
        "conf_drift": metrics.quality_drift(confidence),
        "psnr": float("nan"),
        "ssim": float("nan"),
    }
    if known_world:
        fid = metrics.fidelity(video, clip.world, x)
        scores["psnr"] = float(np.minimum(fid["psnr"], PSNR_CAP_DB).mean())
        scores["ssim"] = float(fid["ssim"].mean())

    pull_curve = metrics.anchor_pull_curve(video, clip.video[:t])
    curves = {name: [] for name in CURVES}
    for start in range(0, t, frames_per_chunk):
        lo, hi = max(0, start - 1), min(t, start + frames_per_chunk)
        progression = (
            metrics.progression_ratio(x[lo:hi], truth_x[lo:hi], pw.world_width) if hi - lo >= 2 else np.nan
        )
        curves["progression"].append(float(progression))
        curves["pull"].append(float(pull_curve[start:hi].mean()))
        curves["code_conf"].append(float(confidence[start:hi].mean()))
    return scores, curves


def running_scores(video: np.ndarray, clip: Clip) -> dict[str, np.ndarray]:
    """Scores of frames 0..t at every frame t (what a viewer has seen so far), for captions:
    progression ratio and anchor pull of the prefix (NaN at t = 0, and progression while no motion
    has been requested), and the code confidence of frame t.  video [T, H, W, 3] -> {name: [T]}"""
    pw = clip.world.config
    t = video.shape[0]
    x = metrics.decoded_camera_x(video, pw)  # [T] unwrapped
    truth = panworld.unwrap_positions(clip.camera_x[:t], pw.world_width)
    g = np.diff(truth)
    along = np.concatenate([[0.0], np.cumsum(np.sign(g) * np.diff(x))])  # [T]
    requested = np.concatenate([[0.0], np.cumsum(np.abs(g))])
    with np.errstate(invalid="ignore", divide="ignore"):
        progression = np.where(requested > 1e-9, along / np.where(requested > 1e-9, requested, 1.0), np.nan)
    pull_curve = metrics.anchor_pull_curve(video, clip.video[:t])
    pull = np.full(t, np.nan)
    pull[1:] = np.cumsum(pull_curve[1:]) / np.arange(1, t)
    return dict(progression=progression, pull=pull, code_conf=metrics.code_confidence(video, pw))


def score_all(videos: Sequence[Video], clips: Sequence[Clip], settings: Settings, geo: Geometry):
    """Score every video at every horizon it is long enough for (snap-back rendered per horizon).
    -> (records: [dict(source, train_seed, horizon, clip, seed, scores)],
        curves {source: [video, len(CURVES), chunk]} at the longest horizon)"""
    records, curves = [], {}
    longest = max(settings.horizons)
    jobs = []
    for h in settings.horizons:
        frames = geo.frames(h * settings.horizon_chunks)
        jobs += [(h, frames, v) for v in videos if v.frames.shape[0] >= frames]
        for i, c in enumerate(clips):
            snap = panworld.render_clip(c.world, snap_back_positions(c, frames))
            jobs.append((h, frames, Video("snap_back", i, 0, snap, known_world=True)))
    for h, frames, v in tqdm(jobs, desc="scoring", unit="video"):
        scores, c = score_video(
            v.frames[:frames], clips[v.clip], v.known_world, settings.fps, geo.frames_per_chunk
        )
        records.append(
            dict(source=v.source, train_seed=v.train_seed, horizon=h, clip=v.clip, seed=v.seed, scores=scores)
        )
        if h == longest:
            curves.setdefault(v.source, []).append([c[k] for k in CURVES])
    return records, {k: np.asarray(v, np.float64) for k, v in curves.items()}


# ----------------------------------------------------------------------------------------------
# Bootstrap and aggregation
# ----------------------------------------------------------------------------------------------


def _finite(values) -> np.ndarray:
    v = np.asarray(values, np.float64).ravel()
    return v[np.isfinite(v)]


def bootstrap_ci(values, resamples: int, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Mean of the finite values and its percentile bootstrap interval over them
    (`scipy.stats.bootstrap`, `resamples` resamples with replacement; NaN with < 2 values).
    -> dict(mean, lo, hi, n)"""
    v = _finite(values)
    if v.size == 0:
        return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), n=0)
    if v.size == 1 or resamples <= 0:
        return dict(mean=float(v.mean()), lo=float("nan"), hi=float("nan"), n=int(v.size))
    from scipy import stats  # here: scipy.stats takes ~1 s to import, and streaming never needs it

    res = stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=resamples,
        method="percentile",
        confidence_level=confidence,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    return dict(mean=float(v.mean()), lo=float(lo), hi=float(hi), n=int(v.size))


def hierarchical_bootstrap(groups, resamples: int, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Two-level percentile bootstrap: `groups[s]` are the per-video values of training seed s.

    Statistic: the mean over training seeds of each seed's mean over its videos (every seed weighs
    the same). One resample draws len(groups) training seeds with replacement, then, for each draw,
    that seed's videos with replacement, and takes the statistic; the interval is the central
    `confidence` percentile range of `resamples` such statistics. Non-finite values are dropped
    and seeds left with none are dropped. With one seed this is the ordinary bootstrap over videos;
    when seeds disagree the interval widens with their spread. Resampling at both levels counts the
    within-seed noise twice (once in the spread of the seed means, once in the video resamples), so
    the interval is conservative: with few seeds that agree it is somewhat wider than the ordinary
    interval over all videos. -> dict(mean, lo, hi, n, seeds)"""
    groups = [g for g in (_finite(x) for x in groups) if g.size]
    n = int(sum(g.size for g in groups))
    if not groups:
        return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), n=0, seeds=0)
    mean = float(np.mean([g.mean() for g in groups]))
    if n < 2 or resamples <= 0:
        return dict(mean=mean, lo=float("nan"), hi=float("nan"), n=n, seeds=len(groups))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))  # [R, S] chosen seeds
    seed_means = np.empty(picks.shape)  # [R, S] each draw's resampled mean over videos
    for s, g in enumerate(groups):
        chosen = picks == s
        draws = rng.integers(0, g.size, size=(int(chosen.sum()), g.size))
        seed_means[chosen] = g[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(seed_means.mean(axis=1), [tail, 100 - tail])
    return dict(mean=mean, lo=float(lo), hi=float(hi), n=n, seeds=len(groups))


def _seed_key(seed):
    return (seed is not None, -1 if seed is None else seed)


def _row(source: str, horizon: int, train_seed, groups: dict, resamples: int) -> dict:
    """A table row over `groups` {train_seed: records}: the ordinary bootstrap over the videos of
    one training seed, the hierarchical one over several."""
    row = dict(
        arm=source,
        horizon=horizon,
        train_seed=train_seed,
        train_seeds=list(groups),
        videos=sum(len(g) for g in groups.values()),
    )
    for m in METRICS:
        values = [[r["scores"][m] for r in g] for g in groups.values()]
        row[m] = (
            hierarchical_bootstrap(values, resamples)
            if len(values) > 1
            else bootstrap_ci(values[0], resamples)
        )
    return row


def aggregate(
    records: Sequence[dict], sources: Sequence[str], horizons: Sequence[int], resamples: int
) -> list[dict]:
    """Rows of the table, per horizon and source (arm or reference) in the given order:
    - one row per training seed (`train_seed` = the seed) when the source has several, each
      metric bootstrapped over its videos;
    - one row per source: `train_seed` = the seed when it has one (None: untrained / a reference),
      or ALL_SEEDS with the hierarchical bootstrap over training seeds and then videos.
    -> [dict(arm, horizon, train_seed, train_seeds, videos, {metric: dict(mean, lo, hi, n)})]"""
    rows = []
    for h in horizons:
        for s in sources:
            rec = [r for r in records if r["source"] == s and r["horizon"] == h]
            seeds = sorted({r["train_seed"] for r in rec}, key=_seed_key)
            by_seed = {t: [r for r in rec if r["train_seed"] == t] for t in seeds}
            if len(seeds) > 1:  # per-seed rows, then the pooled one
                rows += [_row(s, h, t, {t: by_seed[t]}, resamples) for t in seeds]
            if seeds:
                rows.append(_row(s, h, ALL_SEEDS if len(seeds) > 1 else seeds[0], by_seed, resamples))
    return rows


# ----------------------------------------------------------------------------------------------
# One evaluation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    """Everything `eval.report` writes: settings, the held-out set, rows, per-video records,
    per-chunk curves {source: [video, curve, chunk]} at the longest horizon and attention shares
    {arm: [rollout, chunk, layer, group]}."""

    settings: Settings
    geometry: Geometry
    panworld: panworld.PanWorldConfig
    clips: list[Clip]
    arms: list[str]  # arm rows in order (references follow)
    models: list[dict]  # [dict(arm, policy, stream, path, train_seed, source)]
    rows: list[dict]
    records: list[dict]
    curves: dict[str, np.ndarray]
    attention: dict[str, np.ndarray]
    mode: str  # 'checkpoints' | 'random' | 'videos'

    @property
    def sources(self) -> list[str]:
        return self.arms + list(REFERENCES)

    @property
    def train_seeds(self) -> dict[str, list]:
        """{arm: its training seeds} (None for an untrained / unknown seed)."""
        out = {}
        for m in self.models:
            out.setdefault(m["arm"], []).append(m["train_seed"])
        return out


def evaluate(
    exp,
    settings: Settings,
    geo: Geometry,
    *,
    models: Sequence[Model] = (),
    videos_dir: str = "",
    vae_checkpoint: str = "",
) -> Results:
    """Roll out `models` (or read the videos of `videos_dir`), add the references, score and
    aggregate. `models` without paths share one random initialisation (mode 'random')."""
    if bool(models) == bool(videos_dir):
        raise ValueError("give either models to roll out or a videos directory, not both or neither")
    pw = panworld_config(geo.height, geo.width, settings.world_seed)
    max_frames = geo.frames(settings.num_chunks)
    clips = held_out_clips(pw, settings.labels, settings.clips_per_label, max_frames)
    if videos_dir:
        videos, attention = load_video_dir(videos_dir, clips, geo.height, geo.width)
        arms = list(dict.fromkeys(v.source for v in videos))
        described = [
            dict(arm=a, policy=None, stream={}, path=None, train_seed=t, source=videos_dir)
            for a, t in dict.fromkeys((v.source, v.train_seed) for v in videos)
        ]
        mode = "videos"
    else:
        videos, attention, sources, got = roll_out(
            exp,
            models,
            clips,
            settings.seeds,
            settings.num_chunks,
            vae_checkpoint=vae_checkpoint,
            instrument=settings.instrument,
        )
        if got != geo.frames_per_chunk:
            raise ValueError(
                f"decoded {got} frames per chunk, expected {geo.frames_per_chunk} from the config"
            )
        if videos[0].frames.shape[1:3] != (geo.height, geo.width):
            raise ValueError(
                f"decoded frames are {videos[0].frames.shape[1:3]}, the held-out set "
                f"{geo.height}x{geo.width}: give the frame size"
            )
        arms = list(dict.fromkeys(m.arm.name for m in models))
        described = [
            dict(
                arm=m.arm.name,
                policy=m.arm.policy,
                stream=dict(m.arm.stream),
                path=m.path,
                train_seed=m.train_seed,
                source=sources[(m.arm.name, m.train_seed)],
            )
            for m in models
        ]
        mode = "checkpoints" if any(m.path for m in models) else "random"
    videos += reference_videos(clips, max_frames)
    records, curves = score_all(videos, clips, settings, geo)
    rows = aggregate(records, arms + list(REFERENCES), settings.horizons, settings.resamples)
    return Results(settings, geo, pw, clips, arms, described, rows, records, curves, attention, mode)
