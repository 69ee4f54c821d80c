"""Generate the teacher's few-step ODE trajectories for `ode_init` once, offline, into stored shards.

Owns `generate(exp, out_dir, ...)`: loads the teacher's exported params (`config.train.teacher_path`),
reads prompts from the configured prompt source (`config.data.source` panworld / arrayrecord /
video: record i of the unshuffled source, `pipeline.source_and_encode`, is clip i's prompt, cycled
when the source is shorter), draws clip i's starting noise from `noise_seed` and i
(`ode_init.clip_noise`), and runs the objective's own `teacher_trajectory` (same timesteps,
`ode_substeps`, `teacher_guidance`, `teacher_attention` as the on-the-fly `ode_init` of this
config), jitted over batches of `batch_size` clips with the batch sharded over the mesh's batch axes
(`config.mesh`) and the teacher's params over its rules. Progress is logged (module logger).

The files (records, metadata.json, atomic shards, resume rules) belong to `data/trajectories.py`:
a rerun with the same settings finishes a directory (finished shards skipped, leftover temporary
shards deleted and regenerated); other settings are refused, naming the differing metadata fields.
The teacher is identified by `files.params_sha256` of its params (`teacher_params_sha256`).
One process (all its local devices); for several hosts, run one generator per host into separate
directories with different noise seeds.

Must not know: the shard and record layout (`data/trajectories.py`), command-line flags.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax import build, files
from adastate_jax import sharding as shd
from adastate_jax.data import pipeline
from adastate_jax.data import trajectories as tj
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives import ode_init

log = logging.getLogger(__name__)


def check_options(num_clips: int, clips_per_file: int, batch_size: int, storage_dtype: str) -> None:
    """The generator's options (the command line's flags), else a ValueError naming the flag."""
    if num_clips < 1 or clips_per_file < 1 or batch_size < 1:
        raise ValueError(
            f"--num_clips={num_clips}, --clips_per_file={clips_per_file} and --batch_size={batch_size} "
            "must be >= 1"
        )
    if storage_dtype not in tj.STORAGE_DTYPES:
        raise ValueError(f"--storage_dtype {storage_dtype!r}: choose from {tj.STORAGE_DTYPES}")


def _fmt_time(s: float) -> str:
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _section_dict(section) -> dict | None:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else None


def generate(
    exp,
    out_dir: str,
    *,
    num_clips: int,
    clips_per_file: int = 256,
    batch_size: int = 8,
    storage_dtype: str = "float32",
    noise_seed: int = 0,
    mesh=None,
) -> dict:
    """Generate (or finish) the trajectories of the Experiment `exp` in `out_dir`.

    Returns {'out_dir', 'generated_shards', 'skipped_shards', 'clips' (generated now), 'seconds',
    'clips_per_s' (after the first, compiling batch; None if there was none), 'bytes', 'metadata'}.
    """
    check_options(num_clips, clips_per_file, batch_size, storage_dtype)
    if jax.process_count() > 1:
        raise ValueError(
            "make_ode_trajectories runs in one process; run one per host into separate directories"
        )
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

    # --- teacher ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    abstract = wan.abstract_model(obj.teacher_cfg)[1]
    teacher = checkpoint_io.load_params(teacher_path, abstract, shd.state_shardings(abstract, mesh, rules))
    fingerprint = files.params_sha256(teacher)
    log.info(
        "loaded the teacher from %s in %.1fs (sha256 %s...)",
        teacher_path,
        time.perf_counter() - t0,
        fingerprint[:16],
    )
    text_params = None
    if obj.text_graphdef is not None:
        text_params = nnx.split(build.word_encoder(model_cfg, exp.seed))[1]

    # --- metadata (written first; a rerun must match it) -----------------------------------
    src = exp.data.source  # the prompt source's own settings (clip i's prompt depends on them)
    prompt_data = {"source": src, "paths": list(exp.data.paths)}
    section = _section_dict(getattr(exp.data, src, None))
    if section is not None:
        prompt_data[src] = section
    meta = tj.make_metadata(
        teacher_path=teacher_path,
        teacher_params_sha256=fingerprint,
        teacher_model=dataclasses.asdict(obj.teacher_cfg),
        student_model=dataclasses.asdict(model_cfg),
        sampler=dataclasses.asdict(exp.sampler),
        sampler_timesteps=np.asarray(obj.timesteps, np.float64),
        ode_substeps=obj.substeps,
        teacher_guidance=obj.guidance,
        teacher_attention=obj.teacher_layout.attention,
        chunk_frames=obj.teacher_layout.chunk_frames,
        prompt_data=prompt_data,
        text_kind=exp.text.kind,
        text_format=fmt,
        text_shape=prompt_shape,
        text_encoder_seed=exp.seed,
        clip_shape=clip_shape,
        storage_dtype=storage_dtype,
        noise_seed=noise_seed,
        prng_impl=str(jax.config.jax_default_prng_impl),
        num_clips=num_clips,
        clips_per_file=clips_per_file,
    )
    tj.prepare_directory(out_dir, meta)

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
    shards = meta["shards"]
    counts = tj.shard_counts(num_clips, clips_per_file)
    todo, skipped = tj.pending_shards(out_dir, meta)
    total = sum(counts[s] for s in todo)
    log.info(
        "%s: %d clips in %d shards; %d finished, generating %d (%d clips, batch %d, %s, trajectory %s)",
        out_dir, num_clips, len(shards), len(skipped), len(todo), total, batch_size, storage_dtype,
        meta["trajectory_shape"],
    )  # fmt: skip
    progress = {"done": 0, "t_rate": None, "done_rate": 0, "t_log": 0.0}
    t_start = time.perf_counter()

    def shard_records(s: int):
        """The serialized records of shard `s`, generated batch by batch."""
        n, start = counts[s], s * clips_per_file
        for b0 in range(0, n, batch_size):
            idx = list(range(start + b0, start + min(b0 + batch_size, n)))
            pad = idx + [idx[-1]] * (batch_size - len(idx))  # one compiled shape
            recs = [record(i) for i in pad]
            prompt = np.stack([np.asarray(r[fmt]) for r in recs])
            traj, x0 = gen(teacher, text_params, put(prompt), put(np.asarray(pad, np.int32)))
            traj, x0 = np.asarray(jax.device_get(traj)), np.asarray(jax.device_get(x0))
            for j, i in enumerate(idx):
                yield tj.serialize_record(traj[j], x0[j], {fmt: prompt[j]}, i, noise_seed, storage_dtype)
            _log_progress(progress, len(idx), total, s, len(shards), t_start)

    with jax.set_mesh(mesh):
        for s in todo:
            tj.write_shard(os.path.join(out_dir, shards[s]), shard_records(s))
    done, t_rate, done_rate = progress["done"], progress["t_rate"], progress["done_rate"]
    seconds = time.perf_counter() - t_start
    size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in shards)
    rate = (
        (done - done_rate) / max(time.perf_counter() - t_rate, 1e-9)
        if t_rate is not None and done > done_rate
        else None
    )
    log.info(
        "done: %d clips in %.1fs (%d shards skipped); %.1f MiB in %s (%.1f KiB per clip)",
        done, seconds, len(skipped), size / 2**20, out_dir, size / num_clips / 2**10,
    )  # fmt: skip
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


def _log_progress(p: dict, n: int, total: int, shard: int, num_shards: int, t_start: float) -> None:
    """Count `n` more clips in `p` and log the rate and ETA (every 10 s and at the end); the rate
    starts after the first batch, which includes compilation."""
    p["done"] += n
    now = time.perf_counter()
    if p["t_rate"] is None:
        log.info("first batch (with compilation) in %.1fs", now - t_start)
        p["t_rate"], p["done_rate"] = now, p["done"]
    done, done_rate = p["done"], p["done_rate"]
    if done > done_rate and (now - p["t_log"] > 10 or done == total):
        p["t_log"] = now
        rate = (done - done_rate) / max(now - p["t_rate"], 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        log.info(
            "clips %d/%d | shard %d/%d | %.2f clips/s | ETA %s", done, total, shard + 1, num_shards, rate,
            _fmt_time(eta),
        )  # fmt: skip
