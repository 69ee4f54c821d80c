"""PanWorld's text encoder: a tiny learned word-embedding table, same contract as the UMT5 path.

Owns: `split_words` (prompt -> lowercase words without edge punctuation), `WordEmbeddingConfig`,
`WordEmbeddingEncoder` (words -> ids -> table (+ positions) -> optional MLP, zero rows at padding;
traceable, so it can train with the DiT), and `panworld_word_encoder`, the one place the frozen
PanWorld word encoder is built from (text_len, text_dim, seed) with the PanWorld vocabulary
(trainer, rollout, evaluation and encoding scripts must all see the same embeddings).

Must not know: tokenizers, UMT5, caches, embedding files, the DiT, streaming, training. Of the
data it knows only `data.panworld.prompt_vocabulary()`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax.data.panworld import prompt_vocabulary
from adastate_jax.text.interface import as_prompt_list, run_encoder, weights_fingerprint

_STRIP = ".,;:!?\"'()[]{}"
PAD_WORD = "<pad>"


def split_words(prompt: str) -> list[str]:
    """Prompt -> lowercase whitespace tokens, with surrounding punctuation (.,;:!?"'()[]{}) stripped."""
    words = (w.strip(_STRIP) for w in prompt.lower().split())
    return [w for w in words if w]


@dataclasses.dataclass(frozen=True)
class WordEmbeddingConfig:
    """vocab: the known words (lowercase, no whitespace); word i gets id i + 1, id 0 is padding.
    A leading "<pad>" entry is taken as that padding id, so `data.panworld.prompt_vocabulary()`
    can be passed as is and its `prompt_ids` fed straight to the encoder.
    text_len / text_dim: output shape. mlp_hidden: hidden width of an optional per-token MLP
    (Linear, GELU-tanh, Linear; text_dim in and out) after the table; None = the table rows are
    the output. positional: add a learned embedding per token position (word order matters)."""

    vocab: tuple[str, ...]
    text_len: int = 16
    text_dim: int = 32
    mlp_hidden: int | None = None
    positional: bool = True
    param_dtype: str = "float32"

    def __post_init__(self):
        vocab = tuple(self.vocab)
        if vocab and vocab[0] == PAD_WORD:
            vocab = vocab[1:]
        object.__setattr__(self, "vocab", vocab)
        if not self.vocab:
            raise ValueError("WordEmbeddingConfig.vocab is empty")
        seen = set()
        for w in self.vocab:
            if not isinstance(w, str) or not w or w != w.lower() or split_words(w) != [w]:
                raise ValueError(
                    f"vocabulary word {w!r} must be a non-empty lowercase word "
                    "without spaces or edge punctuation"
                )
            if w in seen or w == PAD_WORD:
                raise ValueError(f"vocabulary word {w!r} appears twice (or {PAD_WORD!r} not first)")
            seen.add(w)
        if self.text_len < 1 or self.text_dim < 1:
            raise ValueError(f"text_len {self.text_len} and text_dim {self.text_dim} must be positive")


@functools.lru_cache(maxsize=16)
def _word_index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {w: i + 1 for i, w in enumerate(vocab)}  # 0 = padding


def _small_param(value):
    # Tiny encoder: replicated everywhere (a vocabulary of a few dozen words need not divide a mesh).
    return nnx.Param(value, sharding_names=(None,) * value.ndim, eager_sharding=False)


class WordEmbeddingEncoder(nnx.Module):
    """PanWorld text encoder: prompt words -> ids -> learned table (+ positions) -> optional MLP.

    `tokenize(prompts)` -> ids, mask [B, text_len] (id 0 = padding; unknown word -> KeyError naming
    it); `__call__(ids, mask)` -> [B, text_len, text_dim] float32 with zero rows at padding
    (traceable: train it jointly with the DiT); `encode(prompts)` = both, as numpy (`TextEncoder`).
    """

    def __init__(self, config: WordEmbeddingConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.text_len, self.text_dim = config.text_len, config.text_dim
        pd = jnp.dtype(config.param_dtype)
        V, D = len(config.vocab) + 1, config.text_dim

        def normal(shape, std):
            return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(pd)

        self.table = _small_param(normal((V, D), 1.0))  # [V, D]; row 0 (padding) is never used
        self.positions = (
            _small_param(normal((config.text_len, D), 0.1)) if config.positional else None
        )  # [L, D]
        if config.mlp_hidden is not None:
            H = config.mlp_hidden
            self.mlp_in = _small_param(normal((D, H), D**-0.5))  # [D, H]
            self.mlp_in_bias = _small_param(jnp.zeros((H,), pd))
            self.mlp_out = _small_param(normal((H, D), H**-0.5))  # [H, D]
            self.mlp_out_bias = _small_param(jnp.zeros((D,), pd))
        else:
            self.mlp_in = self.mlp_in_bias = self.mlp_out = self.mlp_out_bias = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (ids [B, text_len] int32, mask [B, text_len] int32)."""
        prompts = as_prompt_list(prompts)
        L = self.config.text_len
        index = _word_index(self.config.vocab)
        ids = np.zeros((len(prompts), L), np.int32)
        for b, p in enumerate(prompts):
            words = split_words(p)
            unknown = [w for w in words if w not in index]
            if unknown:
                raise KeyError(
                    f"word(s) {unknown} of prompt {p!r} not in the WordEmbeddingEncoder vocabulary "
                    f"({len(index)} words: {', '.join(list(index)[:12])}{', ...' if len(index) > 12 else ''})"
                )
            if len(words) > L:
                raise ValueError(f"prompt {p!r} has {len(words)} words, more than text_len {L}")
            ids[b, : len(words)] = [index[w] for w in words]
        return ids, (ids != 0).astype(np.int32)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """ids [B, n] int (0 = pad, n <= text_len; zero-padded to text_len), mask [B, n] (default
        ids != 0) -> [B, text_len, text_dim] float32 with zero rows at padding."""
        L = self.config.text_len
        if ids.ndim != 2 or ids.shape[1] > L:
            raise ValueError(f"ids must be [B, n] with n <= text_len {L}, got shape {ids.shape}")
        if mask is None:
            mask = ids != 0
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} does not match ids {ids.shape}")
        if ids.shape[1] < L:
            pad = ((0, 0), (0, L - ids.shape[1]))
            ids, mask = jnp.pad(ids, pad), jnp.pad(mask, pad)
        x = jnp.take(self.table[...], ids, axis=0).astype(jnp.float32)  # [B, L, D]
        if self.positions is not None:
            x = x + self.positions[...].astype(jnp.float32)[None]
        if self.mlp_in is not None:
            h = jnp.einsum("BLD,DH->BLH", x, self.mlp_in[...].astype(jnp.float32)) + self.mlp_in_bias[...]
            h = jax.nn.gelu(h, approximate=True)  # [B, L, H]
            x = jnp.einsum("BLH,HD->BLD", h, self.mlp_out[...].astype(jnp.float32)) + self.mlp_out_bias[...]
        return x * (mask != 0)[..., None].astype(jnp.float32)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenize(prompts)
        return run_encoder(self, ids, mask)

    def cache_identity(self) -> str:
        cfg = dataclasses.asdict(self.config)
        return json.dumps(
            {"kind": "words", "config": cfg, "weights": weights_fingerprint(self)}, sort_keys=True
        )


def panworld_word_encoder(text_len: int, text_dim: int, seed: int) -> WordEmbeddingEncoder:
    """The frozen PanWorld word encoder: the PanWorld vocabulary, no MLP, initialised from `seed`.

    Every user (trainer, rollout, evaluation, caption encoding) builds it here with the same
    (text_len, text_dim, seed), so a trained DiT sees the same prompt embeddings everywhere.
    """
    config = WordEmbeddingConfig(vocab=tuple(prompt_vocabulary()), text_len=text_len, text_dim=text_dim)
    return WordEmbeddingEncoder(config, rngs=nnx.Rngs(seed))
