"""The pre-registered decision rule, the ablation's winner and the teacher's bar
(adastate_jax/study/decide.py) on synthetic numbers."""

import math

import pytest

from adastate_jax.study import decide


def _m(mean, half=0.1):
    return dict(mean=mean, lo=mean - half, hi=mean + half)


def _row(arm, h, progression=0.5, ret=0.5, code_conf=0.95, psnr=float("nan"), half=0.1, seed="all"):
    return dict(
        arm=arm,
        horizon=h,
        train_seed=seed,
        progression=_m(progression, half),
        **{"return": _m(ret, 0.05)},
        code_conf=_m(code_conf, 0.02),
        psnr=_m(psnr, 0.5),
    )


def _rows(**ada):
    rows = []
    for h in (1, 4, 6):
        rows += [
            _row("sink", h),
            _row("ema_sink", h, progression=0.4),
            _row("window", h, code_conf=0.95),
            _row("adastate_a2", h, progression=0.55),
            _row("adastate_a4", h, **ada),
        ]
    return rows


def test_adastate_better_when_every_condition_holds():
    got = decide.decide(_rows(progression=0.9, ret=0.2, code_conf=0.94))
    assert got["better"] and got["arm"] == "adastate_a4"
    assert all(c["ok"] for c in got["arms"]["adastate_a4"]["conditions"].values())
    assert got["text"].startswith("**AdaState is better**")


@pytest.mark.parametrize(
    "ada, failing",
    [
        (dict(progression=0.65, ret=0.2), 1),  # above sink's mean but the intervals overlap
        (dict(progression=0.9, ret=0.6), 2),  # returns to the start more often than sink
        (dict(progression=0.9, ret=0.2, code_conf=0.85), 3),  # quality below window's by > its width
    ],
)
def test_each_condition_can_fail_the_claim(ada, failing):
    got = decide.decide(_rows(**ada))
    assert not got["better"]
    conds = got["arms"]["adastate_a4"]["conditions"]
    assert not conds[failing]["ok"] and all(c["ok"] for k, c in conds.items() if k != failing)
    assert "did not show" in got["text"]


def test_a_missing_row_fails_and_undefined_fidelity_does_not_decide():
    rows = [
        r for r in _rows(progression=0.9, ret=0.2) if not (r["arm"] == "adastate_a4" and r["horizon"] == 6)
    ]
    got = decide.decide(rows)
    assert not got["arms"]["adastate_a4"]["present"] and got["arms"]["adastate_a4"]["met"] == 0
    psnr = [
        c
        for r in decide.decide(_rows(progression=0.9, ret=0.2))["arms"]["adastate_a4"]["conditions"][3][
            "per_horizon"
        ]
        for c in r["checks"]
        if c["metric"] == "psnr"
    ]
    assert psnr and all(c["ok"] is None for c in psnr)


def test_row_prefers_the_pooled_row():
    rows = [_row("sink", 4, 0.1, seed=0), _row("sink", 4, 0.2, seed=1), _row("sink", 4, 0.3)]
    assert decide.row(rows, "sink", 4)["progression"]["mean"] == 0.3
    assert decide.row(rows[:1], "sink", 4)["progression"]["mean"] == 0.1
    assert decide.row(rows[:2], "sink", 4) is None
    assert math.isnan(decide.metric(None, "progression")["mean"])


def test_pick_winner_ranks_eligible_variants_by_capped_progression():
    rows = [_row("adastate_v1", h, progression=3.0, code_conf=0.5) for h in (4, 6)]
    rows += [_row("adastate_v2", h, progression=0.7) for h in (4, 6)]
    rows += [_row("adastate_v3", h, progression=1.5, code_conf=0.96) for h in (4, 6)]
    got = decide.pick_winner(rows, ["v1", "v2", "v3"], lambda v: f"adastate_{v}", (4, 6), 0.9)
    assert got["winner"] == "v3" and got["eligible_any"]  # v1 moves most but is not a valid view
    # none eligible: all ranked, progression capped at 1 (ties to the higher code confidence)
    low = [dict(r, code_conf=_m(0.5 if "v1" in r["arm"] else 0.6, 0.01)) for r in rows]
    got = decide.pick_winner(low, ["v1", "v2", "v3"], lambda v: f"adastate_{v}", (4, 6), 0.9)
    assert not got["eligible_any"] and got["winner"] == "v3"


def test_teacher_bar():
    good = dict(progression=dict(mean=0.9, lo=0.6, hi=1.2), **{"return": _m(0.1)}, code_conf=_m(0.95))
    assert decide.teacher_bar(good)["ok"]
    bad = dict(good, progression=dict(mean=0.9, lo=0.4, hi=1.2))
    got = decide.teacher_bar(bad)
    assert not got["ok"] and [c["field"] for c in got["checks"] if not c["ok"]] == ["lo"]
    assert not decide.teacher_bar(None)["ok"]
