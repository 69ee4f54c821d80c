"""The evaluation harness on the tiny config: rollouts of arms with training seeds, the sanity rows
(real PanWorld clips, so their values are specified: ground truth has progression ~1 and pull 0, a
frozen first frame progression 0 and positive pull, a pan that snaps back is caught by
return-to-start), videos on disk, the bootstrap intervals, and one subprocess run of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from adastate_jax import config as config_lib
from adastate_jax.config import cli
from adastate_jax.data import panworld
from adastate_jax.eval import arms, harness, report
from tests.subproc import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ["progression", "pull", "return", "dd_dis", "flicker", "code_conf", "conf_drift", "psnr", "ssim"]
# labels 3 (pan left fast), 6 (pan right fast), 7 (back and forth); 2 chunks = the "training horizon"
TINY = harness.Settings(horizons=(1, 2), horizon_chunks=2, seeds=(0,), labels=(3, 6, 7), resamples=100)


def _tiny_exp():
    return config_lib.parse(cli.load_file(os.path.join(ROOT, "configs", "tiny.py")))


def _rows(rows, arm, horizon):
    return {r["train_seed"]: r for r in rows if r["arm"] == arm and r["horizon"] == horizon}


def _row(rows, arm, horizon):
    (row,) = _rows(rows, arm, horizon).values()
    return row


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """adastate_a4 with two training seeds: seed 0 the random initialisation, seed 1 a different
    model read from a checkpoint dir (one arm: one compilation; `window` runs in the CLI test)."""
    from flax import nnx

    from adastate_jax.models import checkpoint_io, wan

    exp = _tiny_exp()
    ckpt = tmp_path_factory.mktemp("models") / "a4_s1"
    checkpoint_io.save_params(str(ckpt), nnx.split(wan.create_model(exp.model, seed=1))[1])
    a4 = arms.resolve_arm("adastate_a4")
    models = [arms.Model(a4, None, 0), arms.Model(a4, str(ckpt), 1)]
    return harness.evaluate(exp, TINY, harness.geometry(exp), models=models), ckpt


def test_rows_name_arm_horizon_and_train_seed_with_a_pooled_row_per_arm(rolled):
    results, ckpt = rolled
    assert results.mode == "checkpoints" and results.arms == ["adastate_a4"]
    per_horizon = [
        ("adastate_a4", 0),
        ("adastate_a4", 1),
        ("adastate_a4", "all"),
        ("ground_truth", None),
        ("frozen", None),
        ("snap_back", None),
    ]
    assert [(r["horizon"], r["arm"], r["train_seed"]) for r in results.rows] == [
        (h, *row) for h in (1, 2) for row in per_horizon
    ]
    for h in (1, 2):
        a4 = _rows(results.rows, "adastate_a4", h)
        assert set(a4) == {0, 1, harness.ALL_SEEDS}
        assert (a4[0]["videos"], a4[1]["videos"], a4["all"]["videos"]) == (3, 3, 6)
        assert a4["all"]["train_seeds"] == [0, 1] and a4[1]["train_seeds"] == [1]
        assert a4["all"]["progression"]["seeds"] == 2
        assert _row(results.rows, "frozen", h)["train_seed"] is None
    sources = {(m["arm"], m["train_seed"]): m["source"] for m in results.models}
    assert sources == {
        ("adastate_a4", 0): "random(seed=0)",
        ("adastate_a4", 1): str(ckpt),
    }
    per_video = [r for r in results.records if r["source"] == "adastate_a4" and r["horizon"] == 2]
    assert sorted((r["train_seed"], r["clip"], r["seed"]) for r in per_video) == [
        (t, c, 0) for t in (0, 1) for c in range(3)
    ]
    # two different models: their videos differ
    s0, s1 = ([r["scores"]["code_conf"] for r in per_video if r["train_seed"] == t] for t in (0, 1))
    assert s0 != s1


def test_random_models_score_as_unreadable_and_have_no_fidelity(rolled):
    results, _ = rolled
    for h in (1, 2):
        for row in _rows(results.rows, "adastate_a4", h).values():
            assert np.isnan(row["psnr"]["mean"]) and np.isnan(row["ssim"]["mean"])  # no known world
            assert 0.0 <= row["code_conf"]["mean"] < 0.5  # a random model draws no position code
            assert row["code_conf"]["lo"] <= row["code_conf"]["mean"] <= row["code_conf"]["hi"]


def test_sanity_rows_ground_truth_frozen_and_snap_back(rolled):
    results, _ = rolled
    for h in (1, 2):
        gt, frozen = _row(results.rows, "ground_truth", h), _row(results.rows, "frozen", h)
        assert gt["videos"] == 3
        assert abs(gt["progression"]["mean"] - 1.0) < 0.05
        assert abs(gt["pull"]["mean"]) < 1e-9
        assert gt["return"]["mean"] == 0.0
        assert gt["code_conf"]["mean"] > 0.9
        assert abs(frozen["progression"]["mean"]) < 0.05
        assert frozen["pull"]["mean"] > 0.1
        assert frozen["dd_dis"]["mean"] == 0.0
    assert _row(results.rows, "snap_back", 2)["return"]["mean"] == 1.0  # 12 frames: 10 px back, > W/4 = 4 px


def test_attention_shares_are_fractions_and_show_the_state(rolled):
    results, _ = rolled
    a4 = results.attention["adastate_a4"]
    assert a4.shape[:2] == (2, 4) and a4.shape[-1] == 3  # [model x seed, chunk, layer, group]
    np.testing.assert_allclose(a4.sum(-1), 1.0, atol=1e-4)
    assert np.all(a4.mean(axis=(0, 2))[1:, 0] > 0)  # the state is read after chunk 0


def test_arm_overrides_reach_the_streamer():
    from adastate_jax import build
    from adastate_jax.models import wan

    exp = _tiny_exp()
    graphdef = wan.abstract_model(exp.model)[0]
    sc = build.streamer(exp, graphdef, **arms.resolve_arm("longlive").overrides).stream_cfg
    assert (sc.anchor, sc.sink_frames, sc.window_frames) == ("sink", 3, 6)


def test_running_scores_follow_the_clip():
    """Ground truth: progression 1 and pull 0 at every frame; frozen: progression 0, pull > 0."""
    pw = harness.panworld_config(16, 16, 1000)
    (clip,) = harness.held_out_clips(pw, [6], 1, 12)
    gt = harness.running_scores(clip.video, clip)
    assert np.isnan(gt["progression"][0]) and np.isnan(gt["pull"][0])
    np.testing.assert_allclose(gt["progression"][1:], 1.0, atol=0.05)
    np.testing.assert_allclose(gt["pull"][1:], 0.0, atol=1e-9)
    frozen = harness.running_scores(np.repeat(clip.video[:1], 12, axis=0), clip)
    np.testing.assert_allclose(frozen["progression"][1:], 0.0, atol=0.05)
    assert np.all(frozen["pull"][2:] > 0)
    frozen_video = np.repeat(clip.video[:1], 12, axis=0)
    assert frozen["pull"][-1] == pytest.approx(
        harness.metrics.anchor_pull(frozen_video, clip.video)
    )  # whole video


def test_videos_dir_scores_videos_on_disk(tmp_path):
    """A ground-truth copy written as an upscaled mp4 and a frozen one as npz, described by a manifest,
    are scored like the sanity rows (the held-out clip of label L is PanWorld clip index L)."""
    from adastate_jax import video

    pw = panworld.PanWorldConfig(seed=1000)  # 32x32: the held-out config at this size
    clip = panworld.make_clip(pw, index=6, num_frames=12, label=6)
    videos = tmp_path / "videos"
    written = video.write_video(str(videos / "gt.mp4"), video.upscale(clip["video"], 128), fps=16)
    np.savez(videos / "frozen.npz", video=np.repeat(clip["video"][:1], 12, axis=0))
    manifest = {
        "videos": [
            dict(
                path=os.path.basename(written),
                policy="gt_copy",
                prompt="pan right fast",
                seed=0,
                train_seed=3,
            ),
            dict(path="frozen.npz", policy="frozen_copy", prompt="pan right fast", seed=0),
        ]
    }
    (videos / "manifest.json").write_text(json.dumps(manifest))
    exp = _tiny_exp()
    settings = harness.Settings(horizons=(1, 2), horizon_chunks=2, labels=(6,), resamples=100)
    results = harness.evaluate(exp, settings, harness.geometry(exp, (32, 32)), videos_dir=str(videos))
    assert results.mode == "videos" and results.arms == ["gt_copy", "frozen_copy"]
    gt, frozen = _row(results.rows, "gt_copy", 2), _row(results.rows, "frozen_copy", 2)
    assert gt["train_seed"] == 3
    assert abs(gt["progression"]["mean"] - 1.0) < 0.1  # through mp4 compression and a 4x downscale
    assert abs(gt["pull"]["mean"]) < 0.05
    assert abs(frozen["progression"]["mean"]) < 0.05 and frozen["pull"]["mean"] > 0.1
    assert results.attention == {}  # no attention recorded for videos on disk


def test_settings_and_geometry_name_the_bad_value():
    with pytest.raises(ValueError, match=r"labels=\(9,\): labels are 0..7"):
        harness.Settings(labels=(9,))
    with pytest.raises(ValueError, match="horizon_chunks=0"):
        harness.Settings(horizon_chunks=0)
    assert harness.Settings(horizons=(4, 1, 4)).horizons == (1, 4)
    exp = _tiny_exp()
    assert harness.geometry(exp) == harness.Geometry(16, 16, 3, 0)  # 8x8 latents, 2x2 patches
    with pytest.raises(ValueError, match="cannot hold a PanWorld view"):
        harness.panworld_config(4, 4, 0)


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------


def test_bootstrap_ci_is_scipys_percentile_interval_over_finite_values():
    v = np.random.default_rng(1).normal(size=20)
    ci = harness.bootstrap_ci(np.r_[v, np.nan], 2000, seed=3)
    ref = stats.bootstrap((v,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(3))
    assert (ci["mean"], ci["n"]) == (pytest.approx(v.mean()), 20)
    assert (ci["lo"], ci["hi"]) == pytest.approx(tuple(ref.confidence_interval))
    assert ci["lo"] < ci["mean"] < ci["hi"]
    one = harness.bootstrap_ci([2.0, np.nan], 100)
    assert one["mean"] == 2.0 and np.isnan(one["lo"]) and one["n"] == 1
    assert harness.bootstrap_ci([np.nan], 100)["n"] == 0


def test_hierarchical_bootstrap_with_one_seed_is_the_ordinary_bootstrap():
    v = np.random.default_rng(0).normal(1.0, 1.0, size=24)
    h = harness.hierarchical_bootstrap([v], 4000, seed=0)
    ref = harness.bootstrap_ci(v, 4000, seed=1)
    assert h["mean"] == pytest.approx(v.mean()) and h["seeds"] == 1 and h["n"] == 24
    width = ref["hi"] - ref["lo"]
    assert abs(h["lo"] - ref["lo"]) < 0.1 * width and abs(h["hi"] - ref["hi"]) < 0.1 * width


def test_hierarchical_interval_widens_when_training_seeds_disagree():
    rng = np.random.default_rng(0)
    noise = [rng.normal(0.0, 0.3, size=8) for _ in range(3)]
    agree = [n + 1.0 for n in noise]
    disagree = [n + off for n, off in zip(noise, (0.0, 1.0, 2.0))]  # same videos' spread, seeds apart
    w_agree = np.subtract(*[harness.hierarchical_bootstrap(agree, 2000)[k] for k in ("hi", "lo")])
    h = harness.hierarchical_bootstrap(disagree, 2000)
    pooled = harness.bootstrap_ci(np.concatenate(disagree), 2000)
    assert h["mean"] == pytest.approx(np.mean([g.mean() for g in disagree]))
    assert h["hi"] - h["lo"] > 3 * w_agree
    assert h["hi"] - h["lo"] > 1.5 * (
        pooled["hi"] - pooled["lo"]
    )  # treating videos as independent is too narrow
    # exchangeable seeds: not narrower than the ordinary interval over all videos (the two-level
    # bootstrap counts the within-seed noise at both levels, so it is conservative)
    w_pooled_agree = np.subtract(
        *[harness.bootstrap_ci(np.concatenate(agree), 2000)[k] for k in ("hi", "lo")]
    )
    assert w_agree >= 0.9 * w_pooled_agree


def test_hierarchical_bootstrap_drops_non_finite_values_and_empty_seeds():
    h = harness.hierarchical_bootstrap([[1.0, np.nan, 3.0], [np.nan], [5.0]], 500)
    assert (h["mean"], h["n"], h["seeds"]) == (pytest.approx((2.0 + 5.0) / 2), 3, 2)
    assert 1.0 <= h["lo"] < h["mean"] < h["hi"] <= 5.0  # within the values' range
    assert harness.hierarchical_bootstrap([[np.nan]], 500)["n"] == 0


def test_aggregate_rows_per_training_seed_and_pooled():
    recs = [
        dict(source="a", train_seed=t, horizon=1, clip=c, seed=0, scores={m: float(t + c) for m in METRICS})
        for t in (0, 1)
        for c in range(3)
    ] + [dict(source="b", train_seed=5, horizon=1, clip=0, seed=0, scores={m: 1.0 for m in METRICS})]
    rows = harness.aggregate(recs, ["a", "b", "missing"], [1], 50)
    assert [(r["arm"], r["train_seed"], r["videos"]) for r in rows] == [
        ("a", 0, 3),
        ("a", 1, 3),
        ("a", "all", 6),
        ("b", 5, 1),
    ]
    assert (
        rows[0]["pull"]["mean"] == 1.0 and rows[1]["pull"]["mean"] == 2.0 and rows[2]["pull"]["mean"] == 1.5
    )


# ----------------------------------------------------------------------------------------------
# The command line, once
# ----------------------------------------------------------------------------------------------


def test_cli_smoke_writes_tables_and_plots_without_absolute_paths(tmp_path):
    env = child_env()  # one CPU device, as a user would run it
    out = tmp_path / "eval"
    args = [
        "--arms=window",
        "--seeds=0",
        "--horizons=1",
        "--horizon_chunks=2",
        "--labels=6",
        "--bootstrap=20",
    ]
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *args, f"--out_dir={out}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "randomly initialised" in res.stderr  # the warning (absl logging)
    assert "| horizon | arm | train_seed | n |" in res.stdout  # the table
    rep = json.loads((out / "results.json").read_text())
    assert rep["columns"] == report.COLUMNS and rep["bootstrap_resamples"] == 20
    assert {(r["arm"], r["horizon"]) for r in rep["rows"]} == {
        (s, 1) for s in ("window", "ground_truth", "frozen", "snap_back")
    }
    assert rep["plots"] == ["metrics_vs_time.png", "attention_share.png"]
    for name in rep["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path) not in (out / "results.json").read_text() + (out / "results.md").read_text()
    assert "--out_dir=eval" in rep["command"]
    window = np.asarray(rep["attention_share"]["per_arm_chunk_group"]["window"])  # [chunk, group]
    assert window.shape == (2, 3)
    np.testing.assert_allclose(window.sum(-1), 1.0, atol=1e-4)
    assert np.all(window[:, 0] == 0)  # a window has no anchor slot
    row = next(r for r in rep["rows"] if r["arm"] == "window")
    assert row["train_seed"] is None and row["videos"] == 1
    assert 0.0 <= row["code_conf"]["mean"] < 0.5  # a random model draws no position code


def test_videos_dir_reads_rollout_summaries_and_their_records(tmp_path):
    """A `launch/rollout.py` output (summary JSON + per-chunk JSONL records beside it) is read with
    its prompt schedule and attention shares from the records; a schedule with a switch is refused."""
    from adastate_jax.streaming import writers

    d = tmp_path / "rollouts"
    d.mkdir()
    share = [[[0.2, 0.3, 0.5]], [[0.1, 0.4, 0.5]]]  # [chunk][layer][group]
    with writers.RecordWriter(str(d / "a.jsonl")) as rw:
        for c in range(2):
            rw.write(dict(chunk=c, prompt_id=1, latency_s=0.01, attention_share=share[c]))
    summary = dict(
        video=str(d / "a.mp4"),
        records=str(d / "a.jsonl"),
        prompts=["static", "pan left fast"],
        seed=3,
        config={"stream": {"anchor": "sink"}},
    )
    (d / "a.json").write_text(json.dumps(summary))
    (entry,) = harness._video_dir_entries(str(d))
    assert (entry["policy"], entry["prompt"], entry["seed"]) == ("sink", "pan left fast", 3)
    assert entry["attention_share"] == share
    with writers.RecordWriter(str(d / "a.jsonl")) as rw:
        for c, pid in enumerate((0, 1)):
            rw.write(dict(chunk=c, prompt_id=pid, latency_s=0.01))
    with pytest.raises(ValueError, match="prompt switches cannot be scored"):
        harness._video_dir_entries(str(d))
