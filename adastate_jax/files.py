"""Atomic writes and content fingerprints: the one place the project writes files safely and hashes them.

Owns:
- atomic writes: `atomic_path` (a temporary sibling `.NAME.tmp-XXXXXXXX` that a writer of its own
  fills, then fsync + rename over NAME), `atomic_open` (the same around an open file),
  `write_text_atomic`, `write_bytes_atomic`, `write_json_atomic`, and for directories `sibling` +
  `replace_dir` (a complete temporary directory renamed into place, an old one moved aside first).
  Readers see the old file or the new one, never half of one; a failed write leaves no temporary
  file behind; new files get the usual umask permissions.
- fingerprints: `sha256_file` (bytes of a file), `sha256_text`, `sha256_array` (dtype, shape and
  bytes of one array), `params_sha256` (the exact fingerprint of a params pytree: what stored ODE
  trajectories and shipped-model manifests record), `params_stats_sha256` (a cheap one from
  per-leaf sums, for cache identities of very large encoders) and `path_stamp` (path, size and
  modification time of a file or a directory's files: "has this checkpoint changed").
- run directories on object stores: `is_url`, `resolve` (abspath for local paths only),
  `make_dirs`, `exists`, `remove_tree`, `read_text`, `write_text`, `LineLog` / `append_line`
  (appends locally, rewrites the object on a store, which has no appends), through fsspec for
  URLs (`gs://` needs `gcsfs`).

Must not know: what the files hold (models, configs, records), who writes them. jax and flax are
imported only by the params fingerprints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of `path`'s temporary siblings (`.NAME.tmp-`): a leftover of a killed writer
    is `os.path.join(folder, temp_prefix(path) + '*')`."""
    return f".{os.path.basename(os.fspath(path))}.tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path` for a writer that opens files itself (ArrayRecord,
    orbax, ...); when the block ends normally the file is fsynced and renamed over `path`; when it
    raises, the temporary file is removed and `path` is untouched.

    The temporary name is `.NAME.tmp-XXXXXXXX` in the same folder (same filesystem: the rename is
    atomic), created empty with the umask's permissions (a writer may replace it).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[Any]:
    """`open(path, mode)` through `atomic_path`: the handle writes the temporary file, which is
    flushed, fsynced and renamed over `path` when the block ends without an error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes new files: mode {mode!r} must start with 'w'")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return os.fspath(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return os.fspath(path)


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> str:
    """`obj` as JSON (`indent`, `sort_keys`, a final newline) written to `path` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def sibling(path: str | os.PathLike, suffix: str) -> str:
    """A hidden sibling `.NAME.suffix` of `path` (same folder, so a rename between them is atomic)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(parent, f".{name}.{suffix}")


def replace_dir(complete: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished directory `complete` to `path`. An existing `path` is first renamed to
    its sibling `.NAME.old` and removed after the swap, so `path` is at every moment either the
    old directory or the new one (absent only between the two renames)."""
    complete, path = os.fspath(complete), os.path.abspath(os.fspath(path))
    old = None
    if os.path.exists(path):
        old = sibling(path, "old")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(complete, path)
    if old is not None:
        shutil.rmtree(old)
    _fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (read in blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_array(arr) -> str:
    """Hex sha256 of one numpy array: `f"{dtype}{shape}"` then its C-order bytes."""
    import numpy as np

    arr = np.asarray(arr)
    return hashlib.sha256(
        f"{arr.dtype}{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes()
    ).hexdigest()


def _flat_leaves(params) -> list:
    """[(key path, leaf)] of an nnx.State (through `nnx.to_pure_dict`) or a nested dict of arrays."""
    import jax
    from flax import nnx

    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def params_sha256(params) -> str:
    """The sha256 fingerprint of a params pytree's values: the identity of a set of weights.

    params: an `nnx.State` (e.g. `nnx.split(model)[1]`, `checkpoint_io.load_params(...)`) or the
    nested dict of its pure values; both give the same fingerprint. Leaves are visited in the order
    of their key path strings (`jax.tree_util.keystr`, e.g. "['blocks']['attn']['kernel']"); for each,
    the hash reads `f"{keystr}|{dtype}|{shape}|"` and then the leaf's C-order bytes (fetched to the
    host). It depends only on the names, shapes, dtypes and exact values, not on sharding, device,
    process or run. When some leaf is not fully addressable by this process (multi-host sharded),
    the bytes are left out and the result is "shapes-only:" + the hash of the names, shapes and dtypes.

    Stored ODE trajectories record it as `teacher_params_sha256` (a resumed run must reproduce it);
    the definition must not change.
    """
    import jax
    import numpy as np

    flat = _flat_leaves(params)
    h = hashlib.sha256()
    values = all(getattr(v, "is_fully_addressable", True) for _, v in flat)
    for path, v in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(f"{jax.tree_util.keystr(path)}|{v.dtype}|{tuple(v.shape)}|".encode())
        if values:
            h.update(np.ascontiguousarray(jax.device_get(v)).tobytes())
    return ("" if values else "shapes-only:") + h.hexdigest()


@functools.cache
def _leaf_sums_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def leaf_sums(leaves):
        return [
            jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
            for x in leaves
        ]

    return leaf_sums


def params_stats_sha256(params) -> str:
    """A cheap fingerprint of a params pytree: sha256 over each leaf's key path, shape, dtype and
    its float32 sum and absolute sum (computed on device; no weights are copied to the host).

    Any training step or different initialisation changes it; it is not a cryptographic identity of
    the values (`params_sha256` is). Leaves in flattening order; `f"{keystr}:{shape}:{dtype}:"`
    then the two float32 sums' bytes.
    """
    import jax
    import numpy as np

    flat = _flat_leaves(params)
    sums = _leaf_sums_fn()([leaf for _, leaf in flat])
    h = hashlib.sha256()
    for (path, leaf), s in zip(flat, sums):
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}:".encode())
        h.update(np.asarray(s, np.float32).tobytes())
    return h.hexdigest()


