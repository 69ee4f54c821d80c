"""Streaming writers: video and records grow chunk by chunk, survive kills, finalise on signals."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from adastate_jax import video
from adastate_jax.streaming import writers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("imageio_ffmpeg")


def _chunk(c, frames_per_chunk=3, size=8):
    """Chunk c: flat frames whose colour encodes the global frame index (floats in [-1, 1])."""
    g = np.arange(c * frames_per_chunk, (c + 1) * frames_per_chunk)
    rgb = np.stack([(g * 37) % 256, (g * 91) % 256, np.full_like(g, 128)], -1) / 127.5 - 1  # [T, 3]
    return np.broadcast_to(rgb[:, None, None, :], (len(g), size, size, 3)).astype(np.float32)


def _colour(g):
    return np.array([(g * 37) % 256, (g * 91) % 256, 128], np.float64)


def _read(path):
    """Frames [T, H, W, 3] uint8 as ffmpeg decodes them (stops at a truncated end)."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    frames = []
    try:
        for buf in gen:
            frames.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
    except RuntimeError:  # ffmpeg's exit status on a file cut by a kill; the frames read stand
        pass
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def _count_cv2(path):
    import cv2

    cap = cv2.VideoCapture(path)
    n = 0
    while cap.read()[0]:
        n += 1
    return n


@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_video_writer_round_trip_keeps_every_frame_and_its_colour(tmp_path, ext):
    path = str(tmp_path / f"v{ext}")
    with writers.VideoStreamWriter(path, fps=8, min_size=32) as w:
        for c in range(5):
            w.write(_chunk(c))
    frames = _read(path)
    assert frames.shape == (15, 32, 32, 3)  # 8x8 upscaled x4 (nearest)
    got = frames.reshape(15, -1, 3).mean(1)
    want = np.stack([_colour(g) for g in range(15)])
    np.testing.assert_allclose(got, want, atol=6)  # H.264 crf 18 / gif palette on flat colours
    if ext == ".mp4":
        assert _count_cv2(path) == 15


def test_video_writer_matches_whole_video_upscale_and_pads_odd_sizes(tmp_path):
    """Per-chunk conversion equals the whole-video path of `video.upscale(to_uint8(...))`; 5x5 with
    min_size 5 stays x1 and is padded to 6x6 (yuv420p)."""
    whole = np.concatenate([_chunk(c, size=5) for c in range(3)])
    per_chunk = np.concatenate([video.prepare_chunk(_chunk(c, size=5), factor=2) for c in range(3)])
    np.testing.assert_array_equal(per_chunk, video.upscale(video.to_uint8(whole), min_size=10))
    path = str(tmp_path / "odd.mp4")
    with writers.VideoStreamWriter(path, fps=8, min_size=5) as w:
        w.write(_chunk(0, size=5))
    assert _read(path).shape == (3, 6, 6, 3)


def test_video_writer_skips_lead_frames_and_refuses_a_size_change(tmp_path):
    path = str(tmp_path / "skip.mp4")
    w = writers.VideoStreamWriter(path, fps=8, min_size=16, skip_frames=4)
    w.write(_chunk(0))  # all 3 dropped
    assert not os.path.exists(path) and w.frames_written == 0  # no file before the first frame
    w.write(_chunk(1))  # 1 dropped, 2 kept
    with pytest.raises(ValueError, match=r"chunk frames are 4x4 but the stream started at 8x8"):
        w.write(_chunk(2, size=4))
    assert w.close() == path and w.frames_written == 2
    got = _read(path).reshape(2, -1, 3).mean(1)
    np.testing.assert_allclose(got, np.stack([_colour(4), _colour(5)]), atol=6)
    assert writers.VideoStreamWriter(str(tmp_path / "none.mp4")).close() is None
    with pytest.raises(ValueError, match=r"unsupported video extension '.avi'"):
        writers.VideoStreamWriter(str(tmp_path / "x.avi"))


def test_records_are_one_flushed_json_object_per_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    rw = writers.RecordWriter(path)
    rw.write(dict(chunk=0, latency_s=np.float32(0.25), share=np.array([[0.5, 0.25, 0.25]]), n=np.int64(3)))
    rw.write(dict(chunk=1, positions=np.arange(3)))
    with open(path) as fh:  # readable before close: flushed per line
        lines = fh.read().splitlines()
    assert [json.loads(x)["chunk"] for x in lines] == [0, 1]
    rw.close()
    recs = writers.read_records(path)
    assert recs[0] == dict(chunk=0, latency_s=0.25, share=[[0.5, 0.25, 0.25]], n=3)
    assert recs[1]["positions"] == [0, 1, 2]
    with writers.RecordWriter(str(tmp_path / "f.jsonl")) as rw:
        rw.write(dict(share=np.float32([[0.1, 0.12295]]), x=np.float32(0.3), big=np.float64(0.1) + 0.2))
    with open(tmp_path / "f.jsonl") as fh:  # float32 written with its own digits, float64 with all
        assert fh.read() == '{"share":[[0.1,0.12295]],"x":0.3,"big":0.30000000000000004}\n'
    with open(path, "a") as fh:  # a line torn by a hard kill is dropped, not fatal
        fh.write('{"chunk": 2, "lat')
    assert len(writers.read_records(path)) == 2


