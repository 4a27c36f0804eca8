"""What ``--data-format`` names: one source (SA-1B, COCO/LVIS, a folder of images) or a
weighted mixture of them, parsed and checked before anything is indexed or built.

A mixture is a YAML file (``--mixture FILE``)::

    epoch_size: 20000          # optional: samples per epoch (default: all members' images)
    sources:
      - {name: sa1b, format: sa1b, data: /data/sa1b, weight: 0.8, data_fraction: 0.02}
      - {name: cells, format: coco, ann_file: cells/train.json, img_dir: cells/img, weight: 0.2}
      - {name: raw, format: images, data: /data/unlabelled, weight: 0.1}

Relative paths are read from the YAML file's folder. Weights are relative (they need not sum
to 1, only to a positive number); ``name`` (default: the format and position) prefixes the
member's image keys, so two members can hold files of the same name.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...utils.cli import OptionError

DATA_FORMATS = ("sa1b", "coco", "images", "mixture")
LEAF_FORMATS = ("sa1b", "coco", "images")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
EXIF_MODES = ("ignore", "apply")
MEMBER_KEYS = ("name", "format", "data", "ann_file", "img_dir", "weight", "data_fraction",
               "shards")


@dataclass(frozen=True)
class SourceSpec:
    """One source as asked for (nothing indexed yet); a mixture holds its ``members``."""

    format: str
    data: str | None = None  # sa1b: shards / pairs; images: the folder
    ann_file: str | None = None  # coco: the instances json
    img_dir: str | None = None  # coco: where its file_names are
    fraction: float = 1.0
    shards: tuple[str, ...] | None = None
    name: str = ""  # mixture member: the prefix of its keys
    weight: float = 1.0
    exif: str = "ignore"
    members: tuple[SourceSpec, ...] = ()
    epoch_size: int | None = None  # mixture: samples per epoch

    @property
    def labelled(self) -> bool:
        """Whether any image of it has masks (a folder of plain images has none)."""
        if self.format == "mixture":
            return any(m.labelled for m in self.members)
        return self.format != "images"


def add_source_args(g: argparse._ArgumentGroup) -> None:
    """The source flags (train and cache-teacher share them through ``data.add_data_args``)."""
    g.add_argument("--data-format", default="sa1b", choices=DATA_FORMATS,
                   help="sa1b: --data of SA-1B shards; coco: --ann-file + --img-dir (COCO / "
                        "LVIS instances); images: --data folder of plain images, searched "
                        "recursively (feature distillation only); mixture: --mixture YAML")
    g.add_argument("--ann-file", default=None, help="coco: the instances json")
    g.add_argument("--img-dir", default=None, help="coco: the folder of its images")
    g.add_argument("--mixture", default=None,
                   help="mixture: YAML listing the weighted sources (docs/training.md)")
    g.add_argument("--exif-orientation", default="ignore", choices=EXIF_MODES,
                   help="coco / images: EXIF orientation of the files (ignore: the stored "
                        "pixels, as COCO's masks are drawn; apply: rotate as a viewer shows)")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise OptionError(msg)


def check_leaf(spec: SourceSpec, where: str = "") -> None:
    """Refuse a source that cannot be read, naming the option (or mixture entry)."""
    f = spec.format
    opt = (lambda k: f"{where}{k}") if where else (lambda k: "--" + k.replace("_", "-"))
    _need(f in LEAF_FORMATS, f"{where or '--data-format '}format {f!r}: must be one of "
          f"{LEAF_FORMATS}")
    _need(0.0 < spec.fraction <= 1.0, f"{opt('data_fraction')} must be in (0, 1], got "
          f"{spec.fraction}")
    _need(not spec.shards or f == "sa1b", f"{opt('shards')} is for sa1b shards only")
    if f == "coco":
        _need(bool(spec.ann_file), f"format coco needs {opt('ann_file')} (the COCO / LVIS "
              f"instances json)")
        _need(os.path.isfile(spec.ann_file), f"{opt('ann_file')} {spec.ann_file!r}: no such file")
        _need(bool(spec.img_dir), f"format coco needs {opt('img_dir')} (the folder of its "
              f"images)")
        _need(os.path.isdir(spec.img_dir), f"{opt('img_dir')} {spec.img_dir!r}: no such folder")
    else:
        _need(bool(spec.data), f"format {f} needs {opt('data')}")
        _need(spec.ann_file is None and spec.img_dir is None,
              f"{opt('ann_file')} / {opt('img_dir')} are for format coco, not {f}")
        if f == "images":
            _need(os.path.isdir(spec.data), f"{opt('data')} {spec.data!r}: no such folder")


def source_spec(*, data_fraction: float, data_format: str | None = "sa1b",
                data: str | None = None, ann_file: str | None = None,
                img_dir: str | None = None, mixture: str | None = None,
                shards: Sequence[str] | None = None, exif_orientation: str = "ignore"
                ) -> SourceSpec:
    """The training source of the data options (named as the flags), checked
    (``OptionError``: one line, exit 2)."""
    fmt = data_format or "sa1b"
    if fmt == "mixture":
        _need(bool(mixture), "--data-format mixture needs --mixture FILE.yaml")
        _need(data is None and ann_file is None and img_dir is None and not shards,
              "--data-format mixture: --data, --ann-file, --img-dir and --shards go into the "
              "--mixture file's entries")
        return read_mixture(mixture, exif_orientation)
    _need(mixture is None, "--mixture needs --data-format mixture")
    if fmt != "coco" and (ann_file or img_dir):
        raise OptionError(f"--ann-file / --img-dir need --data-format coco (got "
                          f"--data-format {fmt})")
    spec = SourceSpec(fmt, data, ann_file, img_dir, float(data_fraction),
                      tuple(shards) if shards else None, exif=exif_orientation)
    if fmt == "sa1b":  # SA-1B's own checks (list_shards) keep their messages
        _need(not (spec.ann_file or spec.img_dir), "--ann-file / --img-dir need --data-format "
              "coco")
        return spec
    check_leaf(spec)
    return spec


# the data options, by their flag names: ``DataConfig`` and ``CacheConfig`` both hold them, so
# training and the teacher cache pick the same images
SOURCE_OPTIONS = ("data_format", "data", "ann_file", "img_dir", "mixture", "shards",
                  "data_fraction", "exif_orientation")


def source_spec_of(config: object) -> SourceSpec:
    """``source_spec`` of a config holding ``SOURCE_OPTIONS`` as attributes."""
    return source_spec(**{k: getattr(config, k) for k in SOURCE_OPTIONS})


def held_out_spec(*, val_data: str | None = None, val_data_format: str | None = None,
                  val_ann_file: str | None = None, val_img_dir: str | None = None,
                  data_format: str | None = "sa1b", exif_orientation: str = "ignore"
                  ) -> SourceSpec | None:
    """``--val-data`` / ``--val-data-format`` / ``--val-ann-file`` / ``--val-img-dir``: the
    held-out source, or None (held out of the training source, of ``data_format``)."""
    fmt, ann, img = val_data_format, val_ann_file, val_img_dir
    if not (fmt or ann or img or val_data):
        return None
    if fmt is None:
        fmt = "coco" if (ann or img) else data_format
    _need(fmt != "mixture", "--val-data-format mixture: validation reads one source; pass "
          "--val-data-format sa1b|coco with --val-data or --val-ann-file/--val-img-dir")
    _need(fmt != "images", "--val-data-format images: validation needs masks (images-only "
          "sources have none); use a labelled source (sa1b or coco)")
    spec = SourceSpec(fmt, val_data, ann, img, 1.0, exif=exif_orientation)
    if fmt == "coco":
        _need(val_data is None, "--val-data-format coco: give --val-ann-file and "
              "--val-img-dir, not --val-data")
        check_leaf(SourceSpec("coco", ann_file=ann, img_dir=img), "--val-")
    else:
        _need(not (ann or img), "--val-ann-file / --val-img-dir need --val-data-format coco")
        _need(bool(val_data), f"--val-data-format {fmt} needs --val-data")
    return spec


def _number(v: Any, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be a number, got {v!r}") from None
    _need(math.isfinite(x), f"{what} must be finite, got {v!r}")
    return x


def read_mixture(path: str, exif: str = "ignore") -> SourceSpec:
    """Parse and check a mixture YAML (module docstring); every mistake is one line."""
    import yaml

    _need(os.path.isfile(path), f"--mixture {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise OptionError(f"--mixture {path!r} is not valid YAML: {e}") from None
    if isinstance(data, list):
        data = {"sources": data}
    _need(isinstance(data, dict) and isinstance(data.get("sources"), list)
          and len(data["sources"]) > 0,
          f"--mixture {path!r}: expected a list 'sources:' of entries (docs/training.md)")
    unknown = sorted(set(data) - {"sources", "epoch_size"})
    _need(not unknown, f"--mixture {path!r}: unknown key(s) {unknown}")
    base = os.path.dirname(os.path.abspath(path))
    members: list[SourceSpec] = []
    for i, e in enumerate(data["sources"]):
        where = f"--mixture {path!r} entry {i + 1}: "
        _need(isinstance(e, dict), f"{where}must be a mapping, got {e!r}")
        e = {str(k).replace("-", "_"): v for k, v in e.items()}
        bad = sorted(set(e) - set(MEMBER_KEYS))
        _need(not bad, f"{where}unknown key(s) {bad} (known: {list(MEMBER_KEYS)})")
        fmt = str(e.get("format", ""))
        _need(fmt in LEAF_FORMATS, f"{where}format {e.get('format')!r}: must be one of "
              f"{LEAF_FORMATS}")
        weight = _number(e.get("weight", 1.0), f"{where}weight")
        _need(weight >= 0, f"{where}weight must be >= 0, got {weight:g}")
        paths = {k: (os.path.join(base, str(e[k])) if e.get(k) is not None else None)
                 for k in ("data", "ann_file", "img_dir")}
        shards = e.get("shards")
        shards = tuple(str(s) for s in ([shards] if isinstance(shards, str) else shards)) \
            if shards else None
        spec = SourceSpec(fmt, paths["data"], paths["ann_file"], paths["img_dir"],
                          _number(e.get("data_fraction", 1.0), f"{where}data_fraction"),
                          shards, str(e.get("name") or f"{fmt}{i + 1}"), weight, exif)
        _need("/" not in spec.name, f"{where}name {spec.name!r} must not contain '/'")
        check_leaf(spec, where)
        members.append(spec)
    names = [m.name for m in members]
    _need(len(set(names)) == len(names), f"--mixture {path!r}: names repeat: {names}")
    total = sum(m.weight for m in members)
    _need(total > 0, f"--mixture {path!r}: the weights sum to {total:g}; they must sum to a "
          f"positive number")
    size = data.get("epoch_size")
    if size is not None:
        _need(isinstance(size, int) and size >= 1, f"--mixture {path!r}: epoch_size must be an "
              f"integer >= 1, got {size!r}")
    return SourceSpec("mixture", exif=exif, members=tuple(members), epoch_size=size)

