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

Owns: the command line and the registry of convertible models. Must not know any model's tables
(they live beside each model) nor the checkpoint format (checkpoint_io).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere without an install
    sys.path.insert(0, REPO)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from adastate_jax import config as config_lib  # noqa: E402
from adastate_jax import sharding as shd  # noqa: E402
from adastate_jax.config import cli  # noqa: E402
from adastate_jax.models import checkpoint_io, umt5, vae, wan, wan_params  # noqa: E402
from adastate_jax.models.convert import (  # noqa: E402
    ConversionError,
    LoraMergedSource,
    convert_to_state,
    longlive_base_evidence,
    open_torch_checkpoint,
)


class ConvertTarget(NamedTuple):
    """How to convert one kind of model.

    rules_fn:     (layout name, experiment config) -> conversion rules (the model's declarative table).
    abstract_fn:  experiment config -> (graphdef, abstract params state) of the target model.
    ignore:       regexes of torch keys that carry nothing for us (buffers, unused parts), or a
                  function (torch keys, layout) -> such regexes.
    detect_fn:    torch keys -> layout name, for --layout=auto (None: --layout must be given).
    """

    rules_fn: Callable[[str, object], Sequence]
    abstract_fn: Callable
    ignore: Sequence[str] | Callable = ()
    detect_fn: Callable | None = None


def _umt5_detect(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "hf"
    if any(k.startswith(("blocks.", "token_embedding")) for k in keys):
        return "wan"
    raise ValueError("cannot tell the UMT5 checkpoint layout (neither 'hf' nor 'wan' keys found)")


# --------------------------------------------------------------------------------------------
# Registry. To make another model convertible (the VAE, UMT5, ...), add one entry here built from
# that model's own module, e.g.
#   "vae": ConvertTarget(vae.conversion_rules, lambda c: vae.abstract_model(vae_config(c)),
#                        vae.IGNORED_KEYS, vae.detect_layout),
# and add its layout names to --layout if they differ from original/diffusers. Nothing else here
# needs to change: the CLI, the error handling and the checkpoint format are shared.
# --------------------------------------------------------------------------------------------
MODELS: dict[str, ConvertTarget] = {
    "dit": ConvertTarget(
        rules_fn=lambda layout, cfg: wan_params.conversion_rules(layout),
        abstract_fn=lambda cfg: wan.abstract_model(config_lib.parse(cfg).model),
        ignore=wan_params.IGNORED_KEYS,
        detect_fn=wan_params.detect_layout,
    ),
    "vae": ConvertTarget(
        rules_fn=lambda layout, cfg: vae.conversion_rules(layout, config_lib.parse(cfg).vae.wan),
        abstract_fn=lambda cfg: vae.abstract_model(config_lib.parse(cfg).vae.wan),
        ignore=vae.IGNORED_KEYS,
        detect_fn=vae.detect_layout,
    ),
    "umt5": ConvertTarget(
        rules_fn=lambda layout, cfg: umt5.conversion_rules(layout),
        abstract_fn=lambda cfg: nnx.split(umt5.abstract_encoder(config_lib.parse(cfg).text.umt5)),
        ignore=umt5.conversion_ignore,
        detect_fn=_umt5_detect,
    ),
}

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


def convert(
    cfg,
    source: str,
    out: str,
    *,
    model="dit",
    layout="auto",
    use_ema=False,
    lora=None,
    lora_alpha=None,
    lora_scale=None,
    lora_rank=None,
    place="cpu",
    overwrite=False,
    log=print,
) -> dict:
    """The whole conversion; returns the info written to DIR/info.json. Raises on any problem
    before anything is written at `out`."""
    start = time.time()
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    target = MODELS[model]
    exp = config_lib.parse(cfg)  # errors name config.<field>
    mesh = shd.mesh_from_config(exp.mesh) if place == "mesh" else None
    if mesh is not None:
        config_lib.check_mesh(exp, config_lib.mesh_sizes(exp, mesh))
    rules_table = exp.sharding_rules

    lora_path = None if lora is None or lora.lower() == "none" else lora
    src = open_torch_checkpoint(
        source,
        use_ema=use_ema,
        lora=lora_path,
        lora_scale=lora_scale,
        lora_alpha=lora_alpha,
        lora_rank=lora_rank,
    )
    lora_info = src.summary() if isinstance(src, LoraMergedSource) else {}
    if lora_info:
        log(
            f"LoRA: {lora_info['lora_adapters']} adapters merged from {lora_info['lora']}, rank "
            f"{lora_info['lora_ranks']}, scale {lora_info['lora_scales']} ({lora_info['lora_scale_origin']})"
        )
    elif model == "dit" and lora is None and (evidence := longlive_base_evidence(source)):
        raise ValueError(
            f"{source} looks like the base generator of a LongLive run ({evidence}). LongLive's "
            "model is this base plus a LoRA saved in a separate file ({'generator_lora': ...}); the "
            "base alone is a different model. Pass --lora=PATH to merge it, or --lora=none to "
            "convert the base alone."
        )
    elif lora is not None:
        log("LoRA: none (--lora=none)")
    if layout == "auto":
        if target.detect_fn is None:
            raise ValueError(f"--model={model} cannot detect its layout; pass --layout")
        try:
            layout = target.detect_fn(src.keys())
        except ValueError as e:
            keys = sorted(src.keys())
            raise ValueError(f"{source}: {e}; its first keys: {keys[:5]} ({len(keys)} in all)") from None
        log(f"layout: {layout} (detected)")
    else:
        log(f"layout: {layout}")
    graphdef, abstract = target.abstract_fn(cfg)

    if place == "cpu":
        shardings = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        shardings = jax.tree.map(lambda _: shardings, abstract)
    else:
        shardings = shd.state_shardings(abstract, mesh, rules_table)
    ignore = target.ignore(src.keys(), layout) if callable(target.ignore) else target.ignore
    params = convert_to_state(src, target.rules_fn(layout, cfg), abstract, shardings, ignore=ignore)
    count = wan.param_count(params)
    log(f"params: {count:,} ({count / 1e9:.3f} B)")

    info = dict(
        source=os.path.abspath(source),
        model=model,
        layout=layout,
        use_ema=use_ema,
        lora=os.path.abspath(lora_path) if lora_path else lora,
        lora_alpha=lora_alpha,
        lora_scale=lora_scale,
        **{k: v for k, v in lora_info.items() if k != "lora"},
        param_count=count,
        param_dtype=exp.model.param_dtype,
    )
    checkpoint_io.save_params(out, params, config_lib.to_json(cfg), info=info, overwrite=overwrite)
    log(f"wrote {out} in {time.time() - start:.1f} s")
    return info


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
