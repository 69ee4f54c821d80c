"""Metrics that decide whether a streaming video keeps progressing: each one a small numpy function
whose docstring states its exact definition.

Owns: progression ratio, anchor pull, return-to-start, fidelity (PSNR / SSIM against the ground-truth
crop), flicker, quality drift, DD-DIS (a dynamic-degree procedure with OpenCV DIS flow), attention
share per slot group, and the camera tracker they use (the PanWorld position code).
Must not know: models, the streaming cache, training, checkpoints (it must not import
`adastate_jax.models`, `.streaming` or `.training`); it reads PanWorld only through
`adastate_jax.data.panworld` (decoding, rendering, unwrapping).

Conventions: videos are float arrays [T, H, W, 3] in [-1, 1] (uint8 [0, 255] accepted where noted),
channels-last; camera positions are in PanWorld pixels, increasing when the camera pans right.
"""

from __future__ import annotations

import numpy as np

from adastate_jax.data import panworld

DEFAULT_CONFIG = panworld.PanWorldConfig()

# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _as_video(video, name: str = "video") -> np.ndarray:
    """[T, H, W, 3] float64 in [-1, 1] (uint8 is converted); clear error otherwise."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name} must be [T, H, W, 3], got shape {video.shape}")
    if video.dtype == np.uint8:
        video = panworld.to_float(video)
    return video.astype(np.float64)


def _as_track(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"{name} must be [..., T] with T >= 2, got shape {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------
# Camera trackers
# ----------------------------------------------------------------------------------------------


def decoded_camera_x(video, config: panworld.PanWorldConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Camera track read from the PanWorld code bands (`panworld.track_positions`: frame-to-frame
    motion from the fine band, whole periods from the coarse band), unwrapped.
    [T, H, W, 3] -> float64 [T]"""
    return panworld.track_positions(_as_video(video), config)


