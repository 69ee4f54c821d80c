"""Each objective lowers its loss on a tiny PanWorld problem within a dozen or so steps (CPU, 1 device);
the non-finite guard stops training and keeps the last good state."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import checkpoint_io, wan
from adastate_jax.training import loop
from adastate_jax.training.objectives import dmd
from tests.subproc import TOLERANT_COMPILE
from tests.training.conftest_helpers import one_device_mesh, panworld_config, read_metrics


def _first_last(workdir, key="loss", n=5):
    rows = read_metrics(workdir)
    vals = [r[key] for r in rows]
    return float(np.mean(vals[:n])), float(np.mean(vals[-n:]))


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A random (non-zero head) DiT of the PanWorld config, exported like a teacher run's export."""
    cfg = panworld_config("teacher")
    cfg.model.zero_init_head = False
    mcfg = wan.WanConfig(**{**cfg.model.to_dict(), "patch_size": tuple(cfg.model.patch_size)})
    params = nnx.split(wan.create_model(mcfg, seed=1))[1]
    path = str(tmp_path_factory.mktemp("teacher") / "export")
    checkpoint_io.save_params(path, params)
    return path


def test_flow_matching_lowers_loss_and_nonfinite_guard_keeps_last_good_state(tmp_path):
    cfg = panworld_config("teacher", steps=15, lr=3e-3, t_sampling="clip")
    out = loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    first, last = _first_last(tmp_path)
    assert last < 0.9 * first, (first, last)
    assert os.path.isdir(tmp_path / "export" / "params")

    # guard: continue to step 20 with a NaN batch at step 18 -> stops, state of step 18 saved
    cfg.train.steps = 20
    cfg.train.inject_nan_at = 18
    with pytest.raises(
        loop.NonFiniteError, match=r"non-finite loss .* at step 18 on the batch of panworld records \["
    ) as e:
        loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    assert "bad_batches='skip'" in str(e.value)
    (row,) = [json.loads(x) for x in open(tmp_path / "bad_batches.jsonl")]
    assert row["step"] == 18 and row["action"] == "stopped" and row["source"] == "panworld"
    assert len(row["records"]) == cfg.train.batch_size and str(row["records"]) in str(e.value)
    assert (tmp_path / "checkpoints" / "18").is_dir()
    from adastate_jax.training.checkpoint import TrainCheckpointer

    run = loop.setup(cfg, str(tmp_path), one_device_mesh())
    state, step, _ = TrainCheckpointer(str(tmp_path / "checkpoints")).restore_latest(
        run.abstract_state, run.state_shardings
    )
    assert step == 18 and int(state.step) == 18
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state.params))
    del out


def test_nonfinite_batches_can_be_skipped_and_logged(tmp_path, capsys):
    """train.bad_batches='skip': the non-finite step is not applied, the batch's records are logged
    to WORKDIR/bad_batches.jsonl, and training reaches its last step."""
    cfg = panworld_config("teacher", steps=4, inject_nan_at=2, bad_batches="skip")
    out = loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    assert out["step"] == 4 and [r["step"] for r in out["skipped"]] == [2]
    (row,) = [json.loads(x) for x in open(tmp_path / "bad_batches.jsonl")]
    assert row["action"] == "skipped" and len(row["records"]) == cfg.train.batch_size
    assert "non-finite loss on the batch of panworld records" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "export" / "params")


def test_ode_init_lowers_loss(tmp_path, random_teacher):
    cfg = panworld_config("ode", steps=12, lr=3e-3, init_from="", teacher_path=random_teacher, ode_substeps=2)
    cfg.sampler.denoising_steps = (1000, 500)
    # the whole-clip trajectory (the chunk-by-chunk default costs ~2x chunks the passes; its loss on
    # the fly is checked in tests/training/test_ode_trajectories.py)
    cfg.train.teacher_attention = "diffusion_forcing"
    loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    first, last = _first_last(tmp_path)
    assert last < 0.7 * first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ["adastate", "sink"])
def test_self_forcing_dmd_trains_critic_and_generator(tmp_path, random_teacher, anchor):
    cfg = panworld_config(
        f"dmd,{anchor}", steps=24, init_from=random_teacher, teacher_path=random_teacher, critic_steps=2
    )
    cfg.sampler.denoising_steps = (1000, 500)
    loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    first, last = _first_last(tmp_path, "critic_loss")
    assert last < first, (first, last)
    rows = read_metrics(tmp_path)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["dmd_gap"] > 0  # the critic has moved away from the teacher: a real DMD signal


