"""Video files as a grain data source: decoded, centre-cropped, resized, optionally PatchCodec-encoded.

`config.data.source = 'video'` (`pipeline.SOURCES` registers `make_source(exp)`). The pipeline
around it is the one every source shares (per-host shard, shuffle, repeat, encode, batch, worker
processes, checkpointable iterator state); this module owns the files, the clip table, decoding and
the per-clip text.

Files (`config.data.paths`): video files, directories (searched recursively) and glob patterns
(`**` allowed). Directories and globs keep files whose extension is in `VIDEO_EXTENSIONS`; a file
named explicitly is always kept. Each entry is expanded in sorted order, entries keep the order
given, and a file reached twice is kept once, so the same paths give the same index on every host
and every run. An entry that matches nothing is an error naming it.

Clips (`config.data.video`):
  num_frames    T frames per clip
  frame_stride  source frames between two frames of a clip (1: consecutive)
  clip_stride   source frames between the starts of two clips of one file; 0: one clip per file
                (starting at frame 0). A clip spans (T - 1) * frame_stride + 1 source frames.
  max_clips_per_file  0: all
  short_files   'error' (default): a file shorter than one clip is an error listing such files;
                'skip': such files are left out (with a log line)
  frame_count   how a file's frame count is found when the clip table is built:
                'verify' (default): the container's count N, checked by seeking to frame N - 1,
                reading it and finding nothing after it; if that fails (a truncated file, a
                container that guesses its count from the duration), the frames are counted by
                decoding the whole file. 'decode': always count by decoding. 'metadata': trust
                the container (fast, wrong for broken files; reads then fail naming the clip).
  probe_threads threads that open files while the table is built (OpenCV releases the GIL)
  seek          True: jump to a clip's first frame (checked: if the decoder lands elsewhere, the
                file is re-read from frame 0); False: always decode from frame 0
The clip table (file, start frame) of every clip is built once, at construction; global index i
is the i-th clip in (file order, start frame) order.

Pixels: OpenCV (`cv2.VideoCapture`, FFmpeg backend) decodes only the frames a clip needs (after
the seek; skipped frames are grabbed, not converted). Each RGB frame is centre-cropped to the aspect
of `height x width` and resized to `height x width` (`cv2.INTER_AREA` when shrinking, bilinear when
enlarging), then mapped to float32 in [-1, 1] as x / 127.5 - 1 (PanWorld's `to_float`). OpenCV is
imported lazily; without it the error names the `video` extra (`pip install -e '.[video]'`).

Encoding (`config.data.codec`, absent = 'patch'):
  'patch'  `latents [T, H/p, W/p, C]`: the clip through the fixed PatchCodec of `config.vae`
           (kind 'patch'), exactly as PanWorld clips are encoded (`records.EncodePatch`)
  'none'   `video [T, H, W, 3]` pixels in [-1, 1] (the 'vae' objective)
Heavy encoders (the Wan VAE, UMT5) are not run in data workers: `launch/encode_videos.py` encodes
clips and captions once (`data/latents.py`), into ArrayRecord shards that
`config.data.source='arrayrecord'` reads.

Captions (`config.data.video.captions`):
  ''          a sidecar text file per video: `<video without extension>.txt` (else `<video>.txt`)
  a path      a `.json` file ({"<video>": "caption", ...} or a list of objects) or a `.jsonl` file
              (one object per line); an object names its video with "video", "path" or "file" and
              its caption with "caption", "text" or "prompt". A relative video name is taken
              relative to the captions file's directory; a bare file name also matches any video of
              that name (if only one video has it).
  'none'      no text in the records (e.g. the 'vae' objective)
  missing_caption  'error' (default): a video without a caption is an error naming it (all such
              files are listed); 'empty': its caption is '' (the empty, unconditional prompt)
Captions are read at construction, surrounding whitespace stripped.

Text in the records, by `config.text.kind` (what `flow_matching.batch_text` accepts):
  'words'       `prompt_ids int32 [model.text_len]`: the caption's words (`text.split_words`) as ids
                into the PanWorld vocabulary, the ids `WordEmbeddingEncoder.tokenize` gives; the
                trainer's frozen word encoder embeds them. A word outside that vocabulary is an
                error naming the video and the word (this encoder only knows PanWorld's prompts).
  'embeddings'  `text float32 [model.text_len, model.text_dim]`: looked up by caption in
                `config.text.embeddings_path`, an `.npz` of `text.save_embeddings(path, emb,
                prompts)` (`launch/encode_videos.py --embeddings_out` writes one for the captions
                of a video set). A caption without an embedding is an error at construction. The
                table of distinct captions is held in memory by every process (and worker): for
                many distinct captions pre-encode to ArrayRecord instead.
  'umt5'        refused: UMT5 does not belong in data workers; pre-encode (see above).

Records (numpy): video float32 [T, H, W, 3] (codec 'none') or latents float32 [T, h, w, C]
(codec 'patch'); prompt_ids int32 [text_len] or text float32 [text_len, text_dim] (unless captions
'none'); index int64 [] (the global clip index).

Errors: a file that cannot be opened, or has no frames, at construction: ValueError naming the file.
A clip that cannot be read (corrupt or truncated file, too few frames, a file changed since the
table was built): ValueError "bad record <index>: video file <path>, frames ...: <reason>".

Must not know: the pipeline and the other sources (it imports `records` only, and `panworld`'s word
list lazily), models (but the PatchCodec, through `records.EncodePatch`), training, checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os

import numpy as np

from adastate_jax.data import records

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".webm",
    ".mkv",
    ".avi",
    ".gif",
    ".mpg",
    ".mpeg",
    ".ogv",
    ".flv",
    ".wmv",
    ".ts",
)
FRAME_COUNT_MODES = ("verify", "decode", "metadata")
SHORT_FILE_MODES = ("error", "skip")
MISSING_CAPTION_MODES = ("error", "empty")
_CAPTION_FILE_KEYS = ("video", "path", "file")
_CAPTION_TEXT_KEYS = ("caption", "text", "prompt")


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "config.data.source='video' decodes with OpenCV, which is not installed: "
            "pip install -e '.[video]' (opencv-python-headless)"
        ) from e
    return cv2


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _open(cv2, path: str):
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot open video file {path} (OpenCV/FFmpeg)")
    return cap


def count_frames(path: str, mode: str = "verify") -> int:
    """The number of decodable frames of a video file (see `frame_count` in the module docstring)."""
    if mode not in FRAME_COUNT_MODES:
        raise ValueError(f"config.data.video.frame_count: unknown mode {mode!r}; choose {FRAME_COUNT_MODES}")
    cv2 = _cv2()
    cap = _open(cv2, path)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if mode == "metadata" and n > 0:
            return n
        if mode == "verify" and n > 0:
            # the last frame the container announces must exist, and nothing may follow it
            cap.set(cv2.CAP_PROP_POS_FRAMES, n - 1)
            if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == n - 1 and cap.grab() and not cap.grab():
                return n
        cap.release()
        cap = _open(cv2, path)
        count = 0
        while cap.grab():
            count += 1
        return count
    finally:
        cap.release()


def read_frames(
    path: str, start: int, num_frames: int, frame_stride: int = 1, seek: bool = True, size=None
) -> np.ndarray:
    """Frames start, start + stride, ... (num_frames of them) of a video -> uint8 RGB [T, h, w, 3].

    size: (height, width) to centre-crop and resize each frame to as soon as it is decoded (so a
    clip of large frames is never held whole); None keeps the decoded size. Raises ValueError
    (with the reason, naming the file) when the file cannot be opened or ends before the last frame.
    """
    cv2 = _cv2()
    cap = _open(cv2, path)
    try:
        pos = 0
        if start > 0 and seek:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) == start:
                pos = start
            else:  # inexact seek (variable frame rate, odd timestamps): decode from the start
                cap.release()
                cap = _open(cv2, path)
        while pos < start:
            if not cap.grab():
                raise ValueError(f"{path} ends after {pos} frames, before the clip's first frame {start}")
            pos += 1
        frames = None if size is None else np.empty((num_frames, *size, 3), np.uint8)
        kept = []
        for k in range(num_frames):
            want = start + k * frame_stride
            while pos < want:  # skipped frames are decoded but not converted
                if not cap.grab():
                    raise ValueError(f"{path} ends after {pos} frames, before frame {want}")
                pos += 1
            ok, frame = cap.read()
            if not ok or frame is None:
                raise ValueError(f"{path}: frame {want} cannot be decoded (truncated or corrupt file?)")
            pos += 1
            if frame.ndim == 2 or frame.shape[-1] == 1:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
            elif frame.shape[-1] == 4:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
            else:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            if frames is not None:
                frames[k] = _crop_and_resize_frame(cv2, frame, *size)
            else:
                kept.append(frame)
        if frames is not None:
            return frames
        if len({f.shape for f in kept}) != 1:
            raise ValueError(f"{path}: frames {start}.. change size ({sorted({f.shape for f in kept})})")
        return np.stack(kept)
    finally:
        cap.release()


def _crop_and_resize_frame(cv2, f: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = f.shape[:2]
    if w * height > h * width:  # too wide: trim columns
        cw = max(1, int(round(h * width / height)))
        x0 = (w - cw) // 2
        f = f[:, x0 : x0 + cw]
    elif w * height < h * width:  # too tall: trim rows
        ch = max(1, int(round(w * height / width)))
        y0 = (h - ch) // 2
        f = f[y0 : y0 + ch]
    h, w = f.shape[:2]
    if (h, w) == (height, width):
        return f
    interp = cv2.INTER_AREA if (h >= height and w >= width) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(f), (width, height), interpolation=interp)


def crop_and_resize(frames, height: int, width: int) -> np.ndarray:
    """uint8 RGB frames [T, h, w, 3] (or a list) -> uint8 [T, height, width, 3].

    Centre crop to the target aspect (the larger side is trimmed, rounding to whole pixels), then
    area resize when shrinking (`cv2.INTER_AREA`), bilinear when enlarging.
    """
    cv2 = _cv2()
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = _crop_and_resize_frame(cv2, f, height, width)
    return out


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], bitwise as `panworld.to_float` (in place: one allocation)."""
    out = frames.astype(np.float32)
    out /= 127.5
    out -= 1.0
    return out


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _caption_entries(path: str) -> list[tuple[str, str]]:
    """(video name, caption) pairs of a .json / .jsonl captions file."""

    def from_obj(obj, where):
        if not isinstance(obj, dict):
            raise ValueError(f"captions file {path}: {where} is not an object")
        name = next((obj[k] for k in _CAPTION_FILE_KEYS if k in obj), None)
        text = next((obj[k] for k in _CAPTION_TEXT_KEYS if k in obj), None)
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(
                f"captions file {path}: {where} needs a video name ({'/'.join(_CAPTION_FILE_KEYS)}) and a "
                f"caption ({'/'.join(_CAPTION_TEXT_KEYS)}) as strings, got {sorted(obj)}"
            )
        return name, text

    try:
        with open(path, encoding="utf-8") as fh:
            if path.lower().endswith(".jsonl"):
                rows = []
                for i, line in enumerate(fh):
                    if line.strip():
                        rows.append(from_obj(json.loads(line), f"line {i + 1}"))
                return rows
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"config.data.video.captions: cannot read captions file {path}: {e}") from e
    if isinstance(data, dict):
        bad = [k for k, v in data.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"captions file {path}: captions of {bad[:3]} are not strings")
        return list(data.items())
    if isinstance(data, list):
        return [from_obj(obj, f"entry {i}") for i, obj in enumerate(data)]
    raise ValueError(f"captions file {path}: expected an object or a list, got {type(data).__name__}")


