r"""Convert PyTorch weights (Wan2.1 original / diffusers / Self-Forcing / LongLive) to our params.

Writes a params checkpoint (`adastate_jax.models.checkpoint_io`): DIR/params (orbax) and
DIR/config.json, atomically (temp dir + rename); an existing --out is replaced only with --overwrite.

  python launch/convert.py --config=configs/wan_1_3b.py \
      --source=checkpoints/self_forcing_dmd.pt --use_ema --out=workdirs/sf_1_3b

  python launch/convert.py --config=configs/wan_1_3b.py \
      --source=Wan2.1-T2V-1.3B-Diffusers/transformer --out=workdirs/wan_1_3b

  python launch/convert.py --config=configs/wan_1_3b.py \
      --source=longlive_models/models/longlive_base.pt \
      --lora=longlive_models/models/lora.pt --out=workdirs/longlive_1_3b

`config.model` must describe the checkpoint's shapes (dims, layers, text_dim, ...); every missing,
unexpected or mis-shaped key is reported together and nothing is written.

Owns: the command line. The registry of convertible models and the conversion itself are
`adastate_jax.models.conversions`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere without an install
    sys.path.insert(0, REPO)

from adastate_jax.config import cli  # noqa: E402
from adastate_jax.models.conversions import MODELS, ConversionError, convert  # noqa: E402

_CONFIG = cli.define("configs/tiny.py", help="Experiment config; config.model gives the target shapes.")
flags.DEFINE_string("source", None, "PyTorch weights: a file (.safetensors/.pt/.pth/.bin) or a directory.")
flags.DEFINE_enum(
    "layout",
    "auto",
    ["auto", "original", "diffusers", "hf", "wan"],
    "Key layout of --source: DiT/VAE original|diffusers, UMT5 hf|wan.",
)
flags.DEFINE_enum("model", "dit", sorted(MODELS), "Which model the weights belong to.")
flags.DEFINE_bool("use_ema", False, "Self-Forcing/LongLive training checkpoints: take generator_ema.")
flags.DEFINE_string(
    "lora",
    None,
    "LoRA adapters to merge into --source: LongLive's LoRA file ({'generator_lora': <PEFT state "
    "dict>}), a bare PEFT state dict or a PEFT adapter directory. 'none': convert a LongLive base "
    "without its LoRA (refused otherwise).",
)
flags.DEFINE_float(
    "lora_alpha",
    None,
    "LoRA alpha: scale = alpha / rank, the rank read from each lora_A. Default: PEFT's "
    "adapter_config.json beside the LoRA if there is one, else alpha = rank (LongLive: 256 / 256).",
)
flags.DEFINE_integer("lora_rank", None, "Expected LoRA rank, checked against every lora_A.")
flags.DEFINE_float("lora_scale", None, "LoRA scale, overriding --lora_alpha.")
flags.DEFINE_string("out", None, "Output directory (params checkpoint + config.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
flags.DEFINE_enum(
    "place",
    "cpu",
    ["cpu", "mesh"],
    "Where converted leaves live before saving: 'cpu' (host memory), or 'mesh' (sharded over "
    "config.mesh with config.sharding_rules; for models larger than host memory).",
)
flags.mark_flags_as_required(["source", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        convert(
            _CONFIG.value,
            FLAGS.source,
            FLAGS.out,
            model=FLAGS.model,
            layout=FLAGS.layout,
            use_ema=FLAGS.use_ema,
            lora=FLAGS.lora,
            lora_alpha=FLAGS.lora_alpha,
            lora_scale=FLAGS.lora_scale,
            lora_rank=FLAGS.lora_rank,
            place=FLAGS.place,
            overwrite=FLAGS.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
