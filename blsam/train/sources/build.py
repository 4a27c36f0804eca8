"""Open the source ``--data-format`` names, make its datasets and sampler, hold out its
validation images, and tie a teacher cache to it.

A source's *identity* says which images its keys name: SA-1B's keys are Meta's image ids, the
same in every copy (``{"format": "sa1b"}``, also what a cache from before sources read as);
a COCO set is its annotation file's sha256 and image folder; an image folder is its path and
the digest of its file list (names and sizes); a mixture is its members' identities under
their names. The teacher cache records the identity it was made for (``blsam-cache-teacher``
takes the same source flags), and training refuses a cache made for another source.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...utils.cli import OptionError
from ..data import DataError, SA1BDataset, hold_out_val, select_records, select_val_records
from ..sampler import EpochBatchSampler, MixtureBatchSampler, allocate
from .coco import CocoDataset, index_coco
from .common import pick_fraction
from .images import ImageFolderDataset, index_images
from .mixture import MixtureDataset
from .spec import SourceSpec

if TYPE_CHECKING:
    from ..config import TrainConfig

log = logging.getLogger("blsam.train")
SA1B_IDENTITY: dict[str, Any] = {"format": "sa1b"}


@dataclass
class Source:
    """An opened source: its selected ``records``, every indexed one (``pool``), what was
    skipped while indexing, the selection report and its identity."""

    spec: SourceSpec
    records: list[Any]
    pool: list[Any]
    skipped: list[str]
    selection: dict[str, Any]
    identity: dict[str, Any]
    annotations: Any = None  # coco: the checked annotation set
    members: list[Source] = field(default_factory=list)  # mixture

    @property
    def labelled(self) -> bool:
        return self.spec.labelled

    def dataset(self, records: list[Any] | None = None, **kw: Any) -> Any:
        """A dataset of ``records`` (default: the selection); ``kw`` as ``SA1BDataset``'s."""
        records = self.records if records is None else records
        f = self.spec.format
        if f == "sa1b":
            return SA1BDataset(records, **kw)
        if f == "coco":
            return CocoDataset(records, self.annotations, exif=self.spec.exif, **kw)
        if f == "images":
            return ImageFolderDataset(records, exif=self.spec.exif, **kw)
        return MixtureDataset([m.dataset([r for r in records
                                          if r.key.startswith(m.spec.name + "/")], **kw)
                               for m in self.members])

    def sampler(self, ds: Any, batch_size: int, rank: int, world: int, seed: int
                ) -> EpochBatchSampler:
        if self.spec.format == "mixture":
            return MixtureBatchSampler([len(p) for p in ds.parts],
                                       [m.weight for m in self.spec.members], batch_size, rank,
                                       world, seed, self.spec.epoch_size or 0)
        return EpochBatchSampler(len(ds), batch_size, rank, world, seed)


def open_source(spec: SourceSpec, seed: int) -> Source:
    """Index ``spec`` and pick its seeded subset (``DataError`` when it holds nothing)."""
    info: dict[str, Any] = {}
    f = spec.format
    if f == "sa1b":
        records, skipped = select_records(spec.data, spec.shards, spec.fraction, seed, info=info)
        return Source(spec, records, records, skipped, info, dict(SA1B_IDENTITY))
    if f == "mixture":
        return _open_mixture(spec, seed)
    ann = None
    if f == "coco":
        pool, ann, identity, skipped = index_coco(spec, info)
    else:
        pool, identity = index_images(spec, info)
        skipped = []
    records = pick_fraction(pool, spec.fraction, seed, f"{f} {spec.ann_file or spec.data}",
                            info)
    return Source(spec, records, pool, skipped, info, identity, ann)


def _open_mixture(spec: SourceSpec, seed: int) -> Source:
    members = []
    for m in spec.members:
        src = open_source(m, seed)
        pre = m.name + "/"
        for attr in ("records", "pool"):  # keys prefixed: members may share file names
            setattr(src, attr, [dataclasses.replace(r, key=pre + r.key)
                                for r in getattr(src, attr)])
        src.skipped = [pre + s for s in src.skipped]
        members.append(src)
    sizes = [len(m.records) for m in members]
    per_epoch = allocate([m.weight for m in spec.members], spec.epoch_size or sum(sizes))
    total = max(sum(per_epoch), 1)
    rows = []
    for m, n, s in zip(members, per_epoch, sizes):
        rows.append({"name": m.spec.name, "format": m.spec.format, "weight": m.spec.weight,
                     "images": s, "samples_per_epoch": n, "share": n / total,
                     "selection": m.selection})
        log.info("mixture: %s (%s) %.1f%% of the samples: %d per epoch from %d images",
                 m.spec.name, m.spec.format, 100 * n / total, n, s)
    selection = {"format": "mixture", "supervised": spec.labelled, "images": sum(sizes),
                 "samples_per_epoch": sum(per_epoch), "sources": rows}
    identity = {"format": "mixture",
                "members": [{"name": m.spec.name, **m.identity} for m in members]}
    return Source(spec, [r for m in members for r in m.records],
                  [r for m in members for r in m.pool], [s for m in members for s in m.skipped],
                  selection, identity, members=members)


