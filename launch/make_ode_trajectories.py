r"""Generate and store the teacher's few-step ODE trajectories for `ode_init` (once, offline).

  python launch/make_ode_trajectories.py --config=configs/panworld.py:ode \
      --config.train.teacher_path=outputs/panworld_teacher/export \
      --out_dir=outputs/panworld_ode_trajectories --num_clips=1024
  python launch/train.py --config=configs/panworld.py:ode,stored --workdir=outputs/panworld_ode

What it does: loads the teacher's exported params (`config.train.teacher_path`), reads prompts from
the configured prompt source (`config.data.source` panworld / arrayrecord / video: record i of the
unshuffled source, `pipeline.source_and_encode`, is clip i's prompt, cycled when the source is
shorter), draws clip i's starting noise from `--noise_seed` and i (`ode_init.clip_noise`), and runs
the objective's own `teacher_trajectory` (same timesteps, `ode_substeps`, `teacher_guidance`,
`teacher_attention` as the on-the-fly `ode_init` of this config), jitted over batches of
`--batch_size` clips with the batch sharded over the mesh's batch axes (`config.mesh`) and the
teacher's params over its rules. The records and `metadata.json` are described in
`adastate_jax/data/trajectories.py`.

Files are atomic: a shard is written to `.NAME.tmp-PID` and renamed when complete; metadata.json
likewise (written first). Re-running the same command resumes: finished shards are skipped (their
record count is checked), leftover temp files are deleted and their shards regenerated; a rerun
with different settings (teacher params, config, clip count, ...) into the same directory is
refused, naming the differing metadata fields. One process (all its local devices); for several
hosts, run one generator per host into separate directories with different `--noise_seed` and
list them all in `config.data.paths`. Do not run two generators into one directory at once.

`--storage_dtype`: float32 (default, exact), float16 or bfloat16 (half the bytes; rounds the
stored states and targets, see `data/trajectories.py`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
_CONFIG = None
# metadata fields a resumed run may change (the records do not depend on them; the teacher is
# identified by its params fingerprint, not its path)
RESUME_IGNORES = ("teacher_path", "student_model", "sampler")


def define_flags():
    """The command line (defined only when run as a script, so tests can import `generate`)."""
    global _CONFIG
    from adastate_jax.config import cli

    _CONFIG = cli.define("configs/panworld.py:ode", help="Experiment config (ode stage).")
    flags.DEFINE_string(
        "out_dir", None, "Directory for metadata.json and the ArrayRecord shards.", required=True
    )
    flags.DEFINE_integer("num_clips", 1024, "Number of trajectories (clips) to generate.")
    flags.DEFINE_integer("clips_per_file", 256, "Records per ArrayRecord shard (the unit of resumption).")
    flags.DEFINE_integer(
        "batch_size", 8, "Clips per jitted teacher call (divisible by the mesh's batch axes)."
    )
    flags.DEFINE_enum("storage_dtype", "float32", ["float32", "float16", "bfloat16"], "Stored arrays' dtype.")
    flags.DEFINE_integer("noise_seed", 0, "Clip i starts from normal(fold_in(key(noise_seed), i)).")


def params_fingerprint(params) -> str:
    """sha256 over the params' values (path, dtype, shape, bytes of every leaf, in path order); for
    params that are not all addressable by this process, over the leaves' paths, shapes and dtypes."""
    import jax
    import numpy as np
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
    h = hashlib.sha256()
    values = all(getattr(v, "is_fully_addressable", True) for _, v in flat)
    for path, v in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(f"{jax.tree_util.keystr(path)}|{v.dtype}|{tuple(v.shape)}|".encode())
        if values:
            h.update(np.ascontiguousarray(jax.device_get(v)).tobytes())
    return ("" if values else "shapes-only:") + h.hexdigest()


