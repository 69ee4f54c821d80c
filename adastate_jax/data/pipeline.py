"""Grain input pipelines for training: records -> latents (+ prompt ids or text embeddings) -> batches.

Owns: the source registry `SOURCES` (`config.data.source` name -> factory(exp) returning
(random-access source, per-record encode transform or None); `SOURCE_NAMES`, the names the config
schema accepts, is read from it), the PanWorld and ArrayRecord-latents factories, and the pipeline
  source -> per-host shard (jax.process_index() :: process_count) -> shuffle (re-shuffled every
  epoch) -> repeat -> encode -> batch (local batch) -> iterator (optional worker processes)
whose iterator state is JSON-checkpointable (`get_state` / `set_state`), so a resumed run reads
exactly the batches an uninterrupted run would.

`config.data.codec` (PanWorld and video): 'patch' encodes the clip through the PatchCodec into
`latents` (the DiT objectives); 'none' passes the pixels through as `video` (the 'vae' objective,
which trains its own codec).

Records given to the trainer (numpy):
  latents     float32 [F, h, w, C]          (codec 'patch' / ArrayRecord)  or
  video       float32 [T, H, W, 3] in [-1, 1] (codec 'none')
  prompt_ids  int32   [max_prompt_words]   (PanWorld; the trainer embeds them)  or
  text        float32 [T, text_dim]        (ArrayRecord latents: pre-computed embeddings)
  index       int64   []                   source index (for checking the data order)
(plus `trajectory` for stored ODE trajectories, `data/trajectories.py`).

The sources' own modules (`panworld`, `video_source`, `trajectories`) and the shared pieces
(`records`: ArrayRecord reading, latents records, PatchCodec transform, path expansion) import none
of this module: it is the only place that knows them all. A bad record raises an error naming the
file and index. Transforms live at module level (grain workers are spawned processes that pickle them).

Must not know: models' internals, training, checkpoints (the caller saves `get_state()`).
"""

from __future__ import annotations

import grain
import numpy as np

from adastate_jax.data import panworld, records, trajectories, video_source

# --------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------


class PanWorldVideo(grain.transforms.Map):
    """PanWorld record -> {'video', 'prompt_ids', 'index'} (raw pixels, `config.data.codec='none'`)."""

    def map(self, record):
        return {
            "video": np.asarray(record["video"], np.float32),  # [T, H, W, 3] in [-1, 1]
            "prompt_ids": np.asarray(record["prompt_ids"], np.int32),
            "index": np.int64(record["index"]),
        }


def panworld_source(exp):
    """`config.data.source='panworld'`: procedural clips, through the PatchCodec unless codec 'none'."""
    source = panworld.PanWorldSource(exp.data.panworld)
    if exp.data.codec == "patch":
        return source, records.EncodePatch(records.codec_spec(exp))
    return source, PanWorldVideo()


def arrayrecord_source(exp):
    """`config.data.source='arrayrecord'`: pre-encoded latents + text embeddings (files, directories
    or globs of .array_record shards); no encode transform."""
    paths = records.expand_paths(exp.data.paths, records.LATENTS_EXTENSIONS)
    return records.LatentsArrayRecordSource(paths), None


# name -> factory(exp) -> (random-access source, encode transform or None); record i is clip i
SOURCES = {
    "panworld": panworld_source,
    "arrayrecord": arrayrecord_source,
    "video": video_source.make_source,  # video files decoded, resized, optionally encoded
    "ode_trajectories": trajectories.make_source,  # stored teacher ODE trajectories (ode_init)
}
SOURCE_NAMES = tuple(SOURCES)


def source_and_encode(exp):
    """(random-access source of `config.data.source`, per-record encode transform or None): the
    unshuffled records of `make_dataset` (record i of the source is clip i). `exp`: an Experiment."""
    factory = SOURCES.get(exp.data.source)
    if factory is None:
        raise ValueError(
            f"config.data.source: unknown source {exp.data.source!r}; choose from {SOURCE_NAMES}"
        )
    return factory(exp)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


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
