"""One description of the context: every training layout is the streaming engine's own bookkeeping.

`anchors.context_schedule` replays `commit` on the host; `anchors.clip_layout` turns it into the
frame mask and temporal positions of one training pass. These tests hold both against a real
7-chunk rollout of a tiny model through `Streamer.step`: what each chunk attends to (slots, their
validity, frame indices and temporal indices), the refusals (adastate, ema_sink past its first
eviction, a frame visible twice), and, for the policies a pass can express, the velocities
themselves (teacher forcing under the derived layout == the streamed chunk's denoiser output).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import config as config_lib
from adastate_jax.models import attention as attn
from adastate_jax.models import wan
from adastate_jax.streaming import anchors
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives.ode_init import OdeInit
from tests.subproc import FAST_COMPILE as FAST
from tests.subproc import TOLERANT_COMPILE
from tests.training.conftest_helpers import panworld_config

CHUNKS = 7  # the paper's 21-frame training clip
LAT = 4  # 4x4 latents, patch 2x2: 4 tokens per frame

SLOW = ("window_absolute", "full_ring", "sink_longlive", "adastate_absolute_noise")  # one compile each
POLICIES = {
    "window": dict(anchor="window"),
    "window_absolute": dict(anchor="window", window_frames=6, time_layout="absolute"),
    "full": dict(anchor="full", max_frames=21),
    "full_ring": dict(anchor="full", max_frames=9, time_layout="absolute"),
    "sink": dict(anchor="sink", sink_frames=1),
    "sink_longlive": dict(anchor="sink", sink_frames=3, window_frames=6, time_layout="absolute"),
    "ema_sink": dict(anchor="ema_sink", sink_frames=1),
    "adastate": dict(anchor="adastate"),
    "adastate_absolute_noise": dict(anchor="adastate", time_layout="absolute", first_chunk="noise"),
}


@functools.lru_cache(maxsize=1)
def _model():
    cfg = wan.WanConfig.tiny(zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=1))
    prompts = jax.random.normal(jax.random.key(5), (1, 1, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _sc(name) -> StreamConfig:
    return StreamConfig(latent_h=LAT, latent_w=LAT, **POLICIES[name])


@functools.cache
def _stream(name):
    """A real 7-chunk rollout through `Streamer.step` (one denoising step at t = 1000, an explicit
    key per chunk): per chunk, the carry's slots before the step and the step's ChunkOut."""
    cfg, graphdef, params, prompts = _model()
    st = Streamer(graphdef, cfg, _sc(name), SamplerConfig(denoising_steps=(1000.0,)))
    carry = st.init_carry(params, prompts, jax.random.key(0))
    key0 = jax.random.key(100)
    step = jax.jit(lambda p, c, k: st.step(p, c, jnp.int32(0), prompts, key=k))
    # users' emitters: the committed state slot is checked bit for bit against the emitted state
    step = step.lower(params, carry, key0).compile(FAST)
    rows = []
    for c in range(CHUNKS):
        key = jax.random.key(100 + c)
        before = jax.device_get((carry.frame_idx, carry.valid, carry.latents))
        carry, out = step(params, carry, key)
        rows.append(dict(frame_idx=before[0], valid=before[1], slot_latents=before[2], key=key, out=out))
    return rows


def _first_blend(sched) -> int:
    """Index of the first chunk whose context holds a blend (len(sched) if none)."""
    for ctx in sched:
        if any(ctx.blended(s) for s in range(len(ctx.valid))):
            return ctx.chunk
    return len(sched)


# --------------------------------------------------------------------------------------------
# the schedule is what Streamer.step attends to
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(POLICIES))
def test_context_schedule_is_what_streamer_step_attends_to(name):
    """Per chunk: slot validity and temporal indices == ChunkOut.key_valid / positions, frame
    indices == the carry's, query indices == the chunk's; every content slot holds exactly the
    frame the rollout emitted; the adastate slot holds the previous chunk's clean state."""
    sc = _sc(name)
    sched = anchors.context_schedule(sc, CHUNKS)
    rows = _stream(name)
    s, fs, f = sc.num_slots, sc.query_state_frames, sc.chunk_frames
    emitted = np.concatenate([np.asarray(r["out"].latents[0]) for r in rows])  # [N * F, h, w, C]
    last = _first_blend(sched)
    assert (last < CHUNKS) == (name == "ema_sink")  # ema_sink merges from its first eviction on
    for ctx, row in zip(sched, rows):
        out = row["out"]
        np.testing.assert_array_equal(ctx.valid, np.asarray(out.key_valid[:s]))
        np.testing.assert_array_equal(ctx.valid, row["valid"])
        np.testing.assert_array_equal(ctx.frame_idx, row["frame_idx"])
        np.testing.assert_array_equal(ctx.slot_pos[ctx.valid], np.asarray(out.positions[:s])[ctx.valid])
        np.testing.assert_array_equal(ctx.query_pos, np.asarray(out.positions[s:]))
        for slot in np.flatnonzero(ctx.valid):
            held = row["slot_latents"][0, slot]
            if ctx.holds_state(slot):  # the state of the previous chunk (or the noise state)
                assert sc.anchor == "adastate" and slot < fs
                if ctx.chunk > 0:
                    assert ctx.weights[slot, ctx.num_content + ctx.chunk * fs + slot] == 1.0
                    np.testing.assert_array_equal(held, np.asarray(rows[ctx.chunk - 1]["out"].state[0, slot]))
                else:
                    assert sc.first_chunk == "noise" and ctx.frame_idx[slot] == -1
            elif ctx.chunk < last:
                j = ctx.content_frame(slot)
                assert j == ctx.frame_idx[slot] and 0 <= j < ctx.chunk * f
                np.testing.assert_array_equal(held, emitted[j])
            else:
                assert ctx.blended(slot) or ctx.content_frame(slot) >= 0


