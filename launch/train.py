r"""Train any recipe: `python launch/train.py --config=configs/panworld.py:teacher --workdir=outputs/teacher`.

  python launch/train.py --config=configs/panworld.py:teacher --workdir=outputs/panworld_teacher
  python launch/train.py --config=configs/panworld.py:ode --workdir=outputs/panworld_ode
  python launch/train.py --config=configs/panworld.py:dmd,adastate --workdir=outputs/panworld_dmd_adastate \
      --config.train.alpha=2 --config.train.truncation_chunks=2

Re-running the same command resumes from the latest good checkpoint in the workdir. SIGTERM saves a
checkpoint and exits (code 0). A non-finite loss saves the last good state and exits with code 3.
Multi-host: `--coordinator=host:port --num_processes=N --process_id=i` (or the env vars
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; on TPU pods / SLURM plain
`--distributed`) calls `jax.distributed.initialize` before anything touches a device.
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/panworld.py:teacher")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).", required=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU/SLURM).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process on GPU/CPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's id.")
flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this invocation (no export).")
FLAGS = flags.FLAGS


def _maybe_initialize_distributed():
    import jax

    coord = FLAGS.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = FLAGS.num_processes or (
        int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None
    )
    pid = (
        FLAGS.process_id
        if FLAGS.process_id is not None
        else (int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    )
    if coord and nproc and nproc > 1:
        jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    del argv
    from absl import logging as absl_logging

    if FLAGS.verbosity == 0:  # orbax logs every save at INFO: keep the progress lines readable
        absl_logging.set_verbosity(absl_logging.WARNING)
    _maybe_initialize_distributed()
    import jax

    from adastate_jax import config as config_lib
    from adastate_jax.training import loop

    cfg, _ = cli.experiment(_CONFIG)  # validated here: a bad field fails before any work
    if jax.process_index() == 0:
        print("config:\n" + config_lib.to_json(cfg), flush=True)
        print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
    try:
        loop.train(cfg, FLAGS.workdir, max_steps=FLAGS.max_steps)
    except loop.Preempted as e:
        print(str(e), flush=True)
        sys.exit(0)
    except loop.NonFiniteError as e:
        print(f"STOPPED: {e}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    cli.run(main)
