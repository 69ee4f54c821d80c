"""Shipped models: the registry, loading with hash verification (errors name the file), shipping in
float32 / bfloat16, and refreshing from a study's run directory (`launch/ship_models.py`).

Everything here runs on tiny random models written to a tmp dir (`make_tiny_models`, also used by
tests/test_notebook.py); no placeholder weights are committed.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from adastate_jax import build, files, shipped
from adastate_jax import config as config_lib
from adastate_jax.config import cli
from adastate_jax.models import checkpoint_io
from adastate_jax.streaming.anchors import POLICIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(dim=64, num_heads=4, num_layers=1, ffn_dim=128)  # head dim 16, one layer: seconds


def tiny_config(spec: str = "configs/tiny.py", **fields):
    """A ConfigDict of a repository config file with `fields` ('section.field': value) set."""
    cfg = cli.load_file(os.path.join(REPO, spec))
    with cfg.unlocked():
        for dotted, value in fields.items():
            *parents, last = dotted.split(".")
            node = cfg
            for p in parents:
                node = node[p]
            node[last] = value
    return cfg


def write_export(path: str, cfg, seed: int = 0, step: int = 7) -> str:
    """A random DiT of `cfg` saved as a training export (params + config.json + info.json)."""
    exp = config_lib.parse(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dit = build.dit(exp, seed=seed)
    info = dict(step=step, objective="self_forcing_dmd", ema=True)
    return checkpoint_io.save_params(path, dit.params, config_lib.to_json(cfg), info=info)


def make_tiny_models(root: str, workdir: str, names=shipped.NAMES, **fields) -> str:
    """Ship `names` (teacher and the five policies) of one random configs/tiny.py DiT (with
    `fields` set, e.g. `**{"model.num_layers": 1}`) into `root`."""
    export = write_export(os.path.join(workdir, "export"), tiny_config(**fields))
    for name in names:
        role = "teacher" if name == "teacher" else "student"
        plan = shipped.Plan(name, export, role=role, anchor="" if role == "teacher" else name, steps=7)
        shipped.ship(plan, root, base=workdir)
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    work = tmp_path_factory.mktemp("shipped")
    return make_tiny_models(str(work / "root"), str(work))


def copy_model(tiny_root, tmp_path, name="adastate") -> str:
    root = str(tmp_path / "root")
    shutil.copytree(os.path.join(tiny_root, name), os.path.join(root, name))
    return root


def params_files(root, name="adastate"):
    d = os.path.join(root, name, checkpoint_io.PARAMS_DIR)
    return sorted(
        (os.path.getsize(os.path.join(p, n)), os.path.join(p, n)) for p, _, ns in os.walk(d) for n in ns
    )


# ----------------------------------------------------------------------------------------------
# registry and loading
# ----------------------------------------------------------------------------------------------


def test_registry_lists_every_shipped_model_and_the_student_of_each_anchor(tiny_root):
    assert shipped.available(tiny_root) == sorted(shipped.NAMES)
    for policy in POLICIES:
        assert shipped.default_for(policy, tiny_root) == policy
    assert shipped.read_manifest("teacher", tiny_root)["role"] == "teacher"
    table = shipped.describe(tiny_root)
    assert all(n in table for n in shipped.NAMES) and "not evaluated" in table


def test_load_gives_the_exported_params_under_the_policy_it_was_shipped_for(tiny_root, tmp_path):
    exp, dit = shipped.load("sink", tiny_root)
    assert exp.stream.anchor == "sink"
    original = write_export(str(tmp_path / "again"), tiny_config())  # same config and seed: same params
    reference = build.dit(exp, original)
    assert files.params_sha256(dit.params) == files.params_sha256(reference.params)
    assert shipped.read_manifest("sink", tiny_root)["params_sha256"] == files.params_sha256(dit.params)


def test_unknown_model_and_anchor_without_student_are_refused_naming_what_exists(tiny_root, tmp_path):
    with pytest.raises(shipped.ShippedModelError, match="no shipped model 'nope'.*available: adastate"):
        shipped.load("nope", tiny_root)
    root = copy_model(tiny_root, tmp_path, "window")
    with pytest.raises(shipped.ShippedModelError, match="no shipped student for anchor 'adastate'.*window"):
        shipped.default_for("adastate", root)


def test_a_deleted_params_file_is_named_in_the_error(tiny_root, tmp_path):
    root = copy_model(tiny_root, tmp_path)
    _, victim = params_files(root)[-1]  # the largest file: the array data
    os.remove(victim)
    with pytest.raises(shipped.ShippedModelError) as err:
        shipped.load("adastate", root)
    assert f"{victim}: missing" in str(err.value)


def test_flipped_bytes_in_a_params_file_are_named_in_the_error(tiny_root, tmp_path):
    root = copy_model(tiny_root, tmp_path)
    size, victim = params_files(root)[-1]
    with open(victim, "r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(shipped.ShippedModelError) as err:
        shipped.load("adastate", root)
    assert f"{victim}: corrupted" in str(err.value)
    assert shipped.available(root) == ["adastate"]  # still listed: the error is at load


def test_a_deleted_or_broken_manifest_is_named(tiny_root, tmp_path):
    root = copy_model(tiny_root, tmp_path)
    manifest = os.path.join(root, "adastate", shipped.MANIFEST)
    with open(manifest, "w") as fh:
        fh.write("{not json")
    with pytest.raises(shipped.ShippedModelError, match=f"{manifest}: cannot read"):
        shipped.load("adastate", root)
    os.remove(manifest)
    with pytest.raises(shipped.ShippedModelError, match=f"{manifest}: missing"):
        shipped.read_manifest("adastate", root)


def test_a_manifest_whose_params_hash_disagrees_is_refused(tiny_root, tmp_path):
    root = copy_model(tiny_root, tmp_path)
    path = os.path.join(root, "adastate", shipped.MANIFEST)
    with open(path) as fh:
        manifest = json.load(fh)
    manifest["params_sha256"] = "0" * 64
    files.write_json_atomic(path, manifest)
    with pytest.raises(shipped.ShippedModelError, match="loaded params hash .* records 000000000000"):
        shipped.load("adastate", root)


def test_bfloat16_shipping_stores_rounded_params_and_verifies_them(tiny_root, tmp_path):
    export = write_export(str(tmp_path / "export"), tiny_config())
    root = str(tmp_path / "root")
    manifest = shipped.ship(shipped.Plan("adastate", export, anchor="adastate"), root, dtype="bfloat16")
    assert manifest["stored_dtype"] == "bfloat16"
    stored = checkpoint_io.stored_shapes(os.path.join(root, "adastate"))
    assert {str(d) for _, d in stored.values()} == {"bfloat16"}
    _, dit = shipped.load("adastate", root)
    exp = config_lib.parse(tiny_config())
    full = nnx.to_pure_dict(build.dit(exp, export).params)
    got = nnx.to_pure_dict(dit.params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a).astype(jax.numpy.bfloat16).astype(np.float32), b)
    fp32 = shipped.estimate_bytes(export, "float32")
    assert shipped.estimate_bytes(export, "bfloat16") * 2 == fp32
    plans = [shipped.Plan("adastate", export)]
    assert shipped.choose_dtype(plans, budget_mb=fp32 / 2**20 * 1.01) == "float32"
    assert shipped.choose_dtype(plans, budget_mb=fp32 / 2**20 * 0.9) == "bfloat16"
    with pytest.raises(shipped.ShippedModelError, match="over the .* MB budget"):
        shipped.choose_dtype(plans, budget_mb=fp32 / 2**20 * 0.1)


def test_reshipping_the_same_params_keeps_their_files_and_new_params_replace_them(tiny_root, tmp_path):
    root = copy_model(tiny_root, tmp_path)
    export = shipped.model_dir("adastate", tiny_root)
    before = [(size, os.path.relpath(p, root)) for size, p in params_files(root)]
    manifest = shipped.ship(
        shipped.Plan("adastate", export, anchor="adastate", evaluation={"note": "re-evaluated"}), root
    )
    assert [(size, os.path.relpath(p, root)) for size, p in params_files(root)] == before
    assert manifest["evaluation"] == {"note": "re-evaluated"}
    shipped.load("adastate", root)  # every file still matches the new manifest
    bf16 = shipped.ship(shipped.Plan("adastate", export, anchor="adastate"), root, dtype="bfloat16")
    assert bf16["params_sha256"] != manifest["params_sha256"]
    assert sorted(os.path.relpath(p, root) for _, p in params_files(root)) != sorted(r for _, r in before)
    shipped.load("adastate", root)


def test_shipped_files_name_no_absolute_path_of_the_machine(tiny_root):
    needle = os.path.dirname(tiny_root).encode()
    for parent, _, names in os.walk(tiny_root):
        for n in names:
            with open(os.path.join(parent, n), "rb") as fh:
                assert needle not in fh.read(), os.path.join(parent, n)


# ----------------------------------------------------------------------------------------------
# refresh from a study's run directory
# ----------------------------------------------------------------------------------------------

ARMS = {  # arm -> (policy, {train_seed: progression at the longest horizon})
    "window": ("window", {0: 0.4, 1: 0.2}),
    "full": ("full", {0: 0.1}),
    "sink": ("sink", {0: 0.3}),
    "ema_sink": ("ema_sink", {0: 0.2}),
    "adastate_a2": ("adastate", {0: 0.3}),
    "adastate_a4": ("adastate", {0: 0.5, 1: 0.9}),
    "longlive": ("sink", {0: 0.95}),  # a reference arm with stream overrides: never shipped as `sink`
}


def stat(mean):
    return dict(mean=mean, lo=mean - 0.1, hi=mean + 0.1, n=8)


def fake_run(run: str) -> None:
    """A study's run directory: teacher and student exports, models.json, eval/results.json."""
    teacher = os.path.join(run, "teacher", "export")
    write_export(
        teacher,
        tiny_config("configs/panworld.py:teacher", **{f"model.{k}": v for k, v in TINY_MODEL.items()}),
        step=50,
    )
    student_cfg = tiny_config(
        "configs/panworld.py:dmd",
        **{f"model.{k}": v for k, v in TINY_MODEL.items()},
        **{"train.teacher_path": teacher},
    )
    first = write_export(os.path.join(run, "first", "export"), student_cfg, step=20)
    entries, rows = [], []
    for arm, (policy, seeds) in ARMS.items():
        for seed, progression in seeds.items():
            workdir = os.path.join(run, f"dmd_{arm}_s{seed}")
            shutil.copytree(first, os.path.join(workdir, "export"))
            with open(os.path.join(workdir, "train.log"), "w") as fh:
                fh.write(
                    f"CMD python launch/train.py --config=configs/panworld.py:dmd,{policy} --workdir={workdir}\n"
                )
            entries.append(dict(arm=arm, path=f"dmd_{arm}_s{seed}/export", train_seed=seed))
            for h, scale in ((1, 0.5), (6, 1.0)):
                metrics = dict(progression=stat(progression * scale), pull=stat(0.01), code_conf=stat(0.9))
                rows.append(dict(arm=arm, horizon=h, train_seed=seed, **metrics, **{"return": stat(0.2)}))
        for h in (1, 6):
            if len(seeds) > 1:
                pooled = float(np.mean(list(seeds.values()))) * (0.5 if h == 1 else 1.0)
                rows.append(dict(arm=arm, horizon=h, train_seed="all", progression=stat(pooled)))
    spec = dict(
        arms={"longlive": dict(policy="sink", stream=dict(sink_frames=3, window_frames=6))},
        checkpoints=entries,
    )
    files.write_json_atomic(os.path.join(run, "models.json"), spec)
    os.makedirs(os.path.join(run, "eval"))
    results = dict(
        command="launch/evaluate.py --checkpoints=runs/study/models.json", horizon_chunks=7, rows=rows
    )
    files.write_json_atomic(os.path.join(run, "eval", "results.json"), results)


