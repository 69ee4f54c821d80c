"""The TPU path compiles ahead of time on this CPU machine (libtpu, no TPU): the tiny model's
forward, and a forward+backward with splash attention inside shard_map, for a v5e:2x2 slice, with a
per-chip report; a tiny config's train step and streaming step through the same library function
as `launch/compile_tpu.py` (`aot.compile_stage`: `loop.setup` / `loop.jit_train_step`,
`build.streamer` / `Streamer.jit_step`); multi-slice meshes; a program that cannot fit fails naming
stage, topology and memory. The tests that compile are skipped when libtpu is not importable;
stage names, topology names and the FLOP counts need no libtpu."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adastate_jax import sharding as shd
from adastate_jax import tpu_compile as tc
from adastate_jax.config import cli
from adastate_jax.models import attention as attn
from adastate_jax.models import wan
from adastate_jax.training import aot

needs_libtpu = pytest.mark.skipif(
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


@needs_libtpu
def test_topology_mesh_has_the_slices_chips():
    mesh = tc.topology_mesh(TOPOLOGY, data=2, tensor=2)
    assert mesh.size == 4 and dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert mesh.devices.flat[0].platform == "tpu" and mesh.devices.flat[0].device_kind == "TPU v5 lite"
    with pytest.raises(ValueError, match=r"does not cover the 4 chips of TPU topology 'v5e:2x2'"):
        tc.topology_mesh(TOPOLOGY, data=3)


@needs_libtpu
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


@needs_libtpu
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


@needs_libtpu
def test_a_program_that_does_not_fit_names_stage_topology_and_memory():
    mesh = tc.topology_mesh(TOPOLOGY, data=4)
    big = tc.abstract_array((4 * 65536, 65536), jnp.float32, mesh, ("batch", None))  # 16 GiB per chip
    with pytest.raises(tc.DoesNotFit, match=r"stage 'huge' does not fit on TPU topology 'v5e:2x2'.*GB"):
        tc.compile_for(lambda a: jnp.exp(a) * 2, (big,), stage="huge", topology=TOPOLOGY, mesh=mesh)


@needs_libtpu
def test_an_unknown_topology_is_named():
    with pytest.raises(ValueError, match=r"TPU topology 'v9z:1x1' is not known"):
        tc.topology_devices("v9z:1x1")


@needs_libtpu
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


# --------------------------------------------------------------------------------------------
# A config's stages, as launch/compile_tpu.py compiles them
# --------------------------------------------------------------------------------------------

TINY = "configs/panworld.py"


def _tiny_stage(name: str, **train):
    """`configs/panworld.py` for stage `name` with head dim 128 (the kernel's lane width), splash
    attention, bfloat16 compute and a stream batch covering the v5e:2x2 mesh's data axis."""
    stage = aot.Stage.parse(name)
    cfg = cli.load_file(stage.config_spec(TINY))
    with cfg.unlocked():
        cfg.model.dim, cfg.model.num_heads = 256, 2
        cfg.model.attention, cfg.model.dtype = "splash", "bfloat16"
        cfg.stream.batch_size = 4
        cfg.stream.anchor = stage.anchor or cfg.stream.anchor
        for k, v in train.items():
            cfg.train[k] = v
    return cfg, stage


@needs_libtpu
@pytest.mark.parametrize("name", ["teacher", "step:adastate"])
def test_a_tiny_configs_train_step_and_streaming_step_compile_for_a_tpu_slice(name):
    """The library path of launch/compile_tpu.py: the train step as launch/train.py jits it (state
    donated) and the streaming step as launch/rollout.py runs it (carry donated)."""
    cfg, stage = _tiny_stage(name)
    report, program = aot.compile_stage(cfg, stage, TOPOLOGY, frames=3)
    assert report.fits and report.chips == 4 and report.device_kind == "TPU v5 lite"
    assert report.alias_bytes > 0  # the donated train state / carry is updated in place
    assert report.model_flops == program.flops > 0 and report.step_seconds(0.5) > 0
    assert report.mesh == "4 x 1 x 1" and name in tc.format_table([report])


@needs_libtpu
def test_a_multi_slice_mesh_puts_the_slices_on_the_data_axis():
    mesh = tc.topology_mesh("v5e:2x2*2", data=2, fsdp=4)
    assert mesh.size == 8
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)  # [data, fsdp, tensor]
    assert (slice_of[0] == slice_of[0, 0, 0]).all() and (slice_of[1] == slice_of[1, 0, 0]).all()
    assert slice_of[0, 0, 0] != slice_of[1, 0, 0]
    with pytest.raises(ValueError, match=r"neither data nor fsdp is divisible by the 2 slices"):
        tc.topology_mesh("v5e:2x2*2", data=1, fsdp=1, tensor=8)


