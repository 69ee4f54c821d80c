"""Shared fixture of the text tests: a tiny PanWorld-style word encoder."""

import pytest
from flax import nnx

from adastate_jax import text


@pytest.fixture(scope="module")
def words():
    cfg = text.WordEmbeddingConfig(
        vocab=("a", "camera", "pans", "left", "right", "slowly", "fast", "then", "static"),
        text_len=6,
        text_dim=8,
    )
    return text.WordEmbeddingEncoder(cfg, rngs=nnx.Rngs(0))
