"""The video-file source (`config.data.source='video'`) and the latents encoder (`data/latents.py`,
`launch/encode_videos.py`).

Tiny PanWorld videos are written to disk losslessly (FFV1 in .avi: decoded frames must equal the
written ones bit for bit) and as H.264 (.mp4, crf 0, yuv444p: within 2 levels of 255 after the
RGB <-> YUV round trip).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from adastate_jax import build  # noqa: E402
from adastate_jax.config import parse  # noqa: E402
from adastate_jax.data import latents, panworld, pipeline, records, video_source  # noqa: E402
from adastate_jax.models.vae import PatchCodec  # noqa: E402
from tests.subproc import child_env  # noqa: E402
from tests.training.conftest_helpers import REPO, one_device_mesh, panworld_config  # noqa: E402

H264_TOL = 3 / 127.5  # float units: the H.264 (yuv444p, crf 0) round trip is off by <= 2 levels
LENGTHS = {"a.avi": 20, "b.avi": 16, "c.mp4": 24}


def write_ffv1(path, frames):
    """uint8 RGB [T, H, W, 3] -> lossless FFV1 .avi."""
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 8, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()


def write_h264(path, frames):
    """uint8 RGB [T, H, W, 3] -> H.264 .mp4 (crf 0, yuv444p) through imageio-ffmpeg."""
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    gen = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=8,
        codec="libx264",
        pix_fmt_out="yuv444p",
        output_params=["-crf", "0", "-preset", "ultrafast"],
        macro_block_size=1,
    )
    gen.send(None)
    for f in frames:
        gen.send(np.ascontiguousarray(f))
    gen.close()


def panworld_frames(index, num_frames, height=32, width=32):
    clip = panworld.make_clip(
        panworld.PanWorldConfig(frame_height=height, frame_width=width, num_frames=num_frames), index
    )
    return panworld.to_uint8(clip["video"]), clip["prompt"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three captioned PanWorld videos (20, 16 and 24 frames); returns (dir, {name: (frames, prompt)})."""
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for i, (name, n) in enumerate(LENGTHS.items()):
        frames, prompt = panworld_frames(i + 1, n)
        (write_ffv1 if name.endswith(".avi") else write_h264)(d / name, frames)
        (d / (os.path.splitext(name)[0] + ".txt")).write_text(prompt + "\n")
        out[name] = (frames, prompt)
    return d, out


def video_cfg(paths, batch_size=2, **video):
    cfg = panworld_config("teacher", batch_size=batch_size)
    cfg.data.source = "video"
    cfg.data.paths = tuple(str(p) for p in paths)
    cfg.data.video.num_frames = 6
    for k, v in video.items():
        cfg.data.video[k] = v
    return cfg


def tol(name):
    return 0.0 if name.endswith(".avi") else H264_TOL


def test_clip_table_and_decoded_frames_match_the_written_video(videos):
    d, vids = videos
    cfg = video_cfg([d], frame_stride=2, clip_stride=3)  # a clip spans 11 source frames
    src = video_source.source_from_config(parse(cfg))
    assert [os.path.basename(f) for f in src.files] == sorted(LENGTHS)  # a directory, sorted
    assert src.frame_counts == [20, 16, 24]
    expect = [(f, s) for f, n in LENGTHS.items() for s in range(0, n - 11 + 1, 3)]  # 4 + 2 + 5 clips
    assert [(os.path.basename(f), s) for f, s in (src.clip(i) for i in range(len(src)))] == expect
    for i in range(len(src)):
        name, start = expect[i]
        rec = src[i]
        assert rec["video"].shape == (6, 32, 32, 3) and rec["video"].dtype == np.float32
        want = panworld.to_float(vids[name][0][start : start + 11 : 2])
        np.testing.assert_allclose(rec["video"], want, atol=tol(name), rtol=0)
        assert rec["index"] == i and rec["prompt_ids"].shape == (8,)
    # one clip per file, or at most 2 per file
    assert len(video_source.source_from_config(parse(video_cfg([d], clip_stride=0)))) == 3
    assert (
        len(video_source.source_from_config(parse(video_cfg([d], clip_stride=1, max_clips_per_file=2)))) == 6
    )


