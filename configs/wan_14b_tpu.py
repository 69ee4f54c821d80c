"""Wan2.1-T2V-14B streaming on TPU slices (`configs/wan_14b.py` with splash attention and meshes).

`--config=configs/wan_14b_tpu.py[:<anchor>][,<time layout>][,<slice>]`, slice one of
  v5e-8 / v6e-8  v5e:2x4 / v6e:2x4, 8 chips: tensor 8 (40 heads and the FFN split 8 ways, the KV
                 cache by heads), one stream (`stream.batch_size=1`), bfloat16 params (28 GB in all,
                 3.5 GB per chip);
  without one: the mesh of `configs/wan_14b.py`.
Attention is `model.attention='splash'` (the Pallas TPU kernel). `launch/compile_tpu.py` compiles
the streaming step and segment for a slice without a TPU (README "TPU pods").
"""

from adastate_jax.config import defaults
from configs import wan_14b

SLICES = {
    "v5e-8": (1, 1, 8),
    "v6e-8": (1, 1, 8),
}


def get_config(arg=None):
    own, rest = defaults.split_variants(arg, tuple(SLICES))
    config = wan_14b.get_config(",".join(rest) or None)
    config.model.attention = "splash"
    if len(own) > 1:
        raise ValueError(f"configs/wan_14b_tpu.py: give one slice of {list(SLICES)}, got {own}")
    if own:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = SLICES[own[0]]
        config.stream.batch_size = 1
        config.model.param_dtype = "bfloat16"
    return config
