"""`launch/compile_tpu.py` end to end (a subprocess, as a user runs it): a tiny config's streaming
step compiled for a v5e:2x2 slice gives a table row and a JSON report; a topology that libtpu does
not know makes the run exit non-zero naming the stage and the topology, after the stages that
worked. Skipped when libtpu is not importable."""

import json
import os
import subprocess
import sys

import pytest

from adastate_jax import tpu_compile

pytestmark = pytest.mark.skipif(
    not tpu_compile.libtpu_available(),
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>')",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_cli_reports_what_fits_and_names_what_fails(tmp_path):
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "compile_tpu.py"),
        "--config=" + os.path.join(REPO, "configs", "panworld.py"),
        "--topologies=v5e:2x2,v9z:1x1",
        "--stages=step:window",
        "--config.model.dim=256",  # head dim 128: the splash kernel's lane width
        "--config.model.num_heads=2",
        "--config.model.attention=splash",
        "--config.stream.batch_size=4",
        f"--json={out}",
    ]
    # the test process may hold libtpu already (tests/test_tpu_compile.py): let the child load it too
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)  # the suite's 8 fake CPU devices are not needed here
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("step:window")]
    assert any("v5e:2x2" in r for r in rows), proc.stdout
    assert "FAILED: stage 'step:window' on TPU topology 'v9z:1x1'" in proc.stdout
    report = json.loads(out.read_text())
    (row,) = report["reports"]
    assert row["stage"] == "step:window" and row["topology"] == "v5e:2x2" and row["fits"]
    assert row["chips"] == 4 and row["model_flops"] > 0 and row["temp_bytes"] >= 0
    assert len(report["failures"]) == 1 and "v9z:1x1" in report["failures"][0]
    assert report["command"].startswith("python launch/compile_tpu.py --config=")
