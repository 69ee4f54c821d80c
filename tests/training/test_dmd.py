"""Self-forcing DMD: student, teacher and critic of three sizes checkpointed together; the critic's
config and init errors; and DMD moving the student's samples to the teacher's on a tiny problem."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from adastate_jax import config as config_lib
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.streaming import sampler as smp_lib
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.training import loop
from adastate_jax.training.checkpoint import TrainCheckpointer
from adastate_jax.training.objectives import dmd
from adastate_jax.training.objectives import flow_matching as fm
from tests.subproc import TOLERANT_COMPILE
from tests.training.conftest_helpers import one_device_mesh, panworld_config, read_metrics

# --------------------------------------------------------------------------------------------
# three sizes
# --------------------------------------------------------------------------------------------


def _sized(cfg, dim, heads):
    """config.model of `cfg` with another width (1 layer, as every model of these tests)."""
    d = cfg.model.to_dict()
    d.update(dim=dim, num_heads=heads, ffn_dim=2 * dim, num_layers=1, zero_init_head=False)
    return ml_collections.ConfigDict(d)


def _wan(section) -> wan.WanConfig:
    return config_lib.parse(ml_collections.ConfigDict({"model": section})).model


def _export(path, section, seed):
    params = nnx.split(wan.create_model(_wan(section), seed=seed))[1]
    checkpoint_io.save_params(str(path), params)
    return str(path)


def _shapes(tree):
    return [tuple(x.shape) for x in jax.tree.leaves(tree)]


def _three_size_config(tmp_path, **train):
    cfg = panworld_config("dmd,adastate", init_from="", critic_steps=1, **train)
    cfg.sampler.denoising_steps = (1000, 500)
    cfg.model = _sized(cfg, 32, 2)  # student
    cfg.teacher_model = _sized(cfg, 64, 4)
    cfg.critic_model = _sized(cfg, 48, 3)
    cfg.train.teacher_path = _export(tmp_path / "teacher", cfg.teacher_model, seed=1)
    return cfg


def test_dmd_with_student_teacher_and_critic_of_three_sizes(tmp_path):
    """Two DMD steps through `loop.train` with a dim-32 student, a dim-64 teacher and a dim-48
    critic; the teacher scores with teacher forcing and guidance (its clean context is the
    student's sample, as is the critic's in its flow matching: `test_teacher_forcing_scores_...`
    checks that context is read), so this one compiled step covers both."""
    cfg = _three_size_config(tmp_path, steps=2, teacher_attention="teacher_forcing", teacher_guidance=2.0)
    critic_path = _export(tmp_path / "critic", cfg.critic_model, seed=2)
    cfg.train.critic_path = critic_path
    work = tmp_path / "run"
    out = loop.train(cfg, str(work), mesh=one_device_mesh())
    assert out["step"] == 2
    rows = read_metrics(work)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["critic_loss"]) and r["dmd_gap"] >= 0 for r in rows)

    student, teacher, critic = (
        wan.abstract_model(_wan(s))[1] for s in (cfg.model, cfg.teacher_model, cfg.critic_model)
    )
    assert len({tuple(_shapes(t)) for t in (student, teacher, critic)}) == 3  # three different sizes

    # restore the checkpoint the run wrote (what a resume reads) into the run's abstract state
    run = loop.setup(cfg, str(work), one_device_mesh())
    with jax.set_mesh(run.mesh):
        state, step, _ = TrainCheckpointer(str(work / "checkpoints")).restore_latest(
            run.abstract_state, run.state_shardings
        )
    assert step == 2
    assert _shapes(state.params) == _shapes(student)
    assert _shapes(state.frozen["teacher"]) == _shapes(teacher)
    assert _shapes(state.critic_params) == _shapes(critic)
    for a, b in zip(jax.tree.leaves(state.critic_params), jax.tree.leaves(out["state"].critic_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the critic was trained (with its own graph) from the params of critic_path
    start = checkpoint_io.load_params(critic_path, critic)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(state.critic_params), jax.tree.leaves(start))
    )
    assert moved > 0


def test_differing_critic_needs_a_path_or_an_explicit_random_init(tmp_path):
    cfg = _three_size_config(tmp_path)
    with pytest.raises(ValueError) as e:
        dmd.SelfForcingDMD(config_lib.parse(cfg))
    for needle in ("config.critic_model", "config.train.critic_path", "critic_init='random'"):
        assert needle in str(e.value)

    cfg.train.critic_init = "random"
    obj = dmd.SelfForcingDMD(config_lib.parse(cfg))
    assert "critic" not in obj.pretrained()
    loaded = {"teacher": wan.abstract_model(obj.teacher_cfg)[1]}
    abstract = jax.eval_shape(obj.init_state, jax.random.key(0), loaded)
    assert _shapes(abstract.critic_params) == _shapes(wan.abstract_model(_wan(cfg.critic_model))[1])

    cfg.train.critic_path = str(tmp_path / "critic")
    with pytest.raises(ValueError, match="critic_path and config.train.critic_init='random'"):
        dmd.SelfForcingDMD(config_lib.parse(cfg))
    cfg.train.critic_init = "scratch"
    with pytest.raises(ValueError, match="config.train.critic_init: unknown 'scratch'"):
        dmd.SelfForcingDMD(config_lib.parse(cfg))
    cfg.train.critic_init = "teacher"
    cfg.critic_model.depth = 3
    with pytest.raises(ValueError, match=r"config\.critic_model\.depth: unknown field"):
        dmd.SelfForcingDMD(config_lib.parse(cfg))


def test_critic_path_of_the_wrong_shape_is_named(tmp_path):
    cfg = _three_size_config(tmp_path)
    cfg.train.critic_path = cfg.train.teacher_path  # teacher-sized params for a dim-48 critic
    run = loop.setup(cfg, str(tmp_path / "run"), one_device_mesh())
    with pytest.raises(checkpoint_io.CheckpointError, match="wrong shapes"):
        loop.init_state(run)


def test_critic_defaults_to_a_copy_of_the_teacher(tmp_path):
    """No critic_model: the critic has the teacher's config (here larger than the student) and
    starts as a copy of the teacher's params (DMD2); an equal-shaped critic_model does the same."""
    cfg = _three_size_config(tmp_path)
    teacher = checkpoint_io.load_params(
        cfg.train.teacher_path, wan.abstract_model(_wan(cfg.teacher_model))[1]
    )
    for critic_model in (None, cfg.teacher_model):
        if "critic_model" in cfg:
            del cfg["critic_model"]
        if critic_model is not None:
            cfg.critic_model = critic_model
        obj = dmd.SelfForcingDMD(config_lib.parse(cfg))
        assert obj.critic_cfg == obj.teacher_cfg != obj.model_cfg
        state = obj.init_state(jax.random.key(0), {"teacher": teacher})
        for a, b in zip(jax.tree.leaves(state.critic_params), jax.tree.leaves(teacher)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# DMD does its job: a shifted student is pulled back onto the teacher's samples
# --------------------------------------------------------------------------------------------

MU = np.array([1.0, -0.5, 0.5, -1.0], np.float32)  # the teacher's data: x0 ~ N(MU_c, 0.5^2) per channel
SHIFT = np.array([0.5, -0.5, 0.5, -0.5], np.float32)  # added to the student's output-head bias


def _tiny_dmd_config(lr):
    cfg = panworld_config(
        "dmd,adastate", lr=lr, critic_lr=1e-3, critic_steps=2, ema=0.0, alpha=0.0, init_from=""
    )
    cfg.text.kind = "embeddings"  # prompts come as embeddings in the batch
    cfg.model.update(
        dict(
            dim=32, num_heads=2, num_layers=1, ffn_dim=64, in_channels=4, out_channels=4, zero_init_head=False
        )
    )
    cfg.stream.latent_h = cfg.stream.latent_w = 2
    cfg.stream.max_frames = 6
    cfg.sampler.denoising_steps = (1000, 500)
    return cfg


def _train_teacher(mcfg, seed, steps=150):
    """A real (if tiny) teacher: flow matching on x0 ~ N(MU, 0.5^2), so its score is consistent."""
    graphdef, params = nnx.split(wan.create_model(mcfg, seed=100 + seed))
    tx = optax.adam(3e-3)
    table = jnp.asarray(smp_lib.training_timestep_table(1000, 3.0), jnp.float32)
    text = jax.random.normal(jax.random.key(7), (64, mcfg.text_len, mcfg.text_dim))
    layout = fm.ClipLayout("diffusion_forcing", 3)

    def step(p, opt, key):
        k_x, k_loss = jax.random.split(key)
        x0 = MU + 0.5 * jax.random.normal(k_x, (64, 6, 2, 2, 4))
        (loss, _), g = jax.value_and_grad(fm.flow_matching_loss, argnums=1, has_aux=True)(
            graphdef, p, x0, text, k_loss, layout, "chunk", table
        )
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    opt = tx.init(params)
    step = jax.jit(step).lower(params, opt, jax.random.key(0)).compile(TOLERANT_COMPILE)
    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.key(1000 * seed + i))
        losses.append(float(loss))
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), losses  # it learned something
    return params


