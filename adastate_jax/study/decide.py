"""Judging the study's results mechanically: the pre-registered decision rule, the ablation's
winner, and the teacher's within-clip bar.

Owns:
- `decide`: the README's decision rule ("The AdaState study: decision rule", written before the
  study ran) evaluated on evaluation rows, condition by condition, with every number it compared;
- `pick_winner`: the state-learning ablation's pre-declared criterion (`study.plan.CRITERION`);
- `teacher_bar`: issue 10 item 3's bar for the teacher inside its clip;
- `row` / `metric`: reading the pooled row of an arm at a horizon from `eval.harness` rows
  (dict(arm, horizon, train_seed, ..., {metric: dict(mean, lo, hi, n)})).

Must not know: how rows were made (rollouts, bootstrap), files, the plan's commands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ALL_SEEDS = "all"  # eval.harness.ALL_SEEDS: the row pooled over an arm's training seeds
RULE_HORIZONS = (4, 6)
ADASTATE_ARMS = ("adastate_a2", "adastate_a4")
STATIC_ANCHORS = ("sink", "ema_sink")
NO_ANCHOR = "window"
QUALITY_METRICS = ("code_conf", "psnr")


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def row(rows: Sequence[Mapping], arm: str, horizon: int) -> Mapping | None:
    """The arm's row at `horizon` pooled over its training seeds (train_seed 'all'), or its only
    row when it has one training seed; None when absent."""
    mine = [r for r in rows if r["arm"] == arm and int(r["horizon"]) == int(horizon)]
    pooled = [r for r in mine if r["train_seed"] == ALL_SEEDS]
    if pooled:
        return pooled[0]
    return mine[0] if len(mine) == 1 else None


def metric(r: Mapping | None, name: str) -> dict:
    """{mean, lo, hi} of a row's metric; NaN where absent or undefined."""
    nan = float("nan")
    if r is None or name not in r:
        return dict(mean=nan, lo=nan, hi=nan)
    m = r[name]
    return {k: (float(m[k]) if _finite(m.get(k)) else nan) for k in ("mean", "lo", "hi")}


def _fmt(m: Mapping) -> str:
    if not _finite(m["mean"]):
        return "n/a"
    if not _finite(m["lo"]):
        return f"{m['mean']:.3g}"
    return f"{m['mean']:.3g} [{m['lo']:.3g}, {m['hi']:.3g}]"


# ------------------------------------------------------------------------------------------------
# The decision rule
# ------------------------------------------------------------------------------------------------


def _condition_1(ada, others, arm, h) -> dict:
    """Progression above sink's and ema_sink's with non-overlapping 95% intervals."""
    a = metric(ada, "progression")
    checks = []
    for name, r in others.items():
        o = metric(r, "progression")
        ok = all(_finite(x) for x in (a["lo"], o["hi"], a["mean"], o["mean"])) and a["lo"] > o["hi"]
        checks.append(dict(against=name, ok=bool(ok), text=f"{arm} {_fmt(a)} vs {name} {_fmt(o)}"))
    return dict(ok=all(c["ok"] for c in checks), checks=checks, horizon=h)


def _condition_2(ada, others, arm, h) -> dict:
    """Return-to-start rate lower than sink's and ema_sink's."""
    a = metric(ada, "return")
    checks = []
    for name, r in others.items():
        o = metric(r, "return")
        ok = _finite(a["mean"]) and _finite(o["mean"]) and a["mean"] < o["mean"]
        checks.append(dict(against=name, ok=bool(ok), text=f"{arm} {_fmt(a)} vs {name} {_fmt(o)}"))
    return dict(ok=all(c["ok"] for c in checks), checks=checks, horizon=h)


def _condition_3(ada, window, arm, h) -> dict:
    """Code confidence and fidelity not below window's by more than window's interval width. A
    metric undefined for both (PSNR of generated videos: their world is unknown) is reported n/a
    and does not decide; one defined for window only fails."""
    checks = []
    for name in QUALITY_METRICS:
        a, w = metric(ada, name), metric(window, name)
        if not _finite(w["mean"]) and not _finite(a["mean"]):
            checks.append(
                dict(against=NO_ANCHOR, metric=name, ok=None, text=f"{name}: n/a for both (undefined)")
            )
            continue
        width = (w["hi"] - w["lo"]) if _finite(w["lo"]) and _finite(w["hi"]) else 0.0
        ok = _finite(a["mean"]) and _finite(w["mean"]) and a["mean"] >= w["mean"] - width
        checks.append(
            dict(
                against=NO_ANCHOR,
                metric=name,
                ok=bool(ok),
                text=f"{name}: {arm} {_fmt(a)} vs window {_fmt(w)} (allowed down to {w['mean'] - width:.3g})",
            )
        )
    decided = [c["ok"] for c in checks if c["ok"] is not None]
    return dict(ok=bool(decided) and all(decided), checks=checks, horizon=h)


CONDITIONS = {
    1: ("progression above sink's and ema_sink's, 95% intervals not overlapping", _condition_1),
    2: ("return-to-start rate lower than sink's and ema_sink's", _condition_2),
    3: ("code confidence and fidelity not below window's by more than window's interval width", _condition_3),
}


