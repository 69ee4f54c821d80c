"""A run's train step without data or weights: for benchmarking and ahead-of-time compilation.

Owns: the batch a run's data pipeline would give, as synthetic numpy arrays (`synthetic_batch`) or
as abstract sharded shapes (`abstract_batch`); every pretrained model an objective names, randomly
initialised straight into its shardings (`random_pretrained`) or left abstract (`abstract_state`);
the model FLOPs of a train step of every DiT objective and of a streaming chunk from the
architecture (`model_flops`, `train_flops`, `stream_chunk_flops`); and the named programs of a
config (`train_program`, `stream_program`: the jitted function and its abstract sharded arguments,
nothing allocated, nothing read from disk). `launch/benchmark_train.py` times the real step with
these; `launch/compile_tpu.py` compiles the same programs for TPU topologies it does not have. The
train step goes through `loop.setup` and `loop.jit_train_step`, the code `launch/train.py` runs;
the streaming step and segment through `build.streamer` and `Streamer.jit_step` / `jit_segment`,
the code `launch/rollout.py` runs.

Must not know: files, command lines, devices beyond the mesh it is given.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adastate_jax import build
from adastate_jax import config as config_lib
from adastate_jax import sharding as shd
from adastate_jax.models import attention as attn
from adastate_jax.models import wan
from adastate_jax.streaming.cache import carry_shardings
from adastate_jax.streaming.decoders import decoder_from_module
from adastate_jax.training import loop


def clip_frames(run, frames: int | None = None) -> int:
    """Latent frames per example: `frames`, else the PanWorld / video clip length, else 21."""
    if frames:
        return int(frames)
    return run.exp.data.clip_frames or 21


def _batch_fields(run, frames: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    exp = run.exp
    b, sc, mc = exp.train.batch_size, exp.stream, exp.model
    if exp.train.objective == "vae":
        pw = exp.data.panworld
        return {"video": ((b, frames, pw.frame_height, pw.frame_width, 3), np.float32)}
    clip = (frames, sc.latent_h, sc.latent_w, mc.in_channels)
    out = {"latents": ((b, *clip), np.float32)}
    if exp.data.source == "ode_trajectories":  # stored ODE trajectories (data/trajectories.py), in
        # float32, their default storage dtype (a float16 / bfloat16 store halves these arguments)
        out["trajectory"] = ((b, len(exp.sampler.denoising_steps), *clip), np.float32)
    if exp.text.kind == "words":
        out["prompt_ids"] = ((b, mc.text_len), np.int32)
    else:
        out["text"] = ((b, mc.text_len, mc.text_dim), np.float32)
    return out


def synthetic_batch(run, frames: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of random arrays with the shapes and dtypes the pipeline gives."""
    from adastate_jax.data.panworld import prompt_vocabulary

    rng = np.random.default_rng(seed)
    out = {}
    for k, (shape, dtype) in _batch_fields(run, clip_frames(run, frames)).items():
        if k == "prompt_ids":
            out[k] = rng.integers(0, len(prompt_vocabulary()), shape).astype(dtype)
        else:
            out[k] = rng.standard_normal(shape).astype(dtype)
    return out


def abstract_batch(run, frames: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs sharded over the run's batch axes."""
    out = {}
    for k, (shape, dtype) in _batch_fields(run, clip_frames(run, frames)).items():
        spec = jax.sharding.PartitionSpec(run.batch_sharding.spec[0], *([None] * (len(shape) - 1)))
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(run.mesh, spec))
    return out


def random_pretrained(run) -> dict:
    """Every pretrained model of the objective, randomly initialised straight into its shardings."""
    out = {}
    for i, (name, (_, shardings, _)) in enumerate(run.pretrained.items()):
        mcfg = run.objective.pretrained()[name][0]

        def make(mcfg=mcfg, seed=i):
            return nnx.split(wan.create_model(mcfg, seed=seed))[1]

        out[name] = jax.jit(make, out_shardings=shardings)()
    return out


