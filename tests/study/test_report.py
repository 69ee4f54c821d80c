"""The study report's evidence against an implementation error: the tests it cites exist, and the
decoded-state motion it reports tells a state that is written from one that is not."""

import ast
import os

import numpy as np
import pytest

from adastate_jax import video
from adastate_jax.study import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PW = {"frame_height": 16, "frame_width": 16}


@pytest.mark.parametrize("what,test", report.IMPLEMENTATION_CHECKS)
def test_every_cited_test_exists(what, test):
    path, name = test.split("::")
    with open(os.path.join(REPO, path)) as fh:
        tree = ast.parse(fh.read())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert name in names, f"{what}: {test} is not a test function of {path}"


def _write(run_dir, arm, state):
    """A showcase rollout of 6 chunks x 3 frames (a sprite moving right) and its decoded state."""
    os.makedirs(run_dir / "showcase", exist_ok=True)
    frames = np.full((18, 16, 16, 3), -1.0, np.float32)
    for t in range(18):
        frames[t, 4:10, t % 12 : t % 12 + 4] = 1.0
    video.write_video(str(run_dir / "showcase" / f"{arm}.mp4"), frames, fps=8.0)
    video.write_video(str(run_dir / "showcase" / f"{arm}_state.mp4"), state, fps=8.0)


def test_state_motion_tells_a_written_state_from_a_constant_one(tmp_path):
    constant = np.zeros((6, 16, 16, 3), np.float32)
    moving = np.stack([np.full((16, 16, 3), -1.0 + 0.4 * c, np.float32) for c in range(6)])
    _write(tmp_path / "a", "adastate_a2", constant)
    _write(tmp_path / "b", "adastate_a2", moving)
    still = report.state_motion(str(tmp_path / "a"), "adastate_a2", PW)
    moved = report.state_motion(str(tmp_path / "b"), "adastate_a2", PW)
    assert still["chunks"] == moved["chunks"] == 6
    assert still["video_change"] > 0.05 and moved["video_change"] == pytest.approx(still["video_change"])
    assert still["state_change"] < 0.02 and still["ratio"] < 0.1
    assert moved["state_change"] == pytest.approx(0.4, abs=0.03) and moved["ratio"] > 1.2
    assert report.state_motion(str(tmp_path / "a"), "adastate_a4", PW) is None  # no rollout: None


def test_the_section_cites_the_tests_and_the_runs_numbers():
    attention = [
        dict(arm="adastate_a2", span="1x", anchor=0.21, window=0.5, current=0.29, anchor_vs_uniform=1.7),
        dict(arm="sink", span="1x", anchor=0.4, window=0.3, current=0.3, anchor_vs_uniform=3.0),
    ]
    motion = [dict(arm="adastate_a2", chunks=42, state_change=0.1, video_change=0.2, ratio=0.5)]
    text = "\n".join(report.implementation_section(attention, motion))
    assert all(test in text for _, test in report.IMPLEMENTATION_CHECKS)
    assert "`adastate_a2` reads its state: attention share 0.210" in text and "1.70x" in text
    assert "`adastate_a2` writes its state" in text and "ratio 0.50" in text
    assert "`sink` reads" not in text
    assert "have not run yet" in "\n".join(report.implementation_section([], []))


def test_timings_sum_stage_seconds_and_span_the_wall_clock(tmp_path):
    """Two stages side by side: the sum counts both, the span is what a user waited."""
    from types import SimpleNamespace

    from adastate_jax.study import runner

    plan = SimpleNamespace(stages=[SimpleNamespace(name=n, group=g) for n, g in (("a", "x"), ("b/c", "y"))])
    runner.write_record(
        str(tmp_path), "a", dict(seconds=600.0, started="2026-12-02T10:00:00", finished="2026-12-02T10:10:00")
    )
    runner.write_record(
        str(tmp_path),
        "b/c",
        dict(seconds_total=900.0, started="2026-12-02T10:05:00", finished="2026-12-02T10:20:00"),
    )
    t = report.timings(str(tmp_path), plan)
    assert t["per_group"] == {"x": 600.0, "y": 900.0} and t["total"] == 1500.0
    assert t["span"] == 1200.0
    assert report.timings(str(tmp_path / "none"), plan)["span"] is None


def test_the_main_table_keeps_the_pooled_row_of_a_multi_seed_arm_and_the_only_row_of_the_others():
    rows = [dict(arm="window", horizon=4, train_seed=s, train_seeds=[s]) for s in (0, 1)] + [
        dict(arm="window", horizon=4, train_seed="all", train_seeds=[0, 1]),
        dict(arm="sink", horizon=4, train_seed=0, train_seeds=[0]),
        dict(arm="frozen", horizon=4, train_seed="-"),
    ]
    assert [(r["arm"], r["train_seed"]) for r in report.pooled(rows)] == [
        ("window", "all"),
        ("sink", 0),
        ("frozen", "-"),
    ]
