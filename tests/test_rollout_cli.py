"""launch/rollout.py (the README's main command): one end-to-end run, the interruption contract
(a signal finalises a playable video, complete records and the summary, exit 0), and the
text path of its prompts, in process. Its output checks are unit-tested in
tests/streaming/test_recorder.py (`rollout_files`, `PromptSchedule`, `write_rollout`)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from adastate_jax import build
from adastate_jax import config as config_lib
from adastate_jax.config import cli
from adastate_jax.streaming import writers
from tests.subproc import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("imageio_ffmpeg")
# the same program (flags, prompt table, --segment_chunks) in every run below: the persistent
# compilation cache (JAX_COMPILATION_CACHE_DIR, set by conftest.py) compiles it once
COMMON = ["--random", "--instrument", "--show_state", "--prompt=pan right fast", "--prompt=pan left slow"]


@pytest.fixture(scope="module")
def env():
    return child_env()  # one CPU device


def _cmd(*args):
    return [sys.executable, os.path.join(REPO, "launch", "rollout.py"), *COMMON, *args]


def _frames(path):
    """Frames ffmpeg decodes from `path` (the file plays)."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    next(gen)
    return sum(1 for _ in gen)


def test_rollout_cli_writes_video_state_records_and_summary(tmp_path, env):
    out = tmp_path / "demo.mp4"
    # from another directory: the default config is found next to the script
    r = subprocess.run(
        _cmd("--num_chunks=4", f"--out={out}", "--prompt_schedule=0:0,2:1"),
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "randomly initialised" in r.stdout + r.stderr  # honest about the untrained model
    assert _frames(str(out)) == 12 and _frames(str(tmp_path / "demo_state.mp4")) == 4
    assert _frames(str(tmp_path / "demo_beside.mp4")) == 12  # the video with each chunk's state beside it
    records = writers.read_records(str(tmp_path / "demo.jsonl"))
    assert [r["chunk"] for r in records] == [0, 1, 2, 3]
    assert [r["prompt_id"] for r in records] == [0, 0, 1, 1]
    shares = np.asarray([r["attention_share"] for r in records])  # [chunk, layer, group]
    assert shares.shape == (4, 2, 3)
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-3)
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["status"] == "complete" and summary["stopped_by"] is None
    assert summary["num_chunks"] == 4 and summary["video_frames"] == 12 and summary["state_frames"] == 4
    assert summary["prompt_switches"] == [[0, 0], [2, 1]] and summary["segment_chunks"] == 1
    assert summary["latency"]["count"] == 3  # the chunks after the first segment (one chunk)
    assert summary["config"]["stream"]["anchor"] == "adastate" and summary["peak_rss_bytes"] > 0


def test_an_endless_rollout_interrupted_keeps_a_playable_video_and_every_record(tmp_path, env):
    """Ctrl-C (SIGINT) on an endless stream; SIGTERM reaches the same stop (`writers.GracefulStop`
    takes both: tests/streaming/test_writers.py)."""
    sig = signal.SIGINT
    out = tmp_path / "live.mp4"
    proc = subprocess.Popen(
        _cmd("--num_chunks=0", f"--out={out}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    records_path = str(tmp_path / "live.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(records_path) and len(writers.read_records(records_path)) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no 3 chunks within 600 s"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "live.json").read_text())
    n = summary["num_chunks"]
    assert summary["status"] == "stopped" and summary["stopped_by"] == signal.Signals(sig).name
    assert summary["requested_chunks"] == 0 and n >= 3
    records = writers.read_records(records_path)
    assert [r["chunk"] for r in records] == list(range(n))  # every chunk up to the stop, in order
    assert _frames(str(out)) == 3 * n == summary["video_frames"] == records[-1]["frames"]
    assert _frames(str(tmp_path / "live_state.mp4")) == n


# ---------------------------------------------------------------------------------------------
# the prompts of a rollout (build.prompt_table, as launch/rollout.py calls it), in process
# ---------------------------------------------------------------------------------------------
def _tiny():
    return cli.load_file(os.path.join(REPO, "configs", "tiny.py"))


def test_a_prompt_outside_the_panworld_vocabulary_is_named():
    with pytest.raises(KeyError, match="upward"):
        build.prompt_table(config_lib.parse(_tiny()), ["pan upward"])


def test_umt5_prompts_with_a_local_tokenizer_and_the_prompt_cache(tmp_path):
    """`config.text.kind='umt5'`: a converted UMT5 checkpoint and a local sentencepiece tokenizer turn
    prompt text into the embeddings the DiT reads (with the on-disk prompt cache)."""
    import ml_collections
    import sentencepiece
    import torch
    import transformers
    from safetensors.torch import save_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red car drives along the coast at sunset", "pan left over a city"] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=24, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    umt5 = dict(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.UMT5EncoderModel(
        transformers.UMT5Config(**umt5, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    ).eval()
    save_file(
        {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()},
        str(tmp_path / "t5.safetensors"),
    )
    cfg = _tiny()
    cfg.text.kind = "umt5"
    cfg.text.tokenizer_path = str(tmp_path / "spiece.model")
    cfg.text.cache_dir = str(tmp_path / "cache")
    cfg.text.umt5 = ml_collections.ConfigDict(umt5)
    exp = config_lib.parse(cfg)
    table = build.prompt_table(
        exp, ["a red car drives along the coast"], text_checkpoint=str(tmp_path / "t5.safetensors")
    )
    assert table.shape == (1, exp.stream.batch_size, exp.model.text_len, exp.model.text_dim)
    assert np.all(np.isfinite(table)) and np.abs(table).max() > 0
    assert any((tmp_path / "cache").iterdir())  # the encoded prompt was cached on disk


def test_the_default_streams_the_shipped_adastate_student_and_prints_its_camera(tmp_path, env):
    """No model flag: the student shipped for the anchor (here tiny models shipped into a tmp root
    named by ADASTATE_SHIPPED_DIR), its config, the decoded camera position and progression printed
    and kept in the summary; `--config` with a shipped model is refused before any work."""
    from tests.test_shipped import make_tiny_models

    root = make_tiny_models(str(tmp_path / "shipped"), str(tmp_path / "work"), names=("adastate",))
    env = dict(env, ADASTATE_SHIPPED_DIR=root)
    out = tmp_path / "shipped.mp4"
    script = os.path.join(REPO, "launch", "rollout.py")
    r = subprocess.run(
        [sys.executable, script, "--num_chunks=3", f"--out={out}", "--prompt=pan right fast"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "randomly initialised" not in r.stdout + r.stderr
    assert "progression" in r.stdout and _frames(str(out)) == 9
    summary = json.loads((tmp_path / "shipped.json").read_text())
    assert summary["checkpoint"].endswith("adastate") and summary["camera"]["frames"] == 9
    bad = subprocess.run(
        [sys.executable, script, "--config=configs/tiny.py", f"--out={out}"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0 and "a shipped model brings its own config" in bad.stderr
