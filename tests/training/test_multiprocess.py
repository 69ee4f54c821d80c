"""Two processes on localhost (`jax.distributed` over gloo, one CPU device each) train a few steps,
checkpoint (per-host grain iterator states gathered into the checkpoint), and resume."""

import os
import socket
import subprocess
import sys

import pytest

from tests.subproc import child_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(workdir, steps):
    port = _free_port()
    env = child_env(1)
    procs = []
    for i in range(2):
        cmd = [
            sys.executable,
            os.path.join(REPO, "launch", "train.py"),
            f"--config={os.path.join(REPO, 'configs', 'panworld.py')}:teacher",
            f"--workdir={workdir}",
            f"--config.train.steps={steps}",
            "--config.train.ckpt_every=2",
            "--config.train.log_every=1",
            "--config.train.batch_size=4",
            "--config.data.panworld.num_frames=6",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=400)
        outs.append(out)
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.slow
def test_two_process_run_trains_checkpoints_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    out0, _ = _launch_pair(workdir, 4)
    assert "(2 processes)" in out0 and "step 4/4" in out0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert (workdir / "export" / "params").is_dir()
    out0, _ = _launch_pair(workdir, 6)
    assert "resumed from checkpoint step 4" in out0
    assert "step 6/6" in out0
