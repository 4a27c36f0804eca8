"""What an evaluation produces, typed: a rank's shard of outputs (``ShardResult``, merged on
rank 0 with ``ShardResult.merge``) and the record of one protocol at one keep ratio
(``EvalResult``, written as the result JSON by ``to_json`` and read back by ``from_json``).

Why typed: the shard and the record cross module (and process) boundaries; string keys there
were checked only when a file was read (``report.check_result``), and a misspelt key in the
runner or the merge failed hours into a run. The JSON format is unchanged: ``to_json`` writes
today's keys in today's order, and ``from_json`` reads every file written since format 1 (a
file without a ``format`` field is format 1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..errors import UserError

RESULT_KIND = "blsam.zero_shot"
CURVE_KIND = "blsam.keep_ratio_curve"
FORMAT = 2  # the result JSON's version; files without the field are version 1


class ResultFormatError(UserError):
    """A file that is not a result record this code can read (``report.TableError`` is one)."""


# --------------------------------------------------------------------------- shards
@dataclass
class ImageCounts:
    """What the loop counted over its images and annotations (summed over ranks)."""

    skipped_crowd: int = 0
    skipped_empty: int = 0
    bad_annotations: int = 0  # the loader's (of every GT protocol alike)
    images_encoded: int = 0
    images_not_encoded: int = 0  # nothing to prompt: never read
    exif_rotated_images: int = 0

    def __add__(self, other: ImageCounts) -> ImageCounts:
        return ImageCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                              for f in fields(self)})


@dataclass
class ProtocolOutput:
    """One protocol's outputs over a shard's images, each item carrying its sort ``key``."""

    records: list[dict[str, Any]] = field(default_factory=list)  # per GT object: IoUs, size
    results: list[dict[str, Any]] = field(default_factory=list)  # detector: COCO results
    predictions: list[dict[str, Any]] = field(default_factory=list)  # --save-predictions
    decode_s: float = 0.0
    bad_annotations: int = 0

    def saved_items(self, prompt: str) -> list[dict[str, Any]]:
        """What ``--save-predictions`` writes: the detector's results, the others' masks."""
        return self.results if prompt == "detector" else self.predictions


@dataclass
class ShardResult:
    """``Evaluator.run``'s output on one rank (picklable: gathered to rank 0), or, after
    ``merge``, the whole run's: items in the order one process would have produced them."""

    protocols: dict[str, ProtocolOutput]
    evaluated_image_ids: list[int] = field(default_factory=list)
    missing_images: list[int] = field(default_factory=list)
    bad_images: list[dict[str, Any]] = field(default_factory=list)  # {"id", "file", "reason"}
    counts: ImageCounts = field(default_factory=ImageCounts)
    encoder_s: float = 0.0
    encoder_s_per_rank: list[float] = field(default_factory=list)  # set by ``merge``

    @classmethod
    def merge(cls, shards: Sequence[ShardResult]) -> ShardResult:
        """Concatenate per-rank results in the order one process would have produced them."""
        protocols = {}
        for name in shards[0].protocols:
            parts = [s.protocols[name] for s in shards]
            protocols[name] = ProtocolOutput(
                *(sorted((x for p in parts for x in getattr(p, key)), key=lambda x: x["key"])
                  for key in ("records", "results", "predictions")),
                decode_s=sum(p.decode_s for p in parts),
                bad_annotations=sum(p.bad_annotations for p in parts))
        counts = ImageCounts()
        for s in shards:
            counts = counts + s.counts
        return cls(protocols,
                   evaluated_image_ids=sorted(i for s in shards for i in s.evaluated_image_ids),
                   missing_images=sorted(i for s in shards for i in s.missing_images),
                   bad_images=sorted((b for s in shards for b in s.bad_images),
                                     key=lambda b: b["id"]),
                   counts=counts, encoder_s=sum(s.encoder_s for s in shards),
                   encoder_s_per_rank=[s.encoder_s for s in shards])


