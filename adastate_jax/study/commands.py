"""The study's command lines: `launch/train.py`, `launch/evaluate.py` and `launch/rollout.py`
argv with `{python}` / `{repo}` tokens (a stage's record does not depend on where the repository
lives), `--config.<field>=<value>` overrides, and the evaluation's JSON model spec.

Must not know: which stages exist (`study.plan`), how they run (`study.runner`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from adastate_jax.study.profiles import Profile

PYTHON = "{python}"  # the interpreter that runs the study
REPO = "{repo}"  # the repository root (launch/, configs/)
BASE_CONFIG = "configs/panworld.py"  # every stage's config file (its `:stage,policy` variants)


def format_value(value) -> str:
    """A `--config.x=VALUE` string that ml_collections' config flags parse back to `value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def override_flags(pairs: Sequence[tuple[str, object]]) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in pairs]


def sampler_steps(n: int) -> tuple[float, ...]:
    """`n` evenly spaced denoising timesteps from 1000 down to 1000 / n (the teacher's sampler)."""
    return tuple(round(1000.0 - i * (1000.0 - 1000.0 / n) / max(n - 1, 1), 2) for i in range(n))


def _common(p: Profile, frames: int = 0) -> list[tuple[str, object]]:
    """Every stage's overrides: the model and the clip length (`frames`, default the profile's
    training clip; the teacher's stages pass `Profile.teacher_frames`)."""
    frames = frames or p.clip_frames
    return [*p.model, ("data.panworld.num_frames", frames), ("stream.max_frames", frames)]


def _train_argv(variant: str, workdir: str, pairs) -> tuple[str, ...]:
    return (
        PYTHON,
        f"{REPO}/launch/train.py",
        f"--config={REPO}/{BASE_CONFIG}:{variant}",
        f"--workdir={workdir}",
        *override_flags(pairs),
    )


def _eval_argv(
    p: Profile, variant: str, pairs, spec: str, out_dir: str, horizons, seeds, instrument: bool, labels=None
):
    labels = ",".join(map(str, p.eval_labels if labels is None else labels))
    return (
        PYTHON,
        f"{REPO}/launch/evaluate.py",
        f"--config={REPO}/{BASE_CONFIG}:{variant}",
        *override_flags(pairs),
        f"--checkpoints={spec}",
        f"--horizons={','.join(map(str, horizons))}",
        f"--horizon_chunks={p.horizon_chunks}",
        f"--seeds={','.join(map(str, seeds))}",
        *([f"--labels={labels}"] if labels else []),
        f"--bootstrap={p.bootstrap}",
        f"--instrument={'true' if instrument else 'false'}",
        f"--out_dir={out_dir}",
    )


def eval_stream(arm, p: Profile) -> dict:
    """The stream fields an arm is evaluated with: its own, and for `full` a cache that holds the
    longest horizon."""
    stream = arm.stream_dict()
    if arm.policy == "full":
        stream["max_frames"] = p.eval_frames
    return stream


def models_spec(
    arms: Mapping[str, dict], models: Sequence[tuple[str, str, int | None]], spec_dir: str
) -> str:
    """The evaluation's JSON spec (`eval.arms`): arms {name: {policy, stream}} and checkpoints with
    paths relative to the spec file's directory `spec_dir`. models: (arm, export dir, train seed)."""
    import posixpath

    checkpoints = [
        dict(arm=a, path=posixpath.relpath(path, spec_dir), **({} if s is None else {"train_seed": s}))
        for a, path, s in models
    ]
    return json.dumps(dict(arms=dict(arms), checkpoints=checkpoints), indent=1, sort_keys=True) + "\n"
