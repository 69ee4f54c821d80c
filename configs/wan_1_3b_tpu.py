"""The Wan2.1-1.3B recipe (`configs/wan_1_3b_train.py`) on TPU slices: splash attention, meshes per slice.

`--config=configs/wan_1_3b_tpu.py:<stage>[,<anchor>][,<time layout>][,<slice>][,teacher14b]`
  stage    teacher | teacher_tf | ode | dmd, as in `configs/wan_1_3b_train.py` (global batch 64,
           21 latent frames of 480x832, remat 'full'); streaming reads the same file's
           `stream` / `sampler` / `model` sections;
  slice    the mesh (and, for streaming, the batch and parameter dtype) used on that slice:
             v5p-64   v5p:2x4x4, 32 chips: fsdp 32 (2 clips per chip);
             v5p-128  v5p:4x4x4, 64 chips: fsdp 64 (1 clip per chip);
             v5e-256  v5e:16x16, 256 chips: fsdp 64 x tensor 4 (a clip per 4 chips: the batch
                      of 64 cannot cover 256 chips, heads and FFN are split 4 ways);
             v5e-8 / v6e-8  v5e:2x4 / v6e:2x4, 8 chips, streaming: one stream per chip
                      (`stream.batch_size=8`, data 8), bfloat16 params;
           without one: the mesh of `configs/wan_1_3b_train.py` (fsdp over every device);
  teacher14b  DMD / ODE with the Wan2.1-14B teacher (`config.teacher_model`, real score) and a
           1.3B critic started from the 1.3B weights (`config.train.critic_path`).
Attention is `model.attention='splash'` (the Pallas TPU kernel; the dense 'xla' path cannot hold
a 32,760-token clip's attention on a chip). `launch/compile_tpu.py` compiles every stage of this
file for a slice without a TPU and reports memory per chip (README "TPU pods").
"""

from adastate_jax.config import defaults
from configs import wan_1_3b_train

# slice -> mesh (data, fsdp, tensor); streaming slices also set the stream batch
SLICES = {
    "v5p-64": dict(mesh=(1, -1, 1)),
    "v5p-128": dict(mesh=(1, -1, 1)),
    "v5e-256": dict(mesh=(1, -1, 4)),
    "v5e-8": dict(mesh=(-1, 1, 1), stream_batch=8),
    "v6e-8": dict(mesh=(-1, 1, 1), stream_batch=8),
}
OWN = tuple(SLICES) + ("teacher14b",)


def teacher_14b(config):
    """Wan2.1-14B as the teacher (real score) of ODE / DMD; the critic keeps the student's shape."""
    config.teacher_model = defaults.model_copy(
        config, dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, remat="full"
    )
    config.critic_model = defaults.model_copy(config)
    # the critic starts from the converted Wan2.1-1.3B (README: launch/convert.py --out=workdirs/wan_1_3b);
    # `train.teacher_path` must name the converted Wan2.1-14B
    config.train.critic_path = "workdirs/wan_1_3b"
    return config


def get_config(arg=None):
    own, rest = defaults.split_variants(arg, OWN)
    config = wan_1_3b_train.get_config(",".join(rest) or None)
    config.model.attention = "splash"
    if "teacher14b" in own:
        teacher_14b(config)
    slices = [w for w in own if w in SLICES]
    if len(slices) > 1:
        raise ValueError(f"configs/wan_1_3b_tpu.py: give one slice of {list(SLICES)}, got {slices}")
    if slices:
        s = SLICES[slices[0]]
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = s["mesh"]
        if "stream_batch" in s:
            config.stream.batch_size = s["stream_batch"]
            config.model.param_dtype = "bfloat16"  # inference: half the memory
    return config
