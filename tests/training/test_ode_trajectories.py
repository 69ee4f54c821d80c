"""Stored teacher ODE trajectories for `ode_init` (training/ode_trajectories.py writes them through
data/trajectories.py; launch/make_ode_trajectories.py is its command line): records reproduce
`teacher_trajectory` from their seed and prompt, the stored and on-the-fly losses agree on the same
trajectory, training on stored trajectories lowers the loss with no teacher in the state, mismatches
with the run and bad shards are named, the generator resumes, the teacher's fingerprint is
`files.params_sha256`, the command line runs the same generator."""

import dataclasses
import io
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax import build, files
from adastate_jax import config as config_lib
from adastate_jax.data import panworld
from adastate_jax.data import trajectories as tj
from adastate_jax.models import checkpoint_io, wan
from adastate_jax.training import loop, ode_trajectories
from adastate_jax.training.objectives import flow_matching as fm
from adastate_jax.training.objectives import ode_init
from tests.training.conftest_helpers import (
    REPO,
    one_device_mesh,
    panworld_config,
    read_metrics,
    small_model_flags,
)

pytest.importorskip("array_record")
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter  # noqa: E402

from tests.subproc import child_env

NUM_CLIPS, PER_FILE, SEED = 6, 4, 7


def _cfg(arg="ode", **train):
    cfg = panworld_config(arg, init_from="", ode_substeps=2, **train)
    cfg.sampler.denoising_steps = (1000, 500)
    cfg.model.num_layers = 1  # compile time
    return cfg


