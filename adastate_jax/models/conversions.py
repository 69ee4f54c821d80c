"""The conversion job: which models are convertible, and one whole conversion from a PyTorch
checkpoint to a params directory (what `launch/convert.py` runs; tests and notebooks call it
directly).

Owns: the registry of convertible models (`MODELS`: the DiT, the Wan VAE, UMT5; each entry built
from that model's own module) and `convert`: LoRA merging and LongLive-base refusal, layout
detection, conversion straight into single-device or mesh placement, and the atomic write with its
`info.json`.
Must not know: any model's tables (they live beside each model), the rule engine
(`models/convert.py`), the checkpoint format (`checkpoint_io`), command-line flags.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
from flax import nnx

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.models import checkpoint_io, umt5, vae, wan, wan_params
from adastate_jax.models.convert import (
    ConversionError,
    LoraMergedSource,
    convert_to_state,
    longlive_base_evidence,
    open_torch_checkpoint,
)

__all__ = ["MODELS", "ConversionError", "ConvertTarget", "convert"]


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
# and add its layout names to launch/convert.py's --layout if they differ from original/diffusers.
# Nothing else needs to change: the CLI, the error handling and the checkpoint format are shared.
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
