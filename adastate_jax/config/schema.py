"""The experiment schema: one typed dataclass per config section, and `parse` (the only validator).

Owns: the declaration of every config field that is not owned by a model or engine module (the
`train` section, grouped per objective; the `data` section, one sub-section per source; `vae`,
`text`, `checkpoint`), the `Experiment` that gathers all sections, and `parse(config_dict)`: an
ml_collections ConfigDict (a `configs/*.py` file with its `--config.x=y` overrides) -> `Experiment`,
raising one `ValueError` that names the offending field (`config.<section>.<field>: ...`,
unknown fields with the closest known one).

Sections declared by the module that owns their meaning (and imported here):
  model, teacher_model, critic_model   `models.wan.WanConfig`
  stream                               `streaming.anchors.StreamConfig`
  sampler                              `streaming.sampler.SamplerConfig`
  mesh                                 `sharding.MeshConfig`
  vae.patch / vae.wan                  `models.vae.PatchCodecConfig` / `models.vae.WanVAEConfig`
  text.umt5                            `models.umt5.UMT5Config`
  data.panworld                        `data.panworld.PanWorldConfig`
  data.video                           `data.video_source.VideoDataConfig`
Each field is declared once, with its type, default and rule; config files are generated from these
defaults (`config.defaults`), so a field added to a dataclass appears in every config.

Must not know: how sections are used (models, streaming, training, data do that), files, devices.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping

from adastate_jax import sharding as shd
from adastate_jax.data.panworld import PanWorldConfig
from adastate_jax.data.pipeline import SOURCE_NAMES
from adastate_jax.data.video_source import VideoDataConfig
from adastate_jax.dataclass_config import closest, coerce
from adastate_jax.models.umt5 import UMT5Config
from adastate_jax.models.vae import PatchCodecConfig, WanVAEConfig
from adastate_jax.models.wan import WanConfig
from adastate_jax.streaming.anchors import POLICIES, StreamConfig
from adastate_jax.streaming.sampler import SamplerConfig


def _bad(field: str, msg: str) -> ValueError:
    return ValueError(f"config.{field}: {msg}")


def _choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise _bad(field, f"unknown {value!r}{closest(value, choices)}; choose from {list(choices)}")


# --------------------------------------------------------------------------------------------
# vae, text, checkpoint
# --------------------------------------------------------------------------------------------

VAE_KINDS = ("none", "patch", "wan")
TEXT_KINDS = ("embeddings", "umt5", "words")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`config.vae`: how latents become pixels. `kind` picks the sub-section that is used."""

    kind: str = "patch"  # none (show latents) | patch (PatchCodec) | wan (the Wan VAE)
    patch: PatchCodecConfig = PatchCodecConfig()
    wan: WanVAEConfig = WanVAEConfig()

    def __post_init__(self):
        _choice("vae.kind", self.kind, VAE_KINDS)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """`config.text`: how prompts become `[B, text_len, text_dim]` embeddings."""

    kind: str = "words"  # words (PanWorld word encoder) | embeddings (a file) | umt5
    tokenizer_path: str = ""  # umt5: sentencepiece / HF tokenizer
    embeddings_path: str = ""  # embeddings: .npy / .npz / .safetensors of precomputed prompts
    cache_dir: str = ""  # umt5: on-disk prompt cache ('' for none)
    umt5: UMT5Config = UMT5Config()

    def __post_init__(self):
        _choice("text.kind", self.kind, TEXT_KINDS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`config.checkpoint`: converted / trained DiT params to stream from (`launch/convert.py --out`)."""

    path: str = ""


# --------------------------------------------------------------------------------------------
# train: common fields + one group per objective (flat on the command line: --config.train.alpha)
# --------------------------------------------------------------------------------------------

OBJECTIVES = ("flow_matching", "ode_init", "self_forcing_dmd", "vae")
SCHEDULES = ("constant", "cosine")
ATTENTION_LAYOUTS = ("bidirectional", "diffusion_forcing", "teacher_forcing")
T_SAMPLING = ("clip", "chunk", "frame")
CRITIC_INITS = ("teacher", "random")
STATE_LOSSES = ("none", "dmd", "regress")
RECON_LOSSES = ("mse", "l1_mse")


@dataclasses.dataclass(frozen=True)
class _CommonTrain:
    objective: str = "flow_matching"  # flow_matching | ode_init | self_forcing_dmd | vae
    steps: int = 2500
    batch_size: int = 8  # global; divisible by the mesh's batch axes and the process count
    lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine
    final_lr_fraction: float = 0.1  # cosine: lr at the end / lr
    warmup: int = 20
    b1: float = 0.9
    b2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clip (0: none)
    ema: float = 0.99  # EMA decay of the trained params (0: no EMA)
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 3
    async_checkpoints: bool = True
    seed: int = -1  # PRNG of the train state (noise, timesteps, rollouts); -1: config.seed
    log_data_order: bool = False  # write the clip indices of every step to WORKDIR/data_order.jsonl
    bad_batches: str = "stop"  # a non-finite step: stop (save, exit 3) | skip (log the batch, go on)
    inject_nan_at: int = -1  # testing hook: make the batch of this step non-finite
    init_from: str = ""  # params dir (a previous stage's WORKDIR/export) to start from
    # the anchor policy of the student in init_from ('' : not stated; else checked against its
    # config.json and recorded in this run's export info.json with its steps, see training/loop.py)
    init_policy: str = ""
    teacher_path: str = ""  # ode / dmd: the teacher's params dir

    def _check_common(self):
        _choice("train.objective", self.objective, OBJECTIVES)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.bad_batches", self.bad_batches, ("stop", "skip"))
        if self.steps < 0:
            raise _bad("train.steps", f"must be >= 0, got {self.steps}")
        for f in ("batch_size", "log_every", "ckpt_every", "keep"):
            if getattr(self, f) < 1:
                raise _bad(f"train.{f}", f"must be a positive int, got {getattr(self, f)}")
        if self.warmup < 0:
            raise _bad("train.warmup", f"must be >= 0, got {self.warmup}")
        if not 0.0 <= self.ema < 1.0:
            raise _bad("train.ema", f"must be in [0, 1), got {self.ema}")
        if self.lr < 0:
            raise _bad("train.lr", f"must be >= 0, got {self.lr}")
        if self.init_policy:
            _choice("train.init_policy", self.init_policy, POLICIES)
            if not self.init_from:
                raise _bad(
                    "train.init_policy", f"{self.init_policy!r} is set but config.train.init_from is empty"
                )


@dataclasses.dataclass(frozen=True)
class _FlowMatchingTrain:
    attention: str = "diffusion_forcing"  # bidirectional | diffusion_forcing | teacher_forcing
    t_sampling: str = "chunk"  # clip | chunk | frame (also the DMD critic's)
    # the clip policy of the causal layouts (teacher / diffusion forcing, the ODE / DMD teacher's
    # and critic's scores): frames visible before a chunk (-1: all, policy `full`; else `window`,
    # >= stream.chunk_frames) and first frames always visible with a window (policy `sink`);
    # absolute time (`streaming.anchors.clip_policy`)
    tf_window: int = -1
    tf_sink: int = 0
    # prompt dropout of teacher training: each example's prompt embeddings zeroed with this
    # probability (the unconditional input of classifier-free guidance); 0 keeps the noise draws
    text_dropout: float = 0.0

    def _check_flow_matching(self):
        _choice("train.attention", self.attention, ATTENTION_LAYOUTS)
        _choice("train.t_sampling", self.t_sampling, T_SAMPLING)
        if not 0.0 <= self.text_dropout <= 1.0:
            raise _bad("train.text_dropout", f"must be in [0, 1], got {self.text_dropout}")
        if self.tf_sink < 0:
            raise _bad("train.tf_sink", f"must be >= 0, got {self.tf_sink}")


@dataclasses.dataclass(frozen=True)
class _OdeInitTrain:
    teacher_attention: str = "diffusion_forcing"  # the teacher's layout (ODE trajectories; DMD scores)
    teacher_guidance: float = 1.0  # CFG scale of the teacher (ODE trajectories and DMD real score)
    ode_substeps: int = 4  # teacher Euler steps between two student timesteps

    def _check_ode(self):
        _choice("train.teacher_attention", self.teacher_attention, ATTENTION_LAYOUTS)
        if self.ode_substeps < 1:
            raise _bad("train.ode_substeps", f"must be >= 1, got {self.ode_substeps}")


@dataclasses.dataclass(frozen=True)
class _DMDTrain:
    alpha: float = 2.0  # horizon weighting: w_i = 1 + alpha * i / (N - 1), mean 1 (0: plain DMD)
    critic_steps: int = 2  # critic updates per generator update (Self-Forcing: 5)
    critic_lr: float = 1e-3
    critic_b1: float = 0.0
    dmd_b1: float = 0.0  # the generator's Adam b1 in DMD
    dmd_min_t: int = 20
    dmd_max_t: int = 980
    truncation_chunks: int = 2  # adastate: gradient through the carry for K chunks (others: 1)
    remat_chunks: bool = True  # jax.checkpoint per chunk of the rollout
    critic_path: str = ""  # params dir of the critic ('' : see critic_init)
    critic_init: str = "teacher"  # teacher | random (used when critic_path is '')
    # how the adaptive state learns besides the chunks that read it (truncation_chunks): a direct
    # signal on every chunk's clean state (adastate only; training/objectives/dmd.py): none | dmd
    # (scored by teacher vs critic as frames at the state slot's temporal index) | regress (toward
    # the mean of its chunk's content, stop-gradient)
    state_loss: str = "none"
    state_loss_weight: float = 1.0  # weight of the state term in the generator loss

    def _check_dmd(self):
        _choice("train.critic_init", self.critic_init, CRITIC_INITS)
        _choice("train.state_loss", self.state_loss, STATE_LOSSES)
        if not (self.state_loss_weight >= 0 and math.isfinite(self.state_loss_weight)):
            raise _bad(
                "train.state_loss_weight", f"must be a finite number >= 0, got {self.state_loss_weight}"
            )
        if self.critic_steps < 1:
            raise _bad("train.critic_steps", f"must be >= 1, got {self.critic_steps}")
        if self.truncation_chunks < 1:
            raise _bad("train.truncation_chunks", f"must be >= 1, got {self.truncation_chunks}")
        if not 0 <= self.dmd_min_t < self.dmd_max_t:
            raise _bad(
                "train.dmd_min_t", f"need 0 <= dmd_min_t < dmd_max_t, got {self.dmd_min_t}, {self.dmd_max_t}"
            )
        if self.critic_path and self.critic_init == "random":
            raise _bad(
                "train.critic_path",
                "config.train.critic_path and config.train.critic_init='random' contradict each other: "
                "clear one of them",
            )


@dataclasses.dataclass(frozen=True)
class _VAETrain:
    kl_weight: float = 1e-4
    recon_loss: str = "mse"  # mse | l1_mse
    vae_chunk_latents: int = 1  # latents per encode/decode chunk (scan steps)

    def _check_vae(self):
        _choice("train.recon_loss", self.recon_loss, RECON_LOSSES)
        if self.kl_weight < 0:
            raise _bad("train.kl_weight", f"must be >= 0, got {self.kl_weight}")
        if self.vae_chunk_latents < 1:
            raise _bad("train.vae_chunk_latents", f"must be >= 1, got {self.vae_chunk_latents}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_VAETrain, _DMDTrain, _OdeInitTrain, _FlowMatchingTrain, _CommonTrain):
    """`config.train`: the common fields and each objective's group (see the base classes); flat on
    the command line (`--config.train.alpha=4`)."""

    def __post_init__(self):
        self._check_common()
        self._check_flow_matching()
        self._check_ode()
        self._check_dmd()
        self._check_vae()

    def state_seed(self, config_seed: int) -> int:
        """The train state's PRNG seed: `train.seed` when >= 0, else `config.seed`."""
        return self.seed if self.seed >= 0 else int(config_seed)


# --------------------------------------------------------------------------------------------
# data: common fields + one sub-section per source
# --------------------------------------------------------------------------------------------

DATA_SOURCES = SOURCE_NAMES  # the source registry's names (`data/pipeline.py`: `SOURCES`)
DATA_CODECS = ("patch", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: the grain input pipeline (`data/pipeline.py` registers the sources)."""

    source: str = "panworld"  # panworld | arrayrecord | video | ode_trajectories
    paths: tuple[str, ...] = ()  # arrayrecord / ode_trajectories shards, video files (files, dirs, globs)
    codec: str = (
        "patch"  # panworld / video: 'patch' (PatchCodec latents) | 'none' (pixels, the vae objective)
    )
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0  # grain worker processes (0: in-process)
    read_threads: int = 1
    prefetch: int = 2
    panworld: PanWorldConfig = PanWorldConfig()
    video: VideoDataConfig = VideoDataConfig()

    def __post_init__(self):
        _choice("data.source", self.source, DATA_SOURCES)
        _choice("data.codec", self.codec, DATA_CODECS)
        for f in ("worker_count",):
            if getattr(self, f) < 0:
                raise _bad(f"data.{f}", f"must be >= 0, got {getattr(self, f)}")
        for f in ("read_threads", "prefetch"):
            if getattr(self, f) < 1:
                raise _bad(f"data.{f}", f"must be >= 1, got {getattr(self, f)}")
        if self.source in ("arrayrecord", "video", "ode_trajectories") and not self.paths:
            raise _bad("data.paths", f"data.source={self.source!r} needs paths (files, directories or globs)")

    @property
    def clip_frames(self) -> int | None:
        """Frames per clip of the procedural / video sources (None: given by the stored records)."""
        if self.source == "panworld":
            return self.panworld.num_frames
        if self.source == "video":
            return self.video.num_frames
        return None


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------

SECTIONS = (
    "model",
    "teacher_model",
    "critic_model",
    "mesh",
    "sharding_rules",
    "stream",
    "sampler",
    "vae",
    "text",
    "checkpoint",
    "seed",
    "train",
    "data",
)
REQUIRED = ("model",)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every section of a config, typed. `train` / `data` are None for configs that only stream."""

    model: WanConfig = WanConfig()
    teacher_model: WanConfig | None = None  # DMD / ODE teacher; None: the student's
    critic_model: WanConfig | None = None  # DMD critic; None: the teacher's
    mesh: shd.MeshConfig = shd.MeshConfig()
    sharding_rules: tuple = shd.DEFAULT_RULES
    stream: StreamConfig = StreamConfig()
    sampler: SamplerConfig = SamplerConfig()
    vae: VAEConfig = VAEConfig()
    text: TextConfig = TextConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: int = 0
    train: TrainConfig | None = None
    data: DataConfig | None = None

    # --- derived ----------------------------------------------------------------------------
    @property
    def teacher(self) -> WanConfig:
        return self.teacher_model or self.model

    @property
    def critic(self) -> WanConfig:
        return self.critic_model or self.teacher

    @property
    def train_seed(self) -> int:
        return self.train.state_seed(self.seed) if self.train is not None else self.seed

    def patch_codec(self):
        """The PatchCodec of `vae.patch` with the DiT's latent channels."""
        return self.vae.patch.codec(self.model.in_channels)


def _section(cfg, name):
    try:
        return cfg[name]
    except (KeyError, AttributeError):
        return None


def parse_sharding_rules(raw) -> tuple:
    """`config.sharding_rules` normalised and checked against the known logical axis names."""
    try:
        rules = shd.rules_from_config(raw)
    except (ValueError, TypeError) as e:
        raise _bad("sharding_rules", str(e)) from None
    known = {name for name, _ in shd.DEFAULT_RULES}
    names = [name for name, _ in rules]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _bad(
            "sharding_rules",
            f"unknown logical axis name(s) {unknown}{closest(unknown[0], known)}; known: {sorted(known)}",
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _bad("sharding_rules", f"logical axis name(s) {dup} have more than one rule")
    absent = sorted(known - set(names))
    if absent:
        raise _bad("sharding_rules", f"no rule for logical axis name(s) {absent}")
    return rules


def parse(cfg) -> Experiment:
    """ConfigDict (or mapping) -> Experiment; one ValueError naming the first bad field."""
    if isinstance(cfg, Experiment):
        return cfg
    given = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = [k for k in given if k not in SECTIONS]
    if unknown:
        raise ValueError(
            f"config.{unknown[0]}: unknown section{closest(unknown[0], SECTIONS)}; sections: {list(SECTIONS)}"
        )
    missing = [k for k in REQUIRED if k not in given]
    if missing:
        raise _bad(missing[0], "missing section")
    types_ = typing.get_type_hints(Experiment)
    kwargs = {}
    for name, value in given.items():
        if name == "sharding_rules":
            kwargs[name] = parse_sharding_rules(value)
        elif name == "seed":
            kwargs[name] = coerce(value, int, "seed")
            if kwargs[name] < 0:
                raise _bad("seed", f"must be >= 0, got {kwargs[name]}")
        elif value is None:
            kwargs[name] = None
        else:
            tp = types_[name]
            kwargs[name] = coerce(value, tp, name)
    exp = Experiment(**kwargs)
    check_consistency(exp)
    return exp


def check_consistency(exp: Experiment) -> None:
    """Rules that involve more than one section."""
    _, ph, pw = exp.model.patch_size
    for field, v, p in (
        ("stream.latent_h", exp.stream.latent_h, ph),
        ("stream.latent_w", exp.stream.latent_w, pw),
    ):
        if v % p:
            raise _bad(field, f"{v} is not divisible by the patch size {p} (config.model.patch_size)")
    tc = exp.train
    if tc is not None and tc.objective == "self_forcing_dmd" and tc.state_loss != "none":
        if exp.stream.anchor != "adastate":
            raise _bad(
                "train.state_loss",
                f"{tc.state_loss!r} is a signal on the adaptive state; config.stream.anchor="
                f"{exp.stream.anchor!r} has none (use 'none', or anchor 'adastate')",
            )
    if exp.data is not None:
        frames = exp.data.clip_frames
        chunk = exp.stream.chunk_frames
        if frames is not None and frames % chunk:
            raise _bad(
                f"data.{exp.data.source}.num_frames",
                f"{frames} is not a whole number of chunks (config.stream.chunk_frames={chunk})",
            )


# --------------------------------------------------------------------------------------------
# Meshes: the sizes, and divisibility of the model and batch over them
# --------------------------------------------------------------------------------------------


def mesh_sizes(exp: Experiment, mesh=None, device_count: int | None = None) -> dict[str, int]:
    """Sizes of the mesh axes: from `mesh` (a jax Mesh or a dict) or from `config.mesh`."""
    if mesh is not None:
        shape = dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, Mapping) else dict(mesh)
        return {a: int(shape.get(a, 1)) for a in shd.MESH_AXES}
    return exp.mesh.sizes(device_count)


def _axes_size(axes, sizes: dict[str, int]) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sizes[a] for a in axes)


def check_batch(exp: Experiment, sizes: dict[str, int], batch: int, field: str) -> None:
    """`batch` (named by `field`) divides the mesh axes the batch is sharded over."""
    batch_axes = dict(exp.sharding_rules).get("batch")
    n = _axes_size(batch_axes, sizes)
    if batch % n:
        raise _bad(
            field,
            f"{batch} is not divisible by the mesh axes {batch_axes} the batch is sharded over "
            f"(size {n}; mesh {sizes})",
        )


def check_mesh(exp: Experiment, sizes: dict[str, int], models: Mapping[str, WanConfig] | None = None) -> None:
    """Every parameter dim of the DiT(s) divides the mesh axes its logical name maps to."""
    from flax import nnx

    from adastate_jax.models import wan

    models = dict(models or {"model": exp.model})
    for prefix, mc in models.items():
        wan.validate_mesh_divisibility(mc, sizes, prefix)
        _, abstract = wan.abstract_model(mc)
        specs = dict(_flatten(nnx.to_pure_dict(nnx.get_partition_spec(abstract))))
        for path, leaf in _flatten(nnx.to_pure_dict(abstract)):
            logical = specs.get(path)
            if logical is None:
                continue
            mesh_spec = shd.logical_to_mesh_spec(tuple(logical), exp.sharding_rules)
            for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(mesh_spec))):
                n = _axes_size(axes, sizes)
                if size % n:
                    raise _bad(
                        "sharding_rules",
                        f"{prefix} parameter {path} dim {dim} (logical {logical[dim]!r}, size {size}) is "
                        f"not divisible by mesh axes {axes} (size {n}; mesh {sizes})",
                    )


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "Experiment",
    "TextConfig",
    "TrainConfig",
    "VAEConfig",
    "check_batch",
    "check_mesh",
    "mesh_sizes",
    "parse",
    "parse_sharding_rules",
]
