"""The PanWorld recipe at Wan2.1-T2V-1.3B scale: teacher -> ODE init -> self-forcing DMD.

`--config=configs/wan_1_3b_train.py:<stage>[,<anchor>][,<time layout>]` with the stages of
`configs/panworld.py` (teacher | ode | dmd, and `ode,stored`: ODE init on the trajectories that
`launch/make_ode_trajectories.py` wrote to `data/wan_ode_trajectories`, no teacher in the step):
the same `train` section and objectives, on the 1.3B
model (bf16 compute, fp32 params + Adam + EMA), 480x832 video (latents 60x104x16, 1560 tokens per
latent frame), 21 latent frames = 7 chunks of 3 (Self-Forcing's length), pre-encoded ArrayRecord
latents + UMT5 embeddings (`launch/encode_videos.py` writes them; `config.data.paths` must name
them), and Self-Forcing's DMD settings (lr 2e-6 generator / 4e-7 critic, b1 0, 5 critic steps, EMA
0.99, denoising steps 1000/750/500/250 with shift 5).

Mesh: `fsdp=-1` (parameters, optimiser and EMA sharded over every device; 1.3B x (4 + 8 + 4) bytes
~ 21 GB in all), `data=1`; on a pod with more devices than fsdp needs, set e.g.
`--config.mesh.data=8 --config.mesh.fsdp=-1`. Global batch 64 (Self-Forcing); every layer is
rematerialised (`model.remat='full'`) and training masks go through the block-sparse attention
path (`model.attention_blocks`), cuDNN flash attention on GPUs (`model.attention='cudnn'`; on TPU
the splash kernel, 'splash': `configs/wan_1_3b_tpu.py`). `launch/benchmark_train.py` measures a
step of any stage of this file on the machine at hand (synthetic batches, random weights).
"""

from adastate_jax.config import defaults
from configs import panworld

STAGES = ("teacher", "ode", "dmd")


def get_config(arg=None):
    small = panworld.get_config(arg)  # stage, anchor and time layout parsed there
    stage = small.train.objective

    model = defaults.model_section(dtype="bfloat16", remat="full", attention="cudnn")  # the 1.3B shapes
    config = defaults.base_config(model, latent_h=60, latent_w=104, vae_kind="wan", text_kind="umt5")
    config.stream = small.stream
    config.stream.latent_h, config.stream.latent_w = 60, 104
    config.stream.window_frames = 3  # Self-Forcing attends to the last chunk
    config.stream.max_frames = 21
    config.mesh.data, config.mesh.fsdp = 1, -1

    config.data = small.data
    if config.data.source == "ode_trajectories":  # `ode,stored`: no teacher in the step
        config.data.paths = ("data/wan_ode_trajectories",)  # launch/make_ode_trajectories.py --out_dir
    else:
        config.data.source = "arrayrecord"
        config.data.paths = ("data/wan_latents",)  # launch/encode_videos.py --out
    config.data.video.num_frames = 81  # pixel frames -> 21 latent frames (launch/encode_videos.py)
    config.data.video.height, config.data.video.width = 480, 832
    config.data.worker_count = 8
    config.data.read_threads = 4

    config.train = small.train
    tc = config.train
    tc.batch_size = 64
    tc.log_every, tc.ckpt_every, tc.keep = 10, 200, 3
    if stage == "flow_matching":
        tc.steps, tc.lr, tc.warmup = 3000, 1e-5, 100
    elif stage == "ode_init":
        tc.steps, tc.lr = 3000, 2e-6
        tc.init_from = tc.teacher_path = ""  # the converted Wan2.1 teacher (launch/convert.py)
    else:  # self_forcing_dmd
        tc.steps = 600
        tc.lr, tc.critic_lr = 2e-6, 4e-7
        tc.b1 = tc.dmd_b1 = tc.critic_b1 = 0.0
        tc.critic_steps = 5
        tc.teacher_guidance = 3.0
        tc.init_from = tc.teacher_path = ""
    tc.ema = 0.99
    return config
