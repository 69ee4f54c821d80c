"""Outputs of streams that may never end: written as chunks arrive, bounded in memory, kept on interrupt.

Owns:
  * `VideoStreamWriter`: chunks of frames [T, H, W, 3] -> an .mp4 (H.264) or .gif through one
    ffmpeg process fed by a pipe (imageio-ffmpeg's binary, the `video` extra). Each chunk is
    converted to uint8 and upscaled (nearest, integer factor fixed by the first chunk) on its own:
    host memory holds one chunk. The mp4 is fragmented while it grows (one fragment per frame,
    flushed as it is muxed): a hard kill of the writer, and of ffmpeg with it, leaves a playable
    file with every frame ffmpeg had encoded except the last (measured: 19 of 20 frames). ffmpeg
    runs in its own session, so a terminal's Ctrl-C reaches only the Python process and a killed
    Python process leaves ffmpeg to finish the file from the pipe's end. A clean `close()`
    remuxes the fragments into a plain mp4 (`+faststart`, stream copy, atomic rename). The gif
    gets a palette per frame (ffmpeg `palettegen=stats_mode=single`), so it streams too.
  * `RecordWriter`: one JSON object per line per chunk, flushed line by line.
  * `write_json_atomic`: a summary JSON written to a temporary file and renamed into place
    (`adastate_jax.files`), numpy values as `dumps` writes them.
  * `RunningStats`: O(1) summaries (count, mean, std, min, max, total) of a per-chunk number.
  * `GracefulStop`: SIGINT / SIGTERM -> a flag the caller polls to stop after the current chunk
    (a second signal aborts at once).
  * host-memory probes for benchmarks: `peak_rss_bytes`, `current_rss_bytes`, `RssMonitor`.
Must not know: models, `Streamer`, configs (a caller turns its chunks into frames and records).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from adastate_jax import files, video

VIDEO_EXTENSIONS = (".mp4", ".gif")


def ffmpeg_exe() -> str:
    """The ffmpeg binary bundled by imageio-ffmpeg; an error names the extra that installs it."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise RuntimeError(
            "streaming video needs imageio-ffmpeg (pip install -e '.[video]'); it provides ffmpeg"
        ) from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def _encoder_args(ext: str, fps: float, keyframe_interval_s: float, crf: int) -> list[str]:
    if ext == ".gif":  # a palette per frame: streams (a global palette needs every frame first)
        return [
            "-vf",
            "split[a][b];[a]palettegen=stats_mode=single[p];[b][p]paletteuse=new=1",
            "-loop",
            "0",
            "-f",
            "gif",
        ]
    gop = max(1, round(fps * keyframe_interval_s))
    return [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",  # no lookahead, no B-frames, no frame threads: a frame is muxed as it arrives
        "-crf",
        str(int(crf)),
        "-pix_fmt",
        "yuv420p",
        "-g",
        str(gop),
        "-movflags",
        "frag_every_frame+empty_moov+default_base_moof",
        "-flush_packets",
        "1",
        "-f",
        "mp4",
    ]


