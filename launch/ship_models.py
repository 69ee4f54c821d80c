r"""Refresh the shipped PanWorld models (`checkpoints/panworld/<name>/`) from a study's run directory.

  python launch/ship_models.py --from=runs/study
  python launch/ship_models.py --from=runs/study --pick=adastate:adastate_a4 --dtype=bfloat16
  python launch/ship_models.py --from=runs/study --dry_run        # say what would ship, write nothing

The run directory holds `models.json` (every trained model: arm, export dir, training seed; the
`launch/evaluate.py --checkpoints=` spec format) and the evaluation's `results.json` (in RUN_DIR,
RUN_DIR/eval or below; `--results` names another). One student per anchor policy ships under the
policy's name, plus the `teacher` the students were distilled from (`--teacher` overrides); which
arm and training seed is the documented rule of `shipped.plan_from_run`. Each model is written
atomically (the old one stays until the new one is complete) with its manifest: config, training
command, steps, params sha256, evaluation summary. Params are stored in float32 when all of them
fit `--max_total_mb`, else bfloat16 (`--dtype` forces one). Paths in what is written are relative
to the working directory: run it from the repository root.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax import shipped  # noqa: E402
from adastate_jax.eval.report import portable  # noqa: E402

flags.DEFINE_string("from", None, "The study's run directory (models.json + results.json).", required=True)
flags.DEFINE_string("results", "", "The evaluation's results.json (default: found in the run directory).")
flags.DEFINE_string("teacher", "", "Teacher export dir (default: the students' config.train.teacher_path).")
flags.DEFINE_multi_string(
    "pick", [], "POLICY:ARM: ship this arm's student for POLICY (e.g. adastate:adastate_a4)."
)
flags.DEFINE_list("only", [], "Ship only these names (default: all planned).")
flags.DEFINE_enum("dtype", "auto", ["auto", *shipped.DTYPES], "Stored params dtype.")
flags.DEFINE_float("max_total_mb", shipped.BUDGET_MB, "Budget for the params of all models shipped.")
flags.DEFINE_string("root", "", "Shipped root (default: checkpoints/panworld of this repository).")
flags.DEFINE_bool("dry_run", False, "Print the plan; write nothing.")
FLAGS = flags.FLAGS


def _picks(items: list[str]) -> dict[str, str]:
    picks = {}
    for item in items:
        policy, sep, arm = item.partition(":")
        if not sep or not policy or not arm:
            raise app.UsageError(f"--pick={item!r} is not POLICY:ARM")
        picks[policy] = arm
    return picks


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run_dir = FLAGS["from"].value
    plans = shipped.plan_from_run(
        run_dir, results_path=FLAGS.results, teacher=FLAGS.teacher, picks=_picks(FLAGS.pick)
    )
    if FLAGS.only:
        unknown = sorted(set(FLAGS.only) - {p.name for p in plans})
        if unknown:
            raise app.UsageError(f"--only: {unknown} not planned (planned: {[p.name for p in plans]})")
        plans = [p for p in plans if p.name in FLAGS.only]
    dtype = shipped.choose_dtype(plans, FLAGS.max_total_mb, FLAGS.dtype)
    root = shipped.root_dir(FLAGS.root or None)
    for p in plans:
        where = (
            f"arm {p.source.get('arm')} train_seed {p.source.get('train_seed')}"
            if p.role == "student"
            else ""
        )
        print(f"{p.name:<9} <- {portable(p.params_dir)} {where} ({p.steps} steps)")
    if FLAGS.dry_run:
        print(f"dry run: would write {len(plans)} models ({dtype}) to {portable(root)}")
        return
    for p in plans:
        manifest = shipped.ship(p, root, dtype=dtype)
        print(
            f"shipped {p.name}: {manifest['num_params']} params, sha256 {manifest['params_sha256'][:16]}..."
        )
    total_mb = shipped.total_bytes(root) / 2**20
    print(f"{portable(root)}: {total_mb:.1f} MB in {len(shipped.available(root))} models")


if __name__ == "__main__":
    app.run(main)
