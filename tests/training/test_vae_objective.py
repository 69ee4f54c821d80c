"""The 'vae' objective: it lowers its loss on tiny clips, its KL term is KL(q || N(0, 1)), the
export reloads into the same VAE, and the PanWorld pipeline hands it pixels (`data.codec='none'`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adastate_jax.config import parse
from adastate_jax.models import checkpoint_io
from adastate_jax.models import vae as vae_lib
from adastate_jax.training import objectives
from adastate_jax.training.objectives import vae as vae_obj

# 2 stages (x2 space, x2 time): the smallest Wan VAE that still has every block type, so it
# compiles quickly; 5 frames of 16x16 -> 3 latents of 8x8.
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2),
    num_res_blocks=1,
    temporal_downsample=(True,),
    latents_mean=None,
    latents_std=None,
)


def _cfg(**train):
    tc = dict(steps=40, lr=3e-3, warmup=0, b1=0.9, b2=0.99, grad_clip=1.0, ema=0.0, kl_weight=1e-4)
    tc.update(train)
    return ml_collections.ConfigDict(
        # config.model is the DiT's (unused by the 'vae' objective; its defaults)
        dict(seed=0, model=dict(), vae=dict(kind="wan", wan=dict(TINY)), train=dict(objective="vae", **tc))
    )


def _clips(n=2, t=5, hw=16, seed=0):
    """Smooth moving colour gradients in [-1, 1] (learnable by a tiny VAE in a few dozen steps)."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, hw), np.linspace(0, 1, hw), indexing="ij")
    out = np.zeros((n, t, hw, hw, 3), np.float32)
    for i in range(n):
        fx, fy, ph = rng.uniform(0.5, 1.5, 3), rng.uniform(0.5, 1.5, 3), rng.uniform(0, 6, 3)
        for k in range(t):
            out[i, k] = 0.8 * np.sin(2 * np.pi * (fx * x[..., None] + fy * y[..., None]) + ph + 0.3 * k)
    return jnp.asarray(out)


def _train(steps):
    cfg = _cfg(steps=steps)
    obj = objectives.build(parse(cfg))
    assert isinstance(obj, vae_obj.VAEObjective)
    state = jax.jit(obj.init_state)(jax.random.key_data(jax.random.key(0)), {})
    step = jax.jit(obj.train_step, donate_argnums=0)
    batch = {"video": _clips()}
    losses = []
    for _ in range(int(cfg.train.steps)):
        state, m = step(state, batch)
        assert bool(m["finite"]), {k: float(v) for k, v in m.items()}
        losses.append(float(m["loss"]))
    return obj, state, losses, batch


@pytest.fixture(scope="module")
def trained():
    """One step: a trained state for the consistency and export checks (the learning check is slow)."""
    return _train(1)


@pytest.mark.slow
def test_loss_falls_within_a_few_dozen_steps():
    _, _, losses, _ = _train(40)
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert np.all(np.isfinite(losses))
    assert last < 0.5 * first, (first, last, losses)


def test_metrics_are_consistent(trained):
    obj, state, _, batch = trained
    loss, aux = obj.loss(state.params, batch, jax.random.key(1))
    np.testing.assert_allclose(float(loss), float(aux["recon"] + obj.kl_weight * aux["kl"]), rtol=1e-6)
    assert float(aux["recon"]) == pytest.approx(float(aux["mse"]))  # recon_loss 'mse'
    assert float(aux["psnr"]) == pytest.approx(10 * np.log10(4 / float(aux["mse"])), abs=0.5)
    assert float(aux["kl"]) > 0.0


def test_kl_term():
    z = jnp.zeros((2, 3, 4, 4, 5))
    assert float(vae_obj.kl_standard_normal(z, z)) == 0.0  # q = N(0, 1)
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (mu^2 + s^2 - 1 - log s^2), element-averaged
    mu, logvar = jnp.ones_like(z), jnp.full_like(z, np.log(2.0))
    expected = 0.5 * (1.0 + 2.0 - 1.0 - np.log(2.0))
    # rtol: a float32 mean of 480 terms (the exact value differs with XLA's summation order)
    np.testing.assert_allclose(float(vae_obj.kl_standard_normal(mu, logvar)), expected, rtol=1e-5)
    half = jnp.concatenate([mu[:1], z[1:]])  # averaged per element, not summed
    np.testing.assert_allclose(float(vae_obj.kl_standard_normal(half, z)), 0.25, rtol=1e-6)


def test_export_reloads(trained, tmp_path):
    obj, state, _, batch = trained
    path = str(tmp_path / "export")
    cfg_json = json_of(_cfg())  # what the loop exports beside the params: the run's config
    checkpoint_io.save_params(path, obj.export_params(state), cfg_json)
    vae_cfg, graphdef, params = vae_obj.load_exported_vae(path)  # config from the export's config.json
    assert vae_cfg == obj.vae_cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = vae_lib.encode(graphdef, params, batch["video"], normalize=False)
    z_ref = vae_lib.encode(obj.graphdef, state.params, batch["video"], normalize=False)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(z_ref))


def json_of(cfg):
    from adastate_jax import config as config_lib

    return config_lib.to_json(cfg)


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="config.vae.kind"):
        objectives.build(parse(dict(_cfg().to_dict(), vae=dict(kind="patch"))))
    with pytest.raises(ValueError, match="config.train.recon_loss"):
        objectives.build(parse(_cfg(recon_loss="l2")))
    with pytest.raises(ValueError, match="config.train.kl_weight"):
        objectives.build(parse(_cfg(kl_weight=-1.0)))
    obj = objectives.build(parse(_cfg()))
    with pytest.raises(ValueError, match="data.codec='none'"):
        obj.loss(None, {"latents": jnp.zeros((1, 3, 4, 4, 4))}, jax.random.key(0))


def test_panworld_pipeline_passes_pixels_with_codec_none():
    from adastate_jax.data import pipeline

    cfg = ml_collections.ConfigDict(
        dict(
            model=dict(),
            train=dict(batch_size=2),
            vae=dict(kind="wan", wan={}),
            data=dict(
                source="panworld",
                codec="none",
                panworld=dict(frame_height=32, frame_width=32, num_frames=9, num_clips=16, seed=0),
                shuffle=False,
                seed=0,
                worker_count=0,
            ),
        )
    )
    batch = next(pipeline.make_iterator(parse(cfg)))
    assert set(batch) == {"video", "prompt_ids", "index"}
    assert batch["video"].shape == (2, 9, 32, 32, 3) and batch["video"].dtype == np.float32
    assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    with cfg.unlocked():
        cfg.data.codec = "jpeg"
    with pytest.raises(ValueError, match="config.data.codec"):
        pipeline.make_iterator(parse(cfg))
