"""launch/compare.py end to end: policies in one labelled video with running scores (two policies
here to keep it fast; tests/test_notebook.py compares all five through the same `demo.compare`)."""

import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from adastate_jax import demo, shipped
from tests.subproc import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd):
    env = child_env()
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "compare.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def test_compare_random_writes_labelled_policies_with_scores(tmp_path):
    r = _run(
        "--random",
        "--config=configs/tiny.py",
        "--config.model.num_layers=1",
        "--policies=sink,adastate",
        "--num_chunks=2",
        "--prompt=Pan left medium",
        "--min_tile=64",
        "--plot",
        f"--out={tmp_path / 'cmp.gif'}",
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "untrained" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("random ")]
    assert [row.split()[1] for row in rows] == ["sink", "adastate"]  # one table row per policy, in order
    frames = np.stack(imageio.mimread(tmp_path / "cmp.gif"))
    assert frames.shape[0] == 2 * 3  # 2 chunks x 3 frames (PatchCodec: a frame per latent)
    assert frames.shape[2] == 2 * 64 + 4  # two 64 px tiles, 4 px apart
    assert (tmp_path / "cmp.mp4").stat().st_size > 1000 and (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_refuses_bad_policy_and_missing_models(tmp_path):
    r = _run("--random", "--policies=window,sinc", cwd=str(tmp_path))  # a flag error, as a user sees it
    assert r.returncode != 0 and "--policies=" in r.stderr
    # a root without models: compare.py's two refusals come from these library calls
    none = str(tmp_path / "none")
    assert demo.load_students(None, none, allow_random=False) == []  # -> "no shipped students in ..."
    with pytest.raises(shipped.ShippedModelError, match="no shipped student for anchor 'window'"):
        demo.load_students(["window"], none, allow_random=False)
