"""Grain input pipelines for training: records -> latents (+ prompt ids or text embeddings) -> batches.

Owns: the `config.data` section's meaning, the per-record encode transform (PanWorld frames through
the fixed `PatchCodec`), the ArrayRecord latents source and its writer, and the pipeline
  source -> per-host shard (jax.process_index() :: process_count) -> shuffle (re-shuffled every
  epoch) -> repeat -> encode -> batch (local batch) -> iterator (optional worker processes)
whose iterator state is JSON-checkpointable (`get_state` / `set_state`), so a resumed run reads
exactly the batches an uninterrupted run would.

`config.data.codec` (PanWorld only; absent = 'patch'): 'patch' encodes the clip through the
PatchCodec into `latents` (the DiT objectives); 'none' passes the pixels through as `video` (the
'vae' objective, which trains its own codec).

Records given to the trainer (numpy):
  latents     float32 [F, h, w, C]          (codec 'patch' / ArrayRecord)  or
  video       float32 [T, H, W, 3] in [-1, 1] (PanWorld with codec 'none')
  prompt_ids  int32   [max_prompt_words]   (PanWorld; the trainer embeds them)  or
  text        float32 [T, text_dim]        (ArrayRecord latents: pre-computed embeddings)
  index       int64   []                   source index (for checking the data order)

A bad record raises an error naming the file and index. Transforms live at module level (grain
workers are spawned processes that pickle them).

Must not know: models' internals, training, checkpoints (the caller saves `get_state()`).
"""

from __future__ import annotations

import dataclasses
import io
import threading

import grain
import numpy as np

from adastate_jax.data import panworld

# --------------------------------------------------------------------------------------------
# Encoding (PanWorld frames -> codec latents)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """The fixed PatchCodec of `config.vae` (kind 'patch'): p x p patches -> C channels."""

    patch: int = 4
    latent_channels: int = 48
    projection: str = "none"


class EncodePanWorld(grain.transforms.Map):
    """PanWorld record -> {'latents', 'prompt_ids', 'index'} (video through the PatchCodec)."""

    def __init__(self, codec: CodecSpec):
        self.codec = codec
        self._module = None

    def _codec(self):
        if self._module is None:
            from adastate_jax.models.vae import PatchCodec

            c = self.codec
            self._module = PatchCodec(c.patch, c.latent_channels, c.projection)
        return self._module

    def __getstate__(self):
        return {"codec": self.codec, "_module": None}

    def map(self, record):
        video = record["video"]  # [T, H, W, 3] in [-1, 1]
        z = np.asarray(self._codec().encode(video[None]))[0]  # [T, H/p, W/p, C]
        return {
            "latents": z.astype(np.float32),
            "prompt_ids": np.asarray(record["prompt_ids"], np.int32),
            "index": np.int64(record["index"]),
        }


class PanWorldVideo(grain.transforms.Map):
    """PanWorld record -> {'video', 'prompt_ids', 'index'} (raw pixels, `config.data.codec='none'`)."""

    def map(self, record):
        return {
            "video": np.asarray(record["video"], np.float32),  # [T, H, W, 3] in [-1, 1]
            "prompt_ids": np.asarray(record["prompt_ids"], np.int32),
            "index": np.int64(record["index"]),
        }


# --------------------------------------------------------------------------------------------
# ArrayRecord latents (the real-data path): one record = one pre-encoded clip + text embeddings
# --------------------------------------------------------------------------------------------


def serialize_latent_record(latents: np.ndarray, text: np.ndarray, index: int) -> bytes:
    """latents [F, h, w, C], text [T, D] -> bytes (an .npz without pickles)."""
    buf = io.BytesIO()
    np.savez(
        buf, latents=np.asarray(latents, np.float32), text=np.asarray(text, np.float32), index=np.int64(index)
    )
    return buf.getvalue()


def write_latents_arrayrecord(path: str, records) -> int:
    """Write (latents [F, h, w, C], text [T, D]) pairs to an ArrayRecord file; returns the count.

    The small writer tool of the real-data path: encode videos and prompts once (VAE, UMT5), write
    them here, and train with `config.data.source='arrayrecord'`, `config.data.paths=(path, ...)`.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    n = 0
    try:
        for latents, text in records:
            writer.write(serialize_latent_record(latents, text, n))
            n += 1
    finally:
        writer.close()
    return n


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


class LatentsArrayRecordSource(ArrayRecordSource):
    """ArrayRecord files of `serialize_latent_record` records -> {'latents', 'text', 'index'}."""

    def decode(self, raw: bytes, index: int) -> dict:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            rec = {"latents": z["latents"], "text": z["text"], "index": np.int64(index)}
        if rec["latents"].ndim != 4 or rec["text"].ndim != 2:
            raise ValueError(
                f"latents {rec['latents'].shape} must be [F, h, w, C] and text {rec['text'].shape} [T, D]"
            )
        return rec


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def codec_spec(exp) -> CodecSpec:
    """The PatchCodec of `config.vae.patch` with the DiT's latent channels, as a picklable spec."""
    if exp.vae.kind != "patch":
        raise ValueError(
            f"config.vae.kind={exp.vae.kind!r}: the PanWorld / video pipelines encode with the PatchCodec "
            "('patch'); pre-encode other VAEs into ArrayRecord latents (config.data.source='arrayrecord')"
        )
    return CodecSpec(
        patch=exp.vae.patch.patch, latent_channels=exp.model.in_channels, projection=exp.vae.patch.projection
    )


SOURCES = ("panworld", "arrayrecord", "video", "ode_trajectories")


def source_and_encode(exp):
    """(random-access source of `config.data.source`, per-record encode transform or None): the
    unshuffled records of `make_dataset` (record i of the source is clip i). `exp`: an Experiment."""
    data = exp.data
    if data.source == "panworld":
        source = panworld.PanWorldSource(data.panworld)
        encode = EncodePanWorld(codec_spec(exp)) if data.codec == "patch" else PanWorldVideo()
    elif data.source == "arrayrecord":  # files, directories or globs of .array_record shards
        from adastate_jax.data.video_source import expand_paths

        source = LatentsArrayRecordSource(expand_paths(data.paths, (".array_record",)))
        encode = None
    elif data.source == "video":  # video files decoded, resized, optionally encoded
        from adastate_jax.data import video_source

        source, encode = video_source.make_source(exp)
    elif data.source == "ode_trajectories":  # stored teacher ODE trajectories (ode_init)
        from adastate_jax.data import trajectories

        source, encode = trajectories.make_source(exp)
    else:
        raise ValueError(f"config.data.source: unknown source {data.source!r}; choose from {SOURCES}")
    return source, encode


def make_dataset(exp, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The per-host IterDataset of local batches for the Experiment `exp` (see the module docstring)."""
    data = exp.data
    global_batch = int(exp.train.batch_size)
    if global_batch % process_count:
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by the {process_count} processes"
        )
    local_batch = global_batch // process_count
    source, encode = source_and_encode(exp)
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if bool(data.shuffle):
        ds = ds.shuffle(seed=int(data.seed))
    ds = ds.repeat(None)
    if encode is not None:
        ds = ds.map(encode)
    ds = ds.batch(local_batch, drop_remainder=True)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)
    )
    workers = int(data.worker_count)
    if workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def make_iterator(exp, *, process_index: int = 0, process_count: int = 1):
    """A checkpointable iterator of local batches (`get_state()` -> dict, `set_state(dict)`)."""
    return iter(make_dataset(exp, process_index=process_index, process_count=process_count))