def test_topology_names_take_an_optional_slice_count():
    assert tc.parse_topology("v5p:4x4x4") == ("v5p:4x4x4", 1)
    assert tc.parse_topology("v5e:16x16*2") == ("v5e:16x16", 2)
    for bad in ("v5e", "v5e:2x2*0", "v5e:2x2*two"):
        with pytest.raises(ValueError, match=r"expected 'KIND:AxB\[xC\]'"):
            tc.parse_topology(bad)


def test_stage_names_select_the_config_and_the_anchor():
    dmd = aot.Stage.parse("dmd:adastate")
    assert (
        dmd.trains
        and dmd.config_spec("configs/wan_1_3b_tpu.py:v5p-128") == "configs/wan_1_3b_tpu.py:dmd,v5p-128"
    )
    assert dmd.overrides() == {"stream.anchor": "adastate"}
    step = aot.Stage.parse("step:sink")
    assert not step.trains and step.config_spec("configs/tiny.py:absolute") == "configs/tiny.py:absolute"
    assert aot.Stage.parse("teacher").config_spec("configs/panworld.py") == "configs/panworld.py:teacher"
    for bad, msg in [
        ("dmd:sunk", "unknown anchor policy 'sunk'"),
        ("teach", "unknown kind 'teach'"),
        ("teacher:sink", "a teacher has no anchor policy"),
    ]:
        with pytest.raises(ValueError, match=msg):
            aot.Stage.parse(bad)
    names = [s.name for s in aot.default_stages(trains=True)]
    assert {
        "teacher",
        "teacher_tf",
        "ode",
        "dmd:adastate",
        "dmd:sink",
        "step:window",
        "segment:adastate",
    } <= set(names)
    assert all(not s.trains for s in aot.default_stages(trains=False))


def _run(cfg):
    from adastate_jax.training import loop

    return loop.setup(aot.with_abstract_pretrained(cfg), workdir="", mesh=None)


def test_a_dmd_critic_update_costs_a_student_rollout_and_a_flow_matching_step():
    """train_flops: one more critic step adds the critic's flow-matching step (as the teacher
    stage counts it, same layout) and one student rollout: every chunk runs on average (n + 1) / 2
    of the n denoising steps (the exit step is uniform) and the cache refresh."""
    one = _run(_tiny_stage("dmd:sink", critic_steps=1)[0])
    two = _run(_tiny_stage("dmd:sink", critic_steps=2)[0])
    fm_cfg, _ = _tiny_stage("teacher", attention=one.exp.train.teacher_attention)
    fm = aot.train_flops(_run(fm_cfg), 9)
    exp, n_steps = one.exp, len(one.exp.sampler.denoising_steps)
    streamer = one.objective.streamer
    rollout = 3 * aot.stream_chunk_flops(exp, streamer, exp.train.batch_size, (n_steps + 1) / 2)
    extra = aot.train_flops(two, 9) - aot.train_flops(one, 9)
    assert extra == pytest.approx(fm + rollout)
    assert aot.step_flops(one) is None and aot.step_flops(_run(fm_cfg), 9) == fm


def test_stored_ode_trajectories_are_in_the_abstract_batch_and_no_teacher_is_loaded():
    """`ode` on stored trajectories (`data.source='ode_trajectories'`, what fits v5e-256): the
    compiled step's batch carries the trajectory [B, n steps, F, h, w, C], the state no teacher."""
    cfg, _ = _tiny_stage("ode")
    with cfg.unlocked():
        cfg.data.source, cfg.data.paths = "ode_trajectories", ("unused",)
    run = _run(cfg)
    batch = aot.abstract_batch(run, 6)
    n = len(run.exp.sampler.denoising_steps)
    assert batch["trajectory"].shape == (run.exp.train.batch_size, n, *batch["latents"].shape[1:])
    assert "teacher" not in run.pretrained
    on_the_fly = _run(_tiny_stage("ode")[0])
    assert "trajectory" not in aot.abstract_batch(on_the_fly, 6) and "teacher" in on_the_fly.pretrained
