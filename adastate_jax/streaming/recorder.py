"""A rollout written as it is made: segments of a `Streamer` rollout -> video, state video, JSON-lines
records, in host memory that does not grow with the number of chunks.

Owns:
  * `RolloutFiles` / `rollout_files(out, show_state)`: the files of a rollout (`<out>` .mp4/.gif,
    `<base>_state.mp4`, `<base>_beside.mp4` (the video with each chunk's decoded state to its right),
    `<base>.jsonl`, `<base>.json`), checked before any work is done: the video
    extension, a folder that exists or can be made and is writable, ffmpeg present.
  * `PromptSchedule`: prompt switches `{chunk: prompt_id}` as data, iterated lazily (unbounded
    when `num_chunks == 0`), `at(chunk)` for any chunk; memory O(number of switches).
  * `chunk_video`, `chunk_record`: host views of chunk i of a segment (frames to show, one record).
  * `StateDecoder`: the adaptive state's latents decoded as a stream of their own (own decode
    cache, so chunk by chunk equals decoding the whole state sequence at once).
  * `read_rollout(summary_path)`: a finished rollout's summary with its per-chunk records folded
    back in (`prompt_schedule` [N], `attention_share` [N, L, 3], `chunk_latency_s` [N]), the view
    an evaluation of videos on disk needs.
  * `write_rollout(...)`: the loop. It consumes `Streamer.rollout_segments`, copies one segment at
    a time to the host, hands each chunk to the video writer(s) and the record writer, and stops
    after the current segment when `stop` becomes true. Returns counts and latency summaries; the
    caller writes the summary JSON (it knows the settings).
Memory: the device holds the carry and at most two segments of outputs (`rollout_segments`), the
host one segment plus one chunk being encoded; records go to disk line by line and latency is
summarised in O(1) (`writers.RunningStats`).
Latency: a chunk's `latency_s` is the wall time between the arrival of its segment on the host and
the arrival of the previous one, divided by the segment's chunks (the period of the pipeline, the
writing included since the device computes segment i + 1 while segment i is written). With
`segment_chunks=1` it is each chunk's own; the first segment includes compilation.
Must not know: command lines, config files, how models or prompts are loaded.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from adastate_jax import video
from adastate_jax.streaming import writers
from adastate_jax.streaming.rollout import ChunkOut, attention_shares

# ---------------------------------------------------------------------------------------------
# files, checked before the work
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutFiles:
    video: str  # .mp4 or .gif
    state_video: str | None  # <base>_state.mp4, or None
    records: str  # <base>.jsonl: one record per chunk
    summary: str  # <base>.json: settings and totals, written atomically
    beside_video: str | None = None  # <base>_beside.mp4: the video with its chunk's state beside it


def rollout_files(out: str, show_state: bool = False, name: str = "--out") -> RolloutFiles:
    """The files of a rollout whose video is `out`, validated so that a bad path fails before any
    model is built: the extension must be one of `writers.VIDEO_EXTENSIONS`, the folder must exist
    or be creatable and writable, `out` must not be a folder, ffmpeg must be installed. Errors
    start with `{name}={out}`."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in writers.VIDEO_EXTENSIONS:
        raise ValueError(
            f"{name}={out}: the video must end in one of {', '.join(writers.VIDEO_EXTENSIONS)} "
            f"(got {ext or 'no extension'!r})"
        )
    if os.path.isdir(out):
        raise ValueError(f"{name}={out}: is a folder; give a video file path")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{name}={out}: cannot write in the folder {folder} ({e.strerror or e})") from None
    writers.ffmpeg_exe()  # raises naming the `video` extra when imageio-ffmpeg is missing
    base = os.path.splitext(out)[0]
    return RolloutFiles(
        video=out,
        state_video=base + "_state.mp4" if show_state else None,
        records=base + ".jsonl",
        summary=base + ".json",
        beside_video=base + "_beside.mp4" if show_state else None,
    )


