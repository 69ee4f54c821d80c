"""The conversion job of launch/convert.py (`conversions.convert`, in this process) for the VAE and the
UMT5 encoder (the DiT and the command line itself are covered in test_convert_cli.py)."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from adastate_jax.config import cli
from adastate_jax.models import checkpoint_io, conversions, umt5, vae
from adastate_jax.models.convert import ConversionError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
    return cli.load_file(os.path.join(REPO, "configs", "tiny.py"))


def _convert(cfg, model, source, out):
    """conversions.convert as `launch/convert.py --model=MODEL` calls it; returns the printed lines."""
    lines = []
    conversions.convert(cfg, str(source), str(out), model=model, log=lines.append)
    return "\n".join(lines)


def test_convert_vae_diffusers_layout_matches_direct_loader(tmp_path):
    torch.manual_seed(0)
    m = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False]
    )
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    vcfg = vae.WanVAEConfig.tiny(dim_mult=(1, 2, 2), temporal_downsample=(True, False))
    cfg = _tiny()
    cfg.vae.kind = "wan"
    cfg.vae.wan.update(
        dict(base_dim=8, num_res_blocks=1, dim_mult=(1, 2, 2), temporal_downsample=(True, False))
    )
    with cfg.vae.wan.unlocked():
        cfg.vae.wan.latents_mean = cfg.vae.wan.latents_std = None
    printed = _convert(cfg, "vae", tmp_path / "vae.safetensors", tmp_path / "out")
    assert "layout: diffusers (detected)" in printed
    graphdef, abstract = vae.abstract_model(vcfg)
    params = checkpoint_io.load_params(str(tmp_path / "out"), abstract)
    direct = nnx.split(vae.load_wan_vae(str(tmp_path / "vae.safetensors"), vcfg))[1]
    for a, b in zip(jax_leaves(params), jax_leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 2, 2, 16)), jnp.float32)
    out = vae.decode(graphdef, params, z)
    assert out.shape[1] == vcfg.num_frames(2)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


UMT5_SHAPE = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)  # transformers' UMT5Config, our config.text.umt5 and umt5.UMT5Config share these names


def test_convert_umt5_hf_layout_and_missing_key_error(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.UMT5Config(**UMT5_SHAPE, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    m = transformers.UMT5EncoderModel(hf_cfg).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "t5.safetensors"))
    cfg = _tiny()
    cfg.text.umt5 = ml_collections.ConfigDict(UMT5_SHAPE)
    _convert(cfg, "umt5", tmp_path / "t5.safetensors", tmp_path / "out")
    ucfg = umt5.UMT5Config(**UMT5_SHAPE)
    graphdef, abstract = nnx.split(umt5.abstract_encoder(ucfg))
    params = checkpoint_io.load_params(str(tmp_path / "out"), abstract)
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    ours = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.ones((2, 7), jnp.int32))
    with torch.no_grad():
        ref = m(
            input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, 7, dtype=torch.long)
        ).last_hidden_state.numpy()
    assert float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()) < 1e-4
    # a missing layer weight: non-zero exit, the key named, nothing written
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        _convert(cfg, "umt5", tmp_path / "bad.safetensors", tmp_path / "bad_out")
    assert not (tmp_path / "bad_out").exists()
