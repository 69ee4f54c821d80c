"""`eval/targets.py`: stored ODE targets scored as PanWorld videos. The ground-truth clips encoded
with the run's codec score as the ground truth does (progression 1, no return, code confidence
~1); the same latents with their frames in reverse order read as pans the wrong way, and noise has
no position code."""

import numpy as np
import pytest

from adastate_jax import config as config_lib
from adastate_jax.data import panworld
from adastate_jax.eval import targets
from tests.training.conftest_helpers import panworld_config


@pytest.fixture(scope="module")
def exp():
    return config_lib.parse(panworld_config("ode"))


def _records(exp, indices, transform=lambda z: z):
    import jax.numpy as jnp

    codec = exp.patch_codec()
    out = []
    for i in indices:
        video = panworld.make_clip(exp.data.panworld, i)["video"]
        z = np.asarray(codec.encode(jnp.asarray(video)[None])[0])
        out.append({"latents": transform(z), "index": np.int64(i)})
    return out


def test_encoded_ground_truth_scores_as_ground_truth(exp):
    rows = targets.score_records(exp, _records(exp, range(8)))
    assert [r["index"] for r in rows] == list(range(8))
    assert {r["prompt"] for r in rows} == set(panworld.camera_prompts(exp.data.panworld))
    pans = [r for r in rows if r["prompt"].startswith("pan ")]
    assert len(pans) == 6
    for r in pans:
        assert r["progression"] == pytest.approx(1.0, abs=0.02) and r["return"] == 0.0, r
    assert min(r["code_conf"] for r in rows) > 0.98
    table = targets.format_table(rows)
    assert "| all pans | 6 | 1.00 / 1.00 | 0.00 |" in table, table


def test_reversed_and_noise_targets_are_told_apart(exp):
    reversed_rows = targets.score_records(exp, _records(exp, range(1, 7), lambda z: z[::-1]))
    assert all(r["progression"] < -0.9 for r in reversed_rows), reversed_rows
    rng = np.random.default_rng(0)
    noise = targets.score_records(exp, _records(exp, range(1, 3), lambda z: rng.normal(0, 0.4, z.shape)))
    assert max(r["code_conf"] for r in noise) < 0.5, noise


def test_a_source_other_than_panworld_is_refused(exp):
    import dataclasses

    other = dataclasses.replace(exp, data=dataclasses.replace(exp.data, source="video", paths=("clips",)))
    with pytest.raises(ValueError, match="config.data.source='video'"):
        targets.score_records(other, [])