# ---------------------------------------------------------------------------------------------
# the prompt schedule as switch points
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptSchedule:
    """Prompt 0 until the first switch; `switches` are sorted (chunk, prompt_id) pairs.
    `num_chunks == 0`: the schedule never ends (iteration is unbounded)."""

    switches: tuple[tuple[int, int], ...]
    num_prompts: int
    num_chunks: int = 0

    def __post_init__(self):
        if self.num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0 (0: until interrupted), got {self.num_chunks}")
        chunks = [c for c, _ in self.switches]
        if chunks != sorted(set(chunks)):
            raise ValueError(f"prompt switches must name distinct chunks in order, got {list(self.switches)}")
        for chunk, pid in self.switches:
            if chunk < 0 or (self.num_chunks and chunk >= self.num_chunks):
                raise ValueError(
                    f"prompt switch at chunk {chunk} is outside the rollout's {self.num_chunks} chunks"
                )
            if not 0 <= pid < self.num_prompts:
                raise ValueError(
                    f"prompt switch at chunk {chunk} names prompt {pid}; there are {self.num_prompts} prompts"
                )

    @classmethod
    def parse(cls, spec: str, num_prompts: int, num_chunks: int = 0) -> PromptSchedule:
        """'chunk:prompt_index,...' (e.g. '0:0,20:1'; empty: prompt 0 throughout)."""
        switches = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                c, p = item.split(":")
                chunk, pid = int(c), int(p)
            except ValueError:
                raise ValueError(f"prompt schedule entry {item!r} is not 'chunk:prompt_index'") from None
            if chunk in switches:
                raise ValueError(f"prompt schedule names chunk {chunk} twice ({spec!r})")
            switches[chunk] = pid
        return cls(tuple(sorted(switches.items())), num_prompts, num_chunks)

    def at(self, chunk: int) -> int:
        """The prompt id of chunk `chunk`."""
        i = bisect.bisect_right([c for c, _ in self.switches], chunk)
        return self.switches[i - 1][1] if i else 0

    def __iter__(self) -> Iterator[int]:
        switches = dict(self.switches)
        pid = 0
        for chunk in range(self.num_chunks) if self.num_chunks else itertools.count():
            pid = switches.get(chunk, pid)
            yield pid


# ---------------------------------------------------------------------------------------------
# one chunk on the host
# ---------------------------------------------------------------------------------------------


def chunk_video(outs: ChunkOut, i: int, batch_index: int = 0, preview_range=None) -> np.ndarray:
    """Frames to show for chunk i of a host segment `outs` (leaves [n, B, ...]): the decoded pixels
    [T, H, W, 3], or without a decoder a preview of the latents [F, h, w, 3] scaled from
    `preview_range` (`video.latents_to_rgb`)."""
    if outs.frames is not None:
        return np.asarray(outs.frames[i, batch_index])
    return video.latents_to_rgb(outs.latents[i, batch_index], preview_range)


def chunk_record(stream_cfg, chunk: int, outs: ChunkOut, i: int, **fields) -> dict:
    """The record of chunk `chunk` (row i of host segment `outs`): its index, `fields` (prompt id,
    latency, ...), the temporal positions of the keys it attended to and which were visible
    ([S + F_s + F]), and with instrumentation the attention share [layer][anchor, window, current]."""
    rec = dict(chunk=int(chunk), **fields)
    rec["positions"] = np.asarray(outs.positions[i]).tolist()
    rec["key_valid"] = np.asarray(outs.key_valid[i]).astype(int).tolist()
    if outs.key_mass is not None:
        rec["attention_share"] = np.round(attention_shares(stream_cfg, np.asarray(outs.key_mass[i])), 5)
    return rec


