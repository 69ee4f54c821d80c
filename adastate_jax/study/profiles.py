"""Study profiles: model size, clip length, step budgets, seeds, evaluation sizes, and the measured
step times the time estimate uses (`study.measure.estimate_seconds`).

Every profile trains on `configs/panworld.py` (PanWorld 32x32 frames, PatchCodec patch 4 -> 8x8x48
latents, the word encoder) with the overrides below. Step times are measured, not guessed:
`python launch/study.py --profile=NAME --measure --out=DIR` runs a few steps of every distinct
training program of the profile's plan and a short evaluation, and prints the `step_seconds` to
paste here (each profile's comment says when and where its numbers were measured).

Must not know: how stages are built (`study.plan`) or run (`study.runner`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

CHUNK_FRAMES = 3  # latent frames per chunk (config.stream.chunk_frames of configs/panworld.py)
STEP_KEYS = (
    "teacher",
    "traj_clip",
    "ode",
    "dmd",
    "eval_chunk",
    "rollout_chunk",
    "compile",
    "compile_cached",
    "process",
)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything a study run decides up front. Overrides are (dotted config field, value) pairs."""

    name: str
    summary: str
    model: tuple[tuple[str, object], ...]  # every stage (the students start from the teacher)
    clip_frames: int  # latent frames of a training clip (21 = 7 chunks of 3)
    teacher_steps: int
    teacher_batch: int
    # teacher ODE trajectories the `traj` stage stores for the ODE init (study.plan); 0: no traj
    # stage, the ODE stage solves them on the fly inside every step (the teacher in the step: far
    # slower at 21 frames; only when a profile asks for it with 0)
    traj_clips: int
    ode_steps: int  # ODE-init steps on the stored trajectories (batches cycle over them)
    ode_batch: int
    dmd_steps: int  # N: DMD generator steps of every arm after the ODE init (inherited ones counted)
    dmd_batch: int
    train_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]  # sampling seeds per trained model
    ablation_eval_seeds: tuple[int, ...]
    teacher_check_seeds: tuple[int, ...]
    # seconds: per training step (`teacher`, `ode`, `dmd`, or `dmd_<arm>`), per clip the `traj`
    # stage stores (`traj_clip`), per evaluated chunk of one model x sampling seed (all prompts in
    # one batch, scoring included: `eval_chunk`), per showcase chunk (`rollout_chunk`), per process
    # start-up (`process`), per compilation (`compile`, `compile_dmd` for DMD stages and
    # `compile_traj` for the trajectories' program when given; `compile_cached`: a program already
    # in the run's persistent compilation cache)
    step_seconds: tuple[tuple[str, float], ...]
    # the teacher: trained with diffusion forcing, then fine-tuned `teacher_tf_steps` with
    # `teacher_attention` (configs/panworld.py's recipe: the diffusion-forcing teacher ignores the
    # prompts, the fine-tune makes it follow them; the ODE init needs the diffusion-forcing layout);
    # teacher_tf_steps=0: one teacher trained with `teacher_attention` from the start
    teacher_attention: str = "teacher_forcing"  # the students' teacher's layout (DMD's scores)
    teacher_tf_steps: int = 0
    teacher_overrides: tuple[tuple[str, object], ...] = ()
    # latent frames of the teacher's training clips (0: clip_frames). Shorter clips train the
    # teacher for less per step (the shipped PanWorld teacher trained on 9 frames follows the
    # prompts over 21, assets/study/teacher_search.md); the teacher check is always at clip_frames
    teacher_clip_frames: int = 0
    ode_overrides: tuple[tuple[str, object], ...] = ()
    dmd_overrides: tuple[tuple[str, object], ...] = ()
    baseline_alpha: float = 2.0  # horizon weight of the arms without their own alpha
    eval_labels: tuple[int, ...] = ()  # held-out camera labels (empty: all 8)
    horizons: tuple[int, ...] = (1, 2, 4, 6)
    horizon_chunks: int = 7
    bootstrap: int = 1000
    teacher_check_sampler_steps: int = 24
    ablation_seed: int = 0
    variants: tuple[str, ...] = ("bptt_window", "bptt_ode", "dmd_window", "regress_window")
    # the main adastate arms' variant: '' = the ablation's winner (they wait for it, issue 10 item
    # 2's "make it the default"); a variant name = that one, trained alongside the ablation (a
    # shorter critical path where stages run in parallel; the report still shows the ablation)
    adastate_variant: str = ""
    showcase_label: int = 5  # 'pan right medium'
    showcase_seed: int = 0
    ckpt_every: int = 50
    max_parallel: int = 1  # stages run at once (one accelerator shared by small models)
    env: tuple[tuple[str, str], ...] = ()  # the commands' environment (added to os.environ)

    def __post_init__(self):
        if self.dmd_steps < 2 or self.dmd_steps % 2:
            raise ValueError(f"profile {self.name}: dmd_steps={self.dmd_steps} must be even and >= 2")
        if self.traj_clips < 0 or 0 < self.traj_clips < self.ode_batch:
            raise ValueError(
                f"profile {self.name}: traj_clips={self.traj_clips} must be 0 (on the fly) or at least "
                f"ode_batch={self.ode_batch}"
            )
        if self.teacher_clip_frames < 0 or self.teacher_clip_frames % CHUNK_FRAMES:
            raise ValueError(
                f"profile {self.name}: teacher_clip_frames={self.teacher_clip_frames} must be 0 (the "
                f"training clip) or whole chunks of {CHUNK_FRAMES} frames"
            )
        if not self.train_seeds or self.ablation_seed < 0:
            raise ValueError(f"profile {self.name}: needs training seeds")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"profile {self.name}: horizons={self.horizons} must be integers >= 1")
        if self.horizon_chunks * CHUNK_FRAMES != self.clip_frames:
            raise ValueError(
                f"profile {self.name}: horizon_chunks={self.horizon_chunks} x {CHUNK_FRAMES} frames is not "
                f"the training clip ({self.clip_frames} frames)"
            )
        missing = [k for k in STEP_KEYS if k not in dict(self.step_seconds)]
        if missing:
            raise ValueError(f"profile {self.name}: step_seconds lacks {missing}")

    @property
    def teacher_frames(self) -> int:
        return self.teacher_clip_frames or self.clip_frames

    @property
    def eval_chunks(self) -> int:
        """Chunks of the longest evaluation horizon (one rollout covers the shorter ones)."""
        return max(self.horizons) * self.horizon_chunks

    @property
    def eval_frames(self) -> int:
        """Latent frames of the longest evaluation horizon (the `full` arm's cache at evaluation)."""
        return self.eval_chunks * CHUNK_FRAMES

    def seconds(self, key: str, fallback: str | None = None) -> float:
        sec = dict(self.step_seconds)
        return float(sec[key] if key in sec or fallback is None else sec[fallback])


