"""Accelerator checks (GPU only; skipped elsewhere): the fp32 model on the GPU equals the CPU one,
bf16 compute and cuDNN flash attention stay within bf16 round-off of it, and a cached streaming
rollout on the GPU equals the same rollout on the CPU.

Run on a GPU machine with `python -m pytest -q -m gpu tests/models/test_gpu.py` (see README, Tests).
Shapes use head_dim 64 (cuDNN needs a multiple of 8 and bf16/fp16 inputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import attention as attn
from adastate_jax.models import wan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU (jax.devices())"
    ),
]

CFG = wan.WanConfig.tiny(
    dim=128, num_heads=2, num_layers=2, ffn_dim=256, zero_init_head=False, text_len=16, text_dim=32
)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(f=6, b=2, h=8, w=8):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (b, f, h, w, CFG.in_channels))
    t = jax.random.uniform(k[1], (b, f), minval=0, maxval=1000)
    text = jax.random.normal(k[2], (b, CFG.text_len, CFG.text_dim))
    return x, t, text


def _forward_on(device, cfg, params, x, t, text, mask):
    graphdef = nnx.split(wan.create_model(cfg, seed=0))[0]
    put = lambda tree: jax.device_put(tree, device)  # noqa: E731
    fn = jax.jit(lambda p, x, t, tx: wan.forward(graphdef, p, x, t, tx, jnp.arange(x.shape[1]), None, mask))
    return jax.device_get(fn(put(params), put(x), put(t), put(text)).velocity)


@pytest.fixture(scope="module")
def setup():
    params = nnx.split(wan.create_model(CFG, seed=0))[1]
    params = jax.device_get(params)
    return params, _inputs()


@pytest.mark.parametrize("mask_kind", ["none", "block_causal"])
def test_fp32_gpu_matches_cpu(setup, mask_kind):
    params, (x, t, text) = setup
    mask = None if mask_kind == "none" else attn.block_causal_mask(x.shape[1], 3)
    cpu = _forward_on(jax.devices("cpu")[0], CFG, params, x, t, text, mask)
    gpu = _forward_on(jax.devices("gpu")[0], CFG, params, x, t, text, mask)
    # jax_default_matmul_precision='highest' (tests/conftest.py): no TF32 on the GPU side
    assert _rel(gpu, cpu) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
@pytest.mark.parametrize("mask_kind", ["none", "block_causal"])
def test_bf16_gpu_close_to_fp32(setup, impl, mask_kind):
    params, (x, t, text) = setup
    mask = None if mask_kind == "none" else attn.block_causal_mask(x.shape[1], 3)
    ref = _forward_on(jax.devices("cpu")[0], CFG, params, x, t, text, mask)
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16", attention=impl)
    out = _forward_on(jax.devices("gpu")[0], cfg16, params, x, t, text, mask)
    err = _rel(out, ref)
    print(f"bf16 {impl} {mask_kind}: rel. err {err:.2e}")
    assert err < 3e-2


def test_cudnn_attention_matches_xla_in_bf16():
    k = jax.random.split(jax.random.key(1), 3)
    q, kk, v = (jax.random.normal(ki, (2, 384, 2, 64), jnp.bfloat16) for ki in k)
    gpu = jax.devices("gpu")[0]
    q, kk, v = jax.device_put((q, kk, v), gpu)
    ref = jax.jit(lambda *a: attn.attention(*a, implementation="reference"))(q, kk, v)
    out = jax.jit(lambda *a: attn.attention(*a, implementation="cudnn"))(q, kk, v)
    assert _rel(out.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("policy", ["window", "adastate"])
def test_streaming_rollout_gpu_matches_cpu(setup, policy):
    from adastate_jax.streaming.anchors import StreamConfig
    from adastate_jax.streaming.rollout import Streamer
    from adastate_jax.streaming.sampler import SamplerConfig

    params, (_, _, text) = setup
    graphdef = nnx.split(wan.create_model(CFG, seed=0))[0]
    sc = StreamConfig(anchor=policy, chunk_frames=2, window_frames=2, latent_h=8, latent_w=8, batch_size=2)
    streamer = Streamer(graphdef, CFG, sc, SamplerConfig(denoising_steps=(1000, 500)))
    outs = []
    for device in (jax.devices("cpu")[0], jax.devices("gpu")[0]):
        with jax.default_device(device):
            p = jax.device_put(params, device)
            prompts = jax.device_put(text[None], device)
            carry = streamer.init_carry(p, prompts, jax.random.key(0))
            _, out = streamer.jit_rollout(p, carry, jnp.zeros((5,), jnp.int32), prompts)
            outs.append(jax.device_get(out.latents))
    assert _rel(outs[1], outs[0]) < 1e-4