def load_captions(files, captions: str, missing: str = "error") -> list[str]:
    """The caption of each video file (see 'Captions' in the module docstring)."""
    if missing not in MISSING_CAPTION_MODES:
        raise ValueError(
            f"config.data.video.missing_caption: unknown mode {missing!r}; choose {MISSING_CAPTION_MODES}"
        )
    found: list[str | None] = [None] * len(files)
    if not captions:  # sidecar text files
        for i, f in enumerate(files):
            for side in (os.path.splitext(f)[0] + ".txt", f + ".txt"):
                if os.path.isfile(side):
                    with open(side, encoding="utf-8") as fh:
                        found[i] = fh.read().strip()
                    break
        where = "no sidecar caption <video>.txt"
    else:
        base = os.path.dirname(os.path.abspath(captions))
        by_path, by_name = {}, {}
        for name, text in _caption_entries(captions):
            by_path[os.path.normpath(os.path.join(base, os.path.expanduser(name)))] = text.strip()
            if os.path.basename(name) == name:
                by_name[name] = text.strip()
        names = {}
        for f in files:
            names.setdefault(os.path.basename(f), []).append(f)
        for i, f in enumerate(files):
            text = by_path.get(os.path.normpath(os.path.abspath(f)))
            if text is None and len(names[os.path.basename(f)]) == 1:
                text = by_name.get(os.path.basename(f))
            found[i] = text
        where = f"no caption in {captions}"
    lacking = [f for f, c in zip(files, found) if c is None]
    if lacking and missing == "error":
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise ValueError(
            f"config.data.video.captions: {len(lacking)} video(s) have {where}: {shown} "
            "(set config.data.video.missing_caption='empty' to train them with the empty prompt, "
            "or captions='none' for no text)"
        )
    return [c if c is not None else "" for c in found]