def _pairs(d: Mapping) -> tuple:
    return tuple(d.items())


PROFILES: dict[str, Profile] = {}


def _register(p: Profile) -> Profile:
    PROFILES[p.name] = p
    return p


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"--profile={name}: unknown profile; choose from {sorted(PROFILES)}")
    return PROFILES[name]


# A pipeline test: a 1-layer DiT, a few steps per stage, one training seed, one prompt, 2-chunk clips.
_register(
    Profile(
        name="toy",
        summary="pipeline test: a 1-layer DiT, a few steps per stage, 1 training seed, 1 prompt",
        model=_pairs(
            {
                "model.dim": 32,
                "model.num_heads": 2,
                "model.num_layers": 1,
                "model.ffn_dim": 64,
                "model.freq_dim": 16,
            }
        ),
        clip_frames=6,
        teacher_steps=2,
        teacher_tf_steps=40,  # long enough to kill mid-way and watch it resume
        teacher_batch=2,
        traj_clips=8,  # one generator batch
        ode_steps=2,
        ode_batch=2,
        dmd_steps=2,
        dmd_batch=2,
        train_seeds=(0,),
        eval_seeds=(0,),
        ablation_eval_seeds=(0,),
        teacher_check_seeds=(0,),
        dmd_overrides=_pairs({"train.critic_steps": 1}),
        # three of the four ablation variants (the regress loss's compile adds minutes on a shared
        # CPU; tests/training/test_state_learning.py covers that switch)
        variants=("bptt_window", "bptt_ode", "dmd_window"),
        eval_labels=(5,),
        horizons=(1, 2),
        horizon_chunks=2,
        bootstrap=20,
        teacher_check_sampler_steps=2,
        ckpt_every=5,
        step_seconds=_pairs(
            {
                "teacher": 0.1,
                "traj_clip": 0.2,  # 0.17 CPU-s measured (2026-12-02, a loaded machine)
                "ode": 0.2,
                "dmd": 0.5,
                "eval_chunk": 0.2,
                "rollout_chunk": 0.1,
                "compile": 20.0,
                "compile_cached": 8.0,
                "process": 8.0,
            }
        ),
    )
)


