"""Configs: every file loads and validates, reference shapes, overrides, bad values name the field."""

import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.models import attention as attn
from adastate_jax.models import wan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "common.py")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def load(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", os.path.join(CONFIG_DIR, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_config_files_are_the_expected_ones():
    assert {"tiny.py", "wan_1_3b.py", "wan_14b.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_and_validates(name):
    cfg = load(name)
    model = config_lib.validate(cfg, mesh=ONE_DEVICE)
    assert isinstance(model, wan.WanConfig)
    assert set(cfg.model.keys()) == {f.name for f in wan.WanConfig.__dataclass_fields__.values()}
    assert set(config_lib.SECTIONS) <= set(cfg.keys())  # every shared section
    assert set(cfg.keys()) - set(config_lib.SECTIONS) <= {"train", "data"}  # training configs add these
    assert cfg.stream.anchor == "adastate"
    assert config_lib.sharding_rules(cfg) == shd.DEFAULT_RULES


def test_tiny_config_is_a_small_random_model():
    model = config_lib.model_config(load("tiny.py"))
    assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim) == (64, 4, 2, 128)
    assert (model.freq_dim, model.text_dim, model.text_len, model.in_channels) == (32, 32, 8, 16)
    assert model.zero_init_head is False and model.dtype == "float32"
    cfg = load("tiny.py")
    assert (cfg.stream.latent_h, cfg.stream.latent_w) == (8, 8)


@pytest.mark.parametrize(
    "name,dim,heads,layers,ffn,remat",
    [("wan_1_3b.py", 1536, 12, 30, 8960, "none"), ("wan_14b.py", 5120, 40, 40, 13824, "dots")],
)
def test_wan_configs_have_the_reference_shapes(name, dim, heads, layers, ffn, remat):
    cfg = load(name)
    model = config_lib.model_config(cfg)
    assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim) == (dim, heads, layers, ffn)
    assert model.head_dim == 128
    assert attn.rope_split(model.head_dim) == (44, 42, 42)
    assert model.patch_size == (1, 2, 2)
    assert (model.in_channels, model.out_channels, model.freq_dim) == (16, 16, 256)
    assert (model.text_dim, model.text_len, model.eps) == (4096, 512, 1e-6)
    assert model.dtype == "bfloat16" and model.remat == remat
    assert (cfg.stream.latent_h, cfg.stream.latent_w) == (60, 104)  # 480x832 / 8
    assert tuple(cfg.sampler.denoising_steps) == (1000, 750, 500, 250)
    assert cfg.sampler.shift == 5.0


@pytest.mark.parametrize(
    "arg,anchor,layout", [("window", "window", "relative"), ("sink,absolute", "sink", "absolute")]
)
def test_config_arg_selects_variant(arg, anchor, layout):
    cfg = load("tiny.py", arg)
    assert (cfg.stream.anchor, cfg.stream.time_layout) == (anchor, layout)
    config_lib.validate(cfg, mesh=ONE_DEVICE)


def test_unknown_config_arg_is_rejected():
    with pytest.raises(ValueError, match="sinc"):
        load("tiny.py", "sinc")


