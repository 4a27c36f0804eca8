"""What one ``blsam-eval`` run is asked to do (``EvalConfig``) and the checks it passes before
any file is read or model built (``check_config``), apart from the command line.

Why a module of its own: the pipeline (``evaluation.pipeline``) and the CLI share it, and a
library caller builds an ``EvalConfig`` directly; its fields are ``blsam-eval``'s options, one
for one (same names, same defaults), recorded as the result JSON's ``config``.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any

from ..specs import KEEP_RATIO_MODELS, check_keep_ratio
from ..utils.cli import OptionError, check_model_options, check_option, config_from_options
from ..utils.collectives import DEFAULT_TIMEOUT_MIN
from .protocol import ProtocolConfig

PROMPT_RE = re.compile(r"point(\d*)|box|detector")
KEEP = KEEP_RATIO_MODELS  # bLViT and the token-pruning baselines


@dataclass
class EvalConfig:
    """``blsam-eval``'s options (``--help`` says what each means), in its parser's order."""

    config: str | None = None  # the YAML file the defaults came from
    model: str = "b_t"
    checkpoint: str | None = None
    sam_checkpoint: str | None = None
    keep_ratio: float | None = None  # None: the model's default (set by check_config)
    img_size: int = 1024
    device: str = "cpu"
    keep_ratios: list[float] | None = None
    reference: list[str] | None = None
    name: str | None = None
    dataset: str = "lvis"
    ann_file: str | None = None
    img_dir: str | None = None
    det_file: str | None = None
    limit: int | None = None
    skip_missing_images: bool = False
    skip_bad_images: bool = False
    exif_orientation: str = "ignore"
    prompt: list[str] = field(default_factory=lambda: ["point"])
    num_points: int = 1
    point_from: str = "random"
    oracle: bool = False
    box_multimask: bool = False
    num_clicks: int = 0
    max_dets: int | None = None
    seed: int = 0
    batch_prompts: int = 64
    save_predictions: str | None = None
    output: str = "outputs/eval"
    no_flops: bool = False
    no_progress: bool = False
    amp: str = "fp32"
    dist_timeout: float = DEFAULT_TIMEOUT_MIN
    table: list[str] | None = None
    paper: bool = False  # with --table: the paper's Table 2 beside ours

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> EvalConfig:
        """From option values by name (e.g. ``vars()`` of parsed arguments); an unknown name
        is an ``OptionError``."""
        return config_from_options(cls, options, "evaluation")

    def record(self) -> dict[str, Any]:
        """The options as the result JSON's ``config`` records them (``table``, ``paper`` left
        out: they only merge results)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("table", "paper")}

    @property
    def routed(self) -> bool:
        """A model with a keep ratio (bLViT or a token-pruning baseline)."""
        return self.model in KEEP


