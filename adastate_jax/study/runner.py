"""Running a study plan stage by stage: skip what is finished, resume what was killed, redo what
changed.

Owns:
- a stage's fingerprint (`fingerprints`): its command template, the files it writes first, its
  action, and the fingerprints of its dependencies (a changed teacher changes everything after it);
- stage records (`RUN_DIR/stages/<name>.json`: fingerprint, portable command, status, start/end
  times, seconds, exit code, log path) and the rule `stage_state`:
    done    the record has this fingerprint, status done, and the done-marker is there (for a
            training stage, `export/info.json` at the expected step);
    resume  the record has this fingerprint but the stage did not finish (killed, failed): its
            command runs again (launch/train.py resumes from the workdir's checkpoints);
    stale   the record has another fingerprint: the config changed, the stage runs from scratch
            (a training stage's workdir, or one that `Stage.owns_workdir`, is moved aside to
            `<workdir>.replaced`);
    new     no record (such a workdir left without one is moved aside as well);
- preparing a stage (`prepare`): moving a stale workdir aside, seeding a continuation's
  checkpoints from the run it continues (`Stage.resume_from`), writing its input files;
- running (`Runner.run`): subprocesses in the run directory with logs in `RUN_DIR/logs/`, up to
  `max_parallel` at once, a stage only after its dependencies are done, in-process actions
  through a registry, the plan rebuilt after every stage (the ablation's winner decides later
  stages), SIGTERM / Ctrl-C forwarded to the running stages (training saves a checkpoint) before
  the runner stops.

Must not know: what a stage computes (`study.plan`), how results are judged (`study.decide`,
`study.report`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from adastate_jax import files
from adastate_jax.study.plan import PYTHON, REPO, Plan, Stage

STATES = ("done", "resume", "stale", "new")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StageFailed(RuntimeError):
    """A stage's command failed or did not leave its done-marker (names the stage and its log)."""


# ------------------------------------------------------------------------------------------------
# Fingerprints and records
# ------------------------------------------------------------------------------------------------


def fingerprints(plan: Plan) -> dict[str, str]:
    """{stage: sha256 of (command template, input files, action, expected step, continuation,
    dependencies' fingerprints)}; raises naming a dependency that is not in the plan or a cycle."""
    stages = {s.name: s for s in plan.stages}
    out: dict[str, str] = {}

    def fp(name: str, path: tuple[str, ...]) -> str:
        if name in out:
            return out[name]
        if name not in stages:
            raise ValueError(f"stage {path[-1]} depends on {name!r}, which is not in the plan")
        if name in path:
            raise ValueError(f"stage dependencies form a cycle: {' -> '.join(path + (name,))}")
        s = stages[name]
        body = dict(
            argv=list(s.argv),
            files=[list(f) for f in s.files],
            action=s.action,
            expect_step=s.expect_step,
            resume_from=s.resume_from,
            deps={d: fp(d, path + (name,)) for d in s.deps},
        )
        out[name] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return out[name]

    for s in plan.stages:
        fp(s.name, ())
    return out


def record_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "stages", name.replace("/", "__") + ".json")


def log_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "logs", name.replace("/", "__") + ".log")