def _parse_flags(argv):
    """Parse a command line the way every launch script does (overrides are found in `sys_argv`)."""
    argv = ["prog", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", os.path.join(CONFIG_DIR, "tiny.py"), flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def test_config_flags_overrides_apply():
    cfg = _parse_flags(
        [
            f"--config={CONFIG_DIR}/tiny.py:window",
            "--config.model.dim=128",
            "--config.model.num_heads=8",
            "--config.sampler.denoising_steps=(1000, 500)",
            "--config.sampler.shift=8",
            "--config.mesh.tensor=2",
            "--config.stream.batch_size=2",
        ]
    )
    assert cfg.stream.anchor == "window"
    assert (cfg.model.dim, cfg.model.num_heads) == (128, 8)
    assert tuple(cfg.sampler.denoising_steps) == (1000, 500)
    assert cfg.sampler.shift == 8.0
    model = config_lib.validate(cfg, mesh={"data": 1, "fsdp": 1, "tensor": 2})
    assert model.dim == 128


def test_config_flags_reject_unknown_fields():
    with pytest.raises((flags.Error, AttributeError, KeyError), match="dimm"):
        _parse_flags(["--config.model.dimm=128"])


def test_config_json_round_trip():
    cfg = load("wan_14b.py", "ema_sink")
    back = config_lib.config_from_json(config_lib.config_to_json(cfg))
    assert back.to_dict() == cfg.to_dict()
    assert config_lib.model_config(back) == config_lib.model_config(cfg)


def _set(cfg, dotted, value):
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


_BAD_RULES = tuple((n, "tensr" if n == "heads" else a) for n, a in shd.DEFAULT_RULES)


@pytest.mark.parametrize(
    "field,value,mesh,pattern",
    [
        ("stream.anchor", "sinc", None, r"config\.stream\.anchor: unknown policy 'sinc'; choose from"),
        ("stream.time_layout", "sideways", None, r"config\.stream\.time_layout"),
        ("stream.first_chunk", "zeros", None, r"config\.stream\.first_chunk"),
        ("stream.chunk_frames", 0, None, r"config\.stream\.chunk_frames"),
        ("stream.state_frames", 0, None, r"config\.stream\.state_frames"),  # adastate needs one
        ("stream.latent_h", 7, None, r"config\.stream\.latent_h"),  # patch 2 cannot split 7
        ("stream.ema_decay", 1.5, None, r"config\.stream\.ema_decay"),
        ("stream.batch_size", 3, {"data": 2, "fsdp": 1, "tensor": 1}, r"config\.stream\.batch_size"),
        (
            "sampler.denoising_steps",
            (1000, 750, 750, 250),
            None,
            r"config\.sampler\.denoising_steps.*decreasing",
        ),
        ("sampler.denoising_steps", (250, 500), None, r"config\.sampler\.denoising_steps.*decreasing"),
        ("sampler.denoising_steps", (1200, 500), None, r"config\.sampler\.denoising_steps.*outside"),
        ("sampler.denoising_steps", (1000, 0), None, r"config\.sampler\.denoising_steps.*outside"),
        ("sampler.shift", 0.0, None, r"config\.sampler\.shift"),
        ("sampler.shift", -2.0, None, r"config\.sampler\.shift"),
        ("model.num_heads", 16, None, r"config\.model\.num_heads: head dim 4"),  # RoPE cannot split 4
        ("model.num_heads", 5, None, r"config\.model\.num_heads"),  # 64 % 5
        ("model.num_heads", 4, {"data": 1, "fsdp": 1, "tensor": 8}, r"config\.model\.num_heads=4 .*tensor=8"),
        ("model.dim", 64, {"data": 1, "fsdp": 3, "tensor": 1}, r"config\.model\.dim=64 .*fsdp=3"),
        ("model.remat", "sometimes", None, r"config\.model\.remat: unknown remat policy"),
        ("model.attention", "flash9", None, r"config\.model\.attention"),
        ("model.dtype", "float8", None, r"config\.model\.dtype"),
        ("model.patch_size", (2, 2, 2), None, r"config\.model\.patch_size"),
        ("sharding_rules", _BAD_RULES, None, r"config\.sharding_rules: .*'tensr'"),
        ("sharding_rules", shd.DEFAULT_RULES[1:], None, r"config\.sharding_rules: no rule for .*'batch'"),
        (
            "sharding_rules",
            (*shd.DEFAULT_RULES, ("embd", "fsdp")),
            None,
            r"config\.sharding_rules: unknown .*'embd'",
        ),
        ("vae.kind", "gan", None, r"config\.vae\.kind"),
        ("text.kind", "clip", None, r"config\.text\.kind"),
        ("mesh.data", 0, None, r"config\.mesh\.data"),
    ],
)
def test_bad_config_value_raises_naming_the_field(field, value, mesh, pattern):
    cfg = load("tiny.py")
    _set(cfg, field, value)
    with pytest.raises(ValueError, match=pattern):
        config_lib.validate(
            cfg, mesh=mesh if mesh is not None else ONE_DEVICE if field != "mesh.data" else None
        )


def test_custom_rules_are_checked_against_every_parameter():
    """A rules table that shards the FFN hidden dim over fsdp: checked per parameter."""
    cfg = load("tiny.py")
    cfg.model.ffn_dim = 96  # divisible by tensor=1 but not by fsdp=64
    cfg.sharding_rules = tuple(
        (n, "fsdp" if n == "mlp" else (None if n == "embed" else a)) for n, a in shd.DEFAULT_RULES
    )
    cfg.stream.batch_size = 64
    with pytest.raises(
        ValueError,
        match=r"config\.sharding_rules: parameter blocks/ffn_in/(bias|kernel) dim \d \(logical 'mlp'",
    ):
        config_lib.validate(cfg, mesh={"data": 1, "fsdp": 64, "tensor": 1})


def test_model_section_type_errors_name_the_field():
    cfg = config_lib.config_from_json(config_lib.config_to_json(load("tiny.py")))
    d = cfg.to_dict()
    d["model"]["num_layers"] = 2.5
    with pytest.raises(ValueError, match=r"config\.model\.num_layers: expected int"):
        config_lib.model_config(config_lib.config_from_json(__import__("json").dumps(d)))
    d["model"]["num_layers"] = 2
    del d["model"]["freq_dim"]
    with pytest.raises(ValueError, match=r"config\.model\.freq_dim: missing"):
        config_lib.model_config(config_lib.config_from_json(__import__("json").dumps(d)))


def test_mesh_minus_one_fills_the_devices():
    cfg = load("tiny.py")
    assert config_lib.mesh_sizes(cfg, device_count=8) == {"data": 8, "fsdp": 1, "tensor": 1}
    cfg.mesh.data, cfg.mesh.fsdp = 2, -1
    assert config_lib.mesh_sizes(cfg, device_count=8) == {"data": 2, "fsdp": 4, "tensor": 1}
    cfg.mesh.data = -1
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp: at most one"):
        config_lib.mesh_sizes(cfg, device_count=8)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_sections_are_what_the_streaming_code_reads(name):
    """config.stream / config.sampler build the streaming dataclasses field for field, and the
    policy names validated here are the ones the streaming code implements."""
    anchors = pytest.importorskip("adastate_jax.streaming.anchors")
    sampler = pytest.importorskip("adastate_jax.streaming.sampler")
    assert config_lib.ANCHOR_POLICIES == anchors.POLICIES
    assert config_lib.TIME_LAYOUTS == anchors.TIME_LAYOUTS
    assert config_lib.FIRST_CHUNK_MODES == anchors.FIRST_CHUNK
    cfg = load(name)
    stream = anchors.StreamConfig.from_dict(cfg.stream.to_dict())
    assert stream.anchor == cfg.stream.anchor
    steps = sampler.SamplerConfig.from_dict(cfg.sampler.to_dict()).denoising_steps
    assert steps == tuple(float(s) for s in cfg.sampler.denoising_steps)
