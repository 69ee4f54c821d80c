"""The leaf of the data package: the pieces every source shares.

Owns:
- `expand_paths`: files, directories (recursive) and glob patterns -> a sorted, de-duplicated file
  list (the reading of `config.data.paths` by every file-backed source);
- `ArrayRecordSource`: a grain random-access source over ArrayRecord files whose subclasses decode
  one record; a record that fails to decode raises a ValueError naming the file and index;
- the latents record of the real-data path (`config.data.source='arrayrecord'`): one pre-encoded clip
  + its text embeddings as an `.npz` without pickles (`serialize_latent_record`,
  `decode_latent_record`), the file writer `write_latents_arrayrecord` and the source
  `LatentsArrayRecordSource` -> {'latents' float32 [F, h, w, C], 'text' float32 [T, D], 'index' int64};
- the fixed PatchCodec as data workers use it: `CodecSpec` (picklable: `config.vae.patch` with the
  DiT's latent channels, `codec_spec(exp)`) and `EncodePatch`, the per-record transform
  'video' [T, H, W, 3] in [-1, 1] -> 'latents' float32 [T, H/p, W/p, C] (other text fields and
  'index' kept).

Transforms live at module level (grain workers are spawned processes that pickle them).

Must not know: the other data modules (it imports none of them), models (but `models.vae.PatchCodec`,
built lazily inside `CodecSpec.module`), training, checkpoints, configs (an Experiment is read by
duck typing in `codec_spec`).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import threading

import grain
import numpy as np

LATENTS_EXTENSIONS = (".array_record",)

# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def expand_paths(entries, extensions, what: str = "config.data.paths") -> list[str]:
    """Files, directories (recursive) and glob patterns -> a sorted, de-duplicated list of files.

    Directories and globs keep files whose (lowercase) extension is in `extensions`; files named
    explicitly are always kept. Each entry is sorted; entries keep their order; a file reached twice
    is kept once; an entry matching nothing raises a ValueError naming it (and `what`).
    """
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    entries = [os.fspath(e) for e in entries]
    if not entries:
        raise ValueError(f"{what}: no paths given")
    exts = tuple(e.lower() for e in extensions)
    out, seen = [], set()
    for entry in entries:
        path = os.path.expanduser(entry)
        if os.path.isdir(path):
            found = [
                os.path.join(root, f)
                for root, _, files in os.walk(path, followlinks=True)
                for f in files
                if f.lower().endswith(exts)
            ]
        elif glob.has_magic(path):
            found = [
                p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.lower().endswith(exts)
            ]
        elif os.path.isfile(path):
            found = [path]
        else:
            raise ValueError(f"{what}: {entry!r} does not exist")
        if not found:
            raise ValueError(f"{what}: {entry!r} matches no file ending in {', '.join(exts)}")
        for p in sorted(found):
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# The PatchCodec in data workers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """The fixed PatchCodec of `config.vae.patch` (p x p patches -> `latent_channels`), picklable."""

    patch: int
    latent_channels: int
    projection: str

    def module(self):
        from adastate_jax.models.vae import PatchCodec

        return PatchCodec(self.patch, self.latent_channels, self.projection)


def codec_spec(exp) -> CodecSpec:
    """The PatchCodec of `config.vae.patch` with the DiT's latent channels (`config.model.in_channels`).

    Raises a ValueError naming `config.vae.kind` when the run's codec is not the PatchCodec."""
    if exp.vae.kind != "patch":
        raise ValueError(
            f"config.vae.kind={exp.vae.kind!r}: the PanWorld / video pipelines encode with the PatchCodec "
            "('patch'); pre-encode other VAEs into ArrayRecord latents (config.data.source='arrayrecord')"
        )
    return CodecSpec(
        patch=exp.vae.patch.patch, latent_channels=exp.model.in_channels, projection=exp.vae.patch.projection
    )


class EncodePatch(grain.transforms.Map):
    """Record with 'video' float32 [T, H, W, 3] in [-1, 1] -> {'latents' float32 [T, H/p, W/p, C],
    'prompt_ids' int32 / 'text' float32 when present, 'index' int64}. The codec module is built
    lazily, once per worker process."""

    def __init__(self, codec: CodecSpec):
        self.codec = codec
        self._module = None

    def _codec(self):
        if self._module is None:
            self._module = self.codec.module()
        return self._module

    def __getstate__(self):
        return {"codec": self.codec, "_module": None}

    def map(self, record):
        z = np.asarray(self._codec().encode(record["video"][None]))[0]  # [T, H/p, W/p, C]
        out = {"latents": z.astype(np.float32)}
        if "prompt_ids" in record:
            out["prompt_ids"] = np.asarray(record["prompt_ids"], np.int32)
        if "text" in record:
            out["text"] = np.asarray(record["text"], np.float32)
        out["index"] = np.int64(record["index"])
        return out