def test_paths_globs_and_files_expand_sorted_and_deduplicated(videos, tmp_path):
    d, _ = videos
    exts = video_source.VIDEO_EXTENSIONS
    got = records.expand_paths([str(d / "*.avi"), str(d / "c.mp4"), str(d / "a.avi"), str(d)], exts)
    assert [os.path.basename(p) for p in got] == ["a.avi", "b.avi", "c.mp4"]
    with pytest.raises(ValueError, match="does not exist"):
        records.expand_paths([str(tmp_path / "nope.mp4")], exts)
    with pytest.raises(ValueError, match="matches no file"):
        records.expand_paths([str(tmp_path / "*.webm")], exts)


def test_centre_crop_then_area_resize(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)  # 2:3 -> crop columns 16..80
    out = video_source.crop_and_resize(wide, 32, 32)
    crop = wide[:, :, 16:80].astype(np.float64)
    block_mean = crop.reshape(3, 32, 2, 32, 2, 3).mean(axis=(2, 4))  # INTER_AREA at factor 2
    assert np.abs(out - block_mean).max() <= 0.5 + 1e-9
    tall = np.transpose(wide, (0, 2, 1, 3))  # 96 x 64 read at 16 x 32
    out = video_source.crop_and_resize(tall, 16, 32)
    np.testing.assert_array_equal(out.shape, (3, 16, 32, 3))
    crop = tall[:, 32:64].astype(np.float64)  # aspect 2:1 from 64 columns: the middle 32 rows
    assert np.abs(out - crop.reshape(3, 16, 2, 32, 2, 3).mean(axis=(2, 4))).max() <= 0.5 + 1e-9
    # through the source: a 64x96 file read at 32x32
    write_ffv1(tmp_path / "wide.avi", wide[[0, 1, 2, 0, 1, 2]])
    (tmp_path / "wide.txt").write_text("static")
    rec = video_source.source_from_config(parse(video_cfg([tmp_path / "wide.avi"])))[0]
    want = video_source.to_float(video_source.crop_and_resize(wide[[0, 1, 2, 0, 1, 2]], 32, 32))
    np.testing.assert_array_equal(rec["video"], want)


def test_seek_equals_decoding_from_the_start(videos):
    d, vids = videos
    path = str(d / "c.mp4")
    seeked = video_source.read_frames(path, 13, 4, 3, seek=True)
    sequential = video_source.read_frames(path, 13, 4, 3, seek=False)
    np.testing.assert_array_equal(seeked, sequential)
    assert np.abs(seeked.astype(int) - vids["c.mp4"][0][13:23:3]).max() <= 2


