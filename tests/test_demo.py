"""The demo library: PanWorld prompt checks, the decoded-camera summary (progression ~1 on ground
truth, chunk by chunk equal to whole videos and to eval.metrics), frame strips, and a rollout."""

import dataclasses

import numpy as np
import pytest

from adastate_jax import demo
from adastate_jax.data import panworld
from adastate_jax.eval import metrics

PW = panworld.PanWorldConfig()
PROMPTS = panworld.camera_prompts(PW)


def clip(prompt: str, frames: int, index: int = 3):
    return panworld.make_clip(PW, index, num_frames=frames, label=PROMPTS.index(prompt))


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------


def test_check_prompt_normalises_and_lists_every_valid_prompt_when_refusing():
    assert demo.check_prompt("  Pan RIGHT   fast ") == "pan right fast"
    with pytest.raises(ValueError) as err:
        demo.check_prompt("pan up fast")
    message = str(err.value)
    assert message.startswith("--prompt='pan up fast' is not a PanWorld camera prompt")
    assert all(repr(p) in message for p in PROMPTS)


def test_prompt_table_embeds_checked_prompts_and_refuses_others():
    exp = demo.tiny_experiment()
    table = demo.prompt_table(exp, ["pan left slow", "Static"], batch=2)
    assert table.shape == (2, 2, exp.model.text_len, exp.model.text_dim)
    assert not np.allclose(table[0], table[1])
    with pytest.raises(ValueError, match="valid prompts: 'static'"):
        demo.prompt_table(exp, ["zoom in"])


# ----------------------------------------------------------------------------------------------
# decoded camera position and progression
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["pan right fast", "pan left slow", "back and forth"])
def test_ground_truth_clip_has_progression_one(prompt):
    c = clip(prompt, 60)
    tracker = demo.camera_summary(c["video"], prompt)
    assert tracker.progression == pytest.approx(1.0, abs=0.02)
    assert tracker.code_confidence > 0.9
    truth = panworld.unwrap_positions(c["camera_x"], PW.world_width)
    assert tracker.last_x - tracker.first_x == pytest.approx(truth[-1] - truth[0], abs=0.5)
    decoded = metrics.decoded_camera_x(c["video"], PW)
    assert tracker.progression == pytest.approx(
        float(metrics.progression_ratio(decoded, c["camera_x"], PW.world_width)), abs=1e-9
    )
    text = tracker.text()
    assert "decoded camera position: x" in text and "progression 1.00" in text


def test_chunk_by_chunk_tracking_equals_the_track_of_the_whole_video_when_the_coarse_band_drifts():
    # the stream's tracker and the evaluation's (`metrics.decoded_camera_x`) read the same motion,
    # also where per-frame decoding would jump a period (a coarse band drifting by up to 20 px)
    c = clip("pan right medium", 21)
    video = np.array(c["video"])
    rows, a = PW.code_rows, 2 * np.pi * np.linspace(0.0, 20.0, 21) / PW.world_width
    r, g = video[:, :rows, :, 0].copy(), video[:, :rows, :, 1].copy()
    video[:, :rows, :, 0] = np.cos(a)[:, None, None] * r - np.sin(a)[:, None, None] * g
    video[:, :rows, :, 1] = np.sin(a)[:, None, None] * r + np.cos(a)[:, None, None] * g
    tracker = demo.CameraTracker()
    for start in range(0, 21, 3):
        tracker.add(video[start : start + 3], "pan right medium")
    track = metrics.decoded_camera_x(video, PW)
    assert tracker.last_x - tracker.first_x == pytest.approx(track[-1] - track[0], abs=1e-6)
    assert tracker.progression == pytest.approx(1.0, abs=0.01)
    assert float(metrics.progression_ratio(track, c["camera_x"], PW.world_width)) == pytest.approx(
        1.0, abs=0.01
    )