def init_random_state(run):
    """The run's real train state, created sharded, with random pretrained models."""
    rng = jax.random.key_data(jax.random.key(run.exp.train_seed))
    init = jax.jit(run.objective.init_state, out_shardings=run.state_shardings)
    return init(rng, random_pretrained(run))


def abstract_state(run):
    """The train state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
    return _sds(run.abstract_state, run.state_shardings)


def model_flops(model_cfg: wan.WanConfig, batch: int, frames: int, tokens_per_frame: int, mask=None) -> float:
    """FLOPs of one forward of the DiT on [batch, frames] (2 per multiply-add).

    Matmuls per video token and layer: self-attention q/k/v/o (4 d^2), cross-attention q/o (2 d^2),
    FFN (2 d f); per text token and layer the cross-attention k/v (2 d^2). Attention: QK^T and AV,
    2 d multiply-adds per (query, allowed key) pair, i.e. 4 d FLOPs (`mask`: [F, F] frame mask of
    the allowed key frames; None = all), plus 4 d per (query, text token). Embeddings, norms,
    modulation and the head are left out (< 1% at Wan sizes).
    """
    d, f_dim, n_layers = model_cfg.dim, model_cfg.ffn_dim, model_cfg.num_layers
    t = batch * frames * tokens_per_frame
    dense = 2 * t * n_layers * (4 * d * d + 2 * d * d + 2 * d * f_dim)
    text = 2 * batch * model_cfg.text_len * n_layers * 2 * d * d
    pairs = (frames * frames if mask is None else int(np.asarray(mask, bool).sum())) * tokens_per_frame**2
    attention = 4 * d * batch * n_layers * pairs + 4 * d * t * n_layers * model_cfg.text_len
    return float(dense + text + attention)


def clip_forward_flops(
    model_cfg: wan.WanConfig, batch: int, frames: int, tokens_per_frame: int, layout
) -> float:
    """FLOPs of one `flow_matching.clip_forward` of `layout` (a ClipLayout) on [batch, frames]:
    'teacher_forcing' runs [clean; noisy], 2 x frames, under its mask."""
    if layout.attention == "bidirectional":
        return model_flops(model_cfg, batch, frames, tokens_per_frame)
    if layout.attention == "diffusion_forcing":
        mask = attn.block_causal_mask(frames, layout.chunk_frames)
        return model_flops(model_cfg, batch, frames, tokens_per_frame, mask)
    mask = attn.teacher_forcing_mask(frames, layout.chunk_frames, layout.window_frames, layout.sink_frames)
    return model_flops(model_cfg, batch, 2 * frames, tokens_per_frame, mask)


def stream_chunk_flops(exp, streamer, batch: int, denoising_forwards: float | None = None) -> float:
    """FLOPs of one `Streamer.step` (one chunk): `denoising_forwards` (default: every denoising
    step) forwards plus the cache refresh, each over the chunk's frames (adaptive state included)
    with classifier-free guidance's second branch, attending to every cache slot and the chunk (the
    kernel computes empty slots too, masked). The decoder and the prompt encoding are left out."""
    sc, mc = streamer.stream_cfg, streamer.model_cfg
    p = mc.tokens_per_frame(sc.latent_h, sc.latent_w)
    f = sc.frames_per_call
    if denoising_forwards is None:
        denoising_forwards = len(streamer.sampler_cfg.denoising_steps)
    one = model_flops(mc, batch * streamer.branches, f, p, np.ones((f, sc.num_slots + f), bool))
    return (denoising_forwards + 1) * one


def train_flops(run, frames: int | None = None) -> float | None:
    """Model FLOPs of one train step of a DiT objective (None for 'vae'), from the architecture.

    Counted as in MFU: a backward is 2 forwards, rematerialised recomputation is not counted.
      flow_matching  3 x the forward under `train.attention`'s layout;
      ode_init       the student's 3 x forward (teacher forcing), plus on the fly the teacher's
                     trajectory: denoising steps x `ode_substeps` forwards, x2 with guidance;
      self_forcing_dmd  `critic_steps` x (a student rollout + 3 x the critic's flow-matching
                     forward) + the generator: its rollout forward and backward (3 x), the teacher
                     (x2 with guidance) and the critic forward. A rollout runs E[exit step + 1] =
                     (n + 1) / 2 of the n denoising steps per chunk (the exit step is uniform),
                     plus the cache refresh (`stream_chunk_flops`).
    """
    exp, obj = run.exp, run.objective
    tc = exp.train
    if tc.objective == "vae":
        return None
    frames = clip_frames(run, frames)
    b = tc.batch_size
    p = exp.model.tokens_per_frame(exp.stream.latent_h, exp.stream.latent_w)
    if tc.objective == "flow_matching":
        return 3 * clip_forward_flops(exp.model, b, frames, p, obj.layout)
    guided = 1 if tc.teacher_guidance == 1.0 else 2
    if tc.objective == "ode_init":
        student = 3 * clip_forward_flops(exp.model, b, frames, p, obj.student_layout)
        if obj.stored:
            return student
        passes = len(obj.timesteps) * obj.substeps * guided
        return student + passes * clip_forward_flops(obj.teacher_cfg, b, frames, p, obj.teacher_layout)
    chunks = frames // exp.stream.chunk_frames
    rollout = chunks * stream_chunk_flops(exp, obj.streamer, b, (obj.num_exits + 1) / 2)
    critic_fwd = clip_forward_flops(obj.critic_cfg, b, frames, p, obj.layout)
    teacher_fwd = guided * clip_forward_flops(obj.teacher_cfg, b, frames, p, obj.layout)
    return obj.critic_steps * (rollout + 3 * critic_fwd) + 3 * rollout + teacher_fwd + critic_fwd


def step_flops(run, frames: int | None = None) -> float | None:
    """Model FLOPs of one flow-matching train step (3x the forward: forward + backward), or None
    for the other objectives (`train_flops` counts those)."""
    if run.exp.train.objective != "flow_matching":
        return None
    return train_flops(run, frames)


# --------------------------------------------------------------------------------------------
# Named programs: a jitted function and its abstract arguments (for ahead-of-time compiles)
# --------------------------------------------------------------------------------------------

ABSTRACT_PATH = "(abstract: never read)"


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function (`fn.lower(*args)` compiles it) and abstract sharded arguments for it."""

    fn: Callable
    args: tuple
    flops: float | None  # model FLOPs of one call (None: not counted)
    summary: str  # what one call computes, in words


