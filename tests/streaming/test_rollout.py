"""The streaming engine: one step, scan == generator, policies' layouts and commit rules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import sharding as shd
from adastate_jax.models import attention as attn
from adastate_jax.models import wan
from adastate_jax.streaming import anchors, sampler
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.cache import carry_shardings
from adastate_jax.streaming.rollout import Streamer, attention_shares, prompt_schedule
from adastate_jax.streaming.sampler import SamplerConfig
from tests.subproc import TOLERANT_COMPILE, USER_NUMERICS

LAT = 4  # latent 4x4 -> 4 tokens per frame: fast


@pytest.fixture(scope="module")
def model():
    cfg = wan.WanConfig.tiny(zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (2, 2, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


def _streamer(model, **kw):
    cfg, graphdef, _, _ = model
    smp = kw.pop("sampler", SamplerConfig())
    inst = kw.pop("instrument", False)
    opts = kw.pop("compiler_options", ())
    sc = StreamConfig(latent_h=LAT, latent_w=LAT, **kw)
    return Streamer(graphdef, cfg, sc, smp, instrument=inst, compiler_options=opts)


@pytest.mark.parametrize(
    "kw",
    [
        dict(anchor="adastate"),
        dict(anchor="ema_sink", window_frames=3, recache="window_causal"),
        dict(anchor="window", window_frames=6, time_layout="absolute"),
    ],
    ids=["adastate", "ema_sink_recache", "window_abs"],
)
def test_scan_rollout_and_generator_are_bit_identical(model, kw):
    _, _, params, prompts = model
    st = _streamer(model, **kw, compiler_options=USER_NUMERICS)  # the bits users' programs give
    sched = jnp.array([0, 0, 1, 1, 0])
    _, outs = st.jit_rollout(params, st.init_carry(params, prompts, jax.random.key(3)), sched, prompts)
    gen = st.stream(
        params, st.init_carry(params, prompts, jax.random.key(3)), list(np.asarray(sched)), prompts
    )
    for i, out in enumerate(gen):
        np.testing.assert_array_equal(np.asarray(out.latents), np.asarray(outs.latents[i]))
        np.testing.assert_array_equal(np.asarray(out.state), np.asarray(outs.state[i]))


def _no_cache_reference(model, st, key, num_chunks, prompt=0):
    """Independent re-implementation of `full` generation without a cache: every denoising step
    re-runs the whole clean history (t = context_noise) plus the noisy chunk with block-causal masks."""
    cfg, graphdef, params, prompts = model
    smp, sc = st.sampler_cfg, st.stream_cfg
    f = sc.chunk_frames
    text = prompts[prompt]
    fwd = jax.jit(lambda *a, **k: wan.forward(graphdef, params, *a, **k))
    ts = smp.timesteps
    n = len(ts)
    history = None
    chunks = []
    for c in range(num_chunks):
        keys = jax.random.split(jax.random.fold_in(key, c), n + 1)
        shape = (text.shape[0], f, LAT, LAT, cfg.in_channels)
        x = jax.random.normal(keys[0], shape)
        for i in range(n):
            prev = 0 if history is None else history.shape[1]
            seq = x if history is None else jnp.concatenate([history, x], axis=1)
            t = jnp.concatenate([jnp.zeros((shape[0], prev)), jnp.full((shape[0], f), ts[i])], axis=1)
            mask = attn.block_causal_mask(prev + f, f) if prev % f == 0 else None
            v = fwd(seq, t, text, jnp.arange(prev + f), frame_mask=mask).velocity[:, prev:]
            s = ts[i] / smp.num_train_timesteps
            x0 = x - s * v
            x = (
                x0
                if i == n - 1
                else sampler.add_noise(x0, jax.random.normal(keys[i + 1], shape), ts[i + 1] / 1000)
            )
        chunks.append(x)
        history = x if history is None else jnp.concatenate([history, x], axis=1)
    return chunks


@pytest.mark.parametrize("layout", ["absolute", "relative"])
def test_full_policy_through_cache_equals_no_cache_regeneration(model, layout):
    _, _, params, prompts = model
    st = _streamer(model, anchor="full", max_frames=12, time_layout=layout)
    key = jax.random.key(11)
    carry = st.init_carry(params, prompts, key)
    _, outs = st.jit_rollout(params, carry, jnp.zeros((4,), jnp.int32), prompts)
    ref = _no_cache_reference(model, st, key, 4)
    for c in range(4):
        np.testing.assert_allclose(np.asarray(outs.latents[c]), np.asarray(ref[c]), rtol=1e-4, atol=1e-4)


def test_adastate_layout_is_identical_at_chunk_3_and_300(model):
    _, _, params, prompts = model
    st = _streamer(model, anchor="adastate")
    carry0 = st.init_carry(params, prompts, jax.random.key(0))
    shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), carry0)
    carry, outs = st.jit_rollout(params, carry0, jnp.zeros((301,), jnp.int32), prompts)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), carry) == shapes0  # carry shapes never change
    np.testing.assert_array_equal(np.asarray(outs.positions[3]), np.asarray(outs.positions[300]))
    np.testing.assert_array_equal(np.asarray(outs.key_valid[3]), np.asarray(outs.key_valid[300]))
    # layout: state slot 0, window 1..3, state query 0, chunk 4..6
    np.testing.assert_array_equal(np.asarray(outs.positions[300]), [0, 1, 2, 3, 0, 4, 5, 6])
    assert bool(jnp.isfinite(outs.latents).all())
    # the state is never part of the emitted video: 3 content frames per chunk, state apart
    chex.assert_shape(outs.latents, (301, 2, 3, LAT, LAT, 16))
    chex.assert_shape(outs.state, (301, 2, 1, LAT, LAT, 16))
    assert not np.any(np.all(np.isclose(np.asarray(outs.latents), np.asarray(outs.state)), axis=(3, 4, 5)))
    # the committed state slot holds the last emitted state
    np.testing.assert_array_equal(np.asarray(carry.state), np.asarray(outs.state[-1]))


def test_adastate_first_chunk_masks_state_then_reads_it(model):
    _, _, params, prompts = model
    st = _streamer(model, anchor="adastate")
    _, outs = st.jit_rollout(
        params, st.init_carry(params, prompts, jax.random.key(0)), jnp.zeros((2,), jnp.int32), prompts
    )
    assert not bool(outs.key_valid[0, :4].any())  # chunk 0: no state, no window
    assert bool(outs.key_valid[1].all())
    st_noise = _streamer(model, anchor="adastate", first_chunk="noise")
    c = st_noise.init_carry(params, prompts, jax.random.key(0))
    assert bool(c.valid[0]) and not bool(c.valid[1:].any())


def test_sink_absolute_reproduces_longlive_layout(model):
    """LongLive: local attention 12 = sink 3 (first chunk, absolute positions) + the last 9 frames
    (6 previous + the 3 being generated)."""
    _, _, params, prompts = model
    st = _streamer(model, anchor="sink", sink_frames=3, window_frames=6, time_layout="absolute")
    _, outs = st.jit_rollout(
        params, st.init_carry(params, prompts, jax.random.key(0)), jnp.zeros((11,), jnp.int32), prompts
    )
    pos, valid = np.asarray(outs.positions[10]), np.asarray(outs.key_valid[10])
    assert valid.all()
    assert sorted(pos[:3]) == [0, 1, 2]  # sink keeps its original positions
    assert sorted(pos[3:9]) == list(range(24, 30))  # the 6 previous frames
    assert list(pos[9:]) == [30, 31, 32]  # the chunk being generated
    # chunk 1: sink filled by chunk 0, window still empty
    assert list(np.asarray(outs.key_valid[1])[:9]) == [True] * 3 + [False] * 6


def test_ema_sink_commit_matches_hand_computed_ema():
    sc = StreamConfig(
        anchor="ema_sink",
        sink_frames=3,
        window_frames=3,
        chunk_frames=3,
        ema_decay=0.9,
        latent_h=2,
        latent_w=2,
    )
    from adastate_jax.models.wan import TextKV
    from adastate_jax.streaming.cache import EMPTY, Carry

    s = sc.num_slots
    z = lambda *sh: jnp.zeros(sh)  # noqa: E731
    carry = Carry(
        k=z(1, 1, s, 1, 1, 1),
        v=z(1, 1, s, 1, 1, 1),
        valid=jnp.zeros((s,), bool),
        frame_idx=jnp.full((s,), EMPTY, jnp.int32),
        latents=z(1, s, 1, 1, 1),
        state=z(1, 0, 1, 1, 1),
        text=TextKV(z(1), z(1)),
        prompt_id=jnp.int32(0),
        num_frames=jnp.int32(0),
        chunk=jnp.int32(0),
        key=jnp.zeros((2,), jnp.uint32),
    )
    value = lambda g: float(g + 1) ** 1.5  # noqa: E731  # a distinct value per global frame
    expected_sink = [value(g) for g in range(3)]
    for c in range(6):
        g = np.arange(3 * c, 3 * c + 3)
        kv = jnp.asarray([value(x) for x in g]).reshape(1, 1, 3, 1, 1, 1)
        carry = anchors.commit(sc, carry, kv, kv, kv.reshape(1, 3, 1, 1, 1))
        # frames of chunk c-1 (if in the window, i.e. c >= 2) were evicted: EMA into sink slot e % 3
        if c >= 2:
            for e in range(3 * (c - 1), 3 * c):
                expected_sink[e % 3] = 0.9 * expected_sink[e % 3] + 0.1 * value(e)
        np.testing.assert_allclose(np.asarray(carry.k[0, 0, :3, 0, 0, 0]), expected_sink, rtol=1e-6)
        # the window holds the chunk just committed (from chunk 1 on)
        if c >= 1:
            np.testing.assert_allclose(
                sorted(np.asarray(carry.k[0, 0, 3:, 0, 0, 0])), [value(x) for x in g], rtol=1e-6
            )


def test_compiled_program_size_does_not_grow_with_num_chunks(model):
    """A 512-chunk scan compiles to the same program as an 8-chunk one (only the trip count differs)."""
    _, _, params, prompts = model
    st = _streamer(model, anchor="adastate")
    carry = st.init_carry(params, prompts, jax.random.key(0))
    sizes = {}
    for n in (8, 512):
        hlo = (
            jax.jit(st.rollout).lower(params, carry, jnp.zeros((n,), jnp.int32), prompts).compile().as_text()
        )
        sizes[n] = len(hlo.splitlines())  # instructions of the optimised program
    assert sizes[512] == sizes[8], sizes


def test_sharded_rollout_equals_single_device(model):
    cfg, graphdef, params, _ = model
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    prompts = jax.random.normal(
        jax.random.key(6), (2, 4, cfg.text_len, cfg.text_dim)
    )  # batch 4 = data x fsdp
    st = _streamer(model, anchor="adastate")
    sched = jnp.array([0, 1, 1])
    _, ref = st.jit_rollout(params, st.init_carry(params, prompts, jax.random.key(2)), sched, prompts)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    _, abstract = wan.abstract_model(cfg)
    p_sh = jax.device_put(params, shd.state_shardings(abstract, mesh))
    carry = st.init_carry(params, prompts, jax.random.key(2))
    c_sh = jax.device_put(carry, carry_shardings(carry, mesh))
    assert c_sh.k.sharding.spec[1] == ("data", "fsdp") and c_sh.k.sharding.spec[4] == "tensor"
    prompts_sh = jax.device_put(prompts, shd.named_sharding(mesh, (None, "batch", None, None)))
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else mesh:
        _, outs = jax.jit(st.rollout)(p_sh, c_sh, sched, prompts_sh)
    np.testing.assert_allclose(np.asarray(outs.latents), np.asarray(ref.latents), rtol=1e-4, atol=1e-4)


def test_prompt_switch_changes_only_later_chunks_and_recache_rewrites_window(model):
    _, _, params, prompts = model
    # bit-for-bit across two programs: compiled as users' programs are (tests/subproc.py)
    st = _streamer(model, anchor="sink", sink_frames=3, window_frames=3, compiler_options=USER_NUMERICS)
    run = lambda s, sched: s.jit_rollout(
        params, s.init_carry(params, prompts, jax.random.key(4)), jnp.asarray(sched), prompts
    )  # noqa: E731
    c_a, a = run(st, [0, 0, 0, 0])
    c_b, b = run(st, [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(a.latents[:2]), np.asarray(b.latents[:2]))
    assert not np.allclose(np.asarray(a.latents[2]), np.asarray(b.latents[2]))
    st_re = _streamer(
        model,
        anchor="sink",
        sink_frames=3,
        window_frames=3,
        recache="window_causal",
        compiler_options=USER_NUMERICS,
    )
    c_r, r = run(st_re, [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(r.latents[:2]), np.asarray(b.latents[:2]))
    assert not np.allclose(np.asarray(r.latents[2]), np.asarray(b.latents[2]))  # re-cached window differs


def test_instrumented_attention_shares_sum_to_one(model):
    cfg, _, params, prompts = model
    st = _streamer(model, anchor="adastate", instrument=True)
    _, outs = st.jit_rollout(
        params, st.init_carry(params, prompts, jax.random.key(0)), jnp.zeros((3,), jnp.int32), prompts
    )
    chex.assert_shape(outs.key_mass, (3, cfg.num_layers, 8))
    shares = attention_shares(st.stream_cfg, np.asarray(outs.key_mass))
    np.testing.assert_allclose(shares.sum(-1), 1.0, rtol=1e-5)
    assert np.all(shares[0, :, :2] == 0)  # chunk 0: nothing cached to attend to
    assert np.all(shares[2, :, 0] > 0)  # later chunks read the state


def test_compiler_options_reach_every_program_the_streamer_compiles(model):
    """`Streamer(compiler_options=...)` (a dict or pairs, kept sorted and hashable) is handed to XLA
    for `jit_step`, `jit_rollout` and `jit_segment`: an option XLA does not know is refused by name."""
    _, _, params, prompts = model
    st = _streamer(model, anchor="window", compiler_options={"xla_no_such_option": True, "a": 1})
    assert st.compiler_options == (("a", 1), ("xla_no_such_option", True))
    hash(st)  # a frozen dataclass stays hashable with options
    for bad in ("xla_cpu_use_fusion_emitters", 3, [("a",)]):
        with pytest.raises(TypeError, match=r"Streamer\.compiler_options: a mapping"):
            _streamer(model, anchor="window", compiler_options=bad)
    carry = st.init_carry(params, prompts, jax.random.key(0))
    for fn, args in (
        (st.jit_step, (params, carry, jnp.int32(0), prompts)),
        (st.jit_rollout, (params, carry, jnp.zeros((2,), jnp.int32), prompts)),
        (st.jit_segment, (params, carry, jnp.zeros((2,), jnp.int32), jnp.int32(2), prompts)),
    ):
        with pytest.raises(Exception, match="xla_no_such_option|No such compile option: 'a'"):
            fn.lower(*args).compile()


def test_guidance_uses_two_branches(model):
    _, _, params, prompts = model
    st1 = _streamer(model, anchor="window")
    st3 = _streamer(model, anchor="window", sampler=SamplerConfig(guidance_scale=3.0))
    c3 = st3.init_carry(params, prompts, jax.random.key(0))
    assert c3.k.shape[1] == 2 * prompts.shape[1]
    _, o1 = st1.jit_rollout(
        params, st1.init_carry(params, prompts, jax.random.key(0)), jnp.zeros((2,), jnp.int32), prompts
    )
    _, o3 = st3.jit_rollout(params, c3, jnp.zeros((2,), jnp.int32), prompts)
    assert o3.latents.shape == o1.latents.shape
    assert not np.allclose(np.asarray(o1.latents), np.asarray(o3.latents))


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(anchor="sinc"), "config.stream.anchor: unknown policy 'sinc'"),
        (dict(anchor="window", window_frames=2, chunk_frames=3), "config.stream.window_frames"),
        (dict(anchor="sink", sink_frames=0), "config.stream.sink_frames"),
        (dict(time_layout="sideways"), "config.stream.time_layout"),
    ],
)
def test_bad_stream_config_is_named(kw, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        StreamConfig(**kw)


def test_bad_prompt_schedule_is_named(model):
    _, _, params, prompts = model
    with pytest.raises(ValueError, match="chunk 12 is outside the rollout's 10 chunks"):
        prompt_schedule(10, {12: 1}, 2)
    with pytest.raises(ValueError, match="names prompt 5; there are 2 prompts"):
        prompt_schedule(10, {3: 5}, 2)
    st = _streamer(model, anchor="window")
    gen = st.stream(params, st.init_carry(params, prompts, jax.random.key(0)), [0, 7], prompts)
    next(gen)
    with pytest.raises(ValueError, match="prompt schedule entry 1 is 7"):
        next(gen)


def test_sampler_warps_denoising_list_like_self_forcing():
    ts = SamplerConfig().timesteps
    np.testing.assert_allclose(ts, [1000, 937.5, 833.3333, 625], rtol=1e-5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        SamplerConfig(denoising_steps=(1000, 1000))


@pytest.mark.slow
def test_ten_thousand_chunk_rollout_stays_finite(model):
    _, _, params, prompts = model
    st = _streamer(model, anchor="adastate", sampler=SamplerConfig(denoising_steps=(1000, 500)))
    carry, outs = st.jit_rollout(
        params,
        st.init_carry(params, prompts[:, :1], jax.random.key(0)),
        jnp.zeros((10_000,), jnp.int32),
        prompts[:, :1],
    )
    assert bool(jnp.isfinite(outs.latents).all()) and bool(jnp.isfinite(carry.k).all())


def test_step_is_differentiable_through_the_carry(model):
    """Training through the recurrence: gradients of a loss on chunk 1 reach the params through the
    adaptive state committed at chunk 0, and stopping the carry's gradient changes them (two chunks
    of one denoising step each: the smallest program with a commit between two reads)."""
    _, _, params, prompts = model
    st = _streamer(model, anchor="adastate", sampler=SamplerConfig(denoising_steps=(1000,)))
    carry0 = st.init_carry(params, prompts, jax.random.key(0))

    def loss(p, detach):
        c = carry0
        for _ in range(2):
            c, out = st.step(p, c, jnp.int32(0), prompts)
            if detach:
                c = jax.lax.stop_gradient(c)
        return jnp.mean(out.latents**2)

    g = jax.jit(jax.grad(lambda p: loss(p, False)), compiler_options=TOLERANT_COMPILE)(params)
    g_det = jax.jit(jax.grad(lambda p: loss(p, True)), compiler_options=TOLERANT_COMPILE)(params)
    leaves, leaves_det = jax.tree.leaves(g), jax.tree.leaves(g_det)
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, leaves_det))