def _sampler(cfg, n=32):
    """params -> per-channel (mean, std) of streamed samples of a fixed batch of seeds and prompts,
    from a Streamer built here (not the objective's) with the full denoising list."""
    exp = config_lib.parse(cfg)
    mcfg = exp.model
    streamer = Streamer(wan.abstract_model(mcfg)[0], mcfg, exp.stream, exp.sampler)
    text = jax.random.normal(jax.random.key(11), (1, n, mcfg.text_len, mcfg.text_dim))

    def sample(p):
        carry = streamer.init_carry(p, text, jax.random.key(1234))
        return streamer.rollout(p, carry, jnp.zeros((2,), jnp.int32), text)[1].latents

    compiled = {}

    def stats(params):
        if not compiled:
            compiled["f"] = jax.jit(sample).lower(params).compile(TOLERANT_COMPILE)
        x = np.asarray(compiled["f"](params)).reshape(-1, mcfg.out_channels)
        return x.mean(0), x.std(0)

    return stats


def _distance(a, b):
    return float(np.sqrt(np.sum((a[0] - b[0]) ** 2) + np.sum((a[1] - b[1]) ** 2)))


def _dmd_distances(teacher, stats, seed, lr, steps=40):
    """Distance of the student's samples to the teacher's before and after `steps` DMD steps."""
    cfg = _tiny_dmd_config(lr)
    obj = dmd.SelfForcingDMD(config_lib.parse(cfg))
    student = jax.tree.map(jnp.copy, teacher)
    student["head"]["bias"].value = teacher["head"]["bias"][...] + SHIFT
    state = obj.init_state(jax.random.key(seed), {"params": student, "teacher": teacher})
    batch = {"latents": jnp.zeros((8, 6, 2, 2, 4)), "text": jax.random.normal(jax.random.key(8), (8, 8, 32))}
    step = jax.jit(obj.train_step).lower(state, batch).compile(TOLERANT_COMPILE)
    target = stats(teacher)
    before = _distance(stats(state.params), target)
    for _ in range(steps):
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
    after = _distance(stats(state.params), target)
    return before, after


