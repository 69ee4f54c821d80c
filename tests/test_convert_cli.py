"""launch/convert.py end to end, the conversion job behind it (models/conversions.py), and the params
checkpoint it writes (models/checkpoint_io.py).

A tiny random diffusers `WanTransformer3DModel` is saved as safetensors, converted by the CLI in a
subprocess (the one smoke test of the command line), loaded back with `load_params`, and must
reproduce the diffusers output. Overwriting, bad checkpoints, Self-Forcing's EMA and LongLive's
LoRA go through `conversions.convert`, the function the CLI calls, in this process."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.config import cli
from adastate_jax.models import checkpoint_io, conversions, wan, wan_params
from adastate_jax.models.convert import ConversionError, convert_to_state, open_torch_checkpoint

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "launch", "convert.py")

# the tiny diffusers model, and the --config overrides that describe it on top of configs/tiny.py
HEADS, HEAD_DIM, LAYERS, FFN, TEXT_DIM, FREQ_DIM, IN_CH = 2, 16, 2, 48, 24, 32, 4
OVERRIDES = [
    f"--config={REPO}/configs/tiny.py",
    f"--config.model.dim={HEADS * HEAD_DIM}",
    f"--config.model.num_heads={HEADS}",
    f"--config.model.num_layers={LAYERS}",
    f"--config.model.ffn_dim={FFN}",
    f"--config.model.text_dim={TEXT_DIM}",
    f"--config.model.freq_dim={FREQ_DIM}",
    f"--config.model.in_channels={IN_CH}",
    f"--config.model.out_channels={IN_CH}",
    "--config.model.text_len=7",
]


def _diffusers_model():
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=IN_CH,
        out_channels=IN_CH,
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=FFN,
        num_layers=LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    ).eval()
    with torch.no_grad():  # randomise constant-initialised params (norms, tables, zero biases)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _config(**sections):
    """configs/tiny.py with OVERRIDES applied (what the CLI builds from them), plus `sections`."""
    cfg = cli.load_file(os.path.join(REPO, "configs", "tiny.py"))
    for flag in OVERRIDES[1:]:
        key, value = flag.removeprefix("--config.model.").split("=")
        cfg.model[key] = int(value)
    for section, fields in sections.items():
        if isinstance(fields, dict):
            cfg[section].update(fields)
        else:
            cfg[section] = fields
    return cfg


def convert(source, out, cfg=None, **kw):
    """conversions.convert as launch/convert.py calls it; returns (info, printed lines)."""
    lines = []
    info = conversions.convert(cfg or _config(), str(source), str(out), log=lines.append, **kw)
    return info, "\n".join(lines)


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, CLI, *OVERRIDES, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(diffusers model, its state dict, work dir, --out of a successful conversion, CLI result)."""
    work = tmp_path_factory.mktemp("convert")
    m = _diffusers_model()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(work / "model.safetensors"))
    out = work / "converted"
    result = run_cli(f"--source={work / 'model.safetensors'}", f"--out={out}")
    return m, sd, work, out, result


def _loaded_config(out):
    cfg = config_lib.from_json(checkpoint_io.read_config_json(str(out)))
    return cfg, config_lib.parse(cfg).model


def _inputs(b=2, f=3, h=6, w=8):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, f, h, w, IN_CH)).astype(np.float32)  # [B, F, H, W, C]
    t = np.repeat(rng.uniform(0, 1000, (b, 1)), f, axis=1).astype(np.float32)  # [B, F]
    text = rng.standard_normal((b, 7, TEXT_DIM)).astype(np.float32)  # [B, T_text, text_dim]
    return x, t, text


def _diffusers_forward(m, x, t, text):
    with torch.no_grad():
        out = m(
            torch.from_numpy(np.transpose(x, (0, 4, 1, 2, 3)).copy()),
            torch.from_numpy(t[:, 0]),
            torch.from_numpy(text),
            return_dict=False,
        )[0]
    return np.transpose(out.numpy(), (0, 2, 3, 4, 1))  # [B, F, H, W, C]


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_cli_converts_a_diffusers_checkpoint_that_reproduces_diffusers(converted):
    m, _, _, out, result = converted
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layout: diffusers (detected)" in result.stdout
    assert "params: " in result.stdout and "wrote " in result.stdout
    assert sorted(os.listdir(out)) == ["config.json", "info.json", "params"]
    info = checkpoint_io.read_info(str(out))
    assert info["layout"] == "diffusers" and info["model"] == "dit"

    cfg, model_cfg = _loaded_config(out)  # the overrides were applied and saved
    assert (model_cfg.dim, model_cfg.num_heads, model_cfg.ffn_dim, model_cfg.in_channels) == (32, 2, 48, 4)
    assert info["param_count"] == sum(p.numel() for p in m.parameters())
    graphdef, abstract = wan.abstract_model(model_cfg)
    params = checkpoint_io.load_params(str(out), abstract)

    x, t, text = _inputs()
    ref = _diffusers_forward(m, x, t, text)
    ours = wan.forward(graphdef, params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(text), jnp.arange(3))
    err = _rel_err(ours.velocity, ref)
    assert err < 1e-4, f"relative error {err:.2e}"


