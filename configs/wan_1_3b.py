"""Wan2.1-T2V-1.3B (the Self-Forcing / LongLive backbone) at 480x832 (latents 60x104).

dim 1536, 12 heads x 128 (RoPE split 44/42/42), 30 layers, ffn 8960; bfloat16 compute, fp32 params
(for inference-only runs `--config.model.param_dtype=bfloat16` halves the memory).
Variants after `:` as in configs/tiny.py, e.g. `configs/wan_1_3b.py:sink,absolute`.
"""

from adastate_jax.config import defaults


def get_config(arg=None):
    model = defaults.model_section(dtype="bfloat16")  # the schema's defaults are Wan2.1-1.3B's
    config = defaults.base_config(model, latent_h=60, latent_w=104, vae_kind="wan", text_kind="umt5")
    return defaults.apply_variants(config, arg)
