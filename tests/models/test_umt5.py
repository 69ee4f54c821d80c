"""UMT5 encoder: parity with transformers' UMT5EncoderModel through the converter, conversion errors,
relative-position buckets, the Wan layout, parameter metadata."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from adastate_jax.models import umt5
from adastate_jax.models.convert import ConversionError, DictSource

ALLOWED_AXIS_NAMES = {"vocab", "embed", "heads", "mlp", "layers", "norm", None}


def tiny_hf_config(**overrides):
    base = dict(
        vocab_size=512,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_heads=4,
        num_layers=3,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    base.update(overrides)
    return transformers.UMT5Config(**base)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.UMT5EncoderModel(tiny_hf_config()).eval()


def state_dict_copy(model) -> dict:
    # shared.weight and encoder.embed_tokens.weight are tied: save contiguous clones.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_encoder_matches_transformers_umt5_through_safetensors_conversion(hf_model, tmp_path):
    path = str(tmp_path / "umt5.safetensors")
    save_file(state_dict_copy(hf_model), path)
    enc = umt5.load_umt5(path, umt5.UMT5Config.from_hf(hf_model.config))

    L = 48  # > relative_attention_max_distance: exercises exact, log and clamped buckets
    ids = np.random.RandomState(0).randint(0, 512, (2, L))
    mask = np.ones((2, L), np.int64)
    mask[1, 29:] = 0  # second prompt: 29 real tokens, then padding
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    out = np.asarray(jax.jit(lambda e, i, m: e(i, m))(enc, jnp.asarray(ids), jnp.asarray(mask)))

    assert out.shape == (2, L, 64) and out.dtype == np.float32
    assert rel_err(out[0], ref[0]) < 1e-4
    assert rel_err(out[1, :29], ref[1, :29]) < 1e-4  # padded keys are excluded
    # the mask matters: without it the second prompt's real tokens change
    unmasked = np.asarray(enc(jnp.asarray(ids), None))
    assert rel_err(unmasked[1, :29], ref[1, :29]) > 1e-3


def test_relative_position_buckets_match_transformers(hf_model):
    attn = hf_model.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-700, 700)[None, :]
    for num_buckets, max_distance in [(32, 128), (32, 32), (64, 256)]:
        attn.relative_attention_num_buckets = num_buckets
        attn.relative_attention_max_distance = max_distance
        want = attn._relative_position_bucket(rel).numpy()[0]
        # row 700 of a 701 x 1400 table holds key - query = -700 ... 699
        got = umt5.relative_position_buckets(701, 1400, num_buckets, max_distance)[700]
        np.testing.assert_array_equal(
            got, want, err_msg=f"buckets {num_buckets}, max distance {max_distance}"
        )
    attn.relative_attention_num_buckets = 32
    attn.relative_attention_max_distance = 32


def test_conversion_reports_missing_extra_and_misshaped_keys_at_once(hf_model):
    sd = state_dict_copy(hf_model)
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(4, 4)
    sd["encoder.final_layer_norm.weight"] = torch.ones(65)
    with pytest.raises(ConversionError) as info:
        umt5.load_umt5(DictSource(sd), umt5.UMT5Config.from_hf(hf_model.config))
    msg = str(info.value)
    assert re.search(r"blocks/wo\[1\] <- encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight", msg), msg
    assert "encoder.block.0.layer.0.SelfAttention.extra.weight" in msg
    assert "encoder.final_layer_norm.weight (65,)" in msg and "expected (64,)" in msg
    assert (
        len(info.value.missing) == 1 and len(info.value.unexpected) == 1 and len(info.value.mismatched) == 1
    )


def test_full_seq2seq_checkpoint_converts_encoder_only(hf_model):
    # google/umt5-xxl is a seq2seq checkpoint: the decoder and LM head are skipped, and a lone
    # `shared.weight` (no encoder.embed_tokens copy) provides the embedding.
    sd = state_dict_copy(hf_model)
    del sd["encoder.embed_tokens.weight"]
    sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(64, 64)
    sd["lm_head.weight"] = torch.zeros(512, 64)
    enc = umt5.load_umt5(DictSource(sd), umt5.UMT5Config.from_hf(hf_model.config))
    np.testing.assert_array_equal(np.asarray(enc.embedding[...]), sd["shared.weight"].numpy())


def test_wan_layout_converts_to_the_same_parameters(hf_model):
    sd = state_dict_copy(hf_model)
    renames = [
        (r"shared\.weight", "token_embedding.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm", r"blocks.\1.norm1"),
        (
            r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias",
            r"blocks.\1.pos_embedding.embedding",
        ),
        (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
        (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm", r"blocks.\1.norm2"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0", r"blocks.\1.ffn.gate.0"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1", r"blocks.\1.ffn.fc1"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo", r"blocks.\1.ffn.fc2"),
        (r"encoder\.final_layer_norm", "norm"),
    ]
    wan_sd = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue
        for pat, rep in renames:
            k = re.sub(pat, rep, k)
        wan_sd[k] = v
    cfg = umt5.UMT5Config.from_hf(hf_model.config)
    from_hf = nnx.to_pure_dict(nnx.state(umt5.load_umt5(DictSource(sd), cfg)))
    from_wan = nnx.to_pure_dict(nnx.state(umt5.load_umt5(DictSource(wan_sd), cfg, layout="wan")))
    jax.tree.map(np.testing.assert_array_equal, from_hf, from_wan)


def test_umt5_xxl_defaults_and_logical_axis_names():
    abstract = umt5.abstract_encoder(umt5.UMT5Config())  # shapes only, no memory
    _, state = nnx.split(abstract)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}
    assert shapes["embedding"] == (256384, 4096)
    assert shapes["blocks/q"] == (24, 4096, 4096)
    assert shapes["blocks/relative_bias"] == (24, 32, 64)  # one bias table per layer (UMT5)
    assert shapes["blocks/wi_0"] == (24, 4096, 10240)
    assert shapes["blocks/wo"] == (24, 10240, 4096)
    assert shapes["final_norm"] == (4096,)
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape), path
        assert set(names) <= ALLOWED_AXIS_NAMES, (path, names)
