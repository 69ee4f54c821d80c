"""The AdaState study (issue 10): one command from a teacher to the verdict.

  python launch/study.py --profile=cpu --out=runs/study_cpu            # run (or resume) everything
  python launch/study.py --profile=cpu --out=runs/study_cpu --dry_run  # the plan, states, estimate
  python launch/study.py --profile=cpu --out=runs/study_cpu --publish=assets/study

Package map (each module's docstring says what it owns):
  plan      arms, the state-learning ablation, the stages and their commands, DMD budgets
  profiles  toy / cpu / gpu: model size, budgets, seeds, evaluation sizes, measured step times
  runner    fingerprints, stage records, skip / resume / redo, subprocesses, actions
  decide    the pre-registered decision rule, the ablation's criterion, the teacher's bar
  report    RUN_DIR/report/ (tables, plots, videos, verdict) and publishing it
  measure   timing a profile's stages (`--measure`) and the plan's time estimate

This module owns the glue: which plan a run directory is at (the ablation's winner read from
`RUN_DIR/ablation/winner.json`), checking every stage's config before any work (`validate`), the
two in-process actions (`pick_winner`, `report`), the environment of the commands (a persistent
compilation cache in the run directory), and `main`. Must not know: objectives' internals, model
code, metric definitions.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Sequence

from adastate_jax import files
from adastate_jax.study import decide, measure, report, runner
from adastate_jax.study import plan as plan_lib

WINNER_FILE = "ablation/winner.json"


def read_winner(run_dir: str) -> str | None:
    path = os.path.join(run_dir, WINNER_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)["winner"]


def make_planner(profile: plan_lib.Profile, run_dir: str, train_seeds=None):
    """plan() -> the plan at the run directory's current state (winner known or not)."""

    def plan():
        return plan_lib.build(profile, train_seeds, read_winner(run_dir))

    return plan


# ------------------------------------------------------------------------------------------------
# Checking every stage's config before the work
# ------------------------------------------------------------------------------------------------


def _parse_flag_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not a bool")
        return text.lower() in ("true", "1")
    if isinstance(old, (int, float, tuple)) and not isinstance(old, bool):
        value = ast.literal_eval(text)
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        if isinstance(old, tuple):
            value = tuple(value)
        return value
    return text


def stage_config(argv: Sequence[str], repo: str = runner.REPO_ROOT):
    """The ConfigDict a stage's command runs with (its --config file and --config.x=y overrides),
    or None for a command without a config."""
    from adastate_jax.config import cli

    words = runner.resolve(argv, sys.executable, repo)
    spec = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
    if spec is None:
        return None
    cfg = cli.load_file(spec)
    with cfg.unlocked():
        for w in words:
            if not w.startswith("--config."):
                continue
            dotted, _, text = w[len("--config.") :].partition("=")
            *parents, last = dotted.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            if last not in node:
                raise ValueError(f"--config.{dotted}: config.{dotted} does not exist")
            node[last] = _parse_flag_value(text, node[last])
    return cfg


def validate(plan: plan_lib.Plan, repo: str = runner.REPO_ROOT) -> int:
    """Parse every stage's config (schema.parse): a bad override fails here, naming the stage,
    before hours of work. -> the number of configs checked"""
    from adastate_jax import config as config_lib

    n = 0
    for s in plan.stages:
        if not s.argv:
            continue
        try:
            cfg = stage_config(s.argv, repo)
            if cfg is not None:
                config_lib.parse(cfg)
                n += 1
        except (ValueError, KeyError, TypeError, SyntaxError) as e:
            raise ValueError(f"stage {s.name}: {e}") from None
    return n


# ------------------------------------------------------------------------------------------------
# Actions
# ------------------------------------------------------------------------------------------------


def pick_winner(run_dir: str, plan: plan_lib.Plan) -> None:
    """The ablation's winner by `plan.CRITERION` from ablation/results.json -> ablation/winner.json."""
    with open(os.path.join(run_dir, "ablation", "results.json")) as fh:
        results = json.load(fh)
    rows = report._rows(results)
    horizons = plan_lib.ablation_horizons(plan.profile)
    got = decide.pick_winner(
        rows, plan.variants, lambda v: f"adastate_{v}", horizons, plan_lib.CRITERION_MIN_CODE_CONF
    )
    got["criterion"] = plan_lib.CRITERION
    files.write_json_atomic(os.path.join(run_dir, WINNER_FILE), report._json_safe(got))
    print(f"[study] ablation winner: {got['winner']}")


