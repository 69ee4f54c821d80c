"""The train loop: any objective, on any mesh, with checkpoints, resume, preemption and guards.

Owns: setting up a run from a config (mesh, rules, objective, pretrained params, train state
created already sharded, data iterator, checkpoint manager), the jitted train step (in/out
shardings, state donated), placing per-host batches as global arrays, the loop itself (progress
lines with steps/s, frames/s, ETA; metrics to stdout and `WORKDIR/metrics.jsonl`), saving every
`ckpt_every` steps and on SIGTERM, stopping on a non-finite loss or gradient norm after saving the
last good state, and exporting the final params to `WORKDIR/export/` (a params checkpoint that
`launch/rollout.py --checkpoint` streams from and that later stages load). The export's info.json
records the run's objective, steps and student policy, and where its params started
(`init_provenance`: the `train.init_from` chain with each stage's objective, policy and steps, so a
study can count the steps of an arm initialised from another arm's student).

TensorBoard scalars go through tensorboardX to `WORKDIR/tb/events.out.tfevents.*`; the same metrics
also go to `WORKDIR/metrics.jsonl`.

WORKDIR may be a local directory or an object-store URL (`gs://bucket/run` on a TPU pod): orbax
writes checkpoints and the export there, the loop's own files go through `files` (fsspec; `gcsfs`
for gs://, tensorboardX needs `google-cloud-storage` for its event files there).

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

from adastate_jax import build, files
from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.config import Experiment
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


class MetricsWriter:
    """Metrics as JSON lines in WORKDIR/metrics.jsonl and TensorBoard scalars (tensorboardX) in
    WORKDIR/tb (process 0 only)."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        primary = _is_primary()
        self._fh = files.LineLog(self.path) if primary else None
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30) if primary else None

    def write(self, step: int, metrics: dict):
        if self._fh is None:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._tb.close()


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    cfg: Any  # the ConfigDict as given (written to WORKDIR/config.json and every export)
    exp: Experiment
    workdir: str
    mesh: jax.sharding.Mesh
    objective: Any
    state_shardings: Any
    abstract_state: Any
    batch_sharding: Any
    pretrained: dict  # name -> (abstract nnx.State, its shardings, path): built outside any mesh context
    init: dict | None = None  # provenance of train.init_from (`init_provenance`), None without it

    @property
    def model_cfg(self) -> wan.WanConfig:
        return self.exp.model

    @property
    def rules(self) -> tuple:
        return self.exp.sharding_rules


def check_run(exp: Experiment, sizes: dict[str, int]) -> None:
    """The training-only rules: train/data present, the batch divides the mesh's batch axes and the
    processes, every trained / loaded DiT divides the mesh."""
    for section in ("train", "data"):
        if getattr(exp, section) is None:
            raise ValueError(f"config.{section}: missing section (see configs/panworld.py)")
    config_lib.check_batch(exp, sizes, exp.train.batch_size, "train.batch_size")
    if exp.train.batch_size % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={exp.train.batch_size} is not divisible by "
            f"{jax.process_count()} processes"
        )
    models = {"model": exp.model}
    if exp.train.objective in ("ode_init", "self_forcing_dmd") and exp.teacher_model is not None:
        models["teacher_model"] = exp.teacher_model
    if exp.train.objective == "self_forcing_dmd" and exp.critic_model is not None:
        models["critic_model"] = exp.critic_model
    if exp.train.objective != "vae":
        config_lib.check_mesh(exp, sizes, models)


def train_seed(cfg) -> int:
    """Seed of the train state's PRNG key (init, noise, timesteps, DMD rollouts):
    `config.train.seed` when set (>= 0), else `config.seed`. `config.seed` also builds the frozen
    PanWorld word encoder, so a student must keep its teacher's `config.seed`; `train.seed` varies
    a run without changing the prompt embeddings."""
    return config_lib.parse(cfg).train_seed


def setup(cfg, workdir: str, mesh=None) -> Run:
    """Everything a run needs before its first step, from a ConfigDict (or an Experiment)."""
    exp = config_lib.parse(cfg)
    if mesh is None:
        mesh = build.mesh(exp)
    sizes = config_lib.mesh_sizes(exp, mesh)
    check_run(exp, sizes)
    objective = objectives.build(exp)
    init = init_provenance(exp)  # checks config.train.init_policy before anything is built
    rng = jax.random.key_data(jax.random.key(exp.train_seed))
    pretrained = {}
    for name, (mcfg, path) in objective.pretrained().items():
        if not path:
            raise ValueError(
                f"pretrained params {name!r} have no path (config.train.init_from / teacher_path)"
            )
        abstract = wan.abstract_model(mcfg)[1]  # nnx.eval_shape: outside jax.set_mesh
        pretrained[name] = (abstract, build.param_shardings(abstract, mesh, exp), path)
    loaded_abstract = {name: a for name, (a, _, _) in pretrained.items()}
    abstract_state = jax.eval_shape(objective.init_state, rng, loaded_abstract)
    shardings = state_lib.state_shardings(abstract_state, mesh, exp.sharding_rules)
    batch_sharding = shd.named_sharding(mesh, ("batch",), exp.sharding_rules)
    return Run(
        cfg, exp, workdir, mesh, objective, shardings, abstract_state, batch_sharding, pretrained, init
    )


