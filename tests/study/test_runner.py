"""The study runner (adastate_jax/study/runner.py): fingerprints, skip / resume / redo, failures.
Synthetic stages whose commands are one-line Python programs (no training)."""

import json
import os

import pytest

from adastate_jax.study import plan as plan_lib
from adastate_jax.study import profiles, runner

TOY = profiles.profile("toy")


def _write(path, text):
    """A command writing `text` to `path` (relative to the run directory), appending to ran.txt."""
    return (
        "{python}",
        "-c",
        f"import os; os.makedirs(os.path.dirname({path!r}) or '.', exist_ok=True); "
        f"open({path!r}, 'w').write({text!r}); open('ran.txt', 'a').write({path!r} + '\\n')",
    )


def _plan(a_text="a", b_text="b", b_fails=False):
    b_argv = ("{python}", "-c", "raise SystemExit(5)") if b_fails else _write("b/out.txt", b_text)
    stages = (
        plan_lib.Stage("a", "teacher", "a", "a/out.txt", _write("a/out.txt", a_text)),
        plan_lib.Stage("b", "ode", "b", "b/out.txt", b_argv, deps=("a",)),
        plan_lib.Stage("c", "report", "c", "c/done.txt", action="finish", deps=("b",), always=True),
    )
    return plan_lib.Plan(TOY, (0,), None, (), stages, (), (), ())


def _finish(run_dir, plan):
    os.makedirs(os.path.join(run_dir, "c"), exist_ok=True)
    with open(os.path.join(run_dir, "c", "done.txt"), "w") as fh:
        fh.write("ok")


def _run(run_dir, plan):
    r = runner.Runner(str(run_dir), lambda: plan, {"finish": _finish}, log=lambda m: None, poll_s=0.02)
    return r, r.run()


def _ran(run_dir):
    path = os.path.join(run_dir, "ran.txt")
    return open(path).read().split() if os.path.exists(path) else []


def test_fingerprints_follow_commands_and_dependencies():
    base = runner.fingerprints(_plan())
    changed_a = runner.fingerprints(_plan(a_text="A"))
    changed_b = runner.fingerprints(_plan(b_text="B"))
    assert changed_a["a"] != base["a"] and changed_a["b"] != base["b"] and changed_a["c"] != base["c"]
    assert changed_b["a"] == base["a"] and changed_b["b"] != base["b"]
    cyc = plan_lib.Plan(
        TOY, (0,), None, (), (plan_lib.Stage("x", "ode", "x", "x", ("p",), deps=("y",)),), (), (), ()
    )
    with pytest.raises(ValueError, match="depends on 'y'"):
        runner.fingerprints(cyc)


def test_run_skip_and_redo(tmp_path):
    r, summary = _run(tmp_path, _plan())
    assert summary["left"] == {} and r.ran == ["a", "b", "c"]
    assert _ran(tmp_path) == ["a/out.txt", "b/out.txt"]
    rec = runner.read_record(str(tmp_path), "b")
    assert rec["status"] == "done" and rec["command"].startswith("python -c")
    # the same plan again: nothing but the always-stage runs
    r, _ = _run(tmp_path, _plan())
    assert r.ran == ["c"] and len(_ran(tmp_path)) == 2
    # a changed command is stale: it and what depends on it run again
    plan = _plan(b_text="B")
    states = runner.Runner(str(tmp_path), lambda: plan, {}).states(plan)
    assert states == {"a": "done", "b": "stale", "c": "stale"}
    r, _ = _run(tmp_path, plan)
    assert r.ran == ["b", "c"] and open(tmp_path / "b" / "out.txt").read() == "B"


def test_a_killed_stage_resumes(tmp_path):
    _run(tmp_path, _plan())
    rec = runner.read_record(str(tmp_path), "b")
    runner.write_record(str(tmp_path), "b", dict(rec, status="running"))  # killed mid-way
    os.remove(tmp_path / "b" / "out.txt")
    plan = _plan()
    assert runner.Runner(str(tmp_path), lambda: plan, {}).states(plan)["b"] == "resume"
    r, _ = _run(tmp_path, plan)
    assert r.ran == ["b", "c"] and runner.read_record(str(tmp_path), "b")["attempts"] == 2


def test_a_training_stage_is_done_only_at_its_expected_step(tmp_path):
    stage = plan_lib.Stage("t", "dmd", "t", "t/export/info.json", ("p",), expect_step=10)
    os.makedirs(tmp_path / "t" / "export")
    (tmp_path / "t" / "export" / "info.json").write_text(json.dumps({"step": 5}))
    assert not runner.finished(str(tmp_path), stage)
    (tmp_path / "t" / "export" / "info.json").write_text(json.dumps({"step": 10}))
    assert runner.finished(str(tmp_path), stage)


