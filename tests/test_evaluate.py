"""launch/evaluate.py end to end (subprocesses, tiny config, tiny settings).

The sanity rows are real PanWorld clips, so their values are specified here: ground truth has
progression ~1 and pull 0, a frozen first frame progression 0 and positive pull, a pan that snaps
back is caught by return-to-start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adastate_jax.data import panworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "evaluate.py")
METRICS = ["progression", "pull", "return", "dd_dis", "flicker", "code_conf", "conf_drift", "psnr", "ssim"]
COLUMNS = ["horizon", "source", "n"] + METRICS
TINY = ["--horizons=1,2", "--horizon_chunks=2", "--bootstrap=100"]


def _run(args, timeout=180):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _row(report, source, horizon):
    (row,) = [r for r in report["rows"] if r["source"] == source and r["horizon"] == horizon]
    return row


@pytest.fixture(scope="module")
def rollout_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    # labels 3 (pan left fast), 6 (pan right fast), 7 (back and forth)
    res = _run([*TINY, "--policies=window,adastate", "--seeds=0,1", "--labels=3,6,7", f"--out_dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "results.json") as fh:
        return out, json.load(fh), res


def test_outputs_exist_parse_and_have_the_promised_columns(rollout_eval):
    out, report, res = rollout_eval
    assert "randomly initialised" in res.stdout  # the warning
    assert report["columns"] == COLUMNS
    assert list(report["metrics"]) == METRICS
    assert report["bootstrap_resamples"] == 100
    with open(out / "results.md") as fh:
        md = fh.read()
    header = next(line for line in md.splitlines() if line.startswith("| horizon"))
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    sources = ["window", "adastate", "ground_truth", "frozen", "snap_back"]
    assert {(r["source"], r["horizon"]) for r in report["rows"]} == {(s, h) for s in sources for h in (1, 2)}
    for name in report["plots"]:
        with open(out / name, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(report["plots"]) == {"metrics_vs_time.png", "attention_share.png"}


def test_policy_rows_cover_every_prompt_and_seed_and_say_the_code_is_unreadable(rollout_eval):
    _, report, _ = rollout_eval
    for policy in ("window", "adastate"):
        for h in (1, 2):
            row = _row(report, policy, h)
            assert row["videos"] == 3 * 2
            assert row["psnr"]["mean"] is None and row["ssim"]["mean"] is None  # no known world: NaN
            assert 0.0 <= row["code_conf"]["mean"] < 0.5  # a random model draws no position code
            assert row["code_conf"]["lo"] <= row["code_conf"]["mean"] <= row["code_conf"]["hi"]
    assert report["horizon_frames"] == {"1": 6, "2": 12}
    per_video = [r for r in report["per_video"] if r["source"] == "adastate" and r["horizon"] == 2]
    assert sorted((r["clip"], r["seed"]) for r in per_video) == [(c, s) for c in range(3) for s in (0, 1)]


def test_sanity_rows_ground_truth_frozen_and_snap_back(rollout_eval):
    _, report, _ = rollout_eval
    for h in (1, 2):
        gt, frozen = _row(report, "ground_truth", h), _row(report, "frozen", h)
        assert abs(gt["progression"]["mean"] - 1.0) < 0.05
        assert abs(gt["pull"]["mean"]) < 1e-9
        assert gt["return"]["mean"] == 0.0
        assert gt["code_conf"]["mean"] > 0.9
        assert abs(frozen["progression"]["mean"]) < 0.05
        assert frozen["pull"]["mean"] > 0.1
        assert frozen["dd_dis"]["mean"] == 0.0
    assert _row(report, "snap_back", 2)["return"]["mean"] == 1.0  # 12 frames: 10 px back, > W/4 = 4 px


def test_attention_shares_are_fractions_and_show_the_state(rollout_eval):
    _, report, _ = rollout_eval
    att = report["attention_share"]
    assert att["groups"] == ["anchor", "window", "current"]
    for policy in ("window", "adastate"):
        share = np.asarray(att["per_policy_chunk_group"][policy])  # [chunk, group]
        assert share.shape == (4, 3)
        np.testing.assert_allclose(share.sum(-1), 1.0, atol=1e-4)
    assert np.all(np.asarray(att["per_policy_chunk_group"]["window"])[:, 0] == 0)
    assert np.all(
        np.asarray(att["per_policy_chunk_group"]["adastate"])[1:, 0] > 0
    )  # state read after chunk 0


def test_videos_dir_scores_videos_on_disk(tmp_path):
    """A ground-truth copy written as an upscaled mp4 and a frozen one as npz, described by a manifest,
    are scored like the sanity rows (the held-out clip of label L is PanWorld clip index L)."""
    from adastate_jax import video

    pw = panworld.PanWorldConfig(seed=1000)  # 32x32: evaluate.py's held-out config at this size
    clip = panworld.make_clip(pw, index=6, num_frames=12, label=6)
    videos = tmp_path / "videos"
    written = video.write_video(str(videos / "gt.mp4"), video.upscale(clip["video"], 128), fps=16)
    np.savez(videos / "frozen.npz", video=np.repeat(clip["video"][:1], 12, axis=0))
    manifest = {
        "videos": [
            dict(path=os.path.basename(written), policy="gt_copy", prompt="pan right fast", seed=0),
            dict(path="frozen.npz", policy="frozen_copy", prompt="pan right fast", seed=0),
        ]
    }
    (videos / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    res = _run([*TINY, f"--videos_dir={videos}", "--labels=6", "--frame_size=32x32", f"--out_dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    gt, frozen = _row(report, "gt_copy", 2), _row(report, "frozen_copy", 2)
    assert abs(gt["progression"]["mean"] - 1.0) < 0.1  # through mp4 compression and a 4x downscale
    assert abs(gt["pull"]["mean"]) < 0.05
    assert abs(frozen["progression"]["mean"]) < 0.05 and frozen["pull"]["mean"] > 0.1
    assert report["plots"] == ["metrics_vs_time.png"]  # no attention recorded for videos on disk


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--checkpoints=bogus:/tmp"], "--checkpoints entry 'bogus:/tmp'"),
        (["--horizons=1,x"], "--horizons="),
        (["--labels=9"], "--labels="),
    ],
)
def test_bad_flags_are_named(args, needle):
    res = _run(args, timeout=60)
    assert res.returncode != 0
    assert needle in res.stderr + res.stdout
