"""Prompt-switch re-cache (LongLive v1's rule and ours) and the cache-refresh noise convention.

The references are written from the upstream behaviour (anchors.py / sampler.py docstrings): a
LongLive re-cache is one forward of the re-run clean frames at t = context_noise under the new
prompt, every re-run frame seeing every other (no block mask), plus the kept sink as context when
`recache_global_sink` and the re-cache does not start at frame 0; the inference refresh feeds the
clean prediction labelled with timestep context_noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import wan
from adastate_jax.streaming import sampler
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig
from tests.subproc import USER_NUMERICS

LAT = 4  # 4 tokens per frame
SINK, WINDOW, CHUNK = 3, 6, 3  # LongLive's shipped layout: local attention 12
LOCAL = SINK + WINDOW + CHUNK
STEPS, CTX = (1000, 500), 50.0  # context noise > 0 throughout: re-cache and refresh at t = CTX


@pytest.fixture(scope="module")
def model():
    # two layers: the second layer's keys/values depend on the first layer's attention and prompt
    cfg = wan.WanConfig.tiny(dim=32, num_heads=2, num_layers=2, ffn_dim=64, zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (2, 1, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


_STREAMERS = {}


def _streamer(model, smp=None, compiler_options=(), **kw):
    """One Streamer per configuration for the whole module, so its jitted functions compile once."""
    cfg, graphdef, _, _ = model
    base = dict(anchor="sink", sink_frames=SINK, window_frames=WINDOW, chunk_frames=CHUNK)
    base.update(time_layout="absolute", latent_h=LAT, latent_w=LAT)
    base.update(kw)
    sc, smp = StreamConfig(**base), smp or SamplerConfig(denoising_steps=STEPS, context_noise=CTX)
    st = Streamer(graphdef, cfg, sc, smp, compiler_options=compiler_options)
    return _STREAMERS.setdefault(st, st)  # an equal Streamer (same configs and options) is reused


def _jit(st, name):
    """A jitted method of a cached Streamer."""
    key = (st.stream_cfg, st.sampler_cfg, name)
    if key not in _STREAMERS:
        _STREAMERS[key] = jax.jit(getattr(st, name))
    return _STREAMERS[key]


_forward = jax.jit(wan.forward, static_argnums=0)  # compiled once per shape for the module


def _close(a, b, what, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol, err_msg=what)


def _longlive_reference(model, st, carry, clean, new_prompt):
    """Independent statement of LongLive v1's re-cache at S = carry.num_frames.

    clean: [B, S, h, w, C] every clean frame emitted so far. Returns ({frame: (k, v)}, sink_kept).
    """
    _, graphdef, params, prompts = model
    sc = st.stream_cfg
    s = int(carry.num_frames)
    start = max(0, s - LOCAL)
    sink_kept = sc.recache_global_sink and start > 0  # LongLive protects the sink unless start == 0
    first = s - (WINDOW + CHUNK) if sink_kept else start
    frames = np.arange(first, s)
    if sc.time_layout == "absolute":
        pos = frames
    else:
        pos = SINK + WINDOW - (s - frames)
    ctx = None
    if sink_kept:  # the old sink's keys/values as context, at the sink's positions
        ctx = wan.Context(
            carry.k[:, :, :SINK], carry.v[:, :, :SINK], jnp.arange(SINK)[None], jnp.ones((1, SINK), bool)
        )
    t = jnp.full((1, len(frames)), st.sampler_cfg.context_noise, jnp.float32)
    out = _forward(graphdef, params, clean[:, frames], t, prompts[new_prompt], jnp.asarray(pos), ctx)
    return {int(g): (out.k[:, :, i], out.v[:, :, i]) for i, g in enumerate(frames)}, sink_kept


def _history(st, params, prompts, num_chunks, key=4):
    """The carry after `num_chunks` chunks of prompt 0, and every clean frame [B, S, h, w, C]."""
    carry = st.init_carry(params, prompts, jax.random.key(key))
    chunks = []
    for _ in range(num_chunks):
        carry, out = st.jit_step(params, carry, jnp.int32(0), prompts)  # donates the old carry
        chunks.append(out.latents)
    return carry, jnp.concatenate(chunks, axis=1)


# switch before chunk 3 (S = 9 <= 12: everything re-run, sink included), chunk 4 (S = 12, the
# boundary) and chunk 6 (S = 18 > 12: the sink kept, or rebuilt from frames 6-8)
CASES = [(True, 3), (True, 4), (True, 6), (False, 3), (False, 6)]


@pytest.mark.parametrize("global_sink, chunks", CASES, ids=[f"global_sink={g}-S={3 * c}" for g, c in CASES])
def test_longlive_recache_equals_one_bidirectional_forward_of_the_recent_frames(model, global_sink, chunks):
    _, _, params, prompts = model
    st = _streamer(model, recache="longlive", recache_global_sink=global_sink)
    carry, clean = _history(st, params, prompts, chunks)
    ref, sink_kept = _longlive_reference(model, st, carry, clean, new_prompt=1)

    after = _jit(st, "switch_prompt")(params, carry, jnp.int32(1), prompts)
    s = 3 * chunks
    for slot in range(SINK + WINDOW):
        g = int(after.frame_idx[slot])
        if slot < SINK and sink_kept:
            assert g == slot
            _close(after.k[:, :, slot], carry.k[:, :, slot], f"kept sink slot {slot}: k")
            continue
        if slot < SINK and s > LOCAL:  # rebuilt sink: the oldest re-run frames, their own index
            assert g == s - LOCAL + slot, (slot, g)
        if not bool(after.valid[slot]):
            continue
        _close(after.k[:, :, slot], ref[g][0], f"slot {slot} (frame {g}): k")
        _close(after.v[:, :, slot], ref[g][1], f"slot {slot} (frame {g}): v")
        _close(after.latents[:, slot], clean[:, g], f"slot {slot} (frame {g}): latents")
    assert int(after.valid.sum()) == min(s, SINK + WINDOW)
    # the re-cache is not a no-op, and (checked once) not the window_causal rule
    assert not np.allclose(np.asarray(after.k[:, :, SINK:]), np.asarray(carry.k[:, :, SINK:]), atol=1e-4)
    if global_sink and s > LOCAL:
        causal = _jit(_streamer(model, recache="window_causal"), "switch_prompt")
        other = causal(params, carry, jnp.int32(1), prompts)
        assert not np.allclose(np.asarray(after.k[:, :, SINK:]), np.asarray(other.k[:, :, SINK:]), atol=1e-4)


@pytest.mark.parametrize("global_sink", [True, False])
def test_chunk_after_switch_reads_the_recomputed_keys_values(model, global_sink):
    """The chunk generated after the switch equals one generated, without a switch, from a carry
    whose slots were filled by hand with the reference recomputation."""
    _, graphdef, params, prompts = model
    st = _streamer(model, recache="longlive", recache_global_sink=global_sink)
    chunks = 6
    carry, clean = _history(st, params, prompts, chunks)
    ref, sink_kept = _longlive_reference(model, st, carry, clean, new_prompt=1)
    s = 3 * chunks
    slots = list(range(SINK + WINDOW))
    frames = [int(g) for g in np.asarray(carry.frame_idx)]
    if not sink_kept:
        frames[:SINK] = [s - LOCAL + i for i in range(SINK)]
    k, v = carry.k, carry.v
    for slot, g in zip(slots, frames):
        if g in ref:
            k = k.at[:, :, slot].set(ref[g][0])
            v = v.at[:, :, slot].set(ref[g][1])
    by_hand = carry.replace(
        k=k,
        v=v,
        frame_idx=jnp.asarray(frames, jnp.int32),
        text=wan.encode_text(graphdef, params, prompts[1]),
        prompt_id=jnp.int32(1),
    )
    copy = lambda c: jax.tree.map(jnp.copy, c)  # noqa: E731  # jit_step donates its carry
    _, out = st.jit_step(params, copy(carry), jnp.int32(1), prompts)
    _, out_ref = st.jit_step(params, copy(by_hand), jnp.int32(1), prompts)
    _close(out.latents, out_ref.latents, "chunk after the switch", tol=1e-4)
    _close(out.positions, out_ref.positions, "positions the chunk saw", tol=0)


@pytest.mark.slow
def test_relative_layout_recache_is_the_absolute_one_shifted(model):
    """Without a kept sink only relative positions among the re-run frames matter (RoPE)."""
    _, _, params, prompts = model
    st = _streamer(model, recache="longlive", recache_global_sink=False, time_layout="relative")
    carry, clean = _history(st, params, prompts, 6)
    ref, _ = _longlive_reference(model, st, carry, clean, new_prompt=1)
    after = _jit(st, "switch_prompt")(params, carry, jnp.int32(1), prompts)
    for slot in range(SINK + WINDOW):
        g = int(after.frame_idx[slot])
        _close(after.k[:, :, slot], ref[g][0], f"slot {slot} (frame {g}): k", tol=1e-4)


def test_inference_refresh_feeds_the_clean_prediction_at_context_noise(model):
    _, graphdef, params, prompts = model
    key = jax.random.key(9)
    add = SamplerConfig(denoising_steps=STEPS, context_noise=CTX, refresh_noise="add")
    committed = {}
    for conv, st in (("none", _streamer(model, recache="longlive")), ("add", _streamer(model, add))):
        assert st.sampler_cfg.refresh_noise == conv
        carry, out = st.jit_step(params, st.init_carry(params, prompts, key), jnp.int32(0), prompts)
        committed[conv] = carry.k[:, :, :CHUNK]  # chunk 0 fills the sink slots
    x0 = out.latents  # both conventions denoise alike; only the refresh input differs
    t = jnp.full((1, CHUNK), CTX)
    clean = _forward(graphdef, params, x0, t, prompts[0], jnp.arange(CHUNK))
    _close(committed["none"], clean.k, "refresh 'none': k of the clean chunk at t=context_noise")
    # 'add' (training): x0 re-noised with the chunk's last key, (1 - s) x0 + s eps
    noise_key = jax.random.split(jax.random.fold_in(key, 0), len(STEPS) + 1)[-1]
    eps = jax.random.normal(noise_key, x0.shape)
    noised = _forward(
        graphdef, params, sampler.add_noise(x0, eps, CTX / 1000), t, prompts[0], jnp.arange(CHUNK)
    )
    _close(committed["add"], noised.k, "refresh 'add': k of the re-noised chunk")
    assert np.abs(np.asarray(committed["add"] - committed["none"])).max() > 1e-3


@pytest.mark.parametrize("global_sink", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_scan_and_generator_are_bit_identical_with_longlive_recache(model, global_sink):
    _, _, params, prompts = model
    # bit-for-bit across two programs: compiled as users' programs are (tests/subproc.py)
    st = _streamer(model, recache="longlive", recache_global_sink=global_sink, compiler_options=USER_NUMERICS)
    sched = jnp.array([0, 0, 1, 1, 1, 0])  # switches at S = 6 (<= 12) and S = 15 (> 12)
    carry0 = st.init_carry(params, prompts, jax.random.key(3))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), carry0)
    carry, outs = st.jit_rollout(params, carry0, sched, prompts)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), carry) == shapes  # fixed-shape carry
    assert carry.history.shape[1] == st.stream_cfg.history_frames
    gen = st.stream(
        params, st.init_carry(params, prompts, jax.random.key(3)), list(np.asarray(sched)), prompts
    )
    for i, out in enumerate(gen):
        np.testing.assert_array_equal(
            np.asarray(out.latents), np.asarray(outs.latents[i]), err_msg=f"chunk {i}"
        )


def test_history_is_kept_only_for_the_longlive_recache():
    assert StreamConfig(anchor="sink", recache="longlive").history_frames == 3 + 3 + 3
    assert StreamConfig(anchor="window", window_frames=6, recache="longlive").history_frames == 9
    assert StreamConfig(anchor="sink", recache="window_causal").history_frames == 0


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(recache="bidirectional"), r"config\.stream\.recache: 'bidirectional' not in"),
        (dict(anchor="adastate", recache="longlive"), r"config\.stream\.recache: 'longlive' is defined for"),
    ],
)
def test_bad_recache_config_is_named(kw, needle):
    with pytest.raises(ValueError, match=needle):
        StreamConfig(**kw)


def test_bad_refresh_noise_is_named():
    with pytest.raises(ValueError, match=r"config\.sampler\.refresh_noise: 'clean' not in"):
        SamplerConfig(refresh_noise="clean")
