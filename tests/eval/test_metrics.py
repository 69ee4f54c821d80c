"""Metric validation on inputs whose answer is known: ground truth, frozen videos, snap-backs,
known noise, frames warped by known shifts."""

import dataclasses

import chex
import cv2
import numpy as np
import pytest

from adastate_jax.data import panworld as pw
from adastate_jax.eval import metrics as M

CONFIG = pw.PanWorldConfig(num_frames=42)
WW, FW = CONFIG.world_width, CONFIG.frame_width
PAN_RIGHT_MEDIUM, PAN_RIGHT_FAST, BACK_AND_FORTH = 5, 6, 7


def _clip(label, index=3, num_frames=42, config=CONFIG):
    return pw.make_clip(config, index, num_frames=num_frames, label=label)


def _frozen(video):
    return np.repeat(video[:1], len(video), axis=0)


def _texture(shift_x, shift_y=0.0, seed=0, size=32, components=24, max_cycles_per_px=0.15):
    """Band-limited random texture sampled at (x + shift_x, y + shift_y): an exact sub-pixel
    translation with no resampling (content moves left/up by the shift).  -> uint8 [size, size, 3]"""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for _ in range(components):
        fx, fy = rng.uniform(-max_cycles_per_px, max_cycles_per_px, 2)
        image += np.cos(2 * np.pi * (fx * (x + shift_x) + fy * (y + shift_y)) + rng.uniform(0, 2 * np.pi))
    grey = np.clip(128 + 50 * image / np.sqrt(components / 2), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _translating_video(step_x, num_frames, step_y=0.0, seed=0, moving=None):
    """Frames of a texture translating by (step_x, step_y) px per frame; `moving[t]` False freezes
    the step into frame t+1.  -> uint8 [T, 32, 32, 3]"""
    moving = np.ones(num_frames - 1, bool) if moving is None else np.asarray(moving)
    offsets = np.concatenate([[0.0], np.cumsum(moving)])
    return np.stack([_texture(o * step_x, o * step_y, seed) for o in offsets])


# ------------------------------------------------------------------------------ progression


@pytest.mark.parametrize("label", range(1, 8))
def test_progression_ratio_is_one_for_ground_truth(label):
    clip = _clip(label)
    decoded = M.decoded_camera_x(clip["video"], CONFIG)
    np.testing.assert_allclose(M.progression_ratio(decoded, clip["camera_x"], WW), 1.0, atol=1e-3)


def test_progression_ratio_is_zero_for_a_frozen_first_frame_and_nan_for_static():
    clip = _clip(PAN_RIGHT_FAST)
    decoded = M.decoded_camera_x(_frozen(clip["video"]), CONFIG)
    np.testing.assert_allclose(M.progression_ratio(decoded, clip["camera_x"], WW), 0.0, atol=1e-6)
    static = _clip(0)
    assert np.isnan(M.progression_ratio(static["camera_x"], static["camera_x"], WW))


def test_progression_ratio_measures_half_speed_backwards_and_works_in_batches():
    clip = _clip(PAN_RIGHT_FAST)
    x0, truth = clip["camera_x"][0], clip["camera_x"]
    half = pw.render_clip(clip["world"], x0 + (truth - x0) / 2)
    backwards = pw.render_clip(clip["world"], x0 - (truth - x0))
    decoded = np.stack([M.decoded_camera_x(v, CONFIG) for v in (half, backwards)])  # [2, T]
    ratios = M.progression_ratio(decoded, np.stack([truth, truth]), WW)
    chex.assert_shape(ratios, (2,))
    np.testing.assert_allclose(ratios, [0.5, -1.0], atol=1e-3)


def test_progression_ratio_survives_crossing_the_world_seam():
    truth = np.arange(42, dtype=np.float64) * 2.0 + 1000.0  # crosses x = 1024
    assert M.progression_ratio(np.mod(truth, WW), truth, WW) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ anchor pull


@pytest.mark.parametrize("kind", ["ssim", "l1"])
def test_anchor_pull_is_zero_for_ground_truth_and_high_for_a_frozen_first_frame(kind):
    clip = _clip(PAN_RIGHT_MEDIUM)
    video = clip["video"]
    curve = M.anchor_pull_curve(video, video, kind)
    chex.assert_shape(curve, (42,))
    np.testing.assert_allclose(curve, 0.0, atol=1e-12)
    frozen_pull = M.anchor_pull(_frozen(video), video, kind)
    assert frozen_pull > {"ssim": 0.5, "l1": 0.05}[kind]
    x0, truth = clip["camera_x"][0], clip["camera_x"]
    half = pw.render_clip(clip["world"], x0 + (truth - x0) / 2)
    assert 0.0 < M.anchor_pull(half, video, kind) < frozen_pull
    # A frozen video of another world: its own frames are all alike, whatever the reference shows.
    other = _frozen(_clip(PAN_RIGHT_MEDIUM, index=11)["video"])
    truth_similarity = M.frame_similarity(video[1:], video[:1], kind).mean()
    assert M.anchor_pull(other, video, kind) == pytest.approx(1.0 - truth_similarity)


# ------------------------------------------------------------------------------ return to start


def _snap_back_video(clip, snap_at, back_by):
    """The clip's pan until frame `snap_at`, then the camera jumps back by `back_by` px and holds."""
    x = clip["camera_x"].astype(np.float64).copy()
    x[snap_at:] = x[snap_at - 1] - back_by
    return pw.render_clip(clip["world"], x)


def test_return_to_start_catches_a_pan_that_snaps_back():
    clip = _clip(PAN_RIGHT_FAST)
    truth_decoded = M.decoded_camera_x(clip["video"], CONFIG)
    snapped = M.decoded_camera_x(_snap_back_video(clip, 20, back_by=38.0), CONFIG)  # to the start
    small = M.decoded_camera_x(_snap_back_video(clip, 20, back_by=FW / 4 - 1), CONFIG)
    large = M.decoded_camera_x(_snap_back_video(clip, 20, back_by=FW / 4 + 1), CONFIG)
    assert not M.returned_to_start(truth_decoded, +1, FW, WW)
    assert M.returned_to_start(snapped, +1, FW, WW)
    assert not M.returned_to_start(small, +1, FW, WW)
    assert M.returned_to_start(large, +1, FW, WW)
    # Told to pan left, the ground-truth rightward pan is all retreat.
    assert M.returned_to_start(truth_decoded, -1, FW, WW)


def test_return_to_start_rate_counts_only_pan_prompts():
    clip = _clip(PAN_RIGHT_FAST)
    truth = M.decoded_camera_x(clip["video"], CONFIG)
    snapped = M.decoded_camera_x(_snap_back_video(clip, 20, back_by=38.0), CONFIG)
    tracks = np.stack([truth, snapped, snapped, truth, snapped])
    directions = np.array([1, 1, 1, 1, 0])  # the last is static / back-and-forth: skipped
    assert M.return_to_start_rate(tracks, directions, FW, WW) == pytest.approx(0.5)
    assert np.isnan(M.return_to_start_rate(tracks[:1], [0], FW, WW))
    with pytest.raises(ValueError, match="direction"):
        M.returned_to_start(truth, 0, FW, WW)


# ------------------------------------------------------------------------------ PSNR / SSIM


def _reference_ssim(a, b, data_range=2.0):
    """SSIM through OpenCV's Gaussian blur, cropped to the positions a full 11x11 window covers."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5)[5:-5, 5:-5]

    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_of_identical_images_are_inf_and_one():
    video = _clip(PAN_RIGHT_FAST, num_frames=4)["video"]
    assert np.all(np.isinf(M.psnr(video, video)))
    np.testing.assert_allclose(M.ssim(video, video), 1.0, atol=1e-12)


def test_psnr_and_ssim_of_known_noise():
    rng = np.random.default_rng(0)
    frame = _clip(PAN_RIGHT_FAST, num_frames=1)["video"][0].astype(np.float64)
    noise = rng.choice([-0.1, 0.1], size=frame.shape)  # |noise| = 0.1 everywhere: MSE = 0.01
    assert M.psnr(frame + noise, frame) == pytest.approx(10 * np.log10(4 / 0.01))
    for sigma in (0.05, 0.2):
        noisy = frame + sigma * rng.standard_normal(frame.shape)
        assert M.ssim(noisy, frame) == pytest.approx(_reference_ssim(noisy, frame), abs=1e-9)
    weak, strong = (M.ssim(frame + s * rng.standard_normal(frame.shape), frame) for s in (0.05, 0.2))
    assert 1.0 > weak > strong > 0.0


def test_ssim_of_a_flat_image_with_an_offset_has_its_closed_form():
    m, c, l = 0.2, 0.3, 2.0
    a, b = np.full((16, 16, 3), m), np.full((16, 16, 3), m + c)
    c1 = (0.01 * l) ** 2
    expected = (2 * m * (m + c) + c1) / (m**2 + (m + c) ** 2 + c1)  # variances and covariance are 0
    assert M.ssim(a, b) == pytest.approx(expected)


# ------------------------------------------------------------------------------ fidelity, flicker, drift


def test_fidelity_of_ground_truth_is_near_perfect_and_noise_lowers_it():
    clip = _clip(PAN_RIGHT_MEDIUM, num_frames=16)
    scores = M.fidelity(clip["video"], clip["world"])
    chex.assert_shape(scores["psnr"], (16,))
    assert scores["psnr"].min() > 60 and scores["ssim"].min() > 0.9999
    np.testing.assert_allclose(scores["camera_x"], clip["camera_x"], atol=0.01)
    noisy = clip["video"] + np.random.default_rng(0).choice([-0.1, 0.1], size=clip["video"].shape)
    noisy_scores = M.fidelity(noisy, clip["world"], camera_x=clip["camera_x"])
    np.testing.assert_allclose(noisy_scores["psnr"], 10 * np.log10(4 / 0.01), atol=0.2)  # clipping aside


def test_flicker_is_zero_for_a_ground_truth_pan_and_catches_brightness_flashes():
    config = dataclasses.replace(CONFIG, num_moving_sprites=0)
    clip = _clip(PAN_RIGHT_FAST, config=config, num_frames=20)
    video = 0.8 * clip["video"]  # keep +-0.1 flashes inside [-1, 1]
    np.testing.assert_allclose(M.flicker(video, clip["camera_x"]), 0.0, atol=1e-6)
    assert M.flicker(video, np.zeros(20)).mean() > 0.02  # motion not removed: not zero
    flashes = 0.1 * (-1.0) ** np.arange(20)
    np.testing.assert_allclose(
        M.flicker(video + flashes[:, None, None, None], clip["camera_x"]), 0.2, atol=1e-6
    )


def test_quality_drift_compares_the_last_and_first_fifteen_percent():
    per_frame = np.arange(21, dtype=np.float64) ** 2  # n = ceil(0.15 * 21) = 4
    expected = np.mean([17**2, 18**2, 19**2, 20**2]) - np.mean([0, 1, 4, 9])
    assert M.quality_drift(per_frame) == pytest.approx(expected)
    assert M.quality_drift(np.ones(7)) == 0.0


# ------------------------------------------------------------------------------ DD-DIS


SHIFTS = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0]


@pytest.mark.parametrize("shift", SHIFTS)
def test_dd_dis_flow_is_within_five_percent_of_a_known_shift(shift):
    for seed in range(3):
        for step_x, step_y in ((shift, 0.0), (shift / np.sqrt(2), shift / np.sqrt(2)), (0.0, -shift)):
            flows = M.dd_dis_pair_flows(_translating_video(step_x, 3, step_y, seed))  # [2, 32, 32, 2]
            chex.assert_shape(flows, (2, 32, 32, 2))
            # Content moves by -step (frame t+1 samples the texture at x + step).
            np.testing.assert_allclose(np.median(flows[..., 0], axis=(1, 2)), -step_x, atol=0.05 * shift)
            np.testing.assert_allclose(np.median(flows[..., 1], axis=(1, 2)), -step_y, atol=0.05 * shift)
            magnitude = np.sqrt((flows.astype(np.float64) ** 2).sum(-1))
            np.testing.assert_allclose(np.median(magnitude, axis=(1, 2)), shift, rtol=0.05)


@pytest.mark.parametrize("shift", [s for s in SHIFTS if s <= 2.0])  # beyond, the entering edge weighs in
def test_dd_dis_pair_score_tracks_a_known_shift_reading_at_most_twelve_percent_high(shift):
    for seed in range(3):
        for step_x, step_y in ((shift, 0.0), (shift / np.sqrt(2), shift / np.sqrt(2))):
            scores = M.dd_dis_pair_scores(_translating_video(step_x, 3, step_y, seed))
            assert np.all(scores >= 0.97 * shift) and np.all(scores <= 1.12 * shift), scores / shift


def test_dd_dis_pair_score_is_exact_for_integer_panworld_pans():
    config = dataclasses.replace(CONFIG, num_moving_sprites=0)
    clip = _clip(PAN_RIGHT_MEDIUM, config=config, num_frames=6)
    np.testing.assert_allclose(M.dd_dis_pair_scores(clip["video"]), 1.0, rtol=0.05)


def test_dd_dis_flow_score_is_the_mean_of_the_top_five_percent_of_magnitudes():
    magnitude = np.random.default_rng(0).permutation(1024).astype(np.float64).reshape(32, 32)
    angle = np.random.default_rng(1).uniform(0, 2 * np.pi, (32, 32))
    flow = np.stack([magnitude * np.cos(angle), magnitude * np.sin(angle)], axis=-1)  # [32, 32, 2]
    top = np.arange(1024 - 51, 1024)  # int(0.05 * 1024) = 51 largest magnitudes
    assert M.dd_dis_flow_score(flow) == pytest.approx(top.mean())
    chex.assert_shape(M.dd_dis_flow_score(np.stack([flow, flow])), (2,))


def test_dd_dis_procedure_constants():
    assert M.dd_dis_threshold(32, 48) == pytest.approx(0.75)
    assert M.dd_dis_threshold(480, 832) == pytest.approx(11.25)
    assert M.dd_dis_threshold(32, 32, fps=4.0) == pytest.approx(1.5)  # slow video: bigger steps
    assert [M.dd_dis_sample_interval(f) for f in (4, 8, 16, 24, 30)] == [1, 1, 2, 3, 4]
    assert [M.dd_dis_required_pairs(n) for n in (2, 10, 16, 21, 81)] == [0, 2, 4, 5, 20]


def test_dd_dis_decisions_just_below_and_above_the_threshold():
    threshold = M.dd_dis_threshold(32, 32)
    below = _translating_video(0.9 * threshold, 16)
    above = _translating_video(1.1 * threshold, 16)
    assert not M.dd_dis_is_dynamic(below)
    assert M.dd_dis_is_dynamic(above)
    assert M.dd_dis([below, above, above, _translating_video(0.0, 16)]) == pytest.approx(0.5)


def test_dd_dis_count_rule_needs_a_quarter_of_the_sampled_frames_to_move():
    moving_pairs = np.zeros(15, bool)  # 16 frames: round(4 * 16 / 16) = 4 pairs must move
    moving_pairs[[2, 7, 11]] = True
    assert not M.dd_dis_is_dynamic(_translating_video(1.5, 16, moving=moving_pairs))
    moving_pairs[13] = True
    assert M.dd_dis_is_dynamic(_translating_video(1.5, 16, moving=moving_pairs))


def test_dd_dis_samples_high_fps_video_at_about_eight_fps():
    video = _translating_video(0.5, 25)  # 0.5 px per frame at 24 fps = 1.5 px per sampled pair
    flows = M.dd_dis_pair_flows(video, fps=24.0)
    chex.assert_shape(flows, (8, 32, 32, 2))
    np.testing.assert_allclose(np.median(flows[..., 0], axis=(1, 2)), -1.5, rtol=0.05)
    assert not M.dd_dis_is_dynamic(video, fps=8.0) and M.dd_dis_is_dynamic(video, fps=24.0)


def test_dd_dis_on_panworld_fast_pan_is_dynamic_and_static_camera_is_not():
    config = dataclasses.replace(CONFIG, num_moving_sprites=0)
    assert M.dd_dis_is_dynamic(_clip(PAN_RIGHT_FAST, config=config, num_frames=16)["video"])
    assert not M.dd_dis_is_dynamic(_clip(0, config=config, num_frames=16)["video"])


# ------------------------------------------------------------------------------ attention share


def test_attention_share_per_slot_group():
    # [chunks=2, layers=1, slots=5]; slots: anchor, window, window, current, current
    mass = np.array([[[4.0, 1.0, 1.0, 1.0, 1.0]], [[0.0, 2.0, 2.0, 3.0, 3.0]]])
    share = M.attention_share(mass, np.array([0, 1, 1, 2, 2]), num_groups=3)
    chex.assert_shape(share, (2, 1, 3))
    np.testing.assert_allclose(share[0, 0], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(share[1, 0], [0.0, 0.4, 0.6])
    assert np.all(np.isnan(M.attention_share(np.zeros((1, 5)), np.array([0, 1, 1, 2, 2]))))
    with pytest.raises(ValueError, match="slot_group"):
        M.attention_share(mass, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        M.attention_share(-mass, np.array([0, 1, 1, 2, 2]))


def test_metrics_reject_malformed_videos():
    with pytest.raises(ValueError, match="video"):
        M.anchor_pull(np.zeros((4, 32, 32)), np.zeros((4, 32, 32)))
    with pytest.raises(ValueError, match="camera_x"):
        M.flicker(np.zeros((4, 32, 32, 3)), np.zeros(3))