def use_shipped_teacher(run_dir: str, plan: plan_lib.Plan) -> None:
    """`Profile.teacher_from`: check the shipped teacher (every file's sha256, its architecture
    against the profile's `model` overrides) and copy it to RUN_DIR/teacher/export atomically."""
    import shutil

    from adastate_jax import shipped

    p = plan.profile
    with open(os.path.join(run_dir, "teacher", "source.json")) as fh:
        source = json.load(fh)
    manifest = shipped.read_manifest(source["name"])
    if manifest["params_sha256"] != source["params_sha256"]:
        raise ValueError(
            f"shipped {source['name']}: params {manifest['params_sha256'][:12]}... are not the ones this "
            f"stage was planned with ({source['params_sha256'][:12]}...); re-run the study command"
        )
    shipped.verify_files(source["name"], manifest=manifest)
    model = manifest["config"]["model"]
    wrong = [
        f"{k}: profile {v!r}, shipped {model.get(k[len('model.') :])!r}"
        for k, v in p.model
        if k.startswith("model.") and model.get(k[len("model.") :]) != v
    ]
    if wrong:
        raise ValueError(
            f"profile {p.name}: teacher_from={source['name']!r} has another architecture: {wrong}"
        )
    dest = os.path.join(run_dir, "teacher", "export")
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shipped.model_dir(source["name"]), tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"[study] teacher: the shipped {source['name']} ({manifest['params_sha256'][:12]}...) -> {dest}")


def make_report_action(command: str):
    def write_report(run_dir: str, plan: plan_lib.Plan) -> None:
        report.write(run_dir, plan, command)
        print(f"[study] wrote {os.path.join(run_dir, report.REPORT, 'README.md')}")

    return write_report


def actions(command: str = "") -> dict:
    """The in-process stages (`Stage.action`) by name, for the runner and `measure`."""
    return {
        "pick_winner": pick_winner,
        "use_shipped_teacher": use_shipped_teacher,
        "report": make_report_action(command),
    }


def environment(profile: plan_lib.Profile, run_dir: str, base: dict | None = None) -> dict:
    """The commands' environment: `base` (default os.environ), the profile's variables, and a
    persistent compilation cache in the run directory (the seeds of an arm compile once)."""
    env = dict(os.environ if base is None else base)
    env.update(dict(profile.env))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(run_dir), "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def parse_groups(text: str) -> list[str] | None:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        return None
    bad = [g for g in groups if g not in plan_lib.STAGE_GROUPS]
    if bad:
        raise ValueError(
            f"--stages={text}: unknown stage group(s) {bad}; groups: {list(plan_lib.STAGE_GROUPS)}"
        )
    return groups


def main(
    profile_name: str,
    run_dir: str,
    *,
    stages: str = "",
    dry_run: bool = False,
    train_seeds: Sequence[int] | None = None,
    publish: str = "",
    max_parallel: int = 0,
    command: str = "",
    env: dict | None = None,
    log=print,
) -> dict:
    """Run (or describe, `dry_run`) the study of `profile_name` in `run_dir`. -> runner summary"""
    profile = plan_lib.profile(profile_name)
    groups = parse_groups(stages)
    planner = make_planner(profile, run_dir, train_seeds)
    plan = planner()
    checked = validate(plan)
    run = runner.Runner(
        run_dir,
        planner,
        actions(command),
        groups=groups,
        env=environment(profile, run_dir, env),
        max_parallel=max_parallel or profile.max_parallel,
        log=log,
    )
    for note in plan.notes:
        log(f"[study] note: {note}")
    if dry_run:
        rows = run.describe(plan)
        est = measure.estimate_seconds(plan)
        for r in rows:
            steps = f", {r['steps']} DMD steps ({r['budget']} with its init's)" if r["steps"] else ""
            minutes = est["per_stage"][r["stage"]] / 60
            log(f"{r['state']:>8}  {r['stage']}  ~{minutes:.1f} min{steps}\n          {r['command']}")
        left = sum(est["per_stage"][r["stage"]] for r in rows if r["state"] != "done")
        par = f", {est['max_parallel']} stages at once" if est["max_parallel"] > 1 else ""
        log(
            f"[study] {checked} stage configs parse. Estimated {est['total'] / 3600:.2f} h for the whole "
            f"profile {profile.name} ({est['work'] / 3600:.2f} h of stage time{par}; {left / 3600:.2f} h "
            "of stage time left): " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in est["per_group"].items())
        )
        return dict(ran=[], left={r["stage"]: r["state"] for r in rows}, estimate=est)
    os.makedirs(run_dir, exist_ok=True)
    files.write_json_atomic(
        os.path.join(run_dir, "plan.json"),
        dict(
            profile=profile.name,
            command=command,
            train_seeds=list(plan.train_seeds),
            stages=run.describe(plan),
            notes=list(plan.notes),
        ),
    )
    summary = run.run()
    if publish:
        if "report" in summary["left"]:
            raise ValueError(
                f"--publish={publish}: the report stage has not run ({summary['left']['report']})"
            )
        dest = publish if os.path.isabs(publish) else os.path.join(runner.REPO_ROOT, publish)
        copied = report.publish(run_dir, dest)
        log(f"[study] published {len(copied)} files to {publish}")
    return summary
