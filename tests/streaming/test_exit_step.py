"""`Streamer.step(exit_step=j)`: one program for every exit step, equal to a truncated denoising list."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import wan
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig
from tests.subproc import TOLERANT_COMPILE

LAT = 4
STEPS = (1000, 700, 400)


@pytest.fixture(scope="module")
def model():
    cfg = wan.WanConfig.tiny(dim=32, num_heads=2, num_layers=1, ffn_dim=64, zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (2, 2, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


def _streamer(model, steps=STEPS, anchor="adastate", instrument=False, **smp):
    cfg, graphdef, _, _ = model
    sc = StreamConfig(latent_h=LAT, latent_w=LAT, anchor=anchor, window_frames=3)
    return Streamer(graphdef, cfg, sc, SamplerConfig(denoising_steps=steps, **smp), instrument=instrument)


def _rollout_fn(st, with_exit):
    def f(params, prompts, exit_step):
        carry = st.init_carry(params, prompts, jax.random.key(3))
        return st.rollout(
            params, carry, jnp.array([0, 0, 1]), prompts, exit_step=exit_step if with_exit else None
        )

    return jax.jit(f, compiler_options=TOLERANT_COMPILE)  # compared within a tolerance (`_close`)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=what)


@pytest.mark.parametrize(
    "anchor, smp",
    [
        ("adastate", {}),
        # the context noise of the training refresh is the exit step's next noise
        ("sink", dict(context_noise=100.0, refresh_noise="add")),
        ("window", dict(guidance_scale=3.0)),  # two branches
    ],
    ids=["adastate", "sink_context_noise", "window_guidance"],
)
def test_exit_step_equals_truncated_denoising_list(model, anchor, smp):
    _, _, params, prompts = model
    full = _rollout_fn(_streamer(model, anchor=anchor, instrument=True, **smp), True)
    outs_by_exit = []
    for j in range(len(STEPS)):
        carry, outs = full(params, prompts, jnp.int32(j))
        trunc = _rollout_fn(_streamer(model, STEPS[: j + 1], anchor=anchor, instrument=True, **smp), False)
        carry_t, outs_t = trunc(params, prompts, None)
        for name in ("latents", "state", "key_mass"):
            _close(getattr(outs, name), getattr(outs_t, name), f"exit {j}: ChunkOut.{name}")
        for name in ("k", "v", "latents", "state", "valid", "frame_idx", "num_frames"):
            _close(getattr(carry, name), getattr(carry_t, name), f"exit {j}: committed carry.{name}")
        outs_by_exit.append(np.asarray(outs.latents))
    # the exit matters (not a no-op argument)
    for j in range(1, len(STEPS)):
        assert np.abs(outs_by_exit[j] - outs_by_exit[j - 1]).max() > 1e-3


def test_last_exit_step_equals_all_steps(model):
    _, _, params, prompts = model
    st = _streamer(model)
    _, outs = _rollout_fn(st, True)(params, prompts, jnp.int32(len(STEPS) - 1))
    _, outs_none = _rollout_fn(st, False)(params, prompts, None)
    _close(outs.latents, outs_none.latents, "exit n-1 vs None")


def test_one_compiled_program_serves_every_exit_step(model):
    _, _, params, prompts = model
    f = _rollout_fn(_streamer(model), True)
    for j in range(len(STEPS)):
        f(params, prompts, jnp.int32(j))
    assert f._cache_size() == 1


def test_gradient_through_exit_step_equals_truncated_list(model):
    """The cond skips the later steps in the backward pass too: the gradient of a loss on the
    rollout with exit j is the truncated streamer's gradient (and differs between exits)."""
    _, _, params, prompts = model

    def loss_fn(st, with_exit):
        def loss(p, j):
            carry = st.init_carry(p, prompts, jax.random.key(3))
            _, outs = st.rollout(
                p, carry, jnp.zeros((2,), jnp.int32), prompts, exit_step=j if with_exit else None
            )
            return jnp.mean(jnp.square(outs.latents[1]))  # chunk 1: through chunk 0's commit too

        return jax.jit(jax.grad(loss), compiler_options=TOLERANT_COMPILE)

    g_full = loss_fn(_streamer(model), True)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    grads = []
    for j in (0, 1):
        g = flat(g_full(params, jnp.int32(j)))
        g_t = flat(loss_fn(_streamer(model, STEPS[: j + 1]), False)(params, None))
        np.testing.assert_allclose(g, g_t, rtol=1e-4, atol=1e-6 * np.abs(g_t).max())
        grads.append(g)
    assert np.abs(grads[0] - grads[1]).max() > 1e-3 * np.abs(grads[1]).max()


def test_noise_of_a_step_does_not_depend_on_the_list_length():
    """What the equality above relies on: key i of `split(key, n + 1)` is the same for every n."""
    key = jax.random.key(7)
    long = jax.random.key_data(jax.random.split(key, 5))
    short = jax.random.key_data(jax.random.split(key, 2))
    np.testing.assert_array_equal(long[:2], short)
