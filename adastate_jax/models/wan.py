"""The causal Wan2.1 DiT in Flax NNX, with a pure-functional context boundary.

Owns: the Wan2.1 transformer (patch embedding, per-frame time modulation, text embedding and
per-prompt cross-attention keys/values, blocks stacked and scanned over layers, head, unpatchify),
its dtype and remat policies, and the logical axis names of its parameters. Its weight-conversion
tables live in `models/wan_params.py`.

Must not know: caches, anchor policies, samplers, optimisers or files. The forward takes the
context keys/values to attend to (with temporal positions and validity) as arguments and returns
the un-roped keys/values of its own tokens; whoever calls it decides what to keep.

Layouts: latents are channels-last `[B, F, H, W, C]`; tokens are ordered (frame, h, w);
`tokens_per_frame = (H / 2) * (W / 2)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from adastate_jax import sharding as shd
from adastate_jax.dataclass_config import dataclass_from_dict
from adastate_jax.models import attention as attn

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Static configuration of the DiT (hashable; used as a static argument)."""

    dim: int = 1536
    num_heads: int = 12
    num_layers: int = 30
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    rope_theta: float = 10000.0
    cross_attn_norm: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    remat: str = "none"
    attention: str = "xla"  # xla | cudnn | reference | splash (Pallas TPU kernel)
    # static training frame masks: 'auto' runs the block-sparse plan (no [T, K] mask, masked-out
    # blocks skipped) whenever the mask is known at trace time; 'dense' always expands the mask.
    # 'splash' ignores it: the kernel always skips masked-out tiles of a static mask
    attention_blocks: str = "auto"
    # splash tile sizes in tokens (multiples of 128; speed only, not numerics): forward q x kv
    # tiles with kv in kv_compute steps; backward q_bwd x kv_bwd tiles, fused dq/dkv kernel or not
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_block_q_bwd: int = 512
    splash_block_kv_bwd: int = 512
    splash_fused_bwd: bool = False
    zero_init_head: bool = True  # Wan's init; False gives a non-trivial random model

    def __post_init__(self):
        validate_config(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def splash_blocks(self) -> attn.SplashBlocks:
        return attn.SplashBlocks(
            self.splash_block_q,
            self.splash_block_kv,
            self.splash_block_kv_compute,
            self.splash_block_q_bwd,
            self.splash_block_kv_bwd,
            self.splash_fused_bwd,
        )

    @property
    def patch_features(self) -> int:
        return math.prod(self.patch_size) * self.in_channels

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    @classmethod
    def wan_1_3b(cls, **kw) -> WanConfig:
        return cls(**{**dict(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960), **kw})

    @classmethod
    def wan_14b(cls, **kw) -> WanConfig:
        return cls(**{**dict(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824), **kw})

    @classmethod
    def tiny(cls, **kw) -> WanConfig:
        base = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, freq_dim=32, text_dim=32, text_len=8)
        return cls(**{**base, **kw})

    @classmethod
    def from_dict(cls, d) -> WanConfig:
        return dataclass_from_dict(cls, d, "model", {"patch_size": int})


