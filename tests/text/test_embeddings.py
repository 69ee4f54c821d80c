"""Precomputed embeddings: file formats, padding, the lookup encoder, errors naming the file."""

import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy_safetensors

from adastate_jax import text


def test_load_embeddings_reads_npy_npz_safetensors_and_pads(tmp_path):
    emb = np.random.RandomState(0).randn(2, 5, 8).astype(np.float32)
    np.save(tmp_path / "one.npy", emb[0])
    np.savez(tmp_path / "many.npz", embeddings=emb, other=np.zeros(3))
    save_numpy_safetensors({"context": emb}, str(tmp_path / "e.safetensors"))
    one = text.load_embeddings(tmp_path / "one.npy", text_len=7, text_dim=8)
    assert one.shape == (1, 7, 8) and np.all(one[0, 5:] == 0)
    np.testing.assert_array_equal(one[0, :5], emb[0])
    np.testing.assert_array_equal(text.load_embeddings(tmp_path / "many.npz"), emb)
    np.testing.assert_array_equal(text.load_embeddings(tmp_path / "e.safetensors", text_len=5), emb)

    text.save_embeddings(tmp_path / "table.npz", emb, ["pan left", "pan right"])
    table = text.PrecomputedTextEncoder.from_file(tmp_path / "table.npz", text_len=6)
    out = table.encode(["pan right", "pan left"])
    assert out.shape == (2, 6, 8) and np.all(out[:, 5:] == 0)
    np.testing.assert_array_equal(out[0, :5], emb[1])
    with pytest.raises(KeyError, match="'pan up'"):
        table.encode(["pan up"])


def test_load_embeddings_errors_name_the_file_and_the_shape(tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((1, 5, 9), np.float32))
    np.save(tmp_path / "long.npy", np.zeros((1, 9, 8), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((40,), np.float32))
    np.save(tmp_path / "nan.npy", np.full((1, 2, 8), np.nan, np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 2, 8)), b=np.zeros((1, 2, 8)))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01")
    cases = {
        "wide.npy": r"wide\.npy.*\(1, 5, 9\).*text_dim 8",
        "long.npy": r"long\.npy.*\(1, 9, 8\).*text_len 6",
        "flat.npy": r"flat\.npy.*\(40,\)",
        "nan.npy": r"nan\.npy.*NaN",
        "two.npz": r"two\.npz.*\['a', 'b'\].*key=",
        "bad.safetensors": r"bad\.safetensors",
    }
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            text.load_embeddings(tmp_path / name, text_len=6, text_dim=8)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        text.load_embeddings(tmp_path / "missing.npy")
