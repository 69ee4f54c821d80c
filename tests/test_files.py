"""adastate_jax/files.py: atomic writes leave the old file or the new one and no temporary file;
fingerprints are stable functions of the content (the values persisted in existing files and
metadata — trajectories' `teacher_params_sha256`, prompt-cache digests, encoder cache identities —
are pinned to what the code that wrote them computed)."""

import hashlib
import json
import os
import stat

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from adastate_jax import files


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if ".tmp-" in f]


def test_atomic_text_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    files.write_text_atomic(path, "old")
    files.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError, match="interrupted"):
        with files.atomic_open(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "new" and _leftovers(tmp_path) == []


def test_atomic_path_hands_a_temporary_sibling_to_a_writer_of_its_own(tmp_path):
    path = tmp_path / "shard.bin"
    with files.atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(files.temp_prefix(path)) and not path.exists()
        with open(tmp, "wb") as fh:  # e.g. an ArrayRecordWriter
            fh.write(b"\x00" * 10)
    assert path.read_bytes() == b"\x00" * 10 and _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_write_json_atomic_is_sorted_indented_with_a_final_newline(tmp_path):
    path = tmp_path / "m.json"
    files.write_json_atomic(path, {"b": [1, 2], "a": "x"})
    text = path.read_text()
    assert text == json.dumps({"a": "x", "b": [1, 2]}, indent=2, sort_keys=True) + "\n"


def test_replace_dir_swaps_a_finished_directory_into_place(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("one", "two"):
        tmp = files.sibling(target, "partial")
        os.makedirs(tmp)
        (tmp_path / os.path.basename(tmp) / "f").write_text(content)
        files.replace_dir(tmp, target)
        assert (target / "f").read_text() == content
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial, no .old left


def test_sha256_file_and_text_are_the_plain_digests(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * 1024 + 7)
    path.write_bytes(data)
    assert files.sha256_file(path, block=1024) == hashlib.sha256(data).hexdigest()
    assert files.sha256_text("é") == hashlib.sha256("é".encode()).hexdigest()


class _Sub(nnx.Module):
    def __init__(self):
        self.k = nnx.Param(jnp.asarray([[1, -2]], jnp.int32))


class _Model(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7)
        self.b = nnx.Param(jnp.asarray([0.5, -1.5], jnp.bfloat16))
        self.c = nnx.Variable(jnp.ones(2))  # not a Param: left out of the params state
        self.sub = _Sub()


# the values the code before `files.py` computed for _Model (launch/make_ode_trajectories.py's
# `params_fingerprint`, text/interface.py's `weights_fingerprint`, text/prompt_cache.py's `_digest`):
# stored trajectories, encoder cache identities and prompt-cache files depend on them
PARAMS_SHA256 = "d42010e5f772c4d4044be20a69a6815954fa1438364fd1bf0b5218354143db4b"
PARAMS_STATS_SHA256_16 = "a9bfbeb34b6ed733"
ARRAY_SHA256 = "c33dae4fd6dad4b0a67aaa6864d335f9c36b33974403ab6a58f5b0dc63b38eee"


def test_params_sha256_is_the_stored_trajectories_fingerprint():
    state = nnx.state(_Model(), nnx.Param)
    assert files.params_sha256(state) == PARAMS_SHA256
    assert files.params_sha256(nnx.to_pure_dict(state)) == PARAMS_SHA256  # State or its pure dict


def test_params_sha256_sees_every_value_dtype_and_name():
    pure = nnx.to_pure_dict(nnx.state(_Model(), nnx.Param))
    base = files.params_sha256(pure)
    w = np.asarray(pure["w"])
    nudged = w.copy()
    nudged[1, 2] = np.nextafter(nudged[1, 2], np.float32(2))  # one ulp
    changes = [
        {**pure, "w": jnp.asarray(nudged)},
        {**pure, "w": jnp.asarray(w.astype(ml_dtypes.bfloat16))},
        {**pure, "w": jnp.asarray(w.reshape(3, 2))},
        {**{k: v for k, v in pure.items() if k != "w"}, "w2": pure["w"]},
    ]
    digests = {files.params_sha256(c) for c in changes}
    assert base not in digests and len(digests) == len(changes)
    reordered = {k: pure[k] for k in reversed(list(pure))}
    assert files.params_sha256(reordered) == base  # insertion order does not matter


def test_cheap_params_fingerprint_and_array_digest_keep_their_values():
    from adastate_jax.text.interface import weights_fingerprint

    model = _Model()
    assert files.params_stats_sha256(nnx.state(model, nnx.Param))[:16] == PARAMS_STATS_SHA256_16
    assert weights_fingerprint(model) == PARAMS_STATS_SHA256_16
    assert files.sha256_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 3) == ARRAY_SHA256


def test_path_stamp_changes_when_a_file_is_replaced(tmp_path):
    (tmp_path / "a").write_text("1")
    before = files.path_stamp(tmp_path)
    assert files.path_stamp(tmp_path) == before
    files.write_text_atomic(tmp_path / "a", "22")
    assert files.path_stamp(tmp_path) != before
