"""The toy study end to end (`-m slow`, tens of minutes on a loaded 2-core machine): every stage
through the real commands, the report with its table and verdict, and a re-run that skips it all."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _study(out, *flags):
    return subprocess.run(
        [sys.executable, "launch/study.py", "--profile=toy", f"--out={out}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )


@pytest.mark.slow
def test_toy_study_end_to_end(tmp_path):
    out = tmp_path / "study_toy"
    done = _study(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out / "report"
    study = json.loads((report / "study.json").read_text())
    rows = study["rows"]
    arms = {r["arm"] for r in rows}
    assert {"window", "full", "sink", "ema_sink", "adastate_a2", "adastate_a4", "longlive"} <= arms
    assert all({"arm", "horizon", "train_seed"} <= set(r) for r in rows)
    assert {r["horizon"] for r in rows if r["arm"] == "window"} == {1, 2}
    assert study["verdict"]["text"] and study["ablation"]["winner"]["winner"]
    assert all(b["dmd_steps"] == 2 for b in study["budgets"])
    text = (report / "README.md").read_text()
    assert (
        "Verdict" in text
        and str(tmp_path) not in text
        and str(tmp_path) not in (report / "study.json").read_text()
    )
    assert (report / "metrics_vs_time.png").exists()
    # again: every stage is skipped (only the report is rewritten)
    dry = _study(out, "--dry_run")
    states = [line.split()[0] for line in dry.stdout.splitlines() if line.startswith(" ") and "~" in line]
    assert states and set(states) <= {"done", "always"}, dry.stdout
    again = _study(out)
    assert again.returncode == 0 and "new ->" not in again.stdout and "resume ->" not in again.stdout
    published = tmp_path / "published"
    pub = _study(out, f"--publish={published}")
    assert pub.returncode == 0 and (published / "study.json").exists(), pub.stdout + pub.stderr
