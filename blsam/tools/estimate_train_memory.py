"""Estimate training memory per GPU without a GPU: one student training forward on the meta
device (no compute, no allocation), counting the bytes autograd saves for backward.

Why meta: a 1024² ViT-H forward is minutes on CPU; on meta it is a second and the shapes (hence
the saved bytes) are exact. Attention is counted as flash/memory-efficient SDPA keeps it
(q, k, v, out, logsumexp), not as the N x N matrix the meta fallback would materialise.
Meta tensors ignore autocast, so saved tensors are fp32; under bf16 autocast the matmul
outputs halve while LayerNorm inputs and the fp32 residual stream do not: the bf16 figure
is a range, 0.5x to 1x of the fp32 count.

    python tools/estimate_train_memory.py --model h_b --img-size 1024 --batch-size 8
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from blsam.specs import BLVIT_MODELS
from blsam.utils.cli import one_line_parse_errors, run_cli

GiB = 2 ** 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="b_t", choices=BLVIT_MODELS)
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--masks-per-image", type=int, default=16)
    p.add_argument("--prompt", default="point", choices=("box", "point", "points"))
    p.add_argument("--trainable", default="image_encoder")
    p.add_argument("--ddp-buckets", default="view", choices=("view", "copy"),
                   help="DDP gradient buckets: views of the grads (gradient_as_bucket_view, "
                        "the trainer's setting) or a second fp32 copy of every trainable grad")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="blocks recomputed in backward: only each block's input is kept")
    return one_line_parse_errors(p).parse_args(argv)


def estimate(args: argparse.Namespace) -> dict[str, float]:
    import torch.fx.experimental._config as fx_config

    import blsam.modeling.attention as attention
    import blsam.modeling.predictor as predictor

    # patched for this call only (an in-process caller's later forwards are real again)
    stack = contextlib.ExitStack()
    # SAM's prompt encoder masks by label
    stack.enter_context(mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True))
    stack.enter_context(mock.patch.object(  # no autocast context on meta
        predictor.TokenPredictor, "forward",
        lambda self, x: self.fc(self.norm(x.float())).softmax(dim=-1)[..., 0]))
    attn_bytes = [0]
    mask_bytes: list[int] = []  # issue 27.5: bf16 masks kept for backward, one per SDPA call
    sdpa = F.scaled_dot_product_attention

    def flash_like(q, k, v, attn_mask=None, scale=None, **kw):
        out = q * 1.0 if v.shape == q.shape else sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        attn_bytes[0] += sum(t.numel() * 2 for t in (q, k, v, out)) + q[..., 0].numel() * 4
        if attn_mask is not None:  # memory-efficient SDPA keeps the dense (B, H, N, S) mask
            mask_bytes.append(q[..., 0].numel() * k.shape[-2] * 2)
        return out

    stack.enter_context(mock.patch.object(attention.F, "scaled_dot_product_attention",
                                          flash_like))
    with stack:
        return _estimate(args, attn_bytes, mask_bytes)


def _estimate(args: argparse.Namespace, attn_bytes: list[int], mask_bytes: list[int]
              ) -> dict[str, float]:
    from blsam import TEACHER_OF, blsam_model_registry
    from blsam.train.distill import DistillModel, enable_grad_checkpointing, set_trainable

    saved: dict[int, int] = {}
    s, m = args.img_size, args.masks_per_image
    with torch.device("meta"):
        sam = blsam_model_registry[args.model](img_size=s)
        teacher = blsam_model_registry[TEACHER_OF[args.model]](img_size=s)
        set_trainable(sam, args.trainable)
        if args.grad_checkpoint:
            enable_grad_checkpointing(sam.image_encoder)
        params = {id(p) for p in sam.parameters()}
        model = DistillModel(sam, 2.5)
        n_pts = {"box": 1, "point": 1, "points": 3}[args.prompt]
        batch = {"masks": [torch.zeros(m, s // 4, s // 4)], "kind": [args.prompt],
                 "boxes": [torch.zeros(m, 4)], "points": [torch.zeros(m, n_pts, 2)],
                 "labels": [torch.ones(m, n_pts, dtype=torch.long)]}
        x, t = torch.zeros(1, 3, s, s), torch.zeros(1, 256, s // 16, s // 16)

    def pack(v: torch.Tensor) -> torch.Tensor:
        if id(v) not in params:
            st = v.untyped_storage()
            saved[id(st)] = st.nbytes()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        model(x, batch, t)
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in sam.parameters()) - trainable
    if args.grad_checkpoint:  # inputs held by the checkpoints; one block live at a time
        spec = sam.image_encoder.spec
        kept = spec.depth * (s // 16) ** 2 * spec.embed_dim * 4
        attn_bytes[0] = attn_bytes[0] // spec.depth
        saved[-1] = kept
    act32 = sum(saved.values()) / GiB + attn_bytes[0] / GiB
    # checkpointed: only the recomputed block's masks are live; otherwise every block's
    masks = (max(mask_bytes, default=0) if args.grad_checkpoint else sum(mask_bytes)) / GiB
    out = {
        "student_params_M": (trainable + frozen) / 1e6,
        "trainable_params_M": trainable / 1e6,
        "weights_grads_adamw_GiB": (16 * trainable + 4 * frozen) / GiB,
        "teacher_weights_GiB": 4 * sum(p.numel() for p in teacher.parameters()) / GiB,
        "activations_fp32_GiB_per_image": act32,
        "sdpa_masks_GiB_per_image": masks,
        "ddp_grad_buckets_GiB": 4 * trainable / GiB if args.ddp_buckets == "copy" else 0.0,
    }
    b = args.batch_size
    base = (out["weights_grads_adamw_GiB"] + out["teacher_weights_GiB"]
            + out["ddp_grad_buckets_GiB"])
    out["total_bf16_GiB_low"] = base + (0.5 * act32 + masks) * b
    out["total_bf16_GiB_high"] = base + (act32 + masks) * b
    return out


def main(args: argparse.Namespace) -> None:
    for k, v in estimate(args).items():
        print(f"{k:32s} {v:8.2f}")


def cli(argv: list[str] | None = None) -> int:
    """``blsam-estimate-train-memory``: a user error is one ``error:`` line and exit 2."""
    return run_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