class VideoStreamWriter:
    """Append chunks of frames to a video file as they are made (see the module docstring).

        with VideoStreamWriter("out.mp4", fps=16, min_size=256) as w:
            for chunk in chunks:          # [T, H, W, 3] uint8, or floats in [-1, 1]
                w.write(chunk)

    skip_frames: drop this many frames at the start of the stream (a decoder's lead frames).
    keyframe_interval_s: seconds between H.264 keyframes (seeking granularity; any frame is safe
    on disk once the next one is muxed, keyframe or not).
    faststart: on a clean close, remux the fragmented mp4 into a plain one with the index first
    (players that dislike fragments; a stream copy, seconds for hours of tiny video).
    No file is created before the first frame arrives.
    """

    def __init__(
        self,
        path: str,
        fps: float = 16.0,
        min_size: int = 256,
        skip_frames: int = 0,
        crf: int = 18,
        keyframe_interval_s: float = 2.0,
        faststart: bool = True,
    ):
        self.path = str(path)
        self.ext = os.path.splitext(self.path)[1].lower()
        if self.ext not in VIDEO_EXTENSIONS:
            raise ValueError(f"unsupported video extension {self.ext!r} for {self.path}: use .mp4 or .gif")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps} (for {self.path})")
        self.fps = float(fps)
        self.min_size = int(min_size)
        self.skip_frames = int(skip_frames)
        self.crf = crf
        self.keyframe_interval_s = keyframe_interval_s
        self.faststart = faststart
        self.frames_written = 0  # frames handed to ffmpeg
        self.frame_shape: tuple[int, int] | None = None  # (H, W) of the chunks given (before upscaling)
        self.factor: int | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._skipped = 0
        self._closed = False

    # --- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> VideoStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception or KeyboardInterrupt mid-stream: keep what was written, do not mask it
            self.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: finalising {self.path} failed: {e}", file=sys.stderr)

    @property
    def ffmpeg_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self, height: int, width: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._stderr = tempfile.TemporaryFile()
        cmd = [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            f"{self.fps:g}",
            "-i",
            "pipe:0",
            "-an",
            *_encoder_args(self.ext, self.fps, self.keyframe_interval_s, self.crf),
            self.path,
        ]
        # own session: Ctrl-C in a terminal (SIGINT to the foreground group) must not stop ffmpeg
        # before the caller has finished its chunk; a killed caller closes the pipe and ffmpeg
        # finishes the file.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True
        )

    def _ffmpeg_error(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    # --- writing ----------------------------------------------------------------------------
    def write(self, frames: np.ndarray) -> None:
        """Append one chunk [T, H, W, 3] (uint8, or floats in [-1, 1]); every chunk has the first's H, W."""
        if self._closed:
            raise RuntimeError(f"{self.path}: write after close")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames for {self.path} must be [T, H, W, 3], got {frames.shape}")
        if self._skipped < self.skip_frames:
            drop = min(self.skip_frames - self._skipped, frames.shape[0])
            frames, self._skipped = frames[drop:], self._skipped + drop
        if frames.shape[0] == 0:
            return
        hw = tuple(frames.shape[1:3])
        if self.frame_shape is None:
            self.frame_shape = hw
            self.factor = video.upscale_factor(*hw, self.min_size)
        elif hw != self.frame_shape:
            raise ValueError(
                f"{self.path}: chunk frames are {hw[0]}x{hw[1]} but the stream started at "
                f"{self.frame_shape[0]}x{self.frame_shape[1]}"
            )
        data = video.prepare_chunk(frames, self.factor, even=self.ext == ".mp4")  # [T, H', W', 3] uint8
        if self._proc is None:
            self._start(*data.shape[1:3])
        try:
            self._proc.stdin.write(np.ascontiguousarray(data).tobytes())
        except (BrokenPipeError, OSError) as e:
            self._proc.wait()
            raise RuntimeError(
                f"ffmpeg stopped while writing {self.path} (exit {self._proc.returncode}): "
                f"{self._ffmpeg_error() or e}"
            ) from None
        self.frames_written += data.shape[0]

    def close(self) -> str | None:
        """Finish the file (idempotent). Returns its path, or None when no frame was ever written."""
        if self._closed:
            return self.path if self._proc is not None else None
        self._closed = True
        if self._proc is None:
            return None
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        rc = self._proc.wait()
        if rc != 0:
            raise RuntimeError(f"ffmpeg failed writing {self.path} (exit {rc}): {self._ffmpeg_error()}")
        self._stderr.close()
        if self.ext == ".mp4" and self.faststart:
            _remux_faststart(self.path)
        return self.path


def _remux_faststart(path: str) -> None:
    """Fragmented mp4 -> plain mp4 with the index first (stream copy), renamed over `path`. On any
    failure the fragmented file stays (it plays) and a warning says why."""
    tmp = f"{path}.faststart.tmp.mp4"
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", path, "-c", "copy"]
    cmd += ["-movflags", "+faststart", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        print(f"warning: {path} stays fragmented (remux failed: {r.stderr[-500:]})", file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)
        return
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    """numpy (and array-like) values -> JSON types; anything else is refused by json as usual.
    Floats narrower than float64 are written with their own shortest digits (float32 0.1 -> 0.1,
    not 0.10000000149011612)."""
    if not (isinstance(x, np.generic | np.ndarray) or hasattr(x, "__array__")):
        raise TypeError(f"{type(x).__name__} is not JSON serialisable")
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize < 8:
        flat = [float(str(v)) for v in a.ravel()]  # numpy's str is the shortest round-trip repr
        return np.asarray(flat, np.float64).reshape(a.shape).tolist() if a.ndim else flat[0]
    return a.tolist()


def dumps(obj: Any, indent: int | None = None) -> str:
    """json.dumps that accepts numpy scalars and arrays (as numbers and nested lists)."""
    sep = (",", ":") if indent is None else None
    return json.dumps(obj, default=_jsonable, indent=indent, separators=sep, allow_nan=True)


class RecordWriter:
    """JSON lines: `write(record)` appends one object as one line and flushes it to the OS, so a
    killed process leaves every record written before the kill (a torn last line at worst)."""

    def __init__(self, path: str):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.count = 0

    def write(self, record: dict) -> None:
        line = dumps(record)
        if "\n" in line:  # cannot happen with json.dumps, but a line is the unit of this file
            raise ValueError(f"{self.path}: a record must serialise to one line")
        self._fh.write(line + "\n")
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str) -> list[dict]:
    """The records of a JSON-lines file (a torn last line, from a hard kill, is dropped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, without its newline: torn by a kill
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> str:
    """Write `obj` as JSON to `path` through a temporary file in the same folder and a rename:
    readers see the old file or the new one, never half of one."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_text_atomic(path, dumps(obj, indent=indent))  # umask permissions, fsync, rename
    return path


class RunningStats:
    """Count, mean, std (Welford), min, max and total of a stream of numbers, in O(1) memory."""

    def __init__(self):
        self.count, self.total, self._mean, self._m2 = 0, 0.0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, x: float) -> None:
        x = float(x)
        self.count += 1
        self.total += x
        d = x - self._mean
        self._mean += d / self.count
        self._m2 += d * (x - self._mean)
        self.min, self.max = min(self.min, x), max(self.max, x)

    def extend(self, xs: Iterable[float]) -> None:
        for x in xs:
            self.add(x)

    @property
    def mean(self) -> float:
        return self._mean if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count else math.nan

    def as_dict(self, ndigits: int = 6) -> dict:
        if not self.count:
            return dict(count=0)
        r = lambda v: round(v, ndigits)  # noqa: E731
        return dict(
            count=self.count,
            mean=r(self.mean),
            std=r(self.std),
            min=r(self.min),
            max=r(self.max),
            total=r(self.total),
        )