def read_record(run_dir: str, name: str) -> dict | None:
    path = record_path(run_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def write_record(run_dir: str, name: str, record: Mapping) -> None:
    os.makedirs(os.path.join(run_dir, "stages"), exist_ok=True)
    files.write_json_atomic(record_path(run_dir, name), dict(record))


def command_text(stage: Stage) -> str:
    """The stage's command as recorded and shown: `python launch/train.py ...` (repository paths
    relative to the repository, run in the run directory)."""
    words = [w.replace(PYTHON, "python").replace(REPO + "/", "") for w in stage.argv]
    return " ".join(_quote(w) for w in words) if words else f"(action: {stage.action})"


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def finished(run_dir: str, stage: Stage) -> bool:
    """The stage's done-marker is there (a training stage: its export at the expected step)."""
    path = os.path.join(run_dir, stage.done)
    if not os.path.exists(path):
        return False
    if stage.expect_step:
        with open(path) as fh:
            return int(json.load(fh).get("step", -1)) == stage.expect_step
    return True


def owns_workdir(stage: Stage) -> bool:
    """Training stages own their workdir (checkpoints a changed config must not resume from), and
    stages that say so (`Stage.owns_workdir`: the stored trajectories of another teacher)."""
    return bool(stage.expect_step) or stage.owns_workdir


def stage_state(run_dir: str, stage: Stage, fingerprint: str) -> str:
    rec = read_record(run_dir, stage.name)
    if rec is None:
        return "new"
    if rec.get("fingerprint") != fingerprint:
        return "stale"
    if rec.get("status") == "done" and finished(run_dir, stage):
        return "done"
    return "resume"


def prepare(run_dir: str, stage: Stage, state: str, log: Callable[[str], None] = print) -> None:
    """Make the workdir ready for the stage's command (see the module docstring)."""
    workdir = os.path.join(run_dir, stage.workdir)
    if state in ("stale", "new") and owns_workdir(stage) and os.path.exists(workdir):
        aside = workdir.rstrip("/") + ".replaced"
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.rename(workdir, aside)
        why = "its config changed" if state == "stale" else "no record says which config made it"
        log(f"[study] {stage.name}: {why}; moved {stage.workdir} aside to {os.path.relpath(aside, run_dir)}")
    if stage.resume_from:
        target = os.path.join(workdir, "checkpoints")
        if not os.path.exists(target):
            source = os.path.join(run_dir, stage.resume_from, "checkpoints")
            if not os.path.isdir(source):
                raise StageFailed(f"{stage.name}: continues {stage.resume_from}, which has no checkpoints/")
            os.makedirs(workdir, exist_ok=True)
            shutil.copytree(source, target + ".partial", dirs_exist_ok=True)
            os.rename(target + ".partial", target)
            log(f"[study] {stage.name}: continues {stage.resume_from} (copied its checkpoints)")
    for rel, text in stage.files:
        path = os.path.join(run_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_text_atomic(path, text)


def resolve(argv: Sequence[str], python: str = sys.executable, repo: str = REPO_ROOT) -> list[str]:
    return [w.replace(PYTHON, python).replace(REPO, repo) for w in argv]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Running:
    stage: Stage
    fingerprint: str
    proc: subprocess.Popen
    log_fh: object
    t0: float
    record: dict


class Runner:
    """Runs the stages of `make_plan()` (called again after every stage) in `run_dir`.

    groups: the stage groups to run (None: all); actions: {action name: fn(run_dir, plan)};
    env: the environment of the commands; python / repo: what `{python}` / `{repo}` stand for."""

    def __init__(
        self,
        run_dir: str,
        make_plan: Callable[[], Plan],
        actions: Mapping[str, Callable[[str, Plan], None]],
        *,
        groups: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_parallel: int = 1,
        python: str = sys.executable,
        repo: str = REPO_ROOT,
        log: Callable[[str], None] = print,
        poll_s: float = 1.0,
    ):
        self.run_dir = os.path.abspath(run_dir)
        self.make_plan = make_plan
        self.actions = dict(actions)
        self.groups = None if groups is None else tuple(groups)
        self.env = dict(os.environ if env is None else env)
        self.max_parallel = max(1, int(max_parallel))
        self.python, self.repo = python, repo
        self.log = log
        self.poll_s = poll_s
        self.ran: list[str] = []  # stages run by this call, in order
        self._stop_signal: str | None = None

    # --- inspection -------------------------------------------------------------------------
    def states(self, plan: Plan) -> dict[str, str]:
        fps = fingerprints(plan)
        return {s.name: stage_state(self.run_dir, s, fps[s.name]) for s in plan.stages}

    def selected(self, stage: Stage) -> bool:
        return self.groups is None or stage.group in self.groups

    def describe(self, plan: Plan) -> list[dict]:
        """One row per stage: name, group, state (or 'pending'), DMD steps (own / with inherited),
        command."""
        states = self.states(plan)
        return [
            dict(
                stage=s.name,
                group=s.group,
                state="pending" if s.pending else ("always" if s.always else states[s.name]),
                steps=s.steps,
                budget=plan.budget(s.name) if s.steps else 0,
                command=command_text(s),
            )
            for s in plan.stages
        ]

    # --- running ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every selected stage whose dependencies are done. -> {ran, left: {stage: why}}"""
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        running: dict[str, _Running] = {}
        done_now: set[str] = set()
        failure: StageFailed | None = None
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, frame):
            self._stop_signal = signal.Signals(signum).name
            for r in running.values():
                with _suppress():
                    os.killpg(r.proc.pid, signal.SIGTERM)

        for s in old:
            signal.signal(s, on_signal)
        try:
            while True:
                plan = self.make_plan()
                fps = fingerprints(plan)
                states = {s.name: stage_state(self.run_dir, s, fps[s.name]) for s in plan.stages}

                def is_done(name: str, plan=plan, states=states) -> bool:
                    return name in done_now if plan.stage(name).always else states[name] == "done"

                ready = [
                    s
                    for s in plan.stages
                    if self.selected(s)
                    and not s.pending
                    and not is_done(s.name)
                    and s.name not in running
                    and all(is_done(d) for d in s.deps)
                ]
                if failure is None and self._stop_signal is None:
                    # an action reads only its finished dependencies and takes seconds: it runs
                    # first, beside the running processes (behind them it would wait for every
                    # stage the scheduler keeps starting; the ablation's winner gates the adastate arms)
                    action = next((s for s in ready if s.action), None)
                    if action is not None:
                        try:
                            self._run_action(action, fps[action.name], states[action.name], plan)
                        except StageFailed as e:
                            failure = e  # the running stages finish (and are recorded) first
                        else:
                            done_now.add(action.name)
                            continue  # rebuild the plan: an action may decide later stages
                    else:  # no action is ready: start processes
                        for s in ready[: max(0, self.max_parallel - len(running))]:
                            running[s.name] = self._start(s, fps[s.name], states[s.name])
                if not running:
                    if failure is not None:
                        raise failure
                    if self._stop_signal is not None:
                        raise KeyboardInterrupt(
                            f"study stopped by {self._stop_signal}; re-run the same command to resume"
                        )
                    return self._summary(plan, states, done_now)
                for name in self._wait(running):
                    r = running.pop(name)
                    try:
                        if self._finish(r):
                            done_now.add(name)
                    except StageFailed as e:
                        failure = failure or e
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _begin(self, stage: Stage, fingerprint: str, **extra) -> dict:
        """The stage's record as it starts (status 'running'), written to RUN_DIR/stages/."""
        record = dict(
            name=stage.name,
            group=stage.group,
            fingerprint=fingerprint,
            command=command_text(stage),
            started=_now(),
            status="running",
            **extra,
        )
        write_record(self.run_dir, stage.name, record)
        return record

    def _run_action(self, stage: Stage, fingerprint: str, state: str, plan: Plan) -> None:
        if stage.action not in self.actions:
            raise StageFailed(f"{stage.name}: no action {stage.action!r} (known: {sorted(self.actions)})")
        self.log(f"[study] {stage.name}: {state} -> running action {stage.action}")
        prepare(self.run_dir, stage, state, self.log)
        t0 = time.perf_counter()
        record = self._begin(stage, fingerprint)
        try:
            self.actions[stage.action](self.run_dir, plan)
            if not finished(self.run_dir, stage):
                raise StageFailed(f"{stage.name}: action {stage.action} did not write {stage.done}")
        except Exception as e:
            record.update(status="failed", finished=_now(), error=f"{type(e).__name__}: {e}")
            write_record(self.run_dir, stage.name, record)
            if isinstance(e, StageFailed):
                raise
            raise StageFailed(f"{stage.name}: action {stage.action} failed: {type(e).__name__}: {e}") from e
        record.update(
            status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 1), returncode=0
        )
        write_record(self.run_dir, stage.name, record)
        self.ran.append(stage.name)

    def _start(self, stage: Stage, fingerprint: str, state: str) -> _Running:
        prepare(self.run_dir, stage, state, self.log)
        log_file = log_path(self.run_dir, stage.name)
        previous = read_record(self.run_dir, stage.name) if state == "resume" else None
        record = self._begin(
            stage,
            fingerprint,
            log=os.path.relpath(log_file, self.run_dir),
            attempts=(previous or {}).get("attempts", 0) + 1,
            seconds_before=round((previous or {}).get("seconds_total", 0.0), 1),
        )
        self.log(f"[study] {stage.name}: {state} -> {record['command'][:200]}")
        fh = open(log_file, "a")
        fh.write(f"\n===== {record['started']} {state}: {record['command']}\n")
        fh.flush()
        proc = subprocess.Popen(
            resolve(stage.argv, self.python, self.repo),
            cwd=self.run_dir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: a stop signal reaches its children
        )
        return _Running(stage, fingerprint, proc, fh, time.perf_counter(), record)

    def _wait(self, running: Mapping[str, _Running]) -> list[str]:
        while True:
            done = [n for n, r in running.items() if r.proc.poll() is not None]
            if done:
                return done
            time.sleep(self.poll_s)

    def _finish(self, r: _Running) -> bool:
        """Record how a stage's process ended. -> True when it finished; raises StageFailed when it
        failed (not when a stop signal ended it: the next run resumes it)."""
        r.log_fh.close()
        seconds = time.perf_counter() - r.t0
        rc = r.proc.returncode
        ok = rc == 0 and finished(self.run_dir, r.stage)
        status = "done" if ok else ("interrupted" if self._stop_signal else "failed")
        r.record.update(
            status=status,
            finished=_now(),
            seconds=round(seconds, 1),
            seconds_total=round(r.record["seconds_before"] + seconds, 1),
            returncode=rc,
        )
        write_record(self.run_dir, r.stage.name, r.record)
        self.log(f"[study] {r.stage.name}: {status} in {seconds:.0f} s (exit {rc})")
        if ok:
            self.ran.append(r.stage.name)
            return True
        if self._stop_signal:  # stopped on purpose: the next run resumes it
            return False
        tail = _tail(log_path(self.run_dir, r.stage.name))
        why = f"exit code {rc}" if rc else f"exited 0 without leaving {r.stage.done}"
        raise StageFailed(f"stage {r.stage.name} {status} ({why}); log {r.record['log']}:\n{tail}")

    def _summary(self, plan: Plan, states: Mapping[str, str], done_now: set[str]) -> dict:
        left = {}
        for s in plan.stages:
            if (s.always and s.name in done_now) or (not s.always and states[s.name] == "done"):
                continue
            if not self.selected(s):
                why = "not selected (--stages)"
            elif s.pending:
                why = "waits for the ablation's winner"
            else:
                missing = [d for d in s.deps if states.get(d) != "done" and d not in done_now]
                why = f"waits for {', '.join(missing)}" if missing else "not run"
            left[s.name] = why
        return dict(ran=list(self.ran), left=left)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def _tail(path: str, lines: int = 15) -> str:
    """The last `lines` lines of a log that are not the config JSON the commands print first."""
    try:
        with open(path, errors="replace") as fh:
            text = [x for x in fh.readlines() if not x.startswith((" ", "{", "}"))]
        return "".join(text[-lines:])
    except OSError:
        return "(no log)"
