"""Text conditioning: tokenizer path, Wan's zero-padded UMT5 conditioning, the prompt cache,
precomputed embeddings, and the PanWorld word-embedding encoder."""

import io
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file as save_numpy_safetensors
from safetensors.torch import save_file

from adastate_jax.models import text, umt5

TEXT_LEN = 16
CORPUS = [
    "a camera pans slowly to the left over a green field",
    "the red ball rolls across the floor",
    "a cat sits on the mat in the sun",
    "waves crash on a rocky shore at dusk",
    "the city skyline glows at night",
    "un chat dort sur le canapé",
    "ein Hund läuft im Park",
]
PROMPTS = ["a camera pans left", "the cat sits on the mat in the sun at dusk over a field"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A sentencepiece model trained here, laid out like a HF T5 tokenizer directory."""
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "spiece"),
        vocab_size=60,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    os.remove(corpus)
    os.remove(d / "spiece.vocab")
    return str(d)


@pytest.fixture(scope="module")
def umt5_pair(tmp_path_factory):
    """(transformers model, our converted encoder, checkpoint path) from one tiny random config."""
    hf_cfg = transformers.UMT5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(1)
    model = transformers.UMT5EncoderModel(hf_cfg).eval()
    path = str(tmp_path_factory.mktemp("ckpt") / "umt5.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return model, umt5.load_umt5(path, umt5.UMT5Config.from_hf(hf_cfg)), path


def reference_conditioning(model, ids, mask):
    """Wan's recipe in PyTorch: encode with the mask, keep the real tokens, zero the rest."""
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    return h * mask[..., None]


# ---------------------------------------------------------------------------------------------
# Tokenizer and UMT5 conditioning
# ---------------------------------------------------------------------------------------------


def test_tokenizer_files_agree_with_transformers_t5_tokenizer(tokenizer_dir, tmp_path):
    hf = transformers.T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=0)
    want = hf(PROMPTS, padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="np")
    hf.save_pretrained(tmp_path / "fast")  # writes tokenizer.json
    for source in [
        tokenizer_dir,
        os.path.join(tokenizer_dir, "spiece.model"),
        str(tmp_path / "fast/tokenizer.json"),
    ]:
        ids, mask = text.load_tokenizer(source).tokenize(PROMPTS, TEXT_LEN)
        np.testing.assert_array_equal(ids, want["input_ids"], err_msg=source)
        np.testing.assert_array_equal(mask, want["attention_mask"], err_msg=source)
    # T5 conventions: </s> (id 1) ends every sequence, even a truncated one; padding is id 0
    assert ids[0, mask[0].sum() - 1] == 1 and ids[0, -1] == 0
    assert mask[1].all() and ids[1, -1] == 1


def test_encode_prompts_is_wan_conditioning_zero_padded(umt5_pair, tokenizer_dir):
    model, encoder, _ = umt5_pair
    spm = os.path.join(tokenizer_dir, "spiece.model")
    out = text.encode_prompts(encoder, spm, PROMPTS, text_len=TEXT_LEN)
    ids, mask = text.load_tokenizer(spm).tokenize(PROMPTS, TEXT_LEN)
    ref = reference_conditioning(model, ids.astype(np.int64), mask.astype(np.int64))
    assert out.shape == (2, TEXT_LEN, 32) and out.dtype == np.float32
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4
    n0 = int(mask[0].sum())
    assert n0 < TEXT_LEN and np.all(out[0, n0:] == 0) and np.all(np.any(out[0, :n0] != 0, axis=-1))
    batched = text.encode_prompts(encoder, spm, [*PROMPTS, PROMPTS[0]], text_len=TEXT_LEN, batch_size=2)
    np.testing.assert_allclose(batched, np.concatenate([out, out[:1]]), atol=1e-6)
    # Wan's cleaning: runs of whitespace and HTML entities do not change the conditioning
    messy = text.encode_prompts(encoder, spm, ["  a   camera\n pans&#32;left "], text_len=TEXT_LEN)
    np.testing.assert_allclose(messy[0], out[0], atol=1e-6)


def test_encode_prompts_without_tokenizer_file_names_what_is_missing(umt5_pair, tmp_path):
    _, encoder, _ = umt5_pair
    missing = str(tmp_path / "umt5-xxl" / "spiece.model")
    with pytest.raises(FileNotFoundError, match=r"umt5-xxl/spiece\.model"):
        text.encode_prompts(encoder, missing, PROMPTS, text_len=TEXT_LEN)
    with pytest.raises(ValueError, match="needs a tokenizer file"):
        text.encode_prompts(encoder, None, PROMPTS, text_len=TEXT_LEN)


# ---------------------------------------------------------------------------------------------
# Prompt cache
# ---------------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def words():
    cfg = text.WordEmbeddingConfig(
        vocab=("a", "camera", "pans", "left", "right", "slowly", "fast", "then", "static"),
        text_len=6,
        text_dim=8,
    )
    return text.WordEmbeddingEncoder(cfg, rngs=nnx.Rngs(0))


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


# ---------------------------------------------------------------------------------------------
# UMT5 text encoder behind the interface, with the cache
# ---------------------------------------------------------------------------------------------


def test_umt5_text_encoder_from_checkpoint_with_cache(umt5_pair, tokenizer_dir, tmp_path):
    _, encoder, path = umt5_pair
    enc = text.UMT5TextEncoder.from_checkpoint(path, tokenizer_dir, config=encoder.config, text_len=TEXT_LEN)
    assert (enc.text_len, enc.text_dim) == (TEXT_LEN, 32)
    direct = text.encode_prompts(encoder, tokenizer_dir, PROMPTS, text_len=TEXT_LEN)
    cached = text.PromptCache(tmp_path, enc)
    np.testing.assert_allclose(cached.encode(PROMPTS), direct, atol=1e-6)
    np.testing.assert_array_equal(text.PromptCache(tmp_path, enc).encode(PROMPTS), cached.encode(PROMPTS))
    # a randomly initialised encoder is identified by a fingerprint of its weights
    a = text.UMT5TextEncoder(encoder, tokenizer_dir, text_len=TEXT_LEN)
    b = text.UMT5TextEncoder(
        umt5.UMT5Encoder(encoder.config, rngs=nnx.Rngs(5)), tokenizer_dir, text_len=TEXT_LEN
    )
    assert a.cache_identity() != b.cache_identity()


# ---------------------------------------------------------------------------------------------
# PanWorld word-embedding encoder
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Precomputed embeddings
# ---------------------------------------------------------------------------------------------


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
