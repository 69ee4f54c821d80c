r"""Evaluate anchor-policy arms on held-out PanWorld prompts: results table (markdown + JSON) and plots.

  python launch/evaluate.py --config=configs/tiny.py --out_dir=outputs/eval
  python launch/evaluate.py --checkpoints=window:ckpt/window,adastate:ckpt/adastate --horizons=1,2,4,8
  python launch/evaluate.py --checkpoints=adastate_a4:runs/a4_s0/export@0,adastate_a4:runs/a4_s1/export@1
  python launch/evaluate.py --checkpoints=runs/study/models.json
  python launch/evaluate.py --videos_dir=outputs/rollouts --horizon_chunks=7

What is rolled out (`adastate_jax.eval.arms`):
- `--checkpoints=ARM:DIR[@TRAIN_SEED],...`: one model per entry. ARM is an anchor policy
  (window, full, sink, ema_sink, adastate), a preset (`longlive`: sink with sink_frames=3,
  window_frames=6), or POLICY_suffix / PRESET_suffix for a trained variant (`adastate_a4` rolls out
  policy adastate). `@TRAIN_SEED` tags the model with the training seed that made it; an arm may
  have several models, one per training seed. Or a JSON spec file (paths relative to it):
  `{"arms": {"NAME": {"policy": P, "stream": {FIELD: VALUE}}},
    "checkpoints": [{"arm": NAME, "path": DIR, "train_seed": S}, ...]}`.
- without `--checkpoints`: every arm of `--arms` from one shared random initialisation (a warning
  says so: the videos are then noise, and every PanWorld metric of them is meaningless, though
  honestly computed).
- `--videos_dir`: videos already on disk (`harness.load_video_dir`).
Each model rolls out once per sampling seed in `--seeds` to the longest horizon, all prompts in one
batch; shorter horizons are prefixes. Sanity rows from the held-out set: `ground_truth`, `frozen`,
`snap_back` (see `adastate_jax.eval.harness`).

Rows (`adastate_jax.eval.report`): per horizon (x `--horizon_chunks`, the training horizon in
chunks), arm and training seed; an arm with several training seeds also gets a row with
train_seed `all` whose 95% interval is bootstrapped over training seeds and then videos. Outputs in
`--out_dir`: results.md, results.json (settings, rows, per-video values, curves, attention shares),
metrics_vs_time.png and attention_share.png. Paths in them are relative to the working directory.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402
from adastate_jax.eval import arms as arms_lib  # noqa: E402
from adastate_jax.eval import harness, report  # noqa: E402

_CONFIG = cli.define("configs/tiny.py")
flags.DEFINE_string(
    "checkpoints",
    "",
    "ARM:DIR[@TRAIN_SEED],... (e.g. window:ckpt/w@0,adastate_a4:ckpt/a4@1) or a .json spec file; "
    "empty: the --arms from one random initialisation.",
)
flags.DEFINE_string(
    "arms", "window,full,sink,ema_sink,adastate", "Arms rolled out from a random init (no --checkpoints)."
)
flags.DEFINE_string(
    "videos_dir", "", "Score videos on disk instead of rolling out (see harness.load_video_dir)."
)
flags.DEFINE_string("horizons", "1,2,4,8", "Horizons as multiples of --horizon_chunks.")
flags.DEFINE_integer("horizon_chunks", 7, "Training horizon in chunks (7 chunks x 3 latent frames = 21).")
flags.DEFINE_string("seeds", "0,1,2", "Sampling seeds (one rollout of every prompt per seed and model).")
flags.DEFINE_string("labels", "", "PanWorld camera labels to evaluate (comma-separated ints); empty: all.")
flags.DEFINE_integer("clips_per_label", 1, "Held-out clips (worlds) per camera label.")
flags.DEFINE_integer("world_seed", 1000, "PanWorld seed of the held-out set (training uses config seed 0).")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("fps", 16.0, "Frame rate the videos stand for (DD-DIS samples at ~8 fps).")
flags.DEFINE_string("frame_size", "", "HxW of the frames to score (--videos_dir; default from the config).")
flags.DEFINE_integer("frames_per_chunk", 0, "Pixel frames per chunk (--videos_dir; default from the config).")
flags.DEFINE_bool("instrument", True, "Record attention shares per chunk (reference attention path).")
flags.DEFINE_string("vae_checkpoint", "", "Wan VAE weights when config.vae.kind='wan'.")
flags.DEFINE_string("out_dir", "outputs/eval", "Directory for results.md, results.json and the PNGs.")
FLAGS = flags.FLAGS


def read_flags(exp) -> tuple[harness.Settings, harness.Geometry, list[arms_lib.Model]]:
    """Settings, pixel geometry and models of the flags; a ValueError names the bad flag."""
    labels = arms_lib.parse_int_list("labels", FLAGS.labels, 0) if FLAGS.labels else ()
    settings = harness.Settings(
        horizons=tuple(arms_lib.parse_int_list("horizons", FLAGS.horizons, 1)),
        horizon_chunks=FLAGS.horizon_chunks,
        seeds=tuple(arms_lib.parse_int_list("seeds", FLAGS.seeds, 0)),
        labels=tuple(labels),
        clips_per_label=FLAGS.clips_per_label,
        world_seed=FLAGS.world_seed,
        resamples=FLAGS.bootstrap,
        fps=FLAGS.fps,
        instrument=FLAGS.instrument,
    )
    models = arms_lib.parse_checkpoints(FLAGS.checkpoints) if FLAGS.checkpoints else []
    if FLAGS.videos_dir:
        if models:
            raise ValueError("--videos_dir and --checkpoints are exclusive")
        if not os.path.isdir(FLAGS.videos_dir):
            raise ValueError(f"--videos_dir={FLAGS.videos_dir} is not a directory")
    elif not models:
        models = [arms_lib.Model(arm) for arm in arms_lib.parse_arms(FLAGS.arms)]
    size = arms_lib.parse_frame_size(FLAGS.frame_size) if FLAGS.frame_size else None
    if FLAGS.frames_per_chunk < 0:
        raise ValueError(f"--frames_per_chunk={FLAGS.frames_per_chunk} must be >= 0")
    return settings, harness.geometry(exp, size, FLAGS.frames_per_chunk), models


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    t_start = time.perf_counter()
    cfg, exp = cli.experiment(_CONFIG)
    try:
        settings, geo, models = read_flags(exp)
        harness.panworld_config(geo.height, geo.width, settings.world_seed)  # a frame size PanWorld can draw
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.info(
        f"held-out set: {settings.clips_per_label} PanWorld clip(s) per label {list(settings.labels)} "
        f"(seed {settings.world_seed}, {geo.height}x{geo.width}), horizons {list(settings.horizons)} x "
        f"{settings.horizon_chunks} chunks, up to {geo.frames(settings.num_chunks)} frames"
    )
    if models and not any(m.path for m in models):
        logging.warning(
            "no --checkpoints: every arm rolls out the same randomly initialised DiT; "
            "its videos are noise, so its metrics show the pipeline, not the method"
        )
    results = harness.evaluate(
        exp,
        settings,
        geo,
        models=models,
        videos_dir=FLAGS.videos_dir,
        vae_checkpoint=FLAGS.vae_checkpoint,
    )

    import jax

    written = report.write(
        FLAGS.out_dir,
        results,
        command=report.portable(" ".join(sys.argv)),
        config=json.loads(report.portable(cfg.to_json_best_effort())),
        device=str(jax.devices()[0]),
        seconds=round(time.perf_counter() - t_start, 1),
    )
    print(written["table"])
    plots = ", ".join(written["plots"])
    print(f"wrote {FLAGS.out_dir}/results.md, results.json, {plots} in {written['seconds']} s")


if __name__ == "__main__":
    cli.run(main)
