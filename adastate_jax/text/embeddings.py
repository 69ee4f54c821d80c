"""Precomputed text conditioning as first-class input: embedding files and a lookup encoder.

Owns: `load_embeddings` (`.npy` / `.npz` / `.safetensors` -> [B, text_len, text_dim] float32,
zero-padded; every error names the file), `save_embeddings` (atomic `.npz`, optionally with its
prompts), `pad_embeddings` (Wan's zero-padding rule), `PrecomputedTextEncoder` (a `TextEncoder`
that looks prompts up in such a table).

Must not know: tokenizers, models, caches, the DiT, streaming, training. Files it reads are the
ones it is handed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np

from adastate_jax import files
from adastate_jax.text.interface import WAN_TEXT_LEN, as_prompt_list, check_text_embeddings

_EMBEDDING_KEYS = ("embeddings", "embedding", "context", "text")


def load_embeddings(
    path: str | os.PathLike,
    text_len: int | None = None,
    text_dim: int | None = None,
    key: str | None = None,
) -> np.ndarray:
    """Precomputed text conditioning from `.npy`, `.npz` or `.safetensors` -> [B, text_len, text_dim] f32.

    Accepts [T, D] (one prompt) or [B, T, D]. With `text_len`, shorter sequences are zero-padded
    (Wan's rule for prompts shorter than 512 tokens) and longer ones are an error; with `text_dim`
    the feature size must match. `key` picks the array in a multi-array file (default: the only
    array, or one named embeddings / embedding / context / text). Every error names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"embedding file {path!r} does not exist")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npy ({type(e).__name__}: {e})") from e
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                arr = f[_pick_name(path, f.files, key)]
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    elif path.endswith(".safetensors"):
        from adastate_jax.models.convert import SafetensorsSource

        try:
            src = SafetensorsSource([path])
        except ValueError as e:
            raise ValueError(f"{path}: cannot read as .safetensors ({e})") from e
        arr = src.load(_pick_name(path, src.keys(), key))
    else:
        raise ValueError(f"{path}: unsupported embedding file type (use .npy, .npz or .safetensors)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: embeddings must be [T, D] or [B, T, D], got shape {tuple(arr.shape)}")
    if not np.issubdtype(np.dtype(arr.dtype), np.floating) and arr.dtype.name != "bfloat16":
        raise ValueError(f"{path}: embeddings must be floating point, got {arr.dtype}")
    if text_dim is not None and arr.shape[2] != text_dim:
        raise ValueError(
            f"{path}: embeddings have shape {tuple(arr.shape)}, expected text_dim {text_dim} (last axis)"
        )
    if text_len is not None and arr.shape[1] > text_len:
        raise ValueError(
            f"{path}: embeddings have shape {tuple(arr.shape)}, longer than text_len {text_len} (axis 1)"
        )
    arr = np.asarray(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: embeddings contain NaN or inf")
    if text_len is not None and arr.shape[1] < text_len:
        arr = np.concatenate(
            [arr, np.zeros((arr.shape[0], text_len - arr.shape[1], arr.shape[2]), np.float32)], 1
        )
    return arr


def _pick_name(path: str, names: Sequence[str], key: str | None) -> str:
    """The array to use in a multi-array file: `key`, the only one, or a conventional name."""
    names = list(names)
    if key is not None:
        if key not in names:
            raise ValueError(f"{path}: no array named {key!r}; it holds {names}")
        return key
    if len(names) == 1:
        return names[0]
    found = [k for k in _EMBEDDING_KEYS if k in names]
    if not found:
        raise ValueError(f"{path}: holds several arrays {names}; pass key= to choose one")
    return found[0]


def save_embeddings(path: str | os.PathLike, embeddings: np.ndarray, prompts: Sequence[str] | None = None):
    """Write [B, T, D] embeddings (and optionally their prompts) to `.npz`, atomically."""
    path = os.fspath(path)
    check_text_embeddings(embeddings, what=path)
    arrays = {"embeddings": np.asarray(embeddings, np.float32)}
    if prompts is not None:
        prompts = as_prompt_list(prompts)
        if len(prompts) != len(embeddings):
            raise ValueError(f"{path}: {len(prompts)} prompts for {len(embeddings)} embeddings")
        arrays["prompts"] = np.asarray(prompts, dtype=np.str_)
    with files.atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def pad_embeddings(embeddings: Sequence[np.ndarray], text_len: int = WAN_TEXT_LEN) -> np.ndarray:
    """Per-prompt real-token embeddings [n_i, D] -> [B, text_len, D] zero-padded (Wan's rule)."""
    if not embeddings:
        raise ValueError("pad_embeddings got no embeddings")
    dims = {np.shape(e)[-1] for e in embeddings}
    if len(dims) != 1 or any(np.ndim(e) != 2 for e in embeddings):
        raise ValueError(
            f"pad_embeddings needs [n_i, D] arrays with one D, got {[np.shape(e) for e in embeddings]}"
        )
    out = np.zeros((len(embeddings), text_len, dims.pop()), np.float32)
    for i, e in enumerate(embeddings):
        if len(e) > text_len:
            raise ValueError(f"embedding {i} has {len(e)} tokens, more than text_len {text_len}")
        out[i, : len(e)] = e
    return out


class PrecomputedTextEncoder:
    """A `TextEncoder` that looks prompts up in precomputed embeddings (no model needed).

    `from_file(path)` reads a `.npz` written by `save_embeddings(path, embeddings, prompts)`.
    """

    def __init__(
        self, table: Mapping[str, np.ndarray], text_len: int | None = None, name: str = "precomputed"
    ):
        if not table:
            raise ValueError(f"{name}: no precomputed embeddings")
        shapes = {tuple(np.shape(v)) for v in table.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{name}: every embedding must be [T, D] with one shape, got {sorted(shapes)}")
        T, D = next(iter(shapes))
        self.text_len = int(text_len or T)
        self.text_dim = int(D)
        self.name = name
        self._table = {
            p: pad_embeddings([np.asarray(v, np.float32)], self.text_len)[0] for p, v in table.items()
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike, text_len: int | None = None) -> PrecomputedTextEncoder:
        path = os.fspath(path)
        emb = load_embeddings(path, text_len=text_len, key="embeddings")
        try:
            with np.load(path, allow_pickle=False) as f:
                prompts = [str(p) for p in f["prompts"]]
        except KeyError:
            raise ValueError(
                f"{path}: has no 'prompts' array (write it with save_embeddings(..., prompts))"
            ) from None
        if len(prompts) != len(emb):
            raise ValueError(f"{path}: {len(prompts)} prompts for {len(emb)} embeddings")
        return cls(dict(zip(prompts, emb)), text_len=text_len, name=path)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = as_prompt_list(prompts)
        missing = [p for p in prompts if p not in self._table]
        if missing:
            raise KeyError(f"{self.name}: no precomputed embedding for prompt(s) {missing}")
        return np.stack([self._table[p] for p in prompts])

    def cache_identity(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self._table):
            h.update(p.encode() + b"\0" + self._table[p].tobytes())
        return f"precomputed:{h.hexdigest()[:16]}"
