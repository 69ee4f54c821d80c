"""Encoded prompts on disk, in front of any `TextEncoder`, so repeats cost nothing.

Owns: `PromptCache` (one verified `.npz` per encoder identity, prompt and text_len; atomic writes
in `PromptCache._write` through `adastate_jax.files`, verified reads in `PromptCache._read`) and the
data digest stored in each file (`files.sha256_array`).

Must not know: which encoder is behind it (only the `TextEncoder` protocol), tokenizers, the DiT,
streaming, training. The only directory it touches is the one it is handed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from adastate_jax import files
from adastate_jax.text.interface import TextEncoder, as_prompt_list, check_text_embeddings

log = logging.getLogger(__name__)


class PromptCache:
    """Encoded prompts on disk, in front of any `TextEncoder` (and itself a `TextEncoder`).

    One `.npz` per (encoder identity, prompt, text_len), named by the SHA-256 of the three. A file
    holds the embedding without its trailing zero rows, the prompt, the key and a digest of the
    data; reads verify all of them and the shape, so a corrupt, truncated or foreign file is
    recomputed and rewritten (with a warning), never used. Writes go to a temporary file in the
    same directory and are moved into place with a rename (`files.atomic_open`: readers never see
    a partial file; concurrent writers of one prompt write the same bytes).
    """

    def __init__(self, directory: str | os.PathLike, encoder: TextEncoder):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.encoder = encoder
        self.text_len = int(encoder.text_len)
        self.text_dim = int(encoder.text_dim)
        self._identity = encoder.cache_identity()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    def cache_identity(self) -> str:
        return self._identity

    def key(self, prompt: str) -> str:
        blob = json.dumps(
            {"encoder": self._identity, "prompt": prompt, "text_len": self.text_len}, sort_keys=True
        )
        return files.sha256_text(blob)

    def path(self, prompt: str) -> str:
        return os.path.join(self.directory, self.key(prompt) + ".npz")

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> [B, text_len, text_dim] float32; only prompts not on disk reach the encoder."""
        prompts = as_prompt_list(prompts)
        out = np.zeros((len(prompts), self.text_len, self.text_dim), np.float32)
        todo: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            emb = self._read(p)
            if emb is None:
                todo.setdefault(p, []).append(i)
            else:
                self.hits += 1
                out[i] = emb
        if todo:
            new = self.encoder.encode(list(todo))  # each distinct missing prompt once
            check_text_embeddings(
                new, self.text_len, self.text_dim, what=f"{type(self.encoder).__name__}.encode"
            )
            for (p, rows), emb in zip(todo.items(), new):
                self.misses += 1
                self._write(p, emb)
                out[rows] = emb
        return out

    def _read(self, prompt: str) -> np.ndarray | None:
        path = self.path(prompt)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                emb = np.asarray(f["embedding"])
                stored_key, stored_prompt = str(f["key"]), str(f["prompt"])
                stored_len, digest = int(f["text_len"]), str(f["digest"])
            problems = []
            if stored_key != self.key(prompt) or stored_prompt != prompt:
                problems.append("it belongs to another prompt or encoder")
            if stored_len != self.text_len:
                problems.append(f"text_len {stored_len} != {self.text_len}")
            if (
                emb.dtype != np.float32
                or emb.ndim != 2
                or emb.shape[1] != self.text_dim
                or len(emb) > self.text_len
            ):
                problems.append(
                    f"embedding {emb.dtype}{list(emb.shape)} is not "
                    f"float32 [<= {self.text_len}, {self.text_dim}]"
                )
            elif files.sha256_array(emb) != digest:
                problems.append("its data does not match its digest")
            if problems:
                raise ValueError("; ".join(problems))
        except Exception as e:  # corrupt zip, missing field, wrong content: recompute
            self.corrupt += 1
            log.warning("prompt cache file %s is unusable (%s: %s); recomputing", path, type(e).__name__, e)
            return None
        full = np.zeros((self.text_len, self.text_dim), np.float32)
        full[: len(emb)] = emb
        return full

    def _write(self, prompt: str, emb: np.ndarray) -> None:
        emb = np.asarray(emb, np.float32)
        nonzero = np.flatnonzero(np.any(emb != 0, axis=1))
        trimmed = np.ascontiguousarray(emb[: (nonzero[-1] + 1) if len(nonzero) else 0])  # [n, text_dim]
        with files.atomic_open(self.path(prompt), "wb") as fh:
            np.savez(
                fh,
                embedding=trimmed,
                key=np.str_(self.key(prompt)),
                prompt=np.str_(prompt),
                text_len=np.int64(self.text_len),
                digest=np.str_(files.sha256_array(trimmed)),
            )
