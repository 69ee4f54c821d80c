"""Configs: one typed schema. Every file parses, every section carries exactly its dataclass's
fields, overrides apply, bad values and unknown fields name the field (with the closest one)."""

import dataclasses
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.config import cli, defaults, schema
from adastate_jax.models import attention as attn
from adastate_jax.models import wan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def load(name: str, arg=None):
    return cli.load_file(os.path.join(CONFIG_DIR, name) + (f":{arg}" if arg else ""))


def test_config_files_are_the_expected_ones():
    assert {"tiny.py", "wan_1_3b.py", "wan_14b.py", "panworld.py", "wan_1_3b_train.py"} <= set(CONFIG_FILES)


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_parses_and_carries_every_declared_field(name):
    """The ConfigDicts are generated from the dataclasses: each section has exactly their fields."""
    cfg = load(name)
    exp = config_lib.parse(cfg)
    assert isinstance(exp.model, wan.WanConfig)
    assert set(cfg.keys()) <= set(schema.SECTIONS)
    sections = {
        "model": wan.WanConfig,
        "stream": type(exp.stream),
        "sampler": type(exp.sampler),
        "mesh": shd.MeshConfig,
        "vae": schema.VAEConfig,
        "text": schema.TextConfig,
        "checkpoint": schema.CheckpointConfig,
    }
    if "train" in cfg:
        sections.update(train=schema.TrainConfig, data=schema.DataConfig)
    for section, cls in sections.items():
        assert set(cfg[section].keys()) == _fields(cls), section
    assert set(cfg.vae.patch.keys()) == _fields(type(exp.vae.patch))
    assert set(cfg.vae.wan.keys()) == _fields(type(exp.vae.wan))
    assert exp.sharding_rules == shd.DEFAULT_RULES
    config_lib.check_mesh(exp, ONE_DEVICE)


def test_tiny_config_is_a_small_random_model():
    exp = config_lib.parse(load("tiny.py"))
    model = exp.model
    assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim) == (64, 4, 2, 128)
    assert (model.freq_dim, model.text_dim, model.text_len, model.in_channels) == (32, 32, 8, 16)
    assert model.zero_init_head is False and model.dtype == "float32"
    assert (exp.stream.latent_h, exp.stream.latent_w) == (8, 8)
    assert exp.train is None and exp.data is None


@pytest.mark.parametrize(
    "name,dim,heads,layers,ffn,remat",
    [("wan_1_3b.py", 1536, 12, 30, 8960, "none"), ("wan_14b.py", 5120, 40, 40, 13824, "dots")],
)
def test_wan_configs_have_the_reference_shapes(name, dim, heads, layers, ffn, remat):
    exp = config_lib.parse(load(name))
    model = exp.model
    assert (model.dim, model.num_heads, model.num_layers, model.ffn_dim) == (dim, heads, layers, ffn)
    assert model.head_dim == 128
    assert attn.rope_split(model.head_dim) == (44, 42, 42)
    assert model.patch_size == (1, 2, 2)
    assert (model.in_channels, model.out_channels, model.freq_dim) == (16, 16, 256)
    assert (model.text_dim, model.text_len, model.eps) == (4096, 512, 1e-6)
    assert model.dtype == "bfloat16" and model.remat == remat
    assert (exp.stream.latent_h, exp.stream.latent_w) == (60, 104)  # 480x832 / 8
    assert exp.sampler.denoising_steps == (1000, 750, 500, 250)
    assert exp.sampler.shift == 5.0


@pytest.mark.parametrize(
    "arg,anchor,layout", [("window", "window", "relative"), ("sink,absolute", "sink", "absolute")]
)
def test_config_arg_selects_variant(arg, anchor, layout):
    exp = config_lib.parse(load("tiny.py", arg))
    assert (exp.stream.anchor, exp.stream.time_layout) == (anchor, layout)


def test_panworld_stages_select_objectives():
    assert config_lib.parse(load("panworld.py", "teacher")).train.objective == "flow_matching"
    exp = config_lib.parse(load("panworld.py", "dmd,sink,absolute"))
    assert (exp.train.objective, exp.stream.anchor, exp.stream.time_layout) == (
        "self_forcing_dmd",
        "sink",
        "absolute",
    )
    assert config_lib.parse(load("panworld.py", "ode,stored")).data.source == "ode_trajectories"


def test_panworld_adastate_dmd_defaults_to_the_study_ablation_winner():
    """`dmd,adastate` starts from the window student with state regression (the study's winner);
    every other policy, and plain `dmd`, keeps the ODE init and no state term."""
    ada = config_lib.parse(load("panworld.py", "dmd,adastate")).train
    assert (ada.init_from, ada.init_policy, ada.state_loss) == (
        "outputs/panworld_dmd_window/export",
        "window",
        "regress",
    )
    for variant in ("dmd,window", "dmd,sink", "dmd,ema_sink", "dmd,full", "dmd"):
        tc = config_lib.parse(load("panworld.py", variant)).train
        assert (tc.init_from, tc.init_policy, tc.state_loss) == ("outputs/panworld_ode/export", "", "none")
    # plain `dmd` (anchor adastate by default) turned into another policy stays valid
    cfg = load("panworld.py", "dmd")
    cfg.stream.anchor = "sink"
    assert config_lib.parse(cfg).train.state_loss == "none"