def decide(
    rows: Sequence[Mapping],
    horizons: Sequence[int] = RULE_HORIZONS,
    adastate_arms: Sequence[str] = ADASTATE_ARMS,
) -> dict:
    """The decision rule on evaluation rows. For each adastate arm, each condition must hold at
    every horizon of `horizons`; AdaState is better when one of its alpha arms meets all three.
    "The better of its two alpha arms" is read mechanically: the arm that meets all conditions
    (both: the higher mean progression over `horizons`), else the one meeting more conditions
    (ties: higher mean progression). Missing rows fail the conditions that need them.
    -> dict(better: bool, arm, arms: {arm: {conditions: {k: dict(ok, text, per_horizon)}, met}},
            horizons, text)"""
    arms = {}
    for arm in adastate_arms:
        conditions = {}
        for k, (text, fn) in CONDITIONS.items():
            per_h = []
            for h in horizons:
                ada = row(rows, arm, h)
                if k == 3:
                    res = fn(ada, row(rows, NO_ANCHOR, h), arm, h)
                else:
                    res = fn(ada, {o: row(rows, o, h) for o in STATIC_ANCHORS}, arm, h)
                if ada is None:
                    res = dict(res, ok=False)
                per_h.append(res)
            conditions[k] = dict(ok=all(r["ok"] for r in per_h), text=text, per_horizon=per_h)
        progression = [metric(row(rows, arm, h), "progression")["mean"] for h in horizons]
        finite = [p for p in progression if _finite(p)]
        arms[arm] = dict(
            conditions=conditions,
            met=sum(c["ok"] for c in conditions.values()),
            progression=sum(finite) / len(finite) if finite else float("-inf"),
            present=all(row(rows, arm, h) is not None for h in horizons),
        )
    best = max(arms, key=lambda a: (arms[a]["met"], arms[a]["progression"]))
    better = arms[best]["met"] == len(CONDITIONS)
    return dict(
        better=better,
        arm=best,
        arms=arms,
        horizons=list(horizons),
        text=verdict_text(better, best, arms, horizons),
    )


def verdict_text(better: bool, best: str, arms: Mapping, horizons: Sequence[int]) -> str:
    """The verdict with each condition of the better arm, one line each."""
    hs = " and ".join(f"{h}x" for h in horizons)
    head = (
        f"**AdaState is better** by the pre-registered rule ({best}, at {hs})."
        if better
        else f"**AdaState did not show its claimed benefit** by the pre-registered rule "
        f"(better alpha arm: {best}, at {hs})."
    )
    lines = [head]
    for k, c in arms[best]["conditions"].items():
        mark = "met" if c["ok"] else "NOT met"
        detail = "; ".join(
            f"{r['horizon']}x: " + ", ".join(x["text"] for x in r["checks"]) for r in c["per_horizon"]
        )
        lines.append(f"{k}. {c['text']}: **{mark}** ({detail})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The ablation's winner
# ------------------------------------------------------------------------------------------------


def pick_winner(
    rows: Sequence[Mapping],
    variants: Sequence[str],
    arm_of,
    horizons: Sequence[int],
    min_code_conf: float,
) -> dict:
    """`study.plan.CRITERION` on the ablation's rows. arm_of(variant) -> its arm name in the rows.
    -> dict(winner, eligible_any, table: [dict(variant, code_conf, score, eligible, per_horizon)])"""
    table = []
    for v in variants:
        per_h = []
        for h in horizons:
            r = row(rows, arm_of(v), h)
            per_h.append(
                dict(
                    horizon=h,
                    progression=metric(r, "progression")["mean"],
                    code_conf=metric(r, "code_conf")["mean"],
                )
            )
        confs = [x["code_conf"] for x in per_h]
        capped = [min(x["progression"], 1.0) if _finite(x["progression"]) else float("-inf") for x in per_h]
        eligible = all(_finite(c) and c >= min_code_conf for c in confs)
        conf_mean = sum(c if _finite(c) else float("-inf") for c in confs) / len(confs)
        table.append(
            dict(
                variant=v,
                eligible=eligible,
                score=sum(capped) / len(capped),
                code_conf=conf_mean,
                per_horizon=per_h,
            )
        )
    eligible_any = any(t["eligible"] for t in table)
    pool = [t for t in table if t["eligible"]] if eligible_any else table
    order = {v: i for i, v in enumerate(variants)}
    winner = max(pool, key=lambda t: (t["score"], t["code_conf"], -order[t["variant"]]))["variant"]
    return dict(
        winner=winner,
        eligible_any=eligible_any,
        table=table,
        horizons=list(horizons),
        min_code_conf=min_code_conf,
    )


# ------------------------------------------------------------------------------------------------
# The teacher's bar (issue 10 item 3)
# ------------------------------------------------------------------------------------------------

TEACHER_BAR = (
    ("progression", "mean", ">=", 0.8),
    ("progression", "lo", ">=", 0.5),
    ("return", "mean", "<=", 0.2),
    ("code_conf", "mean", ">=", 0.9),
)


def teacher_bar(r: Mapping | None) -> dict:
    """Issue 10 item 3 on the teacher's within-clip row: progression >= 0.8 with the interval's
    lower end >= 0.5, return-to-start <= 0.2, code confidence >= 0.9. -> dict(ok, checks)"""
    checks = []
    for name, field, op, bound in TEACHER_BAR:
        value = metric(r, name)[field]
        ok = _finite(value) and (value >= bound if op == ">=" else value <= bound)
        checks.append(dict(metric=name, field=field, op=op, bound=bound, value=value, ok=bool(ok)))
    return dict(ok=all(c["ok"] for c in checks), checks=checks)