class StateDecoder:
    """Decodes the state latents [F_s, h, w, C] of consecutive chunks as one causal stream with its
    own decode cache (batch 1): the frames equal decoding the whole state sequence at once. The
    decoder's `lead_frames` are the caller's to skip (as for the video)."""

    def __init__(self, decoder, decoder_params, latent_h: int, latent_w: int):
        self.decoder_params = decoder_params
        self.cache = decoder.init_cache(decoder_params, 1, latent_h, latent_w)
        self._decode = jax.jit(decoder.decode_chunk, donate_argnums=(1,))

    def __call__(self, state: np.ndarray) -> np.ndarray:
        self.cache, frames = self._decode(self.decoder_params, self.cache, np.asarray(state)[None])
        return np.asarray(frames[0])  # [T, H, W, 3]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def write_rollout(
    streamer,
    params,
    carry,
    schedule: PromptSchedule,
    prompts,
    files: RolloutFiles,
    *,
    segment_chunks: int = 1,
    decoder_params=None,
    fps: float = 16.0,
    min_size: int = 256,
    batch_index: int = 0,
    stop=None,
    on_chunk: Callable[[int, float], None] | None = None,
    on_frames: Callable[[int, np.ndarray], None] | None = None,
) -> dict:
    """Roll `streamer` out over `schedule` in segments of `segment_chunks` and write every chunk as
    it arrives (see the module docstring). `stop`: anything whose truth means "stop after this
    segment" (e.g. `writers.GracefulStop`). `on_chunk(chunk, latency_s)` is called per chunk
    written (a progress bar); `on_frames(chunk, frames [T, H, W, 3])` gets each chunk's decoded
    pixels as they are written (lead frames dropped; only with a decoder), e.g. a camera tracker.
    Every file is finalised on return, on a stop and on an exception.

    Returns {num_chunks, video_frames, state_frames, beside_frames, first_segment_s, latency (chunks after the
    first segment: `RunningStats.as_dict`), elapsed_s}."""
    sc, dec = streamer.stream_cfg, streamer.decoder
    lead = dec.lead_frames if dec is not None else 0
    state_decode = None
    if files.state_video and dec is not None:
        state_decode = StateDecoder(dec, decoder_params, sc.latent_h, sc.latent_w)
    stats = writers.RunningStats()
    preview = state_pv = None  # latent preview scales (video, state), fixed by the first chunk
    first_segment_s = None
    num_chunks = 0
    t_start = t_prev = time.perf_counter()
    with contextlib.ExitStack() as stack:
        vw = stack.enter_context(writers.VideoStreamWriter(files.video, fps, min_size, skip_frames=lead))
        sw = bw = None
        if files.state_video:
            sw = writers.VideoStreamWriter(files.state_video, fps / 3, min_size, skip_frames=lead)
            stack.enter_context(sw)
        if files.state_video and files.beside_video:
            bw = writers.VideoStreamWriter(files.beside_video, fps, min_size, skip_frames=lead)
            stack.enter_context(bw)
        rw = stack.enter_context(writers.RecordWriter(files.records))
        segments = streamer.rollout_segments(
            params, carry, iter(schedule), prompts, segment_chunks, decoder_params=decoder_params
        )
        stack.callback(segments.close)  # a stop or an error discards the segment in flight
        for seg in segments:
            outs = jax.device_get(seg.outs)  # one segment on the host
            now = time.perf_counter()
            n = seg.num_chunks
            latency = (now - t_prev) / n
            t_prev = now
            if first_segment_s is None:
                first_segment_s = now - t_start
            else:
                stats.extend([latency] * n)
            if outs.frames is None and preview is None:
                preview = video.latent_value_range(outs.latents[0, batch_index])
            if sw is not None and state_decode is None and state_pv is None:
                state_pv = video.latent_value_range(outs.state[0, batch_index])
            for i in range(n):
                chunk = seg.start + i
                frames = chunk_video(outs, i, batch_index, preview)
                vw.write(frames)
                if on_frames is not None and outs.frames is not None:
                    on_frames(chunk, frames[lead:] if chunk == 0 else frames)
                if sw is not None:
                    state = outs.state[i, batch_index]  # [F_s, h, w, C]
                    shown = state_decode(state) if state_decode else video.latents_to_rgb(state, state_pv)
                    sw.write(shown)
                    if bw is not None:  # the chunk's frames, the state it committed beside them
                        bw.write(video.beside(frames, np.asarray(shown[-1], np.asarray(frames).dtype)))
                rw.write(
                    chunk_record(
                        sc,
                        chunk,
                        outs,
                        i,
                        prompt_id=schedule.at(chunk),
                        latency_s=round(latency, 6),
                        t_s=round(now - t_start, 4),
                        frames=vw.frames_written,
                    )
                )
                num_chunks += 1
                if on_chunk is not None:
                    on_chunk(chunk, latency)
            if stop:
                break
    return dict(
        num_chunks=num_chunks,
        video_frames=vw.frames_written,
        state_frames=0 if sw is None else sw.frames_written,
        beside_frames=0 if bw is None else bw.frames_written,
        first_segment_s=first_segment_s,
        latency=stats.as_dict(),
        elapsed_s=time.perf_counter() - t_start,
    )


def read_rollout(summary_path: str) -> dict:
    """The summary JSON of a rollout plus its records (`records`, a .jsonl beside it) folded into
    arrays over the chunks written: `prompt_schedule` [N] ids, `chunk_latency_s` [N], and with
    instrumentation `attention_share` [N][layer][group]. Reads every record (offline use)."""
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    path = summary.get("records") or os.path.splitext(summary_path)[0] + ".jsonl"
    if not os.path.exists(path):  # a folder that moved: the records sit beside the summary
        path = os.path.join(os.path.dirname(summary_path), os.path.basename(path))
    records = writers.read_records(path)
    summary["prompt_schedule"] = [r["prompt_id"] for r in records]
    summary["chunk_latency_s"] = [r["latency_s"] for r in records]
    if records and "attention_share" in records[0]:
        summary["attention_share"] = [r["attention_share"] for r in records]
    return summary