def test_lying_metadata_truncated_and_corrupt_files_are_named(videos, tmp_path):
    d, vids = videos
    data = (d / "a.avi").read_bytes()
    trunc = tmp_path / "trunc.avi"
    trunc.write_bytes(data[: len(data) // 2])  # the container still announces 20 frames
    (tmp_path / "trunc.txt").write_text(vids["a.avi"][1])
    cap = cv2.VideoCapture(str(trunc))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 20  # the metadata lies
    cap.release()
    real = video_source.count_frames(str(trunc), "decode")
    assert 6 <= real < 20
    assert video_source.count_frames(str(trunc), "verify") == real
    assert video_source.count_frames(str(d / "a.avi"), "verify") == 20
    src = video_source.source_from_config(parse(video_cfg([trunc], clip_stride=1)))
    assert len(src) == real - 6 + 1
    np.testing.assert_array_equal(
        src[len(src) - 1]["video"], panworld.to_float(vids["a.avi"][0][real - 6 : real])
    )

    # trusting the metadata: the clip table runs past the end and the read names file and index
    src = video_source.source_from_config(
        parse(video_cfg([d / "b.avi", trunc], clip_stride=1, frame_count="metadata"))
    )
    assert len(src) == 11 + 15
    with pytest.raises(ValueError, match=r"bad record 25: video file .*trunc\.avi, frames 14\.\.19"):
        src[25]
    # a file that changes after the table was built
    src = video_source.source_from_config(parse(video_cfg([trunc], clip_stride=1)))
    trunc.write_bytes(data[: len(data) // 4])
    with pytest.raises(ValueError, match=r"bad record \d+: video file .*trunc\.avi"):
        src[len(src) - 1]
    # unreadable, too short
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(ValueError, match=r"cannot open video file .*garbage\.mp4"):
        video_source.source_from_config(parse(video_cfg([tmp_path / "garbage.mp4"], captions="none")))
    with pytest.raises(ValueError, match=r"shorter than one clip of 31 frames.*b\.avi \(16 frames\)"):
        video_source.source_from_config(parse(video_cfg([d], num_frames=6, frame_stride=6)))  # span 31
    src = video_source.source_from_config(parse(video_cfg([d], num_frames=18, short_files="skip")))
    assert [os.path.basename(src.clip(i)[0]) for i in range(len(src))] == ["a.avi", "c.mp4"]


def test_captions_sidecar_json_jsonl_missing_and_word_ids(videos, tmp_path):
    d, vids = videos
    for name in LENGTHS:
        shutil.copy(d / name, tmp_path / name)
    files = [str(tmp_path / n) for n in LENGTHS]
    with pytest.raises(ValueError, match=r"3 video\(s\) have no sidecar caption.*a\.avi"):
        video_source.source_from_config(parse(video_cfg([tmp_path])))
    assert video_source.load_captions(files, "", missing="empty") == ["", "", ""]
    (tmp_path / "b.txt").write_text("  pan left fast\n")
    with pytest.raises(
        ValueError, match=r"2 video\(s\) have no sidecar caption <video>.txt: .*a\.avi, .*c\.mp4"
    ):
        video_source.load_captions(files, "")
    assert video_source.load_captions(files, "", missing="empty") == ["", "pan left fast", ""]
    # a JSON object keyed by file name, and JSONL rows with relative paths
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"a.avi": "static", "b.avi": "pan right slow", "c.mp4": "back and forth"}))
    assert video_source.load_captions(files, str(caps)) == ["static", "pan right slow", "back and forth"]
    sub = tmp_path / "meta"
    sub.mkdir()
    (sub / "caps.jsonl").write_text(
        json.dumps({"video": "../a.avi", "caption": "static"})
        + "\n"
        + json.dumps({"path": "../c.mp4", "text": "x"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"1 video\(s\) have no caption in .*caps\.jsonl: .*b\.avi"):
        video_source.load_captions(files, str(sub / "caps.jsonl"))
    # words: the ids the trainer's word encoder gives; unknown words name the video
    from adastate_jax import text as text_lib

    enc = text_lib.WordEmbeddingEncoder(
        text_lib.WordEmbeddingConfig(vocab=tuple(panworld.prompt_vocabulary()), text_len=8, text_dim=32),
        rngs=__import__("flax").nnx.Rngs(0),
    )
    cfg = video_cfg([tmp_path], captions=str(caps))
    src = video_source.source_from_config(parse(cfg))
    for i, cap in enumerate(["static", "pan right slow", "back and forth"]):
        np.testing.assert_array_equal(
            src[src._file.tolist().index(i)]["prompt_ids"], enc.tokenize([cap])[0][0]
        )
    caps.write_text(json.dumps({"a.avi": "a cat", "b.avi": "static", "c.mp4": "static"}))
    with pytest.raises(
        ValueError, match=r"video file .*a\.avi: caption 'a cat' has word\(s\) \['a', 'cat'\]"
    ):
        video_source.source_from_config(parse(cfg))
    cfg.text.kind = "umt5"
    with pytest.raises(ValueError, match="encode_videos.py"):
        video_source.source_from_config(parse(cfg))


def test_patch_codec_latents_equal_the_patchcodec_of_the_pixels(videos):
    d, vids = videos
    cfg = video_cfg([d / "a.avi", d / "b.avi"], batch_size=2, clip_stride=5)
    cfg.data.shuffle = False
    batch = next(pipeline.make_iterator(parse(cfg)))
    assert batch["latents"].shape == (2, 6, 8, 8, 48) and batch["prompt_ids"].shape == (2, 8)
    cfg.data.codec = "none"
    pixels = next(pipeline.make_iterator(parse(cfg)))
    assert pixels["video"].shape == (2, 6, 32, 32, 3) and "latents" not in pixels
    np.testing.assert_array_equal(batch["index"], pixels["index"])
    np.testing.assert_array_equal(
        batch["latents"], np.asarray(PatchCodec(4, 48, "none").encode(pixels["video"]))
    )
    # lossless file: the latents are the codec of the frames that were written
    written = panworld.to_float(np.stack([vids["a.avi"][0][0:6], vids["a.avi"][0][5:11]]))
    np.testing.assert_array_equal(batch["latents"], np.asarray(PatchCodec(4, 48, "none").encode(written)))
    cfg.data.video.captions = "none"  # pixels without text: the 'vae' objective only
    with pytest.raises(ValueError, match="needs captions"):
        pipeline.make_iterator(parse(cfg))
    cfg.train.objective = "vae"
    assert set(next(pipeline.make_iterator(parse(cfg)))) == {"video", "index"}
    cfg.data.codec = "patch"
    cfg.vae.kind = "wan"
    with pytest.raises(ValueError, match="encode_videos.py"):
        pipeline.make_iterator(parse(cfg))


def _indices(it, n):
    return np.concatenate([next(it)["index"] for _ in range(n)])


def test_shuffle_is_deterministic_and_host_shards_are_disjoint_and_cover(videos):
    d, _ = videos
    cfg = video_cfg([d], batch_size=4, clip_stride=4)  # 4 + 3 + 5 = 12 clips
    cfg.data.codec = "none"
    assert len(video_source.source_from_config(parse(cfg))) == 12
    first = _indices(pipeline.make_iterator(parse(cfg)), 3)
    assert sorted(first) == list(range(12)) and list(first) != list(range(12))  # one shuffled epoch
    np.testing.assert_array_equal(_indices(pipeline.make_iterator(parse(cfg)), 3), first)
    cfg.data.seed = 1
    assert list(_indices(pipeline.make_iterator(parse(cfg)), 3)) != list(first)
    # 2 hosts, local batch 2: one epoch is 3 batches per host
    shards = [
        _indices(pipeline.make_iterator(parse(cfg), process_index=h, process_count=2), 3) for h in range(2)
    ]
    assert all(len(set(s)) == 6 for s in shards)
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(12))


def test_iterator_state_resumes_to_identical_batches(videos):
    d, _ = videos
    cfg = video_cfg([d], batch_size=2, clip_stride=4)
    it = pipeline.make_iterator(parse(cfg))
    for _ in range(2):
        next(it)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (12 clips)
    again = pipeline.make_iterator(parse(cfg))
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_worker_process_gives_the_same_batches(videos):
    d, _ = videos
    cfg = video_cfg([d], batch_size=2, clip_stride=4)
    want = [next(it) for it in [pipeline.make_iterator(parse(cfg))] for _ in range(3)]
    cfg.data.worker_count = 1
    it = pipeline.make_iterator(parse(cfg))
    got = [next(it) for _ in range(3)]
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_missing_opencv_names_the_video_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[video\]'"):
        video_source.count_frames("x.mp4")


def test_train_two_steps_on_video_files(videos, tmp_path):
    from adastate_jax.training import loop

    d, _ = videos
    cfg = video_cfg([d], batch_size=2, clip_stride=4, num_frames=3, height=16, width=16)
    cfg.train.steps = 2
    # a smaller DiT than the recipe's (compile time): 1 layer, 4x4 latents of 16x16 frames
    cfg.model.update(dict(dim=32, num_heads=2, num_layers=1, ffn_dim=64, freq_dim=16))
    cfg.stream.latent_h = cfg.stream.latent_w = 4
    out = loop.train(cfg, str(tmp_path / "run"), mesh=one_device_mesh())
    assert out["step"] == 2 and np.isfinite(out["metrics"]["loss"])
    assert os.path.isdir(tmp_path / "run" / "export" / "params")
    cfg.data.video.num_frames = 7
    with pytest.raises(
        ValueError, match=r"config\.data\.video\.num_frames: 7 is not a whole number of chunks"
    ):
        loop.setup(cfg, str(tmp_path / "bad"), one_device_mesh())


def encode(cfg, out="", **options):
    """`latents.encode_videos` with the parts `launch/encode_videos.py` builds (`build`)."""
    exp = parse(cfg)
    opts = latents.EncodeOptions(out=out, **options)
    return latents.encode_videos(
        exp,
        opts,
        text_encoder=lambda: build.text_encoder(exp, opts.text_checkpoint),
        codec=lambda: build.vae_module(exp, opts.vae_checkpoint),
        progress=False,
    )


def test_encode_videos_writes_arrayrecord_shards_that_train_reads(videos, tmp_path):
    pytest.importorskip("array_record")
    d, _ = videos
    cfg = video_cfg([d], clip_stride=4)  # 12 clips
    out = str(tmp_path / "latents")
    emb_path = str(tmp_path / "captions.npz")
    summary = encode(cfg, out, shard_size=5, batch_size=4, embeddings_out=emb_path)
    assert [os.path.basename(p) for p in summary["written"]] == [
        f"shard-0000{k}-of-00003.array_record" for k in range(3)
    ]
    ar = records.LatentsArrayRecordSource(summary["paths"])
    assert len(ar) == 12
    src = video_source.source_from_config(parse(cfg))
    words = build.text_encoder(parse(cfg))
    for i in (0, 7, 11):
        rec = ar[i]
        assert rec["latents"].shape == (6, 8, 8, 48) and rec["text"].shape == (8, 32)
        np.testing.assert_array_equal(
            rec["latents"], np.asarray(PatchCodec(4, 48, "none").encode(src[i]["video"][None]))[0]
        )
        np.testing.assert_allclose(rec["text"], words.encode([src.caption(i)])[0], rtol=1e-6, atol=1e-6)
    rows = [json.loads(x) for x in open(os.path.join(out, "clips.jsonl"))]
    assert (
        rows[7]["shard"] == 1
        and rows[7]["record"] == 2
        and (rows[7]["file"], rows[7]["start"]) == src.clip(7)
    )
    # training reads the shards
    cfg_ar = video_cfg([d])
    cfg_ar.data.source = "arrayrecord"
    cfg_ar.data.paths = tuple(summary["paths"])
    batch = next(pipeline.make_iterator(parse(cfg_ar)))
    assert batch["latents"].shape == (2, 6, 8, 8, 48) and batch["text"].shape == (2, 8, 32)
    # re-running resumes (complete shards are kept); other settings need --overwrite
    again = encode(cfg, out, shard_size=5, batch_size=4)
    assert again["written"] == [] and len(again["skipped"]) == 3
    with pytest.raises(ValueError, match="--overwrite"):
        encode(cfg, out, shard_size=4)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # every file was renamed into place
    # the caption table feeds the video source with text.kind='embeddings'
    cfg.text.kind = "embeddings"
    cfg.text.embeddings_path = emb_path
    rec = video_source.source_from_config(parse(cfg))[7]
    np.testing.assert_allclose(rec["text"], ar[7]["text"], rtol=0, atol=0)
    assert "prompt_ids" not in rec


def test_encoder_options_and_run_errors_name_the_flag_or_field(videos):
    d, _ = videos
    for options, message in (
        (dict(), "give --out"),
        (dict(out="x", shard_size=0), "--shard_size 0"),
        (dict(out="x", batch_size=0), "--batch_size 0"),
        (dict(out="x", num_tasks=2, task_index=2), r"--task_index 2 outside \[0, --num_tasks 2\)"),
    ):
        with pytest.raises(ValueError, match=message):
            latents.EncodeOptions(**options)
    opts = latents.EncodeOptions(out="x")
    cfg = video_cfg([d], captions="none")
    with pytest.raises(ValueError, match="config.data.video.captions='none'"):
        latents.check_run(parse(cfg), opts)
    cfg = video_cfg([d])
    cfg.vae.kind = "none"
    with pytest.raises(ValueError, match="config.vae.kind='none'"):
        latents.check_run(parse(cfg), opts)
    cfg.vae.kind = "wan"
    with pytest.raises(ValueError, match="--vae_checkpoint"):
        latents.check_run(parse(cfg), opts)
    latents.check_run(parse(cfg), latents.EncodeOptions(out="x", random_vae=True))


def test_command_line_writes_shards_and_caption_embeddings(videos, tmp_path):
    """One subprocess: flags -> `latents.encode_videos` with the config's codec and text encoder."""
    pytest.importorskip("array_record")
    d, _ = videos
    out, emb = tmp_path / "latents", tmp_path / "captions.npz"
    cmd = [
        sys.executable, os.path.join(REPO, "launch", "encode_videos.py"),
        "--config=" + os.path.join(REPO, "configs", "panworld.py") + ":teacher",
        "--config.data.source=video", f"--config.data.paths=('{d / 'a.avi'}',)",
        "--config.data.video.num_frames=6", "--config.data.video.clip_stride=6",
        f"--out={out}", f"--embeddings_out={emb}", "--shard_size=2", "--batch_size=2", "--max_clips=3",
    ]  # fmt: skip
    env = child_env()  # one CPU device
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = (out / "paths.txt").read_text().split()
    assert [len(records.LatentsArrayRecordSource([p])) for p in shards] == [2, 1]
    assert "--config.data.source=arrayrecord" in r.stderr  # the hint is logged
    with np.load(emb) as z:
        assert list(z["prompts"]) == [videos[1]["a.avi"][1]]  # the one caption of a.avi


@pytest.mark.slow  # compiling the Wan VAE encoder takes ~10-40 s on 2 shared CPU cores
def test_encode_videos_with_a_wan_vae(videos, tmp_path):
    pytest.importorskip("array_record")

    d, _ = videos
    cfg = video_cfg([d / "a.avi"], num_frames=9, clip_stride=8)  # 2 clips of 9 = 1 + 2 * 4 frames
    cfg.vae.kind = "wan"
    w = cfg.vae.wan
    w.base_dim, w.z_dim, w.dim_mult, w.num_res_blocks, w.temporal_downsample = (
        8,
        8,
        (1, 2, 2),
        1,
        (False, True),
    )
    with w.unlocked():
        w.latents_mean = w.latents_std = None
    cfg.model.in_channels = cfg.model.out_channels = 8
    with pytest.raises(ValueError, match="--vae_checkpoint"):
        encode(cfg, str(tmp_path / "x"))
    summary = encode(cfg, str(tmp_path / "wan"), random_vae=True, batch_size=2)
    ar = records.LatentsArrayRecordSource(summary["paths"])
    assert len(ar) == 2 and ar[1]["latents"].shape == (5, 8, 8, 8)  # x2 in time (1 + 4 latents), x4 in space
    assert np.all(np.isfinite(ar[1]["latents"]))
