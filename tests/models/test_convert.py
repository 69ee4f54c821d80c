"""Reading PyTorch checkpoints (models/convert.py): LongLive's separate LoRA file merged into its
base generator, FSDP wrapper names in EMA keys, a LongLive base recognised when its LoRA is left
out, and bad files (truncated safetensors, a `.pt` without tensors) named in their errors.

The checkpoints are written here in LongLive v1's formats, as its code saves them: the base
generator `{'generator': {'model.<Wan2.1 key>': ...}, 'critic': ..., 'step': ...}`, EMA weights with
FSDP's `_fsdp_wrapped_module.` inside the keys, and the LoRA file `{'generator_lora': <PEFT state
dict>, 'critic_lora': ..., 'step': ...}` whose keys are `base_model.model.<module>.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank], for every Linear of every attention block."""

import json
import os

import jax
import numpy as np
import pytest

from adastate_jax.models import wan, wan_params
from adastate_jax.models.convert import (
    ConversionError,
    convert_to_state,
    longlive_base_evidence,
    lora_scaling,
    open_torch_checkpoint,
)

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

CFG = wan.WanConfig.tiny(
    dim=32, num_heads=2, num_layers=2, ffn_dim=48, text_dim=16, freq_dim=16, in_channels=4
)
# the Linear layers of a Wan2.1 attention block: LongLive puts a LoRA on each of them
BLOCK_LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def original_wan_state_dict(cfg: wan.WanConfig, seed: int = 0) -> dict:
    """Random weights under Wan2.1's own parameter names (its `WanModel.state_dict()`), [out, in]."""
    g = torch.Generator().manual_seed(seed)
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.in_channels
    pt, ph, pw = cfg.patch_size
    shapes = {
        "patch_embedding.weight": (d, c, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (pt * ph * pw * cfg.out_channels, d),
        "head.head.bias": (pt * ph * pw * cfg.out_channels,),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes[f"{b}{attn}.{p}.weight"] = (d, d)
                shapes[f"{b}{attn}.{p}.bias"] = (d,)
            shapes[f"{b}{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}{attn}.norm_k.weight"] = (d,)
        shapes |= {
            f"{b}norm3.weight": (d,),
            f"{b}norm3.bias": (d,),
            f"{b}ffn.0.weight": (f, d),
            f"{b}ffn.0.bias": (f,),
            f"{b}ffn.2.weight": (d, f),
            f"{b}ffn.2.bias": (d,),
            f"{b}modulation": (1, 6, d),
        }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def longlive_lora(cfg: wan.WanConfig, rank: int, seed: int = 1) -> dict:
    """A PEFT state dict as LongLive's `get_peft_model_state_dict` saves it: module name -> (A, B)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    out = {}
    for i in range(cfg.num_layers):
        for lin in BLOCK_LINEARS:
            o, n = sizes.get(lin, (cfg.dim, cfg.dim))
            out[f"blocks.{i}.{lin}"] = (torch.randn(rank, n, generator=g), torch.randn(o, rank, generator=g))
    return out


def peft_keys(adapters: dict) -> dict:
    sd = {}
    for name, (a, b) in adapters.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = a
        sd[f"base_model.model.{name}.lora_B.weight"] = b
    return sd


def save_longlive_pair(folder, cfg, rank=3, seed=0):
    """LongLive's release layout: models/longlive_base.pt beside models/lora.pt."""
    sd = original_wan_state_dict(cfg, seed)
    adapters = longlive_lora(cfg, rank, seed + 1)
    base = folder / "longlive_base.pt"
    lora = folder / "lora.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}, "critic": {}, "step": 3}, base)
    critic = peft_keys({k: (0 * a, 0 * b) for k, (a, b) in adapters.items()})
    torch.save({"generator_lora": peft_keys(adapters), "critic_lora": critic, "step": 3}, lora)
    return sd, adapters, base, lora


def convert_wan(source, cfg=CFG):
    _, abstract = wan.abstract_model(cfg)
    return convert_to_state(
        source, wan_params.conversion_rules("original"), abstract, ignore=wan_params.IGNORED_KEYS
    )


def merged_kernel(w, a, b, scale):
    """PEFT's merge W + scale * B @ A, in float64 and rounded once; as our kernel [in, out]."""
    return (w.double() + scale * (b.double() @ a.double())).float().numpy().T


def our_kernel(params, name):
    """Our stacked kernel for torch module 'blocks.<i>.<linear>', layer i."""
    i, lin = int(name.split(".")[1]), ".".join(name.split(".")[2:])
    path = {"ffn.0": ["ffn_in"], "ffn.2": ["ffn_out"]}.get(lin) or lin.split(".")
    node = params["blocks"]
    for p in path:
        node = node[p]
    return np.asarray(node["kernel"][...][i])


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (6.0, 2.0)])
def test_longlive_base_and_lora_file_convert_to_w_plus_scaled_b_a(tmp_path, alpha, scale):
    sd, adapters, base, lora = save_longlive_pair(tmp_path, CFG, rank=3)
    src = open_torch_checkpoint(str(base), lora=str(lora), lora_alpha=alpha)
    assert src.summary()["lora_adapters"] == CFG.num_layers * len(BLOCK_LINEARS) == 20
    assert src.summary()["lora_ranks"] == [3] and src.summary()["lora_scales"] == [scale]
    params = convert_wan(src)
    for name, (a, b) in adapters.items():
        np.testing.assert_array_equal(
            our_kernel(params, name), merged_kernel(sd[name + ".weight"], a, b, scale)
        )
    # what LoRA does not touch is the base: biases, norms, modulation, embeddings, head
    plain = convert_wan(open_torch_checkpoint(str(base)))
    for path in [("blocks", "self_attn", "q", "bias"), ("blocks", "modulation"), ("head", "kernel")]:
        ours, ref = params, plain
        for p in path:
            ours, ref = ours[p], ref[p]
        np.testing.assert_array_equal(np.asarray(ours[...]), np.asarray(ref[...]))
    np.testing.assert_array_equal(
        np.asarray(plain["blocks"]["self_attn"]["q"]["kernel"][...][0]),
        sd["blocks.0.self_attn.q.weight"].numpy().T,
    )


