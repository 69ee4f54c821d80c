"""The Wan2.1 video VAE in Flax NNX, with exact streaming encode/decode, and a parameter-free codec.

Owns: the Wan VAE (causal 3D convolutions, channel RMS norm, residual blocks, spatial/temporal
resampling with Wan's first-frame special cases, the per-frame mid-block attention, the output
clamp, the published latent normalisation), its streaming caches (`CodecCache`, a fixed-shape
pytree from the first call on), its weight-conversion tables (diffusers `AutoencoderKLWan` and the
original `Wan2.1_VAE.pth` layouts), and `PatchCodec`, a fixed space-to-depth codec with the same
streaming interface for demos without a trained VAE.

Must not know: the DiT, caches of the DiT, anchors, samplers, training, data or files (conversion
tables are declarative; `adastate_jax.models.convert` reads the files).

Layouts: videos are channels-last `[B, T, H, W, 3]` in [-1, 1]; latents are `[B, F, h, w, z_dim]`.
Wan2.1: T = 1 + 4k frames <-> F = 1 + k latents, h = H / 8, w = W / 8.

Streaming (the important part)
-------------------------------
Wan's VAE is causal in time: every temporal convolution sees the current and the previous frames
of its own input, so a cache of the last 2 input frames of each temporal conv makes chunk-by-chunk
coding exact. The first frame is special: the encoder's temporal downsampler passes frame 0
through (no temporal conv) and the decoder's temporal upsampler turns latent 0 into one frame
instead of two. To keep every chunk the same shape (so `jax.lax.scan` works), the stream is laid
out on a grid of `temporal_factor` (f = 4) frames per latent, where the *first* `f - 1` frames of
the whole stream are padding:

    pixels : [pad, pad, pad, x0 | x1 x2 x3 x4 | x5 ... x8 | ...]   (f frames per latent)
    latents: [z0             | z1          | z2          | ...]

`decode_chunk(cache, z[B, Fz, h, w, C]) -> (cache, frames[B, f * Fz, H, W, 3])` always returns
f frames per latent; in the first chunk the first f - 1 of them are padding (zeros): drop the
first `lead_frames` (= f - 1) frames of the concatenated stream (`decode` does). Likewise
`encode_chunk(cache, frames[B, f * Fz, H, W, 3]) -> (cache, z[B, Fz, ...])` ignores the first f - 1
frames of the first chunk (`encode` prepends them). Inside, a padding frame is zeroed before every
temporal convolution, which is exactly Wan's zero (causal) padding, and the first-frame special
cases are selected with `jnp.where` on the cache's own chunk counter: no Python-level first chunk.
Any chunk size works, and mixing sizes works too: the cache does not depend on it.

Pure-functional use: `graphdef, params = nnx.split(model)` once; then the module-level
`encode(graphdef, params, video)`, `decode(graphdef, params, z)`, `encode_chunk(graphdef, params,
cache, frames)` and `decode_chunk(graphdef, params, cache, z)` (jit them with `graphdef` static)
merge inside and call the module methods of the same names. Caches come from
`init_encode_cache(model_or_config, batch, height, width)` /
`init_decode_cache(model_or_config, batch, latent_h, latent_w)`; both work for `PatchCodec` too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from adastate_jax.models.convert import Rule, identity

# Published Wan2.1 latent statistics (z = (mu - mean) / std).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

DTYPES = ("float32", "bfloat16", "float16")
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Static configuration of the Wan VAE (hashable). Defaults are Wan2.1's.

    temporal_downsample[i] says whether encoder stage i halves time (one entry per stage that
    downsamples, i.e. len(dim_mult) - 1); the decoder mirrors it. latents_mean/std: the
    normalisation applied by `encode(normalize=True)` and undone by `decode(normalize=True)`;
    None means identity (tiny, untrained configurations).
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    latents_mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENTS_STD
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; the norms and the attention softmax run in fp32

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
                if len(getattr(self, name)) != self.z_dim:
                    raise ValueError(f"{name} has {len(v)} entries, z_dim is {self.z_dim}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must both be given or both be None")
        if len(self.dim_mult) < 1:
            raise ValueError("dim_mult must have at least one stage")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs one entry per downsampling "
                f"stage: len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if self.base_dim % 2 or any(self.base_dim * m % 2 for m in self.dim_mult):
            raise ValueError("base_dim * dim_mult must be even (the upsamplers halve channels)")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")

    @classmethod
    def tiny(cls, **overrides) -> WanVAEConfig:
        """Same architecture, CPU-sized: base_dim 8, one res block per stage, no normalisation."""
        kw = dict(base_dim=8, num_res_blocks=1, latents_mean=None, latents_std=None)
        kw.update(overrides)
        return cls(**kw)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def lead_frames(self) -> int:
        """Padding frames at the start of a stream (the first chunk only): temporal_factor - 1."""
        return self.temporal_factor - 1

    def num_frames(self, num_latents: int) -> int:
        """Video frames of `num_latents` latent frames: 1 + f * (F - 1)."""
        return 1 + self.temporal_factor * (num_latents - 1)

    def num_latents(self, num_frames: int) -> int:
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ValueError(
                f"{num_frames} frames: the Wan VAE codes 1 + {self.temporal_factor}k frames "
                f"(1, {1 + self.temporal_factor}, {1 + 2 * self.temporal_factor}, ...)"
            )
        return 1 + (num_frames - 1) // self.temporal_factor


# --------------------------------------------------------------------------------------------
# The streaming cache
# --------------------------------------------------------------------------------------------


@struct.dataclass
class CodecCache:
    """Fixed-shape streaming state of an encoder or a decoder.

    convs: nested dict mirroring the module tree; each leaf holds the last input frames of one
      temporal convolution, `[B, k, h_l, w_l, C_l]` (k = 2, or 1 for the strided downsampler).
      Zeros at the start, which *is* Wan's causal zero padding.
    num_chunks: int32 [] chunks coded so far; 0 selects the first-frame special cases.
    batch, latent_hw: static (part of the tree structure), for input checks.
    """

    convs: dict
    num_chunks: jax.Array
    batch: int = struct.field(pytree_node=False)
    latent_hw: tuple[int, int] = struct.field(pytree_node=False)


def _check_chunk(cache: CodecCache, x: jax.Array, channels: int, factor: int, what: str):
    """Raise a readable error when a chunk does not match the cache it is coded with."""
    if x.ndim != 5:
        raise ValueError(f"{what} must be [B, T, H, W, C], got shape {x.shape}")
    b, _, hh, ww, c = x.shape
    want_hw = (cache.latent_hw[0] * factor, cache.latent_hw[1] * factor)
    if c != channels:
        raise ValueError(f"{what} has {c} channels, expected {channels}")
    if b != cache.batch or (hh, ww) != want_hw:
        raise ValueError(
            f"{what} of shape {x.shape} does not match the cache (batch {cache.batch}, "
            f"spatial {want_hw[0]}x{want_hw[1]}); make a cache for this shape"
        )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _param(value, names):
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


_kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _frame_mask(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Zero the frames where valid [T] is False (padding frames of the first chunk)."""
    if valid is None:
        return x
    return jnp.where(valid[None, :, None, None, None], x, jnp.zeros((), x.dtype))


