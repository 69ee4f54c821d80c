"""The study plan (adastate_jax/study/plan.py, profiles.py): arms, budgets, stage configs, estimates.
No training: commands are built and their configs parsed, never run."""

import pytest

from adastate_jax.study import plan as plan_lib
from adastate_jax.study import profiles


@pytest.fixture(scope="module")
def cpu_plan():
    return plan_lib.build(profiles.profile("cpu"), winner="bptt_window")


def test_arms_have_equal_cached_frames():
    for arm in plan_lib.ARMS:
        s = arm.stream_dict()
        if arm.policy == "full" or arm.reference:
            continue
        anchor = s.get("state_frames", 0) if arm.adastate else s.get("sink_frames", 0)
        assert anchor + s["window_frames"] == plan_lib.CACHED_FRAMES, arm
    assert {a.name for a in plan_lib.ARMS} == {
        "window",
        "full",
        "sink",
        "ema_sink",
        "adastate_a2",
        "adastate_a4",
        "longlive",
    }
    longlive = plan_lib.ARM_BY_NAME["longlive"].stream_dict()
    assert (longlive["sink_frames"], longlive["window_frames"]) == (3, 6)
    assert [plan_lib.ARM_BY_NAME[a].alpha for a in ("adastate_a2", "adastate_a4")] == [2.0, 4.0]


def test_issue_sizes_of_the_cpu_profile(cpu_plan):
    p = cpu_plan.profile
    assert len(p.train_seeds) >= 3 and len(p.eval_seeds) >= 4 and not p.eval_labels  # 8 prompts
    assert p.horizons == (1, 2, 4, 6) and p.clip_frames == 21 and p.horizon_chunks == 7


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_model_gets_the_same_dmd_steps(name):
    plan = plan_lib.build(profiles.profile(name), winner="bptt_window")
    for m in plan.models + plan.ablation_models:
        assert plan.budget(m.stage) == plan.profile.dmd_steps, m
    arms = {(m.arm, m.train_seed) for m in plan.models}
    assert arms == {(a.name, s) for a in plan_lib.ARMS for s in plan.profile.train_seeds}
    assert all(not s.pending for s in plan.stages)


def test_adastate_arms_wait_for_the_ablation():
    plan = plan_lib.build(profiles.profile("toy"))
    pending = {s.name for s in plan.stages if s.pending}
    # a2 seed 0 is the ablation's own run (done before the winner is known): what reads the main
    # adastate models waits instead, the evaluation and every adastate showcase included
    dmd = {n for n in pending if n.startswith("dmd/")}
    assert dmd and all("adastate_a4" in n for n in dmd)
    assert pending - dmd == {"eval", "showcase/adastate_a2", "showcase/adastate_a4"}
    known = plan_lib.build(profiles.profile("toy"), winner="bptt_window")
    assert not any(s.pending for s in known.stages)
    with pytest.raises(ValueError, match="not a variant"):
        plan_lib.build(profiles.profile("toy"), winner="nope")
    gpu = plan_lib.build(profiles.profile("gpu"))  # a fixed variant: nothing waits
    assert not any(s.pending for s in gpu.stages)
    assert "dmd/adastate_a4_bptt_window_s2" in gpu.names