# --------------------------------------------------------------------------- checks
def protocols_from_config(config: EvalConfig) -> list[ProtocolConfig]:
    """The run's protocols; each switch goes to the protocols it means something for, and a
    switch that means nothing for all of them is an ``OptionError``."""
    names = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)
    max_dets = config.max_dets if config.max_dets is not None else (  # the evaluators' caps
        300 if config.dataset == "lvis" else 100)
    protos = []
    for name in names:
        m = PROMPT_RE.fullmatch(str(name))
        if m is None:
            raise OptionError(f"--prompt {name!r}: use point, point<k> (point1, point3, ...), "
                              f"box or detector")
        kind = "point" if str(name).startswith("point") else str(name)
        k = int(m.group(1)) if m.group(1) else config.num_points
        if kind == "point" and k < 1:
            raise OptionError(f"--prompt {name}: the number of points must be >= 1")
        cfg = ProtocolConfig(
            prompt=kind, num_points=k, point_from=config.point_from,
            num_clicks=config.num_clicks if kind != "detector" else 0,
            box_multimask=config.box_multimask and kind != "point", seed=config.seed,
            batch_prompts=config.batch_prompts, max_dets=max_dets,
            skip_missing_images=config.skip_missing_images,
            save_predictions=bool(config.save_predictions))
        cfg.oracle = config.oracle and cfg.multimask and kind != "detector"
        protos.append(cfg)
    seen = [c.name for c in protos]
    if len(set(seen)) != len(seen):
        raise OptionError(f"--prompt {' '.join(map(str, names))}: a protocol is listed twice "
                          f"({seen})")
    kinds = {c.prompt for c in protos}
    if config.point_from != "random" and "point" not in kinds:
        raise OptionError(f"--point-from {config.point_from} needs a point prompt")
    if config.box_multimask and not kinds & {"box", "detector"}:
        raise OptionError("--box-multimask needs a box or detector prompt")
    if config.num_clicks and not kinds & {"point", "box"}:
        raise OptionError("--num-clicks needs GT masks: use it with point or box prompts")
    if config.oracle and not any(c.oracle for c in protos):
        raise OptionError("--oracle picks one of 3 masks, but no protocol of this run is "
                          "multimask (1 point, --point-from iterative or --box-multimask)")
    for c in protos:
        try:
            c.validate()
        except ValueError as e:
            raise OptionError(str(e)) from e
    return protos


def _check_writable_dir(path: str, opt: str) -> None:
    """Create ``path`` and write a file in it now, not after hours of evaluation."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"{opt} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise OptionError(f"{opt} {path!r} is not writable: {e.strerror or e}") from e


def check_config(config: EvalConfig) -> list[ProtocolConfig]:
    """Every option checked before any file is loaded or model built; returns the protocols
    (``config.keep_ratio`` left out becomes the model's default, as recorded)."""
    for opt in ("ann_file", "img_dir"):
        if not getattr(config, opt):
            raise OptionError(f"--{opt.replace('_', '-')} is required")
    if not os.path.isdir(config.img_dir):
        raise OptionError(f"--img-dir {config.img_dir!r} is not a folder")
    for opt in ("num_points", "batch_prompts", "limit", "max_dets"):
        v = getattr(config, opt)
        if v is not None and v < 1:
            raise OptionError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    if config.num_clicks < 0:
        raise OptionError(f"--num-clicks must be >= 0, got {config.num_clicks}")
    if not config.dist_timeout > 0:
        raise OptionError(f"--dist-timeout must be > 0 minutes, got {config.dist_timeout}")
    config.keep_ratio = check_model_options(
        model=config.model, keep_ratio=config.keep_ratio, img_size=config.img_size,
        checkpoint=config.checkpoint, sam_checkpoint=config.sam_checkpoint, device=config.device)
    protos = protocols_from_config(config)
    if any(c.prompt == "detector" for c in protos):
        if not config.det_file:
            raise OptionError("--prompt detector needs --det-file (COCO-format detections)")
        if not os.path.isfile(config.det_file):
            raise OptionError(f"--det-file {config.det_file!r}: no such file")
    if config.keep_ratios is not None:
        if config.model not in KEEP:
            raise OptionError(f"--keep-ratios: {config.model} has no token routing "
                              f"({', '.join(KEEP)})")
        for r in config.keep_ratios:
            check_option(check_keep_ratio, r, "--keep-ratios")
        if len(set(config.keep_ratios)) != len(config.keep_ratios):
            raise OptionError(f"--keep-ratios lists a ratio twice: {config.keep_ratios}")
    if config.reference and config.keep_ratios is None:
        raise OptionError("--reference draws points on the --keep-ratios curve; give "
                          "--keep-ratios")
    _check_writable_dir(config.output, "--output")
    if config.save_predictions:
        if os.path.isdir(config.save_predictions):
            raise OptionError(f"--save-predictions {config.save_predictions!r} is a folder; give "
                              f"a file name (.jsonl or .json)")
        _check_writable_dir(os.path.dirname(os.path.abspath(config.save_predictions)),
                            "--save-predictions folder")
    return protos
