"""Train-state checkpoints: an orbax CheckpointManager of (train state, data iterator state, config).

Owns the on-disk layout of a training run's `WORKDIR/checkpoints/`:

    checkpoints/<step>/state/    the TrainState as a flat {leaf name: array} (orbax StandardSave,
                                 sharded, written by every process; async)
    checkpoints/<step>/meta/     JSON: step, leaf names, an exact checksum per leaf, the grain
                                 iterator state of every process, time
    checkpoints/<step>/config/   JSON: the experiment config
    corrupt_checkpoints/<step>.N/  checkpoints refused at restore (moved aside, never deleted)

Guarantees:
  * atomic steps (orbax writes into a temp dir and renames); a run killed mid-save leaves the
    previous steps intact and the temp dir is cleaned up on the next start;
  * keep the last N (`max_to_keep`);
  * restore goes into whatever shardings the target asks for (a different mesh shape is fine);
  * every restored leaf is verified against its checksum (uint32 sum of bit patterns weighted by
    position: exact, independent of sharding and reduction order). A checkpoint that fails to read
    or to verify is refused with an error naming its directory and the leaves involved, moved to
    `corrupt_checkpoints/`, and the previous good step is used instead;
  * a checkpoint whose leaf names differ from the target (another config) is an error, not a
    fallback: it names the missing and unexpected leaves.

Must not know: objectives, models, what the data iterator is (it saves the JSON-able dict that
`get_state()` returns, one per process).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from adastate_jax import files

log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
    """A checkpoint step that cannot be read back or whose contents fail verification."""


# --------------------------------------------------------------------------------------------
# Flat view of a state and its checksums
# --------------------------------------------------------------------------------------------


def _leaf_name(path) -> str:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    name = ".".join(parts)
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def flatten_state(state) -> tuple[dict[str, Any], Any]:
    """state -> ({leaf name: leaf}, treedef); names are stable, readable and unique."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    flat = {}
    for path, leaf in leaves_with_path:
        name = _leaf_name(path)
        if name in flat:
            raise ValueError(f"checkpoint leaf name {name!r} is not unique")
        flat[name] = leaf
    return flat, treedef


def unflatten_state(flat: dict[str, Any], like) -> Any:
    names = list(flatten_state(like)[0])
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def _bits_u32(x: jax.Array) -> jax.Array:
    dt = jnp.dtype(x.dtype)
    if dt == jnp.bool_:
        return x.astype(jnp.uint32)
    if dt.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if dt.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if dt.itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no checksum for dtype {dt}")


