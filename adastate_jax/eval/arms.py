"""What an evaluation compares: arms (a name, an anchor policy and stream overrides) and the trained
models of each arm, tagged with the training seed that made them.

Owns: the `Arm` and `Model` records, the rule that turns an arm name into its policy (an anchor
policy itself, a preset such as `longlive`, or `POLICY_suffix` for a trained variant such as
`adastate_a4`), and the two written forms of a model list with their errors:
- inline (`--checkpoints`): `ARM:DIR[@TRAIN_SEED],...`, e.g.
  `adastate_a4:runs/a4_s0/export@0,adastate_a4:runs/a4_s1/export@1,longlive:runs/ll/export@0`;
- a JSON spec file (`--checkpoints=spec.json`), paths relative to the file:
  `{"arms": {"NAME": {"policy": P, "stream": {FIELD: VALUE}}},
    "checkpoints": [{"arm": NAME, "path": DIR, "train_seed": S}, ...]}`
  (`arms` is optional; it defines or redefines arms, `stream` fields are `config.stream` fields).
Also the small parsers of the evaluation's other list flags, so that their errors are unit-tested.

Must not know: models, streaming, metrics, files other than a spec file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from adastate_jax.streaming.anchors import POLICIES, StreamConfig

STREAM_FIELDS = tuple(f.name for f in dataclasses.fields(StreamConfig))
# Stream fields an arm may not override: the harness sets them (or they are the arm's policy).
RESERVED_STREAM_FIELDS = ("anchor", "batch_size", "latent_h", "latent_w", "chunk_frames")


@dataclasses.dataclass(frozen=True)
class Arm:
    """A row of the comparison: `name` in the tables, rolled out with anchor `policy` and the
    `config.stream` fields of `stream` (pairs, sorted) replaced."""

    name: str
    policy: str
    stream: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"arm {self.name!r}: unknown policy {self.policy!r}; choose from {POLICIES}")
        for field, _ in self.stream:
            if field not in STREAM_FIELDS:
                raise ValueError(f"arm {self.name!r}: config.stream has no field {field!r}")
            if field in RESERVED_STREAM_FIELDS:
                raise ValueError(
                    f"arm {self.name!r}: config.stream.{field} cannot be set per arm "
                    f"({', '.join(RESERVED_STREAM_FIELDS)} are set by the config / the arm's policy)"
                )

    @property
    def overrides(self) -> dict:
        """`build.streamer` keyword overrides: the policy and the arm's stream fields."""
        return dict(self.stream, anchor=self.policy)


def make_arm(name: str, policy: str, **stream) -> Arm:
    return Arm(name, policy, tuple(sorted(stream.items())))


# LongLive's own layout: a 3-frame sink plus a 6-frame window (the issue-10 reference row).
PRESETS: dict[str, Arm] = {"longlive": make_arm("longlive", "sink", sink_frames=3, window_frames=6)}


def resolve_arm(name: str, defined: Mapping[str, Arm] | None = None) -> Arm:
    """Arm of `name`: `defined[name]` (spec-file arms), a preset, an anchor policy, or
    `BASE_suffix` with BASE a preset or policy (longest match; `adastate_a4` -> adastate)."""
    defined = dict(defined or {})
    if name in defined:
        return defined[name]
    if name in PRESETS:
        return PRESETS[name]
    if name in POLICIES:
        return Arm(name, name)
    bases = sorted((b for b in (*PRESETS, *POLICIES) if name.startswith(b + "_")), key=len, reverse=True)
    if bases:
        base = PRESETS.get(bases[0]) or Arm(bases[0], bases[0])
        return dataclasses.replace(base, name=name)
    raise ValueError(
        f"arm {name!r}: not a policy {POLICIES}, a preset {tuple(PRESETS)}, POLICY_suffix "
        "(e.g. adastate_a4), or an arm defined in the spec file"
    )


@dataclasses.dataclass(frozen=True)
class Model:
    """One model to roll out: its arm, checkpoint dir (None: the shared random initialisation) and
    the training seed that made it (None: unknown / untrained)."""

    arm: Arm
    path: str | None = None
    train_seed: int | None = None


def check_models(models: Sequence[Model]) -> list[Model]:
    """Refuse two models of one arm with the same training seed (their rows would merge) and one
    arm name defined two ways."""
    seen, arms = {}, {}
    for m in models:
        if arms.setdefault(m.arm.name, m.arm) != m.arm:
            raise ValueError(f"--checkpoints: arm {m.arm.name!r} is defined two ways")
        key = (m.arm.name, m.train_seed)
        if key in seen:
            seed = "no @TRAIN_SEED" if m.train_seed is None else f"train_seed {m.train_seed}"
            raise ValueError(
                f"--checkpoints: arm {m.arm.name!r} has two models with {seed} ({seen[key]} and {m.path}); "
                "tag each with its training seed (ARM:DIR@SEED)"
            )
        seen[key] = m.path
    return list(models)


