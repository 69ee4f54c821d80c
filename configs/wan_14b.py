"""Wan2.1-T2V-14B at 480x832 (latents 60x104).

dim 5120, 40 heads x 128 (RoPE split 44/42/42), 40 layers, ffn 13824; bfloat16 compute, fp32 params,
remat 'dots'. 56 GB of fp32 params: shard them, e.g. `--config.mesh.data=1 --config.mesh.fsdp=-1`,
or `--config.model.param_dtype=bfloat16` for inference.
Variants after `:` as in configs/tiny.py, e.g. `configs/wan_14b.py:window`.
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
        dim=5120,
        num_heads=40,
        num_layers=40,
        ffn_dim=13824,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 2, 2),
        freq_dim=256,
        text_dim=4096,
        text_len=512,
        eps=1e-6,
        param_dtype="float32",
        dtype="bfloat16",
        remat="dots",
    )
    config = common.base_config(model, latent_h=60, latent_w=104, vae_kind="wan", text_kind="umt5")
    return common.apply_arg(config, arg)
