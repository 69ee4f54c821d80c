"""A run directory may be an object-store URL (`--workdir=gs://bucket/run` on a TPU pod): paths stay
URLs (never `CWD/gs:/...`), the loop's line logs survive a resume on a store without appends, the
train checkpointer hands orbax the URL, and a params export goes to the store in place. fsspec's
in-memory filesystem (`memory://`) stands in for GCS; orbax itself is replaced by a recorder where
it would need a real bucket."""

import json
import os
import uuid

import jax.numpy as jnp
import pytest

from adastate_jax import files
from adastate_jax.models import checkpoint_io
from adastate_jax.training import checkpoint as ckpt_lib
from adastate_jax.training import loop


@pytest.fixture
def bucket():
    """A fresh prefix on fsspec's in-memory filesystem."""
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/run"


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.resolve("gs://bucket/run") == "gs://bucket/run"
    assert files.resolve("outputs/run") == os.path.join(str(tmp_path), "outputs", "run")
    files.make_dirs("gs://bucket/run")  # nothing to make on a store, nothing made locally
    assert not os.path.exists(tmp_path / "gs:")


def test_text_objects_round_trip_and_missing_ones_read_as_none(bucket):
    path = f"{bucket}/config.json"
    assert files.read_text(path) is None and not files.exists(path)
    files.write_text(path, '{"a": 1}')
    assert files.read_text(path) == '{"a": 1}' and files.exists(bucket)
    files.remove_tree(bucket)
    assert not files.exists(path)


def test_a_line_log_on_a_store_continues_after_a_resume(bucket):
    path = f"{bucket}/metrics.jsonl"
    first = files.LineLog(path)
    first.write('{"step": 1}\n')
    first.write('{"step": 2}\n')
    first.close()
    resumed = files.LineLog(path)  # a new process: the object is read back, then extended
    resumed.write('{"step": 3}\n')
    resumed.close()
    assert [json.loads(x)["step"] for x in files.read_text(path).splitlines()] == [1, 2, 3]


def test_the_loop_finds_the_stopped_batch_in_a_bad_batches_object(bucket):
    path = f"{bucket}/bad_batches.jsonl"
    loop._append_jsonl(path, dict(step=4, action="skipped", records=[1]))
    loop._append_jsonl(path, dict(step=7, action="stopped", records=[2, 3]))
    assert loop._stopped_at(path, 7)["records"] == [2, 3]
    assert loop._stopped_at(path, 4) is None  # skipped, not stopped
    assert loop._stopped_at(f"{bucket}/absent.jsonl", 7) is None


def test_the_train_checkpointer_gives_orbax_the_url(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, directory, options=None, item_names=()):
            seen["directory"] = directory

    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", Recorder)
    ckpt = ckpt_lib.TrainCheckpointer("gs://bucket/run/checkpoints", keep=2, use_async=False)
    assert ckpt.directory == seen["directory"] == "gs://bucket/run/checkpoints"


def test_a_params_export_to_a_store_is_written_in_place(bucket, monkeypatch):
    saved = []

    class Recorder:
        def save(self, directory, args):
            saved.append(directory)
            files.write_text(f"{directory}/_CHECKPOINT_METADATA", "{}")  # what orbax would commit

        def close(self):
            pass

    monkeypatch.setattr(checkpoint_io, "_checkpointer", Recorder)
    export = f"{bucket}/export"
    params = {"w": jnp.ones((2, 3))}
    out = checkpoint_io.save_params(export, params, '{"seed": 0}', info={"step": 5})
    assert out == export and saved == [f"{export}/params"]
    assert checkpoint_io.read_info(export) == {"step": 5}
    assert json.loads(checkpoint_io.read_config_json(export)) == {"seed": 0}
    assert checkpoint_io.params_dir(export) == f"{export}/params"
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint_io.save_params(export, params)
    checkpoint_io.save_params(export, params, overwrite=True)  # the old export is replaced
    assert checkpoint_io.read_info(export) == {} and len(saved) == 2