STUDENT_OBJECTIVES = ("ode_init", "self_forcing_dmd")  # objectives whose params stream with a policy


def init_provenance(exp: Experiment) -> dict | None:
    """Where `train.init_from` comes from, read from its export (info.json, config.json):
    {init_from, init_objective, init_policy (its stream.anchor when a student, else None),
    init_chain (nearest first: {path, objective, policy, step} of every stage down the chain),
    init_steps (steps of the chain's student stages: ODE init and DMD)}; None without init_from.
    Raises naming config.train.init_policy when it is set and the export's policy differs or is
    not recorded."""
    tc = exp.train
    path = tc.init_from
    if not path:
        return None
    info = checkpoint_io.read_info(path)
    raw = checkpoint_io.read_config_json(path)
    cfg = json.loads(raw) if raw else {}
    objective = info.get("objective") or (cfg.get("train") or {}).get("objective")
    policy = info.get("policy")
    if policy is None and objective in STUDENT_OBJECTIVES:
        policy = (cfg.get("stream") or {}).get("anchor")
    if tc.init_policy and policy != tc.init_policy:
        found = f"policy {policy!r}" if policy else "no student policy (no config.json / not a student)"
        raise ValueError(
            f"config.train.init_policy={tc.init_policy!r}: config.train.init_from={path} records {found}"
        )
    here = dict(path=path, objective=objective, policy=policy, step=int(info.get("step", 0)))
    chain = [here, *info.get("init_chain", [])]
    steps = sum(int(c.get("step", 0)) for c in chain if c.get("objective") in STUDENT_OBJECTIVES)
    return dict(
        init_from=path, init_objective=objective, init_policy=policy, init_chain=chain, init_steps=steps
    )


def init_state(run: Run):
    """A fresh state, created already sharded (pretrained params read straight into their shardings)."""
    loaded = {}
    for name, (abstract, shardings, path) in run.pretrained.items():
        loaded[name] = checkpoint_io.load_params(path, abstract, shardings)
        say(f"loaded {name} from {path}")
    rng = jax.random.key_data(jax.random.key(run.exp.train_seed))
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


def _bad_batch_record(run: Run, step: int, local: dict, metrics: dict, action: str) -> dict:
    """What identifies a non-finite step's batch: the source and its records' indices."""
    data = run.exp.data
    return dict(
        step=int(step),
        action=action,
        source=data.source,
        paths=list(data.paths),
        records=[int(i) for i in np.asarray(local.get("index", [])).reshape(-1)],
        loss=float(metrics["loss"]),
        grad_norm=float(metrics["grad_norm"]),
    )


def _append_jsonl(path: str, row: dict) -> None:
    if _is_primary():
        files.append_line(path, json.dumps(row))


def _stopped_at(path: str, step: int) -> dict | None:
    """The `bad_batches.jsonl` entry of a run that stopped on a non-finite batch at `step`."""
    text = files.read_text(path)
    if text is None:
        return None
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    stopped = [r for r in rows if r.get("action") == "stopped" and r.get("step") == step]
    return stopped[-1] if stopped else None


