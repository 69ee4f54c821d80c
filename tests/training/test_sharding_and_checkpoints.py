"""Distribution and checkpoint properties of the trainer (in process, 8 fake CPU devices).

* the sharded train step (data 2 x fsdp 2 x tensor 2) matches the single-device step;
* a checkpoint written on one mesh restores bit-exactly onto other mesh shapes, in their shardings;
* a corrupted or truncated latest checkpoint is refused with a clear error, moved aside, and the
  previous good one is used.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adastate_jax import sharding as shd
from adastate_jax.config import parse
from adastate_jax.data import pipeline
from adastate_jax.training import loop
from adastate_jax.training.checkpoint import CheckpointCorrupt, TrainCheckpointer, config_changes
from adastate_jax.training.state import TrainState
from tests.training.conftest_helpers import panworld_config


def _run_one_step(cfg, mesh, local_batch):
    run = loop.setup(cfg, "/tmp/unused", mesh)
    with jax.set_mesh(mesh):
        state = loop.init_state(run)
        batch = loop.global_batch(run, local_batch)
        step = loop.jit_train_step(run)
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
    return run, state, metrics


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_step_matches_single_device_and_restores_onto_other_meshes(tmp_path):
    cfg = panworld_config("teacher", batch_size=4)
    local = next(pipeline.make_iterator(parse(cfg)))
    mesh1 = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    mesh8 = shd.make_mesh(2, 2, 2)
    _, s1, m1 = _run_one_step(cfg, mesh1, local)
    run8, s8, m8 = _run_one_step(cfg, mesh8, local)
    # params really are sharded on the 8-device mesh
    kernel = s8.params["blocks"]["ffn_in"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s8.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)

    # save on the 2x2x2 mesh, restore onto 1 device and onto fsdp 4 x tensor 2
    ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), use_async=True)
    ckpt.save(1, s8, data_state={"next_index": 1})
    ckpt.wait()
    for mesh in (mesh1, shd.make_mesh(1, 4, 2)):
        run = loop.setup(cfg, str(tmp_path), mesh)
        restored, step, meta = ckpt.restore_latest(run.abstract_state, run.state_shardings)
        assert step == 1 and meta["data_states"] == [{"next_index": 1}]
        for a, b, sh in zip(
            jax.tree.leaves(s8),
            jax.tree.leaves(restored),
            jax.tree.leaves(run.state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert b.sharding.is_equivalent_to(sh, b.ndim)
    ckpt.close()


def _toy_state(value: float) -> TrainState:
    params = {"w": jnp.full((64, 32), value, jnp.float32), "b": jnp.arange(32, dtype=jnp.float32) * value}
    return TrainState(
        step=jnp.int32(value),
        params=params,
        opt_state=(jnp.zeros((3,)),),
        ema_params=params,
        rng=jnp.zeros((2,), jnp.uint32),
    )


def _data_files(step_dir):
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        out += [
            os.path.join(root, f) for f in files if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep
        ]
    return [f for f in out if os.path.getsize(f) > 0]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_latest_checkpoint_is_refused_and_previous_used(tmp_path, capsys, damage):
    directory = str(tmp_path / "checkpoints")
    ckpt = TrainCheckpointer(directory, keep=3, use_async=False)
    ckpt.save(1, _toy_state(1.0))
    ckpt.save(2, _toy_state(2.0))
    ckpt.close()
    files = _data_files(os.path.join(directory, "2"))
    assert files, "no orbax data files found to damage"
    for f in files:
        with open(f, "r+b") as fh:
            data = bytearray(fh.read())
            if damage == "truncate":
                fh.truncate(len(data) // 2)
            else:
                for i in range(len(data) // 3, len(data), 97):
                    data[i] ^= 0x5A
                fh.seek(0)
                fh.write(data)
    target = jax.eval_shape(lambda: _toy_state(0.0))
    ckpt = TrainCheckpointer(directory, keep=3, use_async=False)
    with pytest.raises(CheckpointCorrupt, match=r"checkpoint .*/2"):
        ckpt.restore_step(2, target)
    state, step, _ = ckpt.restore_latest(target)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((64, 32), 1.0, np.float32))
    assert "REFUSED checkpoint" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "2.0")
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_checkpoint_of_another_structure_is_an_error_naming_leaves(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path / "c"), use_async=False)
    ckpt.save(1, _toy_state(1.0))
    other = jax.eval_shape(lambda: _toy_state(0.0).replace(params={"w": jnp.zeros((64, 32))}))
    with pytest.raises(ValueError, match="different train state.*unexpected"):
        ckpt.restore_latest(other)
    ckpt.close()


def test_a_checkpoint_keeps_its_config_and_the_changes_on_resume_are_listed(tmp_path):
    saved = {"train": {"lr": 0.001, "steps": 12, "text_dropout": 0.0}, "seed": 0, "model": {"dim": 32}}
    ckpt = TrainCheckpointer(str(tmp_path / "c"), use_async=False)
    ckpt.save(1, _toy_state(1.0), config_json=json.dumps(saved))
    ckpt.save(2, _toy_state(2.0))  # saved without a config
    assert ckpt.saved_config(1) == saved
    assert ckpt.saved_config(2) == {}
    ckpt.close()
    current = {
        "train": {"lr": 0.001, "steps": 1000, "text_dropout": 0.1},
        "seed": 0,
        "model": {"dim": 32, "depth": 2},
    }
    assert config_changes(saved, current) == [
        "model.depth: <absent> -> 2",
        "train.steps: 12 -> 1000",
        "train.text_dropout: 0.0 -> 0.1",
    ]
    assert config_changes(saved, saved) == []
