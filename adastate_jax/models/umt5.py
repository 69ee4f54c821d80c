"""The UMT5 text encoder (Wan's umt5-xxl) in Flax NNX, and its weight-conversion tables.

Owns: `UMT5Config` (umt5-xxl defaults as Wan uses them, plus `tiny()`), the encoder
`UMT5Encoder` (token ids [B, L] + attention mask [B, L] -> hidden states [B, L, d_model] fp32),
the bidirectional relative-position bucketing, and `conversion_rules` for the Hugging Face
`UMT5EncoderModel` layout and Wan's original `models_t5_umt5-xxl-enc-*.pth` layout.

Architecture (UMT5, not T5): every layer has its own relative position bias (T5 shares layer 0's);
pre-norm T5 RMS layer norm (no mean subtraction, no bias); attention logits are not scaled;
gated-GELU (tanh approximation) feed-forward `wo(gelu(wi_0 x) * wi_1 x)`; a final RMS norm. The
embedding is not scaled. Layers are stacked on a leading `layers` axis and run with `lax.scan`.

Must not know: tokenizers, prompt caches or files (see `adastate_jax/text/`), the DiT, streaming,
training or data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax.models.convert import (
    Rule,
    TensorSource,
    convert_to_state,
    linear_kernel,
    open_torch_checkpoint,
)

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Static configuration of the UMT5 encoder. Defaults: umt5-xxl as used by Wan2.1."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"  # gated GELU, tanh approximation (HF "gelu_new" / "gated-gelu")
    param_dtype: str = "float32"
    dtype: str = "float32"  # matmul compute dtype; residual stream, norms and softmax stay fp32

    def __post_init__(self):
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"dense_act_fn {self.dense_act_fn!r} not supported; use one of {sorted(_ACTIVATIONS)}"
            )
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 4:
            raise ValueError(
                "relative_attention_num_buckets must be a multiple of 4, "
                f"got {self.relative_attention_num_buckets}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def tiny(cls, **overrides) -> UMT5Config:
        """A CPU-sized configuration of the same architecture (for tests and demos)."""
        base = dict(
            vocab_size=512,
            d_model=64,
            d_kv=16,
            d_ff=96,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=32,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> UMT5Config:
        """From a `transformers.UMT5Config` (or anything with the same attribute names)."""
        act = getattr(hf_config, "dense_act_fn", "gelu_new")
        if not getattr(hf_config, "is_gated_act", True):
            raise ValueError("only the gated feed-forward (feed_forward_proj='gated-gelu') is supported")
        fields = dict(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.d_model,
            d_kv=hf_config.d_kv,
            d_ff=hf_config.d_ff,
            num_heads=hf_config.num_heads,
            num_layers=hf_config.num_layers,
            relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
            relative_attention_max_distance=hf_config.relative_attention_max_distance,
            layer_norm_epsilon=hf_config.layer_norm_epsilon,
            dense_act_fn=act,
        )
        fields.update(overrides)
        return cls(**fields)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


_ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
}

# --------------------------------------------------------------------------------------------
# Relative position buckets (static: computed on the host at trace time)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 buckets of (key position - query position): int32 [query_len, key_len].

    Half the buckets for keys after the query, half for keys before (or at) it; within each half,
    exact buckets for distances below num_buckets/4, logarithmic bins up to max_distance, and one
    bucket for everything farther. Computed in float32 like the PyTorch reference, so every
    bucket boundary falls on the same side.
    """
    rel = np.arange(key_len, dtype=np.int64)[None, :] - np.arange(query_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    is_small = dist < max_exact
    with np.errstate(divide="ignore"):
        log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact)) / np.float32(
            math.log(max_distance / max_exact)
        )
        log_ratio = (log_ratio * np.float32(half - max_exact)).astype(np.float32)
    large = max_exact + np.where(is_small, 0, log_ratio).astype(np.int64)
    large = np.minimum(large, half - 1)
    out = (buckets + np.where(is_small, dist, large)).astype(np.int32)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def _param(value, names):
    return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * weight, in fp32 (no mean subtraction, no bias)."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    return xf * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32)