def signature_extras(src: Source) -> dict[str, Any]:
    """What the run signature records beyond the options: nothing for SA-1B (checkpoints from
    before sources resume as they did); the source identity, whether the supervised term is
    on, the EXIF rule, and a mixture's weights for the others."""
    if src.spec.format == "sa1b":
        return {}
    out = {"data_format": src.spec.format, "source": src.identity,
           "supervised": src.labelled, "exif_orientation": src.spec.exif}
    if src.spec.format == "mixture":
        out["mixture_weights"] = {m.name: m.weight for m in src.spec.members}
        out["epoch_size"] = src.spec.epoch_size
    return out


def _pick(pool: list[Any], exclude: set, n: int, seed: int) -> list[Any]:
    out = [r for r in pool if r.key not in exclude]
    if len(out) > n:
        out = random.Random(seed + 1).sample(out, n)
    return sorted(out, key=lambda r: r.key)


def val_split(cfg: TrainConfig, src: Source, records: list[Any]
              ) -> tuple[list[Any], list[Any], Source]:
    """(training records, validation records, the source they come from): ``--val-data...``
    when given, else images of the training source outside its selection, else (announced,
    ``selection["val_held_out"]``) ``--val-images`` held out of the selection."""
    vspec = cfg.val_source_spec()
    if vspec is None and src.spec.format in ("mixture", "images"):
        raise OptionError(f"validation needs labelled held-out images: with --data-format "
                          f"{src.spec.format} pass --val-data-format sa1b|coco with --val-data "
                          f"or --val-ann-file/--val-img-dir, or --val-every 0")
    if vspec is not None and vspec.format == "sa1b":
        same = src.spec.format == "sa1b"
        return records, select_val_records(vspec.data, records if same else [],
                                           cfg.val.val_images, cfg.data.seed), src if same else \
            Source(vspec, [], [], [], {}, dict(SA1B_IDENTITY))
    if vspec is not None:
        vsrc = open_source(vspec, cfg.data.seed)
        exclude = {r.key for r in records} if vsrc.identity == src.identity else set()
        val = _pick(vsrc.pool, exclude, cfg.val.val_images, cfg.data.seed)
        if not val:
            raise DataError("--val-ann-file holds no image outside the training subset: pass "
                            "other images, or --val-every 0")
        log.info("validation: %d held-out images (%d asked for)", len(val), cfg.val.val_images)
        return records, val, vsrc
    if src.spec.format == "sa1b":
        try:
            return records, select_val_records(cfg.data.data, records, cfg.val.val_images,
                                               cfg.data.seed), src
        except DataError:
            if cfg.val.val_only:
                raise
    else:
        val = _pick(src.pool, {r.key for r in records}, cfg.val.val_images, cfg.data.seed)
        if val:
            log.info("validation: %d held-out images (%d asked for)", len(val), cfg.val.val_images)
            return records, val, src
    train, val = hold_out_val(records, cfg.val.val_images, cfg.data.seed)
    src.selection["val_held_out"] = len(val)
    log.warning("no image of the training source lies outside the training subset: %d of the "
                "%d selected images are held out of training for validation (pass --val-data "
                "to use other images)", len(val), len(records))
    return train, val, src


@dataclass
class TrainData:
    source: Source
    records: list[Any]
    ds: Any
    sampler: EpochBatchSampler
    val_ds: Any = None


def training_data(cfg: TrainConfig, rank: int, world: int, teacher_name: str
                  ) -> TrainData:
    """The run's source, checked against ``--teacher-cache``, its datasets and sampler."""
    from ..teacher import check_cache

    data, seed, img_size = cfg.data, cfg.data.seed, cfg.model.img_size
    src = open_source(cfg.source_spec(), seed)
    if data.teacher_cache:
        check_cache(data.teacher_cache, teacher_name, img_size, cfg.model.sam_checkpoint)
        check_cache_source(data.teacher_cache, src.identity)
    records, val_records, vsrc = src.records, [], src
    if cfg.val.val_every or cfg.val.val_only:
        records, val_records, vsrc = val_split(cfg, src, records)
    ds = src.dataset(records, img_size=img_size, masks_per_image=data.masks_per_image,
                     prompt_types=data.prompt_types, max_points=data.max_points, seed=seed,
                     teacher_cache=data.teacher_cache, max_mask_fraction=data.max_mask_fraction,
                     uint8_images=True)
    val_ds = None
    if val_records:  # a cache's keys name the images of its own source only
        val_ds = vsrc.dataset(val_records[rank::world], img_size=img_size,
                              masks_per_image=cfg.val.val_masks, seed=seed,
                              teacher_cache=data.teacher_cache if vsrc.identity == src.identity
                              else None, max_mask_fraction=data.max_mask_fraction, val=True)
    return TrainData(src, records, ds, src.sampler(ds, cfg.optim.batch_size, rank, world, seed),
                     val_ds)


def check_cache_source(cache_dir: str, identity: dict[str, Any]) -> None:
    """Refuse a teacher cache made for another source (its keys name other images)."""
    from ..packed_cache import CacheError, read_index

    have = read_index(cache_dir).get("source", SA1B_IDENTITY)
    if have != identity:
        raise CacheError(f"--teacher-cache {cache_dir!r} was made for another source "
                         f"({_brief(have)}); this run reads {_brief(identity)}: make its cache "
                         f"with blsam-cache-teacher and the same data flags")


def _brief(identity: dict[str, Any]) -> str:
    if identity.get("format") == "mixture":
        return "mixture of " + ", ".join(f"{m['name']}: {_brief(m)}"
                                         for m in identity["members"])
    extra = {k: v for k, v in identity.items() if k != "format"}
    return identity.get("format", "?") + (f" {extra}" if extra else "")
