"""Tiny PanWorld training recipes for CPU: teacher -> ODE init -> self-forcing DMD (any anchor).

`--config=configs/panworld.py:<stage>[,<anchor>][,<time layout>]`, stage one of
  teacher  flow matching (diffusion forcing: block-causal, a timestep per chunk), the teacher/base;
  teacher_tf  fine-tunes that teacher with teacher forcing (clean context, as when streaming):
           the diffusion-forcing teacher makes valid views but ignores the camera prompts (its
           context is seldom clean in training); 1000 teacher-forcing steps make it follow them
           within the 9-frame training clip (progression 1.27 [0.67, 2.42] vs -0.5 [-2, 0.9]);
  ode      ODE init: regress the causal student onto the teacher's few-step trajectories
           (generated inside each step; `ode,stored`: read from the directory that
           `launch/make_ode_trajectories.py` wrote, `data.paths`);
  dmd      self forcing + DMD: the student rolls out with its own cache (the streaming `step`).
e.g. `configs/panworld.py:dmd,adastate`, `configs/panworld.py:teacher`.

Data: PanWorld clips of 32x32 frames (its default; 12 px sprites need the height), 9 frames =
3 chunks of 3. The DiT: dim 128, 4 heads, 2 layers (0.6M params).
Pixels -> latents with the fixed PatchCodec, patch 4 and 48 channels without
projection (3 * 4 * 4 = 48, the codec is exactly invertible): latents 8x8x48, so the DiT has
in/out_channels 48 and 16 tokens per frame. Prompts: the PanWorld word encoder (`text.kind`
'words'), frozen, built from `config.seed` exactly as `launch/rollout.py` builds it.

Stages hand over through exported params: each run writes `WORKDIR/export/` (EMA params +
config), which the next stage reads (`train.init_from`, `train.teacher_path`) and which
`launch/rollout.py --checkpoint WORKDIR/export` streams from.
"""

import importlib.util
import os

import ml_collections

STAGES = ("teacher", "teacher_tf", "ode", "dmd")