class UMT5Blocks(nnx.Module):
    """The stacked parameters of all encoder layers (leading axis = layer)."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        L, D, I, F = cfg.num_layers, cfg.d_model, cfg.inner_dim, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)

        def normal(shape, std):
            return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(pd)

        # Initialisation follows the Mesh-TensorFlow scheme (only used for random models).
        self.attn_norm = _param(jnp.ones((L, D), pd), ("layers", "norm"))
        self.q = _param(normal((L, D, I), (D * cfg.d_kv) ** -0.5), ("layers", "embed", "heads"))
        self.k = _param(normal((L, D, I), D**-0.5), ("layers", "embed", "heads"))
        self.v = _param(normal((L, D, I), D**-0.5), ("layers", "embed", "heads"))
        self.o = _param(normal((L, I, D), I**-0.5), ("layers", "heads", "embed"))
        self.relative_bias = _param(
            normal((L, cfg.relative_attention_num_buckets, cfg.num_heads), D**-0.5), ("layers", None, "heads")
        )
        self.ffn_norm = _param(jnp.ones((L, D), pd), ("layers", "norm"))
        self.wi_0 = _param(normal((L, D, F), D**-0.5), ("layers", "embed", "mlp"))
        self.wi_1 = _param(normal((L, D, F), D**-0.5), ("layers", "embed", "mlp"))
        self.wo = _param(normal((L, F, D), F**-0.5), ("layers", "mlp", "embed"))


_BLOCK_PARAMS = ("attn_norm", "q", "k", "v", "o", "relative_bias", "ffn_norm", "wi_0", "wi_1", "wo")


class UMT5Encoder(nnx.Module):
    """UMT5 encoder: token ids [B, L] + attention mask [B, L] -> hidden states [B, L, d_model] fp32.

    Parameter paths: `embedding` [V, D], `blocks/{attn_norm, q, k, v, o, relative_bias, ffn_norm,
    wi_0, wi_1, wo}` stacked over layers, `final_norm` [D].
    """

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        self.config = config
        pd = jnp.dtype(config.param_dtype)
        emb = jax.random.normal(rngs.params(), (config.vocab_size, config.d_model), jnp.float32)
        self.embedding = _param(emb.astype(pd), ("vocab", "embed"))
        self.blocks = UMT5Blocks(config, rngs=rngs)
        self.final_norm = _param(jnp.ones((config.d_model,), pd), ("norm",))

    def __call__(self, token_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """token_ids [B, L] int; attention_mask [B, L] (nonzero = real token) -> [B, L, D] float32.

        Masked (padding) positions are excluded as keys; their own outputs are computed anyway
        (the caller decides what to keep; `text.encode_prompts` zeroes them as Wan does).
        """
        cfg = self.config
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [B, L], got shape {token_ids.shape}")
        B, L = token_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.int32)
        if attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask shape {attention_mask.shape} does not match token_ids {(B, L)}")
        dt = jnp.dtype(cfg.dtype)
        N, K = cfg.num_heads, cfg.d_kv
        act = _ACTIVATIONS[cfg.dense_act_fn]

        x = jnp.take(self.embedding[...], token_ids, axis=0).astype(jnp.float32)  # [B, L, D]
        buckets = jnp.asarray(
            relative_position_buckets(
                L, L, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
        )  # [L, L]
        key_ok = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, L]
        neg = jnp.finfo(jnp.float32).min

        def layer(x, p):
            # x: [B, L, D] fp32 residual stream; p: this layer's parameters.
            h = rms_norm(x, p["attn_norm"], cfg.layer_norm_epsilon).astype(dt)  # [B, L, D]
            q = jnp.einsum("BLD,DI->BLI", h, p["q"].astype(dt)).reshape(B, L, N, K)
            k = jnp.einsum("BLD,DI->BLI", h, p["k"].astype(dt)).reshape(B, L, N, K)
            v = jnp.einsum("BLD,DI->BLI", h, p["v"].astype(dt)).reshape(B, L, N, K)
            bias = jnp.take(p["relative_bias"].astype(jnp.float32), buckets, axis=0)  # [Q, S, N]
            logits = jnp.einsum("BQNK,BSNK->BNQS", q, k, preferred_element_type=jnp.float32)  # unscaled
            logits = logits + jnp.einsum("QSN->NQS", bias)[None]  # [B, N, Q, S]
            logits = jnp.where(key_ok, logits, neg)
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)  # [B, N, Q, S]
            attn = jnp.einsum("BNQS,BSNK->BQNK", probs, v).reshape(B, L, N * K)  # [B, L, I]
            x = x + jnp.einsum("BLI,ID->BLD", attn, p["o"].astype(dt)).astype(jnp.float32)

            h = rms_norm(x, p["ffn_norm"], cfg.layer_norm_epsilon).astype(dt)  # [B, L, D]
            gate = act(jnp.einsum("BLD,DF->BLF", h, p["wi_0"].astype(dt)))  # [B, L, F]
            lin = jnp.einsum("BLD,DF->BLF", h, p["wi_1"].astype(dt))  # [B, L, F]
            x = x + jnp.einsum("BLF,FD->BLD", gate * lin, p["wo"].astype(dt)).astype(jnp.float32)
            return x, None

        stacked = {name: getattr(self.blocks, name)[...] for name in _BLOCK_PARAMS}
        x, _ = jax.lax.scan(layer, x, stacked)
        return rms_norm(x, self.final_norm[...], cfg.layer_norm_epsilon)  # [B, L, D] fp32


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

LAYOUTS = ("hf", "wan")


def conversion_rules(layout: str = "hf") -> list[Rule]:
    """Torch key -> our parameter path, for `convert.convert_to_state`.

    layout 'hf': transformers `UMT5EncoderModel` (also the encoder half of `UMT5Model` /
      `UMT5ForConditionalGeneration`; pass `conversion_ignore(keys)` to skip the rest).
    layout 'wan': Wan2.1's own T5 encoder (`models_t5_umt5-xxl-enc-bf16.pth`): `token_embedding`,
      `blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}`,
      `norm`. Wan's `fc1(x) * gelu(gate(x))` is HF's `wi_1(x) * gelu(wi_0(x))`.
    """
    # One rule per target, no backreferences in targets: a missing key is then reported with
    # the exact torch key expected (e.g. encoder.block.1.layer.1.DenseReluDense.wo.weight).
    if layout == "hf":
        blk = r"encoder\.block\.(\d+)\.layer"
        attn, ffn = rf"{blk}\.0\.SelfAttention", rf"{blk}\.1\.DenseReluDense"
        return [
            Rule(r"(?:shared|encoder\.embed_tokens)\.weight", "embedding"),
            Rule(rf"{blk}\.0\.layer_norm\.weight", "blocks/attn_norm", stack_group=1),
            *(Rule(rf"{attn}\.{n}\.weight", f"blocks/{n}", linear_kernel, stack_group=1) for n in "qkvo"),
            Rule(rf"{attn}\.relative_attention_bias\.weight", "blocks/relative_bias", stack_group=1),
            Rule(rf"{blk}\.1\.layer_norm\.weight", "blocks/ffn_norm", stack_group=1),
            *(
                Rule(rf"{ffn}\.{n}\.weight", f"blocks/{n}", linear_kernel, stack_group=1)
                for n in ("wi_0", "wi_1", "wo")
            ),
            Rule(r"encoder\.final_layer_norm\.weight", "final_norm"),
        ]
    if layout == "wan":
        blk = r"blocks\.(\d+)"
        return [
            Rule(r"token_embedding\.weight", "embedding"),
            Rule(rf"{blk}\.norm1\.weight", "blocks/attn_norm", stack_group=1),
            *(
                Rule(rf"{blk}\.attn\.{n}\.weight", f"blocks/{n}", linear_kernel, stack_group=1)
                for n in "qkvo"
            ),
            Rule(rf"{blk}\.pos_embedding\.embedding\.weight", "blocks/relative_bias", stack_group=1),
            Rule(rf"{blk}\.norm2\.weight", "blocks/ffn_norm", stack_group=1),
            Rule(rf"{blk}\.ffn\.gate\.0\.weight", "blocks/wi_0", linear_kernel, stack_group=1),
            Rule(rf"{blk}\.ffn\.fc1\.weight", "blocks/wi_1", linear_kernel, stack_group=1),
            Rule(rf"{blk}\.ffn\.fc2\.weight", "blocks/wo", linear_kernel, stack_group=1),
            Rule(r"norm\.weight", "final_norm"),
        ]
    raise ValueError(f"unknown UMT5 checkpoint layout {layout!r}; known layouts: {LAYOUTS}")


def conversion_ignore(keys: Iterable[str], layout: str = "hf") -> list[str]:
    """Regexes of torch keys to skip for this checkpoint (pass as `ignore=` to the converter).

    'hf': the tied embedding is stored as `shared.weight` and often again as
    `encoder.embed_tokens.weight`; when both are present the second is skipped. The decoder and
    LM head of a full seq2seq checkpoint are skipped. 'wan': nothing.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown UMT5 checkpoint layout {layout!r}; known layouts: {LAYOUTS}")
    if layout == "wan":
        return []
    keys = set(keys)
    ignore = [r"decoder\..*", r"lm_head\.weight"]
    if "shared.weight" in keys and "encoder.embed_tokens.weight" in keys:
        ignore.append(re.escape("encoder.embed_tokens.weight"))
    return ignore


def abstract_encoder(config: UMT5Config) -> UMT5Encoder:
    """An encoder with shape-only parameters (no memory): the target of a conversion."""
    return nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))


def load_umt5(
    checkpoint: str | TensorSource,
    config: UMT5Config,
    layout: str = "hf",
    shardings=None,
) -> UMT5Encoder:
    """Convert a PyTorch UMT5 checkpoint (path or open `TensorSource`) into a `UMT5Encoder`.

    Every missing / unexpected / mis-shaped key is reported together in one `ConversionError`.
    `shardings`: optional pytree of shardings like the encoder's state (each leaf is placed
    straight into it; see `adastate_jax.sharding.state_shardings`).
    """
    source = open_torch_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    graphdef, abstract_state = nnx.split(abstract_encoder(config))
    state = convert_to_state(
        source,
        conversion_rules(layout),
        abstract_state,
        shardings=shardings,
        ignore=conversion_ignore(source.keys(), layout),
    )
    return nnx.merge(graphdef, state)