# --------------------------------------------------------------------------------------------
# ArrayRecord files
# --------------------------------------------------------------------------------------------


class ArrayRecordSource:
    """grain RandomAccessDataSource over ArrayRecord files; a subclass decodes one record (`decode`).

    Readers open lazily (per worker process, under a lock). A record that fails to decode raises a
    ValueError naming the file and the record's index in it. Shared by `LatentsArrayRecordSource`
    and the stored ODE trajectories (`data/trajectories.py`).
    """

    def __init__(self, paths):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = tuple(str(p) for p in paths)
        if not self.paths:
            raise ValueError("config.data.paths: no ArrayRecord files given")
        sizes = []
        for p in self.paths:
            try:
                r = ArrayRecordReader(p)
                sizes.append(r.num_records())
                r.close()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"config.data.paths: cannot open ArrayRecord file {p}: {e}") from e
        self._offsets = np.cumsum([0] + sizes)
        self._readers = None
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_readers"] = None
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int):
        f = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return f, index - int(self._offsets[f])

    def decode(self, raw: bytes, index: int) -> dict:
        """bytes of one record -> the trainer's record (raise on anything malformed)."""
        raise NotImplementedError

    def __getitem__(self, index):
        from array_record.python.array_record_module import ArrayRecordReader

        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        f, local = self._locate(index)
        with self._lock:
            if self._readers is None:
                self._readers = [None] * len(self.paths)
            if self._readers[f] is None:
                self._readers[f] = ArrayRecordReader(self.paths[f])
            reader = self._readers[f]
        try:
            return self.decode(reader.read([local])[0], index)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"bad record {local} of {self.paths[f]} (global index {index}): {e}") from e


def count_records(path: str) -> int:
    """The number of records of an ArrayRecord file (raises if it cannot be opened)."""
    from array_record.python.array_record_module import ArrayRecordReader

    r = ArrayRecordReader(str(path))
    try:
        return int(r.num_records())
    finally:
        r.close()


def write_arrayrecord(path: str, records) -> int:
    """Write an iterable of bytes to an ArrayRecord file (`group_size:1`: random access per
    record); returns the count. Not atomic: write to `files.atomic_path(path)` for that."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for raw in records:
            writer.write(raw)
            n += 1
    finally:
        writer.close()
    return n


# --------------------------------------------------------------------------------------------
# Latents records (the real-data path): one record = one pre-encoded clip + text embeddings
# --------------------------------------------------------------------------------------------


def serialize_latent_record(latents: np.ndarray, text: np.ndarray, index: int) -> bytes:
    """latents [F, h, w, C], text [T, D] -> bytes (an .npz without pickles)."""
    buf = io.BytesIO()
    np.savez(
        buf, latents=np.asarray(latents, np.float32), text=np.asarray(text, np.float32), index=np.int64(index)
    )
    return buf.getvalue()


def decode_latent_record(raw: bytes, index: int) -> dict:
    """bytes of `serialize_latent_record` -> {'latents' [F, h, w, C], 'text' [T, D], 'index'}
    (`index`: the position in the source); ValueError on a wrong rank."""
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        rec = {"latents": z["latents"], "text": z["text"], "index": np.int64(index)}
    if rec["latents"].ndim != 4 or rec["text"].ndim != 2:
        raise ValueError(
            f"latents {rec['latents'].shape} must be [F, h, w, C] and text {rec['text'].shape} [T, D]"
        )
    return rec


def write_latents_arrayrecord(path: str, records) -> int:
    """Write (latents [F, h, w, C], text [T, D]) pairs to an ArrayRecord file; returns the count.

    The small writer of the real-data path (`data/latents.py` encodes video files into shards of
    these); train with `config.data.source='arrayrecord'`, `config.data.paths=(path, ...)`.
    """
    return write_arrayrecord(
        path, (serialize_latent_record(latents, text, n) for n, (latents, text) in enumerate(records))
    )


class LatentsArrayRecordSource(ArrayRecordSource):
    """ArrayRecord files of `serialize_latent_record` records -> {'latents', 'text', 'index'}."""

    def decode(self, raw: bytes, index: int) -> dict:
        return decode_latent_record(raw, index)