def test_refresh_from_a_run_directory_ships_teacher_and_best_student_of_each_policy(tmp_path):
    run = str(tmp_path / "run")
    fake_run(run)
    root = str(tmp_path / "checkpoints" / "panworld")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "ship_models.py"), f"--from={run}", f"--root={root}"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert shipped.available(root) == sorted(shipped.NAMES)
    m = shipped.read_manifest("adastate", root)
    assert (m["source"]["arm"], m["source"]["train_seed"]) == ("adastate_a4", 1)
    assert m["source"]["export"] == "run/dmd_adastate_a4_s1/export"
    assert (
        m["command"]
        == "python launch/train.py --config=configs/panworld.py:dmd,adastate --workdir=run/dmd_adastate_a4_s1"
    )
    assert m["steps"] == 20 and m["anchor"] == "adastate" and m["role"] == "student"
    assert m["evaluation"]["rows_for"] == "train_seed 1"
    assert m["evaluation"]["horizons"]["6"]["progression"]["mean"] == pytest.approx(0.9)
    assert m["evaluation"]["horizons"]["1"]["progression"]["mean"] == pytest.approx(0.45)
    assert m["evaluation"]["results"] == "run/eval/results.json"
    assert m["config"]["train"]["teacher_path"] == "run/teacher/export"  # made relative
    sink = shipped.read_manifest("sink", root)
    assert sink["source"]["arm"] == "sink" and sink["config"]["stream"]["window_frames"] == 3
    assert shipped.read_manifest("window", root)["source"]["train_seed"] == 0
    teacher = shipped.read_manifest("teacher", root)
    assert teacher["role"] == "teacher" and teacher["steps"] == 50 and teacher["evaluation"] is None
    for name in shipped.NAMES:
        exp, dit = shipped.load(name, root)
        assert exp.model.num_layers == 1 and dit.source.endswith(name)
    needle = str(tmp_path).encode()
    for parent, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(parent, n), "rb") as fh:
                assert needle not in fh.read(), os.path.join(parent, n)


def test_refresh_refuses_a_run_directory_without_its_model_list(tmp_path):
    with pytest.raises(shipped.ShippedModelError, match="models.json: missing"):
        shipped.plan_from_run(str(tmp_path))