def _train_seed(text: str, where: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"{where}: train seed {text!r} is not an integer") from None
    if seed < 0:
        raise ValueError(f"{where}: train seed {seed} must be >= 0")
    return seed


def parse_checkpoint_list(text: str, check_dirs: bool = True) -> list[Model]:
    """`ARM:DIR[@TRAIN_SEED],...` -> models; every error names the entry."""
    models = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        where = f"--checkpoints entry {item!r}"
        name, sep, rest = item.partition(":")
        if not sep or not rest or not name:
            raise ValueError(f"{where} is not ARM:DIR[@TRAIN_SEED]")
        path, at, seed = rest.rpartition("@") if "@" in rest else (rest, "", "")
        try:
            arm = resolve_arm(name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if check_dirs and not os.path.isdir(path):
            raise ValueError(f"{where}: {path} is not a directory")
        models.append(Model(arm, path, _train_seed(seed, where) if at else None))
    return check_models(models)


def _arm_from_spec(name: str, spec, where: str) -> Arm:
    if not isinstance(spec, Mapping) or "policy" not in spec:
        raise ValueError(f"{where}: arms.{name} must be {{'policy': P, 'stream': {{...}}}}")
    unknown = sorted(set(spec) - {"policy", "stream"})
    if unknown:
        raise ValueError(f"{where}: arms.{name}: unknown keys {unknown} (allowed: policy, stream)")
    stream = spec.get("stream") or {}
    if not isinstance(stream, Mapping):
        raise ValueError(f"{where}: arms.{name}.stream must be a mapping of config.stream fields")
    try:
        return make_arm(name, spec["policy"], **stream)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def parse_checkpoint_spec(spec: Mapping, base_dir: str = "", where: str = "spec", check_dirs: bool = True):
    """A spec-file mapping (see the module docstring) -> models; relative paths join `base_dir`."""
    unknown = sorted(set(spec) - {"arms", "checkpoints"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: arms, checkpoints)")
    arms = {n: _arm_from_spec(n, a, where) for n, a in (spec.get("arms") or {}).items()}
    entries = spec.get("checkpoints")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: 'checkpoints' must be a non-empty list of {{arm, path, train_seed}}")
    models = []
    for i, e in enumerate(entries):
        at = f"{where}: checkpoints[{i}]"
        if not isinstance(e, Mapping) or "arm" not in e or "path" not in e:
            raise ValueError(f"{at} needs 'arm' and 'path'")
        bad = sorted(set(e) - {"arm", "path", "train_seed"})
        if bad:
            raise ValueError(f"{at}: unknown keys {bad} (allowed: arm, path, train_seed)")
        try:
            arm = resolve_arm(str(e["arm"]), arms)
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
        path = os.path.join(base_dir, e["path"]) if not os.path.isabs(e["path"]) else e["path"]
        if check_dirs and not os.path.isdir(path):
            raise ValueError(f"{at}: {path} is not a directory")
        seed = e.get("train_seed")
        models.append(Model(arm, path, None if seed is None else _train_seed(str(seed), at)))
    return check_models(models)


def parse_checkpoints(text: str, check_dirs: bool = True) -> list[Model]:
    """The `--checkpoints` flag: a `.json` spec file, or the inline `ARM:DIR[@TRAIN_SEED],...`."""
    text = text.strip()
    if text.endswith(".json") and ":" not in text:
        if not os.path.isfile(text):
            raise ValueError(f"--checkpoints={text}: no such spec file")
        with open(text) as fh:
            try:
                spec = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"--checkpoints={text}: not valid JSON ({e})") from None
        if not isinstance(spec, Mapping):
            raise ValueError(f"--checkpoints={text}: the spec must be a JSON object")
        return parse_checkpoint_spec(spec, os.path.dirname(text), f"--checkpoints={text}", check_dirs)
    return parse_checkpoint_list(text, check_dirs)


def parse_arms(text: str) -> list[Arm]:
    """`--arms=window,longlive,adastate_a4`: arms rolled out from one random initialisation."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise ValueError(f"--arms={text!r}: no arm given")
    if len(set(names)) != len(names):
        raise ValueError(f"--arms={text!r}: an arm is named twice")
    try:
        return [resolve_arm(n) for n in names]
    except ValueError as e:
        raise ValueError(f"--arms={text!r}: {e}") from None


def parse_int_list(name: str, text: str, minimum: int) -> list[int]:
    """`--NAME=1,2,4` -> [1, 2, 4]; the error names the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}={text!r}: expected comma-separated integers") from None
    if not values or min(values) < minimum:
        raise ValueError(f"--{name}={text!r}: expected integers >= {minimum}")
    return values


def parse_frame_size(text: str) -> tuple[int, int]:
    """`--frame_size=16x16` -> (16, 16)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--frame_size={text!r}: expected HxW, e.g. 16x16") from None
    if height < 1 or width < 1:
        raise ValueError(f"--frame_size={text!r}: sizes must be positive")
    return height, width