def test_the_window_arm_continues_its_half_and_adastate_starts_from_it(cpu_plan):
    w = cpu_plan.stage("dmd/window_s0")
    assert w.resume_from == "dmd/window_half_s0" and w.expect_step == cpu_plan.profile.dmd_steps
    a = cpu_plan.stage("dmd/adastate_a4_bptt_window_s1")
    assert "--config.train.init_from=dmd/window_half_s1/export" in a.argv
    assert "--config.train.init_policy=window" in a.argv and "--config.train.alpha=4.0" in a.argv
    ode_variant = cpu_plan.stage("dmd/adastate_a2_bptt_ode_s0")
    assert "--config.train.init_from=ode/export" in ode_variant.argv
    assert ode_variant.expect_step == cpu_plan.profile.dmd_steps


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_the_ode_init_trains_on_trajectories_the_traj_stage_stored(name):
    p = profiles.profile(name)
    plan = plan_lib.build(p, winner="bptt_window")
    assert p.traj_clips > 0  # every registered profile stores them (0 would be on the fly)
    names = plan.names
    assert names.index("teacher_check") < names.index("traj") < names.index("ode")
    groups = plan_lib.STAGE_GROUPS
    assert groups.index("teacher_check") < groups.index("traj") < groups.index("ode")
    traj, ode = plan.stage("traj"), plan.stage("ode")
    teacher = "teacher_tf" if p.teacher_tf_steps else "teacher"
    assert traj.group == "traj" and traj.deps == (teacher,) and traj.owns_workdir
    assert traj.argv[1] == "{repo}/launch/make_ode_trajectories.py"
    assert "--config={repo}/configs/panworld.py:ode" in traj.argv
    assert f"--config.train.teacher_path={teacher}/export" in traj.argv
    assert f"--config.train.teacher_attention={p.teacher_attention}" in traj.argv
    assert f"--num_clips={p.traj_clips}" in traj.argv and f"--out_dir={traj.workdir}" in traj.argv
    assert f"--config.data.panworld.num_frames={p.clip_frames}" in traj.argv
    # done only when the last shard is renamed into place (the generator writes them in order)
    from adastate_jax.data import trajectories

    shards = len(trajectories.shard_counts(p.traj_clips, plan_lib.TRAJ_CLIPS_PER_FILE))
    assert traj.done == f"{traj.workdir}/{trajectories.shard_name(shards - 1, shards)}"
    # the ODE init reads them: `ode,stored`, data.paths the traj stage's directory, no teacher
    assert "--config={repo}/configs/panworld.py:ode,stored" in ode.argv
    assert f"--config.data.paths=('{traj.workdir}',)" in ode.argv
    assert "traj" in ode.deps and not any(w.startswith("--config.train.teacher_path=") for w in ode.argv)
    assert f"--config.train.init_from={teacher}/export" in ode.argv


def test_traj_clips_0_asks_for_the_ode_init_on_the_fly():
    import dataclasses

    p = dataclasses.replace(profiles.profile("toy"), traj_clips=0)
    plan = plan_lib.build(p, winner="bptt_window")
    assert "traj" not in plan.names
    ode = plan.stage("ode")
    assert "--config={repo}/configs/panworld.py:ode,window" in ode.argv and "traj" not in ode.deps
    assert "--config.train.teacher_path=teacher_tf/export" in ode.argv
    assert not any(w.startswith("--config.data.paths=") for w in ode.argv)
    with pytest.raises(ValueError, match="traj_clips"):
        dataclasses.replace(p, traj_clips=1)  # fewer clips than one ODE batch


def test_the_estimate_counts_the_stored_trajectories():
    import dataclasses

    from adastate_jax.study import measure

    p = profiles.profile("cpu")
    est = measure.estimate_seconds(plan_lib.build(p))
    sec = dict(p.step_seconds)
    want = sec["process"] + sec.get("compile_traj", sec["compile"]) + p.traj_clips * sec["traj_clip"]
    assert est["per_stage"]["traj"] == pytest.approx(want) and est["per_group"]["traj"] == pytest.approx(want)
    more = dataclasses.replace(p, traj_clips=2 * p.traj_clips)
    more_est = measure.estimate_seconds(plan_lib.build(more))
    assert more_est["work"] - est["work"] == pytest.approx(p.traj_clips * sec["traj_clip"])
    assert more_est["total"] > est["total"]  # on the critical path (shared cores: not 1:1)


@pytest.mark.parametrize("name", ["toy", "cpu"])
def test_every_stage_config_is_valid(name):
    """Every --config.x=y of every stage names an existing field and the config parses."""
    from adastate_jax import study

    p = profiles.profile(name)
    plan = plan_lib.build(p, winner=p.variants[-1])
    assert study.validate(plan) == sum(1 for s in plan.stages if s.argv)


def test_a_bad_override_is_refused_naming_the_stage():
    from adastate_jax import study

    plan = plan_lib.build(profiles.profile("toy"), winner="bptt_window")
    bad = plan_lib.Stage(
        "teacher",
        "teacher",
        "teacher",
        "teacher/export/info.json",
        (*plan.stage("teacher").argv, "--config.train.no_such_field=1"),
    )
    plan = plan_lib.Plan(plan.profile, plan.train_seeds, plan.winner, plan.variants, (bad,), (), (), ())
    with pytest.raises(ValueError, match="stage teacher: .*no_such_field"):
        study.validate(plan)