def test_unknown_config_arg_is_rejected_with_the_closest_variant():
    with pytest.raises(ValueError, match=r"'sinc': unknown variant \(did you mean 'sink'\?\)"):
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
    exp = config_lib.parse(cfg)
    assert exp.stream.anchor == "window"
    assert (exp.model.dim, exp.model.num_heads) == (128, 8)
    assert exp.sampler.denoising_steps == (1000.0, 500.0)
    assert exp.sampler.shift == 8.0
    config_lib.check_mesh(exp, {"data": 1, "fsdp": 1, "tensor": 2})


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.num_steps=3", r"config\.train\.num_steps: unknown field \(did you mean 'steps'\?\)"),
        ("model.dimm=128", r"config\.model\.dimm: unknown field \(did you mean 'dim'\?\)"),
        ("trian.steps=3", r"config\.trian: unknown field \(did you mean 'train'\?\)"),
        ("stream.anchr=sink", r"config\.stream\.anchr: unknown field \(did you mean 'anchor'\?\)"),
    ],
)
def test_unknown_override_names_the_field_and_the_closest_one(override, pattern):
    argv = ["prog", f"--config={CONFIG_DIR}/panworld.py:dmd", f"--config.{override}"]
    with pytest.raises(ValueError, match=pattern):
        cli.check_overrides(argv)


def test_known_overrides_pass_the_check():
    cli.check_overrides(["prog", f"--config={CONFIG_DIR}/panworld.py:dmd", "--config.train.steps=3"])


def test_config_json_round_trip():
    cfg = load("wan_1_3b_train.py", "dmd,ema_sink")
    back = config_lib.from_json(config_lib.to_json(cfg))
    assert back.to_dict() == cfg.to_dict()
    assert config_lib.parse(back) == config_lib.parse(cfg)


def _set(cfg, dotted, value):
    """A plain-dict copy of `cfg` with one field set (no ConfigDict type checks in the way)."""
    d = cfg.to_dict()
    *parents, leaf = dotted.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return d


_BAD_RULES = tuple((n, "tensr" if n == "heads" else a) for n, a in shd.DEFAULT_RULES)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("stream.anchor", "sinc", r"config\.stream\.anchor: unknown policy 'sinc'"),
        ("stream.time_layout", "sideways", r"config\.stream\.time_layout"),
        ("stream.first_chunk", "zeros", r"config\.stream\.first_chunk"),
        ("stream.chunk_frames", 0, r"config\.stream\.chunk_frames"),
        ("stream.state_frames", 0, r"config\.stream\.state_frames"),  # adastate needs one
        ("stream.window_frames", 1, r"config\.stream\.window_frames"),  # shorter than a chunk
        ("stream.latent_h", 7, r"config\.stream\.latent_h"),  # patch 2 cannot split 7
        ("stream.ema_decay", 1.5, r"config\.stream\.ema_decay"),
        ("stream.chunk_frames", 2.5, r"config\.stream\.chunk_frames: expected an int"),
        ("sampler.denoising_steps", (1000, 750, 750, 250), r"config\.sampler\.denoising_steps.*decreasing"),
        ("sampler.denoising_steps", (250, 500), r"config\.sampler\.denoising_steps.*decreasing"),
        ("sampler.denoising_steps", (1200, 500), r"config\.sampler\.denoising_steps"),
        ("sampler.denoising_steps", (1000, 0), r"config\.sampler\.denoising_steps"),
        ("sampler.shift", 0.0, r"config\.sampler\.shift"),
        ("sampler.shift", -2.0, r"config\.sampler\.shift"),
        ("model.num_heads", 16, r"config\.model\.num_heads: head dim 4"),  # RoPE cannot split 4
        ("model.num_heads", 5, r"config\.model\.num_heads"),  # 64 % 5
        ("model.num_layers", 2.5, r"config\.model\.num_layers: expected an int"),
        ("model.remat", "sometimes", r"config\.model\.remat: unknown remat policy"),
        ("model.attention", "flash9", r"config\.model\.attention"),
        ("model.dtype", "float8", r"config\.model\.dtype"),
        ("model.patch_size", (2, 2, 2), r"config\.model\.patch_size"),
        ("sharding_rules", _BAD_RULES, r"config\.sharding_rules: .*'tensr'"),
        ("sharding_rules", shd.DEFAULT_RULES[1:], r"config\.sharding_rules: no rule for .*'batch'"),
        (
            "sharding_rules",
            (*shd.DEFAULT_RULES, ("embd", "fsdp")),
            r"config\.sharding_rules: unknown .*'embd'",
        ),
        ("vae.kind", "gan", r"config\.vae\.kind"),
        ("vae.patch.projection", "pca", r"config\.vae\.patch\.projection"),
        ("text.kind", "clip", r"config\.text\.kind"),
        ("mesh.data", 0, r"config\.mesh\.data"),
        ("seed", -1, r"config\.seed"),
    ],
)
def test_bad_config_value_raises_naming_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_lib.parse(_set(load("tiny.py"), field, value))


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("train.objective", "gan", r"config\.train\.objective: unknown 'gan'"),
        ("train.batch_size", 0, r"config\.train\.batch_size"),
        ("train.critic_init", "copy", r"config\.train\.critic_init"),
        ("train.attention", "causal", r"config\.train\.attention"),
        ("train.ode_substeps", 0, r"config\.train\.ode_substeps"),
        ("train.dmd_min_t", 990, r"config\.train\.dmd_min_t"),
        ("train.ema", 1.0, r"config\.train\.ema"),
        ("data.source", "webdataset", r"config\.data\.source"),
        ("data.codec", "jpeg", r"config\.data\.codec"),
        (
            "data.panworld.num_frames",
            10,
            r"config\.data\.panworld\.num_frames: 10 is not a whole number of chunks",
        ),
        ("data.video.short_files", "pad", r"config\.data\.video\.short_files"),
        ("data.panworld.frame_height", 4, r"config\.data\.panworld: frame_height=4"),
    ],
)
def test_bad_training_value_raises_naming_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_lib.parse(_set(load("panworld.py", "dmd"), field, value))


