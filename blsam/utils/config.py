"""YAML configs that only set argparse defaults.

Every config key is an argparse option of the script, so anything in a config can be overridden
on the command line, and a key the script does not know is an error instead of a silent no-op.
``--config`` takes a file, or the name of a config shipped in the package (``blsam/configs``:
``distill_b_t``, ``distill_b_t.yaml`` or ``configs/distill_b_t.yaml``, as the README writes it),
so the documented commands work from a wheel outside the source tree.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from ..errors import UserError

PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs")


class ConfigError(UserError):
    """A config file that cannot be used (unreadable, not a mapping, unknown keys)."""


def packaged_configs() -> list[str]:
    """Names of the shipped configs (``distill_b_t``, ``sub/name``), sorted."""
    names = []
    for folder, _, files in os.walk(PACKAGED_CONFIGS):
        rel = os.path.relpath(folder, PACKAGED_CONFIGS)
        for f in files:
            if f.endswith(".yaml"):
                name = f[:-len(".yaml")]
                names.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(names)


def resolve_config(name: str | os.PathLike) -> str:
    """An existing file as given; else the packaged config of that name (``.yaml`` and a
    leading ``configs/`` optional); else ``ConfigError`` listing the packaged names."""
    path = os.fspath(name)
    if os.path.isfile(path):
        return path
    rel = path.replace(os.sep, "/")
    rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
    rel = rel if rel.endswith(".yaml") else rel + ".yaml"
    candidate = os.path.normpath(os.path.join(PACKAGED_CONFIGS, rel))
    if not os.path.isabs(rel) and ".." not in rel.split("/") and os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"config {path!r} does not exist (neither a file nor a packaged config); "
                      f"packaged: {', '.join(packaged_configs()) or '(none)'}")


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML mapping (a file or a packaged config name); keys may use ``-`` or
    ``_``."""
    import yaml  # the train / eval extras: only needed when a config is given

    path = resolve_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` where ``--config FILE`` (if the parser has it) supplies defaults.

    Precedence: command line > config file > parser defaults. Unknown config keys raise
    ``ConfigError`` naming them and the closest valid options.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_yaml_config(known.config)
        actions = _dests(parser)
        unknown: list[str] = sorted(k for k in cfg if k not in actions or k == "config")
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, list(actions), n=1) for k in unknown}
            hint = ", ".join(f"{k} (did you mean {h[0]!r}?)" if h else k for k, h in hints.items())
            raise ConfigError(f"unknown key(s) in config {known.config!r}: {hint}")
        for key, value in cfg.items():
            choices = actions[key].choices
            values = value if isinstance(value, list) else [value]  # nargs options take lists
            bad = [v for v in values if choices is not None and v is not None and v not in choices]
            if bad:
                raise ConfigError(
                    f"config {known.config!r}: {key}={value!r}: {bad[0]!r} is not one of "
                    f"{list(choices)}"
                )
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)
