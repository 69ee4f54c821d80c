"""Segmented scan rollout: K chunks per compiled scan give the bits of one scan and of the generator."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import wan
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig
from tests.subproc import USER_NUMERICS

LAT = 4


@pytest.fixture(scope="module")
def model():
    cfg = wan.WanConfig.tiny(zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (2, 2, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


POLICIES = {
    "adastate": dict(anchor="adastate"),
    "sink_recache": dict(anchor="sink", sink_frames=3, window_frames=3, recache="window_causal"),
}


@pytest.fixture(scope="module")
def streamers(model):
    """One instrumented Streamer per policy, shared so that each program compiles once per module;
    compiled as users' programs are (their bits are the claim: tests/subproc.py `USER_NUMERICS`)."""
    cfg, graphdef, _, _ = model
    smp = SamplerConfig(denoising_steps=(1000, 750, 500))
    return {
        name: Streamer(
            graphdef,
            cfg,
            StreamConfig(latent_h=LAT, latent_w=LAT, **kw),
            smp,
            instrument=True,
            compiler_options=USER_NUMERICS,
        )
        for name, kw in POLICIES.items()
    }


def _drain(gen):
    """(list of yielded items, the generator's return value)."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


# K = 3 over 7 chunks: segments [0..2] [3..5] [6] (a partial last one). Switches at chunk 1 (inside
# the first segment), 3 (on the boundary: first chunk of the second segment) and 5 (inside it).
SCHEDULE = [0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_segments_equal_one_scan_and_the_generator_bit_for_bit(model, streamers, policy):
    _, _, params, prompts = model
    st = streamers[policy]
    new_carry = lambda: st.init_carry(params, prompts, jax.random.key(3))  # noqa: E731

    carry_scan, ref = st.jit_rollout(params, new_carry(), jnp.asarray(SCHEDULE), prompts)
    segments, carry_seg = _drain(
        st.rollout_segments(params, new_carry(), SCHEDULE, prompts, segment_chunks=3)
    )
    live, carry_gen = _drain(st.stream(params, new_carry(), SCHEDULE, prompts))

    assert [s.start for s in segments] == [0, 3, 6]
    assert [s.num_chunks for s in segments] == [3, 3, 1]
    for name in ("latents", "state", "positions", "key_valid", "key_mass"):
        seg = np.concatenate([np.asarray(getattr(s.outs, name)) for s in segments])
        gen = np.stack([np.asarray(getattr(o, name)) for o in live])
        np.testing.assert_array_equal(seg, np.asarray(getattr(ref, name)), err_msg=name)
        np.testing.assert_array_equal(gen, np.asarray(getattr(ref, name)), err_msg=name)
    for a, b, c in zip(jax.tree.leaves(carry_scan), jax.tree.leaves(carry_seg), jax.tree.leaves(carry_gen)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    assert int(carry_seg.chunk) == len(SCHEDULE)  # the skipped tail of the last segment committed nothing


def test_partial_last_segment_reuses_the_compiled_segment(model, streamers):
    """7 chunks in segments of 3 (3 + 3 + 1) and 2 chunks (a lone partial) share one program."""
    _, _, params, prompts = model
    st = streamers["adastate"]
    _drain(
        st.rollout_segments(params, st.init_carry(params, prompts, jax.random.key(0)), [0] * 3, prompts, 3)
    )
    compiled = st.jit_segment._cache_size()
    _drain(
        st.rollout_segments(params, st.init_carry(params, prompts, jax.random.key(0)), SCHEDULE, prompts, 3)
    )
    _drain(st.rollout_segments(params, st.init_carry(params, prompts, jax.random.key(0)), [0, 1], prompts, 3))
    assert st.jit_segment._cache_size() == compiled


def test_segments_stream_an_unbounded_schedule_until_the_caller_stops(model, streamers):
    _, _, params, prompts = model
    st = streamers["adastate"]
    gen = st.rollout_segments(
        params, st.init_carry(params, prompts, jax.random.key(0)), itertools.repeat(0), prompts, 3
    )
    starts = [next(gen).start for _ in range(4)]
    gen.close()
    assert starts == [0, 3, 6, 9]


def test_bad_schedule_entry_is_named_after_the_segments_before_it(model, streamers):
    _, _, params, prompts = model
    st = streamers["adastate"]
    gen = st.rollout_segments(
        params, st.init_carry(params, prompts, jax.random.key(0)), [0, 0, 1, 0, 0, 9], prompts, 3
    )
    assert next(gen).num_chunks == 3  # chunks 0-2 are delivered before the error
    with pytest.raises(ValueError, match="prompt schedule entry 5 is 9, out of range for 2 prompts"):
        next(gen)
    with pytest.raises(ValueError, match="segment_chunks must be >= 1"):
        next(st.rollout_segments(params, st.init_carry(params, prompts, jax.random.key(0)), [0], prompts, 0))
