"""The study's report: `RUN_DIR/report/` (README.md, study.json, plots, videos), and publishing it.

Owns: gathering what the stages left (the teacher check's, the ablation's and the main
evaluation's results.json, the ablation's winner, the showcase rollouts, the stage records),
the study's tables (every row names arm, horizon and train_seed), the attention share per slot
group within and beyond the horizon, the verdict paragraph (`study.decide`), the side-by-side gif
of the five policies and the decoded-state strip, the budget and time tables; `publish`: copying
the report into the repository (`--publish=assets/study`), refusing any absolute path of this
machine in what it copies.

Must not know: how stages ran (`study.runner`), what the commands are (`study.plan` gives them),
how metrics or bootstrap intervals are computed (`eval.harness`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

from adastate_jax import files
from adastate_jax.study import decide, runner
from adastate_jax.study import plan as plan_lib

REPORT = "report"
KEY_METRICS = ("progression", "return", "pull", "code_conf", "conf_drift", "flicker")
SIDE_BY_SIDE = "side_by_side_6x"


def _load(run_dir: str, rel: str) -> dict | None:
    path = os.path.join(run_dir, rel)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def tidy(text: str, run_dir: str) -> str:
    """Paths in copied text relative to the repository instead of the run directory
    (`../../repo/launch/x.py` -> `launch/x.py`)."""
    rel = os.path.relpath(runner.REPO_ROOT, os.path.abspath(run_dir))
    return text.replace(rel + "/", "") if rel != "." else text


def _fmt(m: Mapping | None) -> str:
    if not m or m.get("mean") is None or not math.isfinite(m["mean"]):
        return "n/a"
    if m.get("lo") is None or not math.isfinite(m["lo"]):
        return f"{m['mean']:.3g}"
    return f"{m['mean']:.3g} [{m['lo']:.3g}, {m['hi']:.3g}]"


def _nanfix(x):
    """results.json writes NaN as null: back to NaN for the arithmetic here."""
    if isinstance(x, dict):
        return {k: _nanfix(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nanfix(v) for v in x]
    return float("nan") if x is None else x


def _rows(results: Mapping | None) -> list[dict]:
    if not results:
        return []
    out = []
    for r in results["rows"]:
        r = dict(r)
        for m in results.get("metrics", {}):
            if m in r:
                r[m] = {k: (float("nan") if v is None else v) for k, v in r[m].items()}
        out.append(r)
    return out


def table(rows: Sequence[Mapping], metrics: Sequence[str] = KEY_METRICS, seed_rows: bool = False) -> str:
    """Markdown: horizon, arm, train_seed, videos, metrics as `mean [lo, hi]`. Pooled rows only
    unless `seed_rows` (then every row)."""
    head = ["horizon", "arm", "train_seed", "videos", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not seed_rows and r["train_seed"] not in (decide.ALL_SEEDS,) and len(r.get("train_seeds", [])) > 1:
            continue
        seed = "-" if r["train_seed"] is None else str(r["train_seed"])
        cells = [f"{r['horizon']}x", r["arm"], seed, str(r.get("videos", ""))] + [
            _fmt(r.get(m)) for m in metrics
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pooled(rows: Sequence[Mapping]) -> list[dict]:
    """Per arm and horizon, the row that pools its training seeds, or its only row when it has no
    pooled one (one training seed, a reference row)."""
    has_pooled = {(r["arm"], r["horizon"]) for r in rows if r["train_seed"] == decide.ALL_SEEDS}
    return [
        r for r in rows if r["train_seed"] == decide.ALL_SEEDS or (r["arm"], r["horizon"]) not in has_pooled
    ]


# ------------------------------------------------------------------------------------------------
# Attention share per slot group
# ------------------------------------------------------------------------------------------------


def attention_summary(results: Mapping, key_frames: Mapping[str, tuple[int, int, int]]) -> list[dict]:
    """Mean attention share of each slot group (anchor/state, window, current) over the chunks of
    the first horizon and of the last horizon span, per arm, and the anchor's share over its share
    of the keys (how many times more mass the anchor gets than a uniform reader would give it).
    key_frames: {arm: (anchor, window, current) key frames}."""
    att = results.get("attention_share") or {}
    shares = att.get("per_arm_chunk_group") or {}
    hc = results["horizon_chunks"]
    horizons = sorted(results["horizons"])
    last_lo = (horizons[-2] if len(horizons) > 1 else 0) * hc
    out = []
    for arm, per_chunk in shares.items():
        x = np.asarray(_nanfix(per_chunk), np.float64)  # [chunk, group]
        spans = {"1x": x[:hc], f"{horizons[-1]}x (chunks {last_lo}-{x.shape[0] - 1})": x[last_lo:]}
        a, w, c = key_frames.get(arm, (0, 0, 0))
        total = a + w + c
        for span, part in spans.items():
            mean = np.nanmean(part, axis=0) if part.size else np.full(3, np.nan)
            ratio = float(mean[0] / (a / total)) if a and total else float("nan")
            out.append(
                dict(
                    arm=arm,
                    span=span,
                    anchor=float(mean[0]),
                    window=float(mean[1]),
                    current=float(mean[2]),
                    anchor_vs_uniform=ratio,
                )
            )
    return out


def key_frames(arm: plan_lib.Arm, profile: plan_lib.Profile) -> tuple[int, int, int]:
    """(anchor or state, window, current) key frames a chunk attends to at steady state."""
    s = arm.stream_dict()
    current = plan_lib.CHUNK_FRAMES + (s.get("state_frames", 1) if arm.adastate else 0)
    if arm.policy == "full":
        return (0, profile.eval_frames - plan_lib.CHUNK_FRAMES, plan_lib.CHUNK_FRAMES)
    anchor = s.get("state_frames", 1) if arm.adastate else s.get("sink_frames", 0)
    return (anchor, s.get("window_frames", 3), current)


def attention_table(summary: Sequence[Mapping]) -> str:
    lines = [
        "| arm | chunks | anchor / state | window | current | anchor share / its key share |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        ratio = "n/a" if not math.isfinite(r["anchor_vs_uniform"]) else f"{r['anchor_vs_uniform']:.2f}"
        lines.append(
            f"| {r['arm']} | {r['span']} | {r['anchor']:.3f} | {r['window']:.3f} | {r['current']:.3f} "
            f"| {ratio} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# What rules out an implementation error (issue 10 item 6)
# ------------------------------------------------------------------------------------------------

# (what is pinned, the test that pins it: "file::function"); tests/study/test_report.py checks that
# every named test exists, so this list cannot point at a test that was renamed or removed
IMPLEMENTATION_CHECKS = (
    (
        "every training layout (teacher forcing, diffusion forcing, ODE init) attends to what "
        "`Streamer.step` attends to over a 7-chunk rollout, per policy",
        "tests/training/test_layouts.py::test_context_schedule_is_what_streamer_step_attends_to",
    ),
    (
        "a teacher-forcing pass under the derived layout equals the streamed chunks' denoiser outputs",
        "tests/training/test_layouts.py::test_teacher_forcing_forward_equals_the_streamed_chunks",
    ),
    (
        "the adastate chunk masks its state slot at chunk 0 and reads it from chunk 1 on",
        "tests/streaming/test_rollout.py::test_adastate_first_chunk_masks_state_then_reads_it",
    ),
    (
        "the adastate cache layout is the same at chunk 3 and chunk 300 (nothing drifts with length)",
        "tests/streaming/test_rollout.py::test_adastate_layout_is_identical_at_chunk_3_and_300",
    ),
    (
        "the state's gradient reaches the next chunk iff the truncation allows it (state learning a)",
        "tests/training/test_state_learning.py::test_state_gradient_reaches_the_next_chunk_iff_truncation_allows",
    ),
    (
        "`train.state_loss` regress / dmd move the state toward their target; none adds nothing (b)",
        "tests/training/test_state_learning.py::test_state_loss_moves_the_state_toward_its_target",
    ),
    (
        "an adastate student starts bit for bit from the window student's export (c)",
        "tests/training/test_state_learning.py::test_adastate_dmd_starts_bitwise_from_a_window_export_and_records_it",
    ),
    (
        "the `sink` policy with absolute positions reproduces LongLive's cache layout",
        "tests/streaming/test_rollout.py::test_sink_absolute_reproduces_longlive_layout",
    ),
    (
        "the `ema_sink` commit equals a hand-computed EMA of the evicted frames",
        "tests/streaming/test_rollout.py::test_ema_sink_commit_matches_hand_computed_ema",
    ),
    (
        "cached chunk-by-chunk forwards equal one block-causal forward of the whole sequence",
        "tests/models/test_wan.py::test_cached_chunks_match_block_causal_forward",
    ),
)


def showcase_frames(run_dir: str, arm: str, pw: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """`arm`'s showcase rollout: (decoded state [chunks, H, W, 3], video [chunks * 3, H, W, 3]) in
    [-1, 1] at PanWorld's size, or None when either file is missing."""
    state_mp4 = os.path.join(run_dir, "showcase", f"{arm}_state.mp4")
    video_mp4 = os.path.join(run_dir, "showcase", f"{arm}.mp4")
    if not (os.path.exists(state_mp4) and os.path.exists(video_mp4)):
        return None
    h, w = int(pw["frame_height"]), int(pw["frame_width"])
    return _frames(state_mp4, h, w), _frames(video_mp4, h, w)


