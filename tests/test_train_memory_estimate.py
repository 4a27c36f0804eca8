"""Issue 27.5: the estimator counts DDP's gradient buckets (none with gradient_as_bucket_view,
the trainer's setting; a second fp32 copy otherwise) and the dense masks memory-efficient SDPA
keeps for backward, checked against hand arithmetic."""
from __future__ import annotations

import pytest

from blsam.tools.estimate_train_memory import GiB, estimate, parse_args

TINY = ["--model", "tiny_bl", "--img-size", "64", "--batch-size", "2", "--masks-per-image", "2"]


def test_ddp_buckets_are_one_fp32_copy_of_the_trainable_grads():
    view = estimate(parse_args(TINY))
    copy = estimate(parse_args(TINY + ["--ddp-buckets", "copy"]))
    assert view["ddp_grad_buckets_GiB"] == 0.0
    assert copy["ddp_grad_buckets_GiB"] == pytest.approx(4 * copy["trainable_params_M"] * 1e6
                                                         / GiB)
    rest = (copy["weights_grads_adamw_GiB"] + copy["teacher_weights_GiB"] + 2 * (
        copy["activations_fp32_GiB_per_image"] + copy["sdpa_masks_GiB_per_image"]))
    assert copy["total_bf16_GiB_high"] - rest == pytest.approx(copy["ddp_grad_buckets_GiB"])
    assert view["sdpa_masks_GiB_per_image"] > 0  # every attention call passes its rel-pos bias


@pytest.mark.slow  # an h_b meta forward (~7 s on the shared CPUs)
def test_h_b_1024_hand_arithmetic():
    e = estimate(parse_args(["--model", "h_b", "--img-size", "1024", "--batch-size", "8",
                             "--grad-checkpoint", "--ddp-buckets", "copy"]))
    # a global block: 16 heads x 4096 x 4096 tokens x 2 bytes (bf16) = 0.5 GiB per image
    assert e["sdpa_masks_GiB_per_image"] == pytest.approx(16 * 4096 ** 2 * 2 / GiB)
    # 764.7 M trainable fp32 grads: 2.85 GiB of buckets
    assert e["ddp_grad_buckets_GiB"] == pytest.approx(2.85, abs=0.01)
    assert e["total_bf16_GiB_high"] > 39  # the 39-45 GiB, no longer "fits in 40 GB"