def test_summary_json_is_replaced_atomically(tmp_path):
    path = str(tmp_path / "s.json")
    writers.write_json_atomic(path, dict(a=1))
    writers.write_json_atomic(path, dict(a=2, b=np.arange(2)))
    assert json.loads(open(path).read()) == dict(a=2, b=[0, 1])
    assert os.listdir(tmp_path) == ["s.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_running_stats_match_numpy():
    xs = np.random.default_rng(0).exponential(size=1000)
    st = writers.RunningStats()
    st.extend(xs)
    np.testing.assert_allclose(
        [st.mean, st.std, st.min, st.max, st.total],
        [xs.mean(), xs.std(), xs.min(), xs.max(), xs.sum()],
        rtol=1e-9,
    )
    d = st.as_dict(ndigits=4)
    assert d["count"] == 1000 and d["mean"] == round(xs.mean(), 4)
    assert writers.RunningStats().as_dict() == dict(count=0)


def test_graceful_stop_flags_the_first_signal_and_aborts_on_the_second():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with writers.GracefulStop(message=False) as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    # SIGTERM (a scheduler's preemption) is the same request to stop: launch/rollout.py's default
    # GracefulStop() takes it (its second SIGTERM would end this process, so only the first here)
    with writers.GracefulStop(message=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop and stop.signal_name == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_writing_a_long_stream_keeps_host_memory_flat(tmp_path):
    """600 chunks of 3 frames upscaled to 256x256 (354 MB of uint8 if kept): resident memory grows
    by far less than that."""
    with writers.VideoStreamWriter(str(tmp_path / "long.mp4"), fps=16, min_size=256) as w:
        w.write(_chunk(0, size=16))
        with writers.RssMonitor() as mon:
            for c in range(1, 600):
                w.write(_chunk(c, size=16))
    assert w.frames_written == 1800
    assert mon.peak_bytes - mon.start_bytes < 40e6, (mon.start_bytes, mon.peak_bytes)
    assert writers.peak_rss_bytes() >= mon.peak_bytes * 0.9


# A child process that streams synthetic chunks through the writers until a signal or a kill.
CHILD = r"""
import sys, time
import numpy as np
from adastate_jax.streaming import writers
sys.path.insert(0, sys.argv[5])
from tests.streaming.test_writers import _chunk

out, records, summary, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
lat = writers.RunningStats()
chunk = 0
with writers.GracefulStop() as stop:
    with writers.VideoStreamWriter(out, fps=8, min_size=32, faststart=True) as vw, \
            writers.RecordWriter(records) as rw:
        while not stop and chunk < 1000:
            t0 = time.perf_counter()
            vw.write(_chunk(chunk))
            lat.add(time.perf_counter() - t0)
            rw.write(dict(chunk=chunk, frames=vw.frames_written, latency_s=time.perf_counter() - t0))
            print(f"CHUNK {chunk} {vw.ffmpeg_pid}", flush=True)
            chunk += 1
            time.sleep(pause)
    writers.write_json_atomic(
        summary,
        dict(num_chunks=chunk, video_frames=vw.frames_written, stopped_by=stop.signal_name, latency=lat.as_dict()),
    )
"""


def _spawn(tmp_path, pause):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, str(script), *(str(tmp_path / n) for n in ("v.mp4", "r.jsonl", "s.json"))]
    return subprocess.Popen(
        [*args, str(pause), REPO], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for_chunk(proc, chunk, timeout=120):
    """Read the child's progress lines until chunk `chunk` is reported; returns ffmpeg's pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited early: {proc.stderr.read()[-3000:]}")
        if line.startswith(f"CHUNK {chunk} "):
            return int(line.split()[2])
    raise AssertionError(f"no chunk {chunk} within {timeout}s")


def test_hard_kill_of_writer_and_ffmpeg_leaves_a_playable_video_of_the_completed_chunks(tmp_path):
    """SIGKILL to the writing process and its ffmpeg at once (a preempted machine): the fragmented
    mp4 plays and holds at least every chunk before the last one written (3 frames each)."""
    proc = _spawn(tmp_path, pause=2.0)
    ffmpeg_pid = _wait_for_chunk(proc, 3)  # chunks 0..3 handed to ffmpeg; the child now sleeps 2 s
    time.sleep(0.75)  # ffmpeg encodes what it was given (it muxes a frame when the next arrives)
    os.kill(proc.pid, signal.SIGKILL)
    os.kill(ffmpeg_pid, signal.SIGKILL)
    proc.wait()
    frames = _read(str(tmp_path / "v.mp4"))
    print(f"frames readable after the kill: {frames.shape[0]} of 12 written")
    assert frames.shape[0] >= 9, frames.shape  # chunks 0-2 complete (chunk 3: all but its last frame)
    assert _count_cv2(str(tmp_path / "v.mp4")) == frames.shape[0]
    got = frames.reshape(frames.shape[0], -1, 3).mean(1)
    np.testing.assert_allclose(got, np.stack([_colour(g) for g in range(frames.shape[0])]), atol=6)
    assert [r["chunk"] for r in writers.read_records(str(tmp_path / "r.jsonl"))] == [0, 1, 2, 3]
    assert not os.path.exists(tmp_path / "s.json")  # no summary: the process never finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finalises_video_records_and_summary_after_the_current_chunk(tmp_path, sig):
    proc = _spawn(tmp_path, pause=0.2)
    _wait_for_chunk(proc, 4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    n = summary["num_chunks"]
    assert n >= 5 and summary["stopped_by"] == signal.Signals(sig).name
    assert summary["latency"]["count"] == n
    records = writers.read_records(str(tmp_path / "r.jsonl"))
    assert [r["chunk"] for r in records] == list(range(n))  # every chunk up to the stop, in order
    frames = _read(str(tmp_path / "v.mp4"))
    assert frames.shape[0] == 3 * n == summary["video_frames"] == records[-1]["frames"]
    assert _count_cv2(str(tmp_path / "v.mp4")) == 3 * n
