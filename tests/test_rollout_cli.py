"""launch/rollout.py end to end (the README's main command) and its bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "rollout.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_rollout_cli_writes_video_state_and_report(tmp_path):
    out = tmp_path / "demo.mp4"
    # from another directory: the default config is found next to the script
    r = _run(
        "--num_chunks=4",
        f"--out={out}",
        "--instrument",
        "--show_state",
        "--prompt=pan right fast",
        "--prompt=pan left slow",
        "--prompt_schedule=0:0,2:1",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "randomly initialised" in r.stdout + r.stderr  # honest about the untrained model
    assert out.exists() and out.stat().st_size > 1000
    assert (tmp_path / "demo_state.mp4").exists()
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["num_chunks"] == 4 and report["latent_frames"] == 12 and report["video_frames"] == 12
    assert report["prompt_schedule"] == [0, 0, 1, 1]
    assert len(report["chunk_latency_s"]) == 4
    shares = np.asarray(report["attention_share"])  # [chunk, layer, group]
    assert shares.shape == (4, 2, 3)
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-3)
    assert report["config"]["stream"]["anchor"] == "adastate"


def test_rollout_cli_bad_inputs_are_named(tmp_path):
    r = _run("--num_chunks=3", f"--out={tmp_path / 'a.mp4'}", "--prompt_schedule=5:0")
    assert r.returncode != 0 and "chunk 5 is outside the rollout's 3 chunks" in r.stderr
    r = _run("--num_chunks=3", f"--out={tmp_path / 'b.mp4'}", "--config.stream.anchor=sinc")
    assert r.returncode != 0 and "config.stream.anchor" in r.stderr
    r = _run("--num_chunks=3", f"--out={tmp_path / 'c.mp4'}", "--prompt=pan upward")
    assert r.returncode != 0 and "upward" in r.stderr
