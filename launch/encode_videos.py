r"""Encode video files once into ArrayRecord shards of latents + text embeddings (the real-data path).

  python launch/encode_videos.py --config=configs/panworld.py:teacher \
      --config.data.paths="('data/videos',)" --out=data/latents
  python launch/encode_videos.py --config=configs/wan_1_3b.py --config.data.paths="('data/videos/*.mp4',)" \
      --vae_checkpoint=workdirs/wan_vae --text_checkpoint=models/umt5-xxl --out=data/wan_latents

then train on the shards: `--config.data.source=arrayrecord
--config.data.paths="('OUT/shard-00000-of-00002.array_record', 'OUT/shard-00001-of-00002.array_record')"`
(the tool prints the exact flag; `OUT/paths.txt` lists the shards).

Flags + one call of `adastate_jax.data.latents.encode_videos` (what it writes and how: its
docstring), with the text encoder and the codec of the config from `adastate_jax.build`:
- the clips of `config.data` read exactly as the `video` source reads them (`config.data.paths`,
  `config.data.video`: clip table, captions, crop and resize; `data/video_source.py`);
- latents with `config.vae`: 'patch' (the PatchCodec) or 'wan' (the Wan VAE from `--vae_checkpoint`:
  a converted params dir, `launch/convert.py --model=vae` or a 'vae' training export, or PyTorch
  weights; `--random_vae` for smoke tests only), in jitted batches of `--batch_size` clips; the
  Wan VAE needs `num_frames = 1 + 4k` and gives 1 + k latent frames;
- text with `config.text.kind`: 'words', 'embeddings' (`config.text.embeddings_path`) or 'umt5'
  (`--text_checkpoint` + `config.text.tokenizer_path`, cached in `config.text.cache_dir` when set);
  each distinct caption is encoded once;
- shards of `--shard_size` clips, `OUT/shard-KKKKK-of-NNNNN.array_record` (`OUT/clips.jsonl` maps
  every record to its file, first frame and caption), each written atomically: re-running the same
  command skips finished shards (resume); a different setting (`OUT/manifest.json`) needs
  `--overwrite`. `--num_tasks N --task_index i` splits the shards between N machines.
`--embeddings_out=FILE.npz` also writes the captions' embeddings with their prompts, for training on
the video files with `config.text.kind='embeddings'`; without `--out` only that file is written.
Decoding runs in `--decode_threads` threads ahead of the encoder; a progress bar shows clips/s, and
the log the decode rate (frames/s) and the encode time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adastate_jax.config import cli  # noqa: E402

_CONFIG = cli.define("configs/panworld.py:teacher")
flags.DEFINE_string("out", "", "Output directory of the ArrayRecord shards.")
flags.DEFINE_string("vae_checkpoint", "", "config.vae.kind='wan': converted params dir or PyTorch weights.")
flags.DEFINE_bool("random_vae", False, "config.vae.kind='wan' without weights: a random VAE (tests only).")
flags.DEFINE_string("text_checkpoint", "", "config.text.kind='umt5': UMT5 encoder weights.")
flags.DEFINE_integer("shard_size", 1024, "Clips per ArrayRecord shard.")
flags.DEFINE_integer("batch_size", 4, "Clips per jitted encode call.")
flags.DEFINE_integer("decode_threads", 4, "Threads decoding clips ahead of the encoder.")
flags.DEFINE_integer("chunk_latents", 1, "Wan VAE: latent frames per encode step (scan chunk).")
flags.DEFINE_integer("max_clips", 0, "Encode only the first N clips (0: all).")
flags.DEFINE_integer("num_tasks", 1, "Split the shards between this many tasks (machines).")
flags.DEFINE_integer("task_index", 0, "This task's index in [0, num_tasks).")
flags.DEFINE_bool("overwrite", False, "Replace an output directory written with other settings.")
flags.DEFINE_string("embeddings_out", "", "Also write the captions' embeddings + prompts to this .npz.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from absl import logging as absl_logging

    from adastate_jax import build
    from adastate_jax.data import latents

    if FLAGS.verbosity == 0:  # third-party INFO logs off; the package's progress stays visible
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("adastate_jax").setLevel(logging.INFO)
    _, exp = cli.experiment(_CONFIG)
    fields = dataclasses.fields(latents.EncodeOptions)
    options = latents.EncodeOptions(**{f.name: FLAGS[f.name].value for f in fields})
    latents.encode_videos(
        exp,
        options,
        text_encoder=lambda: build.text_encoder(exp, options.text_checkpoint),
        codec=lambda: build.vae_module(exp, options.vae_checkpoint),
    )


if __name__ == "__main__":
    cli.run(main)
