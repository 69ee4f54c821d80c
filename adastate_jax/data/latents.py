"""Encode video files once into ArrayRecord shards of latents + text embeddings (the real-data path).

Owns `encode_videos(exp, options, text_encoder=..., codec=...)` (what `launch/encode_videos.py`
runs) and the output directory it writes:

    OUT/shard-KKKKK-of-NNNNN.array_record   `options.shard_size` clips each (`records` latents
                                            records: latents [F, h, w, C], text [T, D], index);
                                            record r of shard k is clip k * shard_size + r
    OUT/manifest.json                       the settings the shards were written with
    OUT/clips.jsonl                         one line per clip: shard, record, clip, file, start, caption
    OUT/paths.txt                           the shard paths, one a line (for `config.data.paths`)

Steps: the clips of `config.data` are read exactly as the `video` source reads them
(`video_source.source_from_config`: clip table, captions, crop and resize); each distinct caption is
encoded once by `text_encoder()` (and, with `options.embeddings_out`, the captions' embeddings and
prompts are written with `text.save_embeddings`, for training on the video files with
`config.text.kind='embeddings'`; without `options.out` only that file is written); clips are decoded
by `options.decode_threads` threads ahead of the codec (`codec()`: the PatchCodec or the Wan VAE),
which runs jitted on batches of `options.batch_size` clips (the last batch padded: one compiled
shape). Every shard and text file is written atomically (`adastate_jax.files`), so a shard that
exists is whole: a rerun with the same settings skips finished shards (resume); a directory written
with other settings (`manifest.json`) needs `options.overwrite`, which deletes its shards.
`options.num_tasks` / `task_index` split the shards between machines writing to one directory.
A tqdm bar shows clips/s; progress lines go to this module's logger.

Must not know: how the text encoder and the codec are built or loaded (the caller hands in
factories: `build.text_encoder`, `build.vae_module`), training, command-line flags.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable

import numpy as np

from adastate_jax import files
from adastate_jax.data import records, video_source

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CODEC_KINDS = ("patch", "wan")


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """What to write and how (the flags of `launch/encode_videos.py`, named in the errors)."""

    out: str = ""  # output directory of the ArrayRecord shards
    embeddings_out: str = ""  # also write the captions' embeddings + prompts to this .npz
    vae_checkpoint: str = ""  # config.vae.kind='wan': converted params dir or PyTorch weights
    random_vae: bool = False  # config.vae.kind='wan' without weights (tests only)
    text_checkpoint: str = ""  # config.text.kind='umt5': encoder weights
    shard_size: int = 1024  # clips per shard
    batch_size: int = 4  # clips per jitted encode call
    decode_threads: int = 4  # threads decoding clips ahead of the encoder
    chunk_latents: int = 1  # Wan VAE: latent frames per encode step (scan chunk)
    max_clips: int = 0  # only the first N clips (0: all)
    num_tasks: int = 1  # split the shards between this many tasks (machines)
    task_index: int = 0  # this task's index in [0, num_tasks)
    overwrite: bool = False  # replace an output directory written with other settings

    def __post_init__(self):
        if not self.out and not self.embeddings_out:
            raise ValueError("give --out (ArrayRecord shards) and/or --embeddings_out")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"--shard_size {self.shard_size} and --batch_size {self.batch_size} must be positive"
            )
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"--task_index {self.task_index} outside [0, --num_tasks {self.num_tasks})")


def check_run(exp, options: EncodeOptions) -> None:
    """The run can be encoded (captions, codec kind, Wan weights), else a ValueError naming the field."""
    if exp.data.video.captions == "none":
        raise ValueError("config.data.video.captions='none': ArrayRecord records carry text; give captions")
    kind = exp.vae.kind
    if kind not in CODEC_KINDS:
        raise ValueError(f"config.vae.kind={kind!r}: encode_videos needs 'patch' or 'wan'")
    if kind == "wan" and not options.vae_checkpoint and not options.random_vae:
        raise ValueError("config.vae.kind='wan' needs --vae_checkpoint (or --random_vae for a smoke test)")


def _decoded(source, indices, threads: int, lookahead: int):
    """source.load_video(i) for i in indices, in order, decoded by `threads` threads ahead."""
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as ex:
        it = iter(indices)
        pending = collections.deque()
        for i in it:
            pending.append(ex.submit(source.load_video, i))
            if len(pending) >= lookahead:
                break
        while pending:
            video = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(source.load_video, nxt))
            yield video


def caption_table(encoder, captions: list[str], text_len: int, text_dim: int, block: int = 64) -> dict:
    """{caption: float32 [text_len, text_dim]}, encoded `block` captions at a time (checked)."""
    from adastate_jax import text as text_lib

    table = {}
    for s in range(0, len(captions), block):
        part = captions[s : s + block]
        emb = np.asarray(encoder.encode(part), np.float32)
        text_lib.check_text_embeddings(emb, text_len, text_dim, what="text encoder output")
        table.update(zip(part, emb))
    return table


def _latent_shape(module, exp, spec) -> tuple[int, int, int, int]:
    """[F, h, w, C] the codec gives for one clip of `spec`; ValueError naming the config field."""
    from adastate_jax.models import vae as vae_lib

    T, H, W = spec.num_frames, spec.height, spec.width
    if isinstance(module, vae_lib.WanVAE):
        try:
            n_lat = module.config.num_latents(T)
        except ValueError as e:
            raise ValueError(
                f"config.data.video.num_frames={T}: the Wan VAE needs 1 + {module.temporal_factor}k "
                f"frames ({e})"
            ) from e
    else:
        n_lat = T
    s = int(module.spatial_factor)
    if H % s or W % s:
        raise ValueError(
            f"config.data.video: {H}x{W} frames are not divisible by the codec's spatial factor {s}"
        )
    if int(module.z_dim) != int(exp.model.in_channels):
        raise ValueError(
            f"the codec gives {module.z_dim} latent channels, "
            f"config.model.in_channels is {exp.model.in_channels}"
        )
    return (n_lat, H // s, W // s, int(exp.model.in_channels))


def _prepare_directory(out: str, manifest: dict, overwrite: bool) -> None:
    """Write `manifest` into `out`; an existing different one is an error unless `overwrite`
    (then the old shards are deleted)."""
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST)
    manifest_json = json.dumps(manifest, indent=1, sort_keys=True)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            same = json.load(fh) == json.loads(manifest_json)
        if not same and not overwrite:
            raise ValueError(
                f"{out} holds shards written with other settings ({manifest_path}); "
                "pass --overwrite to replace them"
            )
        if not same:
            for old in glob.glob(os.path.join(out, "shard-*.array_record")):
                os.unlink(old)
    files.write_text_atomic(manifest_path, manifest_json)


def encode_videos(
    exp,
    options: EncodeOptions,
    *,
    text_encoder: Callable[[], object],
    codec: Callable[[], object],
    progress: bool = True,
) -> dict:
    """Encode the clips of `exp.data` (the video source's reading) into ArrayRecord shards in
    `options.out` (see the module docstring).

    text_encoder(): the run's text encoder (`encode(prompts) -> [P, text_len, text_dim]`,
    `cache_identity()`); codec(): the codec module of `config.vae` (PatchCodec or WanVAE), called
    only when shards are written. Returns {'clips', 'shards', 'written', 'skipped', 'paths',
    'embeddings_out'} and, when shards were written, 'seconds', 'encode_seconds', 'clips_written',
    'frames_per_s'.
    """
    import jax
    from flax import nnx
    from tqdm import tqdm

    from adastate_jax import text as text_lib
    from adastate_jax.models import vae as vae_lib

    check_run(exp, options)
    o = options
    t0 = time.perf_counter()
    source = video_source.source_from_config(exp, text="none")
    n_clips = len(source) if not o.max_clips else min(len(source), int(o.max_clips))
    spec = source.spec
    log.info("%s: %d clips to encode (clip table built in %.1fs)", source, n_clips, time.perf_counter() - t0)

    # --- text: each distinct caption once --------------------------------------------------
    num_shards = math.ceil(n_clips / o.shard_size)
    mine = [k for k in range(num_shards) if k % o.num_tasks == o.task_index]
    clip_ids = [i for k in mine for i in range(k * o.shard_size, min(n_clips, (k + 1) * o.shard_size))]
    # the embeddings file covers every clip's caption, whatever this task writes
    captions = sorted({source.caption(i) for i in (range(n_clips) if o.embeddings_out else clip_ids)})
    t_text = time.perf_counter()
    encoder = text_encoder()
    table = caption_table(encoder, captions, exp.model.text_len, exp.model.text_dim)
    log.info(
        "encoded %d distinct captions (%s) in %.1fs",
        len(captions),
        exp.text.kind,
        time.perf_counter() - t_text,
    )
    if o.embeddings_out:
        text_lib.save_embeddings(o.embeddings_out, np.stack([table[c] for c in captions]), captions)
        log.info("wrote %d caption embeddings to %s", len(captions), o.embeddings_out)
    summary = dict(
        clips=n_clips, shards=num_shards, written=[], skipped=[], paths=[], embeddings_out=o.embeddings_out
    )
    if not o.out:
        return summary

    # --- the codec ---------------------------------------------------------------------------
    module = codec()
    graphdef, params = nnx.split(module)
    latent_shape = _latent_shape(module, exp, spec)
    chunk = int(o.chunk_latents)
    encode = jax.jit(lambda p, v: vae_lib.encode(graphdef, p, v, chunk_latents=chunk))

    # --- the output directory ----------------------------------------------------------------
    manifest = dict(
        files=list(source.files),
        frame_counts=[int(n) for n in source.frame_counts],
        clip=dataclasses.asdict(spec),
        captions=exp.data.video.captions,
        num_clips=n_clips,
        shard_size=o.shard_size,
        num_shards=num_shards,
        vae=dict(
            kind=exp.vae.kind,
            config=dataclasses.asdict(getattr(exp.vae, exp.vae.kind)),
            checkpoint=o.vae_checkpoint,
            random=o.random_vae,
        ),
        text=dict(kind=exp.text.kind, identity=files.sha256_text(encoder.cache_identity())[:16]),
        latents=list(latent_shape),
        text_shape=[int(exp.model.text_len), int(exp.model.text_dim)],
    )
    _prepare_directory(o.out, manifest, o.overwrite)
    paths = [os.path.join(o.out, shard_name(k, num_shards)) for k in range(num_shards)]
    if o.task_index == 0:
        rows = []
        for i in range(n_clips):
            f, start = source.clip(i)
            row = dict(
                shard=i // o.shard_size,
                record=i % o.shard_size,
                clip=i,
                file=f,
                start=start,
                caption=source.caption(i),
            )
            rows.append(json.dumps(row))
        files.write_text_atomic(os.path.join(o.out, "clips.jsonl"), "\n".join(rows) + "\n")
        files.write_text_atomic(os.path.join(o.out, "paths.txt"), "\n".join(paths) + "\n")
    summary["paths"] = paths

    # --- encode and write ----------------------------------------------------------------------
    todo = [k for k in mine if not os.path.exists(paths[k])]
    summary["skipped"] = [paths[k] for k in mine if k not in todo]
    if summary["skipped"]:
        log.info("%d shard(s) already complete, skipped", len(summary["skipped"]))
    total = sum(min(n_clips, (k + 1) * o.shard_size) - k * o.shard_size for k in todo)
    bar = tqdm(total=total, unit="clip", disable=not progress, dynamic_ncols=True)
    T = spec.num_frames
    stats = {"encode_seconds": 0.0, "done": 0}
    t_start = time.perf_counter()

    def shard_records(k: int):
        """(latents [F, h, w, C], text [T, D]) of shard k's clips, encoded batch by batch."""
        ids = range(k * o.shard_size, min(n_clips, (k + 1) * o.shard_size))
        batch, batch_ids = [], []
        stream = _decoded(source, ids, o.decode_threads, lookahead=2 * o.batch_size + o.decode_threads)
        for i, video in zip(ids, stream):
            batch.append(video)
            batch_ids.append(i)
            if len(batch) == o.batch_size or i == ids[-1]:
                n = len(batch)
                x = np.stack(batch + [batch[-1]] * (o.batch_size - n))  # pad: one compiled shape
                t = time.perf_counter()
                z = np.asarray(jax.device_get(encode(params, x)), np.float32)[:n]
                stats["encode_seconds"] += time.perf_counter() - t
                if z.shape[1:] != latent_shape:
                    raise ValueError(f"codec gave latents {z.shape[1:]}, expected {latent_shape}")
                for j, ci in enumerate(batch_ids):
                    yield z[j], table[source.caption(ci)]
                stats["done"] += n
                bar.update(n)
                rate = stats["done"] / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix(fps=f"{rate * T:.0f}", shard=f"{k + 1}/{num_shards}")
                batch, batch_ids = [], []

    for k in todo:
        expected = min(n_clips, (k + 1) * o.shard_size) - k * o.shard_size
        with files.atomic_path(paths[k]) as tmp:
            count = records.write_latents_arrayrecord(tmp, shard_records(k))
            if count != expected:
                raise RuntimeError(f"shard {k}: wrote {count} records, expected {expected}")
        summary["written"].append(paths[k])
    bar.close()
    elapsed = time.perf_counter() - t_start
    done, t_enc = stats["done"], stats["encode_seconds"]
    summary.update(
        seconds=elapsed, encode_seconds=t_enc, clips_written=done, frames_per_s=done * T / max(elapsed, 1e-9)
    )
    log.info(
        "wrote %d shard(s), %d clips (%d frames) in %.1fs: %.0f frames/s end to end, encoder %.1fs; "
        "latents %s, text %s",
        len(summary["written"]), done, done * T, elapsed, done * T / max(elapsed, 1e-9), t_enc,
        list(latent_shape), manifest["text_shape"],
    )  # fmt: skip
    log.info("train on them with: %s", train_hint(paths, o.out))
    return summary


def train_hint(paths: list[str], out: str) -> str:
    """How to train on the shards: the exact `--config.data.paths` flag (for up to 8 shards)."""
    if len(paths) <= 8:
        flag = "(" + ", ".join(repr(p) for p in paths) + ("," if len(paths) == 1 else "") + ")"
        return f'--config.data.source=arrayrecord --config.data.paths="{flag}"'
    return f"config.data.source='arrayrecord' and config.data.paths = the lines of {out}/paths.txt"