def _write_json_atomic(path: str, obj) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _fmt_time(s: float) -> str:
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def generate(
    cfg,
    out_dir: str,
    *,
    num_clips: int,
    clips_per_file: int = 256,
    batch_size: int = 8,
    storage_dtype: str = "float32",
    noise_seed: int = 0,
    mesh=None,
    log=print,
) -> dict:
    """Generate (or finish) the trajectories of `cfg` in `out_dir`; returns a summary dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
    from flax import nnx

    from adastate_jax import build
    from adastate_jax import config as config_lib
    from adastate_jax import sharding as shd
    from adastate_jax.data import pipeline
    from adastate_jax.data import trajectories as tj
    from adastate_jax.models import checkpoint_io, wan
    from adastate_jax.training.objectives import flow_matching as fm
    from adastate_jax.training.objectives import ode_init

    if num_clips < 1 or clips_per_file < 1 or batch_size < 1:
        raise ValueError("--num_clips, --clips_per_file and --batch_size must be >= 1")
    if storage_dtype not in tj.STORAGE_DTYPES:
        raise ValueError(f"--storage_dtype {storage_dtype!r}: choose from {tj.STORAGE_DTYPES}")
    if jax.process_count() > 1:
        raise ValueError(
            "make_ode_trajectories runs in one process; run one per host into separate directories"
        )
    exp = config_lib.parse(cfg)
    if exp.data.source == "ode_trajectories":
        raise ValueError(
            "config.data.source='ode_trajectories': the generator needs a prompt source "
            "(panworld / arrayrecord / video), e.g. configs/panworld.py:ode without ',stored'"
        )
    teacher_path = exp.train.teacher_path
    if not teacher_path:
        raise ValueError("config.train.teacher_path: the teacher's params dir (a WORKDIR/export) is required")
    teacher_path = os.path.abspath(teacher_path)

    model_cfg = exp.model
    obj = ode_init.OdeInit(exp)  # the on-the-fly objective's teacher settings, reused
    rules = exp.sharding_rules
    if mesh is None:
        mesh = build.mesh(exp)
    batch_sharding = shd.named_sharding(mesh, ("batch",), rules)
    n_batch = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(batch_sharding.spec[0])] or [1]))
    if batch_size % n_batch:
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by the mesh's batch axes (size {n_batch})"
        )

    # --- prompts and the clip shape --------------------------------------------------------
    source, encode = pipeline.source_and_encode(exp)

    def record(i: int) -> dict:
        r = source[i % len(source)]
        return encode.map(r) if encode is not None else r

    first = record(0)
    if "latents" not in first:
        raise ValueError(
            f"config.data.source={exp.data.source!r} gives records {sorted(first)} without 'latents' "
            "(the clip shape); use the latent codec ('patch') or pre-encoded latents"
        )
    fmt = tj.text_format(exp)
    if fmt not in first:
        raise ValueError(
            f"config.text.kind={exp.text.kind!r} needs '{fmt}' in the prompt records, got {sorted(first)}"
        )
    clip_shape = tuple(int(v) for v in first["latents"].shape)  # [F, h, w, C]
    prompt_shape = tuple(int(v) for v in first[fmt].shape)
    timesteps = np.asarray(obj.timesteps, np.float64)
    traj_shape = (len(timesteps), *clip_shape)

    # --- teacher ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    abstract = wan.abstract_model(obj.teacher_cfg)[1]
    teacher = checkpoint_io.load_params(teacher_path, abstract, shd.state_shardings(abstract, mesh, rules))
    fingerprint = params_fingerprint(teacher)
    log(
        f"loaded the teacher from {teacher_path} in {time.perf_counter() - t0:.1f}s "
        f"(sha256 {fingerprint[:16]}...)"
    )
    text_params = None
    if obj.text_graphdef is not None:
        text_params = nnx.split(build.word_encoder(model_cfg, exp.seed))[1]

    # --- metadata (written first; a rerun must match it) -----------------------------------
    counts = tj.shard_counts(num_clips, clips_per_file)
    shards = [tj.shard_name(s, len(counts)) for s in range(len(counts))]
    src = exp.data.source  # the prompt source's own settings (clip i's prompt depends on them)
    prompt_data = {"source": src, "paths": list(exp.data.paths)}
    if src in cfg.data and hasattr(cfg.data[src], "to_dict"):
        prompt_data[src] = cfg.data[src].to_dict()
    meta = _jsonable(
        dict(
            format=tj.FORMAT,
            version=tj.VERSION,
            teacher_path=teacher_path,
            teacher_params_sha256=fingerprint,
            teacher_model=dataclasses.asdict(obj.teacher_cfg),
            student_model=dataclasses.asdict(model_cfg),
            sampler=cfg.sampler.to_dict(),
            sampler_timesteps=[float(t) for t in timesteps],
            ode_substeps=obj.substeps,
            teacher_guidance=obj.guidance,
            teacher_attention=obj.teacher_layout.attention,
            chunk_frames=obj.teacher_layout.chunk_frames,
            prompt_data=prompt_data,
            text_kind=exp.text.kind,
            text_format=fmt,
            text_shape=list(prompt_shape),
            text_encoder_seed=exp.seed,
            clip_shape=list(clip_shape),
            trajectory_shape=list(traj_shape),
            storage_dtype=storage_dtype,
            noise_seed=int(noise_seed),
            prng_impl=str(jax.config.jax_default_prng_impl),
            num_clips=int(num_clips),
            clips_per_file=int(clips_per_file),
            shards=shards,
        )
    )
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, tj.METADATA)
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            old = json.load(fh)
        diff = sorted(
            k for k in set(old) | set(meta) if k not in RESUME_IGNORES and old.get(k) != meta.get(k)
        )
        if diff:
            raise ValueError(
                f"{meta_path} was written with other settings ({', '.join(diff)} differ, e.g. {diff[0]}: "
                f"stored {old.get(diff[0])!r}, now {meta.get(diff[0])!r}); use another --out_dir"
            )
    else:
        _write_json_atomic(meta_path, meta)

    # --- the jitted generator --------------------------------------------------------------
    def make(teacher, text_params, prompt, indices):
        frozen = None if text_params is None else {"text": text_params}
        text = fm.batch_text(obj.text_graphdef, frozen, {fmt: prompt})
        noise = ode_init.clip_noise(noise_seed, indices, clip_shape)
        traj, x0 = ode_init.teacher_trajectory(
            obj.teacher_graphdef,
            teacher,
            text,
            None,
            noise.shape,
            obj.teacher_layout,
            obj.timesteps,
            obj.substeps,
            obj.guidance,
            noise=noise,
        )
        return jnp.moveaxis(traj, 0, 1), x0  # [B, n, F, h, w, C], [B, F, h, w, C]

    gen = jax.jit(make)

    def put(x):
        spec = jax.sharding.PartitionSpec(batch_sharding.spec[0], *([None] * (x.ndim - 1)))
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    # --- shards ----------------------------------------------------------------------------
    todo, skipped = [], []
    for s, (name, n) in enumerate(zip(shards, counts)):
        path = os.path.join(out_dir, name)
        for stale in glob.glob(os.path.join(out_dir, f".{name}.tmp-*")):
            os.remove(stale)  # an unfinished shard of a killed run
        if os.path.exists(path):
            r = ArrayRecordReader(path)
            have = r.num_records()
            r.close()
            if have != n:
                raise ValueError(
                    f"{path}: {have} records, expected {n}; delete it and rerun to regenerate it"
                )
            skipped.append(s)
        else:
            todo.append(s)
    total = sum(counts[s] for s in todo)
    log(
        f"{out_dir}: {num_clips} clips in {len(shards)} shards; {len(skipped)} finished, generating "
        f"{len(todo)} ({total} clips, batch {batch_size}, {storage_dtype}, trajectory {list(traj_shape)})"
    )
    done, t_start, t_rate, done_rate, t_log = 0, time.perf_counter(), None, 0, 0.0
    with jax.set_mesh(mesh):
        for s in todo:
            name, n = shards[s], counts[s]
            start = s * clips_per_file
            path = os.path.join(out_dir, name)
            tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
            writer = ArrayRecordWriter(tmp, "group_size:1")
            try:
                for b0 in range(0, n, batch_size):
                    idx = list(range(start + b0, start + min(b0 + batch_size, n)))
                    pad = idx + [idx[-1]] * (batch_size - len(idx))  # one compiled shape
                    recs = [record(i) for i in pad]
                    prompt = np.stack([np.asarray(r[fmt]) for r in recs])
                    traj, x0 = gen(teacher, text_params, put(prompt), put(np.asarray(pad, np.int32)))
                    traj, x0 = np.asarray(jax.device_get(traj)), np.asarray(jax.device_get(x0))
                    for j, i in enumerate(idx):
                        rec = tj.serialize_record(
                            traj[j], x0[j], {fmt: prompt[j]}, i, noise_seed, storage_dtype
                        )
                        writer.write(rec)
                    done += len(idx)
                    now = time.perf_counter()
                    if t_rate is None:  # the first batch includes compilation: rate from the second
                        log(f"first batch (with compilation) in {now - t_start:.1f}s")
                        t_rate, done_rate = now, done
                    if done > done_rate and (now - t_log > 10 or done == total):
                        t_log = now
                        rate = (
                            (done - done_rate) / max(now - t_rate, 1e-9) if done > done_rate else float("nan")
                        )
                        eta = (total - done) / rate if rate == rate and rate > 0 else float("inf")
                        log(
                            f"clips {done}/{total} | shard {s + 1}/{len(shards)} | {rate:.2f} clips/s | "
                            f"ETA {_fmt_time(eta)}"
                        )
            except BaseException:
                writer.close()
                os.remove(tmp)
                raise
            writer.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    seconds = time.perf_counter() - t_start
    size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in shards)
    rate = (
        (done - done_rate) / max(time.perf_counter() - t_rate, 1e-9)
        if t_rate is not None and done > done_rate
        else None
    )
    log(
        f"done: {done} clips in {seconds:.1f}s ({len(skipped)} shards skipped); "
        f"{size / 2**20:.1f} MiB in {out_dir} ({size / num_clips / 2**10:.1f} KiB per clip)"
    )
    return dict(
        out_dir=out_dir,
        generated_shards=todo,
        skipped_shards=skipped,
        clips=done,
        seconds=seconds,
        clips_per_s=rate,
        bytes=size,
        metadata=meta,
    )


def main(argv):
    del argv
    from absl import logging as absl_logging

    if FLAGS.verbosity == 0:
        absl_logging.set_verbosity(absl_logging.WARNING)
    import jax

    cfg = _CONFIG.value
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
    generate(
        cfg,
        FLAGS.out_dir,
        num_clips=FLAGS.num_clips,
        clips_per_file=FLAGS.clips_per_file,
        batch_size=FLAGS.batch_size,
        storage_dtype=FLAGS.storage_dtype,
        noise_seed=FLAGS.noise_seed,
        log=lambda m: print(m, flush=True),
    )


if __name__ == "__main__":
    define_flags()
    from adastate_jax.config import cli

    cli.run(main)
