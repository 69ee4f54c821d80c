"""Wan2.1-T2V-1.3B (the Self-Forcing / LongLive backbone) at 480x832 (latents 60x104).

dim 1536, 12 heads x 128 (RoPE split 44/42/42), 30 layers, ffn 8960; bfloat16 compute, fp32 params
(for inference-only runs `--config.model.param_dtype=bfloat16` halves the memory).
Variants after `:` as in configs/tiny.py, e.g. `configs/wan_1_3b.py:sink,absolute`.
"""

import importlib.util
import os


def load_common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("adastate_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = load_common()
    model = common.model_section(
        dim=1536,
        num_heads=12,
        num_layers=30,
        ffn_dim=8960,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 2, 2),
        freq_dim=256,
        text_dim=4096,
        text_len=512,
        eps=1e-6,
        param_dtype="float32",
        dtype="bfloat16",
        remat="none",
    )
    config = common.base_config(model, latent_h=60, latent_w=104, vae_kind="wan", text_kind="umt5")
    return common.apply_arg(config, arg)