def test_second_run_refuses_to_overwrite_unless_asked(converted):
    _, _, work, out, first = converted
    assert first.returncode == 0
    before = os.path.getmtime(out / "config.json")
    with pytest.raises(FileExistsError, match=r"already exists; pass --overwrite"):
        convert(work / "model.safetensors", out)
    assert os.path.getmtime(out / "config.json") == before

    # overwrite=True replaces it; this run also converts straight onto a 2x2x2 mesh (--place=mesh)
    cfg = _config(seed=7, mesh=dict(data=2, fsdp=2, tensor=2), stream=dict(batch_size=4))
    convert(work / "model.safetensors", out, cfg, overwrite=True, place="mesh")
    cfg, model_cfg = _loaded_config(out)
    assert cfg.seed == 7 and cfg.mesh.tensor == 2
    assert not [f for f in os.listdir(work) if f.startswith(".")]  # no temp / old dirs left
    abstract = wan.abstract_model(model_cfg)[1]
    direct = convert_to_state(
        open_torch_checkpoint(str(work / "model.safetensors")),
        wan_params.conversion_rules("diffusers"),
        abstract,
        ignore=wan_params.IGNORED_KEYS,
    )
    loaded = checkpoint_io.load_params(str(out), abstract)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(loaded)), jax.tree.leaves(nnx.to_pure_dict(direct))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoint_fails_naming_the_key_and_writes_nothing(converted, tmp_path):
    _, sd, _, _, _ = converted
    bad = dict(sd)
    del bad["blocks.1.attn1.to_q.weight"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "never"
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "bad.safetensors", out)
    assert "cannot convert" in str(e.value)
    assert "blocks/self_attn/q/kernel[1]" in str(e.value) and "blocks.1.attn1.to_q.weight" in str(e.value)
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_self_forcing_checkpoint_with_use_ema(converted, tmp_path):
    """A Self-Forcing training checkpoint ({'generator', 'generator_ema'}, keys prefixed 'model.'):
    use_ema converts generator_ema, the default converts generator."""
    m, sd, _, out, _ = converted
    sf = {
        "generator": {"model." + k: torch.zeros_like(v) for k, v in sd.items()},
        "generator_ema": {"model." + k: v for k, v in sd.items()},
    }
    torch.save(sf, tmp_path / "self_forcing.pt")
    ema_out = tmp_path / "ema"
    info, _ = convert(tmp_path / "self_forcing.pt", ema_out, use_ema=True)
    assert info["use_ema"] is True and checkpoint_io.read_info(str(ema_out))["use_ema"] is True
    _, model_cfg = _loaded_config(ema_out)
    abstract = wan.abstract_model(model_cfg)
    ema = nnx.to_pure_dict(checkpoint_io.load_params(str(ema_out), abstract))
    ref = nnx.to_pure_dict(checkpoint_io.load_params(str(out), abstract))
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_longlive_base_is_refused_alone_and_converts_with_its_lora_merged(tmp_path):
    """LongLive's release layout (models/longlive_base.pt beside models/lora.pt): the base alone
    is refused, naming the LoRA beside it; with a LoRA every adapted Linear is W + alpha/r B A."""
    from tests.models.test_convert import save_longlive_pair

    cfg = wan.WanConfig(
        dim=HEADS * HEAD_DIM,
        num_heads=HEADS,
        num_layers=LAYERS,
        ffn_dim=FFN,
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        in_channels=IN_CH,
        out_channels=IN_CH,
    )
    sd, adapters, base, lora = save_longlive_pair(tmp_path, cfg, rank=4)
    with pytest.raises(ValueError) as e:
        convert(base, tmp_path / "never")
    refused = str(e.value)
    assert "looks like the base generator of a LongLive run" in refused
    assert str(lora) in refused and "--lora=PATH" in refused and "--lora=none" in refused
    assert not (tmp_path / "never").exists()

    out = tmp_path / "longlive"
    info, printed = convert(base, out, lora=str(lora), lora_alpha=2.0, lora_rank=4)
    assert "LoRA: 20 adapters merged" in printed and "layout: original (detected)" in printed
    assert checkpoint_io.read_info(str(out)) == info
    assert info["lora"] == str(lora) and info["lora_adapters"] == 20
    assert info["lora_ranks"] == [4] and info["lora_scales"] == [0.5]
    _, model_cfg = _loaded_config(out)
    params = nnx.to_pure_dict(checkpoint_io.load_params(str(out), wan.abstract_model(model_cfg)[1]))
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.0"):
        a, b = adapters[name]
        i, module = int(name.split(".")[1]), name.split(".", 2)[2]
        path = {"ffn.0": ("ffn_in",)}.get(module, tuple(module.split(".")))
        node = params["blocks"]
        for p in path:
            node = node[p]
        merged = (sd[name + ".weight"].double() + 0.5 * (b.double() @ a.double())).float().numpy().T
        np.testing.assert_array_equal(np.asarray(node["kernel"][i]), merged)