def test_chunk_by_chunk_tracking_equals_the_whole_video():
    c = clip("back and forth", 57)
    whole = demo.camera_summary(c["video"], "back and forth")
    tracker = demo.CameraTracker()
    for start in range(0, 57, 3):
        tracker.add(c["video"][start : start + 3], "back and forth")
    a, b = tracker.summary(), whole.summary()
    assert a["frames"] == b["frames"] == 57 and len(a["segments"]) == len(b["segments"]) == 1
    for key in ("first_x", "last_x", "progression", "code_confidence"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    for key in ("requested", "along", "moved", "steps"):
        assert a["segments"][0][key] == pytest.approx(b["segments"][0][key], abs=1e-9), key


def test_prompt_switch_is_scored_per_segment_against_the_new_path():
    world = clip("static", 1)["world"]
    right = panworld.camera_positions(panworld.camera_path(PROMPTS.index("pan right fast"), PW), 100.0, 30)
    left = panworld.camera_positions(
        panworld.camera_path(PROMPTS.index("pan left slow"), PW), float(right[-1]), 31
    )[1:]
    video = panworld.render_clip(world, np.concatenate([right, left]))
    ids = np.repeat([0, 1], 30)
    tracker = demo.camera_summary(video, ["pan right fast", "pan left slow"], ids)
    first, second = tracker.segments
    assert (first.first_frame, first.frames, second.first_frame, second.frames) == (0, 30, 30, 30)
    assert first.progression == pytest.approx(1.0, abs=0.02)
    assert second.progression == pytest.approx(1.0, abs=0.05)
    assert second.requested == pytest.approx(30 * 0.5)
    assert tracker.progression == pytest.approx(1.0, abs=0.02)
    frozen = demo.camera_summary(np.repeat(video[:1], 60, axis=0), ["pan right fast", "pan left slow"], ids)
    assert frozen.progression == pytest.approx(0.0, abs=0.01)


def test_static_prompt_has_no_progression_and_noise_is_flagged():
    c = clip("static", 20)
    tracker = demo.camera_summary(c["video"], "static")
    assert np.isnan(tracker.progression) and "no motion requested" in tracker.text()
    noise = np.random.default_rng(0).uniform(-1, 1, (12, 32, 32, 3))
    assert "low code confidence" in demo.camera_summary(noise, "pan right fast").text()


# ----------------------------------------------------------------------------------------------
# pictures and a rollout
# ----------------------------------------------------------------------------------------------


def test_frame_strip_picks_every_kth_frame_upscaled(tmp_path):
    video = clip("pan right medium", 20)["video"]
    strip = demo.frame_strip(video, every=5, min_size=64, gap=2)
    assert strip.dtype == np.uint8 and strip.shape == (64 + 16, 4 * 64 + 3 * 2, 3)
    np.testing.assert_array_equal(strip[:64, 66:130], demo.viewable(video[5:6], 64)[0])
    import imageio.v2 as imageio

    path = demo.write_frame_strip(str(tmp_path / "strip.png"), video, every=10, min_size=32, label=False)
    np.testing.assert_array_equal(
        imageio.imread(path)[..., :3], demo.frame_strip(video, 10, min_size=32, label=False)
    )


def test_roll_out_decodes_frames_state_and_prompt_of_every_frame():
    exp = demo.tiny_experiment()
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, num_layers=1))
    student = demo.random_students(exp, ["adastate"])[0]
    run = demo.roll_out(student, ["pan right fast", "static"], 3, switches={2: 1}, instrument=True)
    t = 3 * exp.stream.chunk_frames
    h = exp.stream.latent_h * exp.vae.patch.patch
    assert run.frames.shape == (t, h, h, 3) and run.frames_per_chunk == exp.stream.chunk_frames
    assert run.state.shape == (3 * exp.stream.state_frames, h, h, 3)
    np.testing.assert_array_equal(run.frame_prompt, np.repeat([0, 0, 1], exp.stream.chunk_frames))
    assert run.attention.shape == (3, 1, 3)
    np.testing.assert_allclose(run.attention.sum(-1), 1.0, rtol=1e-5)


def test_with_state_puts_each_chunks_state_beside_its_frames():
    frames = np.full((3, 4, 5, 3), 0.5, np.float32)
    state = np.stack([np.full((4, 5, 3), -0.5, np.float32)])
    out = demo.with_state(frames, state, gap=2)
    assert out.shape == (3, 4, 12, 3)
    np.testing.assert_array_equal(out[:, :, :5], frames)
    np.testing.assert_array_equal(out[:, :, 7:], np.repeat(state, 3, axis=0))
    two = demo.with_state(
        np.zeros((4, 4, 5, 3), np.uint8), np.stack([np.zeros((4, 5, 3)), np.ones((4, 5, 3))])
    )
    assert two.dtype == np.uint8 and (two[:2, :, 7:] == 128).all() and (two[2:, :, 7:] == 255).all()
    with pytest.raises(ValueError, match="with_state"):
        demo.with_state(frames, np.zeros((1, 4, 4, 3)))
