"""Shipped models: trained PanWorld models committed with the code, loaded with their hashes checked.

Owns:
- the registry: every model directory under the shipped root (default `checkpoints/panworld/` in
  the repository; `ADASTATE_SHIPPED_DIR` or a `root=` argument elsewhere), its names (`available`),
  the student shipped for an anchor policy (`default_for`) and the manifest format;
- loading (`load(name) -> (Experiment, build.DiT)`): every file of the model is checked against the
  sha256 its manifest records before anything is read (a missing or changed file raises a
  `ShippedModelError` naming it), the params are loaded through `build.dit` (the one way to load a
  model) and their fingerprint (`files.params_sha256`) compared with the manifest's;
- shipping (`ship`): a params directory (a training run's `WORKDIR/export`, `launch/convert.py
  --out`) copied into the shipped root as a new model, in float32 or bfloat16, with its manifest,
  atomically per model (the old model stays until the new one is complete);
- refreshing from a study's run directory (`plan_from_run`): which export ships as which name,
  with the command that trained it, its steps and its evaluation summary from the run's
  `results.json` (`evaluation_summary`).

A shipped model is a params checkpoint (`models/checkpoint_io.py`: `params/` orbax, `config.json`,
`info.json`) plus `manifest.json`:

    format            1
    name, role        'teacher' | 'student'
    anchor            the anchor policy the model was trained for (`config.stream.anchor`)
    config            the experiment config as JSON: the stream to run it with (policy and arm fields)
    command, steps    how it was trained (`command` as recorded by the run, paths relative)
    params_sha256     `files.params_sha256` of the params as `build.dit` returns them for `config`
    stored_dtype      'float32' | 'bfloat16' (values cast once when shipped)
    num_params
    files             {relative path: {sha256, bytes}} for every file but manifest.json
    evaluation        the run's numbers for this model (see `evaluation_summary`), or null
    source            where it came from: arm, train_seed, export dir (relative), selection rule

Must not know: training (it reads a run's files, never runs one), command lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax import build, files
from adastate_jax import config as config_lib
from adastate_jax.config import Experiment
from adastate_jax.eval.report import portable
from adastate_jax.models import checkpoint_io
from adastate_jax.streaming.anchors import POLICIES

FORMAT = 1
MANIFEST = "manifest.json"
ROOT_ENV = "ADASTATE_SHIPPED_DIR"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = os.path.join(REPO, "checkpoints", "panworld")
NAMES = ("teacher", *POLICIES)  # what a refresh from a study ships
ROLES = ("teacher", "student")
DTYPES = ("float32", "bfloat16")
SUMMARY_METRICS = ("progression", "pull", "return", "code_conf")  # the numbers a manifest keeps
BUDGET_MB = 50.0  # all shipped models together stay well under this


class ShippedModelError(ValueError):
    """A shipped model that cannot be used as it is on disk (the message names the file)."""


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def root_dir(path: str | None = None) -> str:
    """The shipped root: `path`, else `$ADASTATE_SHIPPED_DIR`, else the repository's checkpoints/panworld."""
    return os.path.abspath(path or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def model_dir(name: str, root: str | None = None) -> str:
    return os.path.join(root_dir(root), name)


def available(root: str | None = None) -> list[str]:
    """Names of the models under the shipped root (directories with a manifest), sorted; [] if none."""
    base = root_dir(root)
    if not os.path.isdir(base):
        return []
    return sorted(n for n in os.listdir(base) if os.path.isfile(os.path.join(base, n, MANIFEST)))


def read_manifest(name: str, root: str | None = None) -> dict:
    """The manifest of model `name` (errors name the missing model or the unreadable file)."""
    directory = model_dir(name, root)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        have = available(root)
        raise ShippedModelError(
            f"no shipped model {name!r} in {root_dir(root)} (available: {', '.join(have) or 'none'}; "
            "refresh them with `python launch/ship_models.py --from=RUN_DIR`)"
        )
    if not os.path.isfile(path):
        raise ShippedModelError(f"{path}: missing (every shipped model has a manifest)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ShippedModelError(f"{path}: cannot read the manifest ({e})") from None
    missing = [
        k
        for k in ("format", "name", "role", "anchor", "config", "params_sha256", "files")
        if k not in manifest
    ]
    if missing:
        raise ShippedModelError(f"{path}: manifest lacks {missing}")
    if manifest["format"] != FORMAT:
        raise ShippedModelError(f"{path}: manifest format {manifest['format']} (this code reads {FORMAT})")
    return manifest


def manifests(root: str | None = None) -> dict[str, dict]:
    """{name: manifest} of every available model."""
    return {n: read_manifest(n, root) for n in available(root)}


def default_for(anchor: str = "adastate", root: str | None = None) -> str:
    """The name of the student shipped for anchor policy `anchor` (the one named after the policy
    when there are several)."""
    if anchor not in POLICIES:
        raise ValueError(f"anchor {anchor!r} is not one of {POLICIES}")
    found = [n for n, m in manifests(root).items() if m["role"] == "student" and m["anchor"] == anchor]
    if not found:
        raise ShippedModelError(
            f"no shipped student for anchor {anchor!r} in {root_dir(root)} "
            f"(available: {', '.join(available(root)) or 'none'})"
        )
    return anchor if anchor in found else found[0]


def _fmt_stat(stat) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.2f}"


def describe(root: str | None = None) -> str:
    """A table of the shipped models: role, anchor, steps, stored dtype, and progression / anchor
    pull / return-to-start at the shortest and longest evaluated horizon (from their manifests)."""
    found = manifests(root)
    if not found:
        return f"no shipped models in {root_dir(root)}"
    head = f"{'name':<9} {'role':<8} {'anchor':<9} {'steps':>6} {'dtype':<9}"
    lines = [f"{head} evaluation (progression / pull / return)"]
    for name, m in found.items():
        ev = m.get("evaluation") or {}
        cells = []
        for h in sorted(ev.get("horizons", {}), key=int)[:: max(1, len(ev.get("horizons", {})) - 1)]:
            st = ev["horizons"][h]
            cells.append(
                f"{h}x: {_fmt_stat(st.get('progression'))} / {_fmt_stat(st.get('pull'))} / "
                f"{_fmt_stat(st.get('return'))}"
            )
        steps = "?" if m.get("steps") is None else str(m["steps"])
        lines.append(
            f"{name:<9} {m['role']:<8} {m['anchor']:<9} {steps:>6} {m.get('stored_dtype', '?'):<9} "
            + ("; ".join(cells) or "not evaluated")
        )
    return "\n".join(lines)


def experiment(manifest: Mapping) -> Experiment:
    """The validated `Experiment` a shipped model streams with (its manifest's config)."""
    return config_lib.parse(config_lib.from_json(json.dumps(manifest["config"])))


# --------------------------------------------------------------------------------------------
# Verification and loading
# --------------------------------------------------------------------------------------------


def file_table(directory: str) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under `directory` but the manifest, sorted."""
    table = {}
    for parent, _, names in os.walk(directory):
        for n in names:
            full = os.path.join(parent, n)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel != MANIFEST:
                table[rel] = dict(sha256=files.sha256_file(full), bytes=os.path.getsize(full))
    return dict(sorted(table.items()))


def verify_files(name: str, root: str | None = None, manifest: Mapping | None = None) -> None:
    """Check every file the manifest lists: present, same size and sha256. Raises a
    `ShippedModelError` naming each missing or changed file (all of them)."""
    manifest = manifest or read_manifest(name, root)
    directory = model_dir(name, root)
    problems = []
    for rel, want in manifest["files"].items():
        path = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size, digest = os.path.getsize(path), files.sha256_file(path)
        if digest != want["sha256"] or size != want["bytes"]:
            problems.append(
                f"{path}: corrupted (sha256 {digest[:12]}..., {size} bytes; the manifest records "
                f"{want['sha256'][:12]}..., {want['bytes']} bytes)"
            )
    if problems:
        raise ShippedModelError(
            f"shipped model {name!r} ({os.path.join(directory, MANIFEST)}) fails its hash check:\n  "
            + "\n  ".join(problems)
            + "\n(restore the files from the repository, e.g. `git checkout -- checkpoints/`, or refresh "
            "with `python launch/ship_models.py`)"
        )


def load(
    name: str, root: str | None = None, *, mesh_: jax.sharding.Mesh | None = None
) -> tuple[Experiment, build.DiT]:
    """Shipped model `name` -> (its Experiment, its DiT), every file and the params hash verified."""
    manifest = read_manifest(name, root)
    verify_files(name, root, manifest)
    exp = experiment(manifest)
    directory = model_dir(name, root)
    try:
        dit = build.dit(exp, directory, mesh_=mesh_)
    except Exception as e:  # a file that hashes right but does not load: the manifest is wrong
        raise ShippedModelError(
            f"{directory}: params do not load into the manifest's config.model ({e})"
        ) from e
    digest = files.params_sha256(dit.params)
    if digest != manifest["params_sha256"]:
        raise ShippedModelError(
            f"{os.path.join(directory, checkpoint_io.PARAMS_DIR)}: loaded params hash {digest[:12]}..., "
            f"{os.path.join(directory, MANIFEST)} records {manifest['params_sha256'][:12]}..."
        )
    return exp, dit


def total_bytes(root: str | None = None) -> int:
    """Bytes of every file of every shipped model."""
    base = root_dir(root)
    return (
        sum(os.path.getsize(os.path.join(p, n)) for p, _, ns in os.walk(base) for n in ns)
        if os.path.isdir(base)
        else 0
    )


# --------------------------------------------------------------------------------------------
# Shipping one model
# --------------------------------------------------------------------------------------------


def cast_params(params, dtype: str):
    """Floating leaves of a params state cast to `dtype` (other leaves unchanged)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {DTYPES}")
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.to_pure_dict(params)
    )