def validate_config(c: WanConfig, prefix: str = "model") -> None:
    """Raise a ValueError naming the config field for any value the model cannot run with."""

    def bad(field, msg):
        raise ValueError(f"config.{prefix}.{field}: {msg}")

    for f in ("dim", "num_heads", "num_layers", "ffn_dim", "in_channels", "out_channels", "freq_dim"):
        if int(getattr(c, f)) <= 0:
            bad(f, f"must be positive, got {getattr(c, f)}")
    if c.dim % c.num_heads:
        bad("num_heads", f"dim={c.dim} is not divisible by num_heads={c.num_heads}")
    try:
        attn.validate_rope_head_dim(c.dim // c.num_heads)
    except ValueError as e:
        bad("num_heads", f"head dim {c.dim // c.num_heads} (dim / num_heads): {e}")
    if c.freq_dim % 2:
        bad("freq_dim", f"must be even, got {c.freq_dim}")
    if len(c.patch_size) != 3 or c.patch_size[0] != 1:
        bad("patch_size", f"must be (1, ph, pw) for frame-wise causal generation, got {c.patch_size}")
    if c.param_dtype not in DTYPES:
        bad("param_dtype", f"{c.param_dtype!r} not in {DTYPES}")
    if c.dtype not in DTYPES:
        bad("dtype", f"{c.dtype!r} not in {DTYPES}")
    if c.remat not in REMAT_POLICIES:
        bad("remat", f"unknown remat policy {c.remat!r}; choose from {REMAT_POLICIES}")
    if c.attention not in attn.ATTENTION_IMPLS:
        bad(
            "attention",
            f"unknown attention implementation {c.attention!r}; choose from {attn.ATTENTION_IMPLS}",
        )
    if c.attention_blocks not in attn.ATTENTION_BLOCKS:
        bad(
            "attention_blocks",
            f"unknown attention block mode {c.attention_blocks!r}; choose from {attn.ATTENTION_BLOCKS}",
        )
    for name, msg in c.splash_blocks.problems():
        bad(f"splash_block_{name}", msg)


def validate_mesh_divisibility(c: WanConfig, mesh_sizes: dict[str, int], prefix: str = "model") -> None:
    """Check the dims that the rules table shards divide the mesh axes they map to."""
    t, f = mesh_sizes.get("tensor", 1), mesh_sizes.get("fsdp", 1)
    checks = [
        ("num_heads", c.num_heads, "tensor", t),
        ("ffn_dim", c.ffn_dim, "tensor", t),
        ("dim", c.dim, "fsdp", f),
    ]
    for field, value, axis, size in checks:
        if value % size:
            raise ValueError(f"config.{prefix}.{field}={value} is not divisible by mesh axis {axis}={size}")


# --------------------------------------------------------------------------------------------
# Small layers (logical axis names on every parameter)
# --------------------------------------------------------------------------------------------


def _param(value, names):
    return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False)


def _xavier(key, shape, dtype):
    return jax.nn.initializers.xavier_uniform()(key, shape, dtype)


class Linear(nnx.Module):
    def __init__(self, din, dout, names, *, rngs, param_dtype=jnp.float32, init=_xavier, zero=False):
        k = rngs.params()
        kernel = jnp.zeros((din, dout), param_dtype) if zero else init(k, (din, dout), param_dtype)
        self.kernel = _param(kernel, names)
        self.bias = _param(jnp.zeros((dout,), param_dtype), names[1:])

    def __call__(self, x, dtype):
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype)


class RMSNorm(nnx.Module):
    """RMS norm over the last dim (Wan's q/k norm spans all heads), fp32, learned scale."""

    def __init__(self, dim, names, eps, param_dtype=jnp.float32):
        self.scale = _param(jnp.ones((dim,), param_dtype), names)
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, eps, scale=None, bias=None):
    """LayerNorm in fp32 (returns fp32)."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
    """Wan's sinusoidal timestep features: [..., dim] = [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
    ang = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


# --------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------


class TextKV(NamedTuple):
    """Cross-attention keys/values of a prompt, per layer: k, v [L, B, T_text, N, H]."""

    k: jax.Array
    v: jax.Array


