"""Tables, JSON, plots and side-by-side videos of an evaluation, from results built without a model:
the held-out references plus an arm of noise videos with two training seeds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from adastate_jax import video as video_lib
from adastate_jax.eval import harness, report

METRICS = ["progression", "pull", "return", "dd_dis", "flicker", "code_conf", "conf_drift", "psnr", "ssim"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results():
    settings = harness.Settings(horizons=(1, 2), horizon_chunks=2, seeds=(0,), labels=(6, 7), resamples=50)
    geo = harness.Geometry(16, 16, 3)
    pw = harness.panworld_config(16, 16, settings.world_seed)
    clips = harness.held_out_clips(pw, settings.labels, 1, geo.frames(settings.num_chunks))
    rng = np.random.default_rng(0)
    noise = [
        harness.Video("noise_a4", i, 0, rng.uniform(-1, 1, (12, 16, 16, 3)), False, train_seed=t)
        for t in (0, 1)
        for i in range(len(clips))
    ]
    videos = noise + harness.reference_videos(clips, 12)
    records, curves = harness.score_all(videos, clips, settings, geo)
    arms = ["noise_a4"]
    rows = harness.aggregate(records, arms + list(harness.REFERENCES), settings.horizons, settings.resamples)
    models = [
        dict(
            arm="noise_a4",
            policy="adastate",
            stream={},
            path=f"{os.getcwd()}/runs/a4_s{t}",
            train_seed=t,
            source="x",
        )
        for t in (0, 1)
    ]
    attention = {"noise_a4": np.tile([0.2, 0.3, 0.5], (2, 4, 2, 1))}  # [rollout, chunk, layer, group]
    return harness.Results(
        settings, geo, pw, clips, arms, models, rows, records, curves, attention, "checkpoints"
    )


def test_table_has_the_promised_columns_and_names_the_training_seed(results):
    table = report.markdown_table(results.rows, lambda h: 6 * h, 50)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "horizon",
        "arm",
        "train_seed",
        "n",
    ] + METRICS
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    assert [(b[0], b[1], b[2], b[3]) for b in body[:5]] == [
        ("1x (6 fr)", "noise_a4", "0", "2"),
        ("1x (6 fr)", "noise_a4", "1", "2"),
        ("1x (6 fr)", "noise_a4", "all", "4"),
        ("1x (6 fr)", "ground_truth", "-", "2"),
        ("1x (6 fr)", "frozen", "-", "2"),
    ]
    assert "over training seeds and then videos" in table


def test_dagger_flags_position_metrics_of_unreadable_codes(results):
    table = report.markdown_table(results.rows, lambda h: 6 * h, 50)
    col = {name: i for i, name in enumerate(["horizon", "arm", "train_seed", "n"] + METRICS)}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        noise = cells[1] == "noise_a4"
        assert cells[col["progression"]].endswith("†") == noise  # noise: no readable code
        assert not cells[col["code_conf"]].endswith("†") and not cells[col["pull"]].endswith("†")
        assert cells[col["psnr"]] == ("n/a" if noise else cells[col["psnr"]])  # no flag on n/a


def test_write_makes_tables_json_and_plots_without_absolute_paths(results, tmp_path):
    out = tmp_path / "eval"
    rep = report.write(
        str(out), results, base=os.getcwd(), command=report.portable(f"x --out={out}", str(tmp_path))
    )
    assert rep["plots"] == ["metrics_vs_time.png", "attention_share.png"]
    for name in rep["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    saved = json.loads((out / "results.json").read_text())
    assert saved["columns"] == report.COLUMNS and list(saved["metrics"]) == METRICS
    assert saved["train_seeds"] == {"noise_a4": [0, 1]}
    assert [m["path"] for m in saved["models"]] == ["runs/a4_s0", "runs/a4_s1"]
    assert saved["command"] == "x --out=eval"
    text = (out / "results.json").read_text() + (out / "results.md").read_text()
    assert os.getcwd() not in text and str(tmp_path) not in text
    assert "`noise_a4` (policy adastate, train_seed 0): `runs/a4_s0`" in (out / "results.md").read_text()
    share = np.asarray(saved["attention_share"]["per_arm_chunk_group"]["noise_a4"])
    np.testing.assert_allclose(share, np.tile([0.2, 0.3, 0.5], (4, 1)))


def test_replot_draws_the_plots_from_results_json(results, tmp_path):
    report.write(str(tmp_path), results)
    for name in ("metrics_vs_time.png", "attention_share.png"):
        os.remove(tmp_path / name)
    written = report.replot(str(tmp_path / "results.json"))
    assert sorted(os.path.basename(p) for p in written) == ["attention_share.png", "metrics_vs_time.png"]
    assert all(open(p, "rb").read(8) == PNG for p in written)


def test_portable_rewrites_absolute_paths_only():
    text = "--a=/base/runs/x,w:/base/y@1 --b=rel/p 1/2 --c=/other/z"
    assert report.portable(text, "/base") == "--a=runs/x,w:y@1 --b=rel/p 1/2 --c=../other/z"


# ----------------------------------------------------------------------------------------------
# Side by side
# ----------------------------------------------------------------------------------------------


def _videos(t=3, h=8, w=8):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for _ in range(3)]


def test_side_by_side_tiles_are_nearest_upscales_under_label_strips_with_captions():
    videos = _videos()
    captions = [["prog 0.10\npull +0.00", "prog 0.20\npull +0.01", "prog 0.20\npull +0.01"]] * 3
    grid = report.side_by_side(videos, ["window", "sink", "adastate"], captions, columns=2, min_tile=64)
    t, height, width, _ = grid.frames.shape
    assert t == 3 and grid.frames.dtype == np.uint8
    for v, (y0, x0, y1, x1) in zip(videos, grid.tiles):
        assert (y1 - y0, x1 - x0) == (64, 64)  # 8 px * 8 (nearest), no resampling
        np.testing.assert_array_equal(grid.frames[:, y0:y1, x0:x1], video_lib.upscale(v, 64))
    assert grid.tiles[2][0] > grid.tiles[0][0] and grid.tiles[2][1] == grid.tiles[0][1]  # 2 columns: row 2
    assert height == grid.captions[2][2] and width == grid.tiles[1][3]

    def strip(box, frame=0):
        y0, x0, y1, x1 = box
        return grid.frames[frame, y0:y1, x0:x1]

    for box in grid.labels:
        assert box[2] == grid.tiles[0][0] - grid.labels[0][0] + box[0]  # the label strip sits above its tile
        assert (strip(box) > 128).any()  # text drawn
    assert not np.array_equal(strip(grid.labels[0]), strip(grid.labels[1]))  # different labels
    cap = grid.captions[0]
    assert cap[0] == grid.tiles[0][2] and (strip(cap) > 128).any()  # the caption strip under the tile
    assert not np.array_equal(strip(cap, 0), strip(cap, 1))  # the caption follows the frame
    np.testing.assert_array_equal(strip(cap, 1), strip(cap, 2))  # same text, same pixels


def test_side_by_side_refuses_videos_of_other_shapes():
    a, b, _ = _videos()
    with pytest.raises(ValueError, match=r"video 1 \('b'\) is \(2, 8, 8, 3\)"):
        report.side_by_side([a, b[:2]], ["a", "b"])
    with pytest.raises(ValueError, match="2 captions for 3 frames"):
        report.side_by_side([a, b], ["a", "b"], [["x"] * 3, ["y"] * 2])


def test_write_side_by_side_writes_gif_and_mp4_of_the_grid(tmp_path):
    import imageio.v2 as imageio

    videos = _videos(t=4)
    scores = dict(progression=np.array([np.nan, 0.5, 1.0, 1.0]), pull=np.array([np.nan, 0.0, 0.1, -0.1]))
    captions = report.progress_captions(scores)
    assert captions[0] == "prog n/a\npull n/a" and captions[3] == "prog 1.00\npull -0.10"
    paths = report.write_side_by_side(
        str(tmp_path / "cmp.mp4"), videos[:2], ["window", "adastate"], [captions] * 2
    )
    assert [os.path.splitext(p)[1] for p in paths] == [".gif", ".mp4"]
    grid = report.side_by_side(videos[:2], ["window", "adastate"], [captions] * 2)
    gif = np.stack(imageio.mimread(paths[0]))[..., :3]
    assert gif.shape == grid.frames.shape
    assert np.abs(gif.astype(int) - grid.frames).mean() < 1.0  # a 256-colour palette: close, not exact
    mp4 = np.stack(imageio.mimread(paths[1], memtest=False))
    assert mp4.shape[0] == 4 and mp4.shape[1:3] == grid.frames.shape[1:3]
