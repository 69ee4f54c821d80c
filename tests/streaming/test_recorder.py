"""A rollout written as it is made: files checked before work, a lazy prompt schedule, every chunk
in the video and the records, a stop that keeps what was written, the state decoded as a stream."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import video
from adastate_jax.models import vae, wan
from adastate_jax.streaming import recorder, writers
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.decoders import decoder_from_module
from adastate_jax.streaming.rollout import ChunkOut, Streamer, attention_shares, prompt_schedule
from adastate_jax.streaming.sampler import SamplerConfig

pytest.importorskip("imageio_ffmpeg")
LAT = 4


# ---------------------------------------------------------------------------------------------
# files and schedule (no model)
# ---------------------------------------------------------------------------------------------
def test_a_video_that_is_not_mp4_or_gif_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "new" / "v.txt"
    with pytest.raises(ValueError, match=r"--out=.*v\.txt: the video must end in one of \.mp4, \.gif"):
        recorder.rollout_files(str(out))
    assert not (tmp_path / "new").exists()


def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the folder should be (fails for root too)
    with pytest.raises(ValueError, match="cannot write in the folder"):
        recorder.rollout_files(str(blocker / "v.mp4"))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        recorder.rollout_files(str(tmp_path / "d.mp4"))


def test_rollout_files_sit_beside_the_video(tmp_path):
    files = recorder.rollout_files(str(tmp_path / "sub" / "run.gif"), show_state=True)
    assert files == recorder.RolloutFiles(
        video=str(tmp_path / "sub" / "run.gif"),
        state_video=str(tmp_path / "sub" / "run_state.mp4"),
        records=str(tmp_path / "sub" / "run.jsonl"),
        summary=str(tmp_path / "sub" / "run.json"),
        beside_video=str(tmp_path / "sub" / "run_beside.mp4"),
    )
    assert (tmp_path / "sub").is_dir() and not os.listdir(tmp_path / "sub")  # the folder, no file
    assert recorder.rollout_files(str(tmp_path / "a.mp4")).state_video is None


def test_prompt_schedule_equals_the_array_schedule_and_never_ends_with_zero_chunks():
    sched = recorder.PromptSchedule.parse("0:1, 4:0,6:2", num_prompts=3, num_chunks=9)
    want = prompt_schedule(9, {0: 1, 4: 0, 6: 2}, 3)
    assert list(sched) == want.tolist()
    assert [sched.at(c) for c in range(9)] == want.tolist()
    endless = recorder.PromptSchedule.parse("3:1", num_prompts=2, num_chunks=0)
    assert list(itertools.islice(endless, 10_000))[:5] == [0, 0, 0, 1, 1]
    assert endless.at(10**9) == 1 and sum(itertools.islice(endless, 10_000)) == 10_000 - 3


@pytest.mark.parametrize(
    "spec, chunks, message",
    [
        ("5:0", 3, "chunk 5 is outside the rollout's 3 chunks"),
        ("2:4", 3, "chunk 2 names prompt 4; there are 2 prompts"),
        ("2-1", 3, "entry '2-1' is not 'chunk:prompt_index'"),
        ("1:1,1:0", 0, "names chunk 1 twice"),
        ("-1:1", 0, "chunk -1 is outside"),
    ],
)
def test_prompt_schedule_errors_name_the_entry(spec, chunks, message):
    with pytest.raises(ValueError, match=message):
        recorder.PromptSchedule.parse(spec, num_prompts=2, num_chunks=chunks)


def test_chunk_video_shows_decoded_frames_or_a_fixed_scale_latent_preview():
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(2, 2, 3, 4, 4, 16)).astype(np.float32)  # [n, B, F, h, w, C]
    pix = rng.uniform(-1, 1, size=(2, 2, 3, 8, 8, 3)).astype(np.float32)
    common = dict(state=lat[:, :, :1], positions=None, key_valid=None)
    np.testing.assert_array_equal(recorder.chunk_video(ChunkOut(lat, frames=pix, **common), 1, 1), pix[1, 1])
    got = recorder.chunk_video(ChunkOut(lat, **common), 1, 0, preview_range=(-2.0, 2.0))
    np.testing.assert_array_equal(got, video.latents_to_rgb(lat[1, 0], (-2.0, 2.0)))


def test_state_decoder_chunk_by_chunk_equals_decoding_the_whole_state_sequence():
    cfg = vae.WanVAEConfig.tiny(dim_mult=(1, 2), temporal_downsample=(True,))
    graphdef, abstract = vae.abstract_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), abstract)
    decoder, dparams = decoder_from_module(nnx.merge(graphdef, params))
    states = rng.normal(size=(4, 1, LAT, LAT, cfg.z_dim)).astype(np.float32)  # 4 chunks of [F_s=1, h, w, C]
    dec = recorder.StateDecoder(decoder, dparams, LAT, LAT)
    stream = np.concatenate([dec(s) for s in states])[decoder.lead_frames :]
    whole = np.asarray(vae.decode(graphdef, dparams, jnp.asarray(states[:, 0][None]))[0])
    np.testing.assert_allclose(stream, whole, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the loop, on a tiny model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    cfg = wan.WanConfig.tiny(zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (2, 1, cfg.text_len, cfg.text_dim))
    decoder, dparams = decoder_from_module(vae.PatchCodec(patch=2, latent_channels=cfg.in_channels))
    st = Streamer(
        graphdef,
        cfg,
        StreamConfig(anchor="adastate", latent_h=LAT, latent_w=LAT),
        SamplerConfig(denoising_steps=(1000, 500)),
        decoder=decoder,
        instrument=True,
    )
    return st, params, prompts, dparams


def _read(path):
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    w, h = next(gen)["size"]
    return np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen])


def _write(setup, tmp_path, schedule, stop=None):
    st, params, prompts, dparams = setup
    files = recorder.rollout_files(str(tmp_path / "v.mp4"), show_state=True)
    carry = st.init_carry(
        params, prompts, jax.random.key(3), prompt_id=schedule.at(0), decoder_params=dparams
    )
    res = recorder.write_rollout(
        st, params, carry, schedule, prompts, files, segment_chunks=3, decoder_params=dparams,
        fps=8, min_size=16, stop=stop,
    )  # fmt: skip
    return files, res


def test_every_chunk_reaches_the_video_and_the_records_as_the_rollout_gives_it(setup, tmp_path):
    st, params, prompts, dparams = setup
    schedule = recorder.PromptSchedule.parse("0:0,3:1,5:0", num_prompts=2, num_chunks=7)  # K=3: 3+3+1
    files, res = _write(setup, tmp_path, schedule)
    carry = st.init_carry(params, prompts, jax.random.key(3), decoder_params=dparams)
    # the reference: the same segments (== one scan == the generator, tests/streaming/test_segments.py)
    segs = list(st.rollout_segments(params, carry, list(schedule), prompts, 3, decoder_params=dparams))
    ref = jax.tree.map(lambda *xs: np.concatenate(xs), *[jax.device_get(g.outs) for g in segs])

    assert res["num_chunks"] == 7 and res["video_frames"] == 21 and res["state_frames"] == 7
    assert res["latency"]["count"] == 4  # chunks after the first segment
    records = writers.read_records(files.records)
    assert [r["chunk"] for r in records] == list(range(7))
    assert [r["prompt_id"] for r in records] == list(schedule)
    assert [r["frames"] for r in records] == [3 * (c + 1) for c in range(7)]
    np.testing.assert_array_equal([r["positions"] for r in records], np.asarray(ref.positions))
    np.testing.assert_array_equal([r["key_valid"] for r in records], np.asarray(ref.key_valid).astype(int))
    shares = attention_shares(st.stream_cfg, np.asarray(ref.key_mass))  # [7, L, 3]
    np.testing.assert_allclose([r["attention_share"] for r in records], shares, atol=1e-5)

    summary_path = tmp_path / "v.json"  # the caller's summary, beside the records
    summary_path.write_text(json.dumps(dict(video=files.video, records=files.records, prompts=["a", "b"])))
    view = recorder.read_rollout(str(summary_path))
    assert view["prompt_schedule"] == list(schedule) and len(view["chunk_latency_s"]) == 7
    np.testing.assert_allclose(view["attention_share"], shares, atol=1e-5)

    frames = _read(files.video)  # upscaled x2 (8x8 -> 16x16), lossy H.264
    want = video.upscale(video.to_uint8(np.concatenate(list(np.asarray(ref.frames[:, 0])))), factor=2)
    assert frames.shape == want.shape == (21, 16, 16, 3)
    luma = lambda x: x.astype(float) @ [0.299, 0.587, 0.114]  # noqa: E731 - yuv420 keeps luma whole
    err = np.abs(luma(frames) - luma(want)).mean()
    err_next = np.abs(luma(frames[1:]) - luma(want[:-1])).mean()  # each frame vs its predecessor
    print(f"luma mean abs error of the mp4: {err:.2f} / 255 (vs the previous frame: {err_next:.2f})")
    assert err < 0.3 * err_next
    assert _read(files.state_video).shape[0] == 7  # one PatchCodec frame per chunk's state
    # the video with each chunk's state to its right (8 + 1 + 8 px wide before the x2 upscale)
    beside = _read(files.beside_video)
    assert beside.shape == (21, 16, 34, 3) and res["beside_frames"] == 21
    assert np.abs(luma(beside[:, :, :16]) - luma(want)).mean() < 0.3 * err_next
    state_px = luma(_read(files.state_video))  # [7, 16, 16]
    err_state = np.abs(luma(beside[:, :, 18:]) - np.repeat(state_px, 3, axis=0)).mean()
    assert err_state < 0.3 * np.abs(state_px[1:] - state_px[:-1]).mean()


class _StopAfter:
    """Truthy once `n` records exist (a signal arriving during the first segment)."""

    def __init__(self, files, n):
        self.files, self.n = files, n

    def __bool__(self):
        return len(writers.read_records(self.files)) >= self.n


def test_a_stop_ends_after_the_current_segment_with_every_file_finished(setup, tmp_path):
    schedule = recorder.PromptSchedule.parse("", num_prompts=2, num_chunks=0)  # endless
    files, res = _write(setup, tmp_path, schedule, stop=_StopAfter(str(tmp_path / "v.jsonl"), 1))
    assert res["num_chunks"] == 3  # the whole first segment (K=3), nothing after it
    assert [r["chunk"] for r in writers.read_records(files.records)] == [0, 1, 2]
    assert _read(files.video).shape[0] == 9 == res["video_frames"]
    assert _read(files.state_video).shape[0] == 3