def test_lora_rank_flag_is_checked_and_peft_adapter_config_gives_alpha(tmp_path):
    sd, adapters, base, _ = save_longlive_pair(tmp_path, CFG, rank=4)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    save_file(peft_keys(adapters), str(adapter_dir / "adapter_model.safetensors"))
    with open(adapter_dir / "adapter_config.json", "w") as fh:
        json.dump({"r": 4, "lora_alpha": 2, "use_rslora": False}, fh)
    src = open_torch_checkpoint(str(base), lora=str(adapter_dir))
    assert src.summary()["lora_scales"] == [0.5]
    assert src.summary()["lora_scale_origin"].endswith("adapter_config.json")
    name = "blocks.1.ffn.2"
    np.testing.assert_array_equal(
        our_kernel(convert_wan(src), name), merged_kernel(sd[name + ".weight"], *adapters[name], 0.5)
    )
    # given numbers win over the file; rsLoRA scales by alpha / sqrt(rank)
    assert lora_scaling(str(adapter_dir), alpha=8.0).scale_for(4) == 2.0
    assert lora_scaling(str(adapter_dir), scale=3.0).scale_for(4) == 3.0
    with open(adapter_dir / "adapter_config.json", "w") as fh:
        json.dump({"r": 4, "lora_alpha": 2, "use_rslora": True}, fh)
    assert lora_scaling(str(adapter_dir)).scale_for(4) == 1.0
    with pytest.raises(ConversionError, match=r"rank 4 \(lora_A \(4, 32\)\); expected rank 8"):
        open_torch_checkpoint(str(base), lora=str(tmp_path / "lora.pt"), lora_rank=8)


def test_longlive_ema_keys_with_fsdp_wrapper_names_convert_like_plain_keys(tmp_path):
    sd = original_wan_state_dict(CFG)

    def fsdp_name(k):  # LongLive's EMA: named_parameters() of a model whose blocks FSDP wrapped
        if k.startswith("blocks."):
            i, rest = k[len("blocks.") :].split(".", 1)
            return f"model.blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        return "model." + k

    torch.save(
        {
            "generator": {"model." + k: 0 * v for k, v in sd.items()},
            "generator_ema": {fsdp_name(k): v for k, v in sd.items()},
        },
        tmp_path / "run.pt",
    )
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, tmp_path / "plain.pt")
    ema = convert_wan(open_torch_checkpoint(str(tmp_path / "run.pt"), use_ema=True))
    plain = convert_wan(open_torch_checkpoint(str(tmp_path / "plain.pt")))
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # --use_ema on a checkpoint without EMA weights is an error, not a silent fallback
    with pytest.raises(ValueError, match=r"plain\.pt.*generator_ema"):
        open_torch_checkpoint(str(tmp_path / "plain.pt"), use_ema=True)


def test_lora_problems_are_reported_together_naming_what_is_accepted(tmp_path):
    sd, adapters, base, _ = save_longlive_pair(tmp_path, CFG, rank=3)
    bad = peft_keys(adapters)
    bad["base_model.model.blocks.0.self_attn.gate.lora_A.weight"] = torch.zeros(3, 32)  # no such Linear
    bad["base_model.model.blocks.0.self_attn.gate.lora_B.weight"] = torch.zeros(32, 3)
    del bad["base_model.model.blocks.1.ffn.0.lora_B.weight"]  # lone lora_A
    bad["base_model.model.blocks.1.cross_attn.k.lora_B.weight"] = torch.zeros(7, 3)  # wrong out size
    bad["base_model.model.blocks.0.norm3.weight"] = torch.zeros(32)  # not an adapter
    torch.save({"generator_lora": bad}, tmp_path / "bad_lora.pt")
    with pytest.raises(ConversionError) as e:
        open_torch_checkpoint(str(base), lora=str(tmp_path / "bad_lora.pt"))
    msg = str(e.value)
    assert "bad_lora.pt" in msg and "longlive_base.pt" in msg
    assert "'blocks.0.self_attn.gate' has no base weight" in msg
    assert "blocks.0.self_attn.gate.weight" in msg and "blocks.0.self_attn.gate.base_layer.weight" in msg
    assert "'blocks.1.ffn.0' has lora_A only" in msg
    assert "'blocks.1.cross_attn.k': lora_B @ lora_A is (7, 32), the base weight (32, 32)" in msg
    assert "blocks.0.norm3.weight: not a LoRA tensor" in msg
    assert "'base_model.model.'" in msg and "'_fsdp_wrapped_module.'" in msg