def test_a_continuation_copies_the_checkpoints_it_continues(tmp_path):
    (tmp_path / "half" / "checkpoints" / "5").mkdir(parents=True)
    stage = plan_lib.Stage(
        "full", "dmd", "full", "full/export/info.json", ("p",), expect_step=10, resume_from="half"
    )
    runner.prepare(str(tmp_path), stage, "new", log=lambda m: None)
    assert (tmp_path / "full" / "checkpoints" / "5").is_dir()


def test_a_failure_names_the_stage_and_stops_what_depends_on_it(tmp_path):
    with pytest.raises(runner.StageFailed, match="stage b failed .*exit code 5"):
        _run(tmp_path, _plan(b_fails=True))
    assert runner.read_record(str(tmp_path), "b")["status"] == "failed"
    assert not (tmp_path / "c" / "done.txt").exists()


def test_a_stale_training_workdir_is_moved_aside(tmp_path):
    (tmp_path / "t" / "checkpoints").mkdir(parents=True)
    stage = plan_lib.Stage("t", "dmd", "t", "t/export/info.json", ("p",), expect_step=10)
    runner.prepare(str(tmp_path), stage, "stale", log=lambda m: None)
    assert not (tmp_path / "t").exists() and (tmp_path / "t.replaced" / "checkpoints").is_dir()


def test_a_stage_that_owns_its_workdir_is_moved_aside_when_stale_and_kept_when_resumed(tmp_path):
    """The stored trajectories (plan's `traj` stage, not a training stage): a changed command (e.g. a
    retrained teacher) must not continue in the old directory (the generator refuses it); a killed
    one continues there (finished shards are skipped)."""
    stage = plan_lib.Stage("traj", "traj", "d", "d/last", ("p",), owns_workdir=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metadata.json").write_text("{}")
    runner.prepare(str(tmp_path), stage, "resume", log=lambda m: None)
    assert (tmp_path / "d" / "metadata.json").exists()
    runner.prepare(str(tmp_path), stage, "stale", log=lambda m: None)
    assert not (tmp_path / "d").exists() and (tmp_path / "d.replaced" / "metadata.json").exists()
    plain = plan_lib.Stage("x", "traj", "x", "x/last", ("p",))  # neither: its directory stays
    (tmp_path / "x").mkdir()
    runner.prepare(str(tmp_path), plain, "stale", log=lambda m: None)
    assert (tmp_path / "x").is_dir()


def test_an_action_runs_as_soon_as_its_dependencies_finish_beside_running_stages(tmp_path):
    """`pick` needs only `a`: it runs while the slow stage `s` still runs (not after it), and a
    failing action lets the running stage finish and be recorded before the run stops."""
    slow = ("{python}", "-c", "import time; time.sleep(2); open('s.txt', 'w').write('s')")

    def plan(action):
        return plan_lib.Plan(
            TOY,
            (0,),
            None,
            (),
            (
                plan_lib.Stage("s", "dmd", "s", "s.txt", slow),
                plan_lib.Stage("a", "ablation", "a", "a/out.txt", _write("a/out.txt", "a")),
                plan_lib.Stage("pick", "ablation", "pick", "pick.txt", action=action, deps=("a",)),
            ),
            (),
            (),
            (),
        )

    seen = {}

    def pick(run_dir, p):
        seen["slow_done"] = os.path.exists(os.path.join(run_dir, "s.txt"))
        open(os.path.join(run_dir, "pick.txt"), "w").write("w")

    def broken(run_dir, p):
        raise RuntimeError("no winner")

    kw = dict(log=lambda m: None, poll_s=0.02, max_parallel=2)
    r = runner.Runner(str(tmp_path / "ok"), lambda: plan("pick"), {"pick": pick}, **kw)
    r.run()
    assert seen == {"slow_done": False} and set(r.ran) == {"s", "a", "pick"}

    r = runner.Runner(str(tmp_path / "bad"), lambda: plan("broken"), {"broken": broken}, **kw)
    with pytest.raises(runner.StageFailed, match="no winner"):
        r.run()
    assert runner.read_record(str(tmp_path / "bad"), "s")["status"] == "done"
    assert runner.read_record(str(tmp_path / "bad"), "pick")["status"] == "failed"