# --------------------------------------------------------------------------------------------
# checkpoint_io on its own
# --------------------------------------------------------------------------------------------


def test_load_params_reports_every_mismatch_naming_the_path(converted):
    _, _, _, out, _ = converted
    _, model_cfg = _loaded_config(out)
    other = wan.WanConfig(**{**model_cfg.__dict__, "num_layers": 3, "cross_attn_norm": False})
    with pytest.raises(checkpoint_io.CheckpointError) as e:
        checkpoint_io.load_params(str(out), wan.abstract_model(other)[1])
    msg = str(e.value)
    assert str(out) in msg
    assert "blocks/norm_cross_scale" in msg  # in the checkpoint, not in the model
    assert "blocks/ffn_in/kernel: stored (2, 32, 48), expected (3, 32, 48)" in msg
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint_io.load_params(str(out / "nowhere"), wan.abstract_model(model_cfg)[1])
    with pytest.raises(checkpoint_io.CheckpointError, match="no params/"):
        checkpoint_io.load_params(str(out.parent), wan.abstract_model(model_cfg)[1])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_load_params_restores_into_shardings_and_casts_dtype(converted):
    _, _, _, out, _ = converted
    _, model_cfg = _loaded_config(out)
    reference = nnx.to_pure_dict(checkpoint_io.load_params(str(out), wan.abstract_model(model_cfg)))
    mesh = shd.make_mesh(2, 2, 2)
    _, abstract = wan.abstract_model(model_cfg)
    shardings = shd.state_shardings(abstract, mesh)
    params = nnx.to_pure_dict(checkpoint_io.load_params(str(out), abstract, shardings))
    q = params["blocks"]["self_attn"]["q"]["kernel"]
    assert q.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(None, "fsdp", "tensor")), 3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fp32 on disk, bf16 requested: cast on restore
    bf16 = wan.WanConfig(**{**model_cfg.__dict__, "param_dtype": "bfloat16"})
    cast = nnx.to_pure_dict(checkpoint_io.load_params(str(out), wan.abstract_model(bf16)))
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype("bfloat16")}


def test_save_params_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    tree = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(4)}
    path = tmp_path / "ckpt"
    checkpoint_io.save_params(str(path), tree, json.dumps({"seed": 1}))
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint_io.save_params(str(path), tree)
    with pytest.raises(ValueError):  # not JSON: fails before anything is written
        checkpoint_io.save_params(str(tmp_path / "other"), tree, "{not json")
    assert not (tmp_path / "other").exists()

    with pytest.raises(TypeError, match=r"\['bad'\] \(object\)"):  # rejected before writing
        checkpoint_io.save_params(str(tmp_path / "half"), {"a": tree["a"], "bad": object()})
    # a failure inside orbax's write, half way through: no trace left
    monkeypatch.setattr(checkpoint_io, "_check_leaves", lambda tree: None)
    with pytest.raises(ValueError, match="Unsupported type"):
        checkpoint_io.save_params(str(tmp_path / "half"), {"a": tree["a"], "bad": object()})
    assert not (tmp_path / "half").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    back = checkpoint_io.load_params(str(path), abstract)  # a plain dict target gives a plain dict
    np.testing.assert_array_equal(np.asarray(back["a"]["kernel"]), np.asarray(tree["a"]["kernel"]))
    assert json.loads(checkpoint_io.read_config_json(str(path))) == {"seed": 1}
