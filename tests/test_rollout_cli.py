"""launch/rollout.py end to end (the README's main command) and its bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "rollout.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_rollout_cli_writes_video_state_and_report(tmp_path):
    out = tmp_path / "demo.mp4"
    # from another directory: the default config is found next to the script
    r = _run(
        "--num_chunks=4",
        f"--out={out}",
        "--instrument",
        "--show_state",
        "--prompt=pan right fast",
        "--prompt=pan left slow",
        "--prompt_schedule=0:0,2:1",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "randomly initialised" in r.stdout + r.stderr  # honest about the untrained model
    assert out.exists() and out.stat().st_size > 1000
    assert (tmp_path / "demo_state.mp4").exists()
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["num_chunks"] == 4 and report["latent_frames"] == 12 and report["video_frames"] == 12
    assert report["prompt_schedule"] == [0, 0, 1, 1]
    assert len(report["chunk_latency_s"]) == 4
    shares = np.asarray(report["attention_share"])  # [chunk, layer, group]
    assert shares.shape == (4, 2, 3)
    np.testing.assert_allclose(shares.sum(-1), 1.0, atol=1e-3)
    assert report["config"]["stream"]["anchor"] == "adastate"


def test_rollout_cli_bad_inputs_are_named(tmp_path):
    r = _run("--num_chunks=3", f"--out={tmp_path / 'a.mp4'}", "--prompt_schedule=5:0")
    assert r.returncode != 0 and "chunk 5 is outside the rollout's 3 chunks" in r.stderr
    r = _run("--num_chunks=3", f"--out={tmp_path / 'b.mp4'}", "--config.stream.anchor=sinc")
    assert r.returncode != 0 and "config.stream.anchor" in r.stderr
    r = _run("--num_chunks=3", f"--out={tmp_path / 'c.mp4'}", "--prompt=pan upward")
    assert r.returncode != 0 and "upward" in r.stderr


def test_rollout_cli_umt5_text_path_with_local_tokenizer(tmp_path):
    """`config.text.kind='umt5'`: a converted UMT5 checkpoint and a local sentencepiece tokenizer turn
    `--prompt` text into the embeddings the DiT reads (with the on-disk prompt cache)."""
    import sentencepiece
    import torch
    import transformers
    from safetensors.torch import save_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red car drives along the coast at sunset", "pan left over a city"] * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=24,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    torch.manual_seed(0)
    hf = transformers.UMT5EncoderModel(
        transformers.UMT5Config(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_heads=4,
            num_layers=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    ).eval()
    save_file(
        {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()},
        str(tmp_path / "t5.safetensors"),
    )
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import importlib.util, ml_collections\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {os.path.join(REPO, 'configs', 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
        "def get_config(arg=None):\n"
        "    c = tiny.get_config(arg)\n"
        "    c.text.kind = 'umt5'\n"
        f"    c.text.tokenizer_path = {str(tmp_path / 'spiece.model')!r}\n"
        f"    c.text.cache_dir = {str(tmp_path / 'cache')!r}\n"
        "    c.text.umt5 = ml_collections.ConfigDict(dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4,"
        " num_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16))\n"
        "    return c\n"
    )
    r = _run(
        f"--config={cfg_file}",
        f"--text_checkpoint={tmp_path / 't5.safetensors'}",
        "--num_chunks=2",
        "--prompt=a red car drives along the coast",
        f"--out={tmp_path / 'v.mp4'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "v.mp4").exists()
    assert any((tmp_path / "cache").iterdir())  # the encoded prompt was cached on disk
