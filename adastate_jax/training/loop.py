"""The train loop: any objective, on any mesh, with checkpoints, resume, preemption and guards.

Owns: setting up a run from a config (mesh, rules, objective, pretrained params, train state
created already sharded, data iterator, checkpoint manager), the jitted train step (in/out
shardings, state donated), placing per-host batches as global arrays, the loop itself (progress
lines with steps/s, frames/s, ETA; metrics to stdout and `WORKDIR/metrics.jsonl`), saving every
`ckpt_every` steps and on SIGTERM, stopping on a non-finite loss or gradient norm after saving the
last good state, and exporting the final params to `WORKDIR/export/` (a params checkpoint that
`launch/rollout.py --checkpoint` streams from and that later stages load).

TensorBoard: no TensorBoard writer package (tensorboard / tensorboardX / tf / clu) is installed in
this environment, so `EventFileWriter` writes the event files itself (TFRecord framing with masked
CRC-32C, hand-encoded `Event{wall_time, step, summary{value{tag, simple_value}}}` protos) to
`WORKDIR/tb/events.out.tfevents.*`; the same metrics also go to `WORKDIR/metrics.jsonl`.

Must not know: the objectives' losses, model internals or the data source's records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.data import pipeline
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.training import checkpoint as ckpt_lib
from adastate_jax.training import objectives
from adastate_jax.training import state as state_lib


class NonFiniteError(RuntimeError):
    """Training stopped: a non-finite loss or gradient norm (the last good state was saved)."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint."""


def _is_primary() -> bool:
    return jax.process_index() == 0


def say(msg: str) -> None:
    if _is_primary():
        print(msg, flush=True)


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def encode_scalar_event(step: int, wall_time: float, scalars: dict[str, float]) -> bytes:
    """A tensorflow.Event proto with one simple_value per tag (hand-encoded)."""
    import struct as pystruct

    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + pystruct.pack("<f", float(v)))
        for tag, v in scalars.items()
    )
    return (
        _field(1, 1)
        + pystruct.pack("<d", wall_time)
        + _field(2, 0)
        + _varint(int(step))
        + _bytes_field(5, summary)
    )


def tfrecord(data: bytes) -> bytes:
    import struct as pystruct

    header = pystruct.pack("<Q", len(data))
    return header + pystruct.pack("<I", _masked_crc(header)) + data + pystruct.pack("<I", _masked_crc(data))


class EventFileWriter:
    """TensorBoard scalars without TensorBoard: WORKDIR/tb/events.out.tfevents.<time>.<host>."""

    def __init__(self, logdir: str):
        import socket
        import struct as pystruct

        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._fh = open(self.path, "ab")
        version = _field(1, 1) + pystruct.pack("<d", time.time()) + _bytes_field(3, b"brain.Event:2")
        self._fh.write(tfrecord(version))
        self._fh.flush()

    def write(self, step: int, scalars: dict[str, float]):
        self._fh.write(tfrecord(encode_scalar_event(step, time.time(), scalars)))
        self._fh.flush()

    def close(self):
        self._fh.close()


