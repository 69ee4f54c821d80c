"""Streaming decoders in the rollout carry: adapters from the VAE / codec modules.

Owns: `ModuleDecoder`, which satisfies the `rollout.Decoder` protocol for `models.vae.WanVAE` and
`models.vae.PatchCodec` (their fixed-shape decode caches then ride in the carry, so every chunk
emits pixels), and `decoder_from_config`.
Must not know: optimisers, files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from adastate_jax.models import vae as vae_lib
from adastate_jax.streaming.rollout import Decoder


@dataclasses.dataclass(frozen=True)
class ModuleDecoder(Decoder):
    graphdef: Any
    abstract: Any  # the module (or abstract module) used to build caches; no params are read
    lead_frames: int  # padding frames at the start of the decoded stream (Wan VAE: 3)

    def init_cache(self, decoder_params, batch, latent_h, latent_w):
        return vae_lib.init_decode_cache(self.abstract, batch, latent_h, latent_w)

    def decode_chunk(self, decoder_params, cache, z):
        return vae_lib.decode_chunk(self.graphdef, decoder_params, cache, z)


def decoder_from_module(module) -> tuple[ModuleDecoder, Any]:
    """(decoder, decoder_params) for a WanVAE or PatchCodec instance."""
    graphdef, params = nnx.split(module)
    return ModuleDecoder(graphdef, module, int(module.lead_frames)), params


def decoder_from_config(vae_cfg, latent_channels: int, vae_params_path: str = "", seed: int = 0):
    """Build the decoder named by `config.vae` ('none' -> (None, None); 'patch'; 'wan')."""
    kind = vae_cfg.kind
    if kind == "none":
        return None, None
    extra = dict(vae_cfg.config) if "config" in vae_cfg else {}
    if kind == "patch":
        codec = vae_lib.PatchCodec(
            patch=int(extra.get("patch", 2)),
            latent_channels=latent_channels,
            projection=str(extra.get("projection", "hadamard")),
        )
        return decoder_from_module(codec)
    if kind == "wan":
        cfg = vae_lib.WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
        if not vae_params_path:
            print("warning: config.vae.kind='wan' without --vae_checkpoint: randomly initialised VAE")
            model = vae_lib.WanVAE(cfg, rngs=nnx.Rngs(seed))
        elif os.path.isdir(os.path.join(vae_params_path, "params")):
            # our own params checkpoint: `launch/convert.py --model=vae` or a `vae` training export
            from adastate_jax.models import checkpoint_io

            graphdef, abstract = vae_lib.abstract_model(cfg)
            model = nnx.merge(graphdef, checkpoint_io.load_params(vae_params_path, abstract))
        else:  # PyTorch weights (Wan2.1_VAE.pth, diffusers AutoencoderKLWan)
            model = vae_lib.load_wan_vae(vae_params_path, cfg)
        return decoder_from_module(model)
    raise ValueError(f"config.vae.kind: unknown kind {kind!r}; choose from ('none', 'patch', 'wan')")
