r"""The five anchor policies side by side: same prompt, same seed, one labelled video.

  python launch/compare.py                                   # the shipped students, 6x the horizon
  python launch/compare.py --prompt="pan left medium" --seed=3 --num_chunks=84 --out=outputs/cmp.gif
  python launch/compare.py --random --config=configs/tiny.py --num_chunks=4   # untrained (tests)

Each policy's shipped student (`adastate_jax.shipped`, hashes verified) streams `--num_chunks`
chunks (default 6 x 7 = 42: six times the training horizon) from the same sampling seed; the video
(`--out` as .gif and .mp4) shows them in a row, labelled, with the running progression and anchor
pull under each (against a held-out ground-truth clip of the prompt; `eval.harness.running_scores`).
`--plot` adds `<out>.png` (progression, pull and attention share on the anchor/state over time).
The final numbers are printed as a table. `--random` streams one randomly initialised model of
`--config` under every policy instead (no shipped models needed: noise, for tests and timing).
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax import demo, shipped  # noqa: E402
from adastate_jax.config import cli  # noqa: E402
from adastate_jax.streaming.anchors import POLICIES  # noqa: E402

_CONFIG = cli.define("configs/tiny.py", help="Experiment config of the --random models.")
flags.DEFINE_bool("random", False, "Untrained random models of --config instead of the shipped students.")
flags.DEFINE_string("prompt", "pan right fast", "A PanWorld camera prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed, the same for every policy.")
flags.DEFINE_integer("num_chunks", 42, "Chunks to stream (the training horizon is --horizon_chunks).")
flags.DEFINE_integer("horizon_chunks", 7, "The training horizon in chunks (a dotted line in the plot).")
flags.DEFINE_list(
    "policies",
    [],
    "Anchor policies to compare, in this order (default: all five with --random, else every shipped one).",
)
flags.DEFINE_string("root", "", "Shipped models (default: checkpoints/panworld of this repository).")
flags.DEFINE_string("out", "outputs/compare.gif", "Video path; written as .gif and .mp4.")
flags.DEFINE_float("fps", 8.0, "Frames per second of the video.")
flags.DEFINE_integer("min_tile", 128, "Upscale each video (nearest) to at least this short side.")
flags.DEFINE_bool("plot", False, "Also write <out>.png: progression, pull and attention share over time.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    unknown = [p for p in FLAGS.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"--policies={FLAGS.policies}: choose from {POLICIES}")
    if FLAGS.num_chunks < 1:
        raise ValueError(f"--num_chunks must be >= 1, got {FLAGS.num_chunks}")
    if FLAGS.random:
        _, exp = cli.experiment(_CONFIG)
        demo.check_prompt(FLAGS.prompt, exp)
        students = demo.random_students(exp, FLAGS.policies or list(POLICIES), seed=exp.seed)
        print("untrained random models: the videos are noise")
    else:
        demo.check_prompt(FLAGS.prompt)
        students = demo.load_students(FLAGS.policies or None, FLAGS.root or None, allow_random=False)
        if not students:
            raise ValueError(f"no shipped students in {shipped.root_dir(FLAGS.root or None)}")
        print("shipped students: " + ", ".join(f"{s.name} ({s.dit.source})" for s in students))
    comparison = demo.compare(
        students,
        FLAGS.prompt,
        FLAGS.num_chunks,
        seed=FLAGS.seed,
        horizon_chunks=FLAGS.horizon_chunks,
        instrument=FLAGS.plot,
    )
    written = comparison.write(FLAGS.out, fps=FLAGS.fps, min_tile=FLAGS.min_tile)
    if FLAGS.plot:
        plot = os.path.splitext(FLAGS.out)[0] + ".png"
        comparison.plot(plot)
        written.append(plot)
    print(comparison.table())
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    cli.run(main)
