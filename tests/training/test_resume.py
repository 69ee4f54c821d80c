"""Exact resume and preemption of `launch/train.py` (subprocesses, 2 fake CPU devices).

An uninterrupted run and a run that is SIGKILLed after a checkpoint, SIGTERMed (which must save),
and resumed to the end reach bit-identical train states (every leaf's exact checksum, params, opt
state, EMA and PRNG key) having read the same clips in the same order.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.subproc import child_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12


def _cmd(workdir, *extra, steps=STEPS):
    return [
        sys.executable,
        os.path.join(REPO, "launch", "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'panworld.py')}:teacher",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.batch_size=2",
        "--config.train.ckpt_every=4",
        "--config.train.log_every=1",
        "--config.train.warmup=2",
        "--config.train.log_data_order=True",
        "--config.data.panworld.num_frames=6",
        # a 1-layer, 32-wide DiT: exactness does not depend on the size, compile time does
        "--config.model.num_layers=1",
        "--config.model.dim=32",
        "--config.model.num_heads=2",
        "--config.model.ffn_dim=64",
        *extra,
    ]


def _env(cache_dir):
    return child_env(
        2, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )


def _final_meta(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as fh:
        return json.load(fh)


def _data_order(workdir):
    order = {}
    with open(os.path.join(workdir, "data_order.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            order[row["step"]] = row["index"]  # a re-run step overwrites (same batch expected)
    return [order[s] for s in sorted(order)]


def _wait_for(predicate, proc, timeout, what):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_then_sigterm_then_resume_is_bit_identical_to_uninterrupted(tmp_path):
    env = _env(tmp_path / "jax_cache")
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # 1) SIGKILL right after the step-4 checkpoint is finalised (orbax renames the temp dir)
    p = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (ckpts / "4" / "meta").exists(), p, 240, "checkpoint 4")
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 2) resume; SIGTERM once it has trained past step 5: it must save a checkpoint and exit 0.
    # (a longer config.train.steps keeps it running; the constant lr schedule does not depend on it)
    seen = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0

    def new_metrics_past_step_5():
        with open(run / "metrics.jsonl") as fh:
            fh.seek(seen)
            return any(json.loads(x)["step"] >= 5 for x in fh.read().splitlines() if x.strip())

    p = subprocess.Popen(
        _cmd(run, steps=1000), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(
        new_metrics_past_step_5,
        p,
        240,
        "step 5 after resume",
    )
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from checkpoint step 4" in out, out[-3000:]
    # a config that changed since the checkpoint is resumed, and said so
    assert f"the config differs from the one step 4 was saved with: train.steps: {STEPS} -> 1000" in out, out[
        -3000:
    ]
    assert "SIGTERM: saved checkpoint step" in out, out[-3000:]
    saved = int(out.split("SIGTERM: saved checkpoint step ")[1].split()[0])
    assert 4 < saved < STEPS and (ckpts / str(saved)).exists()
    # 3) resume to the end
    r = subprocess.run(_cmd(run), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from checkpoint step {saved}" in r.stdout
    assert f"train.steps: 1000 -> {STEPS}" in r.stdout

    a, b = _final_meta(ref, STEPS), _final_meta(run, STEPS)
    assert a["names"] == b["names"]
    diff = [k for k in a["checksums"] if a["checksums"][k] != b["checksums"][k]]
    assert not diff, f"leaves differ after resume: {diff[:10]}"
    assert _data_order(ref) == _data_order(run)
    assert len(_data_order(ref)) == STEPS


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