def test_horizon_weights_have_mean_one_and_grow_linearly():
    w = dmd.horizon_weights(9, 2.0)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[-1] / w[0], 3.0, rtol=1e-6)
    np.testing.assert_allclose(np.diff(w), np.full(8, np.diff(w)[0]), rtol=1e-5)
    np.testing.assert_array_equal(dmd.horizon_weights(9, 0.0), np.ones(9, np.float32))


def test_truncated_gradient_through_adastate_carry(tmp_path, random_teacher):
    """K = 2: the loss on chunk 1 reaches params through chunk 0's committed carry; with K = 1
    (cache detached every chunk) that path is cut, so the gradients differ."""
    import jax.numpy as jnp

    grads = {}
    for k in (1, 2):
        cfg = panworld_config(
            "dmd,adastate", init_from=random_teacher, teacher_path=random_teacher, truncation_chunks=k
        )
        cfg.sampler.denoising_steps = (1000,)
        from adastate_jax import config as config_lib

        obj = dmd.SelfForcingDMD(config_lib.parse(cfg))
        params = checkpoint_io.load_params(random_teacher, wan.abstract_model(obj.model_cfg)[1])
        text = jnp.ones((1, 8, 32), jnp.float32)

        def late_chunk_loss(p, obj=obj, text=text):
            video, _ = obj.rollout(p, text, jax.random.key(0), jnp.int32(0), 2)
            return jnp.mean(jnp.square(video[:, 3:]))  # chunk 1 only

        grads[k] = jax.jit(jax.grad(late_chunk_loss), compiler_options=TOLERANT_COMPILE)(params)
    g1, g2 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads[k])]) for k in (1, 2))
    assert np.abs(g1 - g2).max() > 1e-6 * np.abs(g2).max()


def test_drop_text_zeroes_whole_prompts_with_the_given_probability():
    from adastate_jax.training.objectives.flow_matching import drop_text

    text = jax.numpy.ones((2000, 4, 3))
    dropped = np.asarray(drop_text(jax.random.key(0), text, 0.3))
    per_example = dropped.reshape(2000, -1)
    assert set(np.unique(per_example.min(1))) == {0.0, 1.0}  # an example keeps all or nothing
    assert np.array_equal(per_example.min(1), per_example.max(1))
    assert abs((per_example[:, 0] == 0).mean() - 0.3) < 0.04
    assert drop_text(jax.random.key(0), text, 0.0) is text  # rate 0: untouched


def test_text_dropout_one_trains_on_zero_prompts():
    """With text_dropout=1 the objective's loss is the loss on zero prompt embeddings (what
    classifier-free guidance uses as the unconditional input), not the loss on the batch's prompts."""
    import jax.numpy as jnp

    from adastate_jax.training.objectives import flow_matching as fm

    cfg = panworld_config("teacher", text_dropout=1.0)
    cfg.model.zero_init_head = False  # a head that reads the prompt: the two reference losses differ
    from adastate_jax import config as config_lib

    obj = fm.FlowMatching(config_lib.parse(cfg))
    state = obj.init_state(jax.random.key(0), {})
    rng = np.random.default_rng(0)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, 3, 4, 4, 48)), jnp.float32),
        "prompt_ids": jnp.asarray([[1, 2, 3, 0], [4, 0, 0, 0]], jnp.int32),
    }
    key = jax.random.key(3)
    text = fm.batch_text(obj.text_graphdef, state.frozen, batch)  # [B, T, D]
    key_loss, _ = jax.random.split(key)  # the split the objective makes when text_dropout > 0

    @jax.jit
    def ref(t):
        x0, table = batch["latents"], jnp.asarray(obj.table)
        return fm.flow_matching_loss(
            obj.graphdef, state.params, x0, t, key_loss, obj.layout, obj.t_sampling, table
        )[0]

    got = float(jax.jit(obj.loss)(state.params, state.frozen, batch, key)[0])
    assert np.isclose(got, float(ref(jnp.zeros_like(text))), rtol=1e-6)
    assert abs(got - float(ref(text))) > 1e-5 * abs(got)  # the prompt matters to this model


def test_text_dropout_outside_unit_interval_is_refused():
    from adastate_jax import config as config_lib
    from adastate_jax.training.objectives import flow_matching as fm

    cfg = panworld_config("teacher", text_dropout=1.5)
    with pytest.raises(ValueError, match="config.train.text_dropout"):
        fm.FlowMatching(config_lib.parse(cfg))
