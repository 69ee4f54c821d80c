r"""The AdaState study (issue 10) as one command: teacher -> within-clip check -> the teacher's ODE
trajectories, stored once -> ODE init on them -> state-learning ablation -> DMD for every arm x
training seed -> evaluation -> report.

  python launch/study.py --profile=cpu --out=runs/study_cpu --dry_run   # plan, stage states, estimate
  python launch/study.py --profile=cpu --out=runs/study_cpu             # run; re-run to resume
  python launch/study.py --profile=cpu --out=runs/study_cpu --stages=teacher,teacher_check
  python launch/study.py --profile=cpu --out=runs/study_cpu --publish=assets/study

Re-running the same command skips finished stages (their record's fingerprint matches), resumes a
killed one (launch/train.py resumes from its checkpoints) and redoes a stage whose command changed
(and everything after it). Profiles, arms, stages, budgets and their time arithmetic:
`adastate_jax/study/plan.py`; the report: `RUN_DIR/report/README.md`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax import study  # noqa: E402
from adastate_jax.eval import arms  # noqa: E402
from adastate_jax.study import plan as plan_lib  # noqa: E402

flags.DEFINE_enum("profile", "cpu", sorted(plan_lib.PROFILES), "Study profile (adastate_jax/study/plan.py).")
flags.DEFINE_string(
    "out", None, "Run directory (every stage's workdir, records, logs, report/).", required=True
)
flags.DEFINE_string(
    "stages", "", f"Stage groups to run, comma-separated ({', '.join(plan_lib.STAGE_GROUPS)}); empty: all."
)
flags.DEFINE_bool("dry_run", False, "Print the plan, each stage's state and the time estimate; run nothing.")
flags.DEFINE_bool(
    "measure",
    False,
    "Time a few steps of every training program and a short evaluation "
    "in OUT/measure/ and print the profile's step_seconds (adastate_jax/study/measure.py).",
)
flags.DEFINE_bool(
    "measure_every_arm", False, "--measure: also time full, sink, longlive and the state losses."
)
flags.DEFINE_bool(
    "measure_cpu_time", True, "--measure: CPU seconds (a shared CPU machine); false: wall seconds (GPU)."
)
flags.DEFINE_string(
    "train_seeds", "", "Training seeds of the main arms (default: the profile's), e.g. 0,1,2."
)
flags.DEFINE_string(
    "publish", "", "Copy RUN_DIR/report/ here (relative to the repository), e.g. assets/study."
)
flags.DEFINE_integer("max_parallel", 0, "Training / evaluation processes at once (0: the profile's).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.measure:
        from adastate_jax.study import measure

        profile = plan_lib.profile(FLAGS.profile)
        measure.measure(
            profile,
            FLAGS.out,
            study.environment(profile, os.path.join(FLAGS.out, "measure")),
            every_arm=FLAGS.measure_every_arm,
            cpu_time=FLAGS.measure_cpu_time,
        )
        return
    try:
        seeds = arms.parse_int_list("train_seeds", FLAGS.train_seeds, 0) if FLAGS.train_seeds else None
        words = ["python", "launch/study.py"] + [a for a in sys.argv[1:] if not a.startswith("--out=")]
        summary = study.main(
            FLAGS.profile,
            FLAGS.out,
            stages=FLAGS.stages,
            dry_run=FLAGS.dry_run,
            train_seeds=seeds,
            publish=FLAGS.publish,
            max_parallel=FLAGS.max_parallel,
            command=" ".join(words + ["--out=RUN_DIR"]),
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    except study.runner.StageFailed as e:
        print(f"[study] {e}\n[study] fix the cause and re-run the same command: finished stages are skipped")
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"[study] {e}")
        sys.exit(130)
    if summary["left"] and not FLAGS.dry_run:
        print("[study] not run:\n" + "\n".join(f"  {k}: {v}" for k, v in summary["left"].items()))


if __name__ == "__main__":
    app.run(main)