def test_in_file_peft_layout_still_merges(tmp_path):
    """A PEFT model's own state dict: `<name>.base_layer.weight` beside its adapters."""
    sd = original_wan_state_dict(CFG)
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    peft_sd = {("base_model.model." + k).replace("q.weight", "q.base_layer.weight"): v for k, v in sd.items()}
    peft_sd |= {
        "base_model.model.blocks.1.self_attn.q.lora_A.default.weight": a,
        "base_model.model.blocks.1.self_attn.q.lora_B.default.weight": b,
    }
    save_file(peft_sd, str(tmp_path / "peft.safetensors"))
    params = convert_wan(open_torch_checkpoint(str(tmp_path / "peft.safetensors"), lora_alpha=4.0))
    expected = merged_kernel(sd["blocks.1.self_attn.q.weight"], a, b, 2.0)
    np.testing.assert_array_equal(our_kernel(params, "blocks.1.self_attn.q"), expected)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        open_torch_checkpoint(str(tmp_path / "peft.safetensors"), lora=str(tmp_path / "peft.safetensors"))


def test_a_lora_file_given_as_the_model_is_refused_pointing_to_the_lora_flag(tmp_path):
    _, adapters, base, lora = save_longlive_pair(tmp_path, CFG)
    with pytest.raises(ValueError, match=r"lora\.pt: a LongLive LoRA file \('generator_lora'\).*--lora="):
        open_torch_checkpoint(str(lora))
    save_file(peft_keys(adapters), str(tmp_path / "adapters.safetensors"))
    with pytest.raises(ValueError, match=r"adapters\.safetensors: holds only LoRA adapters .*--lora"):
        open_torch_checkpoint(str(tmp_path / "adapters.safetensors"))
    with pytest.raises(ValueError, match=r"longlive_base\.pt: holds no LoRA adapters"):
        open_torch_checkpoint(str(base), lora=str(base))  # a model given as the LoRA


def test_longlive_base_is_recognised_by_a_lora_file_beside_it_or_by_its_name(tmp_path):
    release = tmp_path / "longlive_models" / "models"
    release.mkdir(parents=True)
    _, _, base, lora = save_longlive_pair(release, CFG)
    renamed = release / "generator.pt"
    os.rename(base, renamed)
    assert str(lora) in longlive_base_evidence(str(renamed))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(renamed, elsewhere / "longlive_base.pt")
    assert "'longlive_base.pt' says LongLive" in longlive_base_evidence(str(elsewhere / "longlive_base.pt"))
    os.rename(elsewhere / "longlive_base.pt", elsewhere / "self_forcing_dmd.pt")
    assert longlive_base_evidence(str(elsewhere / "self_forcing_dmd.pt")) is None
    assert longlive_base_evidence(str(elsewhere)) is None  # directories: diffusers / sharded


def test_truncated_safetensors_names_the_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(
        {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8, 8), "c.bias": torch.ones(8)}, str(path)
    )
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # an interrupted download: the last 40 bytes never arrived
        fh.truncate(size - 40)
    with pytest.raises(ValueError) as e:
        open_torch_checkpoint(str(path))
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    # data order a.weight (64 bytes), b.weight (256), c.bias (32): 40 bytes short cuts c.bias
    # off and b.weight's last 8 bytes; the first tensor cut is named, the others counted
    assert f"has {size - 40} bytes but tensor 'b.weight' ends at byte {size - 32}" in msg
    assert "1 more tensors lie past the end" in msg


def test_safetensors_header_that_disagrees_with_shapes_is_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + bytes(24))
    with pytest.raises(
        ValueError, match=r"model\.safetensors: corrupt .*'w' \(F32 \(2, 3\)\) needs 24 bytes"
    ):
        open_torch_checkpoint(str(path))


def test_pt_dict_without_tensors_names_the_file(tmp_path):
    torch.save({"step": 3, "config": {"lr": 1e-4}}, tmp_path / "optimizer_only.pt")
    with pytest.raises(
        ValueError, match=r"optimizer_only\.pt: holds no tensors \(top-level keys: \['config', 'step'\]\)"
    ):
        open_torch_checkpoint(str(tmp_path / "optimizer_only.pt"))
