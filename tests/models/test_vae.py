"""Specifications of the Wan VAE (models/vae.py): parity with diffusers' AutoencoderKLWan through the
converter (both checkpoint layouts), exact streaming encode/decode with a fixed-shape cache, the
1 + 4k frame rule, all-at-once conversion errors, and the PatchCodec round trip.

Shapes are tiny (16x16 frames, 5-9 frames) to keep the file fast on a shared 2-core CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import sharding
from adastate_jax.models import convert
from adastate_jax.models import vae as V

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

_decode = jax.jit(V.decode, static_argnums=0, static_argnames=("normalize", "chunk_latents"))
_encode = jax.jit(V.encode, static_argnums=0, static_argnames=("normalize", "chunk_latents", "return_logvar"))
_decode_chunk = jax.jit(V.decode_chunk, static_argnums=0, static_argnames=("normalize",))
_encode_chunk = jax.jit(V.encode_chunk, static_argnums=0, static_argnames=("normalize", "return_logvar"))

# Wan2.1's structure (4 stages, 2 res blocks, temporal (F, T, T)) with tiny channels, normalising
# with the published statistics; and a different layout (3 stages, time downsampled first).
PARITY_CONFIGS = {
    "wan21_structure": dict(
        base_dim=8,
        dim_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        temporal_downsample=(False, True, True),
        latents_mean=V.WAN21_LATENTS_MEAN,
        latents_std=V.WAN21_LATENTS_STD,
    ),
    "three_stages_time_first": dict(
        base_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False)
    ),
}


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _torch_vae(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(
        base_dim=cfg["base_dim"],
        z_dim=16,
        dim_mult=list(cfg["dim_mult"]),
        num_res_blocks=cfg["num_res_blocks"],
        temperal_downsample=list(cfg["temporal_downsample"]),
    ).eval()
    with torch.no_grad():  # non-trivial gammas, biases and attention output (Wan inits them 1 / 0)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("proj.weight"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _abstract(cfg: V.WanVAEConfig):
    return V.abstract_model(cfg)


def _to_jax(x):  # torch [B, C, T, H, W] -> [B, T, H, W, C]
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 4, 1))


def _to_torch_layout(x):
    return np.asarray(x).transpose(0, 4, 1, 2, 3)


# --------------------------------------------------------------------------------------------
# (1) parity with diffusers through the converter (safetensors on disk)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_encoder_mean_and_decoder_match_diffusers_through_converter(name, tmp_path):
    cfg_kw = PARITY_CONFIGS[name]
    tm = _torch_vae(cfg_kw)
    path = str(tmp_path / "vae.safetensors")
    safetensors_torch.save_file(tm.state_dict(), path)

    cfg = V.WanVAEConfig.tiny(**cfg_kw)
    graphdef, abstract = _abstract(cfg)
    params = convert.convert_to_state(
        convert.open_torch_checkpoint(path), V.conversion_rules("diffusers"), abstract
    )

    gen = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 9, 16, 16, generator=gen) * 2 - 1  # [B, C, T, H, W]
    with torch.no_grad():
        mu_ref = tm.encode(video).latent_dist.mean  # [B, 16, F, h, w] (diffusers: unnormalised)
        z_raw = torch.randn(mu_ref.shape, generator=gen)
        frames_ref = tm.decode(z_raw).sample
    mean = np.asarray(cfg.latents_mean or [0.0] * 16, np.float32).reshape(1, 16, 1, 1, 1)
    std = np.asarray(cfg.latents_std or [1.0] * 16, np.float32).reshape(1, 16, 1, 1, 1)

    mu = _to_torch_layout(_encode(graphdef, params, _to_jax(video)))  # normalised, like Wan
    assert mu.shape == mu_ref.shape
    assert _rel_err(mu, (mu_ref.numpy() - mean) / std) < 1e-4

    z_norm = (z_raw.numpy() - mean) / std
    frames = _to_torch_layout(_decode(graphdef, params, jnp.asarray(z_norm.transpose(0, 2, 3, 4, 1))))
    assert frames.shape == frames_ref.shape == (2, 3, 9, 16, 16)
    assert np.mean(np.abs(frames_ref.numpy()) < 1) > 0.5  # the clamp does not hide the comparison
    assert _rel_err(frames, frames_ref.numpy()) < 1e-4


# --------------------------------------------------------------------------------------------
# (2) the original Wan2.1 layout converts to the same parameters
# --------------------------------------------------------------------------------------------


def _diffusers_to_original(sd: dict, num_res_blocks: int) -> dict:
    """Rename an AutoencoderKLWan state dict to Wan2.1_VAE.pth keys (WanVAE_ in wan/modules/vae.py).

    encoder/decoder conv_in -> conv1; norm_out -> head.0; conv_out -> head.2; quant_conv -> conv1;
    post_quant_conv -> conv2; mid_block.resnets.{0,1} -> middle.{0,2}; attentions.0 -> middle.1;
    residual blocks norm1/conv1/norm2/conv2/conv_shortcut -> residual.0/2/3/6, shortcut;
    encoder.down_blocks.N -> encoder.downsamples.N (same flat index);
    decoder.up_blocks.i.resnets.j -> decoder.upsamples.{i * (R + 2) + j},
    decoder.up_blocks.i.upsamplers.0 -> decoder.upsamples.{i * (R + 2) + R + 1} (R res blocks).
    """
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
    res["conv_shortcut"] = "shortcut"
    out = {}
    for key, value in sd.items():
        k, parts = key, key.split(".")
        if ("down_blocks" in parts or "resnets" in parts) and parts[
            -2
        ] in res:  # residual-block leaves first (top-level conv1/conv2 exist too)
            k = ".".join(parts[:-2] + res[parts[-2]].split(".") + parts[-1:])
        for a, b in [("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")]:
            if k.startswith(a):
                k = b + k[len(a) :]
        k = k.replace("encoder.conv_in.", "encoder.conv1.").replace("decoder.conv_in.", "decoder.conv1.")
        k = k.replace(".norm_out.", ".head.0.").replace(".conv_out.", ".head.2.")
        k = k.replace(".mid_block.resnets.0.", ".middle.0.").replace(".mid_block.resnets.1.", ".middle.2.")
        k = k.replace(".mid_block.attentions.0.", ".middle.1.")
        k = k.replace("encoder.down_blocks.", "encoder.downsamples.")
        parts = k.split(".")
        if parts[:2] == ["decoder", "up_blocks"]:
            i = int(parts[2])
            if parts[3] == "resnets":
                n, rest = i * (num_res_blocks + 2) + int(parts[4]), parts[5:]
            else:  # upsamplers.0
                n, rest = i * (num_res_blocks + 2) + num_res_blocks + 1, parts[5:]
            parts = ["decoder", "upsamples", str(n), *rest]
        out[".".join(parts)] = value
    return out


def test_original_layout_converts_to_the_same_params():
    cfg_kw = PARITY_CONFIGS["wan21_structure"]
    sd = {k: v.numpy() for k, v in _torch_vae(cfg_kw).state_dict().items()}
    original = _diffusers_to_original(sd, cfg_kw["num_res_blocks"])
    assert any(k.startswith("decoder.upsamples.4.shortcut.") for k in original)  # the one decoder shortcut
    # diffusers' own single-file loader maps these names back (validates the renaming above).
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    back = convert_wan_vae_to_diffusers({k: torch.from_numpy(v) for k, v in original.items()})
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k].numpy(), v) for k, v in sd.items())

    cfg = V.WanVAEConfig.tiny(**cfg_kw)
    _, abstract = _abstract(cfg)
    from_diffusers = convert.convert_to_state(
        convert.DictSource(sd), V.conversion_rules("diffusers"), abstract
    )
    from_original = convert.convert_to_state(
        convert.DictSource(original), V.conversion_rules("original", cfg), abstract
    )
    a, b = nnx.to_pure_dict(from_diffusers), nnx.to_pure_dict(from_original)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_full_size_wan21_tables_cover_every_key_with_the_right_shapes():
    with torch.device("meta"):  # shapes only: no memory, no init
        sd = diffusers.AutoencoderKLWan().state_dict()  # Wan2.1 defaults
    _, abstract = _abstract(V.WanVAEConfig())
    target = convert.flatten_target(abstract)
    assert len(sd) == len(target) == 194
    for layout, source in [("diffusers", sd), ("original", _diffusers_to_original(sd, 2))]:
        assert V.detect_layout(source) == layout
        plan = convert.plan_conversion(convert.DictSource(source), V.conversion_rules(layout), target)
        assert len(plan) == len(target)


def test_load_wan_vae_guesses_the_layout(tmp_path):
    cfg_kw = PARITY_CONFIGS["three_stages_time_first"]
    sd = _torch_vae(cfg_kw).state_dict()
    cfg = V.WanVAEConfig.tiny(**cfg_kw)
    original = _diffusers_to_original(sd, cfg_kw["num_res_blocks"])
    torch.save(original, str(tmp_path / "Wan2.1_VAE.pth"))
    safetensors_torch.save_file(sd, str(tmp_path / "vae.safetensors"))
    a = nnx.state(V.load_wan_vae(str(tmp_path / "Wan2.1_VAE.pth"), cfg), nnx.Param)
    b = nnx.state(V.load_wan_vae(str(tmp_path / "vae.safetensors"), cfg), nnx.Param)
    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(a)), jax.tree.leaves(nnx.to_pure_dict(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# (6) conversion errors are reported together
# --------------------------------------------------------------------------------------------


def test_conversion_reports_missing_extra_and_misshaped_keys_together():
    cfg_kw = PARITY_CONFIGS["three_stages_time_first"]
    sd = {k: v.numpy() for k, v in _torch_vae(cfg_kw).state_dict().items()}
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra_layer.weight"] = np.zeros((3, 3), np.float32)
    sd["encoder.conv_in.weight"] = np.zeros((5, 3, 3, 3, 3), np.float32)  # 5 != base_dim 8 outputs
    _, abstract = _abstract(V.WanVAEConfig.tiny(**cfg_kw))
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_to_state(convert.DictSource(sd), V.conversion_rules("diffusers"), abstract)
    err = info.value
    assert any("decoder/conv_out/bias" in m for m in err.missing)
    assert any("decoder.extra_layer.weight" in u for u in err.unexpected)
    assert any("encoder.conv_in.weight" in m for m in err.mismatched)
    msg = str(err)
    assert (
        "decoder/conv_out/bias" in msg
        and "decoder.extra_layer.weight" in msg
        and "encoder.conv_in.weight" in msg
    )


def test_conversion_rules_reject_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        V.conversion_rules("comfy")


# --------------------------------------------------------------------------------------------
# (3)-(5) streaming: chunked == full, scan, fixed cache shapes, frame-count rule
# --------------------------------------------------------------------------------------------

# A small layout with the Wan factors (x4 time, first frame special) that compiles fast.
SMALL_KW = dict(base_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True))
SMALL = V.WanVAEConfig.tiny(**SMALL_KW)


@pytest.fixture(scope="module")
def small_vae():
    # Weights from a random torch model (fast to initialise on CPU; random gammas/biases/attention).
    sd = {k: v.numpy() for k, v in _torch_vae(SMALL_KW, seed=7).state_dict().items()}
    graphdef, abstract = _abstract(SMALL)
    return graphdef, convert.convert_to_state(
        convert.DictSource(sd), V.conversion_rules("diffusers"), abstract
    )


def _stream_decode(graphdef, params, z, sizes):
    cache = V.init_decode_cache(SMALL, z.shape[0], z.shape[2], z.shape[3])
    outs, start = [], 0
    for n in sizes:
        cache, frames = _decode_chunk(graphdef, params, cache, z[:, start : start + n])
        assert frames.shape[1] == SMALL.temporal_factor * n
        outs.append(frames)
        start += n
    return jnp.concatenate(outs, axis=1)


def test_chunked_decode_equals_full_decode_for_any_chunking(small_vae):
    graphdef, params = small_vae
    z = jax.random.normal(jax.random.key(0), (2, 6, 4, 4, 16))  # [B, F, h, w, C]
    full = _stream_decode(graphdef, params, z, [6])[:, SMALL.lead_frames :]  # one call, all latents
    assert full.shape == (2, 1 + 4 * 5, 16, 16, 3)
    assert 0.05 < float(jnp.std(full)) and float(jnp.mean(jnp.abs(full) < 1)) > 0.5
    tol = dict(rtol=0, atol=2e-5)
    for sizes in ([1] * 6, [1, 3, 2]):
        chunked = _stream_decode(graphdef, params, z, sizes)[:, SMALL.lead_frames :]
        np.testing.assert_allclose(chunked, full, **tol, err_msg=f"chunk sizes {sizes}")
    # decode() = a lax.scan over full chunks (+ a remainder call)
    np.testing.assert_allclose(_decode(graphdef, params, z, chunk_latents=4), full, **tol)


def test_lax_scan_over_decode_chunk_matches_full_decode(small_vae):
    graphdef, params = small_vae
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 16))
    cache = V.init_decode_cache(SMALL, 1, 4, 4)

    @jax.jit
    def rollout(params, cache, z_chunks):  # z_chunks [n, B, 2, h, w, C]
        return jax.lax.scan(lambda c, zc: V.decode_chunk(graphdef, params, c, zc), cache, z_chunks)

    chunks = jnp.moveaxis(z.reshape(1, 2, 2, 4, 4, 16), 1, 0)
    final, frames = rollout(params, cache, chunks)  # frames [n, B, 8, H, W, 3]
    assert frames.shape == (2, 1, 8, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(frames[0, :, :3]), 0)  # stream padding, first chunk only
    video = jnp.moveaxis(frames, 0, 1).reshape(1, 16, 16, 16, 3)[:, SMALL.lead_frames :]
    full = _stream_decode(graphdef, params, z, [4])[:, SMALL.lead_frames :]
    np.testing.assert_allclose(video, full, rtol=0, atol=2e-5)
    assert int(final.num_chunks) == 2


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def test_cache_shapes_are_fixed_from_the_first_call(small_vae):
    graphdef, params = small_vae
    for init, step, x in [
        (V.init_decode_cache(SMALL, 1, 4, 4), _decode_chunk, jnp.ones((1, 2, 4, 4, 16))),
        (V.init_encode_cache(SMALL, 1, 16, 16), _encode_chunk, jnp.full((1, 8, 16, 16, 3), 0.5)),
    ]:
        after1, _ = step(graphdef, params, init, x)
        after2, _ = step(graphdef, params, after1, x)
        assert jax.tree.structure(init) == jax.tree.structure(after1) == jax.tree.structure(after2)
        assert _shapes(init) == _shapes(after1) == _shapes(after2)
        assert int(after1.num_chunks) == 1 and int(after2.num_chunks) == 2
        assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(after1.convs))
    # the config alone gives the same cache as the model
    model_cache = V.init_decode_cache(nnx.merge(graphdef, params), 1, 4, 4)
    assert V.describe_cache(model_cache) == V.describe_cache(V.init_decode_cache(SMALL, 1, 4, 4))


def test_frame_count_rule_one_plus_four_k(small_vae):
    graphdef, params = small_vae
    for num_latents in (1, 2, 3):
        z = jax.ShapeDtypeStruct((1, num_latents, 4, 4, 16), jnp.float32)
        out = jax.eval_shape(lambda p, z: V.decode(graphdef, p, z), params, z)
        assert out.shape == (1, 1 + 4 * (num_latents - 1), 16, 16, 3)
        assert SMALL.num_frames(num_latents) == out.shape[1]
        video = jax.ShapeDtypeStruct((1, out.shape[1], 16, 16, 3), jnp.float32)
        mu, logvar = jax.eval_shape(lambda p, v: V.encode(graphdef, p, v, return_logvar=True), params, video)
        assert mu.shape == logvar.shape == (1, num_latents, 4, 4, 16)
    # the first chunk of one latent decodes to 1 real frame (after 3 padding zeros), later ones to 4
    cache = V.init_decode_cache(SMALL, 1, 4, 4)
    z = jax.random.normal(jax.random.key(2), (1, 2, 4, 4, 16))
    cache, first = _decode_chunk(graphdef, params, cache, z[:, :1])
    cache, second = _decode_chunk(graphdef, params, cache, z[:, 1:])
    np.testing.assert_array_equal(np.asarray(first[:, :3]), 0)
    assert np.all(np.any(np.asarray(first[:, 3:]) != 0, axis=(2, 3, 4)))
    assert np.all(np.any(np.asarray(second) != 0, axis=(2, 3, 4)))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        nnx.merge(graphdef, params).encode(jnp.zeros((1, 8, 16, 16, 3)))


def test_chunked_encode_equals_full_encode(small_vae):
    graphdef, params = small_vae
    video = jnp.tanh(jax.random.normal(jax.random.key(4), (2, 17, 16, 16, 3)))  # 1 + 4 * 4 frames
    full = _encode(graphdef, params, video, chunk_latents=5)  # one call
    assert full.shape == (2, 5, 4, 4, 16)
    for chunk in (1, 2):
        np.testing.assert_allclose(
            _encode(graphdef, params, video, chunk_latents=chunk), full, rtol=0, atol=1e-5
        )
    # by hand: 1 frame (after 3 ignored padding frames), then 4 + 8 frames
    cache = V.init_encode_cache(SMALL, 2, 16, 16)
    garbage = jnp.full((2, 3, 16, 16, 3), 7.0)  # padding content must not matter
    cache, a = _encode_chunk(graphdef, params, cache, jnp.concatenate([garbage, video[:, :1]], axis=1))
    cache, b = _encode_chunk(graphdef, params, cache, video[:, 1:5])
    cache, c = _encode_chunk(graphdef, params, cache, video[:, 5:13])
    cache, d = _encode_chunk(graphdef, params, cache, video[:, 13:17])
    np.testing.assert_allclose(jnp.concatenate([a, b, c, d], axis=1), full, rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors(small_vae):
    graphdef, params = small_vae
    model = nnx.merge(graphdef, params)
    cache = model.init_decode_cache(1, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        model.decode_chunk(cache, jnp.zeros((1, 1, 4, 4, 12)))
    with pytest.raises(ValueError, match="does not match the cache"):
        model.decode_chunk(cache, jnp.zeros((1, 1, 5, 4, 16)))
    with pytest.raises(ValueError, match="does not match the cache"):
        model.decode_chunk(cache, jnp.zeros((2, 1, 4, 4, 16)))
    enc_cache = model.init_encode_cache(1, 16, 16)
    with pytest.raises(ValueError, match="4 frames per latent"):
        model.encode_chunk(enc_cache, jnp.zeros((1, 3, 16, 16, 3)))
    with pytest.raises(ValueError, match="divisible"):
        model.init_encode_cache(1, 18, 16)
    with pytest.raises(ValueError, match="temporal_downsample"):
        V.WanVAEConfig(dim_mult=(1, 2, 4, 4), temporal_downsample=(True, True))


def test_params_carry_logical_axis_names_from_the_rules_table(small_vae):
    _, params = small_vae
    known = {name for name, _ in sharding.DEFAULT_RULES}
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    flat = convert.flatten_target(params)
    names = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(names) == len(flat)
    for spec, (path, leaf) in zip(names, flat.items()):
        assert len(spec) == len(leaf.shape) and all(n is None or n in known for n in spec), (path, spec)
    assert specs["decoder"]["conv_in"]["kernel"] == jax.sharding.PartitionSpec(
        None, None, None, "conv_in", "conv_out"
    )
    assert specs["encoder"]["norm_out"]["gamma"] == jax.sharding.PartitionSpec("norm")


# --------------------------------------------------------------------------------------------
# (7) PatchCodec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["none", "hadamard"])
def test_patch_codec_round_trips_exactly(projection):
    codec = V.PatchCodec(patch=2, latent_channels=16, projection=projection)
    video = jax.random.uniform(jax.random.key(5), (2, 5, 16, 16, 3), minval=-1, maxval=1)
    graphdef, params = nnx.split(codec)
    z = V.encode(graphdef, params, video)
    assert z.shape == (2, 5, 8, 8, 16)
    back = V.decode(graphdef, params, z)
    if projection == "none":
        np.testing.assert_array_equal(np.asarray(back), np.asarray(video))
        np.testing.assert_array_equal(np.asarray(z[..., 12:]), 0)
    else:
        np.testing.assert_allclose(back, video, rtol=0, atol=1e-6)
        assert float(jnp.abs(z[..., 12:]).max()) > 0.1  # the projection mixes all 16 channels
    # streaming: one latent frame <-> one frame, chunk by chunk equals full
    cache = V.init_decode_cache(codec, 2, 8, 8)
    parts = []
    for a, b in [(0, 1), (1, 4), (4, 5)]:
        cache, frames = V.decode_chunk(graphdef, params, cache, z[:, a:b])
        parts.append(frames)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(parts, axis=1)), np.asarray(back))
    with pytest.raises(ValueError, match="channels"):
        codec.decode_chunk(codec.init_decode_cache(2, 8, 8), jnp.zeros((2, 1, 8, 8, 12)))
