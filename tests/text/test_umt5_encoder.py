"""UMT5 conditioning: the tokenizer files agree with transformers, Wan's zero-padded conditioning,
and `UMT5TextEncoder` behind the interface with the prompt cache."""

import os

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from adastate_jax import text
from adastate_jax.models import umt5

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
