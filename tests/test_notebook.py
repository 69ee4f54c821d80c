"""notebooks/adastate_demo.ipynb runs top to bottom headlessly (nbclient) and is committed without
outputs. It uses the shipped models when checkpoints/panworld/ has them, else tiny random models
shipped into a tmp dir by the test (`ADASTATE_SHIPPED_DIR`), and 2 chunks per stream
(`ADASTATE_DEMO_CHUNKS`)."""

import os

import pytest

from adastate_jax import demo, shipped
from adastate_jax.streaming.anchors import POLICIES
from tests.subproc import child_env
from tests.test_shipped import make_tiny_models

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
pytest.importorskip("ipykernel", reason="the test extra installs ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "adastate_demo.ipynb")


def read():
    with open(NOTEBOOK, encoding="utf-8") as fh:
        return nbformat.read(fh, as_version=4)


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_notebook_is_committed_valid_and_without_outputs():
    nb = read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    if shipped.available(shipped.DEFAULT_ROOT):
        root = shipped.DEFAULT_ROOT  # the committed models
    else:
        root = make_tiny_models(str(tmp_path / "models"), str(tmp_path), **{"model.num_layers": 1})
    monkeypatch.setenv(shipped.ROOT_ENV, root)
    monkeypatch.setenv("ADASTATE_DEMO_CHUNKS", "2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name, value in child_env().items():  # the kernel: one CPU device, the suite's compile flags
        if name != "PYTHONPATH":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for name in ("ADASTATE_WAN_WEIGHTS", "ADASTATE_WAN_VAE", "ADASTATE_UMT5", "ADASTATE_UMT5_TOKENIZER"):
        monkeypatch.delenv(name, raising=False)
    nb = read()
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = "\n".join(text_of(c) for c in code)
    assert "decoded camera position: x" in outputs and "'pan left medium'" in outputs
    compared = next(text_of(c) for c in code if "demo.compare(" in c.source).splitlines()
    policies = demo.shipped_policies(root)  # all five with the tiny models; the committed ones
    assert set(policies) <= set(POLICIES) and len(policies) >= 2
    assert all(any(line.startswith(p) for line in compared) for p in policies)  # a row per shipped policy
    assert "skipped (no weights given)" in outputs
    shown = sum(1 for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {}))
    assert shown >= 4  # the videos and images were displayed