def train(cfg, workdir: str, *, mesh=None, max_steps: int | None = None) -> dict:
    """Run (or resume) training in `workdir`. Returns a summary dict (final step, last metrics, ...).

    cfg: the ConfigDict (written to WORKDIR/config.json). max_steps: stop after this many steps in
    this call (tests), without the final export. Raises NonFiniteError / Preempted after saving the
    last good state.

    A non-finite loss or gradient norm is never applied. With `train.bad_batches='stop'` (default)
    the run saves the last good state and stops, naming the batch's records (source and indices,
    also appended to WORKDIR/bad_batches.jsonl); a re-run resumes after that batch and says so. With
    'skip' the step is skipped, the batch logged to WORKDIR/bad_batches.jsonl, and training goes on.
    """
    workdir = files.resolve(workdir)  # a local dir, or a URL (gs://bucket/run): orbax writes there
    if _is_primary():
        files.make_dirs(workdir)
    run = setup(cfg, workdir, mesh)
    tc = run.exp.train
    config_json = config_lib.to_json(cfg)
    if _is_primary():
        files.write_text(os.path.join(workdir, "config.json"), config_json)
    say(f"workdir {workdir}")
    say(
        f"objective {tc.objective}; mesh {dict(run.mesh.shape)} over {jax.device_count()} devices "
        f"({jax.process_count()} processes); global batch {tc.batch_size}"
    )
    n_params = wan.param_count(run.abstract_state.params)
    say(f"trained params: {n_params / 1e6:.3f}M ({n_params} values); model {run.model_cfg}")
    bad_path = os.path.join(workdir, "bad_batches.jsonl")

    ckpt = ckpt_lib.TrainCheckpointer(
        os.path.join(workdir, "checkpoints"), keep=tc.keep, use_async=tc.async_checkpoints
    )
    with jax.set_mesh(run.mesh):
        state, data_state = None, None
        if ckpt.all_steps():
            found = ckpt.restore_latest(run.abstract_state, run.state_shardings)
            if found is not None:
                state, step0, meta = found
                data_state = ckpt_lib.data_state_for_this_process(meta)
                say(f"resumed from checkpoint step {step0} ({os.path.join(ckpt.directory, str(step0))})")
                saved = ckpt.saved_config(step0)
                changes = ckpt_lib.config_changes(saved, json.loads(config_json)) if saved else []
                if changes:  # allowed (e.g. more train.steps), but never silent
                    say(
                        f"note: the config differs from the one step {step0} was saved with: "
                        + "; ".join(changes[:12])
                        + (f"; ... ({len(changes)} fields)" if len(changes) > 12 else "")
                    )
                stopped = _stopped_at(bad_path, step0)
                if stopped is not None:
                    say(
                        f"note: the last run stopped on a non-finite batch at step {step0} "
                        f"({stopped['source']} records {stopped['records']}); it is skipped now and "
                        "will come round again next epoch (config.train.bad_batches='skip' skips and "
                        "logs such batches)"
                    )
        if state is None:
            state = init_state(run)
            say("initialised a fresh train state")
        data_iter = pipeline.make_iterator(
            run.exp, process_index=jax.process_index(), process_count=jax.process_count()
        )
        if data_state is not None:
            data_iter.set_state(data_state)

        step_fn = jit_train_step(run)
        start = int(jax.device_get(state.step))
        total = tc.steps
        last_step = total if max_steps is None else min(total, start + int(max_steps))
        summary = dict(start_step=start, step=start, metrics={}, workdir=workdir, skipped=[])
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
        if tc.log_data_order and _is_primary():
            order_fh = files.LineLog(os.path.join(workdir, "data_order.jsonl"))
        frames = int(run.objective.frames_per_example({k: v.shape for k, v in local.items()}))
        signals = _Signals()
        signals.install()
        step = start
        injected = False
        t_log, step_log = time.perf_counter(), step
        t_start = t_log
        metrics = {}
        try:
            while step < last_step:
                if order_fh is not None:
                    order_fh.write(
                        json.dumps({"step": step, "index": [int(i) for i in local["index"]]}) + "\n"
                    )
                if step == tc.inject_nan_at and not injected:  # testing hook of the non-finite guard
                    key = "latents" if "latents" in batch else "video"  # 'vae' trains on pixels
                    batch = dict(batch, **{key: batch[key] * jnp.nan})
                    injected = True
                state, metrics_dev = compiled(state, batch)
                # the iterator state after this batch is what a checkpoint of `state` must hold
                data_state = data_iter.get_state()
                metrics = jax.device_get(metrics_dev)
                if not bool(metrics["finite"]):
                    good = int(jax.device_get(state.step))
                    action = "skipped" if tc.bad_batches == "skip" else "stopped"
                    row = _bad_batch_record(run, step, local, metrics, action)
                    _append_jsonl(bad_path, row)
                    what = f"{row['source']} records {row['records']}"
                    if action == "stopped":
                        ckpt.save(good, state, data_state=data_state, config_json=config_json, force=True)
                        ckpt.wait()
                        raise NonFiniteError(
                            f"non-finite loss ({row['loss']}) or grad norm ({row['grad_norm']}) at "
                            f"step {step} on the batch of {what}; the update was not applied and the "
                            f"last good state (step {good}) is saved in {ckpt.directory}/{good} (a re-run "
                            f"resumes after this batch). Lower config.train.lr, check those records, or set "
                            f"config.train.bad_batches='skip' to skip and log such batches ({bad_path})."
                        )
                    say(
                        f"step {step}: non-finite loss on the batch of {what}: skipped (logged to {bad_path})"
                    )
                    summary["skipped"].append(row)
                    local = next(data_iter)
                    batch = global_batch(run, local)
                    continue
                step += 1
                local = next(data_iter)
                batch = global_batch(run, local)
                if step % tc.log_every == 0 or step == last_step:
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
                if step % tc.ckpt_every == 0 and step < total:
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
            objective=run.exp.train.objective,
            policy=run.exp.stream.anchor if run.exp.train.objective in STUDENT_OBJECTIVES else None,
            ema=state.ema_params is not None,
            **(run.init or {}),
        ),
        overwrite=True,
    )
    say(f"exported params (EMA: {state.ema_params is not None}) to {path}")
    return path