def _sds(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying their shardings; a leaf of `shardings` may stand
    for a whole subtree of `tree` (`state_shardings` gives one per nnx Variable)."""

    def attach(sharding, sub):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), sub)

    return jax.tree.map(attach, shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def with_abstract_pretrained(cfg):
    """A copy of `cfg` whose empty `train.teacher_path` (ode_init / self_forcing_dmd) names a
    placeholder: set-up needs a path for every pretrained model, an abstract state reads none."""
    cfg = cfg.copy_and_resolve_references()
    tc = cfg.get("train")
    if tc is not None and tc.objective in ("ode_init", "self_forcing_dmd") and not tc.teacher_path:
        with cfg.unlocked():
            tc.teacher_path = ABSTRACT_PATH
    return cfg


def train_program(cfg, mesh: jax.sharding.Mesh, frames: int | None = None) -> Program:
    """The train step of `cfg` on `mesh` as `launch/train.py` jits it (`loop.setup`,
    `loop.jit_train_step`: state donated, in/out shardings), with the abstract train state (every
    pretrained model abstract, nothing read) and the abstract global batch of `frames` latent frames
    (default `clip_frames`)."""
    run = loop.setup(with_abstract_pretrained(cfg), workdir="", mesh=mesh)
    tc, frames = run.exp.train, clip_frames(run, frames)
    layout = tc.attention if tc.objective == "flow_matching" else f"anchor {run.exp.stream.anchor}"
    return Program(
        fn=loop.jit_train_step(run),
        args=(abstract_state(run), abstract_batch(run, frames)),
        flops=train_flops(run, frames),
        summary=f"{tc.objective} ({layout}), global batch {tc.batch_size} x {frames} latent frames",
    )


def abstract_decoder(exp, mesh: jax.sharding.Mesh):
    """(decoder, abstract params replicated on `mesh`) of `config.vae` as `build.decoder` makes it,
    without allocating or reading weights; (None, None) for 'none'."""
    if exp.vae.kind == "none":
        return None, None
    with warnings.catch_warnings():  # 'randomly initialised VAE': nothing is initialised here
        warnings.simplefilter("ignore")
        module = nnx.eval_shape(lambda: build.vae_module(exp))
    decoder, params = decoder_from_module(module)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return decoder, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params
    )


def stream_program(exp, mesh: jax.sharding.Mesh, kind: str = "step", segment_chunks: int = 8) -> Program:
    """The streaming program of `exp` on `mesh` as `launch/rollout.py` runs it: the `Streamer` of
    `build.streamer` with `config.vae`'s decoder in the carry, DiT params sharded by the rules
    table, the carry and prompt table sharded as rollout.py places them; `kind` 'step'
    (`Streamer.jit_step`, one chunk) or 'segment' (`Streamer.jit_segment`, a scan over
    `segment_chunks` chunks). Batch `config.stream.batch_size`, one prompt."""
    if kind not in ("step", "segment"):
        raise ValueError(f"stream_program: kind must be 'step' or 'segment', got {kind!r}")
    sizes = config_lib.mesh_sizes(exp, mesh)
    config_lib.check_mesh(exp, sizes)
    config_lib.check_batch(exp, sizes, exp.stream.batch_size, "stream.batch_size")
    rules, mc, b = exp.sharding_rules, exp.model, exp.stream.batch_size
    graphdef, abstract = wan.abstract_model(mc)
    params = _sds(abstract, build.param_shardings(abstract, mesh, exp))
    decoder, decoder_params = abstract_decoder(exp, mesh)
    streamer = build.streamer(exp, graphdef, decoder_=decoder)
    shard = lambda *logical: shd.named_sharding(mesh, logical, rules)  # noqa: E731
    prompts = jax.ShapeDtypeStruct(
        (1, b, mc.text_len, mc.text_dim), jnp.float32, sharding=shard(None, "batch", None, None)
    )
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    carry = jax.eval_shape(
        lambda p, t, k, d: streamer.init_carry(p, t, k, 0, decoder_params=d),
        params,
        prompts,
        key,
        decoder_params,
    )
    carry = _sds(carry, carry_shardings(carry, mesh, rules))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=shard())
    chunk = stream_chunk_flops(exp, streamer, b)
    what = f"anchor {exp.stream.anchor}, batch {b}, {len(exp.sampler.denoising_steps)} denoising steps"
    if kind == "step":
        return Program(
            streamer.jit_step,
            (params, carry, scalar, prompts, None, decoder_params),
            chunk,
            f"one chunk, {what}",
        )
    ids = jax.ShapeDtypeStruct((segment_chunks,), jnp.int32, sharding=shard(None))
    return Program(
        streamer.jit_segment,
        (params, carry, ids, scalar, prompts, None, decoder_params),
        segment_chunks * chunk,
        f"scan over {segment_chunks} chunks, {what}",
    )


# --------------------------------------------------------------------------------------------
# Named stages: which program of which config
# --------------------------------------------------------------------------------------------

TRAIN_STAGES = ("teacher", "teacher_tf", "ode", "dmd")  # the words of the recipe config files
STREAM_STAGES = ("step", "segment")


@dataclasses.dataclass(frozen=True)
class Stage:
    """A program of a config, by name: `teacher`, `teacher_tf`, `ode[:anchor]`, `dmd[:anchor]`
    (train steps; the word selects the stage in a recipe file such as `configs/wan_1_3b_train.py`)
    or `step[:anchor]` / `segment[:anchor]` (streaming). An anchor sets `config.stream.anchor`, as
    `launch/rollout.py --anchor` does."""

    kind: str
    anchor: str | None = None

    @classmethod
    def parse(cls, name: str) -> Stage:
        from adastate_jax.streaming.anchors import POLICIES

        kind, _, anchor = name.strip().partition(":")
        if kind not in TRAIN_STAGES + STREAM_STAGES:
            raise ValueError(
                f"stage {name!r}: unknown kind {kind!r}; choose from {TRAIN_STAGES + STREAM_STAGES}"
            )
        if anchor and anchor not in POLICIES:
            raise ValueError(
                f"stage {name!r}: unknown anchor policy {anchor!r}; choose from {list(POLICIES)}"
            )
        if anchor and kind in ("teacher", "teacher_tf"):
            raise ValueError(f"stage {name!r}: a teacher has no anchor policy")
        return cls(kind, anchor or None)

    @property
    def name(self) -> str:
        return self.kind + (f":{self.anchor}" if self.anchor else "")

    @property
    def trains(self) -> bool:
        return self.kind in TRAIN_STAGES

    def config_spec(self, spec: str) -> str:
        """`FILE[:args]` of this stage: a train stage's word joins the file's args (`FILE:dmd,v5p-128`)."""
        if not self.trains:
            return spec
        path, _, args = spec.partition(":")
        return f"{path}:{','.join(filter(None, [self.kind, args]))}"

    def overrides(self) -> dict[str, str]:
        """Config fields this stage sets (dotted paths)."""
        return {"stream.anchor": self.anchor} if self.anchor else {}


def default_stages(trains: bool) -> list[Stage]:
    """Every training stage (DMD for adastate and sink) when the config trains, and the streaming
    step and segment of every anchor policy."""
    from adastate_jax.streaming.anchors import POLICIES

    names = ["teacher", "teacher_tf", "ode", "dmd:adastate", "dmd:sink"] if trains else []
    names += [f"{kind}:{p}" for kind in STREAM_STAGES for p in POLICIES]
    return [Stage.parse(n) for n in names]


def stage_program(
    cfg, stage: Stage, mesh: jax.sharding.Mesh, frames: int | None = None, segment_chunks: int = 8
) -> Program:
    """The program of `stage` for the ConfigDict `cfg` of that stage (`Stage.config_spec` loaded,
    `Stage.overrides` applied) on `mesh`."""
    if stage.trains:
        if cfg.get("train") is None:
            raise ValueError(f"stage {stage.name!r}: the config has no train section")
        return train_program(cfg, mesh, frames)
    return stream_program(config_lib.parse(cfg), mesh, stage.kind, segment_chunks)


def compile_stage(cfg, stage: Stage, topology: str, frames: int | None = None, segment_chunks: int = 8):
    """Compile `stage` of the ConfigDict `cfg` (of that stage) for a TPU topology without a TPU:
    `config.mesh` over the topology's chips, `stage_program`, `tpu_compile.compile_for`.
    Returns (report, program); raises `tpu_compile.DoesNotFit` naming stage, topology and memory."""
    from adastate_jax import tpu_compile

    sizes = dataclasses.asdict(config_lib.parse(cfg).mesh)
    mesh = tpu_compile.topology_mesh(topology, **sizes)
    program = stage_program(cfg, stage, mesh, frames, segment_chunks)
    _, report = tpu_compile.compile_for(
        program.fn, program.args, stage=stage.name, topology=topology, mesh=mesh, model_flops=program.flops
    )
    return report, program