# --------------------------------------------------------------------------- the record
@dataclass
class EvalResult:
    """The result JSON of one protocol at one keep ratio (docs/evaluation.md lists the keys).

    The nested parts (``protocol``, ``counts``, ``metrics``, ``timing``, ...) stay JSON objects:
    they are the file's, read by ``report`` and by other tools. Keys this code does not know
    (from a newer minor writer) are kept in ``extra`` and written back."""

    name: str
    model: str
    img_size: int
    dataset_kind: str
    protocol: dict[str, Any]
    metrics: dict[str, Any]
    counts: dict[str, Any]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    keep_ratio: float | None = None
    amp: str | None = "fp32"
    ann_file: str | None = None
    limit: int | None = None
    run: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    skipped_images: dict[str, Any] = field(default_factory=dict)
    skipped_annotations: list[dict[str, Any]] = field(default_factory=list)
    annotation_check: dict[str, Any] = field(default_factory=dict)
    detection_counts: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    gflops: float | None = None
    gflops_convention: str = "paper"
    timing: dict[str, Any] = field(default_factory=dict)
    predictions_file: str | None = None  # written with --save-predictions
    outputs: dict[str, str] | None = None  # the files written; not in the JSON itself
    format: int = FORMAT
    source_file: str | None = None  # the file it was read from (``_file``), not written
    extra: dict[str, Any] = field(default_factory=dict)

    # written in this order (today's files); the rest only when set
    _ORDER: ClassVar = ("name", "model", "checkpoint", "checkpoint_sha256", "keep_ratio",
                        "img_size", "amp", "dataset_kind", "ann_file", "limit", "protocol",
                        "run", "config", "versions", "counts", "skipped_images",
                        "skipped_annotations", "annotation_check", "detection_counts",
                        "images", "metrics", "gflops", "gflops_convention", "timing")
    _REQUIRED: ClassVar = {"name": str, "model": str, "protocol": dict, "dataset_kind": str,
                           "metrics": dict, "img_size": int, "counts": dict}

    @property
    def tag(self) -> str:
        """The protocol's name in the run (``point1``, ``box``, ...)."""
        return str(self.protocol["name"])

    def to_json(self) -> dict[str, Any]:
        """The record as written (and as ``blsam-eval``'s ``main`` returns it)."""
        d: dict[str, Any] = {"kind": RESULT_KIND, "format": self.format}
        d.update((k, getattr(self, k)) for k in self._ORDER)
        d.update(self.extra)
        if self.predictions_file is not None:
            d["predictions_file"] = self.predictions_file
        if self.outputs is not None:
            d["outputs"] = self.outputs
        if self.source_file is not None:
            d["_file"] = self.source_file
        return d

    @classmethod
    def from_json(cls, data: Any, where: str = "result") -> EvalResult:
        """A record read back (files of format 1 and 2), or ``ResultFormatError`` saying why
        not (``where``: the file, for the message)."""
        if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
            kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise ResultFormatError(
                f"{where}: not a zero-shot result of eval/zero_shot.py (kind {kind!r}; "
                f"results written before format {FORMAT} need a re-run)")
        for key, typ in cls._REQUIRED.items():
            if not isinstance(data.get(key), typ):
                raise ResultFormatError(f"{where}: '{key}' missing or not a {typ.__name__}")
        if "name" not in data["protocol"] or "paper_default" not in data["protocol"]:
            raise ResultFormatError(f"{where}: 'protocol' lacks 'name'/'paper_default'")
        version = data.get("format", 1)
        if not isinstance(version, int) or version > FORMAT:
            raise ResultFormatError(f"{where}: result format {version!r}, newer than this "
                                    f"blsam reads ({FORMAT}): upgrade blsam")
        known = {f.name for f in fields(cls)} - {"source_file", "extra", "format"}
        kw = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items()
                 if k not in known and k not in ("kind", "format", "_file")}
        return cls(**kw, format=version, source_file=data.get("_file"), extra=extra)
