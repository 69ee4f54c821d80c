r"""Compile a config's train steps and streaming programs for TPU slices, on a machine without a TPU.

  python launch/compile_tpu.py --config=configs/wan_1_3b_tpu.py:v5p-128 --topologies=v5p:4x4x4 \
      --stages=teacher,ode,dmd:adastate --json=assets/tpu_compile/v5p_128.json
  python launch/compile_tpu.py --config=configs/wan_1_3b_tpu.py:v5e-8 --topologies=v5e:2x4,v6e:2x4 \
      --stages=step:adastate,segment:adastate

Needs libtpu beside jax (`pip install 'jax[tpu]==<the installed jax version>'`); no TPU is used
(JAX_PLATFORMS defaults to cpu here): jax describes the named slice's chips and XLA compiles for
them, reporting memory per chip, or failing when a program does not fit.

Topologies: libtpu's names, `KIND:AxB[xC]` (v5e:2x2 is 4 chips, v5p:4x4x4 is 64 chips = v5p-128,
v5e:16x16 is v5e-256, v6e:2x4 is v6e-8); `NAME*N` is N such slices over the data-center network.
The mesh is `config.mesh` (one axis -1: the rest of the chips) over the topology's chips.

Stages (`--stages`, default: every training stage when the config has a `train` section, and the
streaming step and segment of every anchor policy):
  teacher, teacher_tf, ode[:anchor], dmd[:anchor]  the train step of that stage of a recipe file
      (`FILE:<stage>,<args of --config>`, e.g. configs/wan_1_3b_tpu.py:dmd,v5p-128), built as
      `launch/train.py` builds it (`loop.setup`, `loop.jit_train_step`; state and batch abstract,
      pretrained models never read);
  step[:anchor], segment[:anchor]  the streaming step (`Streamer.jit_step`) and a scan over
      `--segment_chunks` chunks (`Streamer.jit_segment`), built as `launch/rollout.py` builds them
      (`build.streamer`, config.vae's decoder in the carry).
`--config.x=y` overrides apply to every stage.

Columns (memory per chip, from XLA's memory analysis of the compiled program): arguments,
temporaries, outputs, total (donated outputs counted once, code included) vs the chip's HBM;
`model TFLOP`: model FLOPs of one call on all chips from the architecture
(`training/aot.py`: `train_flops`, `stream_chunk_flops`), not XLA's cost analysis, which counts a
scanned loop's body once; `s @MFU`: that over the chips' peak bf16 FLOP/s
(`tpu_compile.PEAK_BF16_FLOPS`) at `--mfu`.
Exit status 1 when a stage does not fit or fails, each named with its topology (and memory).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: never initialise a local accelerator

from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/wan_1_3b_tpu.py")
flags.DEFINE_list("topologies", ["v5e:2x2"], "TPU topologies, e.g. v5e:2x2,v5p:4x4x4,v5e:16x16*2.")
flags.DEFINE_list("stages", [], "Stages (see above); empty: all of the config's.")
flags.DEFINE_integer("frames", 0, "Latent frames per training clip (0: the config's, else 21).")
flags.DEFINE_integer("segment_chunks", 8, "Chunks of a 'segment' stage's scan.")
flags.DEFINE_float("mfu", 0.4, "Model-FLOPs utilisation for the step-time column.")
flags.DEFINE_string("json", "", "Also write the reports (and failures) to this JSON file, after every stage.")
FLAGS = flags.FLAGS


def _set(cfg, dotted: str, value):
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with cfg.unlocked():
        node[last] = value


def stage_config(spec: str, stage, overrides: dict):
    """The ConfigDict of `stage`: its file spec loaded, the command line's and the stage's fields set."""
    cfg = cli.load_file(stage.config_spec(spec))
    for dotted, value in {**overrides, **stage.overrides()}.items():
        _set(cfg, dotted, value)
    return cfg


def main(argv):
    del argv
    import jax

    from adastate_jax import tpu_compile
    from adastate_jax.training import aot

    spec, overrides = FLAGS["config"].config_filename, dict(FLAGS["config"].override_values)
    trains = _CONFIG.value.get("train") is not None
    stages = [aot.Stage.parse(s) for s in FLAGS.stages] or aot.default_stages(trains)
    reports, failures = [], []
    out = dict(
        command="python launch/compile_tpu.py " + " ".join(sys.argv[1:]),
        jax=jax.__version__,
        mfu=FLAGS.mfu,
        peak_bf16_flops=tpu_compile.PEAK_BF16_FLOPS,
        hbm_bytes=tpu_compile.HBM_BYTES,
        reports=[],
        failures=failures,
    )
    for topology in FLAGS.topologies:
        for stage in stages:
            try:
                cfg = stage_config(spec, stage, overrides)
                report, program = aot.compile_stage(
                    cfg, stage, topology, FLAGS.frames or None, FLAGS.segment_chunks
                )
                reports.append(report)
                out["reports"].append(dict(report.to_json(FLAGS.mfu), summary=program.summary))
                print(tpu_compile.format_table([report], FLAGS.mfu).splitlines()[-1], flush=True)
            except tpu_compile.DoesNotFit as e:
                failures.append(str(e))
            except Exception as e:  # noqa: BLE001 - one failing stage is a line of the report
                failures.append(f"stage {stage.name!r} on TPU topology {topology!r}: {type(e).__name__}: {e}")
            else:
                continue
            finally:
                if FLAGS.json:
                    _write_json(FLAGS.json, out)
            print(f"FAILED: {failures[-1]}", flush=True)
    print("\n" + tpu_compile.format_table(reports, FLAGS.mfu))
    for f in failures:
        print(f"DOES NOT FIT / FAILED: {f}")
    if failures:
        sys.exit(1)


def _write_json(path: str, out: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    cli.run(main)
