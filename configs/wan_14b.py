"""Wan2.1-T2V-14B at 480x832 (latents 60x104).

dim 5120, 40 heads x 128 (RoPE split 44/42/42), 40 layers, ffn 13824; bfloat16 compute, fp32 params,
remat 'dots'. 56 GB of fp32 params: shard them, e.g. `--config.mesh.data=1 --config.mesh.fsdp=-1`,
or `--config.model.param_dtype=bfloat16` for inference.
Variants after `:` as in configs/tiny.py, e.g. `configs/wan_14b.py:window`.
"""

from adastate_jax.config import defaults


def get_config(arg=None):
    model = defaults.model_section(
        dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, dtype="bfloat16", remat="dots"
    )
    config = defaults.base_config(model, latent_h=60, latent_w=104, vae_kind="wan", text_kind="umt5")
    return defaults.apply_variants(config, arg)
