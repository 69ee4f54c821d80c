"""A profile's step times: measured (`launch/study.py --measure`) and turned into a plan's time
estimate (`estimate_seconds`, `launch/study.py --dry_run`).

`measure` runs, in `OUT/measure/`, the plan's own commands with few steps: the teacher and its
fine-tune, the stored trajectories (`traj`: two generator batches, no scoring; the ODE init's
probe then trains on them), the ODE init, DMD of window and adastate (with `every_arm`: also full,
sink, LongLive's layout and the dmd / regress state losses; ema_sink is taken as sink's), window
once more with another seed (a compile from the persistent cache), and the evaluation of one model
at 1x and 2x the horizon (the difference is the per-chunk time). Step times come from each run's
`metrics.jsonl` (median steps/s of the log windows after the first; the first window starts after
compilation), compile times from its `compiled the train step in X s` line, process overhead from
the wall time left over; the trajectories' per-clip time from the generator's log (the batches
after the first: its `done` line's seconds less the first, compiling batch's). It prints
`step_seconds` for `study/profiles.py`.

Must not know: what the stages compute; it reuses `study.plan`'s commands, only shortened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping

from adastate_jax import files
from adastate_jax.study import plan as plan_lib
from adastate_jax.study import runner
from adastate_jax.study.plan import ARMS, Plan, Stage

# (stage of the plan, key of step_seconds it measures); with `every_arm` False only the first
# group: the other arms' steps are then taken as window's (full, sink, ema_sink, longlive) or as
# adastate's (the dmd and regress state losses) by `estimate_seconds`
TRAIN_PROBES = (
    ("teacher", "teacher"),
    ("teacher_tf", "teacher_tf"),
    ("traj", "traj_clip"),  # not a training run: `_traj_probe`
    ("ode", "ode"),
    ("dmd/window_half_s{s}", "dmd_window"),
    ("dmd/adastate_a2_bptt_window_s{s}", "dmd_adastate"),
)
MORE_PROBES = (
    ("dmd/adastate_a2_dmd_window_s{s}", "dmd_adastate_dmd"),
    ("dmd/full_s{s}", "dmd_full"),
    ("dmd/sink_s{s}", "dmd_sink"),
    ("dmd/longlive_s{s}", "dmd_longlive"),
    ("dmd/adastate_a2_regress_window_s{s}", "dmd_adastate_regress"),
)
_SET = (
    "--config.train.steps=",
    "--config.train.log_every=",
    "--config.train.ckpt_every=",
    "--config.train.seed=",
)


def _shorten(argv, steps: int, seed: int | None = None) -> list[str]:
    words = [w for w in argv if not w.startswith(_SET)]
    words += [
        f"--config.train.steps={steps}",
        f"--config.train.log_every={max(1, steps // 4)}",
        f"--config.train.ckpt_every={steps}",
    ]
    if seed is not None:
        words.append(f"--config.train.seed={seed}")
    return words


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(argv, cwd: str, env: dict, log: str) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of the command, all its threads)"""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with open(log, "w") as fh:
        rc = subprocess.run(
            runner.resolve(argv), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    if rc:
        raise RuntimeError(f"measure: {' '.join(argv[:3])} failed (exit {rc}); log {log}")
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _train_numbers(workdir: str, log: str, wall: float, steps: int, cpu: float | None = None) -> dict:
    """Step, compile and process seconds of a probe. With `cpu` (the probe's CPU seconds) every
    phase is scaled by cpu / wall: the CPU seconds it took, which is what it costs on a machine
    where it has one core to itself, whatever else ran beside it (`cpu_scale` records the factor)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    sps = [r["steps_per_s"] for r in rows[1:]] or [r["steps_per_s"] for r in rows]
    step = 1.0 / statistics.median(sps)
    with open(log) as fh:
        found = re.findall(r"compiled the train step in ([0-9.]+)s", fh.read())
    compile_s = float(found[-1]) if found else float("nan")
    return _scaled(step, compile_s, steps, wall, cpu)


def _scaled(step: float, compile_s: float, units: int, wall: float, cpu: float | None) -> dict:
    """Wall seconds per unit (step or clip) and of the compile, scaled to CPU seconds when `cpu`
    is given; the process start-up is the rest of `wall`."""
    scale = 1.0 if cpu is None else cpu / wall
    step, compile_s = step * scale, compile_s * scale
    return dict(
        step=step,
        compile=compile_s,
        process=max(0.0, wall * scale - compile_s - step * units),
        wall=wall,
        cpu_scale=scale,
    )


def _traj_numbers(log: str, wall: float, clips: int, batch: int, cpu: float | None = None) -> dict:
    """Per-clip (`step`), compile and process seconds of a trajectory probe from the generator's
    log: `first batch (with compilation) in X s` and `done: N clips in Y s` (every batch after the
    first: (Y - X) / (N - batch) per clip; the first less one batch: the compile). `cpu` as in
    `_train_numbers`."""
    with open(log) as fh:
        text = fh.read()
    first = re.findall(r"first batch \(with compilation\) in ([0-9.]+)s", text)
    done = re.findall(r"done: ([0-9]+) clips in ([0-9.]+)s", text)
    if not first or not done or int(done[-1][0]) <= batch:
        raise RuntimeError(f"measure: {log} does not time a batch after the first (want {clips} clips)")
    n, seconds = int(done[-1][0]), float(done[-1][1])
    per_clip = (seconds - float(first[-1])) / (n - batch)
    compile_s = max(0.0, float(first[-1]) - batch * per_clip)
    return _scaled(per_clip, compile_s, n, wall, cpu)


def _traj_probe(stage: Stage, root: str, env: dict, cpu_time: bool, batches: int = 2) -> dict:
    """Run the `traj` stage's generator in `root` for `batches` batches (scoring off), into the
    stage's own directory (replaced): the ODE probe after it trains on those clips. -> `_traj_numbers`"""
    batch = plan_lib.TRAJ_BATCH
    clips = batches * batch
    argv = [w for w in stage.argv if not w.startswith(("--num_clips=", "--score_clips="))]
    argv += [f"--num_clips={clips}", "--score_clips=0"]
    out = os.path.join(root, stage.workdir)
    if os.path.exists(out):
        shutil.rmtree(out)
    log_file = os.path.join(root, "logs", stage.name.replace("/", "__") + ".log")
    wall, cpu = _run(argv, root, env, log_file)
    return _traj_numbers(log_file, wall, clips, batch, cpu if cpu_time else None)


def _prepare_action(plan: Plan, stage: Stage, root: str) -> None:
    """Run an in-process stage the probes after it need (`use_shipped_teacher`) in `root`, as the
    runner would (its input files first)."""
    from adastate_jax import study

    runner.prepare(root, stage, "new", log=lambda *_: None)
    study.actions()[stage.action](root, plan)


def measure(
    profile: plan_lib.Profile,
    out: str,
    env: dict,
    steps: int = 6,
    every_arm: bool = False,
    cpu_time: bool = True,
    log=print,
) -> dict:
    """Run the probes in OUT/measure/ -> dict(step_seconds, runs). `cpu_time`: report CPU seconds
    (each phase scaled by the probe's CPU / wall time: robust to other jobs on a shared CPU machine,
    and what a probe costs with one core; with two idle cores it runs faster). False: wall seconds
    (an accelerator, where the host CPU is not the work)."""
    root = os.path.abspath(os.path.join(out, "measure"))
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    seed = profile.train_seeds[0]
    plan = plan_lib.build(profile, winner=profile.variants[0])
    runs, numbers = {}, {}

    def train(stage_name: str, key: str, seed_override=None, tag=""):
        stage = plan.stage(stage_name.format(s=seed))
        name = (stage.name + tag).replace("/", "__")
        argv = _shorten(stage.argv, steps, seed_override)
        argv = [f"--workdir={stage.workdir}{tag}" if w.startswith("--workdir=") else w for w in argv]
        wd = os.path.join(root, stage.workdir + tag)
        if os.path.exists(wd):
            import shutil

            shutil.rmtree(wd)
        log_file = os.path.join(root, "logs", name + ".log")
        wall, cpu = _run(argv, root, env, log_file)
        got = _train_numbers(wd, log_file, wall, steps, cpu if cpu_time else None)
        runs[name] = dict(key=key, **got)
        log(
            f"[measure] {stage.name}{tag}: {got['step']:.3f} s/step, compile {got['compile']:.1f} s, "
            f"process {got['process']:.1f} s ({'CPU' if cpu_time else 'wall'} seconds; wall {wall:.0f} s)"
        )
        return got

    def traj(key: str):
        stage = plan.stage("traj")
        got = _traj_probe(stage, root, env, cpu_time)
        runs[stage.name] = dict(key=key, **got)
        unit = "CPU" if cpu_time else "wall"
        log(
            f"[measure] {stage.name}: {got['step']:.3f} s/clip, compile {got['compile']:.1f} s, "
            f"process {got['process']:.1f} s ({unit} seconds; wall {got['wall']:.0f} s)"
        )
        return got

    for stage_name, key in TRAIN_PROBES + (MORE_PROBES if every_arm else ()):
        if stage_name not in plan.names and stage_name.format(s=seed) not in plan.names:
            continue  # e.g. no teacher_tf, or no traj stage (ODE on the fly)
        if plan.stage(stage_name.format(s=seed)).action:  # a shipped teacher: copied, not trained
            _prepare_action(plan, plan.stage(stage_name.format(s=seed)), root)
            numbers[key] = 0.0
            continue
        got = traj(key) if key == "traj_clip" else train(stage_name, key)
        numbers[key] = round(got["step"], 3)
    again = train(TRAIN_PROBES[3][0], "dmd_window", seed_override=seed + 1, tag="_again")
    compiles = [
        r["compile"]
        for k, r in runs.items()
        if not k.endswith("_again") and not r["key"].startswith(("dmd", "traj"))
    ]
    dmd_compiles = [
        r["compile"] for k, r in runs.items() if not k.endswith("_again") and r["key"].startswith("dmd")
    ]
    numbers["compile"] = round(statistics.median(compiles), 1)
    numbers["compile_dmd"] = round(statistics.median(dmd_compiles), 1)
    numbers["compile_cached"] = round(again["compile"], 1)
    if "traj" in runs:
        numbers["compile_traj"] = round(runs["traj"]["compile"], 1)
    numbers["process"] = round(statistics.median(r["process"] for r in runs.values()), 1)
    numbers["dmd"] = numbers["dmd_window"]
    if "dmd_sink" in numbers:
        numbers["dmd_ema_sink"] = numbers["dmd_sink"]  # the same program but for the merge of one frame

    # evaluation: one model, one sampling seed, every prompt, 1x and 2x the horizon
    stage = plan.stage("eval")
    spec = plan_lib.models_spec(
        {
            "window": {
                "policy": "window",
                "stream": plan_lib.eval_stream(plan_lib.ARM_BY_NAME["window"], profile),
            }
        },
        [("window", plan.stage(f"dmd/window_half_s{seed}").workdir + "/export", seed)],
        "eval",
    )
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    files.write_text_atomic(os.path.join(root, "eval", "models.json"), spec)
    walls = []
    for h in (1, 2):
        argv = [w for w in stage.argv if not w.startswith(("--horizons=", "--seeds=", "--out_dir="))]
        argv += [f"--horizons={h}", "--seeds=0", f"--out_dir=eval/h{h}"]
        wall, cpu = _run(argv, root, env, os.path.join(root, "logs", f"eval_h{h}.log"))
        walls.append(cpu if cpu_time else wall)
        log(
            f"[measure] eval at {h}x ({h * profile.horizon_chunks} chunks): {walls[-1]:.0f} s "
            f"({wall:.0f} s wall)"
        )
    numbers["eval_chunk"] = round(max(walls[1] - walls[0], 0.0) / profile.horizon_chunks, 3)
    numbers["rollout_chunk"] = numbers["eval_chunk"]
    result = dict(
        profile=profile.name,
        steps=steps,
        cpu_time=cpu_time,
        step_seconds=numbers,
        runs=runs,
        eval_seconds=walls,
    )
    files.write_json_atomic(os.path.join(root, "step_seconds.json"), result)
    log("[measure] step_seconds=_pairs(" + json.dumps(numbers) + ")")
    return result


# ------------------------------------------------------------------------------------------------
# The time estimate from the profile's measured step times
# ------------------------------------------------------------------------------------------------

_PER_RUN_WORDS = ("--workdir=", "--config.train.seed=", "--config.train.steps=", "--config.train.init_from=")


def _program_key(stage: Stage) -> tuple:
    """What a training stage compiles: its command without the words that do not change the
    program (workdir, seed, step count, init); stages with one key share a cached compilation."""
    return tuple(w for w in stage.argv if not w.startswith(_PER_RUN_WORDS))


def step_key(stage: Stage) -> str:
    """The `step_seconds` key of a training stage's step: teacher / teacher_tf / ode, or
    dmd_<arm> (dmd_adastate_<state loss> for an adastate run with a direct state loss)."""
    if stage.group == "teacher" or stage.name == "ode":
        return stage.name
    arm = next(
        (a for a in sorted(ARMS, key=lambda a: -len(a.name)) if stage.workdir.startswith(f"dmd/{a.name}_")),
        None,
    )
    if arm is None:
        return "dmd_window"  # dmd/window_half_s*
    if arm.adastate:
        loss = next(
            (w.split("=", 1)[1] for w in stage.argv if w.startswith("--config.train.state_loss=")), "none"
        )
        return "dmd_adastate" if loss == "none" else f"dmd_adastate_{loss}"
    return f"dmd_{arm.name}"


def estimate_seconds(plan: Plan) -> dict:
    """Seconds of every stage from `Profile.step_seconds` (see `study.profiles.Profile`): per
    training stage process + compile (or compile_cached for a program compiled before in the run)
    + steps x its step time (`step_key`, falling back to `dmd`/`teacher`); the stored trajectories
    process + compile_traj (or compile) + clips x traj_clip; per evaluation models x
    sampling seeds x chunks x eval_chunk (+ a cached compile per arm); per showcase rollout its
    chunks x rollout_chunk. -> dict(per_stage, per_group, total)"""
    p = plan.profile
    sec = dict(p.step_seconds)
    seen: set[tuple] = set()
    per_stage = {}
    for s in plan.stages:
        t = sec["process"] if s.argv else 0.0
        if s.expect_step:
            key = _program_key(s)
            fresh = (
                sec.get("compile_dmd", sec["compile"]) if s.group in ("dmd", "ablation") else sec["compile"]
            )
            t += sec["compile_cached"] if key in seen else fresh
            seen.add(key)
            k = step_key(s)
            per_step = sec.get(
                k,
                sec.get(
                    k.rsplit("_", 1)[0] if k.startswith("dmd_adastate_") else k,
                    sec["teacher"] if s.group == "teacher" else sec["dmd"],
                ),
            )
            t += per_step * (s.expect_step - (plan.budget(s.init_steps_from) if s.resume_from else 0))
        elif s.group == "traj":
            t += sec.get("compile_traj", sec["compile"]) + p.traj_clips * sec["traj_clip"]
        elif s.group in ("eval", "teacher_check", "ablation") and s.argv:
            spec = json.loads(dict(s.files)[f"{s.workdir}/models.json"])
            seeds = next(w for w in s.argv if w.startswith("--seeds=")).split("=")[1].split(",")
            horizons = next(w for w in s.argv if w.startswith("--horizons=")).split("=")[1].split(",")
            chunks = max(map(int, horizons)) * p.horizon_chunks
            # the teacher check samples with more denoising steps than the students' 4
            factor = p.teacher_check_sampler_steps / 4 if s.group == "teacher_check" else 1.0
            t += len(spec["checkpoints"]) * len(seeds) * chunks * sec["eval_chunk"] * factor
            t += len(spec["arms"]) * sec["compile_cached"]
        elif s.group == "showcase":
            t += p.eval_chunks * sec["rollout_chunk"] + sec["compile_cached"]
        per_stage[s.name] = t
    per_group = {}
    for s in plan.stages:
        per_group[s.group] = per_group.get(s.group, 0.0) + per_stage[s.name]
    work = sum(per_stage.values())
    total = makespan(plan, per_stage, p.max_parallel, p.cores, p.alone_speedup)
    return dict(per_stage=per_stage, per_group=per_group, work=work, total=total, max_parallel=p.max_parallel)


def makespan(
    plan: Plan, seconds: Mapping[str, float], workers: int, cores: int = 0, alone: float = 1.0
) -> float:
    """Wall time of the plan when its stages run as `study.runner.Runner` runs them: whenever fewer
    than `workers` run, the first stages in plan order whose dependencies are done start (pending
    stages included, as they will run once the ablation decides).

    cores=0: every stage takes its `seconds` whatever runs beside it (one accelerator that small
    models do not fill). cores>0: `seconds` are CPU seconds and the running stages share `cores`,
    each progressing at min(alone, cores / running) CPU seconds per second (`alone`: how many cores
    one stage uses when it runs by itself)."""
    left = {s.name: float(seconds[s.name]) for s in plan.stages}
    deps = {s.name: tuple(s.deps) for s in plan.stages}
    queue = [s.name for s in plan.stages]  # plan order is a topological order
    running: list[str] = []
    finished: set[str] = set()
    t = 0.0
    while queue or running:
        for name in [n for n in queue if all(d in finished for d in deps[n])]:
            if len(running) >= max(1, workers):
                break
            running.append(name)
            queue.remove(name)
        if not running:
            raise ValueError(f"stage {queue[0]} waits for a dependency that never runs: {deps[queue[0]]}")
        rate = min(alone, cores / len(running)) if cores else 1.0
        dt = min(left[n] for n in running) / rate
        t += dt
        for n in list(running):
            left[n] -= dt * rate
            if left[n] <= 1e-9:
                running.remove(n)
                finished.add(n)
    return t