@pytest.mark.slow  # ~3 min on 2 cores: a teacher trained for 150 steps and 2 x 40 DMD steps
@pytest.mark.parametrize("seed", [0])  # tuned on seeds 0, 1, 2: after / before 0.16, 0.24, 0.21
def test_dmd_pulls_a_shifted_student_onto_the_teachers_samples(seed):
    """Student = teacher with a bias added to its output head, so its samples are shifted. The
    distance (per-channel mean and std) between student and teacher samples, streamed from the same
    seeds and prompts, must drop by more than half within 40 DMD steps; with the generator's
    learning rate at 0 (the critic still trains) it must not."""
    cfg = _tiny_dmd_config(3e-4)
    teacher = _train_teacher(config_lib.parse(cfg).model, seed)
    stats = _sampler(cfg)
    before, after = _dmd_distances(teacher, stats, seed, lr=3e-4)
    assert before > 0.5, before  # the shift is visible in the samples
    assert after < 0.5 * before, (before, after)
    before0, after0 = _dmd_distances(teacher, stats, seed, lr=0.0)
    assert before0 == pytest.approx(before)
    assert after0 > 0.9 * before0, (before0, after0)


# --------------------------------------------------------------------------------------------
# a teacher-forcing teacher scores the student's clip with the student's clean chunks as context
# --------------------------------------------------------------------------------------------


def test_teacher_forcing_scores_use_the_clean_sample_as_context():
    from adastate_jax.training.objectives.flow_matching import ClipLayout
    from adastate_jax.training.objectives.ode_init import guided_clip_velocity

    cfg = _tiny_dmd_config(1e-3)
    mcfg = config_lib.parse(cfg).model
    graphdef, params = nnx.split(wan.create_model(mcfg, seed=1))
    k = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(k[0], (2, 6, 2, 2, 4))
    clean = jax.random.normal(k[1], (2, 6, 2, 2, 4))
    t = jnp.full((2, 6), 600.0)
    text = jax.random.normal(k[2], (2, 8, 32))
    layout = ClipLayout("teacher_forcing", 3)
    forward = jax.jit(
        lambda p, x, t, text, clean: fm.clip_forward(graphdef, p, x, t, text, layout, clean=clean)
    )
    guide = jax.jit(
        lambda p, x, t, text, clean: guided_clip_velocity(graphdef, p, x, t, text, layout, 3.0, clean=clean)
    )
    v_c = forward(params, x, t, text, clean)
    v_u = forward(params, x, t, jnp.zeros_like(text), clean)
    guided = guide(params, x, t, text, clean)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(v_u + 3.0 * (v_c - v_u)), rtol=1e-4, atol=1e-5)
    other = guide(params, x, t, text, clean + 1.0)
    assert not np.allclose(np.asarray(other[:, 3:]), np.asarray(guided[:, 3:]))  # the context is read
    # the whole DMD step with a teacher-forcing teacher and critic runs in
    # test_dmd_with_student_teacher_and_critic_of_three_sizes
