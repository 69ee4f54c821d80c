"""The train state: one pytree holding everything a training run carries from step to step.

Owns: `TrainState` (step, generator params, optimiser state, EMA params, PRNG key; for DMD also the
critic's params and optimiser state; frozen params such as the teacher and the text encoder), the
optimiser construction from `config.train` (`make_optimizer`), the EMA update, and the logical
shardings of a whole state (`state_shardings`: every leaf that is an nnx Variable carries its
logical axis names, the rest is replicated).

Must not know: objectives' losses, files, data pipelines or meshes beyond a `Mesh` it is handed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from adastate_jax import sharding as shd


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimiser steps taken
    params: Any  # nnx.State of the generator / student / teacher being trained
    opt_state: Any  # optax state of `params`
    ema_params: Any  # nnx.State (EMA of params) or None when config.train.ema == 0
    rng: jax.Array  # uint32[2] raw PRNG key; the step folds `step` in (same key on resume)
    critic_params: Any = None  # DMD: fake-score critic (nnx.State)
    critic_opt_state: Any = None
    frozen: Any = None  # {'teacher': nnx.State, 'text': nnx.State, ...}: never updated


def make_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup to `lr`, then constant or cosine decay to `lr * final_lr_fraction`
    (`train_cfg`: the `config.train` TrainConfig)."""
    lr, warmup, steps = float(train_cfg.lr), int(train_cfg.warmup), int(train_cfg.steps)
    if train_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, steps - warmup), alpha=train_cfg.final_lr_fraction)
    else:
        after = optax.constant_schedule(lr)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(train_cfg, lr=None, b1=None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; `lr` / `b1` override the config (the DMD critic has its own)."""
    schedule = make_schedule(train_cfg) if lr is None else _scaled(train_cfg, lr)
    b1 = train_cfg.b1 if b1 is None else float(b1)
    parts = []
    clip = train_cfg.grad_clip
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=b1,
            b2=train_cfg.b2,
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
        )
    )
    return optax.chain(*parts)


def _scaled(train_cfg, lr: float) -> optax.Schedule:
    base = make_schedule(train_cfg)
    ratio = float(lr) / float(train_cfg.lr) if float(train_cfg.lr) else 0.0
    return lambda count: base(count) * ratio


def ema_update(ema, params, decay: float, step=None):
    """ema <- d * ema + (1 - d) * params (leaf-wise, in the EMA's dtype).

    With `step` (the optimiser step just taken, from 0), d = min(decay, (1 + step) / (10 + step)):
    the usual EMA warm-up, so that a short run's EMA is not dominated by the initial params (with
    Wan's zero-initialised head, a lagging EMA scales every velocity down and leaves noise in the
    samples).
    """
    d = decay if step is None else jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def state_shardings(abstract_state: TrainState, mesh, rules=shd.DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) TrainState.

    nnx Variables (params, optimiser moments, which optax builds with the params' structure and
    metadata) map through their logical names; everything else (step, counts, keys) is replicated.
    """
    return shd.state_shardings(abstract_state, mesh, rules)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


def copy_tree(tree):
    """A fresh copy of a pytree of arrays (so EMA/teacher never alias donated params)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def trainable_count(state: TrainState) -> int:
    import numpy as np

    leaves = jax.tree.leaves(state.params)
    return int(sum(np.prod(x.shape) for x in leaves))


__all__ = [
    "TrainState",
    "copy_tree",
    "ema_update",
    "global_norm",
    "make_optimizer",
    "make_schedule",
    "state_shardings",
]