def path_stamp(path: str | os.PathLike) -> str:
    """Hex sha256 of the absolute path, size and modification time (ns) of a file, or of every
    file directly in a directory (sorted): changes when the files are replaced, without reading them."""
    path = os.path.abspath(os.fspath(path))
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_text("|".join(parts))


# --------------------------------------------------------------------------------------------
# Object stores: run directories given as URLs (gs://bucket/run on a TPU pod)
# --------------------------------------------------------------------------------------------


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store location (`gs://bucket/run`, `s3://...`,
    `memory://...`) rather than a local path. URLs are read and written through fsspec (`gs://`
    needs the `gcsfs` package; orbax reaches them itself)."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or a URL as given (`os.path.abspath('gs://b/run')` would make the
    local path `CWD/gs:/b/run`)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def make_dirs(path: str | os.PathLike) -> None:
    """`os.makedirs(path, exist_ok=True)` for a local path; nothing for a URL (object stores have
    no directories: writing an object under a prefix makes it)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    """Whether a local path, or an object or prefix of a store, exists."""
    path = os.fspath(path)
    if not is_url(path):
        return os.path.exists(path)
    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    return bool(fs.exists(target))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a local directory tree or every object under a store prefix (nothing if absent)."""
    path = os.fspath(path)
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    if fs.exists(target):
        fs.rm(target, recursive=True)


def read_text(path: str | os.PathLike) -> str | None:
    """The text of a local file or an object, or None when it does not exist."""
    path = os.fspath(path)
    if not is_url(path):
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    if not fs.exists(target):
        return None
    with fs.open(target, "r", encoding="utf-8") as fh:
        return fh.read()


def write_text(path: str | os.PathLike, text: str) -> str:
    """Write `text` to a local file atomically (`write_text_atomic`) or to an object (an object
    store replaces an object in one piece)."""
    path = os.fspath(path)
    if not is_url(path):
        return write_text_atomic(path, text)
    import fsspec

    with fsspec.open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


class LineLog:
    """A text file that grows by whole lines (metrics.jsonl, bad_batches.jsonl): appended and
    flushed locally; object stores have no appends, so for a URL the text so far (read back when
    the object exists: a resumed run continues it) is kept and the object rewritten on every write."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fh = None if is_url(self.path) else open(self.path, "a", encoding="utf-8")
        self._text = (read_text(self.path) or "") if self._fh is None else ""

    def write(self, text: str) -> None:
        if self._fh is not None:
            self._fh.write(text)
            self._fh.flush()
        else:
            self._text += text
            write_text(self.path, self._text)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a trailing newline is added) to a local file or an object."""
    log = LineLog(path)
    try:
        log.write(line.rstrip("\n") + "\n")
    finally:
        log.close()
