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
    assert pending and all("adastate_a4" in n for n in pending)  # a2 seed 0 is the ablation's own run
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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,  # only the budget: an error in the estimate itself fails the test
    reason="issue 10: with the measured step times (DMD 8.5-9.2 s/step, 135 s compiles) the cpu profile "
    "estimates 3.6 h, over the 2.5 h budget; the profile must be redesigned (strict: passing means fixed)",
)
def test_cpu_estimate_fits_the_issue_budget():
    from adastate_jax.study import measure

    cpu = measure.estimate_seconds(plan_lib.build(profiles.profile("cpu")))
    assert cpu["total"] == pytest.approx(cpu["work"])  # one stage at a time on 2 cores
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
