r"""Encode video files once into ArrayRecord shards of latents + text embeddings (the real-data path).

  python launch/encode_videos.py --config=configs/panworld.py:teacher \
      --config.data.paths="('data/videos',)" --out=data/latents
  python launch/encode_videos.py --config=configs/wan_1_3b.py --config.data.paths="('data/videos/*.mp4',)" \
      --vae_checkpoint=workdirs/wan_vae --text_checkpoint=models/umt5-xxl --out=data/wan_latents

then train on the shards: `--config.data.source=arrayrecord
--config.data.paths="('OUT/shard-00000-of-00002.array_record', 'OUT/shard-00001-of-00002.array_record')"`
(the tool prints the exact flag; `OUT/paths.txt` lists the shards).

Reads the clips of `config.data` exactly as the `video` source does (`config.data.paths`,
`config.data.video`: clip table, captions, crop and resize; `data/video_source.py`), then:
- latents with `config.vae`: 'patch' (the PatchCodec) or 'wan' (the Wan VAE from `--vae_checkpoint`:
  a converted params dir, `launch/convert.py --model=vae` or a 'vae' training export, or PyTorch
  weights, loaded as `streaming/decoders.py` loads them; `--random_vae` for smoke tests only), in
  jitted batches of `--batch_size` clips (the last batch is padded, so one shape is compiled);
  the Wan VAE needs `num_frames = 1 + 4k` and gives 1 + k latent frames;
- text with `config.text.kind`: 'words' (the frozen PanWorld word encoder the trainer builds from
  `config.seed`), 'embeddings' (`config.text.embeddings_path`) or 'umt5' (`--text_checkpoint` +
  `config.text.tokenizer_path`, cached in `config.text.cache_dir` when set); each distinct
  caption is encoded once;
- shards of `--shard_size` clips, `OUT/shard-KKKKK-of-NNNNN.array_record`, record r of shard k is
  clip k * shard_size + r (`OUT/clips.jsonl` maps every record to its file, first frame and
  caption). Each shard is written under a temporary name and renamed when complete, so a shard
  that exists is whole: re-running the same command skips them (resume); a different setting
  (`OUT/manifest.json`) needs `--overwrite`. `--num_tasks N --task_index i` splits the shards
  between N machines writing to one directory.
`--embeddings_out=FILE.npz` also writes the captions' embeddings with their prompts
(`text.save_embeddings`), for training on the video files with `config.text.kind='embeddings'`;
without `--out` only that file is written.
Decoding runs in `--decode_threads` threads ahead of the encoder; a progress bar shows clips/s and
the ETA, and the summary line the decode rate (frames/s) and the encode time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/panworld.py:teacher")
flags.DEFINE_string("out", "", "Output directory of the ArrayRecord shards.")
flags.DEFINE_string("vae_checkpoint", "", "config.vae.kind='wan': converted params dir or PyTorch weights.")
flags.DEFINE_bool("random_vae", False, "config.vae.kind='wan' without weights: a random VAE (tests only).")
flags.DEFINE_string("text_checkpoint", "", "config.text.kind='umt5': UMT5 encoder weights.")
flags.DEFINE_integer("shard_size", 1024, "Clips per ArrayRecord shard.")
flags.DEFINE_integer("batch_size", 4, "Clips per jitted encode call.")
flags.DEFINE_integer("decode_threads", 4, "Threads decoding clips ahead of the encoder.")
flags.DEFINE_integer("chunk_latents", 1, "Wan VAE: latent frames per encode step (scan chunk).")
flags.DEFINE_integer("max_clips", 0, "Encode only the first N clips (0: all).")
flags.DEFINE_integer("num_tasks", 1, "Split the shards between this many tasks (machines).")
flags.DEFINE_integer("task_index", 0, "This task's index in [0, num_tasks).")
flags.DEFINE_bool("overwrite", False, "Replace an output directory written with other settings.")
flags.DEFINE_string("embeddings_out", "", "Also write the captions' embeddings + prompts to this .npz.")
FLAGS = flags.FLAGS


def _shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.array_record"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


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


def encode_videos(
    cfg,
    out: str,
    *,
    vae_checkpoint: str = "",
    random_vae: bool = False,
    text_checkpoint: str = "",
    shard_size: int = 1024,
    batch_size: int = 4,
    decode_threads: int = 4,
    chunk_latents: int = 1,
    max_clips: int = 0,
    num_tasks: int = 1,
    task_index: int = 0,
    overwrite: bool = False,
    embeddings_out: str = "",
    progress: bool = True,
) -> dict:
    """Encode the clips of `cfg.data` (video source) into ArrayRecord shards in `out` (see the
    module docstring). Returns a summary dict (shards written / skipped, paths, rates)."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from adastate_jax import config as config_lib
    from adastate_jax import text as text_lib
    from adastate_jax.data import pipeline, video_source
    from adastate_jax.models import vae as vae_lib

    if not out and not embeddings_out:
        raise ValueError("give --out (ArrayRecord shards) and/or --embeddings_out")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard_size {shard_size} and --batch_size {batch_size} must be positive")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task_index {task_index} outside [0, --num_tasks {num_tasks})")
    from adastate_jax import build

    exp = config_lib.parse(cfg)
    model_cfg = exp.model
    if exp.data.video.captions == "none":
        raise ValueError("config.data.video.captions='none': ArrayRecord records carry text; give captions")
    kind = exp.vae.kind
    if kind not in ("patch", "wan"):
        raise ValueError(f"config.vae.kind={kind!r}: encode_videos needs 'patch' or 'wan'")
    if kind == "wan" and not vae_checkpoint and not random_vae:
        raise ValueError("config.vae.kind='wan' needs --vae_checkpoint (or --random_vae for a smoke test)")
    t0 = time.perf_counter()
    source = video_source.source_from_config(exp, text="none")
    n_clips = len(source) if not max_clips else min(len(source), int(max_clips))
    spec = source.spec
    say = (lambda m: tqdm.write(m)) if progress else (lambda m: None)
    say(f"{source}: {n_clips} clips to encode (clip table built in {time.perf_counter() - t0:.1f}s)")

    # --- text: each distinct caption once --------------------------------------------------
    num_shards = math.ceil(n_clips / shard_size)
    mine = [k for k in range(num_shards) if k % num_tasks == task_index]
    clip_ids = [i for k in mine for i in range(k * shard_size, min(n_clips, (k + 1) * shard_size))]
    if embeddings_out:  # the table covers every clip's caption, whatever this task writes
        clip_ids_for_text = range(n_clips)
    else:
        clip_ids_for_text = clip_ids
    captions = sorted({source.caption(i) for i in clip_ids_for_text})
    t_text = time.perf_counter()
    encoder = build.text_encoder(exp, text_checkpoint)
    table = {}
    for s in range(0, len(captions), 64):
        part = captions[s : s + 64]
        emb = np.asarray(encoder.encode(part), np.float32)
        text_lib.check_text_embeddings(
            emb, model_cfg.text_len, model_cfg.text_dim, what="text encoder output"
        )
        table.update(zip(part, emb))
    say(f"encoded {len(captions)} distinct captions ({exp.text.kind}) in {time.perf_counter() - t_text:.1f}s")
    if embeddings_out:
        text_lib.save_embeddings(embeddings_out, np.stack([table[c] for c in captions]), captions)
        say(f"wrote {len(captions)} caption embeddings to {embeddings_out}")
    summary = dict(
        clips=n_clips, shards=num_shards, written=[], skipped=[], paths=[], embeddings_out=embeddings_out
    )
    if not out:
        return summary

    # --- the codec ---------------------------------------------------------------------------
    from flax import nnx

    module = build.vae_module(exp, vae_checkpoint)
    graphdef, params = nnx.split(module)
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
    if int(module.z_dim) != int(model_cfg.in_channels):
        raise ValueError(
            f"the codec gives {module.z_dim} latent channels, "
            f"config.model.in_channels is {model_cfg.in_channels}"
        )
    encode = jax.jit(lambda p, v: vae_lib.encode(graphdef, p, v, chunk_latents=int(chunk_latents)))
    latent_shape = (n_lat, H // s, W // s, int(model_cfg.in_channels))

    # --- the output directory ----------------------------------------------------------------
    os.makedirs(out, exist_ok=True)
    manifest = dict(
        files=list(source.files),
        frame_counts=[int(n) for n in source.frame_counts],
        clip=dataclasses.asdict(spec),
        captions=exp.data.video.captions,
        num_clips=n_clips,
        shard_size=shard_size,
        num_shards=num_shards,
        vae=dict(
            kind=exp.vae.kind,
            config=cfg.vae[exp.vae.kind].to_dict(),
            checkpoint=vae_checkpoint,
            random=random_vae,
        ),
        text=dict(
            kind=exp.text.kind,
            identity=hashlib.sha256(encoder.cache_identity().encode()).hexdigest()[:16],
        ),
        latents=list(latent_shape),
        text_shape=[int(model_cfg.text_len), int(model_cfg.text_dim)],
    )
    manifest_path = os.path.join(out, "manifest.json")
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
    _atomic_write_text(manifest_path, manifest_json)
    names = [_shard_name(k, num_shards) for k in range(num_shards)]
    paths = [os.path.join(out, n) for n in names]
    if task_index == 0:
        rows = []
        for i in range(n_clips):
            f, start = source.clip(i)
            rows.append(
                json.dumps(
                    dict(
                        shard=i // shard_size,
                        record=i % shard_size,
                        clip=i,
                        file=f,
                        start=start,
                        caption=source.caption(i),
                    )
                )
            )
        _atomic_write_text(os.path.join(out, "clips.jsonl"), "\n".join(rows) + "\n")
        _atomic_write_text(os.path.join(out, "paths.txt"), "\n".join(paths) + "\n")
    summary["paths"] = paths

    # --- encode and write ----------------------------------------------------------------------
    todo = [k for k in mine if not os.path.exists(paths[k])]
    summary["skipped"] = [paths[k] for k in mine if k not in todo]
    if summary["skipped"]:
        say(f"{len(summary['skipped'])} shard(s) already complete, skipped")
    total = sum(min(n_clips, (k + 1) * shard_size) - k * shard_size for k in todo)
    bar = tqdm(total=total, unit="clip", disable=not progress, dynamic_ncols=True)
    t_enc = 0.0
    t_start = time.perf_counter()
    done = 0
    for k in todo:
        ids = range(k * shard_size, min(n_clips, (k + 1) * shard_size))

        def records(ids=ids, k=k):
            nonlocal t_enc, done
            batch, batch_ids = [], []
            stream = _decoded(source, ids, decode_threads, lookahead=2 * batch_size + decode_threads)
            for i, video in zip(ids, stream):
                batch.append(video)
                batch_ids.append(i)
                if len(batch) == batch_size or i == ids[-1]:
                    n = len(batch)
                    x = np.stack(batch + [batch[-1]] * (batch_size - n))  # pad: one compiled shape
                    t = time.perf_counter()
                    z = np.asarray(jax.device_get(encode(params, x)), np.float32)[:n]
                    t_enc += time.perf_counter() - t
                    if z.shape[1:] != latent_shape:
                        raise ValueError(f"codec gave latents {z.shape[1:]}, expected {latent_shape}")
                    for j, ci in enumerate(batch_ids):
                        yield z[j], table[source.caption(ci)]
                    done += n
                    bar.update(n)
                    rate = done / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix(fps=f"{rate * T:.0f}", shard=f"{k + 1}/{num_shards}")
                    batch, batch_ids = [], []

        tmp = f"{paths[k]}.tmp-{os.getpid()}"
        try:
            count = pipeline.write_latents_arrayrecord(tmp, records())
            if count != len(ids):
                raise RuntimeError(f"shard {k}: wrote {count} records, expected {len(ids)}")
            os.replace(tmp, paths[k])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        summary["written"].append(paths[k])
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary.update(
        seconds=elapsed,
        encode_seconds=t_enc,
        clips_written=done,
        frames_per_s=done * T / max(elapsed, 1e-9),
    )
    say(
        f"wrote {len(summary['written'])} shard(s), {done} clips ({done * T} frames) in {elapsed:.1f}s: "
        f"{done * T / max(elapsed, 1e-9):.0f} frames/s end to end, encoder {t_enc:.1f}s; latents "
        f"{list(latent_shape)}, text {manifest['text_shape']}"
    )
    if len(paths) <= 8:
        flag = "(" + ", ".join(repr(p) for p in paths) + ("," if len(paths) == 1 else "") + ")"
        say(f'train on them with: --config.data.source=arrayrecord --config.data.paths="{flag}"')
    else:
        say(
            "train on them with config.data.source='arrayrecord' and config.data.paths = the lines "
            f"of {out}/paths.txt"
        )
    return summary


def main(argv):
    del argv
    from absl import logging as absl_logging

    if FLAGS.verbosity == 0:
        absl_logging.set_verbosity(absl_logging.WARNING)
    encode_videos(
        _CONFIG.value,
        FLAGS.out,
        vae_checkpoint=FLAGS.vae_checkpoint,
        random_vae=FLAGS.random_vae,
        text_checkpoint=FLAGS.text_checkpoint,
        shard_size=FLAGS.shard_size,
        batch_size=FLAGS.batch_size,
        decode_threads=FLAGS.decode_threads,
        chunk_latents=FLAGS.chunk_latents,
        max_clips=FLAGS.max_clips,
        num_tasks=FLAGS.num_tasks,
        task_index=FLAGS.task_index,
        overwrite=FLAGS.overwrite,
        embeddings_out=FLAGS.embeddings_out,
    )


if __name__ == "__main__":
    cli.run(main)
