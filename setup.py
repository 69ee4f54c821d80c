"""adastate-jax: streaming (autoregressive) video diffusion with adaptive state anchors, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="adastate-jax",
    version="0.1.0",
    description="JAX/Flax streaming video diffusion (Wan2.1 causal DiT) with AdaState adaptive anchors",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adastate_jax", "adastate_jax.*"]),
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.14",
        "grain>=0.2.12,<0.3",
        "einops>=0.8,<0.9",
        "ml_collections>=1.0,<2",
        "chex>=0.1.90,<0.2",
        "numpy>=1.26,<3",
        "ml_dtypes>=0.5",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "absl-py>=2.1,<3",
        "matplotlib>=3.8,<4",
        "scipy>=1.15,<2",  # bootstrap intervals (scipy.stats.bootstrap with rng=)
        "fsspec>=2024.6",  # gs:// (or any fsspec URL) workdirs beside orbax: files.py
        "tensorboardX>=2.6",  # TensorBoard scalars of training runs (training/loop.py)
    ],
    extras_require={
        # The parity oracles: diffusers / transformers modules run on CPU from tiny random configs.
        # torch is pinned to the CPU build that lies on this project's machines (an unpinned torch
        # resolves a multi-GB CUDA build).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers>=0.35,<0.50",
            "transformers>=4.50",
            "accelerate>=1.0",
            "sentencepiece>=0.2",
            "scikit-learn>=1.4",
            "ruff>=0.6",
            # tests/test_notebook.py runs notebooks/adastate_demo.ipynb headlessly
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
        ],
        # libtpu at the installed jax's version: compile for TPU slices without a TPU
        # (launch/compile_tpu.py, tests/test_tpu_compile.py); on a TPU VM, the TPU runtime itself
        "tpu": ["jax[tpu]>=0.10,<0.13"],
        "video": [
            "mediapy>=1.2",
            "imageio>=2.34",
            "imageio-ffmpeg>=0.5,<0.8",
            "opencv-python-headless>=4.9",
        ],
    },
)
