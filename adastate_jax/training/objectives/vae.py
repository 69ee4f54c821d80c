"""VAE objective: train the Wan VAE of `config.vae.wan` (e.g. a tiny one for CPU) on pixel clips.

Owns: the VAE loss on a clip `batch['video']` [B, T, H, W, 3] in [-1, 1], T = 1 + f k:
  encode -> (mu, logvar); z = mu + exp(logvar / 2) eps (reparameterised); decode(z) -> x_hat;
  recon = mean (x_hat - x)^2            (`config.train.recon_loss='mse'`), or
          mean |x_hat - x| + mean (x_hat - x)^2                              ('l1_mse');
  kl    = mean over latent elements of 0.5 (mu^2 + exp(logvar) - 1 - logvar)   (KL(q || N(0, 1)));
  loss  = recon + config.train.kl_weight * kl,
the batch metrics (loss, recon, kl, psnr of the sampled reconstruction, grad_norm, lr), and the
train step (grad, clip, AdamW, EMA, non-finite guard) in the shape of the objective protocol of
`adastate_jax.training.objectives`.

Latents are coded raw (`normalize=False`): a freshly trained VAE has no published latent statistics
(its `WanVAEConfig` should carry `latents_mean/std=None`, as `WanVAEConfig.tiny` does).

The DiT (`config.model`) is not used. The exported
params (`WORKDIR/export`, EMA if kept) are an nnx.State of `WanVAE(config.vae.wan)`, readable with
`checkpoint_io.load_params(path, vae.abstract_model(vae_cfg))` (see `load_exported_vae`).

Must not know: data pipelines, files (beyond `load_exported_vae`), meshes, the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from adastate_jax.config.schema import RECON_LOSSES  # declared with the field
from adastate_jax.models import vae as vae_lib
from adastate_jax.training import state as state_lib
from adastate_jax.training.objectives.flow_matching import apply_gradients, step_key
from adastate_jax.training.state import TrainState

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of logvar before exp (as in the reference VAEs)


def kl_standard_normal(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, averaged over all elements (nats)."""
    mu = mu.astype(jnp.float32)
    logvar = jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE)
    return jnp.mean(0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar))


def batch_psnr(x_hat: jax.Array, x: jax.Array) -> jax.Array:
    """Mean over clips of 10 log10(2^2 / mse) for [-1, 1] videos [B, T, H, W, 3]."""
    mse = jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x.astype(jnp.float32)), axis=(1, 2, 3, 4))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def vae_loss(graphdef, params, video, key, *, kl_weight: float, recon_loss: str = "mse", chunk_latents=1):
    """(loss, aux) of one clip batch; see the module docstring. video [B, T, H, W, 3] in [-1, 1]."""
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"config.train.recon_loss: unknown loss {recon_loss!r}; choose from {RECON_LOSSES}")
    x = video.astype(jnp.float32)
    mu, logvar = vae_lib.encode(
        graphdef, params, x, normalize=False, return_logvar=True, chunk_latents=chunk_latents
    )
    std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE))
    z = mu.astype(jnp.float32) + std * jax.random.normal(key, mu.shape, jnp.float32)
    x_hat = vae_lib.decode(graphdef, params, z, normalize=False, chunk_latents=chunk_latents)
    err = x_hat.astype(jnp.float32) - x
    mse = jnp.mean(jnp.square(err))
    recon = mse if recon_loss == "mse" else mse + jnp.mean(jnp.abs(err))
    kl = kl_standard_normal(mu, logvar)
    loss = recon + kl_weight * kl
    aux = dict(recon=recon, mse=mse, kl=kl, psnr=batch_psnr(x_hat, x), mu_std=jnp.std(mu))
    return loss, aux


class VAEObjective:
    """Trains `WanVAE(config.vae.wan)` on `batch['video']` (see the module docstring)."""

    name = "vae"

    def __init__(self, exp):
        if exp.vae.kind != "wan":
            raise ValueError(
                f"config.vae.kind={exp.vae.kind!r}: the 'vae' objective trains the Wan VAE of "
                "config.vae.wan; set config.vae.kind='wan'"
            )
        self.exp = exp
        self.train_cfg = tc = exp.train
        self.vae_cfg = exp.vae.wan
        if self.vae_cfg.latents_mean is not None:
            raise ValueError(
                "config.vae.wan.latents_mean/latents_std: a VAE trained from scratch codes raw "
                "latents; set both to None"
            )
        self.graphdef, _ = vae_lib.abstract_model(self.vae_cfg)
        self.tx = state_lib.make_optimizer(tc)
        self.schedule = state_lib.make_schedule(tc)
        self.ema_decay = tc.ema
        self.seed = exp.seed
        self.kl_weight = tc.kl_weight
        self.recon_loss = tc.recon_loss
        self.chunk_latents = tc.vae_chunk_latents
        if tc.init_from or tc.teacher_path:
            raise ValueError(
                "config.train.init_from / teacher_path: the 'vae' objective starts from a random VAE "
                "(resume by re-running in the same workdir)"
            )

    def pretrained(self) -> dict:
        return {}

    def init_state(self, rng: jax.Array, loaded) -> TrainState:
        """Pure: a randomly initialised VAE (seed `config.seed`), AdamW state, EMA copy."""
        del loaded
        params = nnx.split(vae_lib.WanVAE(self.vae_cfg, rngs=nnx.Rngs(self.seed)))[1]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=state_lib.copy_tree(params) if self.ema_decay > 0 else None,
            rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        )

    def loss(self, params, batch, key):
        if "video" not in batch:
            raise ValueError(
                "the 'vae' objective trains on pixel clips: the batch has no 'video' "
                f"(keys {sorted(batch)}); set config.data.codec='none'"
            )
        return vae_loss(
            self.graphdef,
            params,
            batch["video"],
            key,
            kl_weight=self.kl_weight,
            recon_loss=self.recon_loss,
            chunk_latents=self.chunk_latents,
        )

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        key = step_key(state)
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch, key)
        return apply_gradients(self, state, loss, aux, grads)

    def frames_per_example(self, batch_shapes) -> int:
        return int(batch_shapes["video"][1])

    def export_params(self, state: TrainState):
        return state.ema_params if state.ema_params is not None else state.params


def load_exported_vae(path: str, vae_cfg: vae_lib.WanVAEConfig | None = None):
    """(WanVAEConfig, graphdef, params) of a `WORKDIR/export` written by a 'vae' run.

    vae_cfg None: read from the export's config.json (`config.vae.wan`).
    """
    from adastate_jax import config as config_lib
    from adastate_jax.models import checkpoint_io

    if vae_cfg is None:
        text = checkpoint_io.read_config_json(path)
        if text is None:
            raise ValueError(f"{path}: no config.json; pass the WanVAEConfig explicitly")
        vae_cfg = config_lib.parse(config_lib.from_json(text)).vae.wan
    graphdef, abstract = vae_lib.abstract_model(vae_cfg)
    params = checkpoint_io.load_params(path, abstract)
    return vae_cfg, graphdef, params
