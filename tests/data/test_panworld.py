"""Specification of PanWorld: determinism, camera paths, the position code, sprites, the grain source."""

import dataclasses
import pickle

import chex
import cv2
import grain
import numpy as np
import pytest

from adastate_jax.data import panworld as pw

CONFIG = pw.PanWorldConfig(num_frames=12, num_clips=64)


def _wrapped_error(decoded, truth, world_width):
    return np.abs(np.mod(np.asarray(decoded) - truth + world_width / 2, world_width) - world_width / 2)


def test_clip_is_deterministic_in_seed_and_index():
    a, b = pw.make_clip(CONFIG, 7), pw.make_clip(CONFIG, 7)
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["camera_x"], b["camera_x"])
    other_index = pw.make_clip(CONFIG, 7 + CONFIG.num_labels)  # same label, other world
    other_seed = pw.make_clip(dataclasses.replace(CONFIG, seed=1), 7)
    assert a["label"] == other_index["label"] == other_seed["label"]
    assert not np.allclose(a["video"], other_index["video"])
    assert not np.allclose(a["video"], other_seed["video"])


def test_longer_clip_extends_the_same_clip():
    short = pw.make_clip(CONFIG, 5, num_frames=10)
    long = pw.make_clip(CONFIG, 5, num_frames=80)  # any length: 8x a 10-frame horizon
    chex.assert_shape(long["video"], (80, 32, 32, 3))
    np.testing.assert_array_equal(long["video"][:10], short["video"])
    np.testing.assert_array_equal(long["camera_x"][:10], short["camera_x"])


def test_frames_are_float32_in_unit_range_and_uint8_round_trips():
    video = pw.make_clip(CONFIG, 3)["video"]
    chex.assert_type(video, np.float32)
    assert video.min() >= -1.0 and video.max() <= 1.0
    np.testing.assert_allclose(pw.to_float(pw.to_uint8(video)), video, atol=1 / 127.5)
    with pytest.raises(ValueError, match="uint8"):
        pw.to_float(video)


def test_camera_paths_follow_their_prompts():
    prompts = pw.camera_prompts(CONFIG)
    assert prompts[0] == "static" and prompts[-1] == "back and forth"
    assert len(prompts) == CONFIG.num_labels == 8
    for label, prompt in enumerate(prompts):
        x = pw.camera_positions(pw.camera_path(label, CONFIG), 100.0, 49)
        steps = np.diff(x)
        if prompt == "static":
            np.testing.assert_array_equal(steps, 0)
        elif prompt.startswith("pan"):
            speed = dict(zip(CONFIG.speed_words, CONFIG.speeds))[prompt.split()[-1]]
            sign = 1 if "right" in prompt else -1
            np.testing.assert_allclose(steps, sign * speed)
            assert pw.requested_direction(label, CONFIG) == sign
        else:  # back and forth: rightwards for half a period, then back to the start
            h = CONFIG.back_and_forth_half_period
            np.testing.assert_allclose(steps[:h], CONFIG.back_and_forth_speed)
            np.testing.assert_allclose(steps[h : 2 * h], -CONFIG.back_and_forth_speed)
            assert x[2 * h] == x[0]
        assert pw.prompt_to_label(prompt, CONFIG) == label


def test_prompt_vocabulary_encodes_every_prompt():
    vocab = pw.prompt_vocabulary(CONFIG)
    assert vocab[0] == pw.PAD_WORD and len(set(vocab)) == len(vocab)
    for prompt in pw.camera_prompts(CONFIG):
        ids = pw.prompt_to_ids(prompt, CONFIG)
        chex.assert_shape(ids, (CONFIG.max_prompt_words,))
        assert " ".join(vocab[i] for i in ids if i) == prompt
    with pytest.raises(ValueError, match="vocabulary"):
        pw.prompt_to_ids("zoom in", CONFIG)


@pytest.mark.parametrize("index", range(8))
def test_decode_position_recovers_ground_truth(index):
    clip = pw.make_clip(CONFIG, index, num_frames=40)
    decoded = pw.decode_position(clip["video"], CONFIG)
    assert _wrapped_error(decoded, clip["camera_x"], CONFIG.world_width).max() < 0.01


def test_decode_position_sub_pixel_anywhere_in_the_world_including_the_seam():
    world = pw.make_world(CONFIG, 123)
    xs = np.concatenate([np.linspace(-40.0, CONFIG.world_width + 40.0, 97), [1023.3, 1023.75, -0.25]])
    frames = np.stack([pw.render_view(world, x) for x in xs])
    decoded, confidence = pw.decode_position(frames, CONFIG, return_confidence=True)
    assert _wrapped_error(decoded, xs, CONFIG.world_width).max() < 0.01
    assert confidence.min() > 0.95
    assert np.all((decoded >= 0) & (decoded < CONFIG.world_width))


