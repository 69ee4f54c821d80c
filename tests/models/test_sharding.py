"""Sharding on 8 fake CPU devices (mesh data=2, fsdp=2, tensor=2): params follow the rules table,
sharded creation equals single-device creation, the sharded forward equals the single-device one."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.models import wan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _tiny_config():
    """configs/tiny.py (dim 64, 4 heads, ffn 128: every sharded dim divides 2), batch 4."""
    spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(REPO, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.stream.batch_size = 4
    return cfg


@pytest.fixture(scope="module")
def setup():
    cfg = _tiny_config()
    mesh = shd.mesh_from_config(cfg.mesh)
    model_cfg = config_lib.validate(cfg, mesh)
    rules = config_lib.sharding_rules(cfg)
    graphdef, params, shardings = wan.create_sharded(model_cfg, mesh, rules, seed=5)
    one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, params_one, _ = wan.create_sharded(model_cfg, one, rules, seed=5)
    return model_cfg, mesh, rules, graphdef, params, shardings, params_one


def _flat(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]:
        out["/".join(str(p.key) for p in path)] = leaf
    return out


@pytest.mark.parametrize(
    "path,spec",
    [
        ("blocks/self_attn/q/kernel", P(None, "fsdp", "tensor")),  # (layers, embed, heads)
        ("blocks/self_attn/o/kernel", P(None, "tensor", "fsdp")),  # (layers, heads, embed)
        ("blocks/cross_attn/k/kernel", P(None, "fsdp", "tensor")),
        ("blocks/ffn_in/kernel", P(None, "fsdp", "tensor")),  # (layers, embed, mlp)
        ("blocks/ffn_out/kernel", P(None, "tensor", "fsdp")),  # (layers, mlp, embed)
        ("blocks/self_attn/norm_q/scale", P(None, "tensor")),  # (layers, heads)
        ("blocks/modulation", P()),  # (layers, modulation, norm): replicated
        ("patch_embedding/kernel", P(None, "fsdp")),  # (patch, embed)
        ("text_embedding_1/kernel", P(None, "fsdp")),  # (text_embed, embed)
        ("head/kernel", P("fsdp", None)),  # (embed, patch)
    ],
)
def test_parameters_are_placed_as_the_rules_table_says(setup, path, spec):
    _, mesh, _, _, params, _, _ = setup
    leaf = _flat(params)[path]
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (path, leaf.sharding)
    # the shards really are split: each device holds shape / (product of its mesh axes)
    expected = list(leaf.shape)
    for dim, axes in enumerate(spec):
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            expected[dim] //= mesh.shape[axis]
    assert leaf.addressable_shards[0].data.shape == tuple(expected)


def test_every_parameter_follows_its_logical_names(setup):
    model_cfg, mesh, rules, _, params, shardings, _ = setup
    _, abstract = wan.abstract_model(model_cfg)
    logical = _flat(nnx.get_partition_spec(abstract))
    flat_params = _flat(params)
    assert set(logical) == set(flat_params)
    for path, names in logical.items():
        want = NamedSharding(mesh, shd.logical_to_mesh_spec(tuple(names), rules))
        leaf = flat_params[path]
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, names, leaf.sharding)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(flat_shardings) == len(flat_params)


def test_sharded_creation_equals_single_device_creation(setup):
    model_cfg, *_, params, _, params_one = setup
    sharded, single = _flat(params), _flat(params_one)
    for path in single:
        assert len(single[path].sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(sharded[path]), np.asarray(single[path]), err_msg=path)


def _inputs(cfg, b=4, f=3, h=8, w=8):
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (b, f, h, w, cfg.in_channels))  # [B, F, H, W, C]
    t = jax.random.uniform(k[1], (b, f), minval=0, maxval=1000)  # [B, F]
    text = jax.random.normal(k[2], (b, cfg.text_len, cfg.text_dim))  # [B, T_text, text_dim]
    return x, t, text


def test_sharded_forward_equals_single_device_forward(setup):
    model_cfg, mesh, rules, graphdef, params, shardings, params_one = setup
    x, t, text = _inputs(model_cfg)
    f = x.shape[1]

    def run(params, x, t, text, pos, ctx_k, ctx_v):
        b = x.shape[0]
        ctx = wan.Context(ctx_k, ctx_v, jnp.broadcast_to(jnp.arange(f), (b, f)), jnp.ones((b, f), bool))
        out = wan.forward(graphdef, params, x, t, text, pos + f, ctx)
        return out.velocity, out.k, out.v

    # one chunk attending to a cached context of F frames; single device: everything on device 0
    dev0 = jax.devices()[0]
    ctx_kv = jax.random.normal(
        jax.random.key(4), (model_cfg.num_layers, 4, f, 16, model_cfg.num_heads, model_cfg.head_dim)
    )  # [L, B, S, P, N, H]
    args = (x, t, text, jnp.arange(f), ctx_kv, ctx_kv)
    ref = jax.jit(run)(jax.device_put(params_one, dev0), *jax.device_put(args, dev0))

    # sharded: batch over (data, fsdp), cache heads over tensor, params per the rules table
    def named(*logical):
        return shd.named_sharding(mesh, logical, rules)

    batch5 = named("batch", None, None, None, None)
    batch3 = named("batch", None, None)
    cache = named("layers", "batch", None, None, "kv_heads", None)
    in_shardings = (
        shardings,
        batch5,
        named("batch", None),
        batch3,
        named(None),
        cache,
        cache,
    )
    with jax.set_mesh(mesh):
        placed = jax.device_put(args, in_shardings[1:])
        out = jax.jit(run, in_shardings=in_shardings)(params, *placed)
    assert out[0].sharding.spec[0] in (("data", "fsdp"), "data")  # the batch stays sharded
    for got, want, name in zip(out, ref, ("velocity", "new keys", "new values")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(jnp.std(ref[0])) > 0.1  # a non-trivial model (zero_init_head=False)


def test_abstract_and_created_models_work_inside_a_mesh_context():
    """Logical axis names must never be taken for mesh axes (jax.set_mesh is common in training)."""
    from adastate_jax import sharding as shd_
    from adastate_jax.models import wan as wan_

    mesh = shd_.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        _, abstract = wan_.abstract_model(wan_.WanConfig.tiny())
        _, params, _ = wan_.create_sharded(wan_.WanConfig.tiny(), mesh)
    assert abstract["blocks"]["self_attn"]["q"]["kernel"].shape == (2, 64, 64)
    assert params["blocks"]["self_attn"]["q"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
