"""What every command-line tool shares: the model options (same names, same meaning) and the
rule that a user mistake is one ``error:`` line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import UserError
from ..extras import EXTRAS

T = TypeVar("T")


class OptionError(UserError):
    """A command-line option whose value means nothing (a CLI prints it as one line, exit 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default and keeps the module docstring's layout."""


def add_model_args(
    p: argparse.ArgumentParser, choices: Sequence[str] | None = None, device: bool = True
) -> argparse.ArgumentParser:
    """--model/--checkpoint/--sam-checkpoint/--keep-ratio/--img-size[/--device], as taken by
    ``blsam.build_model``."""
    import torch

    p.add_argument("--model", default="b_t", choices=choices,
                   help="registry key: b_t, h_b (bLViT-SAM) or vit_b, vit_l, vit_h (SAM); "
                        "tiny_bl / tiny_vit are the test architectures")
    p.add_argument("--checkpoint", default=None,
                   help="trained bLViT-SAM state dict (or an official SAM one for vit_*)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM checkpoint (P-block init)")
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="bLViT: share of tokens routed to the P-blocks; EViT / Evo-ViT: share "
                        "kept; in (0, 1]; default: the model's (0.25 bLViT, 0.5 baselines; "
                        "ignored by vit_*)")
    p.add_argument("--img-size", type=int, default=1024,
                   help="model input size, a multiple of 16 (position tables are resized)")
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu or cuda (under torchrun: this rank's GPU)")
    return p


def resolved_keep_ratio(model: str | None, keep_ratio: float | None) -> float | None:
    """``keep_ratio`` as given, or (left out) the model's default: 0.25 bLViT, 0.5 pruning
    baselines; None for models without one (vit_*). What is recorded and printed is then the
    value that ran."""
    from ..specs import MODEL_SPECS

    if keep_ratio is None and model in MODEL_SPECS:
        return MODEL_SPECS[model].default_keep_ratio
    return keep_ratio


def config_from_options(kind: type[T], options: Mapping[str, Any], what: str) -> T:
    """A tool's config dataclass from option values by name (``vars()`` of the parsed
    arguments); a name the dataclass lacks is an ``OptionError`` ("unknown {what} option(s)")."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise OptionError(f"unknown {what} option(s): {', '.join(unknown)}")
    return kind(**options)


def check_option(check: Callable[[Any, str], Any], value: Any, flag: str) -> Any:
    """Apply one of ``blsam.specs``' rules (``check_keep_ratio``, ``check_img_size``) to a
    command-line value: the rule's ValueError becomes an ``OptionError`` naming ``flag``."""
    try:
        return check(value, flag)
    except ValueError as e:
        raise OptionError(str(e)) from None


def check_device(value: str, flag: str = "--device") -> str:
    """A device this machine has: ``cuda`` without CUDA (or a GPU index it lacks, or a name
    torch does not know) is an ``OptionError`` now, not a driver traceback at the first
    ``.to(device)``."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"{flag} {value!r}: not a device ({one_line(e)})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{flag} {value}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{flag} {value}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return value


def check_model_options(*, model: str | None = None, keep_ratio: float | None = None,
                        img_size: int | None = None, checkpoint: str | None = None,
                        sam_checkpoint: str | None = None, device: str | None = None
                        ) -> float | None:
    """Refuse model options that mean nothing, before anything is built (``OptionError``);
    returns the keep ratio that will run (``resolved_keep_ratio``)."""
    from ..specs import check_img_size, check_keep_ratio

    keep_ratio = resolved_keep_ratio(model, keep_ratio)
    if keep_ratio is not None:
        check_option(check_keep_ratio, keep_ratio, "--keep-ratio")
    if img_size is not None:
        check_option(check_img_size, img_size, "--img-size")
    for opt, path in (("checkpoint", checkpoint), ("sam_checkpoint", sam_checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise OptionError(f"--{opt.replace('_', '-')} {path!r}: no such file")
    if checkpoint and sam_checkpoint:
        raise OptionError("give --checkpoint or --sam-checkpoint, not both")
    if device is not None:
        check_device(device)
    return keep_ratio


MODEL_OPTIONS = ("model", "keep_ratio", "img_size", "checkpoint", "sam_checkpoint", "device")


def check_model_args(args: argparse.Namespace) -> None:
    """The CLI side of ``check_model_options``: the model options ``add_model_args`` gave a
    tool, checked, and ``args.keep_ratio`` set to the value that will run."""
    given = {k: getattr(args, k) for k in MODEL_OPTIONS if hasattr(args, k)}
    keep_ratio = check_model_options(**given)
    if "keep_ratio" in given:
        args.keep_ratio = keep_ratio


EXIT_USAGE = 2
# a path the user gave that is not there, or not of the kind asked for (``--data /dev/null``)
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (multi-line messages joined)."""
    return " ".join(str(e).split()) or type(e).__name__


def one_line_parse_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse prints its usage block before an error; a user error here is one line. Also
    gives every tool ``--print-config``: the options it would run with (config file and
    command line applied), as a YAML mapping that ``--config`` takes back, then exit 0."""

    def error(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]
    if "--print-config" not in parser._option_string_actions:
        parser.add_argument("--print-config", action="store_true",
                            help="print the options this command would run with (YAML, "
                                 "usable as --config) and exit")
        parse = parser.parse_args

        def parse_args(args: Sequence[str] | None = None, namespace: Any = None) -> Any:
            ns = parse(args, namespace)
            if vars(ns).pop("print_config", False):
                sys.stdout.write(config_text(ns))
                sys.exit(0)
            return ns

        parser.parse_args = parse_args  # type: ignore[method-assign]
    return parser


def config_text(ns: argparse.Namespace) -> str:
    """The parsed options as YAML (JSON where PyYAML is not installed: also valid YAML)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    opts = {k: plain(v) for k, v in vars(ns).items() if k != "config"}
    try:
        import yaml
    except ImportError:
        import json

        return json.dumps(opts, indent=1) + "\n"
    return yaml.safe_dump(opts, sort_keys=False, default_flow_style=None)


class MissingExtraError(UserError):
    """A command run without the optional dependencies it needs (``blsam.extras``)."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` (``blsam.extras.EXTRAS``) that cannot be imported here."""
    import importlib.util

    return sorted(m for m in set(EXTRAS[extra].values()) if importlib.util.find_spec(m) is None)


def extra_message(extra: str, missing: Sequence[str]) -> str:
    """The one line that names the extra to install."""
    return (f"this command needs the optional dependencies of blsam[{extra}] (missing: "
            f"{', '.join(missing)}): pip install \"blsam[{extra}]\"")


def require_extra(extra: str) -> None:
    """Raise ``MissingExtraError`` (one line naming the extra) if ``extra`` is not installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(extra_message(extra, missing))


def _wants_help(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("-h", "--help") for a in args)


def run_cli(body: Callable[[], object],
            extra_errors: tuple[type[BaseException], ...] = (), extra: str | None = None,
            argv: Sequence[str] | None = None) -> int:
    """Run a tool's ``main``: ``UserError`` (and ``USER_ERRORS``' path errors, ``extra_errors``,
    a ``SystemExit("message")``) become one ``error:`` line and exit 2; ``--help`` / argparse
    errors keep their codes.

    ``extra``: the optional dependencies the tool needs (``blsam.extras``). Without them the
    tool stops before any work with one line naming the extra, exit 2; ``--help`` (in ``argv``,
    default ``sys.argv``) still prints the help, as it needs only the core dependencies (a
    module of the extra imported anyway gives the same one line).

    An error already printed (``e.printed``, e.g. by the failing rank of a torchrun job) is not
    printed again; ``e.all_ranks`` waits for every rank before exiting (torchrun kills the
    others when one exits)."""
    try:
        if extra is not None and not _wants_help(argv):
            require_extra(extra)
        code = body()
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if extra is None or top not in EXTRAS[extra].values():
            raise
        sys.stderr.write(f"error: {extra_message(extra, [top])}\n")
        return EXIT_USAGE
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message"): the message is the error line
            sys.stderr.write(f"error: {one_line(e)}\n")
            return EXIT_USAGE
        return int(e.code or 0)
    except USER_ERRORS + tuple(extra_errors) as e:
        if not getattr(e, "printed", False):
            sys.stderr.write(f"error: {one_line(e)}\n")  # one write: ranks sharing a pipe
            sys.stderr.flush()
        if getattr(e, "all_ranks", False):
            from .dist import barrier, cleanup

            barrier()
            cleanup()
        return EXIT_USAGE
    return code if isinstance(code, int) else 0  # a main that returns its results: success


def run_tool(parse: Callable[[Sequence[str] | None], argparse.Namespace],
             main: Callable[[argparse.Namespace], object], argv: Sequence[str] | None = None,
             check: Callable[[argparse.Namespace], object] | None = check_model_args,
             extra: str | None = None,
             extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """The one path of a tool: parse ``argv``, ``check`` the options (default: the model
    options every tool shares) before any work, run ``main``; every user error on the way is
    one ``error:`` line and exit 2 (``run_cli``)."""

    def body() -> object:
        args = parse(argv)
        if check is not None:
            check(args)
        return main(args)

    return run_cli(body, extra_errors, extra=extra, argv=argv)
