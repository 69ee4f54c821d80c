"""launch/convert.py for the VAE and the UMT5 encoder (the DiT is covered in test_convert_cli.py)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import checkpoint_io, umt5, vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from tests.subproc import child_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = child_env()
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "convert.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_convert_cli_vae_diffusers_layout_matches_direct_loader(tmp_path):
    torch.manual_seed(0)
    m = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False]
    )
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    vcfg = vae.WanVAEConfig.tiny(dim_mult=(1, 2, 2), temporal_downsample=(True, False))
    cfg_file = tmp_path / "vae_cfg.py"
    cfg_file.write_text(
        "import importlib.util, os\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(REPO, 'configs', 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
        "def get_config(arg=None):\n"
        "    c = tiny.get_config(arg)\n"
        "    c.vae.kind = 'wan'\n"
        "    c.vae.wan.update(dict(base_dim=8, num_res_blocks=1, dim_mult=(1, 2, 2), temporal_downsample=(True, False)))\n"
        "    with c.vae.wan.unlocked():\n"
        "        c.vae.wan.latents_mean = c.vae.wan.latents_std = None\n"
        "    return c\n"
    )
    r = _run(
        "--model=vae",
        f"--config={cfg_file}",
        f"--source={tmp_path / 'vae.safetensors'}",
        f"--out={tmp_path / 'out'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layout: diffusers (detected)" in r.stdout
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


def test_convert_cli_umt5_hf_layout_and_missing_key_error(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.UMT5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    m = transformers.UMT5EncoderModel(hf_cfg).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "t5.safetensors"))
    cfg_file = tmp_path / "t5_cfg.py"
    cfg_file.write_text(
        "import importlib.util, ml_collections\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(REPO, 'configs', 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
        "def get_config(arg=None):\n"
        "    c = tiny.get_config(arg)\n"
        "    c.text.umt5 = ml_collections.ConfigDict(dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16))\n"
        "    return c\n"
    )
    r = _run(
        "--model=umt5",
        f"--config={cfg_file}",
        f"--source={tmp_path / 't5.safetensors'}",
        f"--out={tmp_path / 'out'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ucfg = umt5.UMT5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
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
    r = _run(
        "--model=umt5",
        f"--config={cfg_file}",
        f"--source={tmp_path / 'bad.safetensors'}",
        f"--out={tmp_path / 'bad_out'}",
    )
    assert r.returncode != 0
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in r.stderr
    assert not (tmp_path / "bad_out").exists()
