r"""Benchmark one training step of any objective on the machine at hand: compile time, step time,
memory and model FLOPs utilisation. Prints a table; `--json` writes the same numbers.

  python launch/benchmark_train.py --config=configs/panworld.py:teacher
  python launch/benchmark_train.py --config=configs/wan_1_3b_train.py:teacher --config.train.batch_size=1 \
      --frames=21 --peak_tflops=989 --variants='model.remat=full;model.remat=dots_no_batch'

The state is the objective's real train state (params, AdamW, EMA; for DMD also the critic and the
frozen teacher), created already sharded on the config's mesh by `jax.jit(init_state,
out_shardings=...)` with random weights (every pretrained model the objective names is randomly
initialised instead of read: timing does not depend on the weights); batches are synthetic arrays of
the shapes the data pipeline would give (latents [B, F, h, w, C] from `config.stream`, and `text`
embeddings [B, text_len, text_dim] or PanWorld `prompt_ids`). The jitted step is the one
`launch/train.py` runs (`loop.jit_train_step`: state donated, in/out shardings).

Columns
  variant        the `--variants` overrides of this row (`key=value` pairs, ',' separated)
  compile_s      lowering + compilation of the step
  step_ms        median wall time of a step over `--steps` steps after `--warmup` (blocking on
                 the loss), p90 beside it
  tokens/s       latent tokens per second (batch x frames x tokens per frame / step time)
  model_tflop    model FLOPs of one step from the architecture (`training.aot.step_flops`: 3x the forward's
                 matmul + attention FLOPs for flow matching; n/a for the other objectives, whose
                 step mixes rollouts, teacher and critic passes)
  mfu            model_tflop / step time / (`--peak_tflops` x devices); n/a without --peak_tflops
  xla_tflop      the 'flops' of XLA's cost analysis of the compiled step, as XLA counts them
                 (includes rematerialised recompute and masked-out attention blocks; custom calls
                 such as cuDNN attention are not counted): for comparing variants, not for MFU
  temp_gb / arg_gb   XLA's temporary and argument buffer sizes of the compiled step
  peak_gb        the device's peak bytes in use after the row (running peak; GPU/TPU only)
Nothing here asserts a time; compare rows measured in one run.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/panworld.py")
flags.DEFINE_integer("steps", 5, "Timed steps per variant.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_integer("frames", 0, "Latent frames per example (0: config.data.panworld.num_frames or 21).")
flags.DEFINE_float("peak_tflops", 0.0, "Peak dense bf16 TFLOP/s of one device, for MFU (0: no MFU).")
flags.DEFINE_string(
    "variants",
    "",
    "';'-separated rows, each a ','-separated list of config overrides key=value "
    "(e.g. 'model.remat=full;model.remat=none,model.attention=xla'); empty: the config as given.",
)
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

COLUMNS = (
    "variant",
    "compile_s",
    "step_ms",
    "p90_ms",
    "tokens/s",
    "model_tflop",
    "mfu",
    "xla_tflop",
    "temp_gb",
    "arg_gb",
    "peak_gb",
)


def _set(cfg, dotted: str, raw: str):
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
    old = node[last]
    if isinstance(old, bool):
        val = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, int):
        val = int(raw)
    elif isinstance(old, float):
        val = float(raw)
    elif isinstance(old, tuple):
        val = tuple(type(old[0])(x) for x in raw.strip("()").split("/")) if old else ()
    else:
        val = raw
    node[last] = val


def bench_variant(cfg, label: str) -> dict:
    from adastate_jax.training import aot, loop

    if cfg.train.objective in ("ode_init", "self_forcing_dmd"):
        # the teacher (and the student's init) are random here: any non-empty path passes set-up,
        # nothing is read from it (aot.random_pretrained)
        with cfg.unlocked():
            cfg.train.teacher_path = cfg.train.teacher_path or "(random)"
            cfg.train.init_from = cfg.train.init_from or "(random)"
    run = loop.setup(cfg, workdir="/tmp/benchmark_train")
    exp = run.exp
    frames = aot.clip_frames(run, FLAGS.frames)
    state = aot.init_random_state(run)
    batch_arrays = loop.global_batch(run, aot.synthetic_batch(run, frames))
    step = loop.jit_train_step(run)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    temp_gb = arg_gb = xla_tflop = float("nan")
    try:
        m = compiled.memory_analysis()
        temp_gb, arg_gb = m.temp_size_in_bytes / 2**30, m.argument_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_tflop = float(ca.get("flops", float("nan"))) / 1e12
    except Exception:  # noqa: BLE001
        pass

    times = []
    for i in range(FLAGS.warmup + FLAGS.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics["loss"])
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    loss = float(metrics["loss"])

    p = exp.model.tokens_per_frame(exp.stream.latent_h, exp.stream.latent_w)
    flops = aot.step_flops(run, frames)
    model_tflop = float("nan") if flops is None else flops / 1e12
    mfu = (
        model_tflop / step_s / (FLAGS.peak_tflops * jax.device_count())
        if FLAGS.peak_tflops > 0
        else float("nan")
    )
    peak_gb = float("nan")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak_gb = stats["peak_bytes_in_use"] / 2**30
    return {
        "variant": label,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "tokens/s": exp.train.batch_size * frames * p / step_s,
        "model_tflop": model_tflop,
        "mfu": mfu,
        "xla_tflop": xla_tflop,
        "temp_gb": temp_gb,
        "arg_gb": arg_gb,
        "peak_gb": peak_gb,
        "loss": loss,
        "finite": bool(np.isfinite(loss)),
    }


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def format_table(rows) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    return "\n".join([head, sep] + ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    base = _CONFIG.value
    specs = [s.strip() for s in FLAGS.variants.split(";")] if FLAGS.variants.strip() else [""]
    rows = []
    for spec in specs:
        cfg = base.copy_and_resolve_references()
        with cfg.unlocked():
            for item in (x.strip() for x in spec.split(",") if x.strip()):
                if "=" not in item:
                    raise app.UsageError(f"--variants: {item!r} is not key=value")
                k, v = item.split("=", 1)
                try:
                    _set(cfg, k.strip(), v.strip())
                except KeyError:
                    raise app.UsageError(f"--variants: config has no field {k.strip()!r}") from None
        label = spec or "as configured"
        try:
            rows.append(bench_variant(cfg, label))
            r = rows[-1]
            print(
                f"{label}: {r['step_ms']:.4g} ms/step, compile {r['compile_s']:.3g} s, loss {r['loss']:.3g}"
            )
        except Exception as e:  # noqa: BLE001 - one failing variant (e.g. out of memory) is a row
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            print(f"{label}: FAILED {type(e).__name__}: {msg}")
            rows.append({"variant": label, "error": f"{type(e).__name__}: {msg}"})
    dev = jax.devices()[0]
    print(
        f"\n{base.train.objective}, global batch {base.train.batch_size}, {jax.device_count()} x "
        f"{dev.device_kind} ({dev.platform}), {FLAGS.steps} timed steps after {FLAGS.warmup}\n"
    )
    print(format_table([r for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"- {r['variant']}: {r['error']}")
    if FLAGS.json:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as fh:
            json.dump(
                dict(device=dev.device_kind, devices=jax.device_count(), rows=rows),
                fh,
                indent=1,
                default=lambda x: None if isinstance(x, float) and not np.isfinite(x) else str(x),
            )
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    cli.run(main)
