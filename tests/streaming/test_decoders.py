"""A streaming decoder in the rollout carry: pixels per chunk, equal to decoding the whole video."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import vae, wan
from adastate_jax.streaming.anchors import StreamConfig
from adastate_jax.streaming.decoders import ModuleDecoder, decoder_from_module
from adastate_jax.streaming.rollout import Streamer
from adastate_jax.streaming.sampler import SamplerConfig

LAT = 4


def _random_vae():
    """A tiny Wan VAE with random weights, filled from numpy (fast: no per-shape RNG compiles)."""
    cfg = vae.WanVAEConfig.tiny(dim_mult=(1, 2), temporal_downsample=(True,))
    graphdef, abstract = vae.abstract_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), abstract)
    module = nnx.merge(graphdef, params)
    return cfg, module


@pytest.fixture(scope="module")
def setup():
    cfg = wan.WanConfig.tiny(zero_init_head=False)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=2))
    prompts = jax.random.normal(jax.random.key(5), (1, 1, cfg.text_len, cfg.text_dim))
    return cfg, graphdef, params, prompts


def test_vae_in_carry_emits_frames_matching_full_decode(setup):
    cfg, graphdef, params, prompts = setup
    vcfg, module = _random_vae()
    decoder, dparams = decoder_from_module(module)
    assert isinstance(decoder, ModuleDecoder) and decoder.lead_frames == vcfg.temporal_factor - 1
    st = Streamer(
        graphdef,
        cfg,
        StreamConfig(anchor="adastate", latent_h=LAT, latent_w=LAT),
        SamplerConfig(denoising_steps=(1000, 500)),
        decoder=decoder,
    )
    n = 3
    carry = st.init_carry(params, prompts, jax.random.key(0), decoder_params=dparams)
    shapes0 = jax.tree.map(jnp.shape, carry.decoder)
    carry, outs = st.jit_rollout(params, carry, jnp.zeros((n,), jnp.int32), prompts, None, dparams)
    assert jax.tree.map(jnp.shape, carry.decoder) == shapes0  # fixed-shape decoder cache
    f = vcfg.temporal_factor
    s = vcfg.spatial_factor
    assert outs.frames.shape == (n, 1, f * 3, LAT * s, LAT * s, 3)
    stream = jnp.concatenate(list(outs.frames[:, 0]), axis=0)[decoder.lead_frames :]
    latents = jnp.concatenate(list(outs.latents[:, 0]), axis=0)  # [3n, h, w, C]
    assert stream.shape[0] == 1 + f * (latents.shape[0] - 1)  # the 1 + 4k rule
    full = vae.decode(decoder.graphdef, dparams, latents[None])[0]
    np.testing.assert_allclose(np.asarray(stream), np.asarray(full), rtol=1e-4, atol=1e-4)
    # the generator path (same jitted step) gives the same pixels
    c = st.init_carry(params, prompts, jax.random.key(0), decoder_params=dparams)
    gen = list(st.stream(params, c, [0] * n, prompts, decoder_params=dparams))
    for i, o in enumerate(gen):
        np.testing.assert_array_equal(np.asarray(o.frames), np.asarray(outs.frames[i]))


def test_patch_codec_in_carry_emits_one_frame_per_latent(setup):
    cfg, graphdef, params, prompts = setup
    decoder, dparams = decoder_from_module(vae.PatchCodec(patch=2, latent_channels=16))
    st = Streamer(graphdef, cfg, StreamConfig(anchor="window", latent_h=LAT, latent_w=LAT), decoder=decoder)
    carry = st.init_carry(params, prompts, jax.random.key(0), decoder_params=dparams)
    _, outs = st.jit_rollout(params, carry, jnp.zeros((2,), jnp.int32), prompts, None, dparams)
    assert outs.frames.shape == (2, 1, 3, 2 * LAT, 2 * LAT, 3)
    ref = vae.PatchCodec(patch=2, latent_channels=16).decode(outs.latents[1])
    np.testing.assert_allclose(np.asarray(outs.frames[1]), np.asarray(ref), atol=1e-6)


def test_build_decoder_reads_our_params_checkpoint(tmp_path):
    """`config.vae.kind='wan'` + a params checkpoint dir (convert --model=vae, or a `vae` training
    export) gives the same decoder as the module it was saved from."""
    import dataclasses

    from adastate_jax import build
    from adastate_jax.config import Experiment, VAEConfig
    from adastate_jax.models import checkpoint_io

    vcfg, module = _random_vae()
    graphdef, params = nnx.split(module)
    checkpoint_io.save_params(str(tmp_path / "vae"), params)
    exp = dataclasses.replace(Experiment(), vae=VAEConfig(kind="wan", wan=vcfg))
    decoder, dparams = build.decoder(exp, str(tmp_path / "vae"))
    z = jax.random.normal(jax.random.key(0), (1, 2, LAT, LAT, 16))
    np.testing.assert_array_equal(
        np.asarray(vae.decode(decoder.graphdef, dparams, z)), np.asarray(vae.decode(graphdef, params, z))
    )
