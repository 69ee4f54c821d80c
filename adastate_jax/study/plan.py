"""The study plan: arms, the state-learning ablation, and the stages (commands) they run.

Owns:
- `ARMS` (the comparison: policy, stream settings with equal cached frames, horizon weight alpha),
  `VARIANTS` (the state-learning ablation: issue 10 item 2's switches `train.state_loss` and the
  start, `train.init_from` a window student or the ODE init) and its pre-declared selection rule
  (`CRITERION`);
- `Stage` and `build`: every stage as a command of `launch/train.py`, `launch/evaluate.py`,
  `launch/rollout.py` or `launch/make_ode_trajectories.py` (argv with `{python}` / `{repo}` tokens,
  run in the run directory) or an in-process action (`pick_winner`, `report`), with its
  dependencies, its done-marker, and the DMD steps it trains (inherited steps counted through
  `init_steps_from`);
- `Plan.budget`: the DMD steps of a trained model after the shared ODE init, inherited steps
  included (the time estimate is `study.measure.estimate_seconds`).

The shared ODE init trains on the teacher's trajectories stored once by the `traj` stage
(`launch/make_ode_trajectories.py`, `Profile.traj_clips` clips into RUN_DIR/ode_trajectories/,
solved chunk by chunk in the teacher's `teacher_attention` layout) with `ode,stored`: a step is
one student forward + backward, no teacher. `traj_clips=0` asks for the old way instead: no `traj`
stage, the ODE stage solves a fresh trajectory per clip inside every step (`ode,window` with the
teacher; ~2 x chunks x the teacher's Euler passes per clip and step, far slower at 21 frames).

Budgets: every arm gets N = `dmd_steps` DMD generator steps after the shared ODE init. The window
student is trained N/2 steps (`dmd/window_half_s*`), then continued from its checkpoints to N (the
`window` arm: one straight run, constant learning rate); the adastate arms on the paper's path
start from that half and train N/2 more (N in all).

Must not know: how stages are run or resumed (`study.runner`), how results are judged
(`study.decide`), objectives' internals: every training choice is a `--config.<field>=<value>`
string of `launch/train.py` on `configs/panworld.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from adastate_jax.study.commands import (  # noqa: F401
    BASE_CONFIG,
    PYTHON,
    REPO,
    _common,
    _eval_argv,
    _train_argv,
    eval_stream,
    format_value,
    models_spec,
    override_flags,
    sampler_steps,
)
from adastate_jax.study.profiles import CHUNK_FRAMES, PROFILES, Profile, profile  # noqa: F401

# ------------------------------------------------------------------------------------------------
# Arms: anchor + window = CACHED_FRAMES latent frames each (full: the whole history)
# ------------------------------------------------------------------------------------------------

CACHED_FRAMES = 4
ODE_WINDOW_FRAMES = 3  # the shared ODE-init student: a window of the previous chunk, common to every arm
STAGE_GROUPS = ("teacher", "teacher_check", "traj", "ode", "ablation", "dmd", "eval", "showcase", "report")
TRAJ_DIR = "ode_trajectories"  # the traj stage's output (RUN_DIR/ode_trajectories/), the ODE init's data
# records per trajectory shard, the unit in which a killed traj stage resumes (finished shards are
# kept): smaller than the recipe's 128 (launch/panworld_models.sh) so that a kill loses minutes
TRAJ_CLIPS_PER_FILE = 32
TRAJ_BATCH = 8  # clips per jitted teacher call of the generator (its default)


@dataclasses.dataclass(frozen=True)
class Arm:
    """A row of the comparison: trained and evaluated with anchor `policy` and the `config.stream`
    fields of `stream`; `alpha` the horizon weight of its DMD (None: the profile's baseline alpha);
    `reference`: a reference row outside the equal-cache comparison (LongLive's own layout)."""

    name: str
    policy: str
    stream: tuple[tuple[str, int], ...]
    alpha: float | None = None
    reference: bool = False

    @property
    def adastate(self) -> bool:
        return self.policy == "adastate"

    def stream_dict(self) -> dict:
        return dict(self.stream)


ADASTATE_STREAM = (("state_frames", 1), ("window_frames", 3))
ARMS: tuple[Arm, ...] = (
    Arm("window", "window", (("window_frames", 4),)),
    Arm("full", "full", ()),
    Arm("sink", "sink", (("sink_frames", 1), ("window_frames", 3))),
    Arm("ema_sink", "ema_sink", (("sink_frames", 1), ("window_frames", 3))),
    Arm("adastate_a2", "adastate", ADASTATE_STREAM, alpha=2.0),
    Arm("adastate_a4", "adastate", ADASTATE_STREAM, alpha=4.0),
    Arm("longlive", "sink", (("sink_frames", 3), ("window_frames", 6)), reference=True),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
SHOWCASE_ARMS = ("window", "full", "sink", "ema_sink", "adastate_a2", "adastate_a4")  # the five policies

# ------------------------------------------------------------------------------------------------
# The state-learning ablation (issue 10 item 2), run before the main adastate arms
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the adaptive state learns: `init` 'ode' (the shared ODE init, DMD_STEPS steps) or
    'window' (the window student after half of them, then the other half), and `state_loss` the
    direct signal on the state (`train.state_loss`: none | dmd | regress)."""

    name: str
    init: str
    state_loss: str
    question: str


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "bptt_window", "window", "none", "(c) from the window student, truncated BPTT only (the paper's path)"
    ),
    Variant("bptt_ode", "ode", "none", "(a)/(c) from the ODE init, truncated BPTT only"),
    Variant("dmd_window", "window", "dmd", "(b) from the window student + DMD on the state"),
    Variant("regress_window", "window", "regress", "(b) from the window student + state regression"),
)
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
ABLATION_ALPHA = 2.0
CRITERION_HORIZONS = (4, 6)
CRITERION_MIN_CODE_CONF = 0.9


def ablation_horizons(p: Profile) -> tuple[int, ...]:
    """The horizons the ablation is evaluated and judged at: CRITERION_HORIZONS within the profile's."""
    return tuple(h for h in CRITERION_HORIZONS if h <= max(p.horizons)) or (max(p.horizons),)


CRITERION = (
    f"Among the variants whose mean code confidence is >= {CRITERION_MIN_CODE_CONF} at every horizon of "
    f"{list(CRITERION_HORIZONS)}x (all variants if none is), the winner has the highest mean over those "
    "horizons of min(progression, 1) (progression above the requested motion earns nothing); ties go to "
    "the higher mean code confidence, then to the earlier variant in the table. Scored on the ablation "
    "evaluation (one training seed per variant, alpha 2), written before it runs."
)

# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step of the study. Paths are relative to the run directory, where commands
    run; `argv` carries `{python}` / `{repo}` tokens (so a record does not depend on where the
    repository lives). `done`: the file a finished stage leaves. `steps`: DMD generator steps this
    stage trains; `init_steps_from`: the stage whose trained model it starts from (its steps
    count too); `resume_from`: a workdir whose checkpoints a fresh start copies (this run continues
    that one); `expect_step`: the step `export/info.json` must record; `files`: (path, text) written
    before the command; `pending`: waits for the ablation's winner; `always`: run every time;
    `owns_workdir`: not a training stage, but a changed command must not continue in its workdir
    (the runner moves it aside when stale or unrecorded, as it does every training stage's)."""

    name: str
    group: str
    workdir: str
    done: str
    argv: tuple[str, ...] = ()
    action: str = ""
    deps: tuple[str, ...] = ()
    steps: int = 0
    init_steps_from: str = ""
    resume_from: str = ""
    expect_step: int = 0
    files: tuple[tuple[str, str], ...] = ()
    pending: bool = False
    always: bool = False
    owns_workdir: bool = False

    def __post_init__(self):
        if self.group not in STAGE_GROUPS:
            raise ValueError(f"stage {self.name}: unknown group {self.group!r}; groups {STAGE_GROUPS}")
        if bool(self.argv) == bool(self.action):
            raise ValueError(f"stage {self.name}: give a command or an action, not both or neither")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained student of the comparison: its arm, training seed and the stage that made it."""

    arm: str
    train_seed: int
    stage: str
    variant: str = ""  # adastate arms: the ablation variant they were trained with

    @property
    def export(self) -> str:
        return f"{self.stage}/export"


@dataclasses.dataclass(frozen=True)
class Plan:
    profile: Profile
    train_seeds: tuple[int, ...]
    winner: str | None  # the ablation's winning variant (None: not known yet)
    variants: tuple[str, ...]  # the ablation variants this plan trains
    stages: tuple[Stage, ...]
    models: tuple[TrainedModel, ...]  # the main comparison
    ablation_models: tuple[TrainedModel, ...]
    notes: tuple[str, ...]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in the plan")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def budget(self, name: str) -> int:
        """DMD generator steps of the model a stage leaves, after the shared ODE init: its own
        steps plus those of every model it was initialised from."""
        s = self.stage(name)
        return s.steps + (self.budget(s.init_steps_from) if s.init_steps_from else 0)


def _dmd_pairs(p: Profile, arm: Arm, steps_total: int, seed: int, init_from: str, teacher: str, switches=()):
    alpha = arm.alpha if arm.alpha is not None else p.baseline_alpha
    return [
        *_common(p),
        *[(f"stream.{k}", v) for k, v in arm.stream],
        *p.dmd_overrides,
        ("train.steps", steps_total),
        ("train.batch_size", p.dmd_batch),
        ("train.seed", seed),
        ("train.alpha", float(alpha)),
        ("train.teacher_attention", p.teacher_attention),
        ("train.schedule", "constant"),  # a run continued from its half (window) equals one straight run
        ("train.warmup", 0),
        ("train.ckpt_every", p.ckpt_every),
        ("train.init_from", init_from),
        ("train.teacher_path", teacher),
        *switches,
    ]


def shipped_teacher_source(p: Profile) -> str:
    """The `teacher/source.json` of a profile with `teacher_from`: the shipped model's name and the
    params fingerprint its manifest records (a re-shipped teacher changes the stage's fingerprint,
    so everything after it runs again). Raises naming the profile when the model is not shipped."""
    import json

    from adastate_jax import shipped

    try:
        manifest = shipped.read_manifest(p.teacher_from)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"profile {p.name}: teacher_from={p.teacher_from!r}: {e}") from None
    return json.dumps(dict(name=p.teacher_from, params_sha256=manifest["params_sha256"]), indent=1)


def pan_labels(p: Profile) -> tuple[int, ...]:
    """The PanWorld labels issue 10's teacher bar is about ("pans: progression >= 0.8"): the pan
    prompts among the profile's evaluation labels (static and back-and-forth have no progression
    toward a direction: back-and-forth's net motion is ~0 by design)."""
    from adastate_jax.data import panworld

    prompts = panworld.camera_prompts()
    labels = p.eval_labels or tuple(range(len(prompts)))
    return tuple(label for label in labels if prompts[label].startswith("pan "))


def teacher_stage(**kw) -> Stage:
    """The `teacher` stage: its export in `teacher/export` (trained, or a shipped one copied in)."""
    return Stage("teacher", "teacher", "teacher", "teacher/export/info.json", **kw)


def _trained_teacher(p: Profile, add) -> str:
    """The teacher's training stages (diffusion forcing, then its optional teacher-forcing
    fine-tune). -> the stage whose export is the teacher"""
    teacher_pairs = [
        *_common(p, p.teacher_frames),
        ("train.attention", "diffusion_forcing" if p.teacher_tf_steps else p.teacher_attention),
        *p.teacher_overrides,
        ("train.steps", p.teacher_steps),
        ("train.batch_size", p.teacher_batch),
        ("train.init_from", ""),
        ("train.ckpt_every", max(p.ckpt_every, p.teacher_steps // 10 or 1)),
    ]
    add(teacher_stage(argv=_train_argv("teacher", "teacher", teacher_pairs), expect_step=p.teacher_steps))
    teacher = "teacher"
    if p.teacher_tf_steps:
        tf_pairs = [
            *_common(p, p.teacher_frames),
            ("train.attention", p.teacher_attention),
            ("train.steps", p.teacher_tf_steps),
            ("train.batch_size", p.teacher_batch),
            ("train.init_from", "teacher/export"),
            ("train.ckpt_every", max(p.ckpt_every, p.teacher_tf_steps // 10 or 1)),
        ]
        add(
            Stage(
                "teacher_tf",
                "teacher",
                "teacher_tf",
                "teacher_tf/export/info.json",
                _train_argv("teacher_tf", "teacher_tf", tf_pairs),
                deps=("teacher",),
                expect_step=p.teacher_tf_steps,
            )
        )
        teacher = "teacher_tf"
    return teacher


def build(
    p: Profile,
    train_seeds: Sequence[int] | None = None,
    winner: str | None = None,
) -> Plan:
    """The stages of profile `p` (training seeds `train_seeds`, default the profile's). `winner`:
    the ablation's winning variant once known (the main adastate arms wait for it)."""
    seeds = tuple(train_seeds if train_seeds is not None else p.train_seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--train_seeds={list(seeds)}: give distinct integers >= 0")
    if winner is not None and winner not in VARIANT_BY_NAME:
        raise ValueError(f"ablation winner {winner!r} is not a variant of {list(VARIANT_BY_NAME)}")
    stages: dict[str, Stage] = {}
    notes: list[str] = []
    half = p.dmd_steps // 2

    def add(stage: Stage) -> Stage:
        stages.setdefault(stage.name, stage)
        return stages[stage.name]

    # --- teacher (trained, or a shipped one), its optional fine-tune, its within-clip check ----
    if p.teacher_from:
        source = shipped_teacher_source(p)
        add(teacher_stage(action="use_shipped_teacher", files=(("teacher/source.json", source),)))
        teacher = "teacher"
    else:
        teacher = _trained_teacher(p, add)
    teacher_export = f"{teacher}/export"
    check_spec = models_spec(
        # the teacher streams its own clip as it was trained: every frame, absolute time
        {"teacher": {"policy": "full", "stream": {"max_frames": p.clip_frames, "time_layout": "absolute"}}},
        [("teacher", teacher_export, None)],
        "teacher_check",
    )
    check_pairs = [*_common(p), ("sampler.denoising_steps", sampler_steps(p.teacher_check_sampler_steps))]
    add(
        Stage(
            "teacher_check",
            "teacher_check",
            "teacher_check",
            "teacher_check/results.json",
            _eval_argv(
                p,
                "teacher",
                check_pairs,
                "teacher_check/models.json",
                "teacher_check",
                (1,),
                p.teacher_check_seeds,
                False,
                labels=pan_labels(p),
            ),
            deps=(teacher,),
            files=(("teacher_check/models.json", check_spec),),
        )
    )

    # --- the teacher's ODE trajectories, stored once ---------------------------------------------
    # in the teacher's own layout: with the teacher-forcing teacher they are solved chunk by chunk,
    # as it streams (whole-clip ODEs of a PanWorld teacher are not PanWorld videos:
    # training/objectives/ode_init.py). The ODE overrides go to the generator too (its Euler
    # substeps, guidance and sampler timesteps make the targets; the ODE stage checks the last
    # against the stored metadata).
    layout = ("train.teacher_attention", p.teacher_attention)
    teacher_path = ("train.teacher_path", teacher_export)
    if p.traj_clips:
        from adastate_jax.data import trajectories

        shards = len(trajectories.shard_counts(p.traj_clips, TRAJ_CLIPS_PER_FILE))
        traj_argv = (
            PYTHON,
            f"{REPO}/launch/make_ode_trajectories.py",
            f"--config={REPO}/{BASE_CONFIG}:ode",
            *override_flags([*_common(p), layout, teacher_path, *p.ode_overrides]),
            f"--out_dir={TRAJ_DIR}",
            f"--num_clips={p.traj_clips}",
            f"--clips_per_file={TRAJ_CLIPS_PER_FILE}",
            f"--batch_size={TRAJ_BATCH}",
        )
        add(
            Stage(
                "traj",
                "traj",
                TRAJ_DIR,
                # the generator writes no completion file (metadata.json comes first); its shards
                # are renamed into place when complete, in order, and it exits 0 only after all
                # of them: the last shard is there once every clip is
                f"{TRAJ_DIR}/{trajectories.shard_name(shards - 1, shards)}",
                traj_argv,
                deps=(teacher,),
                owns_workdir=True,  # a changed teacher or setting: the generator refuses the old dir
            )
        )

    # --- the shared ODE init: a window student -------------------------------------------------
    ode_pairs = [*_common(p), ("stream.window_frames", ODE_WINDOW_FRAMES)]
    if p.traj_clips:  # on the stored trajectories: no teacher in the step
        ode_variant, ode_deps = "ode,stored", ("traj", teacher)
        ode_pairs.append(("data.paths", f"('{TRAJ_DIR}',)"))  # a tuple of one string, quoted
    else:  # asked for: solved on the fly inside every step, with the teacher
        ode_variant, ode_deps = "ode,window", (teacher,)
        ode_pairs.append(layout)
    ode_pairs += [
        *p.ode_overrides,
        ("train.steps", p.ode_steps),
        ("train.batch_size", p.ode_batch),
        ("train.ckpt_every", max(p.ckpt_every, p.ode_steps // 4 or 1)),
        ("train.init_from", teacher_export),
        *([] if p.traj_clips else [teacher_path]),
    ]
    add(
        Stage(
            "ode",
            "ode",
            "ode",
            "ode/export/info.json",
            _train_argv(ode_variant, "ode", ode_pairs),
            deps=ode_deps,
            expect_step=p.ode_steps,
        )
    )

    # --- DMD: the window student's first half (the adastate arms may start from it) ------------
    window = ARM_BY_NAME["window"]

    def dmd_stage(name: str, policy: str, pairs, group: str = "dmd", **kw) -> Stage:
        """A DMD training stage into RUN_DIR/NAME, done when its export's info.json exists."""
        return add(
            Stage(
                name, group, name, f"{name}/export/info.json", _train_argv(f"dmd,{policy}", name, pairs), **kw
            )
        )

    def window_half(seed: int) -> str:
        name = f"dmd/window_half_s{seed}"
        pairs = _dmd_pairs(p, window, half, seed, "ode/export", teacher_export, [])
        dmd_stage(name, "window", pairs, deps=("ode", teacher), steps=half, expect_step=half)
        return name

    def adastate_stage(arm: Arm, variant: Variant, seed: int, group: str, pending: bool) -> Stage:
        name = f"dmd/{arm.name}_{variant.name}_s{seed}"
        switches = [("train.state_loss", variant.state_loss)]
        if variant.init == "window":
            switches.append(("train.init_policy", "window"))  # checked against the export's policy
            start = window_half(seed)
            pairs = _dmd_pairs(p, arm, half, seed, f"{start}/export", teacher_export, switches)
            deps, steps, inherited = (start, teacher), half, start
        else:
            pairs = _dmd_pairs(p, arm, p.dmd_steps, seed, "ode/export", teacher_export, switches)
            deps, steps, inherited = ("ode", teacher), p.dmd_steps, "ode"
        return dmd_stage(
            name,
            arm.policy,
            pairs,
            group,
            deps=deps,
            steps=steps,
            init_steps_from=inherited,
            expect_step=steps,
            pending=pending,
        )

    # --- the state-learning ablation (one training seed, alpha 2) ------------------------------
    ablation_arm = next(a for a in ARMS if a.adastate and a.alpha == ABLATION_ALPHA)
    ablation_models, variants = [], []
    for vname in p.variants:
        if vname not in VARIANT_BY_NAME:
            raise ValueError(
                f"profile {p.name}: unknown ablation variant {vname!r}; known {list(VARIANT_BY_NAME)}"
            )
        st = adastate_stage(ablation_arm, VARIANT_BY_NAME[vname], p.ablation_seed, "ablation", False)
        variants.append(vname)
        ablation_models.append(TrainedModel(f"adastate_{vname}", p.ablation_seed, st.name, vname))
    abl_arms = {
        m.arm: {"policy": "adastate", "stream": eval_stream(ablation_arm, p)} for m in ablation_models
    }
    abl_spec = models_spec(abl_arms, [(m.arm, m.export, m.train_seed) for m in ablation_models], "ablation")
    add(
        Stage(
            "ablation/eval",
            "ablation",
            "ablation",
            "ablation/results.json",
            _eval_argv(
                p,
                "dmd",
                _common(p),
                "ablation/models.json",
                "ablation",
                ablation_horizons(p),
                p.ablation_eval_seeds,
                False,
            ),
            deps=tuple(m.stage for m in ablation_models),
            files=(("ablation/models.json", abl_spec),),
        )
    )
    add(
        Stage(
            "ablation/winner",
            "ablation",
            "ablation",
            "ablation/winner.json",
            action="pick_winner",
            deps=("ablation/eval",),
        )
    )

    # --- DMD: every main arm x training seed (equal DMD steps after the ODE init) ---------------
    fixed = p.adastate_variant  # a profile may fix the main arms' variant (they then do not wait)
    if fixed and fixed not in VARIANT_BY_NAME:
        raise ValueError(
            f"profile {p.name}: adastate_variant={fixed!r} is not a variant of {list(VARIANT_BY_NAME)}"
        )
    chosen = VARIANT_BY_NAME[fixed or winner or variants[0]]
    # until the winner is known, `chosen` is a placeholder: whatever reads the main adastate models
    # waits (a main arm's stage can be an ablation stage, done already, when its seed is the
    # ablation's: without this, the evaluation or the showcase could run on the placeholder)
    waiting = winner is None and not fixed
    if winner and winner not in variants:
        raise ValueError(f"ablation winner {winner!r} is not among this plan's variants {variants}")
    models = []
    for arm in ARMS:
        for seed in seeds:
            if arm.name == "window":
                start = window_half(seed)
                name = f"dmd/window_s{seed}"
                pairs = _dmd_pairs(p, arm, p.dmd_steps, seed, "ode/export", teacher_export, [])
                dmd_stage(
                    name,
                    "window",
                    pairs,
                    deps=(start,),
                    steps=p.dmd_steps - half,
                    init_steps_from=start,
                    resume_from=start,
                    expect_step=p.dmd_steps,
                )
                models.append(TrainedModel(arm.name, seed, name))
            elif arm.adastate:
                st = adastate_stage(arm, chosen, seed, "dmd", waiting)
                models.append(TrainedModel(arm.name, seed, st.name, chosen.name))
            else:
                name = f"dmd/{arm.name}_s{seed}"
                pairs = _dmd_pairs(p, arm, p.dmd_steps, seed, "ode/export", teacher_export, [])
                dmd_stage(
                    name,
                    arm.policy,
                    pairs,
                    deps=("ode", teacher),
                    steps=p.dmd_steps,
                    init_steps_from="ode",
                    expect_step=p.dmd_steps,
                )
                models.append(TrainedModel(arm.name, seed, name))

    # --- evaluation: every model, 8 prompts x sampling seeds, horizons 1..6x in one rollout ----
    eval_arms = {a.name: {"policy": a.policy, "stream": eval_stream(a, p)} for a in ARMS}
    spec = models_spec(eval_arms, [(m.arm, m.export, m.train_seed) for m in models], "eval")
    add(
        Stage(
            "eval",
            "eval",
            "eval",
            "eval/results.json",
            _eval_argv(p, "dmd", _common(p), "eval/models.json", "eval", p.horizons, p.eval_seeds, True),
            deps=tuple(dict.fromkeys(m.stage for m in models)),
            files=(("eval/models.json", spec),),
            pending=waiting,
        )
    )

    # --- showcase: the five policies on one prompt and seed at the longest horizon -------------
    from adastate_jax.data import panworld

    prompt = panworld.camera_prompts()[p.showcase_label]
    first = seeds[0]
    showcase = []
    for arm_name in SHOWCASE_ARMS:
        arm = ARM_BY_NAME[arm_name]
        model = next(m for m in models if m.arm == arm_name and m.train_seed == first)
        stream = eval_stream(arm, p)
        pairs = [(k, v) for k, v in _common(p) if k[len("stream.") :] not in stream]
        pairs += [(f"stream.{k}", v) for k, v in stream.items()]
        argv = (
            PYTHON,
            f"{REPO}/launch/rollout.py",
            f"--config={REPO}/{BASE_CONFIG}:dmd,{arm.policy}",
            *override_flags(pairs),
            f"--checkpoint={model.export}",
            f"--num_chunks={p.eval_chunks}",
            f"--prompt={prompt}",
            f"--seed={p.showcase_seed}",
            f"--out=showcase/{arm_name}.mp4",
            *(["--show_state"] if arm.adastate else []),
        )
        name = f"showcase/{arm_name}"
        add(
            Stage(
                name,
                "showcase",
                "showcase",
                f"showcase/{arm_name}.json",
                argv,
                deps=(model.stage,),
                pending=waiting and arm.adastate,
            )
        )
        showcase.append(name)

    add(
        Stage(
            "report",
            "report",
            "report",
            "report/README.md",
            action="report",
            deps=("teacher_check", "ablation/winner", "eval", *showcase),
            always=True,
        )
    )
    return Plan(
        p,
        seeds,
        winner,
        tuple(variants),
        tuple(stages.values()),
        tuple(models),
        tuple(ablation_models),
        tuple(dict.fromkeys(notes)),
    )