class Context(NamedTuple):
    """Cached self-attention context given to a forward call.

    k, v:  [L, B, S, P, N, H] un-roped keys / values of S cached frames (P tokens each).
    pos:   [B, S] temporal index used for RoPE of each cached frame.
    valid: [B, S] bool, False for empty / masked slots.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs, kv_dim: int | None = None):
        d, pd = cfg.dim, jnp.dtype(cfg.param_dtype)
        kv_dim = kv_dim or d
        self.q = Linear(d, d, ("embed", "heads"), rngs=rngs, param_dtype=pd)
        self.k = Linear(kv_dim, d, ("embed", "heads"), rngs=rngs, param_dtype=pd)
        self.v = Linear(kv_dim, d, ("embed", "heads"), rngs=rngs, param_dtype=pd)
        self.o = Linear(d, d, ("heads", "embed"), rngs=rngs, param_dtype=pd)
        self.norm_q = RMSNorm(d, ("heads",), cfg.eps, pd)
        self.norm_k = RMSNorm(d, ("heads",), cfg.eps, pd)


class WanBlock(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.dim, jnp.dtype(cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.cross_attn = Attention(cfg, rngs=rngs)
        if cfg.cross_attn_norm:
            self.norm_cross_scale = _param(jnp.ones((d,), pd), ("norm",))
            self.norm_cross_bias = _param(jnp.zeros((d,), pd), ("norm",))
        self.ffn_in = Linear(d, cfg.ffn_dim, ("embed", "mlp"), rngs=rngs, param_dtype=pd)
        self.ffn_out = Linear(cfg.ffn_dim, d, ("mlp", "embed"), rngs=rngs, param_dtype=pd)
        mod = jax.random.normal(rngs.params(), (6, d), pd) / math.sqrt(d)
        self.modulation = _param(mod, ("modulation", "norm"))

    def text_kv(self, cfg: WanConfig, text_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """text_emb [B, T, D] (after the text embedding MLP) -> k, v [B, T, N, H]."""
        dt = jnp.dtype(cfg.dtype)
        ca = self.cross_attn
        k = ca.norm_k(ca.k(text_emb, dt))
        v = ca.v(text_emb, dt)
        split = functools.partial(rearrange, pattern="b t (n h) -> b t n h", n=cfg.num_heads)
        return split(k), split(v)

    def __call__(
        self, cfg: WanConfig, x, e, text_k, text_v, rope_q, rope_k, ctx_k, ctx_v, mask, want_mass, plan=None
    ):
        """One block.

        x [B, T, D] (T = F*P own tokens); e [B, F, 6, D] fp32 modulation (time_projection output);
        text_k/v [B, Tt, N, H]; rope_q (cos, sin) [B, T, H/2]; rope_k (cos, sin) [B, S*P + T, H/2];
        ctx_k/v [B, S, P, N, H] or None; mask [B, 1, T or 1, S*P + T] bool or None;
        plan: static `attn.BlockPlan` over the F query x S + F key frames (then the self-attention
        runs block-sparse; key mass is not available). With it, mask is None, or, for 'splash'
        only, the key-only validity [B, 1, 1, S*P + T] that the plan does not include (traced).
        'splash' runs the Pallas kernel for the plan's mask or a key-only / absent mask, and the
        'xla' path for a full token mask (a traced frame mask). A plan with per-group key
        positions (`plan.key_positions`) takes rope_k as one (cos, sin) [B, Kg*P, H/2] per group
        and runs group by group (`attn.block_attention`, also under 'splash').
        Returns x [B, T, D], new k/v [B, T, N, H] (un-roped), key mass [B, S*P + T] or None.
        """
        dt = jnp.dtype(cfg.dtype)
        b, t_tokens, d = x.shape
        f = e.shape[1]
        p = t_tokens // f
        n = cfg.num_heads
        mod = e + self.modulation[...].astype(jnp.float32)[None, None]  # [B, F, 6, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = [
            jnp.repeat(mod[:, :, i], p, axis=1) for i in range(6)
        ]  # each [B, T, D] fp32

        # --- self-attention -------------------------------------------------------------
        h = layer_norm(x, cfg.eps) * (1 + scale1) + shift1  # fp32
        sa = self.self_attn
        q = sa.norm_q(sa.q(h, dt))
        k = sa.norm_k(sa.k(h, dt))
        v = sa.v(h, dt)
        q, k, v = (rearrange(z, "b t (n h) -> b t n h", n=n) for z in (q, k, v))  # [B, T, N, H]
        q = shd.constrain(q, ("batch", "act_tokens", "heads", "head_dim"))
        k_new, v_new = k, v
        if ctx_k is not None:
            k_all = jnp.concatenate([rearrange(ctx_k, "b s p n h -> b (s p) n h").astype(k.dtype), k], axis=1)
            v_all = jnp.concatenate([rearrange(ctx_v, "b s p n h -> b (s p) n h").astype(v.dtype), v], axis=1)
        else:
            k_all, v_all = k, v
        q = attn.apply_rope(q, rope_q)
        grouped = plan is not None and plan.key_positions  # rope_k: one table per plan group
        if not grouped:
            k_all = attn.apply_rope(k_all, rope_k)
        splash = cfg.attention == "splash" and not grouped
        if splash and not want_mass and (mask is None or mask.shape[-2] == 1):
            frames = None if plan is None else plan.to_mask()  # [F, S + F] static
            key_valid = None if mask is None else mask[:, 0, 0, :]  # [B, S*P + T]
            o = attn.splash_attention(q, k_all, v_all, frames, p, p, key_valid, cfg.splash_blocks)
            mass = None
        elif plan is not None:
            if mask is not None or want_mass:
                raise ValueError("a block plan excludes a token mask and the key mass")

            def heads(z):
                return shd.constrain(z, ("batch", "act_tokens", "heads", "head_dim"))

            key_rope = rope_k if grouped else None
            o = attn.block_attention(q, k_all, v_all, plan, p, p, cfg.attention, heads, key_rope)
            mass = None
        else:
            res = attn.attention(q, k_all, v_all, mask, cfg.attention, return_key_mass=want_mass)
            o, mass = res if want_mass else (res, None)
        o = checkpoint_name(o, "attention_out")  # saved by the 'save_attention_out' remat policy
        o = sa.o(rearrange(o, "b t n h -> b t (n h)"), dt)
        x = (x.astype(jnp.float32) + o.astype(jnp.float32) * gate1).astype(x.dtype)

        # --- cross-attention --------------------------------------------------------------
        if cfg.cross_attn_norm:
            h = layer_norm(x, cfg.eps, self.norm_cross_scale[...], self.norm_cross_bias[...])
        else:
            h = x
        ca = self.cross_attn
        q = rearrange(ca.norm_q(ca.q(h, dt)), "b t (n h) -> b t n h", n=n)
        text_k, text_v = text_k.astype(q.dtype), text_v.astype(q.dtype)
        if cfg.attention == "splash":
            o = attn.splash_attention(q, text_k, text_v, blocks=cfg.splash_blocks)
        else:
            o = attn.attention(q, text_k, text_v, None, cfg.attention)
        o = ca.o(rearrange(o, "b t n h -> b t (n h)"), dt)
        x = (x.astype(jnp.float32) + o.astype(jnp.float32)).astype(x.dtype)

        # --- FFN ----------------------------------------------------------------------------
        h = layer_norm(x, cfg.eps) * (1 + scale2) + shift2
        y = self.ffn_out(gelu_tanh(self.ffn_in(h, dt)), dt)
        x = (x.astype(jnp.float32) + y.astype(jnp.float32) * gate2).astype(x.dtype)
        x = shd.constrain(x, ("batch", "act_tokens", "act_embed"))
        return x, k_new, v_new, mass


def stack_axis_names(module: nnx.Module, name: str) -> nnx.Module:
    """Prepend the logical axis `name` to every variable's axis names (after an `nnx.vmap` that
    stacked the module). Done by hand rather than with vmap's `transform_metadata`, which in
    flax 0.12 applies the logical names as mesh axes when created under a mesh context."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            names = node.get_metadata().get("out_sharding")
            if names:
                node.set_metadata(out_sharding=(name, *tuple(names)))
    return module


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ForwardOut(NamedTuple):
    velocity: jax.Array  # [B, F, H, W, C_out]
    k: jax.Array  # [L, B, F, P, N, H] un-roped keys of this call's frames
    v: jax.Array  # [L, B, F, P, N, H]
    key_mass: jax.Array | None  # [L, B, S + F] attention share per key frame (instrumentation)