# ---------------------------------------------------------------------------------------------
# interruption
# ---------------------------------------------------------------------------------------------
class GracefulStop:
    """Turns SIGINT / SIGTERM into a request to stop after the current chunk.

        with GracefulStop() as stop:
            for chunk in stream:
                ...write chunk...
                if stop:            # stop.requested
                    break
        # finalise outputs; stop.signal_name says which signal (None: ran to the end)

    A second signal while a stop is pending restores the previous handler and re-raises the
    signal (SIGINT -> KeyboardInterrupt): a stuck finalisation can still be aborted. Handlers are
    installed only from the main thread (elsewhere this is a no-op flag) and restored on exit.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), message: bool = True):
        self.signals = tuple(signals)
        self.message = message
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # second signal: give up gracefulness
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signal_name = True, name
        if self.message:
            print(
                f"\n{name}: finishing the current chunk, then writing the video and records "
                f"(send {name} again to abort at once)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


# ---------------------------------------------------------------------------------------------
# host memory
# ---------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (getrusage; bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Resident memory of this process now (bytes): /proc on Linux, psutil elsewhere if present."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()


class RssMonitor:
    """Peak resident memory within a `with` block, sampled by a thread every `interval_s` (so
    several measurements fit in one process, unlike `peak_rss_bytes`).

        with RssMonitor() as mon:
            run()
        mon.peak_bytes, mon.start_bytes
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssMonitor:
        self.start_bytes = self.peak_bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