def word_ids(caption: str, text_len: int, vocab=None, what: str = "caption") -> np.ndarray:
    """Caption -> int32 [text_len] ids of the PanWorld word encoder (0 = padding); the ids
    `WordEmbeddingEncoder.tokenize` gives for the PanWorld vocabulary."""
    from adastate_jax.data.panworld import prompt_vocabulary
    from adastate_jax.text.words import split_words

    vocab = list(prompt_vocabulary()) if vocab is None else list(vocab)
    index = {w: i for i, w in enumerate(vocab) if i > 0}  # vocab[0] is "<pad>"
    words = split_words(caption)
    unknown = [w for w in words if w not in index]
    if unknown:
        raise ValueError(
            f"{what}: caption {caption!r} has word(s) {unknown} outside the PanWorld word encoder's "
            f"vocabulary {vocab[1:]} (config.text.kind='words'); "
            "use text.kind='embeddings' for other captions"
        )
    if len(words) > text_len:
        raise ValueError(f"{what}: caption {caption!r} has {len(words)} words, more than text_len {text_len}")
    ids = np.zeros((text_len,), np.int32)
    ids[: len(words)] = [index[w] for w in words]
    return ids


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from files and sized (`config.data.video`)."""

    num_frames: int = 9
    height: int = 32
    width: int = 32
    frame_stride: int = 1
    clip_stride: int = 0
    max_clips_per_file: int = 0
    short_files: str = "error"
    frame_count: str = "verify"
    seek: bool = True
    probe_threads: int = 4

    def __post_init__(self):
        for f in ("num_frames", "height", "width", "frame_stride", "probe_threads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.data.video.{f}: must be a positive int, got {v!r}")
        for f in ("clip_stride", "max_clips_per_file"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"config.data.video.{f}: must be an int >= 0, got {v!r}")
        if self.short_files not in SHORT_FILE_MODES:
            raise ValueError(
                f"config.data.video.short_files: unknown mode {self.short_files!r}; choose {SHORT_FILE_MODES}"
            )
        if self.frame_count not in FRAME_COUNT_MODES:
            raise ValueError(
                f"config.data.video.frame_count: unknown mode {self.frame_count!r}; "
                f"choose {FRAME_COUNT_MODES}"
            )

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def starts(self, frames: int) -> list[int]:
        if frames < self.span:
            return []
        if self.clip_stride == 0:
            starts = [0]
        else:
            starts = list(range(0, frames - self.span + 1, self.clip_stride))
        return starts[: self.max_clips_per_file] if self.max_clips_per_file else starts


class VideoSource:
    """grain RandomAccessDataSource of clips of video files (see the module docstring).

    files: video paths (already expanded); captions: one per file, or None (no text);
    text: 'none' | 'words' | 'embeddings' (what the records carry); text_len: ids length (words);
    embeddings: {caption: [text_len, text_dim]} (text 'embeddings').
    """

    def __init__(
        self,
        files,
        spec: ClipSpec,
        captions=None,
        text: str = "none",
        text_len: int = 0,
        embeddings=None,
    ):
        self.files = tuple(str(f) for f in files)
        self.spec = spec
        if not self.files:
            raise ValueError("config.data.paths: no video files")
        if text not in ("none", "words", "embeddings"):
            raise ValueError(f"VideoSource text must be 'none', 'words' or 'embeddings', got {text!r}")
        if text != "none" and captions is None:
            raise ValueError(f"VideoSource: text {text!r} needs captions")
        self.captions = None if captions is None else tuple(captions)
        if self.captions is not None and len(self.captions) != len(self.files):
            raise ValueError(f"{len(self.captions)} captions for {len(self.files)} video files")
        self.text = text

        # per-file text, checked now (a bad caption is found before training starts)
        self._ids = self._emb = self._emb_row = None
        if text == "words":
            self._ids = np.stack(
                [word_ids(c, text_len, what=f"video file {f}") for f, c in zip(self.files, self.captions)]
            )
        elif text == "embeddings":
            missing = sorted({c for c in self.captions if c not in embeddings})
            if missing:
                who = [f for f, c in zip(self.files, self.captions) if c in missing]
                raise ValueError(
                    f"config.text.embeddings_path: no embedding for caption(s) {missing[:3]} of video "
                    f"file(s) {who[:3]} (write them with launch/encode_videos.py --embeddings_out)"
                )
            distinct = sorted(set(self.captions))
            row = {c: i for i, c in enumerate(distinct)}
            self._emb = np.stack([np.asarray(embeddings[c], np.float32) for c in distinct])
            self._emb_row = np.asarray([row[c] for c in self.captions], np.int32)

        self.frame_counts = self._probe()
        short = [(f, n) for f, n in zip(self.files, self.frame_counts) if n < spec.span]
        if short and spec.short_files == "error":
            shown = ", ".join(f"{f} ({n} frames)" for f, n in short[:5])
            raise ValueError(
                f"{len(short)} video file(s) are shorter than one clip of {spec.span} frames "
                f"(num_frames={spec.num_frames}, frame_stride={spec.frame_stride}): {shown}"
                f"{' ...' if len(short) > 5 else ''} (config.data.video.short_files='skip' leaves them out)"
            )
        if short:
            log.warning("video source: %d file(s) shorter than %d frames left out", len(short), spec.span)
        file_idx, starts = [], []
        for i, n in enumerate(self.frame_counts):
            s = spec.starts(n)
            file_idx += [i] * len(s)
            starts += s
        if not starts:
            raise ValueError(f"config.data.paths: no clip of {spec.span} frames in {len(self.files)} file(s)")
        self._file = np.asarray(file_idx, np.int32)
        self._start = np.asarray(starts, np.int64)

    def _probe(self) -> list[int]:
        def one(path):
            try:
                n = count_frames(path, self.spec.frame_count)
            except ImportError:
                raise
            except ValueError as e:
                raise ValueError(f"config.data.paths: {e}") from None
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"config.data.paths: cannot read video file {path}: {e}") from e
            if n <= 0:
                raise ValueError(f"config.data.paths: video file {path} has no decodable frames")
            return n

        if self.spec.probe_threads > 1 and len(self.files) > 1:
            with concurrent.futures.ThreadPoolExecutor(self.spec.probe_threads) as ex:
                return list(ex.map(one, self.files))
        return [one(f) for f in self.files]

    def __len__(self) -> int:
        return len(self._start)

    def clip(self, index: int) -> tuple[str, int]:
        """(file, first source frame) of clip `index`."""
        return self.files[int(self._file[index])], int(self._start[index])

    def caption(self, index: int) -> str:
        if self.captions is None:
            raise ValueError("this video source has no captions (config.data.video.captions='none')")
        return self.captions[int(self._file[index])]

    def load_video(self, index: int) -> np.ndarray:
        """float32 [T, H, W, 3] in [-1, 1] of clip `index`; ValueError naming file and index."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        path, start = self.clip(index)
        s = self.spec
        try:
            frames = read_frames(path, start, s.num_frames, s.frame_stride, s.seek, (s.height, s.width))
            return to_float(frames)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"bad record {index}: video file {path}, frames {start}..{start + s.span - 1} "
                f"(stride {s.frame_stride}): {e}"
            ) from e

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        index = int(index)
        rec = {"video": self.load_video(index)}
        f = int(self._file[index])
        if self.text == "words":
            rec["prompt_ids"] = self._ids[f]
        elif self.text == "embeddings":
            rec["text"] = self._emb[self._emb_row[f]]
        rec["index"] = np.int64(index)
        return rec

    def __repr__(self) -> str:
        return (
            f"VideoSource({len(self.files)} files, {len(self)} clips of {self.spec.num_frames} frames "
            f"at {self.spec.height}x{self.spec.width}, text={self.text!r})"
        )


