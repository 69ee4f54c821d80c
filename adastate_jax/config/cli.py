"""The `--config=FILE[:variants]` flag of every launch script, with errors that name the field.

Owns: defining the ml_collections config flag, parsing the command line so that an override of a
field that does not exist (`--config.train.num_steps=3`) is reported as
`config.train.num_steps: unknown field (did you mean 'steps'?)` instead of a traceback, and
turning the flag's ConfigDict into a validated `Experiment`.

Must not know: what the scripts do with the config.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from adastate_jax.config import schema
from adastate_jax.dataclass_config import closest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def define(
    default: str, name: str = "config", help: str = "Experiment config (ml_collections file)."
) -> flags.FlagHolder:
    """The config flag; `default` is relative to the repository (e.g. 'configs/tiny.py')."""
    path = default if os.path.isabs(default) else os.path.join(REPO, default)
    return config_flags.DEFINE_config_file(name, path, help)


def load_file(spec: str):
    """`FILE[:arg]` -> the ConfigDict its `get_config(arg)` returns (the flag's own loading rule)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ValueError(f"--config={spec}: no such file {path}")
    if REPO not in sys.path:  # config files import `configs.*` siblings
        sys.path.insert(0, REPO)
    module_spec = importlib.util.spec_from_file_location("adastate_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: list[str], name: str = "config") -> None:
    """Raise a ValueError naming the first `--config.<path>=...` whose path is not in the config."""
    spec = None
    overrides = []
    for a in argv[1:]:
        if a.startswith(f"--{name}="):
            spec = a.split("=", 1)[1]
        elif a.startswith(f"--{name}."):
            overrides.append(a[len(f"--{name}.") :].split("=", 1)[0])
    if not overrides:
        return
    if spec is None:
        spec = flags.FLAGS[name].default_as_str.strip("'\"") if name in flags.FLAGS else None
    if not spec:
        return
    cfg = load_file(spec)
    for dotted in overrides:
        node, done = cfg, []
        for part in dotted.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(done + [part])
                if not keys:
                    raise ValueError(f"--{name}.{dotted}: config.{'.'.join(done)} is a value, not a section")
                raise ValueError(
                    f"--{name}.{dotted}: config.{where}: unknown field{closest(part, keys)}; "
                    f"config{'.' if done else ''}{'.'.join(done)} has {sorted(keys)}"
                )
            node, done = node[part], done + [part]


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error:
        raise
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        try:
            check_overrides(argv)
        except ValueError as named:
            print(f"FATAL config error: {named}", file=sys.stderr)
            sys.exit(2)
        print(f"FATAL config error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """`absl.app.run(main)` with config-override errors that name the field."""
    app.run(main, flags_parser=_parse_flags)


def experiment(holder: flags.FlagHolder, **overrides):
    """(ConfigDict, Experiment) of the config flag; `overrides` {'stream.anchor': 'sink'} applied first.

    A bad value raises a ValueError naming the field (`config.stream.anchor: ...`)."""
    cfg = holder.value
    if overrides:
        with cfg.unlocked():
            for dotted, value in overrides.items():
                *parents, last = dotted.split(".")
                node = cfg
                for p in parents:
                    node = node[p]
                node[last] = value
    return cfg, schema.parse(cfg)
