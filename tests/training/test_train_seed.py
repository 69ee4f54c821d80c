"""`config.train.seed` varies a run's PRNG (noise, timesteps, rollouts) without changing the frozen
PanWorld word encoder, which `config.seed` builds and a student must share with its teacher."""

import jax
import numpy as np

from adastate_jax.training import loop
from tests.training.conftest_helpers import one_device_mesh, panworld_config


def _state(train_seed):
    cfg = panworld_config("teacher", seed=train_seed)
    run = loop.setup(cfg, "/tmp/unused", mesh=one_device_mesh())
    return loop.init_state(run)


def test_train_seed_changes_the_key_not_the_word_encoder():
    default, same, other = _state(-1), _state(0), _state(5)
    np.testing.assert_array_equal(np.asarray(default.rng), np.asarray(same.rng))  # -1: config.seed (0)
    assert not np.array_equal(np.asarray(default.rng), np.asarray(other.rng))
    for a, b in zip(jax.tree.leaves(default.frozen["text"]), jax.tree.leaves(other.frozen["text"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