def code_confidence(video, config: panworld.PanWorldConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Per frame: the weaker of the two code bands' demodulated amplitudes relative to a clean frame
    (`panworld.decode_position(..., return_confidence=True)`): ~1 while the frame still carries a
    valid position code, ~0 once it is gone. A no-reference validity score.  -> float64 [T]"""
    _, confidence = panworld.decode_position(_as_video(video), config, return_confidence=True)
    return confidence


# ----------------------------------------------------------------------------------------------
# Progression
# ----------------------------------------------------------------------------------------------


def progression_ratio(decoded_x, target_x, world_width: float) -> np.ndarray:
    """Progression ratio: how much of the requested camera motion the video performs.

    With d_t = unwrapped decoded steps and g_t = ground-truth steps (t = 1..T-1):
        ratio = sum_t sign(g_t) * d_t / sum_t |g_t|
    For a constant pan this is decoded displacement / requested displacement; for back-and-forth
    it counts motion along the requested direction of each step. Ideal 1, frozen 0, backwards < 0;
    NaN when no motion is requested (static). Slice both tracks to score a time window.

    decoded_x, target_x: [..., T] (decoded may be wrapped mod `world_width`) -> float64 [...]
    """
    decoded_x, target_x = _as_track(decoded_x, "decoded_x"), _as_track(target_x, "target_x")
    if decoded_x.shape != target_x.shape:
        raise ValueError(f"decoded_x {decoded_x.shape} and target_x {target_x.shape} differ")
    d = np.diff(panworld.unwrap_positions(decoded_x, world_width), axis=-1)
    g = np.diff(panworld.unwrap_positions(target_x, world_width), axis=-1)
    requested = np.abs(g).sum(-1)
    along = (np.sign(g) * d).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(requested > 1e-9, along / np.where(requested > 1e-9, requested, 1.0), np.nan)


def returned_to_start(decoded_x, direction: int, frame_width: float, world_width: float) -> bool:
    """Whether a rollout told to keep panning came back toward its start.

    With p_t = direction * (x_t - x_0) the progress along the requested direction (x unwrapped),
    the rollout returned when max_t [max_{s <= t} p_s - p_t] > frame_width / 4, i.e. it retreated
    from its furthest point by more than a quarter frame width. `direction` is +1 (pan right)
    or -1 (pan left). decoded_x: [T]
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction={direction} must be +1 or -1")
    x = panworld.unwrap_positions(_as_track(decoded_x, "decoded_x"), world_width)
    if x.ndim != 1:
        raise ValueError(f"decoded_x must be [T], got shape {x.shape}")
    progress = direction * (x - x[0])
    retreat = np.maximum.accumulate(progress) - progress
    return bool(retreat.max() > frame_width / 4)


def return_to_start_rate(decoded_xs, directions, frame_width: float, world_width: float) -> float:
    """Return-to-start rate: share of rollouts with a pan prompt (direction != 0) for which
    `returned_to_start` holds. Rollouts with direction 0 (static, back-and-forth) are skipped;
    NaN if none is left.  decoded_xs: [N, T]; directions: [N] in {-1, 0, +1}."""
    decoded_xs = np.asarray(decoded_xs, np.float64)
    directions = np.asarray(directions).astype(int)
    if decoded_xs.ndim != 2 or directions.shape != decoded_xs.shape[:1]:
        raise ValueError(
            f"decoded_xs must be [N, T] and directions [N], got {decoded_xs.shape} and {directions.shape}"
        )
    flags = [
        returned_to_start(x, int(d), frame_width, world_width)
        for x, d in zip(decoded_xs, directions)
        if d != 0
    ]
    return float(np.mean(flags)) if flags else float("nan")


# ----------------------------------------------------------------------------------------------
# Image similarity: PSNR, SSIM
# ----------------------------------------------------------------------------------------------


def _broadcast_images(a, b) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of a and b broadcast together; both must be [..., H, W, C] with equal H, W, C."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim < 3 or b.ndim < 3 or a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"a {a.shape} and b {b.shape} must be images [..., H, W, C] of one size")
    try:
        return tuple(np.broadcast_arrays(a, b))
    except ValueError as error:
        raise ValueError(f"a {a.shape} and b {b.shape} do not broadcast") from error


def psnr(a, b, data_range: float = 2.0) -> np.ndarray:
    """PSNR over the last three axes: 10 log10(data_range^2 / mean((a - b)^2)) dB; +inf for
    identical images. data_range = 2 for [-1, 1] images.  [..., H, W, C] x2 (broadcast) -> float64 [...]"""
    a, b = _broadcast_images(a, b)
    mse = np.mean((a - b) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    k = np.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of the last two axes.  [..., H, W] -> [..., H-k+1, W-k+1]"""
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel.size, axis=-2)  # [..., H', W, k]
    x = windows @ kernel
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel.size, axis=-1)  # [..., H', W', k]
    return windows @ kernel


def ssim(a, b, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004) over the last three axes [..., H, W, C].

    Per channel, with Gaussian-weighted local statistics (window `window` x `window`, std `sigma`,
    'valid' positions only, no padding): mu_a, mu_b, var_a, var_b, cov_ab, and
        SSIM map = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range (2 for [-1, 1]). The result is the mean of the
    map over positions and channels: 1 for identical images.  -> float64 [...]
    """
    a, b = _broadcast_images(a, b)
    if min(a.shape[-3:-1]) < window:
        raise ValueError(f"images {a.shape[-3:-1]} smaller than the SSIM window={window}")
    kernel = _gaussian_kernel(window, sigma)
    a, b = np.moveaxis(a, -1, -3), np.moveaxis(b, -1, -3)  # [..., C, H, W]
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a**2
    var_b = _filter_valid(b * b, kernel) - mu_b**2
    cov = _filter_valid(a * b, kernel) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(axis=(-3, -2, -1))


# ----------------------------------------------------------------------------------------------
# Anchor pull
# ----------------------------------------------------------------------------------------------


def frame_similarity(a, b, kind: str = "ssim") -> np.ndarray:
    """Similarity of images [..., H, W, 3] in [-1, 1]: "ssim" (see `ssim`) or "l1" = 1 - mean|a-b| / 2
    (1 identical, 0 opposite).  -> float64 [...]"""
    if kind == "ssim":
        return ssim(a, b)
    if kind == "l1":
        a, b = _broadcast_images(a, b)
        return 1.0 - np.mean(np.abs(a - b), axis=(-3, -2, -1)) / 2
    raise ValueError(f"kind={kind!r} is not 'ssim' or 'l1'")


def anchor_pull_curve(video, reference_video, kind: str = "ssim") -> np.ndarray:
    """Anchor pull at every frame: sim(video[t], video[0]) - sim(ref[t], ref[0]), with `sim` from
    `frame_similarity`. `reference_video` is the ground-truth clip of the same prompt; > 0 means the
    video stays closer to its first frame than the truth does (held back), < 0 means it moves away
    faster (e.g. drift). Zero at t = 0 by construction.
    video, reference_video: [T, H, W, 3] -> float64 [T]"""
    video, reference_video = _as_video(video), _as_video(reference_video, "reference_video")
    if video.shape != reference_video.shape:
        raise ValueError(f"video {video.shape} and reference_video {reference_video.shape} differ")
    own = frame_similarity(video, video[:1], kind)
    truth = frame_similarity(reference_video, reference_video[:1], kind)
    return own - truth


def anchor_pull(video, reference_video, kind: str = "ssim") -> float:
    """Anchor pull: the mean of `anchor_pull_curve` over frames t >= 1. Ground truth 0; a video
    frozen on its first frame scores 1 - mean_t sim(ref[t], ref[0]) (high).  [T, H, W, 3] x2 -> float"""
    curve = anchor_pull_curve(video, reference_video, kind)
    if curve.size < 2:
        raise ValueError("anchor_pull needs at least 2 frames")
    return float(curve[1:].mean())


# ----------------------------------------------------------------------------------------------
# Fidelity, flicker, quality drift
# ----------------------------------------------------------------------------------------------


def reference_crops(world: panworld.World, camera_x, start_time: float = 0.0) -> np.ndarray:
    """Ground-truth crop of `world` at each (decoded) position; frame t at time start_time + t (for
    the self-moving sprites).  camera_x: [T] -> float32 [T, H, W, 3]"""
    return panworld.render_clip(world, np.asarray(camera_x, np.float64), start_time)


def fidelity(video, world: panworld.World, camera_x=None, start_time: float = 0.0) -> dict[str, np.ndarray]:
    """Fidelity: is each frame a valid view of `world`? Frame t is compared with the ground-truth
    crop at its own decoded position (`camera_x`, decoded from the code band when None):
        psnr[t] = PSNR(video[t], crop(world, x_t, t)),  ssim[t] = SSIM(video[t], crop(world, x_t, t)).
    Only meaningful when the rollout shows `world` (e.g. it continues a ground-truth first chunk).
    video: [T, H, W, 3] -> {"psnr": [T], "ssim": [T], "camera_x": [T]}"""
    video = _as_video(video)
    if camera_x is None:
        camera_x = decoded_camera_x(video, world.config)
    camera_x = np.asarray(camera_x, np.float64)
    if camera_x.shape != video.shape[:1]:
        raise ValueError(f"camera_x {camera_x.shape} must be [T] with T = {video.shape[0]}")
    reference = reference_crops(world, camera_x, start_time)
    return {"psnr": psnr(video, reference), "ssim": ssim(video, reference), "camera_x": camera_x}


def _sample_columns(frames: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of `frames` [N, H, W, C] at fractional columns `positions` [N, W]
    (each within [0, W-1]).  -> [N, H, W, C]"""
    w = frames.shape[2]
    left = np.clip(np.floor(positions).astype(int), 0, w - 2)
    frac = (positions - left)[:, None, :, None]
    take = np.take_along_axis
    left_cols = take(frames, left[:, None, :, None], axis=2)
    right_cols = take(frames, left[:, None, :, None] + 1, axis=2)
    return (1 - frac) * left_cols + frac * right_cols


def flicker(video, camera_x) -> np.ndarray:
    """Flicker of every consecutive pair after removing the global (camera) motion.

    With s_t = camera_x[t] - camera_x[t-1] (the horizontal step, e.g. decoded), frame t-1 is resampled
    at columns j + s_t (linear interpolation) so that it shows what frame t should show, and
        flicker[t-1] = mean over channels, rows and the columns j with 0 <= j + s_t <= W - 1 of
                       |video[t][:, j] - video[t-1][:, j + s_t]|.
    Pairs whose step leaves no column in common give NaN. A ground-truth pan at integer speed scores
    ~0 (self-moving sprites aside); sub-pixel speeds leave a small interpolation floor.
    video: [T, H, W, 3], camera_x: [T] -> float64 [T-1]"""
    video = _as_video(video)
    camera_x = np.asarray(camera_x, np.float64)
    if camera_x.shape != video.shape[:1] or video.shape[0] < 2:
        raise ValueError(f"camera_x {camera_x.shape} must be [T] with T = {video.shape[0]} >= 2")
    t, _, w, _ = video.shape
    steps = np.diff(camera_x)  # [T-1]
    columns = np.arange(w)[None, :] + steps[:, None]  # [T-1, W]
    valid = (columns >= 0) & (columns <= w - 1)
    warped = _sample_columns(video[:-1], np.clip(columns, 0, w - 1))
    error = np.abs(video[1:] - warped).mean(axis=(1, 3))  # [T-1, W]
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(1), (error * valid).sum(1) / valid.sum(1), np.nan)


def quality_drift(per_frame, fraction: float = 0.15) -> float:
    """Quality drift of a per-frame score q [T] (e.g. fidelity PSNR, SSIM, code confidence):
        mean(q over the last n frames) - mean(q over the first n frames), n = max(1, ceil(fraction T)).
    Negative means the score got worse over the video for higher-is-better scores."""
    q = np.asarray(per_frame, np.float64)
    if q.ndim != 1 or q.size < 2:
        raise ValueError(f"per_frame must be [T] with T >= 2, got shape {q.shape}")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction={fraction} must be in (0, 0.5]")
    n = max(1, int(np.ceil(fraction * q.size)))
    return float(q[-n:].mean() - q[:n].mean())


# ----------------------------------------------------------------------------------------------
# DD-DIS: a dynamic-degree procedure with OpenCV DIS optical flow
# ----------------------------------------------------------------------------------------------

_DIS_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}  # cv2.DISOPTICAL_FLOW_PRESET_*


def dd_dis_sample_interval(fps: float) -> int:
    """Frame interval that samples a video at about 8 fps: max(1, round(fps / 8))."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be positive")
    return max(1, round(fps / 8))


def dd_dis_threshold(height: int, width: int, fps: float = 8.0) -> float:
    """Per-pair motion threshold in pixels: max(1, 8 / fps) * 6 * min(H, W) / 256 (0.75 px at 32x32,
    8 fps or more)."""
    if fps <= 0:
        raise ValueError(f"fps={fps} must be positive")
    return max(1.0, 8.0 / fps) * 6.0 * min(height, width) / 256.0


def dd_dis_required_pairs(num_sampled_frames: int) -> int:
    """Number of pairs that must exceed the threshold: round(4 * n / 16), n = number of sampled
    frames (Python's round, i.e. half to even)."""
    return round(4 * num_sampled_frames / 16)


def dd_dis_pair_flows(video, fps: float = 8.0, preset: str = "medium") -> np.ndarray:
    """The optical flow DD-DIS measures: the video is sampled every `dd_dis_sample_interval(fps)`
    frames, and each consecutive sampled pair gets dense DIS flow (OpenCV, `preset`) computed on the
    grey uint8 frames at native resolution; flow[p, y, x] = (dx, dy) in pixels, content moving from
    sampled frame p to p + 1.
    video: [T, H, W, 3] float in [-1, 1] or uint8 -> float32 [n_sampled - 1, H, W, 2]"""
    import cv2

    if preset not in _DIS_PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {list(_DIS_PRESETS)}")
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [T, H, W, 3], got shape {video.shape}")
    frames = video if video.dtype == np.uint8 else panworld.to_uint8(video)
    frames = frames[:: dd_dis_sample_interval(fps)]
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[preset])
    flows = [dis.calc(a, b, None) for a, b in zip(grey[:-1], grey[1:])]
    return np.stack(flows) if flows else np.zeros((0, *video.shape[1:3], 2), np.float32)


def dd_dis_flow_score(flow) -> np.ndarray:
    """The DD-DIS motion score of one flow field: the mean of its largest int(0.05 H W) (at least 1)
    flow magnitudes sqrt(dx^2 + dy^2), i.e. the top 5%.  [..., H, W, 2] -> float64 [...]"""
    flow = np.asarray(flow, np.float64)
    if flow.ndim < 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be [..., H, W, 2], got shape {flow.shape}")
    magnitude = np.sqrt((flow**2).sum(-1)).reshape(*flow.shape[:-3], -1)  # [..., H * W]
    top = max(1, int(magnitude.shape[-1] * 0.05))
    return np.sort(magnitude, axis=-1)[..., -top:].mean(axis=-1)


def dd_dis_pair_scores(video, fps: float = 8.0, preset: str = "medium") -> np.ndarray:
    """Per-pair motion scores of DD-DIS: `dd_dis_flow_score` of each flow of `dd_dis_pair_flows`,
    in pixels.

    Accuracy measured on 32x32 frames (tests/eval/test_metrics.py): the flow itself is within a few
    percent of a known translation, but the top-5% tail reads high, by up to ~10% on textured frames
    and occasionally by several times on large flat (textureless) regions, where DIS is ill-posed.
    video: [T, H, W, 3] float in [-1, 1] or uint8 -> float64 [n_sampled - 1]"""
    return dd_dis_flow_score(dd_dis_pair_flows(video, fps, preset))


def dd_dis_is_dynamic(video, fps: float = 8.0, preset: str = "medium") -> bool:
    """DD-DIS decision for one video: dynamic when at least `dd_dis_required_pairs(n_sampled)` of its
    `dd_dis_pair_scores` are strictly above `dd_dis_threshold(H, W, fps)` (and it has a pair)."""
    video = np.asarray(video)
    scores = dd_dis_pair_scores(video, fps, preset)
    if scores.size == 0:
        return False
    n_sampled = scores.size + 1
    threshold = dd_dis_threshold(video.shape[1], video.shape[2], fps)
    return int((scores > threshold).sum()) >= dd_dis_required_pairs(n_sampled)


def dd_dis(videos, fps: float = 8.0, preset: str = "medium") -> float:
    """DD-DIS score of a set of videos: the fraction judged dynamic by `dd_dis_is_dynamic`.
    videos: a sequence (or array [N, T, H, W, 3]) of videos."""
    decisions = [dd_dis_is_dynamic(v, fps, preset) for v in videos]
    if not decisions:
        raise ValueError("dd_dis needs at least one video")
    return float(np.mean(decisions))


# ----------------------------------------------------------------------------------------------
# Attention share
# ----------------------------------------------------------------------------------------------


def attention_share(attention_mass, slot_group, num_groups: int | None = None) -> np.ndarray:
    """Attention share per slot group: the fraction of the attention mass that each group of cache
    slots receives.

    Input format: `attention_mass[..., s]` >= 0 is the attention probability received by key slot s,
    summed (or averaged; only ratios matter) over heads, query tokens and the keys of that slot, one
    row per (chunk, layer): typically [num_chunks, num_layers, num_slots]. Slots that were masked out
    carry 0. `slot_group[s]` is the integer group of slot s (e.g. 0 anchor/state, 1 window,
    2 current chunk), in [0, num_groups).
        share[..., g] = sum_{s: group(s) = g} mass[..., s] / sum_s mass[..., s]
    Rows with zero total mass give NaN. Average over layers or chunks afterwards as needed.
    -> float64 [..., num_groups]"""
    mass = np.asarray(attention_mass, np.float64)
    groups = np.asarray(slot_group)
    if mass.ndim < 1 or groups.ndim != 1 or groups.shape[0] != mass.shape[-1]:
        raise ValueError(f"attention_mass [..., S] {mass.shape} and slot_group [S] {groups.shape} disagree")
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"slot_group must be integers, got {groups.dtype}")
    if (mass < 0).any():
        raise ValueError("attention_mass must be non-negative")
    num_groups = int(groups.max()) + 1 if num_groups is None else int(num_groups)
    if groups.min() < 0 or groups.max() >= num_groups:
        raise ValueError(f"slot_group values must lie in [0, num_groups={num_groups})")
    one_hot = np.eye(num_groups)[groups]  # [S, G]
    per_group = mass @ one_hot  # [..., G]
    total = per_group.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, per_group / np.where(total > 0, total, 1.0), np.nan)