def test_unknown_field_in_a_section_names_it_and_the_closest_field():
    d = load("panworld.py", "dmd").to_dict()
    d["train"]["num_steps"] = 3
    with pytest.raises(
        ValueError, match=r"config\.train\.num_steps: unknown field \(did you mean 'steps'\?\)"
    ):
        config_lib.parse(d)
    d = load("tiny.py").to_dict()
    d["strem"] = {}
    with pytest.raises(ValueError, match=r"config\.strem: unknown section \(did you mean 'stream'\?\)"):
        config_lib.parse(d)


def test_the_two_old_validators_no_longer_disagree():
    """window_frames=1 (shorter than a chunk) is refused and ema_decay=1.0 (a sink that never moves)
    accepted, by the one validator (the dataclass) whoever asks."""
    cfg = load("tiny.py")
    cfg.stream.window_frames = 1
    with pytest.raises(ValueError, match=r"config\.stream\.window_frames"):
        config_lib.parse(cfg)
    cfg = load("tiny.py")
    cfg.stream.ema_decay = 1.0
    assert config_lib.parse(cfg).stream.ema_decay == 1.0


@pytest.mark.parametrize(
    "field,value,mesh,pattern",
    [
        ("model.num_heads", 4, {"data": 1, "fsdp": 1, "tensor": 8}, r"config\.model\.num_heads=4 .*tensor=8"),
        ("model.dim", 64, {"data": 1, "fsdp": 3, "tensor": 1}, r"config\.model\.dim=64 .*fsdp=3"),
    ],
)
def test_mesh_divisibility_names_the_field(field, value, mesh, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_lib.check_mesh(config_lib.parse(_set(load("tiny.py"), field, value)), mesh)


def test_batch_divisibility_names_the_field():
    exp = config_lib.parse(load("tiny.py"))
    with pytest.raises(ValueError, match=r"config\.stream\.batch_size: 3 is not divisible"):
        config_lib.check_batch(exp, {"data": 2, "fsdp": 1, "tensor": 1}, 3, "stream.batch_size")


def test_custom_rules_are_checked_against_every_parameter():
    """A rules table that shards the FFN hidden dim over fsdp: checked per parameter."""
    cfg = load("tiny.py")
    cfg.model.ffn_dim = 96  # divisible by tensor=1 but not by fsdp=64
    cfg.sharding_rules = tuple(
        (n, "fsdp" if n == "mlp" else (None if n == "embed" else a)) for n, a in shd.DEFAULT_RULES
    )
    with pytest.raises(
        ValueError,
        match=r"config\.sharding_rules: model parameter blocks/ffn_in/(bias|kernel) dim \d \(logical 'mlp'",
    ):
        config_lib.check_mesh(config_lib.parse(cfg), {"data": 1, "fsdp": 64, "tensor": 1})


def test_mesh_minus_one_fills_the_devices():
    exp = config_lib.parse(load("tiny.py"))
    assert config_lib.mesh_sizes(exp, device_count=8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shd.MeshConfig(data=2, fsdp=-1).sizes(8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp: at most one"):
        shd.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"config\.mesh\.data: -1 cannot fill 6 devices"):
        shd.MeshConfig(data=-1, fsdp=4).sizes(6)


def test_defaults_are_declared_once():
    """A config file starts from the dataclass defaults: changing a default in the schema is seen
    by a generated section (no second list of defaults)."""
    d = defaults.training_sections(defaults.base_config(defaults.model_section(), latent_h=8, latent_w=8))
    assert d.train.to_dict() == dataclasses.asdict(schema.TrainConfig())
    exp = config_lib.parse(d)
    assert exp.train == schema.TrainConfig() and exp.stream.latent_h == 8


def test_load_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    d = load("tiny.py").to_dict()
    d["stream"]["anchor"] = "sinc"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"{path}: config\.stream\.anchor"):
        config_lib.load_json(str(path))
