"""The prompt cache: hits skip the encoder, files survive a new cache object, damage is detected."""

import io
import logging
import os

import numpy as np
import pytest

from adastate_jax import text


class CountingEncoder:
    """A TextEncoder that records every prompt it is asked to encode."""

    def __init__(self, inner, identity="counting-v1"):
        self.inner, self.calls, self.identity = inner, [], identity
        self.text_len, self.text_dim = inner.text_len, inner.text_dim

    def encode(self, prompts):
        self.calls.extend(prompts)
        return self.inner.encode(prompts)

    def cache_identity(self):
        return self.identity


def test_prompt_cache_hits_skip_the_encoder_and_survive_a_new_cache_object(words, tmp_path):
    enc = CountingEncoder(words)
    cache = text.PromptCache(tmp_path / "cache", enc)
    assert isinstance(cache, text.TextEncoder) and isinstance(words, text.TextEncoder)
    prompts = ["a camera pans left", "pans right fast", "a camera pans left"]
    first = cache.encode(prompts)
    assert enc.calls == ["a camera pans left", "pans right fast"]  # each distinct prompt once
    np.testing.assert_array_equal(first, words.encode(prompts))
    assert (cache.hits, cache.misses) == (0, 2)

    again = text.PromptCache(tmp_path / "cache", enc).encode(["pans right fast", "a camera pans left"])
    assert enc.calls == ["a camera pans left", "pans right fast"]  # not called again
    np.testing.assert_array_equal(again, first[[1, 0]])
    assert not [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".npz")]  # no temp files left

    # another encoder identity (other weights / config) is another key: a miss
    other = CountingEncoder(words, identity="counting-v2")
    text.PromptCache(tmp_path / "cache", other).encode(["pans right fast"])
    assert other.calls == ["pans right fast"]


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "other_prompt", "garbage", "edited_data"])
def test_prompt_cache_detects_a_corrupt_file_and_recomputes_it(words, tmp_path, caplog, damage):
    enc = CountingEncoder(words)
    cache = text.PromptCache(tmp_path, enc)
    good = cache.encode(["a camera pans left", "static"])
    path = cache.path("a camera pans left")
    raw = open(path, "rb").read()
    if damage == "truncate":
        bad = raw[: len(raw) // 2]
    elif damage == "flip_bytes":  # inside the stored embedding data
        arr = np.load(path)["embedding"]
        at = raw.index(arr.tobytes()) + 5
        bad = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    elif damage == "other_prompt":  # a valid file, but not this prompt's
        bad = open(cache.path("static"), "rb").read()
    elif damage == "edited_data":  # a valid zip whose data no longer matches its digest
        with np.load(path) as f:
            fields = {k: f[k] for k in f.files}
        fields["embedding"] = fields["embedding"] + 1.0
        buf = io.BytesIO()
        np.savez(buf, **fields)
        bad = buf.getvalue()
    else:
        bad = b"not a cache file"
    with open(path, "wb") as fh:
        fh.write(bad)

    enc.calls.clear()
    fresh = text.PromptCache(tmp_path, enc)
    with caplog.at_level(logging.WARNING):
        out = fresh.encode(["a camera pans left"])
    assert enc.calls == ["a camera pans left"] and fresh.corrupt == 1
    assert os.path.basename(path) in caplog.text
    np.testing.assert_array_equal(out[0], good[0])
    enc.calls.clear()
    text.PromptCache(tmp_path, enc).encode(["a camera pans left"])  # rewritten: a clean hit now
    assert enc.calls == []