# --------------------------------------------------------------------------------------------
# the training layout is what Streamer.step attends to
# --------------------------------------------------------------------------------------------


def _stream_view(ctx, row, sc):
    """{frame: q - k offset per query frame} of the content frames chunk `ctx.chunk` attends to in
    the rollout, from the carry's frame indices and ChunkOut.positions."""
    s, fs = sc.num_slots, sc.query_state_frames
    pos = np.asarray(row["out"].positions)
    q = pos[s + fs :]
    return {
        int(row["frame_idx"][slot]): tuple(q - pos[slot])
        for slot in np.flatnonzero(row["valid"])
        if not ctx.holds_state(slot)
    }


def _layout_view(layout, rows, own_rows):
    """({frame: q - k offset per query frame} of the context keys, the own keys' offsets) that the
    layout's query rows `rows` attend to; context keys must be clean frames (rows < F)."""
    kp = layout.key_positions
    keys = np.flatnonzero(layout.mask[rows[0]])
    assert set(own_rows) <= set(keys)

    def offsets(k):
        kpos = [layout.positions[k] if kp is None else kp[r, k] for r in rows]
        return tuple(layout.positions[rows] - np.asarray(kpos))

    context = {int(k): offsets(k) for k in keys if k not in set(own_rows)}
    assert all(k < layout.num_frames for k in context)  # the context is the clean copy
    return context, [offsets(k) for k in own_rows]


@pytest.mark.parametrize("name", _params(n for n in POLICIES if not n.startswith("adastate")))
def test_teacher_forcing_layout_sees_what_each_streamed_chunk_sees(name):
    """Noisy chunk c of the [clean; noisy] layout attends to exactly the clean frames the streamed
    chunk c's slots hold, at the same query - key temporal offsets (RoPE sees offsets only), and
    to its own chunk; clean chunk c attends as its cache-refresh pass did. ema_sink: over the
    chunks before its first eviction (a longer clip is refused, see below)."""
    sc = _sc(name)
    rows = _stream(name)
    sched = anchors.context_schedule(sc, CHUNKS)
    n = _first_blend(sched)
    f = sc.chunk_frames
    nf = n * f
    layout = anchors.clip_layout(sc, nf, "clean")
    for ctx, row in zip(sched[:n], rows[:n]):
        own = np.arange(ctx.chunk * f, (ctx.chunk + 1) * f)
        q_pos = np.asarray(row["out"].positions)[sc.num_slots + sc.query_state_frames :]
        own_offsets = [tuple(q_pos - q_pos[i]) for i in range(f)]
        for rows_q in (nf + own, own):  # noisy chunk c; clean chunk c (its cache-refresh pass)
            context, own_seen = _layout_view(layout, rows_q, rows_q)
            assert context == _stream_view(ctx, row, sc)
            assert own_seen == own_offsets
            assert (layout.mask[rows_q] == layout.mask[rows_q[0]]).all()  # a chunk is one group
    # relative time with a sink (and only then) needs per-query key positions
    per_query = layout.key_positions is not None
    assert per_query == (sc.anchor in ("sink", "ema_sink") and sc.time_layout == "relative"), name


