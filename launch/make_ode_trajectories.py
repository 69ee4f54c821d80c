r"""Generate and store the teacher's few-step ODE trajectories for `ode_init` (once, offline).

  python launch/make_ode_trajectories.py --config=configs/panworld.py:ode \
      --config.train.teacher_path=outputs/panworld_teacher/export \
      --out_dir=outputs/panworld_ode_trajectories --num_clips=1024
  python launch/train.py --config=configs/panworld.py:ode,stored --workdir=outputs/panworld_ode

Flags + one call of `adastate_jax.training.ode_trajectories.generate` (what it does: its
docstring): loads the teacher's exported params (`config.train.teacher_path`), reads clip i's
prompt from the configured prompt source (`config.data.source` panworld / arrayrecord / video),
draws its starting noise from `--noise_seed` and i, and runs the objective's own
`teacher_trajectory`, jitted over batches of `--batch_size` clips sharded over the mesh's batch
axes. The records and `metadata.json` are described in `adastate_jax/data/trajectories.py`.

Files are atomic: a shard is written to `.NAME.tmp-XXXXXXXX` and renamed when complete; metadata.json
likewise (written first). Re-running the same command resumes: finished shards are skipped (their
record count is checked), leftover temp files are deleted and their shards regenerated; a rerun
with different settings (teacher params, config, clip count, ...) into the same directory is
refused, naming the differing metadata fields. One process (all its local devices); for several
hosts, run one generator per host into separate directories with different `--noise_seed` and
list them all in `config.data.paths`. Do not run two generators into one directory at once.

`--storage_dtype`: float32 (default, exact), float16 or bfloat16 (half the bytes; rounds the
stored states and targets, see `data/trajectories.py`).

`--score_clips=N` (PanWorld prompts): when done, the first N targets are decoded and scored as
videos against their clips (progression, return-to-start, code confidence, flicker per prompt;
`adastate_jax/eval/targets.py`), so targets that are not PanWorld videos show before any training.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/panworld.py:ode", help="Experiment config (ode stage).")
flags.DEFINE_string("out_dir", None, "Directory for metadata.json and the ArrayRecord shards.", required=True)
flags.DEFINE_integer("num_clips", 1024, "Number of trajectories (clips) to generate.")
flags.DEFINE_integer("clips_per_file", 256, "Records per ArrayRecord shard (the unit of resumption).")
flags.DEFINE_integer("batch_size", 8, "Clips per jitted teacher call (divisible by the mesh's batch axes).")
flags.DEFINE_enum("storage_dtype", "float32", ["float32", "float16", "bfloat16"], "Stored arrays' dtype.")
flags.DEFINE_integer("noise_seed", 0, "Clip i starts from normal(fold_in(key(noise_seed), i)).")
flags.DEFINE_integer(
    "score_clips", 256, "PanWorld prompts: score the first N targets as videos when done (0: skip)."
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    from absl import logging as absl_logging

    if FLAGS.verbosity == 0:  # third-party INFO logs off; the package's progress stays visible
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("adastate_jax").setLevel(logging.INFO)

    from adastate_jax.training import ode_trajectories

    _, exp = cli.experiment(_CONFIG)
    devices = jax.devices()
    ode_trajectories.log.info(
        "jax %s, backend %s, devices %s", jax.__version__, jax.default_backend(), devices
    )
    ode_trajectories.generate(
        exp,
        FLAGS.out_dir,
        num_clips=FLAGS.num_clips,
        clips_per_file=FLAGS.clips_per_file,
        batch_size=FLAGS.batch_size,
        storage_dtype=FLAGS.storage_dtype,
        noise_seed=FLAGS.noise_seed,
    )
    if FLAGS.score_clips > 0 and exp.data is not None and exp.data.source == "panworld":
        from adastate_jax.eval import targets

        rows = targets.score_trajectories(exp, FLAGS.out_dir, FLAGS.score_clips)
        print(f"the teacher's clean results (x0) of the first {len(rows)} clips, scored as PanWorld videos:")
        print(targets.format_table(rows))


if __name__ == "__main__":
    cli.run(main)
