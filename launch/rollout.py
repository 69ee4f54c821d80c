r"""Stream a video chunk by chunk with any anchor policy and write it as mp4 (+ a JSON of settings).

  python launch/rollout.py --config=configs/tiny.py --num_chunks=8 --out=outputs/demo.mp4
  python launch/rollout.py --config=configs/tiny.py:sink,absolute --num_chunks=40 \
      --prompt="pan right fast" --prompt="pan left slow" --prompt_schedule="0:0,20:1" --instrument

Without `--checkpoint` the DiT is randomly initialised (a warning says so). Text: `config.text.kind`
'words' embeds PanWorld-vocabulary prompts with the tiny word encoder; 'embeddings' reads a prompt
table from `config.text.embeddings_path` (`--prompt` then names row indices); 'umt5' needs
`--text_checkpoint` and `config.text.tokenizer_path`. Pixels: `config.vae.kind` 'patch' / 'wan'
decode inside the carry, chunk by chunk; 'none' shows the latents' first channels.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from adastate_jax import build, video  # noqa: E402
from adastate_jax import config as config_lib  # noqa: E402
from adastate_jax import sharding as shd  # noqa: E402
from adastate_jax.config import cli  # noqa: E402
from adastate_jax.models import wan  # noqa: E402
from adastate_jax.streaming import anchors  # noqa: E402
from adastate_jax.streaming.cache import carry_shardings  # noqa: E402
from adastate_jax.streaming.rollout import attention_shares, prompt_schedule  # noqa: E402

_CONFIG = cli.define("configs/tiny.py")
flags.DEFINE_string("checkpoint", "", "Directory of converted/trained DiT params (launch/convert.py --out).")
flags.DEFINE_enum("anchor", None, list(anchors.POLICIES), "Anchor policy (overrides config.stream.anchor).")
flags.DEFINE_integer("num_chunks", 8, "Chunks to generate.")
flags.DEFINE_multi_string("prompt", ["pan right fast"], "Prompt(s); several make a prompt table.")
flags.DEFINE_string("prompt_schedule", "", "Prompt switches 'chunk:prompt_index,...', e.g. '0:0,20:1'.")
flags.DEFINE_integer("seed", None, "PRNG seed (overrides config.seed).")
flags.DEFINE_string("out", "outputs/rollout.mp4", "Video path (.mp4 or .gif); a .json is written beside it.")
flags.DEFINE_bool(
    "instrument", False, "Record the attention share of anchor/window/current per chunk and layer."
)
flags.DEFINE_bool("show_state", False, "adastate: also write the decoded state latent as <out>_state.mp4.")
flags.DEFINE_string("vae_checkpoint", "", "Wan VAE weights (torch) when config.vae.kind='wan'.")
flags.DEFINE_string("text_checkpoint", "", "UMT5 encoder weights when config.text.kind='umt5'.")
flags.DEFINE_float("fps", 16.0, "Frames per second of the written video.")
flags.DEFINE_integer("min_size", 256, "Upscale tiny frames (nearest) so the short side is at least this.")


def _parse_schedule(spec: str, num_chunks: int, num_prompts: int) -> np.ndarray:
    switches = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            c, p = item.split(":")
            switches[int(c)] = int(p)
        except ValueError:
            raise ValueError(f"--prompt_schedule entry {item!r} is not 'chunk:prompt_index'") from None
    return prompt_schedule(num_chunks, switches, num_prompts)


def main(argv):
    del argv
    overrides = {"stream.anchor": FLAGS.anchor} if FLAGS.anchor else {}
    cfg, exp = cli.experiment(_CONFIG, **overrides)  # errors name config.<field>
    seed = exp.seed if FLAGS.seed is None else FLAGS.seed
    if FLAGS.num_chunks <= 0:
        raise ValueError(f"--num_chunks must be positive, got {FLAGS.num_chunks}")
    if os.path.splitext(FLAGS.out)[1].lower() not in video.VIDEO_EXTENSIONS:
        raise ValueError(f"--out={FLAGS.out}: the video must be one of {video.VIDEO_EXTENSIONS}")
    sharded = jax.device_count() > 1
    mesh = build.mesh(exp) if sharded else None
    if sharded:
        config_lib.check_mesh(exp, config_lib.mesh_sizes(exp, mesh))
        config_lib.check_batch(
            exp, config_lib.mesh_sizes(exp, mesh), exp.stream.batch_size, "stream.batch_size"
        )

    dit = build.dit(exp, FLAGS.checkpoint, mesh_=mesh, seed=seed)
    print(f"DiT params: {dit.source}")
    params = dit.params
    print(f"DiT: {wan.param_count(params) / 1e6:.2f}M params; layout {anchors.describe_layout(exp.stream)}")

    decoder, decoder_params = build.decoder(exp, FLAGS.vae_checkpoint)
    prompts = list(FLAGS.prompt)
    table = jnp.asarray(build.prompt_table(exp, prompts, text_checkpoint=FLAGS.text_checkpoint))
    schedule = _parse_schedule(FLAGS.prompt_schedule, FLAGS.num_chunks, len(prompts))

    streamer = build.streamer(exp, dit.graphdef, decoder_=decoder, instrument=FLAGS.instrument)
    carry = streamer.init_carry(
        params, table, jax.random.key(seed), prompt_id=int(schedule[0]), decoder_params=decoder_params
    )
    if sharded:  # batch over data/fsdp, heads over tensor; the same step runs on one device
        rules = exp.sharding_rules
        carry = jax.device_put(carry, carry_shardings(carry, mesh, rules))
        table = jax.device_put(table, shd.named_sharding(mesh, (None, "batch", None, None), rules))
        print(f"mesh: {dict(mesh.shape)}")

    latents, frames, states, shares, latencies = [], [], [], [], []
    t_start = time.perf_counter()
    t_prev = t_start
    bar = tqdm(total=FLAGS.num_chunks, unit="chunk", desc=f"{exp.stream.anchor} rollout")
    gen = streamer.stream(params, carry, [int(p) for p in schedule], table, decoder_params=decoder_params)
    for out in gen:
        jax.block_until_ready(out.latents)
        now = time.perf_counter()
        latencies.append(now - t_prev)
        t_prev = now
        latents.append(np.asarray(out.latents[0]))
        states.append(np.asarray(out.state[0]))
        if out.frames is not None:
            frames.append(np.asarray(out.frames[0]))
        if out.key_mass is not None:
            shares.append(attention_shares(exp.stream, np.asarray(out.key_mass)))
        bar.update(1)
        bar.set_postfix(chunk_s=f"{latencies[-1]:.3f}")
    bar.close()

    lat = np.concatenate(latents)  # [T_latent, h, w, C]
    if frames:
        pix = np.concatenate(frames)[decoder.lead_frames :]
    else:
        pix = video.latents_to_rgb(lat)
    written = video.write_video(FLAGS.out, video.upscale(pix, FLAGS.min_size), fps=FLAGS.fps)
    if FLAGS.show_state and exp.stream.query_state_frames:
        st = np.concatenate(states)
        if decoder is not None:
            import adastate_jax.models.vae as vae_lib

            st = np.asarray(vae_lib.decode(decoder.graphdef, decoder_params, jnp.asarray(st[None]))[0])
        else:
            st = video.latents_to_rgb(st)
        video.write_video(
            os.path.splitext(FLAGS.out)[0] + "_state.mp4",
            video.upscale(st, FLAGS.min_size),
            fps=FLAGS.fps / 3,
        )

    steady = latencies[1:] if len(latencies) > 1 else latencies
    report = dict(
        video=written,
        config=json.loads(config_lib.to_json(cfg)),
        checkpoint=dit.source,
        prompts=prompts,
        prompt_schedule=[int(p) for p in schedule],
        seed=seed,
        num_chunks=FLAGS.num_chunks,
        latent_frames=int(lat.shape[0]),
        video_frames=int(pix.shape[0]),
        layout=anchors.describe_layout(exp.stream),
        chunk_latency_s=[round(x, 5) for x in latencies],
        first_chunk_s_including_compile=round(latencies[0], 4),
        steady_chunks_per_s=round(len(steady) / sum(steady), 3),
        device=str(jax.devices()[0]),
    )
    if shares:
        report["attention_share_groups"] = list(anchors.GROUP_NAMES)
        report["attention_share"] = np.round(np.stack(shares), 5).tolist()  # [chunk, layer, group]
    json_path = os.path.splitext(FLAGS.out)[0] + ".json"
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(
        f"wrote {written} ({pix.shape[0]} frames {pix.shape[1]}x{pix.shape[2]}) and {json_path}; "
        f"{report['steady_chunks_per_s']} chunks/s after the first chunk ({latencies[0]:.2f}s incl. compile)"
    )


FLAGS = flags.FLAGS

if __name__ == "__main__":
    cli.run(main)