def _scrub_paths(directory: str) -> None:
    """Keep the machine's paths out of a model to commit: orbax's commit marker names the absolute
    path it was written to (rewritten relative); any other file naming `directory` is an error."""
    marker = os.path.join(directory, checkpoint_io.PARAMS_DIR, "commit_success.txt")
    if os.path.isfile(marker):
        files.write_text_atomic(marker, f"Checkpoint commit was successful to {checkpoint_io.PARAMS_DIR}")
    needle = os.path.abspath(directory).encode()
    for parent, _, names in os.walk(directory):
        for n in names:
            with open(os.path.join(parent, n), "rb") as fh:
                if needle in fh.read():
                    raise ShippedModelError(f"{os.path.join(parent, n)} names the absolute path {directory}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One model to ship: `params_dir` (an export with config.json) as `name`."""

    name: str
    params_dir: str
    role: str = "student"
    stream: tuple[tuple[str, object], ...] = ()  # config.stream fields to run it with (an arm's)
    anchor: str = ""  # '' -> the export config's stream.anchor
    command: str = ""
    steps: int | None = None
    evaluation: dict | None = None
    source: dict = dataclasses.field(default_factory=dict)


def shipped_config(params_dir: str, plan: Plan, base: str | None = None) -> tuple[dict, Experiment]:
    """The export's config with the plan's stream fields (and anchor) applied, checkpoint path
    cleared and absolute paths made relative: (config as a JSON object, its Experiment)."""
    path = os.path.join(params_dir, checkpoint_io.CONFIG_FILE)
    if not os.path.isfile(path):
        raise ShippedModelError(f"{path}: missing (an export to ship needs its config)")
    cfg, _ = config_lib.load_json(path)
    with cfg.unlocked():
        for field, value in plan.stream:
            cfg.stream[field] = value
        if plan.anchor:
            cfg.stream.anchor = plan.anchor
        cfg.checkpoint.path = ""
    text = portable(config_lib.to_json(cfg), base)
    cfg = config_lib.from_json(text)
    try:
        exp = config_lib.parse(cfg)
    except ValueError as e:
        raise ShippedModelError(f"{path}: {e}") from None
    return json.loads(text), exp


def _same_params(dest: str, sha: str, dtype: str) -> bool:
    """Whether the model shipped at `dest` holds these params (same params sha256 and dtype) in
    files that still match its manifest."""
    try:
        manifest = json.loads(open(os.path.join(dest, MANIFEST)).read())
    except (OSError, ValueError):
        return False
    if manifest.get("params_sha256") != sha or manifest.get("stored_dtype") != dtype:
        return False
    prefix = checkpoint_io.PARAMS_DIR + "/"
    listed = {k[len(prefix) :]: v for k, v in (manifest.get("files") or {}).items() if k.startswith(prefix)}
    present = file_table(os.path.join(dest, checkpoint_io.PARAMS_DIR))  # only the params files hashed
    return bool(listed) and listed == present


def ship(plan: Plan, root: str | None = None, *, dtype: str = "float32", base: str | None = None) -> dict:
    """Copy `plan.params_dir` into the shipped root as `plan.name` (params cast to `dtype`), with
    its manifest. Atomic: built in a hidden sibling, then renamed over any old model. Shipping the
    same params again (a new evaluation summary) keeps the old params files byte for byte, so a
    refresh changes only what changed. -> manifest"""
    if plan.role not in ROLES:
        raise ValueError(f"role {plan.role!r} not in {ROLES}")
    config_json, exp = shipped_config(plan.params_dir, plan, base)
    dit = build.dit(exp, plan.params_dir, allow_random=False)
    dest = model_dir(plan.name, root)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = files.sibling(dest, "shipping")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    info = dict(checkpoint_io.read_info(plan.params_dir), shipped_as=plan.name, stored_dtype=dtype)
    try:
        checkpoint_io.save_params(
            tmp, cast_params(dit.params, dtype), json.dumps(config_json, indent=2, sort_keys=True), info=info
        )
        _scrub_paths(tmp)
        stored = build.dit(exp, tmp, allow_random=False)  # what `load` will see
        sha = files.params_sha256(stored.params)
        if _same_params(dest, sha, dtype):  # keep the old files (orbax names them anew each save)
            shutil.rmtree(os.path.join(tmp, checkpoint_io.PARAMS_DIR))
            shutil.copytree(
                os.path.join(dest, checkpoint_io.PARAMS_DIR), os.path.join(tmp, checkpoint_io.PARAMS_DIR)
            )
        manifest = dict(
            format=FORMAT,
            name=plan.name,
            role=plan.role,
            anchor=exp.stream.anchor,
            config=config_json,
            command=portable(plan.command, base) if plan.command else "",
            steps=plan.steps,
            params_sha256=sha,
            stored_dtype=dtype,
            num_params=int(sum(np.size(x) for x in jax.tree.leaves(nnx.to_pure_dict(stored.params)))),
            files=file_table(tmp),
            evaluation=plan.evaluation,
            source=json.loads(portable(json.dumps(plan.source), base)),
        )
        files.write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
        files.replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def estimate_bytes(params_dir: str, dtype: str) -> int:
    """Bytes the params of `params_dir` take in `dtype` (from the checkpoint's metadata)."""
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    shapes = checkpoint_io.stored_shapes(params_dir)
    return int(sum(int(np.prod(shape)) * itemsize for shape, _ in shapes.values()))


def choose_dtype(plans: Sequence[Plan], budget_mb: float = BUDGET_MB, dtype: str = "auto") -> str:
    """`dtype`, or for 'auto' float32 when every plan's params fit `budget_mb` in it, else
    bfloat16; an error when even the chosen dtype does not fit."""
    options = DTYPES if dtype == "auto" else (dtype,)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {('auto', *DTYPES)}")
    sizes = {}
    for option in options:
        sizes[option] = sum(estimate_bytes(p.params_dir, option) for p in plans) / 2**20
        if sizes[option] <= budget_mb:
            return option
    raise ShippedModelError(
        f"the {len(plans)} models need {', '.join(f'{v:.1f} MB in {k}' for k, v in sizes.items())}: "
        f"over the {budget_mb:g} MB budget of shipped models"
    )


# --------------------------------------------------------------------------------------------
# Refreshing from a study's run directory
# --------------------------------------------------------------------------------------------


def _results_path(run_dir: str) -> str:
    for rel in ("results.json", os.path.join("eval", "results.json")):
        if os.path.isfile(os.path.join(run_dir, rel)):
            return os.path.join(run_dir, rel)
    found = sorted(os.path.join(p, "results.json") for p, _, ns in os.walk(run_dir) if "results.json" in ns)
    if not found:
        raise ShippedModelError(f"{run_dir}: no results.json (the study's evaluation) in the run directory")
    return found[0]


def _row_arm(row: Mapping) -> str:
    return str(row.get("arm", row.get("source", "")))


def _stat(value) -> dict | None:
    if not isinstance(value, Mapping) or value.get("mean") is None:
        return None
    return {k: value.get(k) for k in ("mean", "lo", "hi", "n")}


def evaluation_summary(results: Mapping, arm: str, train_seed=None, results_path: str = "") -> dict | None:
    """The numbers a manifest keeps for one model from an evaluation's results.json: per horizon
    (x `horizon_chunks`), SUMMARY_METRICS as {mean, lo, hi, n}, from the model's own training-seed
    row when the table has one, else the arm's row (pooled over training seeds). None when the
    arm has no row."""
    rows = [r for r in results.get("rows", []) if _row_arm(r) == arm]
    if not rows:
        return None
    seed_rows = [r for r in rows if train_seed is not None and r.get("train_seed") == train_seed]
    pooled = [r for r in rows if r not in seed_rows]
    by_horizon, which = {}, set()
    for h in sorted({int(r["horizon"]) for r in rows}):
        own = [r for r in seed_rows if int(r["horizon"]) == h]
        pool = [r for r in pooled if int(r["horizon"]) == h]
        row = (own or pool)[-1]  # the pooled row follows the per-seed rows
        which.add("train_seed" if own else "arm")
        by_horizon[str(h)] = {m: _stat(row.get(m)) for m in SUMMARY_METRICS}
    return dict(
        results=results_path,
        arm=arm,
        rows_for=f"train_seed {train_seed}" if which == {"train_seed"} else "arm (all its training seeds)",
        horizon_chunks=results.get("horizon_chunks"),
        frames_per_chunk=results.get("frames_per_chunk"),
        horizons=by_horizon,
    )


def _longest_progression(summary: dict | None) -> float:
    if not summary or not summary["horizons"]:
        return -np.inf
    stat = summary["horizons"][max(summary["horizons"], key=int)]["progression"]
    return -np.inf if stat is None or stat["mean"] is None else float(stat["mean"])


def training_command(params_dir: str) -> str:
    """How an export was trained, as its run recorded it: info.json `command`, else
    WORKDIR/command.txt, else the `CMD ...` first line of WORKDIR/train.log; '' if none."""
    info = checkpoint_io.read_info(params_dir)
    if info.get("command"):
        return str(info["command"])
    workdir = os.path.dirname(os.path.abspath(params_dir))
    path = os.path.join(workdir, "command.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    path = os.path.join(workdir, "train.log")
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip()
        if first.startswith("CMD "):
            return first[4:]
    return ""


def _teacher_dir(students: Sequence[Plan], run_dir: str) -> str:
    """The teacher export the students name in `config.train.teacher_path` (relative paths tried
    from the working directory, then the run directory and its parents)."""
    for plan in students:
        _, exp = config_lib.load_json(os.path.join(plan.params_dir, checkpoint_io.CONFIG_FILE))
        path = exp.train.teacher_path if exp.train is not None else ""
        if not path:
            continue
        candidates = [path]
        d = os.path.abspath(run_dir)
        while not os.path.isabs(path) and d != os.path.dirname(d):
            candidates.append(os.path.join(d, path))
            d = os.path.dirname(d)
        for c in candidates:
            if os.path.isdir(os.path.join(c, checkpoint_io.PARAMS_DIR)):
                return c
    return ""


def plan_from_run(
    run_dir: str,
    *,
    results_path: str = "",
    teacher: str = "",
    picks: Mapping[str, str] | None = None,
) -> list[Plan]:
    """What to ship from a study's run directory: `RUN_DIR/models.json` (the evaluation's spec file,
    `eval.arms`) names every trained model with its arm and training seed, `results.json` (found
    in RUN_DIR, RUN_DIR/eval or below) scores them.

    Per anchor policy one student: the arm `picks[policy]` when given, else the arm named after
    the policy, else among the arms of that policy without stream overrides the one with the
    highest progression at the longest horizon; within the arm, the training seed with the highest
    progression at the longest horizon (lowest seed on ties). The teacher: `teacher`, else the
    `config.train.teacher_path` the students were trained from. Policies without a trained arm
    are left out."""
    from adastate_jax.eval import arms as arms_lib

    spec_path = os.path.join(run_dir, "models.json")
    if not os.path.isfile(spec_path):
        raise ShippedModelError(
            f"{spec_path}: missing (the study's list of trained models, eval.arms format)"
        )
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    models = arms_lib.parse_checkpoint_spec(spec, os.path.dirname(spec_path), where=spec_path)
    results_path = results_path or _results_path(run_dir)
    with open(results_path, encoding="utf-8") as fh:
        results = json.load(fh)
    picks = dict(picks or {})
    plans = []
    for policy in POLICIES:
        of_policy = [m for m in models if m.arm.policy == policy]
        arm_names = list(dict.fromkeys(m.arm.name for m in of_policy))
        if policy in picks:
            if picks[policy] not in arm_names:
                raise ShippedModelError(f"--pick {policy}:{picks[policy]}: {spec_path} has arms {arm_names}")
            arm, rule = picks[policy], "picked"
        elif policy in arm_names:
            arm, rule = policy, "the arm named after the policy"
        else:
            plain = [a for a in arm_names if not next(m for m in of_policy if m.arm.name == a).arm.stream]
            if not plain:
                continue
            arm = max(plain, key=lambda a: _longest_progression(evaluation_summary(results, a)))
            rule = "highest progression at the longest horizon among the policy's arms"
        candidates = [m for m in of_policy if m.arm.name == arm]
        best = max(
            candidates,
            key=lambda m: (
                _longest_progression(evaluation_summary(results, arm, m.train_seed)),
                -(m.train_seed or 0),
            ),
        )
        info = checkpoint_io.read_info(best.path)
        plans.append(
            Plan(
                name=policy,
                params_dir=best.path,
                role="student",
                stream=best.arm.stream,
                anchor=policy,
                command=training_command(best.path),
                steps=info.get("step"),
                evaluation=evaluation_summary(results, arm, best.train_seed, portable(results_path)),
                source=dict(
                    arm=arm,
                    train_seed=best.train_seed,
                    export=best.path,
                    selection=f"{rule}; within it, the training seed with the highest progression at "
                    "the longest horizon",
                    evaluation_command=results.get("command", ""),
                ),
            )
        )
    teacher = teacher or _teacher_dir(plans, run_dir)
    if teacher:
        info = checkpoint_io.read_info(teacher)
        plans.insert(
            0,
            Plan(
                name="teacher",
                params_dir=teacher,
                role="teacher",
                command=training_command(teacher),
                steps=info.get("step"),
                evaluation=evaluation_summary(results, "teacher", None, portable(results_path)),
                source=dict(export=teacher, selection="the teacher the students were distilled from"),
            ),
        )
    return plans


__all__ = [
    "DEFAULT_ROOT",
    "MANIFEST",
    "NAMES",
    "Plan",
    "ROOT_ENV",
    "ShippedModelError",
    "available",
    "choose_dtype",
    "estimate_bytes",
    "default_for",
    "describe",
    "evaluation_summary",
    "experiment",
    "file_table",
    "load",
    "manifests",
    "model_dir",
    "plan_from_run",
    "read_manifest",
    "root_dir",
    "ship",
    "total_bytes",
    "training_command",
    "verify_files",
]
