"""How the adaptive state learns, as switches that each do what they say (tiny models, CPU):

(a) through the chunks that read it: the gradient of chunk c + 1's loss reaches the state chunk c
    committed iff `train.truncation_chunks` does not cut the cache between them;
(b) a direct signal, `train.state_loss`: 'none' adds nothing (zero term, zero gradient); 'regress'
    and 'dmd' add a non-zero term whose gradient moves the state toward its target;
(c) `train.init_from` a `window` student's export: an adastate DMD state starts from exactly those
    params, and the export records the init's policy and steps (`train.init_policy`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from adastate_jax import config as config_lib
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.training import loop
from adastate_jax.training.objectives import dmd
from tests.subproc import TOLERANT_COMPILE
from tests.training.conftest_helpers import one_device_mesh, panworld_config

SHIFT = np.array([0.5, -0.5, 0.5, -0.5], np.float32)  # the critic's output-head bias minus the teacher's


def _cfg(**train):
    cfg = panworld_config(
        "dmd,adastate", init_from="", teacher_path="unused", critic_steps=1, ema=0.0, alpha=0.0, **train
    )
    cfg.text.kind = "embeddings"  # prompts come as embeddings
    cfg.model.update(
        dict(
            dim=32, num_heads=2, num_layers=1, ffn_dim=64, in_channels=4, out_channels=4, zero_init_head=False
        )
    )
    cfg.stream.latent_h = cfg.stream.latent_w = 2
    cfg.sampler.denoising_steps = (1000,)  # one step per chunk: compile time
    cfg.train.remat_chunks = False
    return cfg


def _objective(**train):
    return dmd.SelfForcingDMD(config_lib.parse(_cfg(**train)))


def _params(obj, seed):
    return nnx.split(wan.create_model(obj.model_cfg, seed=seed))[1]


def _text(b=2):
    return jax.random.normal(jax.random.key(8), (b, 8, 32))


def _nonzero(tree) -> bool:
    return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# (a) through the chunks that read it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)]
)
def test_state_gradient_reaches_the_next_chunk_iff_truncation_allows(k):
    """d(loss of chunk c + 1) / d(keys/values of the state slot chunk c committed) is non-zero
    exactly when the rollout does not cut the cache before chunk c + 1 ((c + 1) % K != 0)."""
    obj = _objective(truncation_chunks=k)
    params = _params(obj, 1)
    prompts = _text()[None]
    body = obj.chunk_body(params, prompts, jnp.int32(0))
    fs = obj.stream_cfg.query_state_frames

    def next_chunk_loss(state_kv, carry, c):
        k_s, v_s = state_kv
        carry = carry.replace(k=carry.k.at[:, :, :fs].set(k_s), v=carry.v.at[:, :, :fs].set(v_s))
        _, (latents, _) = body(carry, c + 1)
        return jnp.sum(jnp.square(latents))

    carry = obj.streamer.init_carry(params, prompts, jax.random.key_data(jax.random.key(0)))
    step = jax.jit(body).lower(carry, jnp.int32(0)).compile(TOLERANT_COMPILE)
    state_kv = lambda cr: (cr.k[:, :, :fs], cr.v[:, :, :fs])  # noqa: E731
    grad = (
        jax.jit(jax.grad(next_chunk_loss))
        .lower(state_kv(carry), carry, jnp.int32(0))
        .compile(TOLERANT_COMPILE)
    )
    carry, _ = step(carry, jnp.int32(0))
    for c in range(3):
        g = grad(state_kv(carry), carry, jnp.int32(c))
        assert _nonzero(g) == ((c + 1) % k != 0), (k, c)
        carry, _ = step(carry, jnp.int32(c + 1))


# --------------------------------------------------------------------------------------------
# (b) a direct signal on the state
# --------------------------------------------------------------------------------------------


@functools.cache
def _rollout():
    """(params -> (video, states), (params, cotangents) -> d params) of one fixed rollout (same key
    every call: the states are a function of the params), compiled once for every state_loss."""
    obj = _objective()
    text, key = _text(), jax.random.key(3)

    def roll(p):
        return obj.rollout(p, text, key, jnp.int32(0), 2)  # video [B, 6, h, w, C], states [B, 2, 1, h, w, C]

    params = _params(obj, 1)
    fwd = jax.jit(roll).lower(params).compile(TOLERANT_COMPILE)
    out = jax.eval_shape(roll, params)
    pull = jax.jit(lambda p, ct: jax.vjp(roll, p)[1](ct)[0]).lower(params, out).compile(TOLERANT_COMPILE)
    return fwd, pull


def _models(obj):
    student, teacher = _params(obj, 1), _params(obj, 2)
    critic = jax.tree.map(jnp.copy, teacher)
    critic["head"]["bias"].value = teacher["head"]["bias"][...] + SHIFT  # x0_fake - x0_real = -sigma SHIFT
    return student, teacher, critic


def _term(kind, **train):
    """params -> (state term, d term / d params, states, content [B, N, F, h, w, C]): the
    objective's own `state_loss` on the rollout's outputs, its gradient pulled back through it."""
    obj = _objective(state_loss=kind, **train)
    student, teacher, critic = _models(obj)
    text = _text()
    fwd, pull = _rollout()
    term = jax.jit(
        jax.value_and_grad(
            lambda video, states: obj.state_loss(states, video, teacher, critic, text, jax.random.key(4)),
            argnums=(0, 1),
        )
    )

    def value_and_grad(p):
        video, states = fwd(p)
        value, cotangent = term(video, states)
        content = video.reshape(states.shape[0], states.shape[1], -1, *video.shape[2:])
        return value, pull(p, cotangent), np.asarray(states), np.asarray(content)

    return student, value_and_grad


def test_state_loss_none_adds_nothing():
    student, value_and_grad = _term("none")
    value, g, _, _ = value_and_grad(student)
    assert float(value) == 0.0 and not _nonzero(g)


@pytest.mark.parametrize("kind", ["regress", "dmd"])
def test_state_loss_moves_the_state_toward_its_target(kind):
    """The term is non-zero with a non-zero gradient; a few optimiser steps on it alone move the
    state toward its target: 'regress', the mean of its chunk's content (the distance falls);
    'dmd', along x0_real - x0_fake (here the teacher's and critic's heads differ by a bias, so
    the target direction is +SHIFT per channel)."""
    p, value_and_grad = _term(kind)
    tx = optax.adam(3e-3)
    opt = tx.init(p)
    apply = jax.jit(lambda p, g, opt: (lambda u: (optax.apply_updates(p, u[0]), u[1]))(tx.update(g, opt, p)))
    values, states, contents = [], [], []
    for _ in range(6):
        value, g, s, content = value_and_grad(p)
        assert _nonzero(g)
        values.append(float(value))
        states.append(s)
        contents.append(content)
        p, opt = apply(p, g, opt)
    assert values[0] > 0
    if kind == "regress":
        dist = [np.mean((s - c.mean(axis=2, keepdims=True)) ** 2) for s, c in zip(states, contents)]
        assert dist[-1] < 0.8 * dist[0], dist
    else:
        along = [float(np.mean((s - states[0]) * SHIFT)) for s in states[1:]]  # per channel, signed
        assert all(b > a for a, b in zip([0.0, *along], along)), along


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dmd", "regress"])
def test_a_dmd_train_step_runs_with_each_state_loss(kind):
    """The whole generator + critic step with the state term (the critic also fits the states
    under 'dmd'): finite, and the term is reported in the metrics."""
    obj = _objective(state_loss=kind)
    student, teacher, critic = _models(obj)
    state = obj.init_state(jax.random.key(0), {"params": student, "teacher": teacher})
    state = state.replace(critic_params=critic)
    batch = {"latents": jnp.zeros((2, 6, 2, 2, 4)), "text": _text()}
    state, metrics = jax.jit(obj.train_step).lower(state, batch).compile(TOLERANT_COMPILE)(state, batch)
    assert bool(metrics["finite"]) and float(metrics["state_loss"]) > 0


def test_state_loss_is_refused_without_a_state():
    cfg = _cfg(state_loss="regress")
    cfg.stream.anchor = "window"
    with pytest.raises(
        ValueError, match=r"config\.train\.state_loss: 'regress' .* config\.stream\.anchor='window'"
    ):
        config_lib.parse(cfg)
    with pytest.raises(ValueError, match=r"config\.train\.state_loss: unknown 'teacher'"):
        config_lib.parse(_cfg(state_loss="teacher"))
    with pytest.raises(ValueError, match=r"config\.train\.state_loss_weight"):
        config_lib.parse(_cfg(state_loss_weight=-1.0))


# --------------------------------------------------------------------------------------------
# (c) the adastate student initialised from a trained window student
# --------------------------------------------------------------------------------------------


def _export(path, cfg, params, **info):
    checkpoint_io.save_params(str(path), params, config_lib.to_json(cfg), info=info)
    return str(path)


def test_adastate_dmd_starts_bitwise_from_a_window_export_and_records_it(tmp_path):
    """ODE export (window, 200 steps) -> window DMD run -> adastate DMD run with
    init_from = the window export and init_policy = 'window': the adastate train state's params
    are the window export's bit for bit, and its export's info names the chain and its steps."""
    base = _cfg(steps=0)
    base.text.kind = "words"  # the PanWorld data's prompts (no step runs: steps = 0)
    obj = dmd.SelfForcingDMD(config_lib.parse(base))
    ode_params = _params(obj, 5)
    ode_cfg = panworld_config("ode")  # its stream.anchor is 'window'
    ode = _export(tmp_path / "ode", ode_cfg, ode_params, step=200, objective="ode_init")
    teacher = _export(tmp_path / "teacher", base, _params(obj, 6), step=1000, objective="flow_matching")

    window = base.copy_and_resolve_references()
    window.stream.anchor = "window"
    window.train.update(init_from=ode, teacher_path=teacher, state_loss="none")  # a window student: no state
    loop.train(window, str(tmp_path / "window"), mesh=one_device_mesh())
    window_export = str(tmp_path / "window" / "export")
    info_w = checkpoint_io.read_info(window_export)
    assert info_w["policy"] == "window" and info_w["init_policy"] == "window" and info_w["init_steps"] == 200

    ada = base.copy_and_resolve_references()
    ada.train.update(init_from=window_export, teacher_path=teacher, init_policy="window")
    run = loop.setup(ada, str(tmp_path / "ada"), one_device_mesh())
    with jax.set_mesh(run.mesh):
        state = loop.init_state(run)
    stored = checkpoint_io.load_params(window_export, wan.abstract_model(obj.model_cfg)[1])
    for a, b, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(stored), jax.tree.leaves(ode_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    loop.train(ada, str(tmp_path / "ada"), mesh=one_device_mesh())
    info = checkpoint_io.read_info(str(tmp_path / "ada" / "export"))
    assert info["policy"] == "adastate" and info["init_policy"] == "window"
    assert [(c["objective"], c["policy"], c["step"]) for c in info["init_chain"]] == [
        ("self_forcing_dmd", "window", 0),
        ("ode_init", "window", 200),
    ]
    assert info["init_steps"] == 200

    ada.train.init_policy = "sink"  # the export says window: refused, naming the field
    with pytest.raises(ValueError, match=r"config\.train\.init_policy='sink': .* records policy 'window'"):
        loop.setup(ada, str(tmp_path / "ada2"), one_device_mesh())
