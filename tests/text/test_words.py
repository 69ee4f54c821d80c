"""The PanWorld word-embedding encoder: shapes, zero padding, word order, vocabulary rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import text
from adastate_jax.data import panworld


def test_word_encoder_shapes_zero_padding_and_word_order(words):
    out = words.encode(["A camera pans LEFT.", "pans left then right", ""])
    assert out.shape == (3, 6, 8) and out.dtype == np.float32
    assert np.all(np.any(out[0, :4] != 0, axis=-1)) and np.all(out[0, 4:] == 0)
    assert np.all(out[2] == 0)  # the empty (unconditional) prompt is all padding
    swapped = words.encode(["pans right then left"])[0]
    assert not np.allclose(swapped, out[1])  # positions make word order count
    table = np.asarray(words.table[...])
    pos = np.asarray(words.positions[...])
    np.testing.assert_allclose(out[0, 1], table[2] + pos[1], rtol=1e-6)  # 'camera' is word 2


def test_word_encoder_rejects_unknown_words_and_long_prompts(words):
    with pytest.raises(KeyError, match="'zebra'"):
        words.tokenize(["a zebra pans left"])
    with pytest.raises(ValueError, match="7 words, more than text_len 6"):
        words.tokenize(["a camera pans left then right fast"])
    with pytest.raises(ValueError, match="'Left'"):
        text.WordEmbeddingConfig(vocab=("Left",))


def test_word_encoder_takes_a_pad_first_vocabulary_and_short_id_rows():
    # PanWorld's prompt_vocabulary() starts with "<pad>" and its prompt_ids are 0-padded to 4 words
    cfg = text.WordEmbeddingConfig(vocab=("<pad>", "static", "pan", "left"), text_len=6, text_dim=8)
    enc = text.WordEmbeddingEncoder(cfg, rngs=nnx.Rngs(2))
    assert cfg.vocab == ("static", "pan", "left")
    ids, _ = enc.tokenize(["pan left"])
    np.testing.assert_array_equal(ids[0, :3], [2, 3, 0])  # the same ids as the pad-first list
    short = enc(jnp.asarray([[2, 3, 0, 0]], jnp.int32))
    np.testing.assert_allclose(np.asarray(short), enc.encode(["pan left"]), rtol=1e-6)
    with pytest.raises(ValueError, match="'<pad>'"):
        text.WordEmbeddingConfig(vocab=("pan", "<pad>"))


def test_word_encoder_with_mlp_is_trainable_and_keeps_the_contract():
    cfg = text.WordEmbeddingConfig(vocab=("pan", "left", "right"), text_len=4, text_dim=8, mlp_hidden=16)
    enc = text.WordEmbeddingEncoder(cfg, rngs=nnx.Rngs(1))
    ids, mask = enc.tokenize(["pan left", "right"])
    out = enc(jnp.asarray(ids), jnp.asarray(mask))
    assert out.shape == (2, 4, 8) and np.all(np.asarray(out)[1, 1:] == 0)
    graphdef, params = nnx.split(enc)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(ids)) ** 2))(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_panworld_word_encoder_is_seeded_and_reads_panworld_prompt_ids():
    a = text.panworld_word_encoder(text_len=8, text_dim=16, seed=3)
    b = text.panworld_word_encoder(text_len=8, text_dim=16, seed=3)
    c = text.panworld_word_encoder(text_len=8, text_dim=16, seed=4)
    assert (a.text_len, a.text_dim, a.config.mlp_hidden) == (8, 16, None)
    assert a.cache_identity() == b.cache_identity() != c.cache_identity()
    np.testing.assert_array_equal(np.asarray(a.table[...]), np.asarray(b.table[...]))
    # the ids it gives a PanWorld prompt are the data's `prompt_ids` (zero-padded to text_len)
    for prompt in panworld.camera_prompts():
        ids, _ = a.tokenize([prompt])
        want = panworld.prompt_to_ids(prompt)
        np.testing.assert_array_equal(ids[0], np.pad(want, (0, 8 - len(want))), err_msg=prompt)