@jax.jit
def _checksums(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    def one(x):
        bits = _bits_u32(x)
        pos = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * jnp.uint32(2654435761) + 1
        return jnp.sum(bits * pos, dtype=jnp.uint32)  # wraps mod 2^32: exact and order-free

    return {k: one(v) for k, v in flat.items()}


def checksums(flat: dict[str, jax.Array]) -> dict[str, int]:
    out = jax.device_get(_checksums(flat))
    return {k: int(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Per-process JSON (grain iterator states) gathered on every host
# --------------------------------------------------------------------------------------------


def allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process."""
    s = json.dumps(obj)
    if jax.process_count() == 1:
        return [json.loads(s)]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(s.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    width = int(np.max(lengths))
    padded = np.zeros((width,), np.uint8)
    padded[: raw.size] = raw
    every = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(every[i][: int(lengths[i][0])]).decode()) for i in range(jax.process_count())]


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class TrainCheckpointer:
    """CheckpointManager for a training run. See the module docstring.

    directory: WORKDIR/checkpoints; keep: steps kept; use_async: background writes (the arrays are
    copied to host before `save` returns, so the state may be donated right after).
    """

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = files.resolve(directory)  # a local dir, or a URL (gs://...) as given
        self.keep = int(keep)
        self.use_async = bool(use_async)
        self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self.use_async,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "config")
        )

    # --- save -------------------------------------------------------------------------------
    def save(
        self, step: int, state, *, data_state=None, config_json: str | None = None, force: bool = False
    ) -> bool:
        """Save `state` at `step` (async). data_state: this process's iterator state (gathered from
        every process here). Returns False when the step already exists."""
        step = int(step)
        if step in self.manager.all_steps():
            return False
        flat, _ = flatten_state(state)
        meta = dict(
            step=step,
            names=list(flat),
            checksums=checksums(flat),
            data_states=allgather_json(data_state),
            process_count=jax.process_count(),
            time=time.time(),
        )
        config = json.loads(config_json) if config_json else {}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )
        return True

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # --- restore ----------------------------------------------------------------------------
    def restore_step(self, step: int, target_state, target_shardings=None):
        """Restore step `step` into the structure (and shardings) of `target_state`.

        target_state: a TrainState of arrays or ShapeDtypeStructs; target_shardings: a matching
        pytree of Shardings (None: the targets' own `.sharding`, else the first device).
        Returns (state, meta). Raises CheckpointCorrupt (unreadable / failed verification) or
        ValueError (a checkpoint of another structure).
        """
        step_dir = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupt(
                f"checkpoint {step_dir}: cannot read meta ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(meta, dict) or "names" not in meta or "checksums" not in meta:
            raise CheckpointCorrupt(f"checkpoint {step_dir}: meta is incomplete")
        flat_target, _ = flatten_state(target_state)
        if target_shardings is not None:
            sh_leaves = jax.tree.leaves(
                target_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
            )
            if len(sh_leaves) != len(flat_target):
                raise ValueError(f"{len(sh_leaves)} shardings for a state of {len(flat_target)} leaves")
            flat_sh = dict(zip(flat_target, sh_leaves))
        else:
            flat_sh = {k: getattr(v, "sharding", None) for k, v in flat_target.items()}
        missing = sorted(set(flat_target) - set(meta["names"]))
        unexpected = sorted(set(meta["names"]) - set(flat_target))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {step_dir} holds a different train state (another config.model / "
                f"config.train.objective?): missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[k] or default)
            for k, v in flat_target.items()
        }
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorrupt(
                f"checkpoint {step_dir}: cannot read the train state ({type(e).__name__}: {str(e)[:500]})"
            ) from e
        got = checksums(restored)
        bad = sorted(k for k, v in got.items() if int(meta["checksums"].get(k, -1)) != v)
        if bad:
            raise CheckpointCorrupt(
                f"checkpoint {step_dir}: {len(bad)} leaves fail their checksum (corrupted or truncated "
                f"files): {bad[:8]}{' ...' if len(bad) > 8 else ''}"
            )
        state = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(target_state), [restored[k] for k in flat_target]
        )
        return state, meta

    def saved_config(self, step: int) -> dict:
        """The experiment config (JSON object) checkpoint `step` was saved with; {} when it has none."""
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 (an older checkpoint without the item, an unreadable one)
            return {}
        config = got["config"] if "config" in got else None
        return config if isinstance(config, dict) else {}

    def restore_latest(self, target_state, target_shardings=None):
        """The newest good checkpoint: (state, step, meta), or None when there is none.

        A step that fails (CheckpointCorrupt) is logged with the reason, moved to
        `corrupt_checkpoints/`, and the previous step is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore_step(step, target_state, target_shardings)
                return state, step, meta
            except CheckpointCorrupt as e:
                msg = f"REFUSED {e}; falling back to the previous checkpoint"
                log.error(msg)
                print(msg, flush=True)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int):
        src = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.exists(src):
            dest_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(dest_root, exist_ok=True)
            n = 0
            while os.path.exists(os.path.join(dest_root, f"{step}.{n}")):
                n += 1
            shutil.move(src, os.path.join(dest_root, f"{step}.{n}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.close()
        self._open()


def data_state_for_this_process(meta: dict):
    """This process's iterator state from a checkpoint's meta (error if the process count changed)."""
    states = meta.get("data_states") or [None]
    if len(states) != jax.process_count():
        raise ValueError(
            f"checkpoint step {meta.get('step')} was written by {len(states)} processes, this run has "
            f"{jax.process_count()}: the per-host data iterators cannot resume exactly (start the data "
            "afresh with --reset_data or use the same number of hosts)"
        )
    return states[jax.process_index()]


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: old -> new' for every config field (dotted) whose value differs between the config a
    checkpoint was saved with and the current one (added / removed fields shown as <absent>)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a} -> {b}")
    return out
