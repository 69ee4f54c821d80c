r"""Benchmark streaming rollouts of every anchor policy: compile time, first chunk, per-chunk latency,
frames per second and peak memory. Prints a table; `--json` writes the same numbers for machines.

  python launch/benchmark.py --config=configs/tiny.py --num_chunks=256
  python launch/benchmark.py --config=configs/tiny.py --config.stream.batch_size=4 \
      --policies=window,adastate --json=outputs/benchmark.json

For each policy, on the same params (`--checkpoint` or one random initialisation), the live
streaming path is measured: the jitted one-chunk `Streamer.jit_step`, compiled ahead of time, then
called chunk after chunk with the carry donated, waiting for each chunk's output (as
`Streamer.stream` / launch/rollout.py do).

The columns and how each is measured: `adastate_jax/eval/benchmark.py`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from adastate_jax import build  # noqa: E402
from adastate_jax import config as config_lib  # noqa: E402
from adastate_jax.config import cli  # noqa: E402
from adastate_jax.eval import benchmark as bench  # noqa: E402
from adastate_jax.streaming import anchors  # noqa: E402

_CONFIG = cli.define("configs/tiny.py")
flags.DEFINE_string("policies", ",".join(anchors.POLICIES), "Comma-separated anchor policies to measure.")
flags.DEFINE_integer("num_chunks", 128, "Chunks per measured rollout (>= 3).")
flags.DEFINE_string("checkpoint", "", "DiT params directory (launch/convert.py --out); empty: random init.")
flags.DEFINE_string("vae_checkpoint", "", "Wan VAE weights when config.vae.kind='wan'.")
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
flags.DEFINE_string(
    "memory_lengths", "", "Measure peak host/device memory at these lengths instead, e.g. 250,1000,4000."
)
flags.DEFINE_integer("segment_chunks", 1, "Chunks per compiled scan when measuring memory (as rollout.py).")
FLAGS = flags.FLAGS


def latency_rows(exp, policies, dit, decoder, decoder_params, table) -> list[dict]:
    rows = []
    for policy in policies:
        rows.append(
            bench.benchmark_policy(exp, policy, dit, decoder, decoder_params, table, FLAGS.num_chunks)
        )
        print(f"{policy}: median {rows[-1]['median_ms']:.3g} ms/chunk, compile {rows[-1]['compile_s']:.3g} s")

    device = jax.devices()[0]
    print(
        f"\n{FLAGS.num_chunks} chunks per policy, batch {exp.stream.batch_size}, "
        f"device {device.device_kind} ({device.platform}); memory: {rows[-1]['memory_source']}\n"
    )
    print(bench.format_table(rows))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cfg, exp = cli.experiment(_CONFIG)
    policies = [p.strip() for p in FLAGS.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in anchors.POLICIES]
    if bad or not policies:
        raise app.UsageError(f"--policies={FLAGS.policies!r}: unknown {bad}; choose from {anchors.POLICIES}")
    try:
        lengths = bench.parse_lengths(FLAGS.memory_lengths) if FLAGS.memory_lengths else None
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if lengths is None and FLAGS.num_chunks < 3:
        raise app.UsageError(f"--num_chunks={FLAGS.num_chunks} must be >= 3 (first chunk + a latency slope)")
    if not FLAGS.checkpoint:
        print("note: no --checkpoint: random initialisation (timing does not depend on the weights)")
    dit = build.dit(exp, FLAGS.checkpoint)
    decoder, decoder_params = build.decoder(exp, FLAGS.vae_checkpoint)
    batch = exp.stream.batch_size
    # timing does not depend on the prompt values: a zero prompt table of the right shape
    table = jnp.zeros((1, batch, exp.model.text_len, exp.model.text_dim), jnp.float32)

    device = jax.devices()[0]
    if lengths is not None:
        rows = []
        for policy in policies:
            rows += bench.memory_rows(
                exp, policy, lengths, dit, decoder, decoder_params, table, FLAGS.segment_chunks
            )
        print(
            f"\nmemory at {lengths} chunks, segments of {FLAGS.segment_chunks}, batch {batch}, "
            f"device {device.device_kind} ({device.platform})\n"
        )
        print(bench.format_table(rows, bench.MEMORY_COLUMNS))
        columns = bench.MEMORY_COLUMNS
    else:
        rows, columns = latency_rows(exp, policies, dit, decoder, decoder_params, table), bench.COLUMNS
    if FLAGS.json:
        report = dict(
            config=json.loads(config_lib.to_json(cfg)),
            checkpoint=FLAGS.checkpoint or None,
            num_chunks=FLAGS.num_chunks if lengths is None else lengths,
            segment_chunks=FLAGS.segment_chunks if lengths is not None else None,
            batch_size=batch,
            device=str(device),
            device_kind=device.device_kind,
            columns=list(columns),
            results=rows,
        )
        report = bench.json_safe(report)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    cli.run(main)