def load_common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("adastate_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = load_common()
    tokens = [t.strip() for t in (arg or "teacher").split(",") if t.strip()]
    stages = [t for t in tokens if t in STAGES]
    if len(stages) > 1:
        raise ValueError(f"configs/panworld.py: give one stage of {STAGES}, got {stages}")
    stage = stages[0] if stages else "teacher"
    stored = "stored" in tokens  # ode: train on stored trajectories (launch/make_ode_trajectories.py)
    if stored and stage != "ode":
        raise ValueError("configs/panworld.py: 'stored' is a variant of the ode stage only")
    rest = ",".join(t for t in tokens if t not in STAGES and t != "stored")

    model = common.model_section(
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
    config = common.base_config(model, latent_h=8, latent_w=8, vae_kind="patch", text_kind="words")
    config.vae.config = ml_collections.ConfigDict(dict(patch=4, projection="none"))
    config.stream.window_frames = 3
    config.stream.max_frames = 9
    config.sampler.denoising_steps = (1000, 750, 500, 250)
    config.sampler.shift = 3.0  # 8x8 latents: less shift towards high noise than Wan's 5

    # --- data --------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict(
        dict(
            source="panworld",  # panworld | arrayrecord | video | ode_trajectories
            paths=(),  # arrayrecord files (data.pipeline.write_latents_arrayrecord) | video files
            panworld=ml_collections.ConfigDict(
                dict(frame_height=32, frame_width=32, num_frames=9, num_clips=100_000, seed=0)
            ),
            # source 'video' (data/video_source.py): paths = video files / directories / globs
            video=ml_collections.ConfigDict(
                dict(
                    num_frames=9,  # frames per clip
                    height=32,  # centre crop to height:width, then resize
                    width=32,
                    frame_stride=1,  # source frames between two clip frames
                    clip_stride=0,  # source frames between clip starts in one file (0: one clip per file)
                    max_clips_per_file=0,  # 0: all
                    captions="",  # '': <video>.txt sidecars | a .json / .jsonl file | 'none' (no text)
                    missing_caption="error",  # error | empty (the empty prompt)
                    short_files="error",  # error | skip (files shorter than one clip)
                    frame_count="verify",  # verify | decode | metadata (how frame counts are found)
                    seek=True,  # seek to a clip's first frame (checked) instead of decoding from 0
                    probe_threads=4,  # threads opening files while the clip table is built
                )
            ),
            shuffle=True,
            seed=0,
            worker_count=0,  # grain worker processes (0: in-process)
            read_threads=1,
            prefetch=2,
        )
    )

    # --- training ----------------------------------------------------------------------------
    config.train = ml_collections.ConfigDict(
        dict(
            objective="flow_matching",  # flow_matching | ode_init | self_forcing_dmd
            steps=2500,  # ~16 min on 2 CPU cores (2.6 steps/s)
            batch_size=8,  # global; divisible by the mesh's batch axes and the process count
            lr=1e-3,
            schedule="constant",  # constant | cosine
            final_lr_fraction=0.1,
            warmup=20,
            b1=0.9,
            b2=0.99,
            adam_eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
            ema=0.99,  # EMA decay of the trained params (0: no EMA)
            log_every=10,
            ckpt_every=100,
            keep=3,
            async_checkpoints=True,
            seed=-1,  # PRNG of the train state (noise, timesteps, rollouts); -1: config.seed
            log_data_order=False,  # write the clip indices of every step to WORKDIR/data_order.jsonl
            init_from="",  # params dir (a previous stage's WORKDIR/export) to start from
            teacher_path="",  # ode / dmd: the teacher's params dir
            # flow matching
            attention="diffusion_forcing",  # bidirectional | diffusion_forcing | teacher_forcing
            t_sampling="chunk",  # clip | chunk | frame
            tf_window=-1,  # teacher forcing: clean frames visible before a chunk (-1: all)
            tf_sink=0,
            # ODE init
            teacher_attention="diffusion_forcing",  # teacher on a whole clip (DMD also: teacher_forcing)
            teacher_guidance=1.0,  # CFG scale of the teacher (ODE trajectories and DMD real score)
            ode_substeps=4,  # teacher Euler steps between two student timesteps
            # DMD
            alpha=2.0,  # horizon weighting: w_i = 1 + alpha * i / (N - 1), mean 1 (0: plain DMD)
            critic_steps=2,  # critic updates per generator update (Self-Forcing: 5)
            critic_lr=1e-3,
            critic_b1=0.0,
            dmd_min_t=20,
            dmd_max_t=980,
            truncation_chunks=2,  # adastate: gradient through the carry for K chunks (others: 1)
            remat_chunks=True,  # jax.checkpoint per chunk of the rollout
            dmd_b1=0.0,
            # the critic (fake score): its architecture is `config.critic_model` when set (same
            # fields as config.model; absent: the teacher's), its params start from critic_path when
            # given, else as a copy of the teacher (shapes must match) or, with critic_init='random',
            # from random params
            critic_path="",  # params dir of the critic's shape ('' : see critic_init)
            critic_init="teacher",  # teacher | random (used when critic_path is '')
        )
    )

    teacher = "outputs/panworld_teacher_tf/export"  # the teacher the students learn from
    if stage == "teacher_tf":
        config.train.attention = "teacher_forcing"
        config.train.steps = 1000
        config.train.lr = 5e-4
        config.train.init_from = "outputs/panworld_teacher/export"
    elif stage == "ode":
        config.train.objective = "ode_init"
        config.train.steps = 200
        config.train.lr = 5e-4
        config.train.init_from = teacher
        config.train.teacher_path = teacher
        if stored:  # no teacher in the step: the trajectories were generated once (ode_init docstring)
            config.data.source = "ode_trajectories"
            config.data.paths = ("outputs/panworld_ode_trajectories",)
    elif stage == "dmd":
        config.train.objective = "self_forcing_dmd"
        config.train.steps = 100
        config.train.lr = 2e-4
        config.train.critic_lr = 4e-4
        config.train.b1 = 0.0
        config.train.warmup = 0
        config.train.init_from = "outputs/panworld_ode/export"
        config.train.teacher_path = teacher
        config.train.ckpt_every = 50
    return common.apply_arg(config, rest)