def test_diffusion_forcing_layout_is_the_same_context_on_the_noisy_frames():
    """One copy: chunk c attends to the frames its slots hold (themselves noisy) and itself; for
    the teacher's clip policies this is the old block-causal / windowed masks, at absolute time."""
    for window, sink, old in (
        (None, 0, attn.block_causal_mask(21, 3)),
        (6, 0, attn.windowed_block_causal_mask(21, 3, 6)),
        (3, 3, attn.windowed_block_causal_mask(21, 3, 3, 3)),
    ):
        lay = fm.ClipLayout("diffusion_forcing", 3, window, sink).frames(21)
        np.testing.assert_array_equal(lay.mask, old)
        np.testing.assert_array_equal(lay.positions, np.arange(21))
        assert lay.key_positions is None
        tf = fm.ClipLayout("teacher_forcing", 3, window, sink).frames(21)
        np.testing.assert_array_equal(tf.mask, attn.teacher_forcing_mask(21, 3, window, sink))
        np.testing.assert_array_equal(tf.positions, np.concatenate([np.arange(21)] * 2))


def test_teacher_layouts_come_from_the_teacher_policy_of_the_config():
    """DMD's teacher / critic and the flow-matching teacher score under one policy: the clip
    policy of config.train.tf_window / tf_sink, whatever the student's config.stream is."""
    cfg = panworld_config("dmd,adastate", init_from="", teacher_path="unused", tf_window=3, tf_sink=3)
    cfg.train.teacher_attention = "teacher_forcing"
    exp = config_lib.parse(cfg)
    layout = fm.teacher_layout(exp, exp.train.teacher_attention)
    assert layout.stream_policy(21) == anchors.clip_policy(3, 3, 3, 21)
    assert layout.stream_policy(21).anchor == "sink" and layout.stream_policy(21).time_layout == "absolute"
    np.testing.assert_array_equal(layout.frames(21).mask, attn.teacher_forcing_mask(21, 3, 3, 3))
    cfg.train.tf_window = 2  # shorter than a chunk: not a streaming layout, named by its field
    with pytest.raises(ValueError, match=r"config\.train\.tf_window=2"):
        fm.teacher_layout(config_lib.parse(cfg), "teacher_forcing").frames(21)


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


def _ode_exp(anchor, frames=21, **stream):
    cfg = panworld_config(f"ode,{anchor}", init_from="", teacher_path="unused")
    cfg.data.panworld.num_frames = frames
    for k, v in stream.items():
        cfg.stream[k] = v
    return config_lib.parse(cfg)


def test_ode_init_refuses_adastate_naming_the_anchor_and_the_way_round():
    with pytest.raises(ValueError, match=r"config\.stream\.anchor='adastate'") as e:
        OdeInit(_ode_exp("adastate"))
    assert "'window'" in str(e.value) and "config.train.init_from" in str(e.value)
    with pytest.raises(ValueError, match=r"config\.stream\.anchor='adastate'"):
        anchors.clip_layout(_sc("adastate"), 21)


def test_ema_sink_is_sink_until_its_first_eviction_and_refused_after():
    exp = _ode_exp("ema_sink", frames=21, sink_frames=1)
    with pytest.raises(ValueError, match=r"config\.stream\.anchor='ema_sink': at chunk 2 .* blend"):
        OdeInit(exp)
    short = OdeInit(_ode_exp("ema_sink", frames=6, sink_frames=1))  # 2 chunks: nothing evicted
    ema, sink = short.student_layout.frames(6), anchors.clip_layout(_sc("sink"), 6)
    np.testing.assert_array_equal(ema.mask, sink.mask)
    np.testing.assert_array_equal(ema.key_positions, sink.key_positions)
    # ema_decay 1 never blends (the sink keeps itself): the 21-frame clip is the sink layout
    keep = dataclasses.replace(_sc("ema_sink"), ema_decay=1.0)
    np.testing.assert_array_equal(
        anchors.clip_layout(keep, 21).mask, anchors.clip_layout(_sc("sink"), 21).mask
    )


