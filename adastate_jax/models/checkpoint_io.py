"""Parameter checkpoints on disk: one model's params as an orbax checkpoint, plus its config JSON.

Owns the on-disk layout written by `launch/convert.py --out DIR` and read by
`launch/rollout.py --checkpoint DIR` (and anything else that needs params without a train state):

    DIR/params/       orbax checkpoint (StandardCheckpointHandler) of `nnx.to_pure_dict(params)`
    DIR/config.json   the experiment config as JSON (optional; `adastate_jax.config.config_from_json`)
    DIR/info.json     provenance, free-form (optional; e.g. source file, layout, param count)

Writes are atomic: everything goes to a hidden sibling `.DIR.partial` first, which is renamed to DIR
only once complete (`files.replace_dir`), so a crash never leaves a half checkpoint at DIR; an
existing DIR is replaced only with `overwrite=True`. Reads restore every leaf straight into its
target sharding (no whole-model host copy) and check the stored tree against the target first, reporting every
missing, unexpected and mis-shaped parameter in one `CheckpointError` naming the path. Stored
dtypes are cast to the target's (e.g. fp32 params restored as bf16 for inference).

Must not know: which model the params belong to, what the config means, or train states
(`training/checkpoint.py` owns the CheckpointManager of a whole train state).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from adastate_jax import files
from adastate_jax.models.convert import flatten_target

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
INFO_FILE = "info.json"


class CheckpointError(ValueError):
    """A params checkpoint that cannot be read into the requested target (names the path)."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pure(tree) -> dict:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _checkpointer() -> ocp.Checkpointer:
    # synchronous: `save` returns only when everything is written (the async StandardCheckpointer
    # keeps creating directories in a background thread after a failed save, which would outlive
    # the clean-up of the temp directory)
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _check_leaves(tree) -> None:
    bad = [
        f"{jax.tree_util.keystr(path)} ({type(leaf).__name__})"
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float))
    ]
    if bad:
        raise TypeError(f"params to save must be arrays; these leaves are not: {bad}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def params_dir(path: str) -> str:
    """The orbax directory of a params checkpoint: DIR/params, or `path` itself if it is one."""
    path = files.resolve(path)
    if not files.exists(path):
        raise FileNotFoundError(f"params checkpoint {path!r} does not exist")
    sub = os.path.join(path, PARAMS_DIR)
    if os.path.isdir(sub) or (files.is_url(sub) and files.exists(sub)):
        return sub
    if files.exists(os.path.join(path, "_METADATA")) or files.exists(
        os.path.join(path, "_CHECKPOINT_METADATA")
    ):
        return path
    raise CheckpointError(
        f"{path} is not a params checkpoint: it has no {PARAMS_DIR}/ directory "
        f"(written by save_params / launch/convert.py --out)"
    )


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_params(
    path: str,
    params,
    config_json: str | None = None,
    *,
    info: Mapping | None = None,
    overwrite: bool = False,
) -> str:
    """Write `params` (an nnx.State or a nested dict of arrays) as a params checkpoint at `path`.

    config_json: the experiment config as a JSON string (`adastate_jax.config.config_to_json`),
      written to DIR/config.json. info: a JSON-serialisable dict written to DIR/info.json.
    Atomic (temp sibling + rename); raises FileExistsError if `path` exists and not `overwrite`.
    Sharded arrays are written by every process (call it on all hosts). Returns the absolute path.
    A URL (`gs://bucket/run/export`) is written in place: object stores have no rename, orbax
    commits the params itself and each JSON file is one object (`_save_params_to_store`).
    """
    path = files.resolve(path)
    if files.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    params = _pure(params)
    _check_leaves(params)  # fail before writing anything
    if config_json is not None:
        json.loads(config_json)
    if files.is_url(path):
        return _save_params_to_store(path, params, config_json, info)
    tmp = files.sibling(path, "partial")
    primary = jax.process_index() == 0
    if primary:
        if os.path.exists(tmp):  # left over from a crashed run
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _sync("save_params:start")
    try:
        checkpointer = _checkpointer()
        try:
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
        finally:
            checkpointer.close()
        if primary:
            if config_json is not None:
                with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
                    fh.write(config_json)
            if info is not None:
                with open(os.path.join(tmp, INFO_FILE), "w") as fh:
                    json.dump(dict(info), fh, indent=2, sort_keys=True, default=str)
        _sync("save_params:written")
        if primary:
            files.replace_dir(tmp, path)
    except BaseException:
        if primary and os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("save_params:done")
    return path


def _save_params_to_store(path: str, params: dict, config_json: str | None, info: Mapping | None) -> str:
    """`save_params` to an object-store URL: an old export is deleted first (the caller checked
    `overwrite`), orbax writes DIR/params and commits it (its finalisation marker; a reader finds
    no complete checkpoint before), then process 0 writes the JSON objects."""
    primary = jax.process_index() == 0
    if primary:
        files.remove_tree(path)
    _sync("save_params:start")
    checkpointer = _checkpointer()
    try:
        checkpointer.save(os.path.join(path, PARAMS_DIR), args=ocp.args.StandardSave(params))
    finally:
        checkpointer.close()
    if primary:
        if config_json is not None:
            files.write_text(os.path.join(path, CONFIG_FILE), config_json)
        if info is not None:
            files.write_text(
                os.path.join(path, INFO_FILE), json.dumps(dict(info), indent=2, sort_keys=True, default=str)
            )
    _sync("save_params:done")
    return path


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


def read_config_json(path: str) -> str | None:
    """DIR/config.json as a string, or None if the checkpoint has none."""
    return files.read_text(os.path.join(files.resolve(path), CONFIG_FILE))


def read_info(path: str) -> dict:
    """DIR/info.json as a dict ({} if absent)."""
    text = files.read_text(os.path.join(files.resolve(path), INFO_FILE))
    return {} if text is None else json.loads(text)


def stored_shapes(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Parameter path ('a/b/c') -> (shape, dtype) as stored, read from metadata only."""
    directory = params_dir(path)
    checkpointer = _checkpointer()
    try:
        meta = checkpointer.metadata(directory)
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot read orbax metadata ({type(e).__name__}: {e})") from e
    finally:
        checkpointer.close()
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in key_path)
        out[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def _target_shardings(target_pure: dict, shardings) -> list:
    leaves = jax.tree.leaves(target_pure)
    if shardings is None:
        return [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * len(leaves)
    flat = jax.tree.leaves(_pure(shardings), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(flat) != len(leaves):
        raise ValueError(f"shardings has {len(flat)} leaves, the target state has {len(leaves)}")
    return flat


def load_params(path: str, abstract_state, shardings=None) -> nnx.State | dict:
    """Restore a params checkpoint into an nnx.State shaped like `abstract_state`.

    path: DIR written by `save_params` (or its DIR/params orbax directory).
    abstract_state: the target nnx.State of ShapeDtypeStructs (e.g. `wan.abstract_model(cfg)[1]`),
      or the `(graphdef, abstract_state)` pair itself, or a nested dict of ShapeDtypeStructs (then
      a nested dict of arrays is returned). Its dtypes win: stored values are cast.
    shardings: None (first device), one Sharding for every leaf, or a pytree like `abstract_state`
      (e.g. from `wan.create_sharded` / `sharding.state_shardings`); each leaf is read straight
      into its sharding.
    Raises CheckpointError naming the path and every missing / unexpected / mis-shaped parameter.
    """
    if isinstance(abstract_state, tuple) and len(abstract_state) == 2:
        abstract_state = abstract_state[1]
    directory = params_dir(path)
    stored = stored_shapes(path)
    target = flatten_target(abstract_state)
    missing = sorted(k for k in target if k not in stored)
    unexpected = sorted(k for k in stored if k not in target)
    mismatched = sorted(
        f"{k}: stored {stored[k][0]}, expected {tuple(target[k].shape)}"
        for k in target
        if k in stored and tuple(stored[k][0]) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"cannot load params from {directory} into the requested model:"]
        for title, items in (
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unexpected),
            ("wrong shapes", mismatched),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {i}" for i in items]
        lines.append("  (was it converted with the same config.model? see DIR/config.json)")
        raise CheckpointError("\n".join(lines))

    pure = _pure(abstract_state)
    leaves, treedef = jax.tree_util.tree_flatten(pure)
    leaf_shardings = _target_shardings(pure, shardings)
    restore_target = jax.tree_util.tree_unflatten(
        treedef,
        [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, leaf_shardings)],
    )
    checkpointer = _checkpointer()
    try:
        restored = checkpointer.restore(directory, args=ocp.args.StandardRestore(restore_target))
    except Exception as e:
        raise CheckpointError(f"{directory}: restore failed ({type(e).__name__}: {e})") from e
    finally:
        checkpointer.close()
    if not isinstance(abstract_state, nnx.State):
        return restored
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state
