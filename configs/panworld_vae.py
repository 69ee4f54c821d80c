"""A tiny Wan VAE trained on PanWorld pixels on CPU (objective 'vae'): reconstruction + KL.

`python launch/train.py --config=configs/panworld_vae.py --workdir=outputs/vae_panworld`, then
`python launch/vae_eval.py --export=outputs/vae_panworld/export` for held-out PSNR / SSIM.

The VAE (`config.vae.wan`, a `WanVAEConfig`): the Wan2.1 architecture (causal 3D convs, RMS norms,
mid-block attention, Wan's first-frame rules) at base_dim 8, one res block per stage, dim_mult
(1, 2, 2): x4 in space; temporal_downsample (False, True): x2 in time; z_dim 8; no latent
normalisation. A 9-frame 32x32 clip (27,648 values) -> 5 x 8 x 8 x 8 latents (2,560 values, 10.8x).

Data: PanWorld 32x32 clips of 9 frames as pixels (`data.codec='none'`, the batch field `video`);
training draws from clips [0, 50,000) of seed 0, `launch/vae_eval.py` scores clips from index
1,000,000 on (never drawn in training).

`config.model` is the PanWorld DiT's (unused by the 'vae' objective; the loop still validates the
config as a whole). The export (`WORKDIR/export`) holds the VAE's params (EMA) and this config.
"""

from configs import panworld


def get_config(arg=None):
    config = panworld.get_config("teacher")
    config.vae.kind = "wan"
    w = config.vae.wan
    w.base_dim, w.z_dim, w.dim_mult, w.num_res_blocks = 8, 8, (1, 2, 2), 1
    w.temporal_downsample = (False, True)
    with config.vae.wan.unlocked():
        w.latents_mean = w.latents_std = None  # trained from scratch: raw latents
    config.data.codec = "none"  # pixels: the batch carries `video` [B, 9, 32, 32, 3]
    config.data.panworld.num_clips = 50_000
    config.data.prefetch = 4
    tc = config.train
    tc.objective = "vae"
    tc.steps, tc.batch_size, tc.lr = 240, 4, 4e-3
    tc.schedule, tc.final_lr_fraction, tc.warmup = "cosine", 0.1, 10
    tc.b2, tc.grad_clip = 0.99, 1.0
    tc.ema = 0.0  # short run: export the raw params
    tc.log_every, tc.ckpt_every = 10, 50
    tc.kl_weight = 1e-4  # per latent element, against a per-pixel MSE
    tc.recon_loss = "mse"  # mse | l1_mse
    tc.vae_chunk_latents = 1  # latents per encode/decode chunk (scan steps)
    return panworld.defaults.apply_variants(config, arg)
