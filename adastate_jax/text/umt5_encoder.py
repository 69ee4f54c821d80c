"""UMT5 prompt encoding behind the `TextEncoder` interface, as Wan builds its conditioning.

Owns: `encode_prompts` (clean, tokenize, encode with the mask, zero every position after the last
real token, batched to few compiled shapes) and `UMT5TextEncoder` (encoder + tokenizer, its
`cache_identity()` from config, tokenizer and weights; `from_checkpoint` converts a PyTorch
checkpoint); `_path_stamp`, the checkpoint-file stamp in that identity.

Must not know: the UMT5 network itself (`models/umt5.py`), caches, embedding files, the DiT,
streaming, training.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from adastate_jax import files
from adastate_jax.models.umt5 import UMT5Config, UMT5Encoder, load_umt5
from adastate_jax.text.interface import WAN_TEXT_LEN, as_prompt_list, run_encoder, weights_fingerprint
from adastate_jax.text.tokenizers import as_tokenizer, clean_prompt


def encode_prompts(
    encoder: UMT5Encoder | Callable,
    tokenizer,
    prompts: Sequence[str],
    text_len: int = WAN_TEXT_LEN,
    batch_size: int = 8,
    clean: bool = True,
) -> np.ndarray:
    """Prompts -> UMT5 conditioning [B, text_len, d_model] float32, as Wan builds it.

    Each prompt is cleaned (Wan's 'whitespace' cleaning), tokenized to text_len (truncated, `</s>`
    appended, padded), encoded with the attention mask, and every position after its last real
    token is set to zero (Wan keeps the real tokens' embeddings and zero-pads to text_len).
    encoder: a `UMT5Encoder` (run jitted) or any callable (ids [B, L], mask [B, L]) -> [B, L, D].
    tokenizer: a tokenizer path (see `load_tokenizer`) or object; None raises, naming what is needed.
    Prompts run in batches of `batch_size`; a smaller batch is padded to a power of two, so few
    shapes are ever compiled.
    """
    prompts = as_prompt_list(prompts)
    tok = as_tokenizer(tokenizer)
    if clean:
        prompts = [clean_prompt(p) for p in prompts]
    ids, mask = tok.tokenize(prompts, text_len)  # [B, text_len] each
    if ids.shape != (len(prompts), text_len) or mask.shape != ids.shape:
        raise ValueError(
            f"tokenizer returned ids {ids.shape} / mask {mask.shape}, expected {(len(prompts), text_len)}"
        )
    outs = []
    for start in range(0, len(prompts), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(b_ids)
        padded = min(batch_size, 1 << (n - 1).bit_length())  # few compiled shapes: 1, 2, 4, .., batch_size
        if padded > n:
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[-1:], padded - n, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[-1:], padded - n, 0)])
        hidden = run_encoder(encoder, b_ids, b_mask)[:n]  # [n, text_len, D]
        outs.append(hidden * b_mask[:n, :, None].astype(np.float32))
    if not outs:
        raise ValueError("encode_prompts got no prompts")
    return np.concatenate(outs)  # [B, text_len, D]


class UMT5TextEncoder:
    """UMT5 + tokenizer behind the `TextEncoder` interface (Wan: text_len 512, text_dim 4096)."""

    def __init__(
        self,
        encoder: UMT5Encoder,
        tokenizer,
        text_len: int = WAN_TEXT_LEN,
        batch_size: int = 8,
        weights_identity: str | None = None,
    ):
        self.encoder = encoder
        self.tokenizer = as_tokenizer(tokenizer)
        self.text_len = int(text_len)
        self.text_dim = int(encoder.config.d_model)
        self.batch_size = batch_size
        self._weights_identity = weights_identity

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        tokenizer,
        config: UMT5Config | None = None,
        layout: str = "hf",
        text_len: int = WAN_TEXT_LEN,
        shardings=None,
    ) -> UMT5TextEncoder:
        """Convert a PyTorch UMT5 checkpoint (see `umt5.load_umt5`) and attach a tokenizer."""
        config = config or UMT5Config()
        encoder = load_umt5(checkpoint, config, layout=layout, shardings=shardings)
        return cls(
            encoder, tokenizer, text_len=text_len, weights_identity=f"{layout}:{_path_stamp(checkpoint)}"
        )

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        return encode_prompts(self.encoder, self.tokenizer, prompts, self.text_len, self.batch_size)

    def cache_identity(self) -> str:
        if self._weights_identity is None:
            self._weights_identity = weights_fingerprint(self.encoder)
        return json.dumps(
            {
                "kind": "umt5",
                "config": dataclasses.asdict(self.encoder.config),
                "tokenizer": self.tokenizer.identity,
                "weights": self._weights_identity,
                "text_len": self.text_len,
            },
            sort_keys=True,
        )


def _path_stamp(path: str) -> str:
    """Absolute path + size + mtime of a file, or of every file in a directory (`files.path_stamp`)."""
    return files.path_stamp(path)[:16]
