"""Tiny PanWorld training recipes for CPU: teacher -> ODE init -> self-forcing DMD (any anchor).

`--config=configs/panworld.py:<stage>[,<anchor>][,<time layout>]`, stage one of
  teacher  flow matching (diffusion forcing: block-causal, a timestep per chunk), the teacher/base;
  teacher_tf  fine-tunes that teacher with teacher forcing (clean context, as when streaming):
           the diffusion-forcing teacher follows the camera prompts erratically (its context is
           seldom clean in training; progression 1.10 [0.20, 2.48] in its 9-frame clip), the
           fine-tuned one steadily, also far beyond the clip (0.80 [0.64, 0.92] at 63 frames;
           assets/panworld_models/teachers/);
  ode      ODE init: regress the causal student onto the teacher's few-step trajectories
           (generated inside each step; `ode,stored`: read from the directory that
           `launch/make_ode_trajectories.py` wrote, `data.paths`);
  dmd      self forcing + DMD: the student rolls out with its own cache (the streaming `step`).
e.g. `configs/panworld.py:dmd,adastate`, `configs/panworld.py:teacher`.

Data: PanWorld clips of 32x32 frames (its default; 12 px sprites need the height), 9 frames =
3 chunks of 3. The DiT: dim 128, 4 heads, 2 layers (0.6M params).
Pixels -> latents with the fixed PatchCodec, patch 4 and 48 channels without
projection (3 * 4 * 4 = 48, the codec is exactly invertible): latents 8x8x48, so the DiT has
in/out_channels 48 and 64 tokens per frame. Prompts: the PanWorld word encoder (`text.kind`
'words'), frozen, built from `config.seed` exactly as `launch/rollout.py` builds it.

Stages hand over through exported params: each run writes `WORKDIR/export/` (EMA params +
config), which the next stage reads (`train.init_from`, `train.teacher_path`) and which
`launch/rollout.py --checkpoint WORKDIR/export` streams from.
"""

from adastate_jax.config import defaults

STAGES = ("teacher", "teacher_tf", "ode", "dmd")


def get_config(arg=None):
    (stage, *more), rest = defaults.split_variants(arg or "teacher", STAGES + ("stored",))
    stored = "stored" in [stage, *more]
    stages = [t for t in [stage, *more] if t in STAGES]
    if len(stages) > 1:
        raise ValueError(f"configs/panworld.py: give one stage of {STAGES}, got {stages}")
    stage = stages[0] if stages else "teacher"
    if stored and stage != "ode":
        raise ValueError("configs/panworld.py: 'stored' is a variant of the ode stage only")

    model = defaults.model_section(
        dim=128,
        num_heads=4,  # head dim 32
        num_layers=2,
        ffn_dim=256,
        freq_dim=32,
        text_dim=32,
        text_len=8,
        in_channels=48,  # PatchCodec patch 4: 3 * 4 * 4
        out_channels=48,
        # one token per latent pixel (64 tokens per frame): with Wan's (1, 2, 2) a token carries
        # 192 features through a 128-dim stream, and the teacher plateaued at loss ~0.48 with
        # samples that stayed noise; with (1, 1, 1) it reaches ~0.08 and generates PanWorld views
        patch_size=(1, 1, 1),
        zero_init_head=True,
    )
    config = defaults.base_config(model, latent_h=8, latent_w=8, vae_kind="patch", text_kind="words")
    config.vae.patch.patch, config.vae.patch.projection = 4, "none"
    config.stream.window_frames = 3
    config.stream.max_frames = 9
    config.sampler.denoising_steps = (1000.0, 750.0, 500.0, 250.0)
    config.sampler.shift = 3.0  # 8x8 latents: less shift towards high noise than Wan's 5

    defaults.training_sections(config)
    config.data.panworld.num_frames = 9
    config.data.panworld.frame_height = config.data.panworld.frame_width = 32

    teacher = "outputs/panworld_teacher_tf/export"  # the teacher the students learn from
    tc = config.train
    if stage == "teacher_tf":
        tc.attention = "teacher_forcing"
        tc.steps, tc.lr = 1000, 5e-4
        tc.init_from = "outputs/panworld_teacher/export"
    elif stage == "ode":
        tc.objective = "ode_init"
        # the ODE-init student is a `window` student (an `ode,<anchor>` variant picks another):
        # ODE init refuses `adastate` (its state has no clean target; the adastate DMD starts from
        # this export) and `ema_sink` over clips that evict a frame (training/objectives/ode_init.py)
        config.stream.anchor = "window"
        tc.steps, tc.lr = 500, 5e-4
        tc.init_from = tc.teacher_path = teacher
        # the teacher's trajectories chunk by chunk, as it streams: its whole-clip (diffusion-forcing)
        # ODE solutions are not PanWorld videos (training/objectives/ode_init.py, README "Training")
        tc.teacher_attention = "teacher_forcing"
        if stored:  # no teacher in the step: the trajectories were generated once (ode_init docstring)
            config.data.source = "ode_trajectories"
            config.data.paths = ("outputs/panworld_ode_trajectories",)
    elif stage == "dmd":
        tc.objective = "self_forcing_dmd"
        tc.steps, tc.lr, tc.critic_lr = 100, 2e-4, 4e-4
        tc.b1, tc.warmup, tc.ckpt_every = 0.0, 0, 50
        tc.init_from = "outputs/panworld_ode/export"
        tc.teacher_path = teacher
    config = defaults.apply_variants(config, rest)
    if stage == "dmd" and "adastate" in rest and config.stream.anchor == "adastate":
        # `dmd,adastate` (the variant named; plain `dmd` keeps the ODE init and no state term, so
        # a config derived from it by setting another stream.anchor stays valid): how the state
        # learns, by the AdaState study's ablation (issue 10 item 2; its winner, assets/study/README.md):
        # DMD from the trained `window` student (the paper's path) with the state regressed toward
        # its chunk's content (`train.state_loss`, training/objectives/dmd.py)
        tc.init_from, tc.init_policy = "outputs/panworld_dmd_window/export", "window"
        tc.state_loss = "regress"
    return config
