"""Shared fixtures: random SAM checkpoints with SAM's key names, and a real photo.

Fast-tier tests use the tiny registered pair ``tiny_bl`` (student: every layer kind) and
``tiny_vit`` (its vanilla teacher) through ``tiny_sam_ckpt``; full-width models are ``slow``.
"""
from __future__ import annotations

import pytest
import torch

from blsam.testing import real_photo, save_random_sam_checkpoint


@pytest.fixture(scope="session")
def tiny_sam_ckpt(tmp_path_factory) -> str:
    """A random ``tiny_vit`` SAM checkpoint at 1024 px (position tables resized on load), with
    randomised position tables: the stand-in for an official checkpoint in the fast tier."""
    return save_random_sam_checkpoint("tiny_vit", tmp_path_factory.mktemp("ckpt") / "sam_t.pth")


@pytest.fixture(scope="session")
def sam_vit_b_ckpt(tmp_path_factory) -> str:
    """A stand-in for sam_vit_b_01ec64.pth (slow tier only: 375 MB)."""
    return save_random_sam_checkpoint("vit_b", tmp_path_factory.mktemp("ckpt") / "sam_b.pth")


@pytest.fixture(scope="session")
def photo():
    return real_photo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