def test_cpu_estimate_fits_the_issue_budget():
    """The cpu profile's estimate (measured CPU seconds per stage, two stages at once on the two
    cores, each on about one core) fits issue 10's 2.5 h; the parallel schedule is what makes it fit."""
    from adastate_jax.study import measure

    p = profiles.profile("cpu")
    cpu = measure.estimate_seconds(plan_lib.build(p))
    assert p.max_parallel == 2 and cpu["total"] < cpu["work"]
    assert cpu["total"] <= 2.5 * 3600


def test_gpu_estimate_fits_the_issue_budget():
    from adastate_jax.study import measure

    gpu = measure.estimate_seconds(plan_lib.build(profiles.profile("gpu")))
    assert gpu["total"] <= 9 * 60
    cpu = measure.estimate_seconds(plan_lib.build(profiles.profile("cpu")))
    assert set(cpu["per_group"]) == set(plan_lib.STAGE_GROUPS) - {"report"} | {"report"}


def test_models_spec_paths_are_relative_to_the_spec():
    import json

    spec = json.loads(
        plan_lib.models_spec({"w": {"policy": "window", "stream": {}}}, [("w", "dmd/w_s0/export", 0)], "eval")
    )
    assert spec["checkpoints"] == [{"arm": "w", "path": "../dmd/w_s0/export", "train_seed": 0}]


def test_the_trajectory_probe_reads_the_generators_log(tmp_path):
    """`--measure`'s traj probe: per clip from the batches after the first (the generator's own
    log lines), the compile from the first batch less one batch."""
    from adastate_jax.study import measure

    log = tmp_path / "traj.log"
    log.write_text(
        "I1202 ode_trajectories.py:260] first batch (with compilation) in 30.0s\n"
        "I1202 ode_trajectories.py:267] clips 16/16 | shard 1/1 | 0.40 clips/s | ETA 0:00:00\n"
        "I1202 ode_trajectories.py:238] done: 16 clips in 50.0s (0 shards skipped); 1.0 MiB in d\n"
    )
    got = measure._traj_numbers(str(log), wall=60.0, clips=16, batch=8)
    assert got["step"] == pytest.approx(2.5) and got["compile"] == pytest.approx(10.0)
    assert got["process"] == pytest.approx(60.0 - 10.0 - 16 * 2.5)
    half = measure._traj_numbers(str(log), wall=60.0, clips=16, batch=8, cpu=30.0)  # CPU seconds
    assert half["step"] == pytest.approx(1.25) and half["cpu_scale"] == pytest.approx(0.5)
    log.write_text("I1202 ode_trajectories.py:260] first batch (with compilation) in 30.0s\n")
    with pytest.raises(RuntimeError, match="after the first"):
        measure._traj_numbers(str(log), wall=60.0, clips=8, batch=8)


def test_the_teacher_trains_on_its_own_clip_length_and_is_checked_on_the_students():
    """`Profile.teacher_clip_frames`: the teacher and its fine-tune read shorter clips; the teacher
    check, the trajectories, the ODE init and every arm stay on the profile's training clip."""
    import dataclasses

    p = dataclasses.replace(
        profiles.profile("cpu"),
        teacher_from="",
        teacher_steps=500,
        teacher_tf_steps=200,
        teacher_clip_frames=9,
    )
    plan = plan_lib.build(p, winner="bptt_window")

    def frames(stage):
        got = [w.split("=", 1)[1] for w in stage.argv if w.startswith("--config.data.panworld.num_frames=")]
        return int(got[-1]) if got else None

    for name in ("teacher", "teacher_tf"):
        assert frames(plan.stage(name)) == 9
        assert "--config.stream.max_frames=9" in plan.stage(name).argv
    for s in plan.stages:
        if s.argv and s.group not in ("teacher",):
            assert frames(s) in (None, p.clip_frames), s.name
    assert frames(plan.stage("teacher_check")) == 21 and frames(plan.stage("traj")) == 21
    assert (
        p.teacher_frames == 9
        and profiles.profile("toy").teacher_frames == profiles.profile("toy").clip_frames
    )
    with pytest.raises(ValueError, match="teacher_clip_frames=8"):
        dataclasses.replace(p, teacher_clip_frames=8)