def test_decode_position_survives_mild_noise_blur_and_uint8():
    rng = np.random.default_rng(0)
    clip = pw.make_clip(CONFIG, 6, num_frames=60)  # pan right fast
    video, truth = clip["video"], clip["camera_x"]
    noisy = video + 0.1 * rng.standard_normal(video.shape).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in video])
    for frames, tolerance in ((noisy, 0.5), (blurred, 0.5), (pw.to_uint8(video), 0.05)):
        assert _wrapped_error(pw.decode_position(frames, CONFIG), truth, CONFIG.world_width).max() < tolerance


def test_decode_confidence_flags_frames_without_a_code():
    rng = np.random.default_rng(1)
    garbage = rng.uniform(-1, 1, (20, 32, 32, 3)).astype(np.float32)
    _, confidence = pw.decode_position(garbage, CONFIG, return_confidence=True)
    assert confidence.max() < 0.5


def _drift_coarse_band(video, px):
    """The coarse band of each frame rotated as if read `px[t]` pixels further right: the error a
    generator makes when its coarse-band colours are off by a few hundredths."""
    out = np.array(video, np.float32)
    rows = CONFIG.code_rows
    for t, d in enumerate(px):
        a = 2 * np.pi * d / CONFIG.world_width
        r, g = out[t, :rows, :, 0].copy(), out[t, :rows, :, 1].copy()
        out[t, :rows, :, 0] = np.cos(a) * r - np.sin(a) * g
        out[t, :rows, :, 1] = np.sin(a) * r + np.cos(a) * g
    return out


@pytest.mark.parametrize("index", [1, 3, 6, 7])  # left slow, left fast, right fast, back and forth
def test_track_positions_equals_the_unwrapped_per_frame_decoding_on_rendered_clips(index):
    clip = pw.make_clip(CONFIG, index, num_frames=60)
    track = pw.track_positions(clip["video"], CONFIG)
    per_frame = pw.unwrap_positions(pw.decode_position(clip["video"], CONFIG), CONFIG.world_width)
    np.testing.assert_allclose(track, per_frame, atol=1e-6)
    np.testing.assert_allclose(track - track[0], clip["camera_x"] - clip["camera_x"][0], atol=0.01)


def test_track_is_not_fooled_by_a_drifting_coarse_band_that_flips_per_frame_decoding():
    # a slow left pan whose coarse band drifts up to ~25 px off (teacher rollouts: 5-15 px): per-frame
    # decoding jumps by a whole fine period (32 px) where the drift crosses half a period from the
    # truth's phase; the track follows the fine band and keeps the truth's motion
    clip = pw.make_clip(CONFIG, 1, num_frames=21)
    truth = clip["camera_x"] - clip["camera_x"][0]
    rng = np.random.default_rng(0)
    drift = np.linspace(0.0, 22.0, 21) + rng.uniform(-4, 4, 21)  # past 16 px in the last frames
    video = _drift_coarse_band(clip["video"], drift)
    per_frame = pw.unwrap_positions(pw.decode_position(video, CONFIG), CONFIG.world_width)
    track = pw.track_positions(video, CONFIG)
    assert np.abs(np.diff(per_frame)).max() > 16  # the old reading: a jump of a period
    np.testing.assert_allclose(track - track[0], truth, atol=0.01)
    # the absolute place: the period most frames agree with (their median drift is ~11 px < 16)
    assert _wrapped_error(track[0], clip["camera_x"][0], CONFIG.world_width) < 0.01


def test_track_measures_a_jump_longer_than_half_a_period():
    # a 38 px snap back between two frames: the fine band alone would read +26 px (38 mod 32 aliased),
    # the coarse band supplies the whole period
    world = pw.make_world(CONFIG, 5)
    xs = np.array([100.0, 101.0, 102.0, 103.0, 65.0, 66.0, 67.0])
    frames = np.stack([pw.render_view(world, x) for x in xs])
    np.testing.assert_allclose(pw.track_positions(frames, CONFIG), xs, atol=0.01)
    steps = pw.camera_steps(*pw.decode_bands(frames, CONFIG)[:2], CONFIG)
    np.testing.assert_allclose(steps, np.diff(xs), atol=0.01)


def test_unwrap_positions_follows_the_camera_across_the_seam():
    truth = np.arange(1000.0, 1100.0, 2.0)
    np.testing.assert_allclose(pw.unwrap_positions(np.mod(truth, 1024), 1024), truth)


def test_render_view_is_periodic_in_the_world_width():
    world = pw.make_world(CONFIG, 5)
    for x in (-7.5, 0.0, 1020.25):
        np.testing.assert_allclose(
            pw.render_view(world, x, 3.0), pw.render_view(world, x + CONFIG.world_width, 3.0), atol=1e-5
        )


