"""Splash attention (the Pallas TPU kernel, interpret mode on CPU) computes the reference attention:
outputs and gradients for every training mask kind and the streaming key validity, with padding,
grouped heads and a sharded mesh; and the whole model gives the 'xla' model's outputs with it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import sharding as shd
from adastate_jax.models import attention as attn
from adastate_jax.models import wan

TILES = attn.SplashBlocks(q=128, kv=128, kv_compute=128, q_bwd=128, kv_bwd=128)  # several tiles per axis


def _normal(seed, *shape):
    """Float32 normal samples from numpy (eager jax.random ops would each compile a program)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _qkv(seed, b, t, s, n, nk, h):
    return _normal(seed, b, t, n, h), _normal(seed + 1, b, s, nk, h), _normal(seed + 2, b, s, nk, h)


def _reference(q, k, v, token_mask):
    """The dense einsum attention, key heads repeated for grouped queries."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return attn.attention(q, k, v, token_mask, "reference")


def _value_and_grads(fn, q, k, v):
    """Outputs and the gradients of a fixed random projection of them, in one jit."""
    w = _normal(9, *q.shape)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def _assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=2e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


# Each case: a training frame mask, tokens per frame not a multiple of the 128-token tiles (so the
# sequences are padded), and a head layout. Multi-tile grids make the kernel skip empty tiles and
# read partial mask tiles.
CASES = {
    # 7 frames of 50 tokens (350 -> 384): three chunks, tiles straddling frame edges
    "block_causal": dict(mask=lambda: attn.block_causal_mask(7, 3), p=50, n=2, nk=2),
    # grouped queries: 4 query heads on 2 key heads
    "windowed_sink_gqa": dict(
        mask=lambda: attn.windowed_block_causal_mask(8, 2, window=2, sink=1), p=36, n=4, nk=2
    ),
    # [clean; noisy] of 5 frames with a window and a sink
    "teacher_forcing": dict(mask=lambda: attn.teacher_forcing_mask(5, 1, window=2, sink=1), p=30, n=2, nk=2),
}


@pytest.mark.parametrize("kind", CASES)
def test_splash_equals_reference_for_training_masks(kind):
    case = CASES[kind]
    fm, p = case["mask"](), case["p"]
    q, k, v = _qkv(0, 2, fm.shape[0] * p, fm.shape[1] * p, case["n"], case["nk"], 16)
    token_mask = attn.expand_frame_mask(jnp.asarray(fm)[None], p, p)
    got = _value_and_grads(lambda q, k, v: attn.splash_attention(q, k, v, fm, p, p, blocks=TILES), q, k, v)
    _assert_same(got, _value_and_grads(lambda q, k, v: _reference(q, k, v, token_mask), q, k, v))


def test_splash_equals_reference_with_traced_key_validity_on_a_mesh():
    """Streaming: every query sees the valid cached keys and its own; the validity is traced (a
    jit argument) and goes in as segment ids. Run under a (data 2, fsdp 2, tensor 2) mesh: batch 2
    splits over `data` only (fsdp does not divide what is left), heads over `tensor`."""
    b, n, p, ctx_frames, own_frames = 2, 2, 40, 4, 2
    s, t = (ctx_frames + own_frames) * p, own_frames * p
    q, k, v = _qkv(1, b, t, s, n, n, 16)
    ctx_valid = np.array([[True, False, True, False], [False, False, True, True]])
    key_valid = np.repeat(np.concatenate([ctx_valid, np.ones((b, own_frames), bool)], axis=1), p, axis=1)
    key_valid = jnp.asarray(key_valid)  # [B, S]

    def splash(q, k, v, valid):
        return attn.splash_attention(q, k, v, key_valid=valid, blocks=TILES)

    def reference(q, k, v, valid):
        return _reference(q, k, v, valid[:, None, None, :])

    def value_and_grads(fn):
        w = _normal(9, *q.shape)
        grad = jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m) * w), argnums=(0, 1, 2))
        return jax.jit(lambda q, k, v, m: (fn(q, k, v, m), grad(q, k, v, m)))(q, k, v, key_valid)

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        got = value_and_grads(splash)
    _assert_same(got, value_and_grads(reference))


def test_token_mask_tiles_are_the_expanded_frame_mask_with_padding():
    fm = attn.teacher_forcing_mask(4, 2, window=2, sink=1)
    p, t_pad = 3, 32
    layout = attn.SplashLayout(attn.StaticMask.of(fm), p, p, t_pad, t_pad)
    dense = np.asarray(attn.expand_frame_mask(jnp.asarray(fm)[None], p, p))[0, 0]  # [24, 24]
    tile = layout.token_mask(slice(0, t_pad), slice(0, t_pad))
    real = fm.shape[0] * p
    np.testing.assert_array_equal(tile[:real, :real], dense)
    assert not tile[:real, real:].any()  # padded keys are invisible to real queries
    assert tile[real:].all()  # padded queries see everything (a finite softmax, dropped)
    np.testing.assert_array_equal(layout.token_mask(slice(8, 16), slice(5, 20)), tile[8:16, 5:20])


def test_tiles_shrink_to_short_sequences_and_pad_to_both_tiles():
    assert attn._fit_tiles(300, 512, 512) == (384, 384, 384)
    assert attn._fit_tiles(32760, 512, 512) == (512, 512, 32768)
    assert attn._fit_tiles(1000, 512, 256) == (512, 256, 1024)


def test_block_sizes_that_the_kernel_cannot_take_name_the_config_field():
    with pytest.raises(ValueError, match=r"config.model.splash_block_kv: must be a positive multiple of 128"):
        wan.WanConfig.tiny(splash_block_kv=100)
    with pytest.raises(ValueError, match=r"config.model.splash_block_kv_compute: 384 must divide"):
        wan.WanConfig.tiny(splash_block_kv_compute=384)


def test_splash_tiles_follow_the_config():
    cfg = wan.WanConfig.tiny(splash_block_q=256, splash_block_kv_bwd=1024, splash_fused_bwd=True)
    assert cfg.splash_blocks == attn.SplashBlocks(q=256, kv_bwd=1024, fused_bwd=True)


def test_a_query_frame_without_keys_is_an_error():
    fm = attn.block_causal_mask(3, 1)
    fm[2] = False
    q, k, v = _qkv(0, 1, 6, 6, 1, 1, 16)
    with pytest.raises(ValueError, match=r"query frame\(s\) \[2\] may attend to no key frame"):
        attn.splash_attention(q, k, v, fm, 2, 2)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(xla config, the same with splash and 128-token tiles, params) of a tiny random model."""
    cfg = wan.WanConfig.tiny(zero_init_head=False, num_heads=2)  # head dim 32
    splash_cfg = dataclasses.replace(
        cfg,
        attention="splash",
        splash_block_q=128,
        splash_block_kv=128,
        splash_block_kv_compute=128,
        splash_block_q_bwd=128,
        splash_block_kv_bwd=128,
    )
    params = jax.jit(lambda: nnx.split(wan.create_model(cfg, seed=1))[1])()  # one compile, not one per op
    return cfg, splash_cfg, params


