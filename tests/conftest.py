"""Shared fixtures: random SAM checkpoints with SAM's key names, and a real photo."""
from __future__ import annotations

import pytest
import torch

from blsam.testing import real_photo, save_random_sam_checkpoint


@pytest.fixture(scope="session")
def sam_vit_b_ckpt(tmp_path_factory) -> str:
    """A stand-in for sam_vit_b_01ec64.pth: random ViT-B SAM with randomised position tables."""
    return save_random_sam_checkpoint("vit_b", tmp_path_factory.mktemp("ckpt") / "sam_b.pth")


@pytest.fixture(scope="session")
def photo():
    return real_photo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