def test_code_band_and_its_margin_are_never_covered_by_sprites():
    band = CONFIG.sprite_top
    clip = pw.make_clip(CONFIG, 9, num_frames=200)
    world = clip["world"]
    band_only = dataclasses.replace(world, static_image=world.background, moving_rgba=world.moving_rgba * 0)
    reference = pw.render_clip(band_only, clip["camera_x"])
    np.testing.assert_allclose(clip["video"][:, :band], reference[:, :band], atol=1e-6)


def test_static_sprites_enter_and_leave_a_panning_view():
    config = dataclasses.replace(CONFIG, num_moving_sprites=0)
    clip = pw.make_clip(config, 6, num_frames=64)  # pan right fast: 128 px of world
    world = clip["world"]
    background = dataclasses.replace(world, static_image=world.background)
    seen = [set(pw.sprites_in_view(world, x)) for x in clip["camera_x"]]
    assert seen[0] != seen[-1]
    assert any(s - seen[0] for s in seen), "no sprite entered"
    assert any(seen[0] - s for s in seen), "no sprite left"
    s, w = config.sprite_size, config.frame_width
    for x, frame, visible in zip(clip["camera_x"], clip["video"], seen):
        differs = np.abs(frame - pw.render_view(background, x)).max() > 0.05
        offsets = np.mod(world.static_sprite_xy[:, 0] - x, config.world_width)
        wholly_inside = bool(np.any(offsets <= w - s))
        assert differs or not wholly_inside, (x, "a sprite inside the view was not drawn")
        assert visible or not differs, (x, "the view differs from the background with no sprite in it")


def test_moving_sprites_move_while_the_camera_stands_still():
    config = dataclasses.replace(CONFIG, num_static_sprites=0, num_moving_sprites=1)
    world = pw.make_world(config, 11)
    x = float(world.moving_x0[0]) - 10.0  # sprite in view at t = 0
    assert ("moving", 0) in pw.sprites_in_view(world, x, 0.0)
    first, later = pw.render_view(world, x, 0.0), pw.render_view(world, x, 8.0)
    assert np.abs(first - later).max() > 0.1
    still = dataclasses.replace(world, moving_rgba=world.moving_rgba * 0)
    np.testing.assert_array_equal(pw.render_view(still, x, 0.0), pw.render_view(still, x, 8.0))


def test_grain_source_records_batch_with_map_dataset_and_data_loader():
    source = pw.PanWorldSource(CONFIG)
    assert len(source) == CONFIG.num_clips
    record = source[3]
    chex.assert_shape(record["video"], (12, 32, 32, 3))
    chex.assert_shape(record["camera_x"], (12,))
    assert record["prompt"].dtype == np.dtype(f"S{CONFIG.max_prompt_bytes}")
    assert record["prompt"].item().decode() == pw.camera_prompts(CONFIG)[int(record["label"])]
    restored = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(restored[3]["video"], record["video"])

    batch = grain.MapDataset.source(source).batch(4)[0]
    chex.assert_shape(batch["video"], (4, 12, 32, 32, 3))
    np.testing.assert_array_equal(batch["label"], np.arange(4, dtype=np.int32))

    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.samplers.IndexSampler(num_records=8, shuffle=True, seed=0, num_epochs=1),
        operations=[grain.transforms.Batch(batch_size=4, drop_remainder=True)],
        worker_count=0,
    )
    batches = list(loader)
    assert len(batches) == 2
    chex.assert_shape(batches[0]["prompt_ids"], (4, CONFIG.max_prompt_words))
    np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in batches])), np.arange(8))
    with pytest.raises(IndexError):
        source[CONFIG.num_clips]


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(code_period=30), "code_period"),
        (dict(speeds=(1.0,)), "speed_words"),
        (dict(world_width=64), "world_width"),
        (dict(sprite_size=30), "sprite_size"),
    ],
)
def test_config_rejects_inconsistent_values(override, message):
    with pytest.raises(ValueError, match=message):
        pw.PanWorldConfig(**override)


def test_views_agree_where_they_overlap_including_sprites_cut_by_the_frame_edge():
    config = dataclasses.replace(CONFIG, num_static_sprites=4, num_moving_sprites=8)
    world = pw.make_world(config, 21)
    k = 7  # the view at x + k shows columns k.. of the view at x
    for x in np.concatenate(
        [world.moving_x0 - 3.25, world.moving_x0 + 5.5, world.static_sprite_xy[:, 0] + 2]
    ):
        for t in (0.0, 13.0):
            near, shifted = pw.render_view(world, x, t), pw.render_view(world, x + k, t)
            np.testing.assert_allclose(shifted[:, : config.frame_width - k], near[:, k:], atol=1e-5)
