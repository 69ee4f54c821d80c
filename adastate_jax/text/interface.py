"""The text-conditioning contract: what every encoder returns, and what model-backed encoders share.

Text conditioning is always an embedding array `[B, text_len, text_dim]` float32, zero-padded
beyond the prompt's tokens, and nothing else (no mask: Wan attends to the zero padding too).
Wan: 512 x 4096 from UMT5-XXL, keeping the real tokens' embeddings and zero-padding to 512.

Owns:
- `TextEncoder`: the protocol (`encode(prompts) -> [B, text_len, text_dim]`, `text_len`,
  `text_dim`, `cache_identity()`), and `check_text_embeddings`, the shape check at boundaries.
- `as_prompt_list`: the one check that prompts are a list of strings.
- `run_encoder`: an NNX encoder (ids, mask) -> numpy, run jitted; `weights_fingerprint`: the cheap
  parameter fingerprint model-backed encoders put in their `cache_identity()`.
- `WAN_TEXT_LEN`, `WAN_TEXT_DIM`.

Must not know: tokenizers, files, caches, particular encoders, the DiT, streaming, training.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax import files

WAN_TEXT_LEN = 512
WAN_TEXT_DIM = 4096


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into conditioning `[B, text_len, text_dim]` float32."""

    text_len: int
    text_dim: int

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts (B strings) -> [B, text_len, text_dim] float32, zero rows beyond each prompt."""
        ...

    def cache_identity(self) -> str:
        """A string that changes whenever the same prompt would encode differently."""
        ...


def check_text_embeddings(emb, text_len: int | None = None, text_dim: int | None = None, what: str = "text"):
    """Raise a ValueError naming `what` unless emb is [B, text_len, text_dim] (None = any)."""
    shape = tuple(np.shape(emb))
    want = ("B", text_len if text_len is not None else "T", text_dim if text_dim is not None else "D")
    if (
        len(shape) != 3
        or (text_len is not None and shape[1] != text_len)
        or (text_dim is not None and shape[2] != text_dim)
    ):
        raise ValueError(
            f"{what}: text embeddings must have shape [{', '.join(map(str, want))}], got {shape}"
        )


def as_prompt_list(prompts) -> list[str]:
    """prompts -> list[str]; a single string or a non-string entry is a TypeError naming it."""
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts must be a list of strings, got a single string {prompts!r}: wrap it in a list"
        )
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not str: {p!r}")
    return out


@functools.partial(jax.jit, static_argnums=0)
def _apply_module(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def run_encoder(encoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ids, mask [B, L] -> encoder output [B, L, D] float32 numpy; an NNX module runs jitted
    (split once, merged inside), any other callable is called as is."""
    if isinstance(encoder, nnx.Module):
        graphdef, state = nnx.split(encoder)
        return np.asarray(_apply_module(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    return np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)), np.float32)


def weights_fingerprint(module: nnx.Module) -> str:
    """A cheap fingerprint of a module's parameters: paths, shapes, dtypes, sum and abs-sum of each.

    Any training step or different initialisation changes it; it is not a cryptographic hash
    (`files.params_stats_sha256` of the module's `nnx.Param`s, shortened).
    """
    return files.params_stats_sha256(nnx.state(module, nnx.Param))[:16]
