"""Stored teacher ODE trajectories (`config.data.source='ode_trajectories'`) for `ode_init`.

Owns: the on-disk format written by `launch/make_ode_trajectories.py` (metadata, records, atomic
resumable shards) and its grain source, `make_source(exp) -> (source, None)`, which checks the
files against the run before training.

Directory layout (`config.data.paths`: one or more such directories, or shard files in them):

    DIR/metadata.json                           what generated the records (below)
    DIR/trajectories-SSSSS-of-NNNNN.array_record  `clips_per_file` records each (the last: the rest)
    DIR/.trajectories-SSSSS-of-NNNNN.array_record.tmp-*   an unfinished shard (ignored; the
                                                generator writes there and renames when complete)

One record (an .npz without pickles, one per clip, in clip order; clip i is in shard
i // clips_per_file):
    trajectory  [n, F, h, w, C]  the teacher's ODE state at each of the student's n (warped)
                                 timesteps `metadata.sampler_timesteps` (state 0 is the noise when
                                 the first timestep is 1000)
    x0          [F, h, w, C]     the teacher's clean result (end of the ODE)
    prompt_ids  int32 [P]        (PanWorld, `config.text.kind='words'`)  or
    text        float32 [T, D]   (pre-computed embeddings)
    index       int64            clip index i = record i of the unshuffled prompt source
                                 (`pipeline.source_and_encode`, cycled when it is shorter)
    noise_seed  int64            starting noise = normal(fold_in(key(noise_seed), i)) with jax's
                                 default PRNG (`ode_init.clip_noise`): a record is reproducible
Storage dtype (`metadata.storage_dtype`, trajectory and x0): float32 (default), float16, or
bfloat16 (stored as its uint16 bit pattern; numpy has no bfloat16). The half types halve storage
and round the regression targets (float16: ~3 decimal digits, range +-65504, fine for unit-variance
latents; bfloat16: ~2-3 digits, float32 range); the loss casts back to float32.

metadata.json: format/version, teacher path + sha256 fingerprint of its params values, the teacher
and student model configs, the sampler section and its warped `sampler_timesteps`, `ode_substeps`,
`teacher_guidance`, `teacher_attention`, `chunk_frames`, the prompt source (`data.source` and its
section), `text_format` ('prompt_ids' | 'text'), `text_kind`, `text_encoder_seed` (the PanWorld
word encoder is built from `config.seed`), `clip_shape`, `trajectory_shape`, `storage_dtype`,
`noise_seed`, `num_clips`, `clips_per_file`, `shards`.

Checks against the run (`make_source`), each raising a ValueError naming the config field and the
metadata value: the student's timesteps (`config.sampler`: denoising_steps / shift / warp), the
latent shape (`config.stream.latent_h` / `latent_w`, `config.model.in_channels`, frames a multiple
of `config.stream.chunk_frames`), the text format (`config.text.kind`; `config.seed` for the word
encoder, `config.model.text_dim` for embeddings). Shards named by the metadata must all exist with
the record count it says (an ArrayRecord file cut short opens with 0 records: this check names the
file and the missing clip indices). A record that does not decode, or whose arrays have the wrong
keys, shape or dtype, raises a ValueError naming the file and the record's index in it.

Records given to the trainer (the `ode_init` batch):
    trajectory  [n, F, h, w, C]  storage dtype
    latents     [F, h, w, C]     the teacher's x0 (storage dtype): the regression target and the
                                 clip shape the loop and objectives read
    prompt_ids / text            as stored
    index       int64            position in the concatenated shards (clip order within a directory)

Works with every option of `pipeline.make_dataset` (shuffle, per-host sharding, workers,
checkpointable iterators): the reading is `records.ArrayRecordSource`'s.

Writing (the generator, `training/ode_trajectories.py`, runs the teacher; this module owns the files):
`make_metadata` builds metadata.json, `prepare_directory` writes it atomically or checks a rerun
against it (all fields but `RESUME_IGNORES` must match, the differing ones are named),
`pending_shards` deletes leftover temporary shards and checks finished ones' record counts, and
`write_shard` writes one shard atomically (temporary name, fsync, rename: `adastate_jax.files`).

Must not know: models, training, meshes (records arrive as arrays).
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np

from adastate_jax import files
from adastate_jax.data import records

FORMAT = "adastate-ode-trajectories"
VERSION = 1
METADATA = "metadata.json"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
TEXT_FORMATS = ("prompt_ids", "text")


def shard_name(shard: int, num_shards: int) -> str:
    return f"trajectories-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_counts(num_clips: int, clips_per_file: int) -> list[int]:
    """Records per shard: `clips_per_file` each, the last one the rest."""
    full, rest = divmod(int(num_clips), int(clips_per_file))
    return [int(clips_per_file)] * full + ([rest] if rest else [])


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def to_storage(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float array -> what the .npz holds (bfloat16 as its uint16 bits)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r}: choose from {STORAGE_DTYPES}")
    if storage_dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x, np.float32).astype(storage_dtype)


def from_storage(a: np.ndarray, storage_dtype: str) -> np.ndarray:
    """What the .npz holds -> an array of the storage dtype (checked)."""
    want = np.uint16 if storage_dtype == "bfloat16" else np.dtype(storage_dtype)
    if a.dtype != want:
        raise ValueError(
            f"stored dtype {a.dtype} is not the {np.dtype(want)} of storage dtype {storage_dtype}"
        )
    if storage_dtype == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def serialize_record(trajectory, x0, prompt: dict, index: int, noise_seed: int, storage_dtype: str) -> bytes:
    """One clip -> bytes. prompt: {'prompt_ids': int32 [P]} or {'text': float32 [T, D]}."""
    if len(prompt) != 1 or next(iter(prompt)) not in TEXT_FORMATS:
        raise ValueError(f"prompt must be one of {TEXT_FORMATS}, got keys {sorted(prompt)}")
    ((key, value),) = prompt.items()
    value = np.asarray(value, np.int32 if key == "prompt_ids" else np.float32)
    buf = io.BytesIO()
    np.savez(
        buf,
        trajectory=to_storage(trajectory, storage_dtype),
        x0=to_storage(x0, storage_dtype),
        index=np.int64(index),
        noise_seed=np.int64(noise_seed),
        **{key: value},
    )
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Metadata and checks against the run
# --------------------------------------------------------------------------------------------


def student_timesteps(exp) -> np.ndarray:
    return np.asarray(exp.sampler.timesteps, np.float64)


def text_format(exp) -> str:
    return "prompt_ids" if exp.text.kind == "words" else "text"


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise ValueError(
            f"config.data.paths: {directory} has no {METADATA} "
            "(not written by launch/make_ode_trajectories.py)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config.data.paths: {path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
            f"version {VERSION}"
        )
    return meta


def check_metadata(exp, meta: dict, where: str) -> None:
    """The run `exp` (an Experiment) can train on trajectories described by `meta` (from `where`),
    else ValueError."""

    def bad(field, value, what, stored):
        return ValueError(
            f"{field}={value} does not match the stored trajectories: {where} has {what}={stored}"
        )

    want_t = student_timesteps(exp)
    have_t = np.asarray(meta["sampler_timesteps"], np.float64)
    if want_t.shape != have_t.shape or not np.allclose(want_t, have_t, rtol=0, atol=1e-3):
        raise bad(
            "config.sampler.denoising_steps (with shift / warp_denoising_steps)",
            f"{tuple(exp.sampler.denoising_steps)} -> timesteps {np.round(want_t, 3).tolist()}",
            "sampler_timesteps",
            np.round(have_t, 3).tolist(),
        )
    f, h, w, c = (int(v) for v in meta["clip_shape"])
    for field, value, stored in (
        ("config.stream.latent_h", exp.stream.latent_h, h),
        ("config.stream.latent_w", exp.stream.latent_w, w),
        ("config.model.in_channels", exp.model.in_channels, c),
    ):
        if value != stored:
            raise bad(field, value, "clip_shape [F, h, w, C]", meta["clip_shape"])
    chunk = exp.stream.chunk_frames
    if f % chunk:
        raise bad(
            "config.stream.chunk_frames",
            chunk,
            "clip_shape [F, h, w, C] (F not a multiple)",
            meta["clip_shape"],
        )
    if list(meta["trajectory_shape"]) != [len(have_t), f, h, w, c]:
        raise ValueError(f"{where}: trajectory_shape {meta['trajectory_shape']} disagrees with clip_shape")
    fmt = text_format(exp)
    if meta["text_format"] != fmt:
        raise bad("config.text.kind", repr(exp.text.kind), "text_format", repr(meta["text_format"]))
    if fmt == "prompt_ids" and int(meta["text_encoder_seed"]) != exp.seed:
        raise bad(
            "config.seed (builds the word encoder)",
            exp.seed,
            "text_encoder_seed",
            meta["text_encoder_seed"],
        )
    if fmt == "text" and int(meta["text_shape"][-1]) != exp.model.text_dim:
        raise bad("config.model.text_dim", exp.model.text_dim, "text_shape", meta["text_shape"])
    if meta["storage_dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"{where}: storage_dtype {meta['storage_dtype']!r} not one of {STORAGE_DTYPES}")


def resolve_paths(paths) -> list[tuple[str, dict, int, int]]:
    """`config.data.paths` (directories or shard files) ->
    [(file, metadata, expected records, clip index of its first record)]."""
    if isinstance(paths, str):
        paths = (paths,)
    out = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            meta = read_metadata(p)
            counts = shard_counts(meta["num_clips"], meta["clips_per_file"])
            files = [os.path.join(p, s) for s in meta["shards"]]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise ValueError(
                    f"config.data.paths: {p} is incomplete, {len(missing)} of {len(files)} shards missing "
                    f"(first {missing[0]}); rerun launch/make_ode_trajectories.py with the same flags "
                    "to finish it"
                )
            starts = np.cumsum([0] + counts)
            out += [(f, meta, n, int(s)) for f, n, s in zip(files, counts, starts)]
        elif os.path.isfile(p):
            directory = os.path.dirname(os.path.abspath(p))
            meta = read_metadata(directory)
            name = os.path.basename(p)
            if name not in meta["shards"]:
                raise ValueError(f"config.data.paths: {p} is not a shard listed in {directory}/{METADATA}")
            s = meta["shards"].index(name)
            n = shard_counts(meta["num_clips"], meta["clips_per_file"])[s]
            out.append((p, meta, n, s * int(meta["clips_per_file"])))
        else:
            raise ValueError(f"config.data.paths: {p} does not exist")
    if not out:
        raise ValueError("config.data.paths: no trajectory directories or shard files given")
    return out


# --------------------------------------------------------------------------------------------
# Writing (the generator's side of the format)
# --------------------------------------------------------------------------------------------

# metadata fields a resumed run may change (the records do not depend on them; the teacher is
# identified by its params fingerprint, not its path)
RESUME_IGNORES = ("teacher_path", "student_model", "sampler")


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def make_metadata(
    *,
    teacher_path: str,
    teacher_params_sha256: str,
    teacher_model: dict,
    student_model: dict,
    sampler: dict,
    sampler_timesteps,
    ode_substeps: int,
    teacher_guidance: float,
    teacher_attention: str,
    chunk_frames: int,
    prompt_data: dict,
    text_kind: str,
    text_format: str,
    text_shape,
    text_encoder_seed: int,
    clip_shape,
    storage_dtype: str,
    noise_seed: int,
    prng_impl: str,
    num_clips: int,
    clips_per_file: int,
) -> dict:
    """metadata.json of a trajectory directory (JSON types only; see the module docstring).

    Adds `format`, `version`, `trajectory_shape`
    ([n timesteps, *clip_shape]) and the shard file names."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage_dtype!r}: choose from {STORAGE_DTYPES}")
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text format {text_format!r}: choose from {TEXT_FORMATS}")
    timesteps = [float(t) for t in sampler_timesteps]
    counts = shard_counts(num_clips, clips_per_file)
    return _jsonable(
        dict(
            format=FORMAT,
            version=VERSION,
            teacher_path=teacher_path,
            teacher_params_sha256=teacher_params_sha256,
            teacher_model=teacher_model,
            student_model=student_model,
            sampler=sampler,
            sampler_timesteps=timesteps,
            ode_substeps=ode_substeps,
            teacher_guidance=teacher_guidance,
            teacher_attention=teacher_attention,
            chunk_frames=chunk_frames,
            prompt_data=prompt_data,
            text_kind=text_kind,
            text_format=text_format,
            text_shape=list(text_shape),
            text_encoder_seed=text_encoder_seed,
            clip_shape=list(clip_shape),
            trajectory_shape=[len(timesteps), *clip_shape],
            storage_dtype=storage_dtype,
            noise_seed=int(noise_seed),
            prng_impl=prng_impl,
            num_clips=int(num_clips),
            clips_per_file=int(clips_per_file),
            shards=[shard_name(s, len(counts)) for s in range(len(counts))],
        )
    )


