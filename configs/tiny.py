"""Tiny randomly initialised model for CPU: tests, CI and `--random` demos (seconds per chunk).

`--config=configs/tiny.py[:variant,...]`: variants are anchor policies (window, full, sink,
ema_sink, adastate) and time layouts (relative, absolute), e.g. `configs/tiny.py:window`.
"""

from adastate_jax.config import defaults


def get_config(arg=None):
    model = defaults.model_section(
        dim=64,
        num_heads=4,  # head dim 16: RoPE split 8/4/4
        num_layers=2,
        ffn_dim=128,
        freq_dim=32,
        text_dim=32,
        text_len=8,
        in_channels=16,
        out_channels=16,
        zero_init_head=False,  # a random model with non-trivial output
    )
    config = defaults.base_config(model, latent_h=8, latent_w=8, vae_kind="patch", text_kind="words")
    return defaults.apply_variants(config, arg)