# The committed study on this project's 2-core CPU machine (<= 2.5 h by `--dry_run`'s estimate).
# Model: configs/panworld.py's one-token-per-latent-pixel DiT (64 tokens per frame), narrowed to
# dim 64 (2 heads of 32), 2 layers (0.18M parameters): 1344 tokens per 21-frame clip.
# Step times (seconds on this machine, one process at a time). PROVISIONAL: this session's own
# probes (`--measure`) were starved of CPU by the test suite running beside them (a niced probe
# got 0-30% of a core: the teacher probe took 545 s of wall time for 6 steps), so the numbers are
# scaled from this machine's recorded measurements, not measured at this size:
# - README "Training" table (dim 128, 2 layers, 9-frame clips, batch 8, an idle machine): teacher
#   0.53 s/step, teacher_tf 0.96, ODE on the fly 2.4, DMD 2.2 (100 steps in 4-5 min incl. a
#   36-62 s compile), adastate DMD 5-9 min per 100 steps (x1.6);
# - assets/study/teacher_search.md: the same DiT on 21-frame clips costs ~3x the 1.6 CPU-s/step
#   of the 16-token dim-256 DiT (~4.8 s/step, diffusion forcing, batch 8);
# - assets/panworld_models/results.json: evaluating 4 models x 3 seeds x 42 chunks (8 prompts per
#   batch, instrumented, dim 128) took 232 s, 0.46 s per model-seed-chunk with its compiles.
# Scaling: dim 64 halves the attention and quarters the linear layers (x0.45); teacher forcing
# doubles the sequence (x2.5 at 21 frames); batch 4 halves ODE/DMD; a 7-chunk DMD rollout ~x2.3 of
# 3 chunks. MEASURED since (`python launch/study.py --profile=cpu --out=runs/measure_cpu --measure`,
# CPU seconds, 2 cores, a TPU compile beside it): teacher 2.41 s/step (compile 39 s), teacher_tf
# 5.11 (53 s), ODE 5.11 (55 s), DMD window 8.36 / 8.71 (compile 124 s; 23 s from the cache),
# DMD adastate 9.23 (139 s), process start 25-45 s; the evaluation probe did not run. With them
# the profile as sized here does NOT fit 2.5 h (see `--dry_run`): shrink it before launching.
# The ODE init now follows the recipe that works (README "Training"): the `traj` stage stores the
# teacher's trajectories once, solved chunk by chunk in its teacher-forcing layout (whole-clip ones
# are not PanWorld videos, training/objectives/ode_init.py), and the ODE stage trains on them
# (`ode,stored`: one student forward + backward per step, no teacher). The ODE figure above (5.1)
# was a step that solved whole-clip trajectories on the fly; it is not what runs now. MEASURED for
# the stored recipe (2026-12-02, this machine: `study.measure`'s traj and ODE probes run from a
# scratch script after a 2-step teacher of this size, not a full `--measure`; CPU seconds, ~one
# core's worth with other jobs on the 2 cores, so provisional): 11.0 s per stored clip (the second
# batch of 8; its first, compiling batch 106 s of wall time: compile ~17 s), ODE on them 1.39
# s/step (batch 4, compile 38 s). For scale: 768 clips of the 9-frame dim-128 recipe took 27 min
# (0.47 clips/s, ~2.1 s/clip wall, README "Training"): at 21 frames a clip has 7 chunks instead
# of 3 and each teacher pass sees 42 frames instead of 18. 128 clips: ~2 passes of the ODE init's
# 60 x 4 clips.
# SIZED (2026-12-02) to issue 10's 2.5 h: one stage at a time the profile took 3.98 h of stage time
# (DMD 109 min: 21 runs of 30 steps, ~40% of it process start and compiles). Now two stages run at
# once (`max_parallel=2`: the step times above are CPU seconds, so two processes on the two cores
# each run at about those rates; the estimate is the schedule's makespan), 64 stored clips instead
# of 128 (the ODE init's 60 x 4 clips cycle ~4 times over them), and 24 DMD steps instead of 30:
# estimate 2.47 h. The teacher's budget (500 + 200 steps) is kept: the study means nothing if the
# teacher fails issue 10's bar.
_register(
    Profile(
        name="cpu",
        summary="2-core CPU: a 2-layer dim-64 DiT (64 tokens per frame), 21-frame clips, 3 training seeds",
        model=_pairs({"model.dim": 64, "model.num_heads": 2, "model.num_layers": 2, "model.ffn_dim": 256}),
        clip_frames=21,
        teacher_steps=500,
        teacher_tf_steps=200,
        teacher_batch=8,
        traj_clips=64,
        ode_steps=60,
        ode_batch=4,
        dmd_steps=24,
        dmd_batch=4,
        train_seeds=(0, 1, 2),
        eval_seeds=(0, 1, 2, 3),
        ablation_eval_seeds=(0, 1),
        teacher_check_seeds=(0, 1),
        bootstrap=1000,
        max_parallel=2,
        step_seconds=_pairs(
            {
                "teacher": 2.4,
                "teacher_tf": 5.1,
                "traj_clip": 11.0,  # measured, provisional (above)
                "compile_traj": 17.0,
                "ode": 1.4,  # on the stored trajectories: measured, provisional (above)
                "dmd": 8.5,
                "dmd_adastate": 9.2,
                "eval_chunk": 0.4,  # not measured (the measuring run stopped before it)
                "rollout_chunk": 0.4,
                "compile": 50.0,
                "compile_dmd": 135.0,
                "compile_cached": 23.0,
                "process": 35.0,
            }
        ),
    )
)