def _generate(cfg, out, **kw):
    args = dict(num_clips=NUM_CLIPS, clips_per_file=PER_FILE, batch_size=2, noise_seed=SEED)
    return ode_trajectories.generate(
        config_lib.parse(cfg), str(out), mesh=one_device_mesh(), **{**args, **kw}
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random (non-zero head) DiT of the PanWorld config, exported like a teacher run."""
    cfg = _cfg()
    cfg.model.zero_init_head = False
    mcfg = config_lib.parse(cfg).model
    params = nnx.split(wan.create_model(mcfg, seed=1))[1]
    path = str(tmp_path_factory.mktemp("teacher") / "export")
    checkpoint_io.save_params(path, params)
    return path, params


@pytest.fixture(scope="module")
def stored(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("traj") / "ode"
    summary = _generate(_cfg(teacher_path=teacher[0]), out)
    assert summary["clips"] == NUM_CLIPS and summary["generated_shards"] == [0, 1]
    return out


def _stored_cfg(path, **train):
    cfg = _cfg("ode,stored", teacher_path="", **train)
    cfg.data.paths = (str(path),)
    return cfg


def test_record_equals_teacher_trajectory_from_its_seed_and_prompt(stored, teacher):
    cfg = _stored_cfg(stored)
    source, encode = tj.make_source(config_lib.parse(cfg))
    assert encode is None and len(source) == NUM_CLIPS
    clip = 5  # in the second shard
    rec = source[clip]
    r = ArrayRecordReader(str(stored / tj.shard_name(1, 2)))  # the raw record: its seed and clip index
    with np.load(io.BytesIO(r.read([clip - PER_FILE])[0])) as z:
        noise_seed, index = int(z["noise_seed"]), int(z["index"])
    r.close()
    assert (noise_seed, index) == (SEED, clip)
    pw = panworld.PanWorldSource(config_lib.parse(cfg).data.panworld)[clip]
    np.testing.assert_array_equal(rec["prompt_ids"], pw["prompt_ids"])  # clip i = prompt record i

    obj = ode_init.OdeInit(config_lib.parse(_cfg(teacher_path=teacher[0])))
    text_params = nnx.split(build.word_encoder(obj.model_cfg, int(cfg.seed)))[1]

    @jax.jit
    def recompute(params, ids):
        text = fm.batch_text(obj.text_graphdef, {"text": text_params}, {"prompt_ids": ids})
        noise = ode_init.clip_noise(noise_seed, jnp.asarray([index]), rec["latents"].shape)
        return ode_init.teacher_trajectory(
            obj.teacher_graphdef, params, text, None, noise.shape, obj.teacher_layout,
            obj.timesteps, obj.substeps, obj.guidance, noise=noise,
        )  # fmt: skip

    traj, x0 = recompute(teacher[1], rec["prompt_ids"][None])
    np.testing.assert_allclose(rec["trajectory"], np.asarray(traj)[:, 0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(rec["latents"], np.asarray(x0)[0], rtol=0, atol=2e-5)
    assert float(np.std(rec["latents"])) > 0.1  # a real trajectory, not zeros


def test_teacher_forcing_trajectory_is_the_teacher_streaming_chunk_by_chunk(teacher):
    """`teacher_attention='teacher_forcing'`: chunk k's ODE reads the teacher's finished chunks < k
    as clean context. Reference, through the diffusion-forcing layout instead: chunk 0 is the
    whole-clip ODE of a 1-chunk clip; chunk 1 is an Euler solve of the 2-chunk clip [chunk 0's x0 at
    t = 0; chunk 1 noisy] in which only chunk 1 moves (block-causal: chunk 1 sees chunk 0 and
    itself, as in the streaming cache). The whole-clip ODE (every chunk at one sigma) differs."""
    cfg = _cfg(teacher_path=teacher[0], teacher_attention="teacher_forcing")
    obj = ode_init.OdeInit(config_lib.parse(cfg))  # on the fly: no longer refused
    assert obj.teacher_layout.attention == "teacher_forcing"
    df = fm.teacher_layout(config_lib.parse(cfg), "diffusion_forcing")
    mcfg = obj.model_cfg
    text_params = nnx.split(build.word_encoder(mcfg, int(cfg.seed)))[1]
    ids = np.stack(
        [panworld.PanWorldSource(config_lib.parse(cfg).data.panworld)[i]["prompt_ids"] for i in (2, 3)]
    )
    text = fm.batch_text(obj.text_graphdef, {"text": text_params}, {"prompt_ids": ids})
    noise = jax.random.normal(jax.random.key(5), (2, 6, 8, 8, 48))
    grid, record = ode_init.ode_grid(obj.timesteps, obj.substeps)
    g, p = obj.teacher_graphdef, teacher[1]
    run = lambda layout, x: ode_init.teacher_trajectory(  # noqa: E731
        g, p, text, None, x.shape, layout, obj.timesteps, obj.substeps, 1.0, noise=x
    )

    @jax.jit
    def forced_and_reference(p):
        traj, x0 = run(obj.teacher_layout, noise)
        ref0, x00 = run(df, noise[:, :3])
        x, states = noise[:, 3:], []
        for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
            if i in record:
                states.append(x)
            t = jnp.concatenate([jnp.zeros((2, 3)), jnp.full((2, 3), s * 1000.0)], axis=1)
            v = fm.clip_forward(g, p, jnp.concatenate([x00, x], axis=1), t, text, df)
            x = x + (s_next - s) * v[:, 3:]
        whole, _ = run(df, noise)
        return traj, x0, ref0, x00, jnp.stack(states), x, whole

    traj, x0, ref0, x00, ref1, x01, whole = (np.asarray(a) for a in forced_and_reference(p))
    assert traj.shape == (len(obj.timesteps), 2, 6, 8, 8, 48) and x0.shape == (2, 6, 8, 8, 48)
    tol = dict(rtol=0, atol=2e-5)
    np.testing.assert_allclose(traj[:, :, :3], ref0, **tol)
    np.testing.assert_allclose(x0[:, :3], x00, **tol)
    np.testing.assert_allclose(traj[:, :, 3:], ref1, **tol)
    np.testing.assert_allclose(x0[:, 3:], x01, **tol)
    np.testing.assert_array_equal(traj[0], np.asarray(noise))  # state 0 is the noise (t = 1000)
    assert np.abs(traj[1:, :, 3:] - whole[1:, :, 3:]).max() > 1e-3  # not the whole-clip ODE


def test_stored_and_on_the_fly_losses_agree_on_the_same_trajectory(teacher):
    cfg = _cfg(teacher_path=teacher[0])
    mcfg = config_lib.parse(cfg).model
    fly = ode_init.OdeInit(config_lib.parse(cfg))
    sto = ode_init.OdeInit(config_lib.parse(_stored_cfg("unused")))
    assert not fly.stored and sto.stored
    student = nnx.split(wan.create_model(dataclasses.replace(mcfg, zero_init_head=False), seed=3))[1]
    text_params = nnx.split(build.word_encoder(mcfg, int(cfg.seed)))[1]
    prompt_ids = np.stack(
        [panworld.PanWorldSource(config_lib.parse(cfg).data.panworld)[i]["prompt_ids"] for i in (0, 1)]
    )
    shape = (2, 6, 8, 8, 48)
    key = jax.random.key(11)

    @jax.jit
    def both(student, teacher_params):
        frozen = {"text": text_params, "teacher": teacher_params}
        on_the_fly, _ = fly.loss(
            student, frozen, {"latents": jnp.zeros(shape), "prompt_ids": prompt_ids}, key
        )
        # the trajectory the on-the-fly loss generates (its key split), handed over as stored records
        text = fm.batch_text(fly.text_graphdef, frozen, {"prompt_ids": prompt_ids})
        traj, x0 = ode_init.teacher_trajectory(
            fly.teacher_graphdef, teacher_params, text, jax.random.split(key)[0], shape, fly.teacher_layout,
            fly.timesteps, fly.substeps, fly.guidance,
        )  # fmt: skip
        batch = {"trajectory": jnp.moveaxis(traj, 0, 1), "latents": x0, "prompt_ids": prompt_ids}
        stored_loss, _ = sto.loss(student, {"text": text_params}, batch, key)
        other_key, _ = sto.loss(student, {"text": text_params}, batch, jax.random.key(12))
        return on_the_fly, stored_loss, other_key

    a, b, c = (float(x) for x in both(student, teacher[1]))
    assert a > 0 and np.isclose(a, b, rtol=1e-5, atol=0), (a, b)
    assert not np.isclose(a, c, rtol=1e-3), (a, c)  # the key's student step matters: a real comparison


def test_ode_init_on_stored_trajectories_lowers_loss_without_a_teacher(stored, tmp_path):
    cfg = _stored_cfg(stored, steps=30, lr=3e-3)
    run = loop.setup(cfg, str(tmp_path), one_device_mesh())
    assert "teacher" not in run.pretrained
    assert run.abstract_state.frozen is not None and "teacher" not in run.abstract_state.frozen
    loop.train(cfg, str(tmp_path), mesh=one_device_mesh())
    vals = [r["loss"] for r in read_metrics(tmp_path)]
    first, last = float(np.mean(vals[:5])), float(np.mean(vals[-5:]))
    assert last < 0.7 * first, (first, last)


def test_mismatched_run_raises_naming_the_field(stored):
    cases = [
        (lambda c: setattr(c.sampler, "denoising_steps", (1000, 750)), "config.sampler.denoising_steps"),
        (lambda c: setattr(c.sampler, "shift", 5.0), "config.sampler.denoising_steps"),
        (lambda c: setattr(c.stream, "latent_h", 4), "config.stream.latent_h"),
        (lambda c: setattr(c.model, "in_channels", 12), "config.model.in_channels"),
        (lambda c: setattr(c.text, "kind", "embeddings"), "config.text.kind"),
        (lambda c: setattr(c, "seed", 1), "config.seed"),
    ]
    tj.make_source(config_lib.parse(_stored_cfg(stored)))  # the matching run is fine
    for change, field in cases:
        cfg = _stored_cfg(stored)
        change(cfg)
        with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
            tj.make_source(config_lib.parse(cfg))
        assert "metadata.json" in str(e.value), str(e.value)


def test_bad_shards_raise_naming_file_and_index(stored, tmp_path):
    # truncated: an ArrayRecord file cut short opens with 0 records
    cut = tmp_path / "cut"
    shutil.copytree(stored, cut)
    shard0 = cut / tj.shard_name(0, 2)
    data = shard0.read_bytes()
    shard0.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"bad shard .*trajectories-00000-of-00002.*records 0\.\.3"):
        tj.make_source(config_lib.parse(_stored_cfg(cut)))

    # a record that does not decode, and one of the wrong shape, in the second shard
    bad = tmp_path / "bad"
    shutil.copytree(stored, bad)
    shard1 = bad / tj.shard_name(1, 2)
    wrong = tj.serialize_record(
        np.zeros((2, 6, 8, 8, 4)), np.zeros((6, 8, 8, 4)), {"prompt_ids": np.zeros(4)}, 5, 0, "float32"
    )
    w = ArrayRecordWriter(str(shard1), "group_size:1")
    w.write(b"not an npz" * 10)
    w.write(wrong)
    w.close()
    source, _ = tj.make_source(config_lib.parse(_stored_cfg(bad)))
    with pytest.raises(ValueError, match=r"bad record 0 of .*trajectories-00001-of-00002.*global index 4"):
        source[4]
    with pytest.raises(ValueError, match=r"bad record 1 of .*trajectories-00001-of-00002.*trajectory_shape"):
        source[5]
    assert source[0]["trajectory"].shape == (2, 6, 8, 8, 48)

    missing = tmp_path / "missing"
    shutil.copytree(stored, missing)
    os.remove(missing / tj.shard_name(1, 2))
    with pytest.raises(ValueError, match=r"incomplete, 1 of 2 shards missing"):
        tj.make_source(config_lib.parse(_stored_cfg(missing)))


def test_generator_resumes_skipping_finished_shards(stored, teacher, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(stored, out)
    kept = out / tj.shard_name(0, 2)
    redo = out / tj.shard_name(1, 2)
    before = redo.read_bytes()
    mtime = kept.stat().st_mtime_ns
    os.remove(redo)
    stale = out / f".{tj.shard_name(1, 2)}.tmp-12345"
    stale.write_bytes(b"half a shard")  # left by a killed run
    cfg = _cfg(teacher_path=teacher[0])
    summary = _generate(cfg, out)
    assert summary["skipped_shards"] == [0] and summary["generated_shards"] == [1]
    assert summary["clips"] == NUM_CLIPS - PER_FILE
    assert kept.stat().st_mtime_ns == mtime and not stale.exists()
    assert redo.read_bytes() == before  # deterministic: the same records again
    again = _generate(cfg, out)
    assert again["generated_shards"] == [] and again["clips"] == 0
    with pytest.raises(ValueError, match="noise_seed"):
        _generate(cfg, out, noise_seed=SEED + 1)


def test_half_precision_storage_roundtrip():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2), ("float32", 0.0)):
        raw = tj.to_storage(x, dtype)
        back = tj.from_storage(raw, dtype).astype(np.float32)
        assert raw.nbytes == x.nbytes // (1 if dtype == "float32" else 2)
        np.testing.assert_allclose(back, x, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="storage dtype bfloat16"):
        tj.from_storage(x.astype(np.float16), "bfloat16")


def test_stored_teacher_fingerprint_is_params_sha256_of_the_teacher(stored, teacher):
    meta = tj.read_metadata(str(stored))
    assert meta["teacher_params_sha256"] == files.params_sha256(teacher[1])
    assert not meta["teacher_params_sha256"].startswith("shapes-only")


def test_generator_errors_name_the_flag_or_config_field(teacher, tmp_path):
    cases = [
        (dict(num_clips=0), "--num_clips=0"),
        (dict(clips_per_file=0), "--clips_per_file=0"),
        (dict(storage_dtype="int8"), "--storage_dtype 'int8'"),
    ]
    for kw, message in cases:
        args = {**dict(num_clips=2, clips_per_file=2, batch_size=2, storage_dtype="float32"), **kw}
        with pytest.raises(ValueError, match=message):
            ode_trajectories.check_options(**args)
    with pytest.raises(ValueError, match="config.data.source='ode_trajectories'"):
        _generate(_stored_cfg(tmp_path), tmp_path / "a")
    with pytest.raises(ValueError, match="config.train.teacher_path"):
        _generate(_cfg(teacher_path=""), tmp_path / "b")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_command_line_resumes_the_directory_the_library_wrote(stored, teacher, tmp_path):
    """One subprocess: the flags reach `generate` (the same settings: metadata.json is accepted,
    every shard is found finished, nothing is compiled), progress is logged and the targets are
    scored (`eval/targets.py`)."""
    out = tmp_path / "cli"
    shutil.copytree(stored, out)
    before = (out / tj.METADATA).read_text()
    cmd = [
        sys.executable, os.path.join(REPO, "launch", "make_ode_trajectories.py"),
        "--config=" + os.path.join(REPO, "configs", "panworld.py") + ":ode",
        f"--config.train.teacher_path={teacher[0]}", "--config.train.init_from=",
        "--config.train.ode_substeps=2", "--config.sampler.denoising_steps=(1000, 500)",
        *small_model_flags(), "--config.data.panworld.num_frames=6",
        f"--out_dir={out}", f"--num_clips={NUM_CLIPS}", f"--clips_per_file={PER_FILE}",
        "--batch_size=2", f"--noise_seed={SEED}",
    ]  # fmt: skip
    env = child_env()  # one CPU device
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 finished, generating 0" in r.stderr, r.stderr[-3000:]
    assert (out / tj.METADATA).read_text() == before
    # --score_clips (default 256): the stored targets scored as PanWorld videos, one row per prompt
    assert f"of the first {NUM_CLIPS} clips, scored as PanWorld videos" in r.stdout, r.stdout[-2000:]
    assert "| all pans |" in r.stdout and "| static | 1 |" in r.stdout, r.stdout[-2000:]