def _inputs(cfg, b, f, hw=(10, 12), seed=0):
    x = _normal(seed, b, f, *hw, cfg.in_channels)  # 5 x 6 = 30 tokens per frame
    t = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1000.0, (b, f)), jnp.float32)
    text = _normal(seed + 1, b, cfg.text_len, cfg.text_dim)
    return x, t, text


def test_wan_forward_with_splash_equals_xla_for_diffusion_forcing(tiny):
    cfg, splash_cfg, params = tiny
    x, t, text = _inputs(cfg, 2, 6)
    mask = attn.block_causal_mask(6, 2)
    pos = jnp.arange(6)

    def run(c):
        gd = wan.abstract_model(c)[0]
        return jax.jit(lambda p: wan.forward(gd, p, x, t, text, pos, None, mask).velocity)(params)

    np.testing.assert_allclose(run(splash_cfg), run(cfg), rtol=1e-4, atol=1e-4)


def test_wan_forward_with_splash_equals_xla_for_a_streaming_context(tiny):
    cfg, splash_cfg, params = tiny
    b, s, f = 2, 4, 2
    x, t, text = _inputs(cfg, b, f, seed=1)
    p = 30
    shape = (cfg.num_layers, b, s, p, cfg.num_heads, cfg.head_dim)
    ctx_k, ctx_v = _normal(3, *shape), _normal(4, *shape)
    ctx_pos = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    ctx_valid = jnp.array([[True, True, False, True], [True, False, False, True]])

    def run(c):
        gd = wan.abstract_model(c)[0]

        @jax.jit
        def fwd(params, valid):  # validity traced, as in a scanned rollout
            ctx = wan.Context(ctx_k, ctx_v, ctx_pos, valid)
            return wan.forward(gd, params, x, t, text, jnp.array([4, 5]), ctx).velocity

        return fwd(params, ctx_valid)

    np.testing.assert_allclose(run(splash_cfg), run(cfg), rtol=1e-4, atol=1e-4)