def test_a_frame_visible_twice_is_refused():
    refresh = dataclasses.replace(_sc("sink"), sink_refresh_every=2)
    with pytest.raises(ValueError, match=r"config\.stream\.sink_refresh_every=2: .* visible twice"):
        anchors.clip_layout(refresh, 21)


# --------------------------------------------------------------------------------------------
# numerics: teacher forcing under the derived layout == the streamed chunks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(["window", "sink", "sink_longlive"]))
def test_teacher_forcing_forward_equals_the_streamed_chunks(name):
    """The rollout denoises chunk c in one step from noise z_c at t = 1000 (sigma 1), so its output
    is x0_c = z_c - v_c. One teacher-forcing pass over [x0 (clean, t = 0); z (t = 1000)] under the
    layout derived from the same StreamConfig gives every chunk's v_c at once (fp32, ~1e-5):
    relative time with a sink runs the per-group key positions, the others a single RoPE."""
    cfg, graphdef, params, prompts = _model()
    sc = _sc(name)
    rows = _stream(name)
    shape = (1, sc.frames_per_call, LAT, LAT, cfg.in_channels)
    z = jnp.concatenate([jax.random.normal(jax.random.split(r["key"], 2)[0], shape) for r in rows], axis=1)
    x0 = jnp.concatenate([r["out"].latents for r in rows], axis=1)  # [1, 21, h, w, C]
    layout = fm.ClipLayout("teacher_forcing", sc.chunk_frames, policy=sc)
    assert (layout.frames(21).key_positions is not None) == (name == "sink")
    t = jnp.full((1, 21), 1000.0)
    fwd = jax.jit(lambda p: fm.clip_forward(graphdef, p, z, t, prompts[0], layout, clean=x0))
    v = fwd.lower(params).compile(TOLERANT_COMPILE)(params)
    np.testing.assert_allclose(np.asarray(z - v), np.asarray(x0), rtol=1e-5, atol=1e-5)
    # and the per-group key positions matter: the same pass at absolute positions differs
    if name == "sink":
        absolute = dataclasses.replace(sc, time_layout="absolute")
        lay_abs = fm.ClipLayout("teacher_forcing", sc.chunk_frames, policy=absolute)
        v_abs = jax.jit(lambda p: fm.clip_forward(graphdef, p, z, t, prompts[0], lay_abs, clean=x0))(params)
        assert float(jnp.abs(v_abs - v).max()) > 1e-3


def test_per_group_key_positions_run_block_sparse_even_when_dense_is_asked():
    """A layout with per-query key positions cannot be a single masked attention: the forward runs
    the grouped plan whatever `attention_blocks` says, with the same result."""
    cfg, _, params, prompts = _model()
    g_dense = nnx.split(wan.create_model(dataclasses.replace(cfg, attention_blocks="dense"), seed=1))[0]
    _, g_auto, _, _ = _model()
    lay = anchors.clip_layout(_sc("sink"), 6, "noisy")
    assert lay.key_positions is not None
    k = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(k[0], (1, 6, LAT, LAT, cfg.in_channels))
    t = jax.random.uniform(k[1], (1, 6), minval=0, maxval=1000)

    def run(g):
        return wan.forward(
            g, params, x, t, prompts[0], lay.positions, None, lay.mask, key_pos=lay.key_positions
        )

    both = jax.jit(lambda: [run(g).velocity for g in (g_dense, g_auto)]).lower().compile(FAST)()
    np.testing.assert_array_equal(np.asarray(both[0]), np.asarray(both[1]))
    with pytest.raises(ValueError, match="key_pos"):
        jax.eval_shape(
            lambda: wan.forward(
                g_auto,
                params,
                x,
                t,
                prompts[0],
                lay.positions,
                None,
                lay.mask,
                True,
                key_pos=lay.key_positions,
            )
        )
