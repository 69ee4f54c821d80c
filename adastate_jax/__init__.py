"""adastate-jax: streaming (autoregressive) video diffusion with adaptive state anchors in JAX/Flax."""

__version__ = "0.1.0"