# One H200 (<= 9 min by the estimate). NOT MEASURED: no device was lent to this session. The
# numbers are guesses from assets/gpu_h200/README.md (Wan2.1-1.3B on an H200: flow-matching steps
# compile in 18-25 s; a 1.3B DMD step did not compile within 85 s) for a model that is far from
# filling the GPU (per-step times launch-bound). Run
# `python launch/study.py --profile=gpu --out=runs/study_gpu --measure --nomeasure_cpu_time` on the
# device first and replace them. Twelve stages share the GPU (no preallocation) and the main
# adastate arms train the paper's path (`adastate_variant`) alongside the ablation: the critical
# path teacher -> fine-tune -> trajectories -> ODE -> window half -> adastate -> evaluation ->
# showcase is the estimate. The trajectories and the ODE init on them are guessed from the cpu
# profile's measured ratios (a stored clip ~2.2 teacher-forcing steps at batch 8, its program's
# compile ~0.35 of a training step's; an ODE step on stored trajectories ~0.27 of a teacher-forcing
# step at half its batch) applied to the guesses here, rounded up for a GPU that a batch of 8 does
# not fill: with them the whole estimate is 8.7 min, a margin smaller than these guesses' error.
_register(
    Profile(
        name="gpu",
        summary="one H200: a 4-layer dim-128 DiT (64 tokens per frame), 21-frame clips, 3 training seeds",
        model=_pairs({"model.dim": 128, "model.num_heads": 4, "model.num_layers": 4, "model.ffn_dim": 512}),
        clip_frames=21,
        teacher_steps=1500,
        teacher_tf_steps=500,
        teacher_batch=16,
        traj_clips=256,  # ~6 passes of the ODE init's 200 x 8 clips (the recipe: 768 for 500 x 8)
        ode_steps=200,
        ode_batch=8,
        dmd_steps=100,
        dmd_batch=8,
        train_seeds=(0, 1, 2),
        eval_seeds=(0, 1, 2, 3),
        ablation_eval_seeds=(0, 1, 2, 3),
        teacher_check_seeds=(0, 1, 2, 3),
        adastate_variant="bptt_window",
        max_parallel=12,
        env=_pairs({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
        step_seconds=_pairs(
            {
                "teacher": 0.03,
                "teacher_tf": 0.05,
                "traj_clip": 0.1,
                "compile_traj": 7.0,
                "ode": 0.03,  # on the stored trajectories (no teacher passes)
                "dmd": 0.12,
                "eval_chunk": 0.02,
                "rollout_chunk": 0.02,
                "compile": 20.0,
                "compile_dmd": 60.0,
                "compile_cached": 5.0,
                "process": 10.0,
            }
        ),
    )
)
