"""The TPU path compiles ahead of time on this CPU machine (libtpu, no TPU): the tiny model's
forward, and a forward+backward with splash attention inside shard_map, for a v5e:2x2 slice, with a
per-chip report; a program that cannot fit fails naming stage, topology and memory. Skipped when
libtpu is not importable."""

import jax
import jax.numpy as jnp
import pytest

from adastate_jax import sharding as shd
from adastate_jax import tpu_compile as tc
from adastate_jax.models import attention as attn
from adastate_jax.models import wan

pytestmark = pytest.mark.skipif(
    not tc.libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>')"
)

TOPOLOGY = "v5e:2x2"


@pytest.fixture(autouse=True)
def default_matmul_precision():
    """The suite sets 'highest' for CPU numerics; Mosaic refuses it for bfloat16 operands."""
    with jax.default_matmul_precision("default"):
        yield


def _tiny_splash_config(**kw):
    return wan.WanConfig.tiny(
        dim=256, num_heads=2, attention="splash", dtype="bfloat16", zero_init_head=False, **kw
    )  # head dim 128: the TPU kernel's lane width


def _abstract_inputs(cfg, mesh, b=4, f=4, hw=(16, 16)):
    """Abstract params and inputs of a forward, sharded by the rules table on `mesh`."""
    graphdef, params = wan.abstract_model(cfg)
    params = tc.abstract(params, shd.state_shardings(params, mesh))
    x = tc.abstract_array((b, f, *hw, cfg.in_channels), jnp.float32, mesh, ("batch", None, None, None, None))
    t = tc.abstract_array((b, f), jnp.float32, mesh, ("batch", None))
    text = tc.abstract_array((b, cfg.text_len, cfg.text_dim), jnp.float32, mesh, ("batch", None, None))
    return graphdef, params, x, t, text


def test_topology_mesh_has_the_slices_chips():
    mesh = tc.topology_mesh(TOPOLOGY, data=2, tensor=2)
    assert mesh.size == 4 and dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert mesh.devices.flat[0].platform == "tpu" and mesh.devices.flat[0].device_kind == "TPU v5 lite"
    with pytest.raises(ValueError, match=r"does not cover the 4 chips of TPU topology 'v5e:2x2'"):
        tc.topology_mesh(TOPOLOGY, data=3)


def test_tiny_forward_compiles_for_a_tpu_slice():
    cfg = _tiny_splash_config()
    mesh = tc.topology_mesh(TOPOLOGY, data=2, tensor=2)
    graphdef, params, x, t, text = _abstract_inputs(cfg, mesh)
    mask = attn.block_causal_mask(4, 2)

    def forward(params, x, t, text):
        return wan.forward(graphdef, params, x, t, text, jnp.arange(4), None, mask).velocity

    _, report = tc.compile_for(forward, (params, x, t, text), stage="forward", topology=TOPOLOGY, mesh=mesh)
    assert report.fits and report.chips == 4 and report.hbm_bytes == 16 * tc.GIB
    assert report.argument_bytes > 0 and report.output_bytes > 0 and report.flops > 0
    assert "forward" in tc.format_table([report])


def test_tiny_train_step_with_splash_in_shard_map_compiles_for_a_tpu_slice():
    """Forward + backward, remat, a diffusion-forcing mask: the Mosaic splash kernel (not the
    interpreter) sharded over batch (data) and heads (tensor)."""
    cfg = _tiny_splash_config(remat="full")
    mesh = tc.topology_mesh(TOPOLOGY, data=2, tensor=2)
    graphdef, params, x, t, text = _abstract_inputs(cfg, mesh)
    mask = attn.block_causal_mask(4, 2)

    def loss(params, x, t, text):
        v = wan.forward(graphdef, params, x, t, text, jnp.arange(4), None, mask).velocity
        return jnp.mean(jnp.square(v - x))

    def step(params, x, t, text):
        value, grads = jax.value_and_grad(loss)(params, x, t, text)
        return value, jax.tree.map(lambda p, g: p - 1e-3 * g.astype(p.dtype), params, grads)

    compiled, report = tc.compile_for(
        step, (params, x, t, text), stage="train", topology=TOPOLOGY, mesh=mesh, donate_argnums=(0,)
    )
    assert report.fits and report.flops > 0 and report.alias_bytes > 0  # params donated
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not interpret mode


def test_a_program_that_does_not_fit_names_stage_topology_and_memory():
    mesh = tc.topology_mesh(TOPOLOGY, data=4)
    big = tc.abstract_array((4 * 65536, 65536), jnp.float32, mesh, ("batch", None))  # 16 GiB per chip
    with pytest.raises(tc.DoesNotFit, match=r"stage 'huge' does not fit on TPU topology 'v5e:2x2'.*GB"):
        tc.compile_for(lambda a: jnp.exp(a) * 2, (big,), stage="huge", topology=TOPOLOGY, mesh=mesh)


def test_an_unknown_topology_is_named():
    with pytest.raises(ValueError, match=r"TPU topology 'v9z:1x1' is not known"):
        tc.topology_devices("v9z:1x1")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["splash", "xla"])
def test_wan_1_3b_teacher_step_fits_a_v5p_8_with_splash_only(attention, capsys):
    """The issue-12 measurement: Wan2.1-1.3B forward+backward, 21 latent frames at 480x832
    (32,760 tokens), diffusion-forcing mask (chunks of 3), batch 8 over v5p-8 (4 chips, fsdp),
    remat='full', bfloat16 compute, gradients sharded as the params. Measured here: 'splash' needs
    26.6 GB per chip (23.6 GB temporaries); 'xla' (block-sparse plan of the static mask) needs
    104.6 GB (101.7 GB temporaries) > 95 GiB of HBM, and the error names stage, topology, memory."""
    topology = "v5p:2x2x1"
    cfg = wan.WanConfig.wan_1_3b(attention=attention, remat="full", dtype="bfloat16")
    mesh = tc.topology_mesh(topology, data=1, fsdp=4, tensor=1)
    frames = 21
    graphdef, params, x, t, text = _abstract_inputs(cfg, mesh, b=8, f=frames, hw=(60, 104))
    mask = attn.block_causal_mask(frames, 3)

    def loss(params, x, t, text):
        v = wan.forward(graphdef, params, x, t, text, jnp.arange(frames), None, mask).velocity
        return jnp.mean(jnp.square(v - x))

    def compile_step():
        return tc.compile_for(
            jax.value_and_grad(loss),
            (params, x, t, text),
            stage=f"teacher/{attention}",
            topology=topology,
            mesh=mesh,
            out_shardings=(tc.replicated(mesh), shd.state_shardings(wan.abstract_model(cfg)[1], mesh)),
        )[1]

    if attention == "xla":
        with pytest.raises(
            tc.DoesNotFit, match=r"stage 'teacher/xla' does not fit on TPU topology 'v5p:2x2x1'"
        ) as e:
            compile_step()
        with capsys.disabled():
            print("\n" + str(e.value))
        return
    report = compile_step()
    with capsys.disabled():
        print("\n" + tc.format_table([report]))
    assert report.fits