def test_makespan_shares_the_cores_between_the_running_stages():
    from adastate_jax.study import measure

    def plan_of(*stages):
        return plan_lib.Plan(profiles.profile("toy"), (0,), None, (), tuple(stages), (), (), ())

    def stage(name, deps=()):
        return plan_lib.Stage(name, "dmd", name, f"{name}/done", ("python",), deps=deps)

    two = plan_of(stage("a"), stage("b"))
    chain = plan_of(stage("a"), stage("b", deps=("a",)))
    sec = {"a": 100.0, "b": 100.0}
    # one accelerator the stages do not fill: each takes its own time
    assert measure.makespan(two, sec, 2) == pytest.approx(100.0)
    assert measure.makespan(two, sec, 1) == pytest.approx(200.0)
    # two cores: two stages at once get one core each; one alone gets 1.9 of them
    assert measure.makespan(two, sec, 2, cores=2, alone=1.9) == pytest.approx(100.0)
    assert measure.makespan(chain, sec, 2, cores=2, alone=1.9) == pytest.approx(200.0 / 1.9)
    uneven = {"a": 100.0, "b": 50.0}  # b finishes at 50 s, then a runs alone: 50 CPU-s at 1.9
    assert measure.makespan(two, uneven, 2, cores=2, alone=1.9) == pytest.approx(50.0 + 50.0 / 1.9)
    with pytest.raises(ValueError, match="stage b waits"):
        measure.makespan(plan_of(stage("b", deps=("z",))), {"b": 1.0}, 1)


def test_a_shipped_teacher_replaces_the_teacher_training_and_is_still_checked(tmp_path):
    """`Profile.teacher_from`: one action stage copies the shipped teacher (files and architecture
    checked); the teacher check, the trajectories and the DMD scores read that copy."""
    import dataclasses
    import json

    from adastate_jax import shipped, study

    model = (("model.dim", 128), ("model.num_heads", 4), ("model.num_layers", 2), ("model.ffn_dim", 256))
    p = dataclasses.replace(profiles.profile("cpu"), teacher_from="teacher", model=model)
    plan = plan_lib.build(p, winner="bptt_window")
    names = [s.name for s in plan.stages]
    assert "teacher_tf" not in names and plan.stage("teacher").action == "use_shipped_teacher"
    source = json.loads(dict(plan.stage("teacher").files)["teacher/source.json"])
    assert source == {"name": "teacher", "params_sha256": shipped.read_manifest("teacher")["params_sha256"]}
    assert plan.stage("teacher_check").deps == ("teacher",)
    assert "--config.train.teacher_path=teacher/export" in plan.stage("traj").argv
    assert all(
        "--config.train.teacher_path=teacher/export" in s.argv for s in plan.stages if s.group == "dmd"
    )

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "source.json").write_text(source and json.dumps(source))
    study.use_shipped_teacher(str(tmp_path), plan)
    assert (
        shipped.file_table(str(tmp_path / "teacher" / "export")) == shipped.read_manifest("teacher")["files"]
    )

    narrow = plan_lib.build(dataclasses.replace(p, model=(("model.dim", 64),)), winner="bptt_window")
    with pytest.raises(ValueError, match="another architecture.*model.dim: profile 64, shipped 128"):
        study.use_shipped_teacher(str(tmp_path), narrow)
    with pytest.raises(ValueError, match="teacher_from='nobody'"):
        plan_lib.build(dataclasses.replace(p, teacher_from="nobody"))


def test_the_teacher_check_scores_the_pan_prompts():
    """Issue 10's teacher bar is about pans: the check evaluates the pan prompts only (static and
    back-and-forth have no progression toward a direction)."""
    from adastate_jax.data import panworld

    prompts = panworld.camera_prompts()
    p = profiles.profile("cpu")
    labels = plan_lib.pan_labels(p)
    assert [prompts[label] for label in labels] == [t for t in prompts if t.startswith("pan ")]
    assert len(labels) == 6
    argv = plan_lib.build(p, winner="bptt_window").stage("teacher_check").argv
    assert f"--labels={','.join(map(str, labels))}" in argv
    assert plan_lib.pan_labels(profiles.profile("toy")) == (5,)  # within the profile's own labels
