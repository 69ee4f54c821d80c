"""Training objectives: one module per recipe, all on the same DiT and streaming `step`.

Owns: the registry `config.train.objective` name -> objective class, and the protocol every
objective follows:

  pretrained()                 -> {name: (WanConfig, path)} params to load before init
  init_state(rng, loaded)      -> TrainState   (pure; jitted with out_shardings by the loop)
  train_step(state, batch)     -> (TrainState, metrics)   (pure; jitted, state donated)
  frames_per_example(shapes)   -> latent frames one example trains on (for frames/s)
  export_params(state)         -> the params a rollout should stream from (EMA if kept)

Must not know: files, meshes, data pipelines, the loop.
"""

from __future__ import annotations

OBJECTIVES = ("flow_matching", "ode_init", "self_forcing_dmd", "vae")


def build(exp):
    """The objective of `config.train.objective` for the Experiment `exp`."""
    name = exp.train.objective
    if name == "flow_matching":
        from adastate_jax.training.objectives.flow_matching import FlowMatching

        return FlowMatching(exp)
    if name == "ode_init":
        from adastate_jax.training.objectives.ode_init import OdeInit

        return OdeInit(exp)
    if name == "self_forcing_dmd":
        from adastate_jax.training.objectives.dmd import SelfForcingDMD

        return SelfForcingDMD(exp)
    if name == "vae":  # trains the Wan VAE of config.vae.wan on pixel clips
        from adastate_jax.training.objectives.vae import VAEObjective

        return VAEObjective(exp)
    raise ValueError(f"config.train.objective: unknown objective {name!r}; choose from {OBJECTIVES}")