class MetricsWriter:
    """Metrics as JSON lines in WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb
    (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        primary = _is_primary()
        self._fh = open(self.path, "a") if primary else None
        self._tb = EventFileWriter(os.path.join(workdir, "tb")) if primary else None

    def write(self, step: int, metrics: dict):
        if self._fh is None:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self._tb.write(step, {k: v for k, v in row.items() if k != "step"})

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._tb.close()


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    cfg: Any
    workdir: str
    model_cfg: wan.WanConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    objective: Any
    state_shardings: Any
    abstract_state: Any
    batch_sharding: Any
    pretrained: dict  # name -> (abstract nnx.State, its shardings, path): built outside any mesh context


def _validate_train(cfg, model_cfg, sizes, rules):
    for section in ("train", "data"):
        if section not in cfg:
            raise ValueError(f"config.{section}: missing section (see configs/panworld.py)")
    tc = cfg.train
    for f in ("steps", "batch_size", "log_every", "ckpt_every", "keep"):
        v = tc.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "steps" else 1):
            raise ValueError(f"config.train.{f}: must be a positive int, got {v!r}")
    batch_axes = dict(rules).get("batch")
    axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    n = math.prod(sizes[a] for a in axes if a is not None)
    if tc.batch_size % n:
        raise ValueError(
            f"config.train.batch_size={tc.batch_size} is not divisible by the mesh axes {batch_axes} the "
            f"batch is sharded over (size {n}; mesh {sizes})"
        )
    if tc.batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={tc.batch_size} is not divisible by {jax.process_count()} processes"
        )
    src = cfg.data.source
    frames = int(cfg.data[src].num_frames) if src in ("panworld", "video") and src in cfg.data else None
    if frames is not None and frames % int(cfg.stream.chunk_frames):
        raise ValueError(
            f"config.data.{src}.num_frames={frames} is not a whole number of chunks "
            f"(config.stream.chunk_frames={cfg.stream.chunk_frames})"
        )
    # every parameter dim against the mesh (names config.model.<field> / config.sharding_rules)
    check = cfg.copy_and_resolve_references()
    with check.unlocked():
        check.stream.batch_size = int(tc.batch_size)
    config_lib.validate_mesh(check, model_cfg, sizes, rules)


def train_seed(cfg) -> int:
    """Seed of the train state's PRNG key (init, noise, timesteps, DMD rollouts):
    `config.train.seed` when set (>= 0), else `config.seed`. `config.seed` also builds the frozen
    PanWorld word encoder, so a student must keep its teacher's `config.seed`; `train.seed` varies
    a run without changing the prompt embeddings."""
    seed = int(cfg.train.get("seed", -1))
    return seed if seed >= 0 else int(cfg.seed)


def setup(cfg, workdir: str, mesh=None) -> Run:
    model_cfg = config_lib.validate(cfg, check_mesh=False)
    rules = config_lib.sharding_rules(cfg)
    if mesh is None:
        sizes = config_lib.mesh_sizes(cfg)
        mesh = shd.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"])
    sizes = config_lib.mesh_sizes(cfg, mesh)
    _validate_train(cfg, model_cfg, sizes, rules)
    objective = objectives.build(cfg, model_cfg)
    rng = jax.random.key_data(jax.random.key(train_seed(cfg)))
    pretrained = {}
    for name, (mcfg, path) in objective.pretrained().items():
        if not path:
            raise ValueError(
                f"pretrained params {name!r} have no path (config.train.init_from / teacher_path)"
            )
        abstract = wan.abstract_model(mcfg)[1]  # nnx.eval_shape: outside jax.set_mesh
        pretrained[name] = (abstract, shd.state_shardings(abstract, mesh, rules), path)
    loaded_abstract = {name: a for name, (a, _, _) in pretrained.items()}
    abstract_state = jax.eval_shape(objective.init_state, rng, loaded_abstract)
    shardings = state_lib.state_shardings(abstract_state, mesh, rules)
    batch_sharding = shd.named_sharding(mesh, ("batch",), rules)
    return Run(
        cfg, workdir, model_cfg, mesh, rules, objective, shardings, abstract_state, batch_sharding, pretrained
    )


def init_state(run: Run):
    """A fresh state, created already sharded (pretrained params read straight into their shardings)."""
    loaded = {}
    for name, (abstract, shardings, path) in run.pretrained.items():
        loaded[name] = checkpoint_io.load_params(path, abstract, shardings)
        say(f"loaded {name} from {path}")
    rng = jax.random.key_data(jax.random.key(train_seed(run.cfg)))
    init = jax.jit(run.objective.init_state, out_shardings=run.state_shardings)
    return init(rng, loaded)


def global_batch(run: Run, local: dict) -> dict:
    """Per-host numpy batch -> global jax arrays sharded over the batch axes ('index' stays on host)."""
    out = {}
    for k, v in local.items():
        if k == "index":
            continue
        spec = jax.sharding.PartitionSpec(run.batch_sharding.spec[0], *([None] * (v.ndim - 1)))
        sh = jax.sharding.NamedSharding(run.mesh, spec)
        out[k] = jax.make_array_from_process_local_data(sh, v)
    return out


def jit_train_step(run: Run):
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        run.objective.train_step,
        in_shardings=(run.state_shardings, None),
        out_shardings=(run.state_shardings, replicated),
        donate_argnums=(0,),
    )


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _memory_line(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    if m is None:
        return "compiled step memory: not reported by this backend"
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    return (
        f"compiled step memory per device: arguments {mib(m.argument_size_in_bytes)}, outputs "
        f"{mib(m.output_size_in_bytes)}, temporaries {mib(m.temp_size_in_bytes)}, "
        f"aliased (donated) {mib(m.alias_size_in_bytes)}"
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _Signals:
    def __init__(self):
        self.term = False
        self._old = None

    def install(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None

    def _handler(self, signum, frame):
        self.term = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.term
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self.term], np.int32))
        return bool(np.any(flags))


def train(cfg, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """Run (or resume) training in `workdir`. Returns a summary dict (final step, last metrics, ...).

    max_steps: stop after this many steps in this call (tests), without the final export.
    Raises NonFiniteError / Preempted after saving the last good state.
    """
    workdir = os.path.abspath(workdir)
    if _is_primary():
        os.makedirs(workdir, exist_ok=True)
    tc = cfg.train
    run = setup(cfg, workdir, mesh)
    config_json = config_lib.config_to_json(cfg)
    if _is_primary():
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(config_json)
    say(f"workdir {workdir}")
    say(
        f"objective {tc.objective}; mesh {dict(run.mesh.shape)} over {jax.device_count()} devices "
        f"({jax.process_count()} processes); global batch {tc.batch_size}"
    )
    n_params = wan.param_count(run.abstract_state.params)
    say(f"trained params: {n_params / 1e6:.3f}M ({n_params} values); model {run.model_cfg}")

    ckpt = ckpt_lib.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(tc.keep),
        use_async=bool(tc.get("async_checkpoints", True)),
    )
    with jax.set_mesh(run.mesh):
        state, data_state = None, None
        if ckpt.all_steps():
            found = ckpt.restore_latest(run.abstract_state, run.state_shardings)
            if found is not None:
                state, step0, meta = found
                data_state = ckpt_lib.data_state_for_this_process(meta)
                say(f"resumed from checkpoint step {step0} ({os.path.join(ckpt.directory, str(step0))})")
        if state is None:
            state = init_state(run)
            say("initialised a fresh train state")
        data_iter = pipeline.make_iterator(
            cfg, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if data_state is not None:
            data_iter.set_state(data_state)

        step_fn = jit_train_step(run)
        start = int(jax.device_get(state.step))
        total = int(tc.steps)
        last_step = total if max_steps is None else min(total, start + int(max_steps))
        summary = dict(start_step=start, step=start, metrics={}, workdir=workdir)
        if start >= total:
            say(f"nothing to do: step {start} >= config.train.steps={total}")
            _export(run, state, config_json, workdir)
            ckpt.close()
            return summary

        local = next(data_iter)
        batch = global_batch(run, local)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        say(f"compiled the train step in {time.perf_counter() - t0:.1f}s; {_memory_line(compiled)}")

        writer = MetricsWriter(workdir)
        order_fh = None
        if bool(tc.get("log_data_order", False)) and _is_primary():
            order_fh = open(os.path.join(workdir, "data_order.jsonl"), "a")
        frames = int(run.objective.frames_per_example({k: v.shape for k, v in local.items()}))
        signals = _Signals()
        signals.install()
        nan_at = int(tc.get("inject_nan_at", -1))
        step = start
        t_log, step_log = time.perf_counter(), step
        t_start = t_log
        metrics = {}
        try:
            while step < last_step:
                if order_fh is not None:
                    order_fh.write(
                        json.dumps({"step": step, "index": [int(i) for i in local["index"]]}) + "\n"
                    )
                    order_fh.flush()
                if step == nan_at:  # testing hook of the non-finite guard
                    key = "latents" if "latents" in batch else "video"  # 'vae' trains on pixels
                    batch = dict(batch, **{key: batch[key] * jnp.nan})
                state, metrics_dev = compiled(state, batch)
                # the iterator state after this batch is what a checkpoint of `state` must hold
                data_state = data_iter.get_state()
                metrics = jax.device_get(metrics_dev)
                if not bool(metrics["finite"]):
                    good = int(jax.device_get(state.step))
                    ckpt.save(good, state, data_state=data_state, config_json=config_json, force=True)
                    ckpt.wait()
                    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
                    raise NonFiniteError(
                        f"non-finite loss ({loss}) or grad norm ({gnorm}) at step {step}; the update was "
                        f"not applied and the last good state (step {good}) is saved in "
                        f"{ckpt.directory}/{good}. Lower config.train.lr or check the data."
                    )
                step += 1
                local = next(data_iter)
                batch = global_batch(run, local)
                if step % int(tc.log_every) == 0 or step == last_step:
                    now = time.perf_counter()
                    sps = (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    eta = (total - step) / sps if sps > 0 else float("inf")
                    shown = {k: float(v) for k, v in metrics.items() if k != "finite"}
                    writer.write(
                        step, {**shown, "steps_per_s": sps, "frames_per_s": sps * tc.batch_size * frames}
                    )
                    terms = " | ".join(f"{k} {v:.4g}" for k, v in shown.items())
                    say(
                        f"step {step}/{total} | {terms} | {sps:.2f} steps/s | "
                        f"{sps * tc.batch_size * frames:.0f} frames/s | ETA {_fmt_time(eta)}"
                    )
                # the iterator is one batch ahead: save the state of the batches consumed so far
                if step % int(tc.ckpt_every) == 0 and step < total:
                    ckpt.save(step, state, data_state=data_state, config_json=config_json)
                if signals.any_process():
                    ckpt.save(step, state, data_state=data_state, config_json=config_json, force=True)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved checkpoint step {step} in {ckpt.directory}; exiting")
            if step >= total:
                ckpt.save(step, state, data_state=data_state, config_json=config_json, force=True)
                ckpt.wait()
                _export(run, state, config_json, workdir)
            else:
                ckpt.wait()
        finally:
            signals.restore()
            writer.close()
            if order_fh is not None:
                order_fh.close()
            ckpt.close()
        elapsed = time.perf_counter() - t_start
        say(f"done: step {step} in {elapsed:.1f}s ({(step - start) / max(elapsed, 1e-9):.2f} steps/s)")
        summary.update(
            step=step, metrics={k: float(v) for k, v in metrics.items()}, seconds=elapsed, state=state
        )
        return summary


def _export(run: Run, state, config_json: str, workdir: str) -> str:
    from adastate_jax.training.objectives.flow_matching import export_params

    path = os.path.join(workdir, "export")
    # an objective may choose what to export (the 'vae' objective: its VAE); default: EMA or params
    params = getattr(run.objective, "export_params", export_params)(state)
    checkpoint_io.save_params(
        path,
        params,
        config_json,
        info=dict(
            step=int(jax.device_get(state.step)),
            objective=str(run.cfg.train.objective),
            ema=state.ema_params is not None,
        ),
        overwrite=True,
    )
    say(f"exported params (EMA: {state.ema_params is not None}) to {path}")
    return path
