"""Streaming decoders in the rollout carry: adapters from the VAE / codec modules.

Owns: `ModuleDecoder`, which satisfies the `rollout.Decoder` protocol for `models.vae.WanVAE` and
`models.vae.PatchCodec` (their fixed-shape decode caches then ride in the carry, so every chunk
emits pixels). Which codec a config asks for, and loading its weights, is `build.decoder`.
Must not know: optimisers, files.
"""

from __future__ import annotations

import dataclasses
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
