"""SA-1B as Meta distributes it: ``sa_XXXXXX.tar`` shards of ``sa_N.jpg`` + ``sa_N.json``.

This module holds the data-selection flags and the one import path of the reader's parts:
``sa1b_index`` (shards, records, selection), ``annotations`` (RLE checks, mask resizing),
``dataset`` (``SA1BDataset``, ``collate``) and ``sampler`` (``EpochBatchSampler``).

``--data`` may be a folder of tars, a folder of extracted jpg/json pairs, or one tar. Tar
members are indexed once by name (header scan, no extraction) and later read straight from
their data offset, so nothing is ever written to a path taken from an archive, and a worker
re-reads one member without re-parsing the tar.

Damaged inputs never stop a run: a truncated tar member is dropped when indexing, a corrupt
jpg/json is replaced by the next image when read (so every rank still sees full batches and
DDP stays in step); both are logged with the member name and counted.

Annotations are checked before they become targets: the RLE must add up to height x width
(an empty or short ``counts`` string would otherwise decode to uninitialised memory), and the
decoded area and box must agree with the JSON's ``area`` and ``bbox``. A bad annotation is
skipped and counted; an image with no usable annotation left is replaced like a damaged one.
Masks covering more than ``max_mask_fraction`` of the image are dropped (SAM's training rule).

Everything random about a sample (which masks, which prompts) is seeded by
(seed, epoch, index), and the batch sampler is a pure function of (seed, epoch, rank), so a run
resumed at (epoch, batch) sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import argparse

from ..segmentation import AnnotationError, check_rle, rle_run_lengths  # noqa: F401  (D.*)
from .annotations import (  # noqa: F401
    AREA_TOL,
    BOX_TOL_PX,
    LOW_RES_FACTOR,
    MAX_MASK_FRACTION,
    check_annotation,
    decode_rle,
    downsample_mask,
    resize_mask,
)
from .dataset import SA1BDataset, collate, decode_jpeg, preprocess_image  # noqa: F401
from .sa1b_index import (  # noqa: F401
    DamagedDataError,
    DataError,
    Member,
    Record,
    hold_out_val,
    index_folder,
    index_tar,
    list_shards,
    select_records,
    select_val_records,
)
from .sampler import EpochBatchSampler  # noqa: F401  (its home before sources had one)


def add_data_args(parser: argparse.ArgumentParser, require_data: bool = False
                  ) -> argparse._ArgumentGroup:
    """The image-selection flags, one definition for tools/train.py and tools/cache_teacher.py:
    the same flags must pick the same images, or the teacher cache misses the training set."""
    g = parser.add_argument_group("data selection")
    from .sources.spec import add_source_args

    g.add_argument("--data", default=None,
                   help="sa1b: folder of sa_*.tar, folder of jpg/json pairs, or one tar; "
                        "images: the folder of images")
    add_source_args(g)
    g.add_argument("--shards", nargs="+", default=None,
                   help="use only these tar shards (sa_000020 or sa_000020.tar)")
    g.add_argument("--data-fraction", type=float, default=0.02,
                   help="seeded fraction of the images: whole shards when it is >= 1 shard's "
                        "worth, otherwise single images (a warning says so)")
    g.add_argument("--seed", type=int, default=0,
                   help="subset, data order, masks, prompts and model init")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    return g
