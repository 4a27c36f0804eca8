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

MAX_CONFIG_BYTES = 1 << 20  # a flat option mapping is a few kB; more is a mistake or an attack
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
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is {size} bytes, more than the "
                          f"{MAX_CONFIG_BYTES} a config may have")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # aliases expand on use: a 300-byte file can stand for gigabytes ("billion laughs");
        # a flat option mapping never needs one
        if any(isinstance(t, yaml.AliasToken) for t in yaml.scan(text)):
            raise ConfigError(f"config file {path!r} uses YAML aliases (*name), which a config "
                              f"does not need: write the values out")
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: "
                          f"{' '.join(str(e).split())[:300]}") from e
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
        cfg = {k: typed_value(actions[k], v, f"config {known.config!r}: {k}")
               for k, v in cfg.items()}
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def typed_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value as the command-line option would have parsed it, or ``ConfigError``: the
    flag's type for scalars (``seed: 1.5`` for an int is refused, not truncated), a list for
    options that take several values, a YAML boolean for on/off flags (``no_progress:
    "false"`` is a string, not false), never a mapping, and the option's choices."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={_short(value)}: an on/off flag takes true or false")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        if not isinstance(value, list):  # one value for a list option: kept as written
            if isinstance(action.nargs, int) and action.nargs != 1:
                raise ConfigError(f"{where}: needs {action.nargs} values, got 1")
            return _scalar(action, value, where)
        out = [_scalar(action, v, where) for v in value]
        if action.nargs == "+" and not out:
            raise ConfigError(f"{where}: needs at least one value")
        if isinstance(action.nargs, int) and len(out) != action.nargs:
            raise ConfigError(f"{where}: needs {action.nargs} values, got {len(out)}")
        return out
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}={_short(value)}: one value expected, not a "
                          f"{'list' if isinstance(value, list) else 'mapping'}")
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
                isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
            raise ConfigError(f"{where}={_short(value)}: an integer expected")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={_short(value)}: a number expected")
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}={_short(value)}: a number expected") from None
    elif kind is None or kind is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={_short(value)}: a string expected (quote it)")
        value = str(value) if isinstance(value, (int, float)) else value
        if not isinstance(value, str):
            raise ConfigError(f"{where}={_short(value)}: a string expected")
    elif callable(kind):  # a custom parser: what the command line would hand it
        try:
            value = kind(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}={_short(value)}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}={_short(value)}: {value!r} is not one of "
                          f"{list(action.choices)}")
    return value
