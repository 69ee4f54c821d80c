r"""Stream a video chunk by chunk with any anchor policy, writing it as it is made.

  python launch/rollout.py                     # the shipped AdaState student, 'pan right fast', 6x horizon
  python launch/rollout.py --anchor=sink --prompt="pan left slow"   # the shipped sink student
  python launch/rollout.py --random --config=configs/tiny.py:sink,absolute --num_chunks=40 \
      --prompt="pan right fast" --prompt="pan left slow" --prompt_schedule="0:0,20:1" --instrument
  python launch/rollout.py --num_chunks=0      # streams until Ctrl-C / SIGTERM

Models: by default the student shipped for `--anchor` (default adastate) in `checkpoints/panworld/`
(hash-verified; `--model=NAME` picks another shipped model, e.g. `teacher`); a shipped model brings
its own config. `--checkpoint=DIR` streams params of `--config`'s model from a directory;
`--random` streams a randomly initialised model of `--config` (an untrained model: noise). With a
PanWorld model the decoded camera position and progression are printed at the end (and stored in
the summary JSON).

Files (beside `--out`): the video (.mp4 or .gif) and with `--show_state` `<base>_state.mp4` grow chunk
by chunk (a fragmented mp4 that plays even after a hard kill, remuxed to a plain one on a clean
end); `<base>.jsonl` gets one record per chunk as it is written (prompt id, latency, key positions,
attention share with `--instrument`); `<base>.json`, the summary (settings, totals, latency
statistics, peak host memory), is written atomically at the start (status 'running') and at the
end. Ctrl-C or SIGTERM finishes the current segment, finalises every file and exits with status 0;
a second signal aborts. Host memory does not grow with `--num_chunks`.

`--segment_chunks` (K): chunks per compiled scan (`Streamer.rollout_segments`, carry donated). The
device holds the carry plus two segments of outputs, the host one segment. K=1 gives each chunk's
own latency and the smallest memory; a larger K amortises the per-call dispatch (faster for tiny
models) but makes latency a per-segment average and a stop waits for the segment in flight.

Text: `config.text.kind`
'words' embeds PanWorld-vocabulary prompts with the tiny word encoder; 'embeddings' reads a prompt
table from `config.text.embeddings_path` (`--prompt` then names row indices); 'umt5' needs
`--text_checkpoint` and `config.text.tokenizer_path`. Pixels: `config.vae.kind` 'patch' / 'wan'
decode inside the carry, chunk by chunk; 'none' shows the latents' first channels (scaled by the
first chunk's range).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adastate_jax import build, demo, shipped  # noqa: E402
from adastate_jax import config as config_lib  # noqa: E402
from adastate_jax import sharding as shd  # noqa: E402
from adastate_jax.config import cli  # noqa: E402
from adastate_jax.models import wan  # noqa: E402
from adastate_jax.streaming import anchors, writers  # noqa: E402
from adastate_jax.streaming.cache import carry_shardings  # noqa: E402
from adastate_jax.streaming.recorder import PromptSchedule, rollout_files, write_rollout  # noqa: E402

_CONFIG = cli.define("configs/tiny.py")
flags.DEFINE_string("checkpoint", "", "Directory of converted/trained DiT params of --config's model.")
flags.DEFINE_bool("random", False, "A randomly initialised DiT of --config (untrained: noise).")
flags.DEFINE_string("model", "", "Shipped model name (default: the shipped student of --anchor).")
flags.DEFINE_enum("anchor", None, list(anchors.POLICIES), "Anchor policy (overrides config.stream.anchor).")
flags.DEFINE_integer(
    "num_chunks", 42, "Chunks to generate (42: 6x the 21-frame training horizon); 0: until interrupted."
)
flags.DEFINE_integer(
    "segment_chunks", 1, "Chunks per compiled scan: 1 = per-chunk latency; larger amortises dispatch."
)
flags.DEFINE_multi_string("prompt", ["pan right fast"], "Prompt(s); several make a prompt table.")
flags.DEFINE_string("prompt_schedule", "", "Prompt switches 'chunk:prompt_index,...', e.g. '0:0,20:1'.")
flags.DEFINE_integer("seed", None, "PRNG seed (overrides config.seed).")
flags.DEFINE_string(
    "out", "outputs/rollout.mp4", "Video path (.mp4 or .gif); .jsonl records and a .json summary beside it."
)
flags.DEFINE_bool(
    "instrument", False, "Record the attention share of anchor/window/current per chunk and layer."
)
flags.DEFINE_bool(
    "show_state",
    True,
    "adastate: also write the decoded state latent as <base>_state.mp4, and the video with each "
    "chunk's state beside it as <base>_beside.mp4.",
)
flags.DEFINE_string("vae_checkpoint", "", "Wan VAE weights (torch) when config.vae.kind='wan'.")
flags.DEFINE_string("text_checkpoint", "", "UMT5 encoder weights when config.text.kind='umt5'.")
flags.DEFINE_float("fps", 16.0, "Frames per second of the written video.")
flags.DEFINE_integer("min_size", 256, "Upscale tiny frames (nearest) so the short side is at least this.")


def _model_choice():
    """(shipped model name or None, cfg, exp): the shipped student of --anchor unless --random /
    --checkpoint (then --config's model); with nothing shipped, a random model with a warning."""
    if FLAGS.random or FLAGS.checkpoint:
        overrides = {"stream.anchor": FLAGS.anchor} if FLAGS.anchor else {}
        return None, *cli.experiment(_CONFIG, **overrides)  # errors name config.<field>
    if any(a.startswith("--config") for a in sys.argv[1:]):
        raise ValueError("--config applies to --random / --checkpoint; a shipped model brings its own config")
    if not shipped.available():
        print(
            f"WARNING: no shipped models in {shipped.root_dir()}: streaming an untrained random model "
            "of configs/tiny.py (noise); see README 'Try it' (python launch/ship_models.py)"
        )
        FLAGS.random = True
        return _model_choice()
    name = FLAGS.model or shipped.default_for(FLAGS.anchor or "adastate")
    manifest = shipped.read_manifest(name)
    return name, config_lib.from_json(json.dumps(manifest["config"])), shipped.experiment(manifest)


def main(argv):
    del argv
    name, cfg, exp = _model_choice()
    seed = exp.seed if FLAGS.seed is None else FLAGS.seed
    # --- everything that can be checked before the work ------------------------------------
    if FLAGS.num_chunks < 0:
        raise ValueError(f"--num_chunks must be >= 0 (0: until interrupted), got {FLAGS.num_chunks}")
    if FLAGS.segment_chunks < 1:
        raise ValueError(f"--segment_chunks must be >= 1, got {FLAGS.segment_chunks}")
    show_state = FLAGS.show_state and exp.stream.query_state_frames > 0
    if FLAGS.show_state and not show_state:
        print(f"note: --show_state ignored: policy {exp.stream.anchor!r} has no state")
    files = rollout_files(FLAGS.out, show_state)
    words = exp.text.kind == "words"
    prompts = [demo.check_prompt(p, exp) for p in FLAGS.prompt] if words else list(FLAGS.prompt)
    schedule = PromptSchedule.parse(FLAGS.prompt_schedule, len(prompts), FLAGS.num_chunks)

    # --- model, text, decoder, carry ---------------------------------------------------------
    sharded = jax.device_count() > 1
    mesh = build.mesh(exp) if sharded else None
    if sharded:
        config_lib.check_mesh(exp, config_lib.mesh_sizes(exp, mesh))
        config_lib.check_batch(
            exp, config_lib.mesh_sizes(exp, mesh), exp.stream.batch_size, "stream.batch_size"
        )
    if name is not None:
        exp, dit = shipped.load(name, mesh_=mesh)
    else:
        dit = build.dit(exp, FLAGS.checkpoint, mesh_=mesh, seed=seed)
    print(f"DiT params: {dit.source}")
    params = dit.params
    print(f"DiT: {wan.param_count(params) / 1e6:.2f}M params; layout {anchors.describe_layout(exp.stream)}")
    decoder, decoder_params = build.decoder(exp, FLAGS.vae_checkpoint)
    table = jnp.asarray(build.prompt_table(exp, prompts, text_checkpoint=FLAGS.text_checkpoint))
    streamer = build.streamer(exp, dit.graphdef, decoder_=decoder, instrument=FLAGS.instrument)
    carry = streamer.init_carry(
        params, table, jax.random.key(seed), prompt_id=schedule.at(0), decoder_params=decoder_params
    )
    if sharded:  # batch over data/fsdp, heads over tensor; the same step runs on one device
        rules = exp.sharding_rules
        carry = jax.device_put(carry, carry_shardings(carry, mesh, rules))
        table = jax.device_put(table, shd.named_sharding(mesh, (None, "batch", None, None), rules))
        print(f"mesh: {dict(mesh.shape)}")

    # --- stream, writing as we go ------------------------------------------------------------
    summary = dict(
        status="running",
        video=files.video,
        state_video=files.state_video,
        beside_video=files.beside_video,
        records=files.records,
        config=json.loads(config_lib.to_json(cfg)),
        checkpoint=dit.source,
        prompts=prompts,
        prompt_switches=[list(s) for s in schedule.switches],  # [[chunk, prompt_id], ...]; prompt 0 before
        seed=seed,
        requested_chunks=FLAGS.num_chunks,  # 0: until interrupted
        segment_chunks=FLAGS.segment_chunks,
        layout=anchors.describe_layout(exp.stream),
        attention_share_groups=list(anchors.GROUP_NAMES) if FLAGS.instrument else None,
        device=str(jax.devices()[0]),
    )
    writers.write_json_atomic(files.summary, summary)
    tracker = demo.CameraTracker(exp=exp) if words and decoder is not None else None
    total = FLAGS.num_chunks or None
    bar = tqdm(total=total, unit="chunk", desc=f"{exp.stream.anchor} rollout")

    def progress(chunk, latency):
        bar.update(1)
        if chunk % 16 == 0:
            bar.set_postfix(chunk_s=f"{latency:.3f}", refresh=False)

    result, error = None, None
    with writers.GracefulStop() as stop:
        try:
            result = write_rollout(
                streamer,
                params,
                carry,
                schedule,
                table,
                files,
                segment_chunks=FLAGS.segment_chunks,
                decoder_params=decoder_params,
                fps=FLAGS.fps,
                min_size=FLAGS.min_size,
                stop=stop,
                on_chunk=progress,
                on_frames=None if tracker is None else (lambda c, f: tracker.add(f, prompts[schedule.at(c)])),
            )
        except BaseException as e:  # the summary still says what happened, then the error propagates
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            bar.close()
            if tracker is not None and tracker.frames:
                summary["camera"] = tracker.summary()
            _finish(summary, files, result, stop.signal_name, error)
    lat = result["latency"]
    rate = f"{1 / lat['mean']:.3g} chunks/s after the first segment" if lat["count"] else "one segment"
    print(
        f"wrote {files.video} ({result['video_frames']} frames, {result['num_chunks']} chunks), "
        f"{files.records} and {files.summary}; {rate} ({result['first_segment_s']:.2f}s incl. compile)"
        + (f"; stopped by {stop.signal_name}" if stop.signal_name else "")
    )
    if tracker is not None and tracker.frames:
        print(tracker.text())


def _finish(summary: dict, files, result: dict | None, signal_name: str | None, error: str | None) -> None:
    """The final summary JSON: totals from `write_rollout`, or what the records say after an error."""
    if result is None:  # count the records written before the error
        with contextlib.suppress(OSError), open(files.records, "rb") as fh:
            result = dict(num_chunks=sum(1 for _ in fh))
        result = result or dict(num_chunks=0)
    status = "error" if error else ("stopped" if signal_name else "complete")
    lat = result.get("latency", {})
    summary.update(
        status=status,
        stopped_by=signal_name,
        error=error,
        **result,
        steady_chunks_per_s=round(1 / lat["mean"], 3) if lat.get("count") else None,
        peak_rss_bytes=writers.peak_rss_bytes(),
    )
    writers.write_json_atomic(files.summary, summary)


FLAGS = flags.FLAGS

if __name__ == "__main__":
    cli.run(main)
