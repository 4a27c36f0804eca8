"""COCO / LVIS instance annotations as a training source (``--data-format coco``).

The annotation file is read and checked by the one validation layer of training and
evaluation (``blsam.annotations``): malformed entries are skipped and counted by reason,
duplicate image ids or file names are refused. Each object's mask (polygons, compressed or
uncompressed RLE) is decoded when sampled and checked against the file's own ``bbox`` /
``area`` and the image size, as SA-1B's are; a bad one is skipped and counted (``bad_ann``).
``iscrowd`` objects are never prompts (a crowd region is many objects, SAM's prompts mean one):
they are left out and counted (``crowd_objects``), as are objects with a box but no mask.
Images are read by the evaluation's reader (whole-file check, size against the file's
``height`` / ``width``, ``--exif-orientation``: ``ignore`` by default, as COCO's masks are
drawn on the stored pixels).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..dataset import SA1BDataset
from ..sa1b_index import DataError
from .common import ImageRecord, log
from .images import read_pixels
from .spec import SourceSpec


def index_coco(spec: SourceSpec, info: dict[str, Any]
               ) -> tuple[list[ImageRecord], Any, dict[str, Any], list[str]]:
    """(every usable image's record, the annotation set, source identity, skipped names)."""
    from ...annotations import load_annotation_file
    from ...evaluation.datasets import resolve_image_path
    from ...utils.files import file_sha256

    ann = load_annotation_file(spec.ann_file)
    skipped: list[str] = []
    records: list[ImageRecord] = []
    crowd = no_mask = no_objects = 0
    for iid in sorted(ann.images):
        image = ann.images[iid]
        objs = ann.objects_by_image.get(iid, [])
        n_crowd = sum(1 for o in objs if o.iscrowd)
        n_box = sum(1 for o in objs if not o.iscrowd and o.segmentation is None)
        crowd, no_mask = crowd + n_crowd, no_mask + n_box
        if len(objs) == n_crowd + n_box:  # nothing to prompt: no target for a labelled source
            no_objects += 1
            continue
        path = resolve_image_path(spec.img_dir, {"file_name": image.file_name})
        if path is None:
            log.warning("skipping image %s: %s not found under --img-dir %s", iid,
                        image.file_name, spec.img_dir)
            skipped.append(image.file_name)
            continue
        records.append(ImageRecord(image.file_name, path, iid))
    if not records:
        raise DataError(f"--ann-file {spec.ann_file!r}: no image with a usable object and a file "
                        f"under --img-dir {spec.img_dir!r} ({len(ann.images)} images listed, "
                        f"{no_objects} without objects, {len(skipped)} files missing)")
    counts = ann.counts
    info.update({"format": "coco", "supervised": True, "exif_orientation": spec.exif,
                 "annotations": counts.as_dict(), "crowd_objects": crowd,
                 "crowd_rule": "not used as prompts", "objects_without_mask": no_mask,
                 "images_without_objects": no_objects, "images_missing": len(skipped)})
    log.info("data: coco %s: %d usable images (%d listed, %d without a non-crowd object, "
             "%d files missing); annotations: %s; %d crowd objects not used as prompts, %d "
             "without a mask (box only)", spec.ann_file, len(records), len(ann.images),
             no_objects, len(skipped), counts.summary(), crowd, no_mask)
    identity = {"format": "coco", "ann_sha256": file_sha256(spec.ann_file),
                "img_dir": os.path.realpath(spec.img_dir)}
    return records, ann, identity, skipped


class CocoDataset(SA1BDataset):
    """SA1BDataset's samples from a COCO set: same keys, prompts and mask rules."""

    def __init__(self, records: list[ImageRecord], annotations: Any, img_size: int = 1024,
                 exif: str = "ignore", **kw: Any) -> None:
        super().__init__(records, img_size, **kw)
        self.images = annotations.images
        self.objects = {r.image_id: [o for o in annotations.objects_by_image.get(r.image_id, [])
                                     if not o.iscrowd and o.segmentation is not None]
                        for r in self.records}
        self.exif = exif

    def load(self, rec: ImageRecord, epoch: int, index: int) -> dict[str, Any]:
        image = self.images[rec.image_id]
        img = read_pixels(rec.path, int(image.height), int(image.width), self.exif)
        sample = self.base_sample(rec.key, img)
        if self.with_targets:
            sample.update(self.targets([(o, image) for o in self.objects[rec.image_id]],
                                       img.shape[:2], sample["hw"], epoch, index))
        return sample

    def decode_mask(self, ann: Any, hw: tuple[int, int]) -> np.ndarray:
        """The shared layer's decode: raises ``ValueError`` when the mask disagrees with the
        file's bbox / area or the image size."""
        from ...annotations import decode_object_mask

        obj, image = ann
        return decode_object_mask(obj, image).astype(np.uint8)