def state_motion(run_dir: str, arm: str, pw: Mapping) -> dict | None:
    """How much the decoded state of `arm`'s showcase rollout changes from chunk to chunk, next to
    how much the video changes over the same chunks (mean absolute difference in [-1, 1] pixels):
    a state the model never writes stays constant (ratio ~0). None when the rollout is missing."""
    frames = showcase_frames(run_dir, arm, pw)
    return motion_of(arm, *frames) if frames else None


def motion_of(arm: str, state: np.ndarray, vid: np.ndarray) -> dict | None:
    """`state_motion` of frames already read (`showcase_frames`)."""
    per_chunk = max(1, vid.shape[0] // max(state.shape[0], 1))
    last = vid[per_chunk - 1 :: per_chunk][: state.shape[0]]  # each chunk's last frame
    if state.shape[0] < 2 or last.shape[0] < 2:
        return None
    ds = float(np.abs(np.diff(state, axis=0)).mean())
    dv = float(np.abs(np.diff(last, axis=0)).mean())
    return dict(
        arm=arm, chunks=int(state.shape[0]), state_change=ds, video_change=dv, ratio=ds / dv if dv else 0.0
    )


def implementation_section(attention: Sequence[Mapping], motion: Sequence[Mapping]) -> list[str]:
    out = [
        "## What rules out an implementation error",
        "",
        "The default test suite (`python -m pytest`) pins the mechanism the arms differ by:",
        "",
    ]
    out += [f"- {what} (`{test}`)" for what, test in IMPLEMENTATION_CHECKS]
    out += ["", "In this run:", ""]
    state_rows = [r for r in attention if r["arm"].startswith("adastate")]
    for r in state_rows:
        ratio = "n/a" if not math.isfinite(r["anchor_vs_uniform"]) else f"{r['anchor_vs_uniform']:.2f}"
        out.append(
            f"- `{r['arm']}` reads its state: attention share {r['anchor']:.3f} over chunks {r['span']} "
            f"({ratio}x its share of the keys)"
        )
    for m in motion:
        out.append(
            f"- `{m['arm']}` writes its state: the decoded state changes by {m['state_change']:.3f} per "
            f"chunk on average over {m['chunks']} chunks, against {m['video_change']:.3f} for the video's "
            f"chunk-end frames (ratio {m['ratio']:.2f}; a state that is never written stays at ~0)"
        )
    if not state_rows and not motion:
        out.append("- (the evaluation and showcase have not run yet)")
    return out + [""]


# ------------------------------------------------------------------------------------------------
# Videos: the five policies side by side, the decoded state
# ------------------------------------------------------------------------------------------------


def _frames(path: str, height: int, width: int) -> np.ndarray:
    from adastate_jax.eval import harness

    return harness.downscale(harness.read_frames(path), height, width, path)  # [T, H, W, 3] in [-1, 1]


def side_by_side(run_dir: str, p: plan_lib.Profile, out: str, pw: Mapping) -> str | None:
    """The showcase rollouts of SHOWCASE_ARMS in one labelled gif with running progression /
    anchor pull captions. -> the path written (None when a rollout is missing)."""
    from adastate_jax.data import panworld
    from adastate_jax.eval import harness
    from adastate_jax.eval import report as eval_report

    paths = [os.path.join(run_dir, "showcase", f"{a}.mp4") for a in plan_lib.SHOWCASE_ARMS]
    if not all(os.path.exists(x) for x in paths):
        return None
    h, w = int(pw["frame_height"]), int(pw["frame_width"])
    videos = [_frames(x, h, w) for x in paths]
    t = min(v.shape[0] for v in videos)
    videos = [v[:t] for v in videos]
    pwc = harness.panworld_config(h, w, int(pw["seed"]))
    clip = harness.held_out_clips(pwc, [p.showcase_label], 1, t)[0]
    captions = [eval_report.progress_captions(harness.running_scores(v, clip)) for v in videos]
    prompt = panworld.camera_prompts(pwc)[p.showcase_label]
    labels = [f"{a} ({prompt})" if i == 0 else a for i, a in enumerate(plan_lib.SHOWCASE_ARMS)]
    written = eval_report.write_side_by_side(
        out, videos, labels, captions, columns=3, min_tile=96, fps=8.0, formats=(".gif",)
    )
    return written[0]


def state_strip(state: np.ndarray, vid: np.ndarray, arm: str, out_png: str, out_gif: str, columns: int = 14):
    """The decoded adaptive state of `arm`'s showcase rollout (`showcase_frames`): a strip of
    `columns` evenly spaced chunks (png) and a gif of video and state side by side. -> (png, gif)"""
    import cv2

    from adastate_jax import video as video_lib
    from adastate_jax.eval import report as eval_report

    picks = np.unique(np.linspace(0, state.shape[0] - 1, min(columns, state.shape[0])).round().astype(int))
    scale = 4
    tiles = []
    for c in picks:
        tile = video_lib.upscale(video_lib.to_uint8(state[c : c + 1]), factor=scale)[0]
        label = np.full((14, tile.shape[1], 3), 24, np.uint8)
        cv2.putText(label, f"chunk {c}", (2, 11), 0, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        tiles += [np.concatenate([label, tile]), np.full((tile.shape[0] + 14, 2, 3), 255, np.uint8)]
    files.write_bytes_atomic(out_png, _png(np.concatenate(tiles[:-1], axis=1)))
    per_chunk = max(1, vid.shape[0] // max(state.shape[0], 1))
    state_t = np.repeat(state, per_chunk, axis=0)[: vid.shape[0]]
    n = min(len(state_t), len(vid))
    written = eval_report.write_side_by_side(
        out_gif,
        [vid[:n], state_t[:n]],
        [f"{arm} video", "decoded state"],
        min_tile=96,
        fps=8.0,
        formats=(".gif",),
    )
    return out_png, written[0]


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image[..., ::-1])
    if not ok:
        raise ValueError("could not encode a png")
    return buf.tobytes()


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def timings(run_dir: str, plan: plan_lib.Plan) -> dict:
    """Seconds per stage (all attempts) and per group from the stage records, and the wall-clock
    `span`: from the earliest recorded start to the latest recorded end (stages run side by side, so
    the span, not the sum, is what a user waits; it includes any pause between resumed runs)."""
    per_stage, per_group, starts, ends = {}, {}, [], []
    for s in plan.stages:
        rec = runner.read_record(run_dir, s.name) or {}
        sec = rec.get("seconds_total", rec.get("seconds"))
        if sec is None:
            continue
        per_stage[s.name] = sec
        per_group[s.group] = per_group.get(s.group, 0.0) + sec
        if rec.get("started") and rec.get("finished"):
            starts.append(datetime.datetime.fromisoformat(rec["started"]))
            ends.append(datetime.datetime.fromisoformat(rec["finished"]))
    span = (max(ends) - min(starts)).total_seconds() if starts else None
    return dict(per_stage=per_stage, per_group=per_group, total=sum(per_stage.values()), span=span)


def budgets(plan: plan_lib.Plan) -> list[dict]:
    return [
        dict(
            arm=m.arm,
            train_seed=m.train_seed,
            stage=m.stage,
            dmd_steps=plan.budget(m.stage),
            variant=m.variant,
        )
        for m in (*plan.models, *plan.ablation_models)
    ]


def write(run_dir: str, plan: plan_lib.Plan, command: str = "") -> dict:
    """Write RUN_DIR/report/ from whatever the stages left. -> the study.json dict"""
    p = plan.profile
    out = os.path.join(run_dir, REPORT)
    os.makedirs(out, exist_ok=True)
    teacher_res = _load(run_dir, "teacher_check/results.json")
    ablation_res = _load(run_dir, "ablation/results.json")
    winner = _load(run_dir, "ablation/winner.json")
    main_res = _load(run_dir, "eval/results.json")
    main_rows = _rows(main_res)

    # --- teacher -----------------------------------------------------------------------------
    teacher_rows = _rows(teacher_res)
    teacher_row = decide.row(teacher_rows, "teacher", 1) if teacher_rows else None
    bar = decide.teacher_bar(teacher_row)

    # --- verdict -----------------------------------------------------------------------------
    rule_horizons = [h for h in decide.RULE_HORIZONS if h in p.horizons] or [max(p.horizons)]
    verdict = decide.decide(main_rows, rule_horizons) if main_rows else None

    # --- attention ---------------------------------------------------------------------------
    frames_of = {a.name: key_frames(a, p) for a in plan_lib.ARMS}
    attention = attention_summary(main_res, frames_of) if main_res else []

    # --- copies of the evaluations' own tables and plots --------------------------------------
    copied = []
    for src, dst in (
        ("eval/results.md", "eval_results.md"),
        ("eval/results.json", "eval_results.json"),
        ("eval/metrics_vs_time.png", "metrics_vs_time.png"),
        ("eval/attention_share.png", "attention_share.png"),
        ("teacher_check/results.md", "teacher_check.md"),
        ("teacher_check/results.json", "teacher_check.json"),
        ("ablation/results.md", "ablation_results.md"),
        ("ablation/results.json", "ablation_results.json"),
        ("ablation/winner.json", "ablation_winner.json"),
        ("ablation/metrics_vs_time.png", "ablation_metrics_vs_time.png"),
    ):
        path = os.path.join(run_dir, src)
        if os.path.exists(path):
            if dst.endswith((".md", ".json")):
                with open(path) as fh:
                    files.write_text_atomic(os.path.join(out, dst), tidy(fh.read(), run_dir))
            else:
                shutil.copyfile(path, os.path.join(out, dst))
            copied.append(dst)

    # --- videos ------------------------------------------------------------------------------
    videos, motion = [], []
    pw = (main_res or {}).get("panworld")
    if pw:
        sbs = side_by_side(run_dir, p, os.path.join(out, SIDE_BY_SIDE + ".gif"), pw)
        if sbs:
            videos.append(os.path.basename(sbs))
        for arm in (a.name for a in plan_lib.ARMS if a.adastate):
            frames = showcase_frames(run_dir, arm, pw)  # read once: the strip and the motion
            if frames:
                png, gif = os.path.join(out, f"{arm}_state_strip.png"), os.path.join(out, f"{arm}_state.gif")
                videos += [os.path.basename(x) for x in state_strip(*frames, arm, png, gif)]
                m = motion_of(arm, *frames)
                if m:
                    motion.append(m)

    # --- the JSON ----------------------------------------------------------------------------
    times = timings(run_dir, plan)
    study = dict(
        command=command,
        profile=p.name,
        profile_summary=p.summary,
        train_seeds=list(plan.train_seeds),
        arms=[
            dict(
                name=a.name,
                policy=a.policy,
                stream=a.stream_dict(),
                alpha=a.alpha if a.alpha is not None else p.baseline_alpha,
                reference=a.reference,
            )
            for a in plan_lib.ARMS
        ],
        budgets=budgets(plan),
        teacher_check=dict(row=teacher_row, bar=bar, sampler_steps=p.teacher_check_sampler_steps),
        ablation=dict(
            criterion=plan_lib.CRITERION,
            variants=[dict(name=v, question=plan_lib.VARIANT_BY_NAME[v].question) for v in plan.variants],
            winner=winner,
            rows=_rows(ablation_res),
        ),
        rows=main_rows,
        verdict=verdict,
        attention=attention,
        state_motion=motion,
        timings=times,
        notes=list(plan.notes),
        files=sorted(copied + videos),
    )
    files.write_text_atomic(
        os.path.join(out, "study.json"), tidy(json.dumps(_json_safe(study), indent=1), run_dir)
    )
    files.write_text_atomic(os.path.join(out, "README.md"), tidy(markdown(study, plan, main_res), run_dir))
    return study


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def markdown(study: Mapping, plan: plan_lib.Plan, main_res: Mapping | None) -> str:
    p = plan.profile
    hours = study["timings"]["total"] / 3600
    span = study["timings"].get("span")
    wall = f", {span / 3600:.2f} h wall clock" if span is not None else ""
    out = [
        f"# The AdaState study, profile `{p.name}`",
        "",
        f"{p.summary}. Made by one command (stages resume; {hours:.2f} h of stage time in all{wall}):",
        "",
        f"```bash\n{study['command'] or f'python launch/study.py --profile={p.name} --out=RUN_DIR'}\n```",
        "",
        f"Training seeds {study['train_seeds']}; {len(p.eval_labels) or 8} held-out prompts x "
        f"{len(p.eval_seeds)} sampling seeds per trained model; horizons {list(p.horizons)} x "
        f"{p.horizon_chunks} chunks ({p.clip_frames} latent frames); 95% intervals bootstrapped over "
        "training seeds and then videos (`eval.harness.hierarchical_bootstrap`).",
        "",
        "## Verdict (the README's pre-registered rule, evaluated mechanically)",
        "",
        study["verdict"]["text"] if study["verdict"] else "(the main evaluation has not run yet)",
        "",
        "## Main table (rows pooled over training seeds)",
        "",
        table(pooled(study["rows"])) if study["rows"] else "(not yet)\n",
        "Every row of every training seed: `eval_results.md` / `eval_results.json` (each row names arm, "
        "horizon and train_seed; `study.json` carries the same rows).",
        "",
        "![metrics vs time](metrics_vs_time.png)",
        "",
        "## Attention share per slot group",
        "",
        attention_table(study["attention"]) if study["attention"] else "(not recorded)\n",
        "The last column divides the anchor's (sink's, state's) share by its share of the keys: above 1 the "
        "slot draws more attention than its size.",
        "",
        "![attention share](attention_share.png)",
        "",
        "## The five policies side by side",
        "",
    ]
    if SIDE_BY_SIDE + ".gif" in study["files"]:
        out += [f"![side by side]({SIDE_BY_SIDE}.gif)", ""]
    for a in (a.name for a in plan_lib.ARMS if a.adastate):
        if f"{a}_state_strip.png" in study["files"]:
            out += [
                f"Decoded state of `{a}` over the rollout:",
                "",
                f"![{a} state]({a}_state_strip.png)",
                "",
                f"![{a} video and state]({a}_state.gif)",
                "",
            ]
    out += implementation_section(study["attention"], study.get("state_motion", []))
    t = study["teacher_check"]
    out += ["## The teacher inside its clip (issue 10 item 3)", ""]
    if t["row"]:
        out.append(
            f"`full` cache, {p.teacher_check_sampler_steps}-step sampler, 1x ({p.clip_frames} frames), the "
            f"pan prompts (labels {list(plan_lib.pan_labels(p))}) x {len(p.teacher_check_seeds)} sampling "
            "seeds: "
            + ", ".join(
                f"{m} {_fmt(t['row'].get(m))}" for m in ("progression", "return", "code_conf", "pull")
            )
        )
        out.append("")
        for c in t["bar"]["checks"]:
            v = "n/a" if not math.isfinite(c["value"]) else f"{c['value']:.3g}"
            out.append(
                f"- {c['metric']} {c['field']} {v} {c['op']} {c['bound']}: {'met' if c['ok'] else 'NOT met'}"
            )
        out += ["", f"The teacher {'meets' if t['bar']['ok'] else 'does NOT meet'} the bar.", ""]
    else:
        out += ["(not yet)", ""]
    ab = study["ablation"]
    out += [
        "## How the state learns: the ablation",
        "",
        f"Criterion (declared before it ran): {ab['criterion']}",
        "",
    ]
    if ab["winner"]:
        w = ab["winner"]
        out += ["| variant | question | code_conf | score | eligible |", "|---|---|---|---|---|"]
        questions = {v["name"]: v["question"] for v in ab["variants"]}
        for r in w["table"]:
            out.append(
                f"| {r['variant']} | {questions.get(r['variant'], '')} | {r['code_conf']:.3g} "
                f"| {r['score']:.3g} | {r['eligible']} |"
            )
        out += [
            "",
            f"Winner: **{w['winner']}**"
            + ("" if w["eligible_any"] else " (no variant reached the code-confidence bar: all were ranked)")
            + "; the main adastate arms use it.",
            "",
        ]
        if ab["rows"]:
            out += [table(ab["rows"]), ""]
    else:
        out += ["(not yet)", ""]
    out += [
        "## Budgets: DMD steps after the shared ODE init",
        "",
        "| arm | train_seed | variant | DMD steps | stage |",
        "|---|---|---|---|---|",
    ]
    for b in study["budgets"]:
        out.append(
            f"| {b['arm']} | {b['train_seed']} | {b['variant'] or '-'} | {b['dmd_steps']} | `{b['stage']}` |"
        )
    out += ["", "## Time", "", "| group | seconds |", "|---|---|"]
    for g, sec in study["timings"]["per_group"].items():
        out.append(f"| {g} | {sec:.0f} |")
    out += [f"| all (sum of stage times) | {study['timings']['total']:.0f} |", ""]
    if span is not None:
        out += [
            f"Wall clock from the first stage's start to the last stage's end: {span:.0f} s "
            f"({span / 3600:.2f} h, {p.max_parallel} stages at once; includes any pause between "
            "resumed runs).",
            "",
        ]
    if study["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in study["notes"]] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Publishing
# ------------------------------------------------------------------------------------------------

TEXT_EXTENSIONS = (".md", ".json", ".txt")


def machine_paths(run_dir: str) -> list[str]:
    """Absolute path prefixes of this machine that must not appear in published files."""
    found = {os.path.abspath(run_dir), runner.REPO_ROOT, os.path.expanduser("~")}
    return sorted(p for p in found if p not in ("/", ""))


def publish(run_dir: str, dest: str) -> list[str]:
    """Copy RUN_DIR/report/ to `dest` (files replaced); raises naming the file and the path when a
    text file carries an absolute path of this machine. -> the files copied"""
    src = os.path.join(run_dir, REPORT)
    if not os.path.isdir(src):
        raise ValueError(f"--publish: {src} does not exist: run the report stage first")
    bad = machine_paths(run_dir)
    names = sorted(os.listdir(src))
    for name in names:
        if name.endswith(TEXT_EXTENSIONS):
            with open(os.path.join(src, name), errors="replace") as fh:
                text = fh.read()
            hits = [b for b in bad if b in text]
            if hits:
                raise ValueError(f"--publish: {os.path.join(src, name)} contains the absolute path {hits[0]}")
    os.makedirs(dest, exist_ok=True)
    for name in names:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dest, name))
    return names