def _valid_frames(first: jax.Array, num_frames: int, lead: int, inclusive: bool = False):
    """[T] bool: frame t is real (not padding) at this level; None when nothing is padding.

    `inclusive` also marks frame `lead` (the first real frame) invalid, for the temporal
    upsampler, whose conv treats Wan's first frame as zero.
    """
    if lead == 0 and not inclusive:
        return None
    t = jnp.arange(num_frames)
    real = t > lead if inclusive else t >= lead
    return jnp.logical_or(jnp.logical_not(first), real)


class CausalConv3d(nnx.Module):
    """3D convolution, causal in time (front padding from a cache of previous input frames).

    kernel [kt, kh, kw, C_in, C_out]; spatial padding kh // 2, kw // 2 (Wan's `padding=1`).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, *, rngs: nnx.Rngs, param_dtype, dtype):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.kernel_size = (kt, kh, kw)
        self.in_ch, self.out_ch = in_ch, out_ch
        self.dtype = dtype
        shape = (kt, kh, kw, in_ch, out_ch)
        self.kernel = _param(
            _kernel_init(rngs.params(), shape, param_dtype), (None, None, None, "conv_in", "conv_out")
        )
        self.bias = _param(jnp.zeros((out_ch,), param_dtype), ("conv_out",))

    @property
    def cache_frames(self) -> int:
        return self.kernel_size[0] - 1

    def init_cache(self, batch: int, h: int, w: int):
        if self.cache_frames == 0:
            return None
        return jnp.zeros((batch, self.cache_frames, h, w, self.in_ch), self.dtype)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        # x [B, T, H, W, Ci]; cache [B, kt - 1, H, W, Ci] (None: zeros) -> y [B, T, H, W, Co], cache
        kt = self.kernel_size[0]
        if self.kernel_size == (1, 1, 1):
            y = jnp.einsum("BTHWC,CD->BTHWD", x, self.kernel[...].astype(x.dtype)[0, 0, 0])
            return y + self.bias[...].astype(x.dtype), cache
        if kt > 1:
            if cache is None:
                cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, kt - 1 + T, H, W, Ci]
            cache = x[:, -(kt - 1) :]
        return self.valid(x), cache

    def valid(self, x: jax.Array, stride_t: int = 1) -> jax.Array:
        """No time padding: x [B, T, H, W, Ci] -> [B, (T - kt) // stride_t + 1, H, W, Co]."""
        _, kh, kw = self.kernel_size
        y = _conv3d(x, self.kernel[...].astype(x.dtype), stride_t, ((kh // 2, kh // 2), (kw // 2, kw // 2)))
        return y + self.bias[...].astype(x.dtype)


def _conv3d(x, kernel, stride_t, spatial_pad):
    # x [B, T, H, W, Ci] (already padded in time), kernel [kt, kh, kw, Ci, Co]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride_t, 1, 1),
        padding=((0, 0), *spatial_pad),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    )


class Conv2d(nnx.Module):
    """Per-frame 2D convolution, kernel [kh, kw, C_in, C_out]."""

    def __init__(self, in_ch, out_ch, kernel_size, *, stride=1, padding, rngs, param_dtype):
        self.stride, self.padding = stride, padding
        shape = (kernel_size, kernel_size, in_ch, out_ch)
        self.kernel = _param(
            _kernel_init(rngs.params(), shape, param_dtype), (None, None, "conv_in", "conv_out")
        )
        self.bias = _param(jnp.zeros((out_ch,), param_dtype), ("conv_out",))

    def __call__(self, x):
        # x [B, T, H, W, Ci] -> [B, T, H', W', Co]
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]),
            self.kernel[...].astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(x.dtype)
        return y.reshape(b, t, *y.shape[1:])


class ChannelRMSNorm(nnx.Module):
    """x / ||x||_2 over channels * sqrt(C) * gamma (Wan's RMS_norm; no bias in Wan2.1)."""

    def __init__(self, dim: int, *, param_dtype):
        self.scale = float(dim) ** 0.5
        self.gamma = _param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        # max(||x||, eps) written as sqrt(max(sum x^2, eps^2)): the same values, but a finite
        # gradient at x = 0 (the causal padding frames), where d sqrt(s) / ds is infinite
        norm = jnp.sqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), _NORM_EPS**2))
        y = xf / norm * self.scale * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm-SiLU-conv3 twice, plus a (1x1x1 conv) shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.norm1 = ChannelRMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, **kw)
        self.norm2 = ChannelRMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, **kw)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def init_cache(self, batch, h, w):
        return {"conv1": self.conv1.init_cache(batch, h, w), "conv2": self.conv2.init_cache(batch, h, w)}

    def __call__(self, x, cache, valid):
        # x [B, T, H, W, Ci] -> [B, T, H, W, Co]
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        y = _frame_mask(jax.nn.silu(self.norm1(x)), valid)
        y, c1 = self.conv1(y, cache["conv1"])
        y = _frame_mask(jax.nn.silu(self.norm2(y)), valid)
        y, c2 = self.conv2(y, cache["conv2"])
        return y + shortcut, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across frames)."""

    def __init__(self, dim: int, *, rngs, param_dtype):
        self.dim = dim
        self.norm = ChannelRMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv_kernel = _param(
            _kernel_init(rngs.params(), (dim, 3 * dim), param_dtype), ("conv_in", "heads")
        )
        self.to_qkv_bias = _param(jnp.zeros((3 * dim,), param_dtype), ("heads",))
        self.proj_kernel = _param(jnp.zeros((dim, dim), param_dtype), ("heads", "conv_out"))  # Wan: zero init
        self.proj_bias = _param(jnp.zeros((dim,), param_dtype), ("conv_out",))

    def __call__(self, x):
        # x [B, T, H, W, C]
        b, t, h, w, c = x.shape
        y = self.norm(x).reshape(b * t, h * w, c)  # [N, S, C], N = B * T frames
        qkv = jnp.einsum("NSC,CD->NSD", y, self.to_qkv_kernel[...].astype(x.dtype))
        qkv = qkv + self.to_qkv_bias[...].astype(x.dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each [N, S, C]
        logits = jnp.einsum("NQC,NKC->NQK", q, k).astype(jnp.float32) / np.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        y = jnp.einsum("NQK,NKC->NQC", probs, v)
        y = jnp.einsum("NQC,CD->NQD", y, self.proj_kernel[...].astype(x.dtype)) + self.proj_bias[...].astype(
            x.dtype
        )
        return x + y.reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attention = AttentionBlock(dim, rngs=rngs, param_dtype=param_dtype)

    def init_cache(self, batch, h, w):
        return {"resnets": {str(i): r.init_cache(batch, h, w) for i, r in enumerate(self.resnets)}}

    def __call__(self, x, cache, valid):
        x, c0 = self.resnets[0](x, cache["resnets"]["0"], valid)
        x = self.attention(x)
        x, c1 = self.resnets[1](x, cache["resnets"]["1"], valid)
        return x, {"resnets": {"0": c0, "1": c1}}


class Resample(nnx.Module):
    """x2 spatial down/up-sampling, optionally x2 in time, with Wan's first-frame special cases.

    'downsample3d': spatial conv (stride 2), then a temporal conv (kernel 3, stride 2) over the
      previous chunk's last frame and this chunk; Wan's first frame passes through unconvolved.
    'upsample3d': a temporal conv (C -> 2C, i.e. two output frames per input frame) over the last 2
      frames and this chunk, then nearest x2 and a conv to C // 2; Wan's first frame gives one
      frame (itself, unconvolved) and counts as zero in the temporal conv's history.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, rngs, param_dtype, dtype):
        if mode not in self.MODES:
            raise ValueError(f"resample mode {mode!r}; expected one of {self.MODES}")
        self.mode, self.dim = mode, dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        if mode.startswith("down"):
            self.spatial_conv = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        else:
            self.spatial_conv = Conv2d(dim, dim // 2, 3, padding=((1, 1), (1, 1)), **kw)
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), dtype=dtype, **kw)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, **kw)
        else:
            self.time_conv = None

    def out_hw(self, h, w):
        return (h // 2, w // 2) if self.mode.startswith("down") else (2 * h, 2 * w)

    def init_cache(self, batch, h, w):
        dtype = self.time_conv.dtype if self.time_conv is not None else None
        if self.mode == "downsample3d":  # last frame after the spatial downsample
            return {"time_conv": jnp.zeros((batch, 1, h // 2, w // 2, self.dim), dtype)}
        if self.mode == "upsample3d":  # last 2 frames of the input
            return {"time_conv": jnp.zeros((batch, 2, h, w, self.dim), dtype)}
        return {}

    def __call__(self, x, cache, first, lead: int):
        """x [B, T, H, W, C] with `lead` padding frames when first -> (y, cache, lead of y)."""
        b, t = x.shape[:2]
        if self.mode == "downsample2d":
            return self.spatial_conv(x), cache, lead
        if self.mode == "upsample2d":
            return self.spatial_conv(_upsample_nearest(x)), cache, lead
        if self.mode == "downsample3d":
            if t % 2 or lead % 2 == 0:
                raise ValueError(
                    f"temporal downsample needs an even chunk and odd lead, got T={t} lead={lead}"
                )
            xs = self.spatial_conv(x)  # [B, T, H/2, W/2, C]
            hist = jnp.concatenate([cache["time_conv"].astype(xs.dtype), xs], axis=1)  # [B, T + 1, ...]
            y = self.time_conv.valid(hist, stride_t=2)  # [B, T/2, ...]; window i = hist[2i : 2i + 3]
            new_lead = (lead - 1) // 2
            passthrough = jnp.logical_and(first, jnp.arange(t // 2) == new_lead)
            y = jnp.where(passthrough[None, :, None, None, None], xs[:, 1::2], y)  # xs[2i+1] = xs[lead]
            return y, {"time_conv": xs[:, -1:]}, new_lead
        # upsample3d
        x_hist = _frame_mask(x, _valid_frames(first, t, lead, inclusive=True))
        y, new_cache = self.time_conv(x_hist, cache["time_conv"])  # [B, T, H, W, 2C]
        y = y.reshape(b, t, *y.shape[2:4], 2, self.dim)
        y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, *y.shape[2:4], self.dim)  # frames (t, 2) -> 2t
        new_lead = 2 * lead + 1
        passthrough = jnp.logical_and(first, jnp.arange(2 * t) == new_lead)
        y = jnp.where(passthrough[None, :, None, None, None], jnp.repeat(x, 2, axis=1), y)
        y = self.spatial_conv(_upsample_nearest(y))
        return y, {"time_conv": new_cache}, new_lead


def _upsample_nearest(x):
    # [B, T, H, W, C] -> [B, T, 2H, 2W, C] (nearest; = torch 'nearest-exact' at scale 2)
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


# --------------------------------------------------------------------------------------------
# Encoder, decoder, VAE
# --------------------------------------------------------------------------------------------


class Encoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.lead = cfg.lead_frames
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, **kw))
        self.down_blocks = nnx.List(blocks)  # flat, like both torch layouts
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, **kw)

    def init_cache(self, batch, h, w):
        cache = {"conv_in": self.conv_in.init_cache(batch, h, w), "down_blocks": {}}
        for i, layer in enumerate(self.down_blocks):
            cache["down_blocks"][str(i)] = layer.init_cache(batch, h, w)
            if isinstance(layer, Resample):
                h, w = layer.out_hw(h, w)
        cache["mid_block"] = self.mid_block.init_cache(batch, h, w)
        cache["conv_out"] = self.conv_out.init_cache(batch, h, w)
        return cache

    def __call__(self, x, cache, first):
        # x [B, f * Fz, H, W, C_in] -> moments [B, Fz, h, w, 2 z]
        lead = self.lead
        new = {"down_blocks": {}}
        x = _frame_mask(x, _valid_frames(first, x.shape[1], lead))
        x, new["conv_in"] = self.conv_in(x, cache["conv_in"])
        for i, layer in enumerate(self.down_blocks):
            c = cache["down_blocks"][str(i)]
            if isinstance(layer, Resample):
                x, new["down_blocks"][str(i)], lead = layer(x, c, first, lead)
            else:
                x, new["down_blocks"][str(i)] = layer(x, c, _valid_frames(first, x.shape[1], lead))
        assert lead == 0, lead
        x, new["mid_block"] = self.mid_block(x, cache["mid_block"], None)
        x = jax.nn.silu(self.norm_out(x))
        x, new["conv_out"] = self.conv_out(x, cache["conv_out"])
        return x, new


class UpBlock(nnx.Module):
    def __init__(self, in_dim, out_dim, num_res_blocks, upsample_mode, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        res = []
        for _ in range(num_res_blocks + 1):
            res.append(ResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(res)
        self.upsampler = Resample(out_dim, upsample_mode, **kw) if upsample_mode else None

    def init_cache(self, batch, h, w):
        cache = {"resnets": {str(i): r.init_cache(batch, h, w) for i, r in enumerate(self.resnets)}}
        if self.upsampler is not None:
            cache["upsampler"] = self.upsampler.init_cache(batch, h, w)
            h, w = self.upsampler.out_hw(h, w)
        return cache, (h, w)

    def __call__(self, x, cache, first, lead):
        new = {"resnets": {}}
        valid = _valid_frames(first, x.shape[1], lead)
        for i, r in enumerate(self.resnets):
            x, new["resnets"][str(i)] = r(x, cache["resnets"][str(i)], valid)
        if self.upsampler is not None:
            x, new["upsampler"], lead = self.upsampler(x, cache["upsampler"], first, lead)
        return x, new, lead


class Decoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.in_channels, 3, **kw)

    def init_cache(self, batch, h, w):
        cache = {
            "conv_in": self.conv_in.init_cache(batch, h, w),
            "mid_block": self.mid_block.init_cache(batch, h, w),
        }
        cache["up_blocks"] = {}
        for i, blk in enumerate(self.up_blocks):
            cache["up_blocks"][str(i)], (h, w) = blk.init_cache(batch, h, w)
        cache["conv_out"] = self.conv_out.init_cache(batch, h, w)
        return cache

    def __call__(self, x, cache, first):
        # x [B, Fz, h, w, z] -> frames [B, f * Fz, H, W, C_out] (first chunk: f - 1 leading pads)
        new = {"up_blocks": {}}
        x, new["conv_in"] = self.conv_in(x, cache["conv_in"])
        x, new["mid_block"] = self.mid_block(x, cache["mid_block"], None)
        lead = 0
        for i, blk in enumerate(self.up_blocks):
            x, new["up_blocks"][str(i)], lead = blk(x, cache["up_blocks"][str(i)], first, lead)
        valid = _valid_frames(first, x.shape[1], lead)
        x = _frame_mask(jax.nn.silu(self.norm_out(x)), valid)
        x, new["conv_out"] = self.conv_out(x, cache["conv_out"])
        return _frame_mask(x, valid), new


class WanVAE(nnx.Module):
    """The Wan2.1 VAE. All coding goes through the streaming methods (full = scan over chunks).

    Methods (module-level functional twins take `graphdef, params` first):
      init_encode_cache(batch, height, width) -> CodecCache
      encode_chunk(cache, frames[B, f*Fz, H, W, 3], normalize=True, return_logvar=False)
          -> (cache, mu[B, Fz, h, w, z])  (or (cache, (mu, logvar)))
      encode(video[B, 1+f*k, H, W, 3], normalize=True, chunk_latents=1, return_logvar=False)
          -> mu[B, 1+k, h, w, z]  (or (mu, logvar))
      init_decode_cache(batch, latent_h, latent_w) -> CodecCache
      decode_chunk(cache, z[B, Fz, h, w, z], normalize=True) -> (cache, frames[B, f*Fz, H, W, 3])
      decode(z[B, F, h, w, z], normalize=True, chunk_latents=1) -> frames[B, 1+f*(F-1), H, W, 3]
    `normalize`: latents are (mu - mean) / std with the config's statistics (identity when None).
    logvar is returned raw (unnormalised, unclamped).
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        kw = dict(rngs=rngs, param_dtype=pd, dtype=dt)
        self.encoder = Encoder(config, **kw)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
        self.decoder = Decoder(config, **kw)

    # --- shared facts -------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def lead_frames(self) -> int:
        return self.config.lead_frames

    def _stats(self):
        c = self.config
        if c.latents_mean is None:
            return None
        return jnp.asarray(c.latents_mean, jnp.float32), jnp.asarray(c.latents_std, jnp.float32)

    # --- encoder --------------------------------------------------------------------------
    def init_encode_cache(self, batch: int, height: int, width: int) -> CodecCache:
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"frame size {height}x{width} must be divisible by the spatial factor {s}")
        convs = {"encoder": self.encoder.init_cache(batch, height, width)}
        return CodecCache(convs, jnp.zeros((), jnp.int32), batch, (height // s, width // s))

    def encode_chunk(self, cache: CodecCache, frames: jax.Array, *, normalize=True, return_logvar=False):
        # frames [B, f * Fz, H, W, 3] -> mu [B, Fz, h, w, z]
        _check_chunk(cache, frames, self.config.in_channels, self.spatial_factor, "frames")
        f = self.temporal_factor
        if frames.shape[1] % f or frames.shape[1] == 0:
            raise ValueError(
                f"encode_chunk takes {f} frames per latent (the first chunk's first {f - 1} are padding), "
                f"got {frames.shape[1]} frames"
            )
        first = cache.num_chunks == 0
        x, convs = self.encoder(frames.astype(jnp.dtype(self.config.dtype)), cache.convs["encoder"], first)
        moments, _ = self.quant_conv(x)  # [B, Fz, h, w, 2z]
        mu, logvar = jnp.split(moments, 2, axis=-1)
        if normalize and (stats := self._stats()) is not None:
            mu = ((mu.astype(jnp.float32) - stats[0]) / stats[1]).astype(mu.dtype)
        cache = cache.replace(convs={"encoder": convs}, num_chunks=cache.num_chunks + 1)
        return cache, ((mu, logvar) if return_logvar else mu)

    def encode(self, video: jax.Array, *, normalize=True, chunk_latents: int = 1, return_logvar=False):
        # video [B, 1 + f k, H, W, 3] -> mu [B, 1 + k, h, w, z]
        if video.ndim != 5:
            raise ValueError(f"video must be [B, T, H, W, C], got shape {video.shape}")
        self.config.num_latents(video.shape[1])  # validates T = 1 + f k
        cache = self.init_encode_cache(video.shape[0], video.shape[2], video.shape[3])
        pad = jnp.zeros((video.shape[0], self.lead_frames, *video.shape[2:]), video.dtype)
        stream = jnp.concatenate([pad, video], axis=1)  # [B, f (1 + k), H, W, 3]

        def step(c, x):
            return self.encode_chunk(c, x, normalize=normalize, return_logvar=return_logvar)

        _, out = _run_chunks(step, cache, stream, chunk_latents * self.temporal_factor)
        return out

    # --- decoder --------------------------------------------------------------------------
    def init_decode_cache(self, batch: int, latent_h: int, latent_w: int) -> CodecCache:
        convs = {"decoder": self.decoder.init_cache(batch, latent_h, latent_w)}
        return CodecCache(convs, jnp.zeros((), jnp.int32), batch, (latent_h, latent_w))

    def decode_chunk(self, cache: CodecCache, z: jax.Array, *, normalize=True):
        # z [B, Fz, h, w, z] -> frames [B, f * Fz, H, W, 3] in [-1, 1]; first chunk: f - 1 zero pads
        _check_chunk(cache, z, self.z_dim, 1, "latents")
        if z.shape[1] == 0:
            raise ValueError("decode_chunk got 0 latent frames")
        z = z.astype(jnp.dtype(self.config.dtype))
        if normalize and (stats := self._stats()) is not None:
            z = (z.astype(jnp.float32) * stats[1] + stats[0]).astype(z.dtype)
        x, _ = self.post_quant_conv(z)
        first = cache.num_chunks == 0
        frames, convs = self.decoder(x, cache.convs["decoder"], first)
        frames = jnp.clip(frames, -1.0, 1.0)
        return cache.replace(convs={"decoder": convs}, num_chunks=cache.num_chunks + 1), frames

    def decode(self, z: jax.Array, *, normalize=True, chunk_latents: int = 1):
        # z [B, F, h, w, z] -> frames [B, 1 + f (F - 1), H, W, 3]
        if z.ndim != 5:
            raise ValueError(f"latents must be [B, F, h, w, C], got shape {z.shape}")
        cache = self.init_decode_cache(z.shape[0], z.shape[2], z.shape[3])
        _, frames = _run_chunks(
            lambda c, x: self.decode_chunk(c, x, normalize=normalize), cache, z, chunk_latents
        )
        return frames[:, self.lead_frames :]


def _run_chunks(step: Callable, cache, stream: jax.Array, chunk: int):
    """Apply `step(cache, x) -> (cache, y)` over chunks of `chunk` frames along axis 1.

    Full chunks go through one `jax.lax.scan`; a shorter remainder gets one more call. The
    outputs (arrays or tuples of arrays, time on axis 1) are concatenated along time.
    """
    if chunk < 1:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    n_full, rem = divmod(stream.shape[1], chunk)
    outs = []
    if n_full:
        xs = stream[:, : n_full * chunk].reshape(stream.shape[0], n_full, chunk, *stream.shape[2:])
        xs = jnp.moveaxis(xs, 1, 0)  # [n, B, chunk, ...]
        cache, ys = jax.lax.scan(step, cache, xs)
        # [n, B, c, ...] -> [B, n * c, ...]
        outs.append(jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:]), ys))
    if rem:
        cache, y = step(cache, stream[:, n_full * chunk :])
        outs.append(y)
    out = jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *outs) if len(outs) > 1 else outs[0]
    return cache, out


# --------------------------------------------------------------------------------------------
# PatchCodec: parameter-free space-to-depth with the same streaming interface
# --------------------------------------------------------------------------------------------


@functools.cache
def _hadamard(n: int) -> np.ndarray:
    """Orthonormal (and symmetric) Sylvester-Hadamard matrix, n a power of two."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


PATCH_PROJECTIONS = ("none", "hadamard")


@dataclasses.dataclass(frozen=True)
class PatchCodecConfig:
    """`config.vae.patch`: the fixed PatchCodec (`config.vae.kind='patch'`). Its latent channels
    are the DiT's `in_channels` (`config.model.in_channels`)."""

    patch: int = 2  # p x p pixel patches
    projection: str = "hadamard"  # none | hadamard (mix the channels by a fixed orthonormal matrix)

    def __post_init__(self):
        if self.patch < 1:
            raise ValueError(f"config.vae.patch.patch: must be >= 1, got {self.patch}")
        if self.projection not in PATCH_PROJECTIONS:
            raise ValueError(
                f"config.vae.patch.projection: unknown {self.projection!r}; choose from {PATCH_PROJECTIONS}"
            )

    def codec(self, latent_channels: int) -> PatchCodec:
        return PatchCodec(self.patch, latent_channels, self.projection)


class PatchCodec(nnx.Module):
    """A fixed codec: p x p pixel patches -> channels (zero-padded to `latent_channels`), times a
    fixed orthonormal Hadamard matrix ('hadamard') or not ('none'); decode is the exact inverse.

    Differences from the Wan VAE: no parameters; spatial factor p; temporal factor 1 (one latent
    frame <-> one video frame, no padding frames, `lead_frames == 0`); `normalize` is accepted and
    ignored; decode clamps to [-1, 1] (so in-range videos round-trip exactly, bitwise with
    'none', to fp32 round-off with 'hadamard'). Latent channels beyond 3 p^2 are a null space:
    decode drops what a generator puts there.
    """

    PROJECTIONS = PATCH_PROJECTIONS

    def __init__(
        self, patch: int = 2, latent_channels: int = 16, projection: str = "hadamard", pixel_channels=3
    ):
        raw = pixel_channels * patch * patch
        if latent_channels < raw:
            raise ValueError(f"latent_channels={latent_channels} < {pixel_channels} x {patch}^2 = {raw}")
        if projection not in self.PROJECTIONS:
            raise ValueError(f"projection {projection!r}; expected one of {self.PROJECTIONS}")
        if projection == "hadamard" and latent_channels & (latent_channels - 1):
            raise ValueError(f"'hadamard' needs a power-of-two latent_channels, got {latent_channels}")
        self.patch, self.latent_channels, self.projection = patch, latent_channels, projection
        self.pixel_channels = pixel_channels

    z_dim = property(lambda self: self.latent_channels)
    spatial_factor = property(lambda self: self.patch)
    temporal_factor = 1
    lead_frames = 0

    def _project(self, x, inverse: bool):
        if self.projection == "none":
            return x
        h = jnp.asarray(_hadamard(self.latent_channels), x.dtype)  # symmetric: its own inverse
        return jnp.einsum("BTHWC,CD->BTHWD", x, h, precision=jax.lax.Precision.HIGHEST)

    def init_encode_cache(self, batch: int, height: int, width: int) -> CodecCache:
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"frame size {height}x{width} must be divisible by the patch size {p}")
        return CodecCache({}, jnp.zeros((), jnp.int32), batch, (height // p, width // p))

    def init_decode_cache(self, batch: int, latent_h: int, latent_w: int) -> CodecCache:
        return CodecCache({}, jnp.zeros((), jnp.int32), batch, (latent_h, latent_w))

    def encode_chunk(self, cache, frames, *, normalize=True, return_logvar=False):
        # frames [B, T, H, W, C] -> z [B, T, H/p, W/p, latent_channels]
        del normalize
        _check_chunk(cache, frames, self.pixel_channels, self.patch, "frames")
        b, t, hh, ww, c = frames.shape
        p = self.patch
        x = frames.reshape(b, t, hh // p, p, ww // p, p, c)
        x = jnp.transpose(x, (0, 1, 2, 4, 3, 5, 6)).reshape(b, t, hh // p, ww // p, p * p * c)
        x = jnp.pad(x, ((0, 0),) * 4 + ((0, self.latent_channels - p * p * c),))
        z = self._project(x, inverse=False)
        out = (z, jnp.full_like(z, -jnp.inf)) if return_logvar else z  # a deterministic "posterior"
        return cache.replace(num_chunks=cache.num_chunks + 1), out

    def decode_chunk(self, cache, z, *, normalize=True):
        # z [B, F, h, w, latent_channels] -> frames [B, F, h p, w p, C]
        del normalize
        _check_chunk(cache, z, self.latent_channels, 1, "latents")
        b, t, h, w, _ = z.shape
        p, c = self.patch, self.pixel_channels
        x = self._project(z, inverse=True)[..., : p * p * c]
        x = jnp.transpose(x.reshape(b, t, h, w, p, p, c), (0, 1, 2, 4, 3, 5, 6)).reshape(
            b, t, h * p, w * p, c
        )
        return cache.replace(num_chunks=cache.num_chunks + 1), jnp.clip(x, -1.0, 1.0)

    def encode(self, video, *, normalize=True, chunk_latents: int = 1, return_logvar=False):
        cache = self.init_encode_cache(video.shape[0], video.shape[2], video.shape[3])
        return self.encode_chunk(cache, video, return_logvar=return_logvar)[1]

    def decode(self, z, *, normalize=True, chunk_latents: int = 1):
        cache = self.init_decode_cache(z.shape[0], z.shape[2], z.shape[3])
        return self.decode_chunk(cache, z)[1]

    def num_frames(self, num_latents: int) -> int:
        return num_latents

    def num_latents(self, num_frames: int) -> int:
        return num_frames


# --------------------------------------------------------------------------------------------
# Functional API (graphdef, params) for jitted programs
# --------------------------------------------------------------------------------------------


def _abstract_model(model_or_config):
    if isinstance(model_or_config, (WanVAE, PatchCodec)):
        return model_or_config
    if isinstance(model_or_config, WanVAEConfig):
        return nnx.eval_shape(lambda: WanVAE(model_or_config, rngs=nnx.Rngs(0)))
    if isinstance(model_or_config, nnx.GraphDef):
        raise TypeError("pass the model or its config, not a graphdef: init caches need no params")
    raise TypeError(f"expected a WanVAE, PatchCodec or WanVAEConfig, got {type(model_or_config).__name__}")


def init_decode_cache(model_or_config, batch: int, latent_h: int, latent_w: int) -> CodecCache:
    """Zero decode cache (model, abstract model or WanVAEConfig; no params are read)."""
    return _abstract_model(model_or_config).init_decode_cache(batch, latent_h, latent_w)


def init_encode_cache(model_or_config, batch: int, height: int, width: int) -> CodecCache:
    """Zero encode cache for frames of height x width pixels."""
    return _abstract_model(model_or_config).init_encode_cache(batch, height, width)


def decode_chunk(graphdef, params, cache: CodecCache, z: jax.Array, *, normalize: bool = True):
    """(cache, z[B, Fz, h, w, z]) -> (cache, frames[B, f*Fz, H, W, 3]); see the module docstring."""
    return nnx.merge(graphdef, params).decode_chunk(cache, z, normalize=normalize)


def encode_chunk(
    graphdef, params, cache: CodecCache, frames: jax.Array, *, normalize=True, return_logvar=False
):
    """(cache, frames[B, f*Fz, H, W, 3]) -> (cache, mu[B, Fz, h, w, z])."""
    return nnx.merge(graphdef, params).encode_chunk(
        cache, frames, normalize=normalize, return_logvar=return_logvar
    )


def decode(graphdef, params, z: jax.Array, *, normalize: bool = True, chunk_latents: int = 1):
    """z[B, F, h, w, z] -> frames[B, 1 + f (F - 1), H, W, 3]."""
    return nnx.merge(graphdef, params).decode(z, normalize=normalize, chunk_latents=chunk_latents)


def encode(
    graphdef, params, video: jax.Array, *, normalize=True, chunk_latents: int = 1, return_logvar=False
):
    """video[B, 1 + f k, H, W, 3] -> mu[B, 1 + k, h, w, z]."""
    model = nnx.merge(graphdef, params)
    return model.encode(video, normalize=normalize, chunk_latents=chunk_latents, return_logvar=return_logvar)


# --------------------------------------------------------------------------------------------
# Weight conversion tables
# --------------------------------------------------------------------------------------------


def conv3d_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv3d weight [out, in, kt, kh, kw] -> our kernel [kt, kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 4, 1, 0))


def conv2d_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> our kernel [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def conv1x1_matrix(w: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d weight [out, in, 1, 1] -> our matrix [in, out]."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight [out, in, 1, 1], got {w.shape}")
    return w[:, :, 0, 0].T


def norm_gamma(w: np.ndarray) -> np.ndarray:
    """torch RMS_norm gamma [C, 1, 1(, 1)] -> [C]."""
    return w.reshape(w.shape[0])


def _conv_rules(src: str, dst: str, kernel: Callable = conv3d_kernel) -> list[Rule]:
    return [Rule(src + r"\.weight", dst + "/kernel", kernel), Rule(src + r"\.bias", dst + "/bias", identity)]


def _norm_rule(src: str, dst: str) -> list[Rule]:
    return [Rule(src + r"\.gamma", dst + "/gamma", norm_gamma)]


_RES_LEAVES = {  # our name -> (diffusers name, original name)
    "norm1": ("norm1", r"residual\.0"),
    "conv1": ("conv1", r"residual\.2"),
    "norm2": ("norm2", r"residual\.3"),
    "conv2": ("conv2", r"residual\.6"),
    "conv_shortcut": ("conv_shortcut", "shortcut"),
}


def _resblock_rules(src: str, dst: str, layout: int) -> list[Rule]:
    rules = []
    for ours, names in _RES_LEAVES.items():
        s, d = f"{src}\\.{names[layout]}", f"{dst}/{ours}"
        rules += _norm_rule(s, d) if ours.startswith("norm") else _conv_rules(s, d)
    return rules


def _resample_rules(src: str, dst: str) -> list[Rule]:
    return _conv_rules(src + r"\.resample\.1", dst + "/spatial_conv", conv2d_kernel) + _conv_rules(
        src + r"\.time_conv", dst + "/time_conv"
    )


def _mid_rules(src: str, dst: str, layout: int) -> list[Rule]:
    res = (r"resnets\.0", r"resnets\.1") if layout == 0 else (r"0", r"2")
    attn = r"attentions\.0" if layout == 0 else r"1"
    rules = _resblock_rules(f"{src}\\.{res[0]}", f"{dst}/resnets/0", layout)
    rules += _resblock_rules(f"{src}\\.{res[1]}", f"{dst}/resnets/1", layout)
    a, d = f"{src}\\.{attn}", f"{dst}/attention"
    rules += _norm_rule(a + r"\.norm", d + "/norm")
    rules += [
        Rule(a + r"\.to_qkv\.weight", d + "/to_qkv_kernel", conv1x1_matrix),
        Rule(a + r"\.to_qkv\.bias", d + "/to_qkv_bias", identity),
        Rule(a + r"\.proj\.weight", d + "/proj_kernel", conv1x1_matrix),
        Rule(a + r"\.proj\.bias", d + "/proj_bias", identity),
    ]
    return rules


def conversion_rules(layout: str, config: WanVAEConfig | None = None) -> list[Rule]:
    """torch key regex -> our parameter path, for `convert.convert_to_state`.

    layout 'diffusers': `AutoencoderKLWan.state_dict()` (needs no config).
    layout 'original': `Wan2.1_VAE.pth` (WanVAE_ keys: encoder.conv1, encoder.downsamples.N,
      encoder.middle.{0,1,2}, encoder.head.{0,2}, conv1, conv2, decoder.conv1,
      decoder.middle.{0,1,2}, decoder.upsamples.N, decoder.head.{0,2}). The decoder's flat
      `upsamples.N` index depends on num_res_blocks and the number of stages, read from `config`
      (default: Wan2.1's).
    """
    if layout not in ("diffusers", "original"):
        raise ValueError(f"unknown VAE checkpoint layout {layout!r}; expected 'diffusers' or 'original'")
    lay = 0 if layout == "diffusers" else 1
    rules: list[Rule] = []
    if lay == 0:
        rules += _conv_rules(r"encoder\.conv_in", "encoder/conv_in")
        down = r"encoder\.down_blocks\.(\d+)"
        rules += _resample_rules(down, r"encoder/down_blocks/\1")
        rules += _resblock_rules(down, r"encoder/down_blocks/\1", lay)
        rules += _mid_rules(r"encoder\.mid_block", "encoder/mid_block", lay)
        rules += _norm_rule(r"encoder\.norm_out", "encoder/norm_out")
        rules += _conv_rules(r"encoder\.conv_out", "encoder/conv_out")
        rules += _conv_rules(r"quant_conv", "quant_conv") + _conv_rules(r"post_quant_conv", "post_quant_conv")
        rules += _conv_rules(r"decoder\.conv_in", "decoder/conv_in")
        rules += _mid_rules(r"decoder\.mid_block", "decoder/mid_block", lay)
        up = r"decoder\.up_blocks\.(\d+)"
        rules += _resblock_rules(up + r"\.resnets\.(\d+)", r"decoder/up_blocks/\1/resnets/\2", lay)
        rules += _resample_rules(up + r"\.upsamplers\.0", r"decoder/up_blocks/\1/upsampler")
        rules += _norm_rule(r"decoder\.norm_out", "decoder/norm_out")
        rules += _conv_rules(r"decoder\.conv_out", "decoder/conv_out")
        return rules
    cfg = config or WanVAEConfig()
    rules += _conv_rules(r"encoder\.conv1", "encoder/conv_in")
    down = r"encoder\.downsamples\.(\d+)"
    rules += _resample_rules(down, r"encoder/down_blocks/\1")
    rules += _resblock_rules(down, r"encoder/down_blocks/\1", lay)
    rules += _mid_rules(r"encoder\.middle", "encoder/mid_block", lay)
    rules += _norm_rule(r"encoder\.head\.0", "encoder/norm_out")
    rules += _conv_rules(r"encoder\.head\.2", "encoder/conv_out")
    rules += _conv_rules(r"conv1", "quant_conv") + _conv_rules(r"conv2", "post_quant_conv")
    rules += _conv_rules(r"decoder\.conv1", "decoder/conv_in")
    rules += _mid_rules(r"decoder\.middle", "decoder/mid_block", lay)
    # decoder.upsamples is flat: per stage, num_res_blocks + 1 residual blocks then a resampler.
    n = 0
    for stage in range(len(cfg.dim_mult)):
        for j in range(cfg.num_res_blocks + 1):
            rules += _resblock_rules(
                rf"decoder\.upsamples\.{n}", f"decoder/up_blocks/{stage}/resnets/{j}", lay
            )
            n += 1
        if stage != len(cfg.dim_mult) - 1:
            rules += _resample_rules(rf"decoder\.upsamples\.{n}", f"decoder/up_blocks/{stage}/upsampler")
            n += 1
    rules += _norm_rule(r"decoder\.head\.0", "decoder/norm_out")
    rules += _conv_rules(r"decoder\.head\.2", "decoder/conv_out")
    return rules


# Keys of VAE checkpoints that carry no parameters of ours (none known for Wan2.1's VAE).
IGNORED_KEYS: tuple[str, ...] = ()


def detect_layout(keys) -> str:
    """'diffusers' (AutoencoderKLWan) or 'original' (Wan2.1_VAE.pth) from the torch key names."""
    keys = set(keys)
    if any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.", "quant_conv.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("decoder.upsamples.", "encoder.downsamples.", "decoder.head.")) for k in keys):
        return "original"
    raise ValueError("cannot tell the VAE checkpoint layout (neither Wan2.1 'original' nor 'diffusers' keys)")


def abstract_model(config: WanVAEConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) of a WanVAE without allocating anything."""
    config = config or WanVAEConfig()
    return nnx.split(nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0))))


def load_wan_vae(path: str, config: WanVAEConfig | None = None, layout: str | None = None) -> WanVAE:
    """Build a WanVAE and fill it from a torch checkpoint (layout guessed from the keys if None)."""
    from adastate_jax.models import convert

    config = config or WanVAEConfig()
    source = convert.open_torch_checkpoint(path)
    layout = layout or detect_layout(source.keys())
    graphdef, abstract_state = abstract_model(config)
    state = convert.convert_to_state(
        source, conversion_rules(layout, config), abstract_state, ignore=IGNORED_KEYS
    )
    return nnx.merge(graphdef, state)


def param_paths(model: WanVAE) -> list[str]:
    """Our parameter paths ('/'-joined), e.g. for writing new conversion tables."""
    from adastate_jax.models.convert import flatten_target

    return list(flatten_target(nnx.state(model, nnx.Param)))


def describe_cache(cache: CodecCache) -> dict[str, tuple[int, ...]]:
    """Flat 'path' -> shape of a cache's conv entries (for debugging / docs)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache.convs)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = tuple(leaf.shape)
    return flat


__all__ = [
    "CodecCache",
    "PatchCodec",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WanVAE",
    "IGNORED_KEYS",
    "WanVAEConfig",
    "abstract_model",
    "conversion_rules",
    "decode",
    "decode_chunk",
    "describe_cache",
    "detect_layout",
    "encode",
    "encode_chunk",
    "init_decode_cache",
    "init_encode_cache",
    "load_wan_vae",
    "param_paths",
]