class WanDiT(nnx.Module):
    """Wan2.1 DiT with explicit context. See the module docstring."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.dim, jnp.dtype(cfg.param_dtype)
        small = jax.nn.initializers.normal(0.02)
        self.patch_embedding = Linear(cfg.patch_features, d, ("patch", "embed"), rngs=rngs, param_dtype=pd)
        self.text_embedding_1 = Linear(
            cfg.text_dim, d, ("text_embed", "embed"), rngs=rngs, param_dtype=pd, init=small
        )
        self.text_embedding_2 = Linear(d, d, ("mlp", "embed"), rngs=rngs, param_dtype=pd, init=small)
        self.time_embedding_1 = Linear(
            cfg.freq_dim, d, ("freq", "embed"), rngs=rngs, param_dtype=pd, init=small
        )
        self.time_embedding_2 = Linear(d, d, ("mlp", "embed"), rngs=rngs, param_dtype=pd, init=small)
        self.time_projection = Linear(d, 6 * d, ("embed", "mlp"), rngs=rngs, param_dtype=pd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return WanBlock(cfg, rngs=r)

        self.blocks = stack_axis_names(make_blocks(rngs), "layers")
        out = cfg.patch_features // cfg.in_channels * cfg.out_channels
        self.head = Linear(d, out, ("embed", "patch"), rngs=rngs, param_dtype=pd, zero=cfg.zero_init_head)
        self.head_modulation = _param(
            jax.random.normal(rngs.params(), (2, d), pd) / math.sqrt(d), ("modulation", "norm")
        )

    # --- pieces ---------------------------------------------------------------------------

    def encode_text(self, text: jax.Array) -> TextKV:
        """text [B, T_text, text_dim] prompt embeddings -> per-layer cross-attention k/v.

        Compute once per prompt and reuse for every chunk and denoising step.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text embeddings must be [B, T, {cfg.text_dim}], got {text.shape}")
        emb = self.text_embedding_2(gelu_tanh(self.text_embedding_1(text, dt)), dt)  # [B, T, D]
        graphdef, state = nnx.split(self.blocks)

        def per_layer(layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block.text_kv(cfg, emb)

        k, v = jax.vmap(per_layer)(state)  # [L, B, T, N, H]
        return TextKV(k, v)

    def time_modulation(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """t [B, F] (0..1000) -> temb [B, F, D] fp32, e [B, F, 6, D] fp32."""
        cfg = self.cfg
        f32 = jnp.float32
        temb = self.time_embedding_2(
            jax.nn.silu(self.time_embedding_1(timestep_sinusoid(t, cfg.freq_dim), f32)), f32
        )
        e = self.time_projection(jax.nn.silu(temb), f32)
        return temb, rearrange(e, "b f (six d) -> b f six d", six=6)

    def patchify(self, x: jax.Array) -> jax.Array:
        """[B, F, H, W, C] -> tokens [B, F*h*w, ph*pw*C] ordered (frame, h, w)."""
        _, ph, pw = self.cfg.patch_size
        return rearrange(x, "b f (h ph) (w pw) c -> b (f h w) (ph pw c)", ph=ph, pw=pw)

    def unpatchify(self, y: jax.Array, f: int, h: int, w: int) -> jax.Array:
        _, ph, pw = self.cfg.patch_size
        return rearrange(y, "b (f h w) (ph pw c) -> b f (h ph) (w pw) c", f=f, h=h, w=w, ph=ph, pw=pw)

    # --- forward --------------------------------------------------------------------------

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        text: TextKV | jax.Array,
        frame_pos: jax.Array,
        ctx: Context | None = None,
        frame_mask: jax.Array | None = None,
        return_key_mass: bool = False,
        key_pos=None,
    ) -> ForwardOut:
        """Denoiser forward on F frames, attending to an optional cached context.

        x:          [B, F, H, W, C] noisy latents (channels last).
        t:          [B, F] timesteps in [0, 1000] (per frame).
        text:       TextKV from `encode_text`, or raw embeddings [B, T_text, text_dim].
        frame_pos:  [B, F] or [F] temporal RoPE index of each frame.
        ctx:        Context of S cached frames (or None).
        frame_mask: [F, S + F] or [B, F, S + F] bool, query frame x key frame (context first).
                    Default: every valid context frame and every own frame is visible.
                    A mask known at trace time (numpy) with a static ctx.valid runs block-sparse
                    (see `attn.BlockPlan`; config `attention_blocks`); a traced one runs dense.
                    With attention='splash' a static mask runs in the kernel even when ctx.valid
                    is traced (the validity goes in as segment ids).
        key_pos:    optional static int [F, F] (no ctx): the temporal index of key frame k as seen
                    from query frame q, when it depends on the query (a streaming layout replayed
                    in one training pass, e.g. a sink at relative time); frame_pos then gives the
                    queries' indices only. Needs a static 2-D frame_mask and always runs the
                    block-sparse plan (each group rotates its own keys), whatever attention_blocks.
        Returns ForwardOut(velocity [B, F, H, W, C_out], k/v [L, B, F, P, N, H], key_mass).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, f, hh, ww, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels, model.in_channels={cfg.in_channels}")
        _, ph, pw = cfg.patch_size
        if hh % ph or ww % pw:
            raise ValueError(f"latent size {hh}x{ww} is not divisible by the patch size {cfg.patch_size}")
        gh, gw = hh // ph, ww // pw
        p = gh * gw
        if t.shape != (b, f):
            raise ValueError(f"timesteps must be [B, F] = {(b, f)}, got {t.shape}")
        frame_pos = jnp.broadcast_to(jnp.asarray(frame_pos), (b, f))
        if not isinstance(text, TextKV):
            text = self.encode_text(text)

        tokens = self.patch_embedding(self.patchify(x), dt)  # [B, T, D]
        tokens = shd.constrain(tokens, ("batch", "act_tokens", "act_embed"))
        temb, e = self.time_modulation(t)

        s = 0 if ctx is None else ctx.k.shape[2]
        rope_q = attn.rope_angles(frame_pos, (gh, gw), cfg.head_dim, cfg.rope_theta)  # cos, sin [B, T, H/2]
        if ctx is not None:
            if ctx.k.shape[3] != p:
                raise ValueError(f"context has {ctx.k.shape[3]} tokens per frame, input has {p}")
            rope_ctx = attn.rope_angles(ctx.pos, (gh, gw), cfg.head_dim, cfg.rope_theta)
            rope_k = tuple(jnp.concatenate([a, b], axis=1) for a, b in zip(rope_ctx, rope_q))
        else:
            rope_k = rope_q

        # Masks. Streaming (no frame_mask): every query sees the same keys, so a key-only mask
        # [B, 1, 1, K] suffices (no [T, K] mask is materialised). Training masks are frame-level
        # [B, F, S + F]: when known at trace time (and attention_blocks='auto', no key mass) they
        # become a static block plan (no mask at all); otherwise they are expanded to [B, 1, T, K].
        if frame_mask is not None and tuple(np.shape(frame_mask))[-2:] != (f, s + f):
            raise ValueError(
                f"frame_mask must be [.., {f}, {s + f}] (F, S + F), got {tuple(np.shape(frame_mask))}"
            )
        splash = cfg.attention == "splash"
        plan, plan_has_validity = None, True
        if frame_mask is not None and (cfg.attention_blocks == "auto" or splash) and not return_key_mass:
            plan = static_block_plan(frame_mask, None if ctx is None else ctx.valid, b)
            if plan is None and splash and ctx is not None:
                # splash takes a traced ctx.valid beside the static frame mask (segment ids)
                plan, plan_has_validity = static_block_plan(frame_mask, None, b), False
        if key_pos is not None:  # query-dependent key positions: the grouped plan, one RoPE per group
            plan = grouped_key_plan(frame_mask, key_pos, ctx is not None, return_key_mass)
            rope_k = tuple(
                attn.rope_angles(
                    jnp.broadcast_to(jnp.asarray(g.k_pos, jnp.int32), (b, len(g.k_pos))),
                    (gh, gw),
                    cfg.head_dim,
                    cfg.rope_theta,
                )
                for g in plan.groups
            )
        key_valid = None
        if ctx is not None and (plan is None or not plan_has_validity):
            key_valid = jnp.concatenate(
                [ctx.valid.astype(bool), jnp.ones((b, f), bool)], axis=1
            )  # [B, S + F]
        if plan is not None:
            mask = None if key_valid is None else jnp.repeat(key_valid, p, axis=1)[:, None, None, :]
        elif frame_mask is None:
            mask = None if key_valid is None else jnp.repeat(key_valid, p, axis=1)[:, None, None, :]
        else:
            fm = jnp.broadcast_to(jnp.asarray(frame_mask, bool), (b, f, s + f))
            if key_valid is not None:
                fm = fm & key_valid[:, None, :]
            mask = attn.expand_frame_mask(fm, p, p)

        graphdef, block_state = nnx.split(self.blocks)

        def body(h, xs):
            layer_state, tk, tv, ck, cv = xs
            block = nnx.merge(graphdef, layer_state)
            h, k_new, v_new, mass = block(
                cfg, h, e, tk, tv, rope_q, rope_k, ck, cv, mask, return_key_mass, plan
            )
            return h, (k_new, v_new, mass)

        body = _remat(body, cfg.remat)
        ck = None if ctx is None else ctx.k
        cv = None if ctx is None else ctx.v
        h, (k_new, v_new, mass) = jax.lax.scan(body, tokens.astype(dt), (block_state, text.k, text.v, ck, cv))

        # head
        mod = self.head_modulation[...].astype(jnp.float32)[None, None] + temb[:, :, None, :]  # [B,F,2,D]
        shift = jnp.repeat(mod[:, :, 0], p, axis=1)
        scale = jnp.repeat(mod[:, :, 1], p, axis=1)
        y = self.head(layer_norm(h, cfg.eps) * (1 + scale) + shift, dt)
        vel = self.unpatchify(y, f, gh, gw).astype(jnp.float32)
        k_new = rearrange(k_new, "l b (f p) n h -> l b f p n h", f=f)
        v_new = rearrange(v_new, "l b (f p) n h -> l b f p n h", f=f)
        if return_key_mass:
            mass = rearrange(mass, "l b (s p) -> l b s p", p=p).sum(-1)  # [L, B, S + F]
        return ForwardOut(vel, k_new, v_new, mass if return_key_mass else None)


def _static_value(x) -> np.ndarray | None:
    """x as a numpy array when it is known at trace time (numpy, or a concrete jax array), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # e.g. a jax array not addressable from this process
        return None


def static_block_plan(frame_mask, ctx_valid, batch: int) -> attn.BlockPlan | None:
    """The static block plan of a forward's frame mask [F, S + F] or [B, F, S + F], with the
    context validity [B, S] (or None) folded in; None when either is traced or the batch rows
    differ (then the dense masked path runs)."""
    fm = _static_value(frame_mask)
    if fm is None:
        return None
    fm = fm.astype(bool)
    fm = fm.reshape((-1, *fm.shape[-2:]))  # [B or 1, F, S + F]
    if ctx_valid is not None:
        cv = _static_value(ctx_valid)
        if cv is None:
            return None
        cv = cv.astype(bool).reshape((-1, cv.shape[-1]))  # [B or 1, S]
        own = np.ones((cv.shape[0], fm.shape[-1] - cv.shape[-1]), bool)
        fm = fm & np.concatenate([cv, own], axis=1)[:, None, :]
    if fm.shape[0] not in (1, batch) or not (fm == fm[:1]).all():
        return None
    return attn.plan_frame_mask(fm[0])


def grouped_key_plan(frame_mask, key_pos, has_ctx: bool, key_mass: bool) -> attn.BlockPlan:
    """The block plan of a forward with query-dependent key positions (see `WanDiT.__call__`)."""
    if has_ctx or key_mass:
        raise ValueError("key_pos (query-dependent key positions) excludes a cached context and the key mass")
    fm, kp = _static_value(frame_mask), _static_value(key_pos)
    if fm is None or kp is None or fm.ndim != 2:
        raise ValueError(
            "key_pos needs a static [F, F] frame_mask and a static [F, F] key_pos (numpy), got "
            f"{'traced' if fm is None else fm.shape} and {'traced' if kp is None else kp.shape}"
        )
    return attn.plan_frame_mask(fm, kp)


# --------------------------------------------------------------------------------------------
# Functional boundary
# --------------------------------------------------------------------------------------------


def create_model(cfg: WanConfig, seed: int = 0) -> WanDiT:
    return WanDiT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: WanConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) without allocating anything.

    Uses `jax.eval_shape` rather than `nnx.eval_shape`: under a mesh context the latter would
    treat our logical axis names as mesh axes.
    """
    box = {}

    def init():
        graphdef, state = nnx.split(WanDiT(cfg, rngs=nnx.Rngs(0)))
        box["graphdef"] = graphdef
        return state

    state = jax.eval_shape(init)
    return box["graphdef"], state


def create_sharded(cfg: WanConfig, mesh, rules=shd.DEFAULT_RULES, seed: int = 0):
    """Create params directly in their shardings on `mesh` (jit with out_shardings).

    Returns (graphdef, params, shardings).
    """
    graphdef, abstract = abstract_model(cfg)
    shardings = shd.state_shardings(abstract, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(WanDiT(cfg, rngs=nnx.Rngs(seed)))[1]

    return graphdef, init(), shardings


def forward(graphdef, params, *args, **kwargs) -> ForwardOut:
    """Pure forward: merge params into the graph and run. Use inside jit."""
    return nnx.merge(graphdef, params)(*args, **kwargs)


def encode_text(graphdef, params, text) -> TextKV:
    return nnx.merge(graphdef, params).encode_text(text)


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