CAPTION_MISSING = ("error", "empty")


@dataclasses.dataclass(frozen=True)
class VideoDataConfig(ClipSpec):
    """`config.data.video`: the clip spec plus where captions come from."""

    captions: str = ""  # '': <video>.txt sidecars | a .json / .jsonl file | 'none' (no text)
    missing_caption: str = "error"  # error | empty (the empty prompt)

    def __post_init__(self):
        super().__post_init__()
        if self.missing_caption not in CAPTION_MISSING:
            raise ValueError(
                f"config.data.video.missing_caption: unknown {self.missing_caption!r}; "
                f"choose {CAPTION_MISSING}"
            )

    @property
    def clip(self) -> ClipSpec:
        fields = {f.name for f in dataclasses.fields(ClipSpec)}
        return ClipSpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


# --------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------


def source_from_config(exp, text: str | None = None) -> VideoSource:
    """The VideoSource of `exp.data` ('video'; `exp` an Experiment). text: override what the records
    carry ('none', 'words', 'embeddings'); default from `config.text.kind` (see the module docstring)."""
    vc = exp.data.video
    spec = vc.clip
    files = records.expand_paths(exp.data.paths, VIDEO_EXTENSIONS)
    captions = None
    if vc.captions != "none":
        captions = load_captions(files, vc.captions, vc.missing_caption)
    if text is None:
        kind = exp.text.kind
        if captions is None:
            text = "none"
        elif kind == "umt5":
            raise ValueError(
                "config.text.kind='umt5' with config.data.source='video': UMT5 is not run in data workers. "
                "Pre-encode clips and captions with launch/encode_videos.py (then "
                "config.data.source='arrayrecord'), or write caption embeddings with "
                "launch/encode_videos.py --embeddings_out=FILE.npz and use text.kind='embeddings'"
            )
        elif kind in ("words", "embeddings"):
            text = kind
        else:
            raise ValueError(f"config.text.kind: unknown kind {kind!r}")
    text_len = exp.model.text_len
    embeddings = None
    if text == "embeddings":
        from adastate_jax.text.embeddings import PrecomputedTextEncoder

        path = exp.text.embeddings_path
        if not path:
            raise ValueError(
                "config.text.kind='embeddings' needs config.text.embeddings_path (an .npz with prompts)"
            )
        enc = PrecomputedTextEncoder.from_file(path, text_len=text_len)
        if enc.text_dim != exp.model.text_dim:
            raise ValueError(
                f"{path}: embeddings have text_dim {enc.text_dim}, "
                f"config.model.text_dim is {exp.model.text_dim}"
            )
        embeddings = {}
        for c in sorted(set(captions)):
            try:
                embeddings[c] = enc.encode([c])[0]
            except KeyError:
                pass  # VideoSource names the captions without an embedding and their videos
    return VideoSource(files, spec, captions, text=text, text_len=text_len, embeddings=embeddings)


def make_source(exp):
    """`config.data.source='video'` (registered in `pipeline.SOURCES`): (VideoSource, encode
    transform or None)."""
    codec = exp.data.codec
    if codec == "patch" and exp.vae.kind != "patch":
        raise ValueError(
            "config.data.codec='patch' encodes clips with the PatchCodec, but "
            f"config.vae.kind={exp.vae.kind!r}: "
            "pre-encode with launch/encode_videos.py (config.data.source='arrayrecord'), or use codec 'none'"
        )
    source = source_from_config(exp)
    objective = exp.train.objective if exp.train is not None else ""
    if source.text == "none" and objective != "vae":
        raise ValueError(
            f"config.data.video.captions='none' gives records without text; config.train.objective="
            f"{objective!r} needs captions (only the 'vae' objective trains without them)"
        )
    if codec == "none":
        return source, None
    spec = records.codec_spec(exp)
    s = source.spec
    if s.height % spec.patch or s.width % spec.patch:
        raise ValueError(
            f"config.data.video: frames {s.height}x{s.width} are not divisible by the PatchCodec's "
            f"patch {spec.patch}"
        )
    return source, records.EncodePatch(spec)