def prepare_directory(out_dir: str, meta: dict) -> None:
    """Create `out_dir` and write `meta` as its metadata.json (atomically, before any shard), or,
    when one exists, check that a rerun generates the same records: every field but
    `RESUME_IGNORES` must be equal, else a ValueError naming the differing fields."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, METADATA)
    if not os.path.exists(meta_path):
        files.write_json_atomic(meta_path, meta)
        return
    with open(meta_path) as fh:
        old = json.load(fh)
    diff = sorted(k for k in set(old) | set(meta) if k not in RESUME_IGNORES and old.get(k) != meta.get(k))
    if diff:
        raise ValueError(
            f"{meta_path} was written with other settings ({', '.join(diff)} differ, e.g. {diff[0]}: "
            f"stored {old.get(diff[0])!r}, now {meta.get(diff[0])!r}); use another --out_dir"
        )


def pending_shards(out_dir: str, meta: dict) -> tuple[list[int], list[int]]:
    """(shards to generate, finished shards) of a prepared directory. Leftover temporary shards of
    a killed run are deleted; a finished shard must hold the records the metadata says (else a
    ValueError naming it)."""
    counts = shard_counts(meta["num_clips"], meta["clips_per_file"])
    todo, done = [], []
    for s, (name, n) in enumerate(zip(meta["shards"], counts)):
        path = os.path.join(out_dir, name)
        for stale in glob.glob(os.path.join(out_dir, files.temp_prefix(name) + "*")):
            os.remove(stale)  # an unfinished shard of a killed run
        if not os.path.exists(path):
            todo.append(s)
            continue
        have = records.count_records(path)
        if have != n:
            raise ValueError(f"{path}: {have} records, expected {n}; delete it and rerun to regenerate it")
        done.append(s)
    return todo, done


def write_shard(path: str, raw_records) -> int:
    """Write the serialized records (an iterable of bytes, `serialize_record`) of one shard to
    `path` atomically (a temporary `.NAME.tmp-*` renamed when complete); returns the count."""
    with files.atomic_path(path) as tmp:
        return records.write_arrayrecord(tmp, raw_records)


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


class TrajectorySource(records.ArrayRecordSource):
    """Stored trajectory shards -> {'trajectory', 'latents' (= x0), 'prompt_ids' | 'text', 'index'}."""

    def __init__(self, files, trajectory_shape, text_format_: str, storage_dtype: str, expected=None):
        """expected: per file (records its metadata promises, clip index of its first record)."""
        if expected is not None:
            for path, (n, first) in zip(files, expected):
                detail = None
                try:
                    have = records.count_records(path)
                    if have != n:
                        detail = f"{have} records"
                except Exception as e:  # noqa: BLE001
                    have, detail = 0, f"unreadable ({e})"
                if detail is not None:
                    raise ValueError(
                        f"bad shard {path}: {detail}, its {METADATA} says {n} (truncated or corrupted): "
                        f"records {have}..{n - 1} (clips {first + have}..{first + n - 1}) cannot be read. "
                        "Delete it and rerun launch/make_ode_trajectories.py to regenerate it"
                    )
        super().__init__(files)
        self.trajectory_shape = tuple(int(v) for v in trajectory_shape)
        self.text_format = text_format_
        self.storage_dtype = storage_dtype

    def decode(self, raw: bytes, index: int) -> dict:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            keys = set(z.files)
            need = {"trajectory", "x0", "index", "noise_seed", self.text_format}
            if not need <= keys:
                raise ValueError(f"record has keys {sorted(keys)}, needs {sorted(need)}")
            traj = from_storage(z["trajectory"], self.storage_dtype)
            x0 = from_storage(z["x0"], self.storage_dtype)
            prompt = z[self.text_format]
        if traj.shape != self.trajectory_shape or x0.shape != self.trajectory_shape[1:]:
            raise ValueError(
                f"trajectory {traj.shape} / x0 {x0.shape} must be {list(self.trajectory_shape)} / "
                f"{list(self.trajectory_shape[1:])} (metadata trajectory_shape)"
            )
        return {"trajectory": traj, "latents": x0, self.text_format: prompt, "index": np.int64(index)}


def make_source(exp):
    """(TrajectorySource over `config.data.paths`, None): checked against the run (module docstring)."""
    entries = resolve_paths(exp.data.paths)
    first = entries[0][1]
    seen = set()
    for f, meta, _, _ in entries:
        where = os.path.join(os.path.dirname(os.path.abspath(f)), METADATA)
        if where not in seen:
            seen.add(where)
            check_metadata(exp, meta, where)
            for k in ("trajectory_shape", "text_format", "storage_dtype"):
                if meta[k] != first[k]:
                    raise ValueError(f"config.data.paths: {where} has {k}={meta[k]}, another path {first[k]}")
    source = TrajectorySource(
        [f for f, _, _, _ in entries],
        first["trajectory_shape"],
        first["text_format"],
        first["storage_dtype"],
        expected=[(n, start) for _, _, n, start in entries],
    )
    return source, None
