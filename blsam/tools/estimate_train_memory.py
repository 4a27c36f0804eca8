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
# per GPU and process, outside PyTorch's allocator: the CUDA context (~0.5 GiB with lazy module
# loading), cuBLAS/cuDNN workspaces (~0.1 GiB), NCCL's channel buffers for 8 peers (~0.5-1 GiB
# with the default NCCL_BUFFSIZE); an assumption from the libraries' documented defaults, not
# a measurement (no GPU was available)
RUNTIME_GIB = 1.5


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


def estimate(args: argparse.Namespace, device: str = "meta") -> dict[str, float]:
    """The estimate (GiB). ``device="cpu"`` runs the same count on a real CPU forward: the
    check that the meta device's shapes (hence bytes) are what a real run saves."""
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
    ledger = Ledger()
    sdpa = F.scaled_dot_product_attention

    def flash_like(q, k, v, attn_mask=None, scale=None, **kw):
        ledger.mute = True  # what this device's kernel saves is not what flash SDPA keeps
        try:
            out = q * 1.0 if v.shape == q.shape else sdpa(q, k, v, attn_mask=attn_mask,
                                                          scale=scale)
        finally:
            ledger.mute = False
        ledger.add("attn", sum(t.numel() * 2 for t in (q, k, v, out)) + q[..., 0].numel() * 4)
        if attn_mask is not None:  # memory-efficient SDPA keeps the dense (B, H, N, S) mask
            ledger.add("masks", q[..., 0].numel() * k.shape[-2] * 2, call=True)
        return out

    stack.enter_context(mock.patch.object(attention.F, "scaled_dot_product_attention",
                                          flash_like))
    with stack:
        return _estimate(args, ledger, device)


class Ledger:
    """Bytes kept for backward, by encoder block (None: outside the blocks): saved tensors,
    attention as flash SDPA keeps it, SDPA masks (also the largest single one)."""

    def __init__(self) -> None:
        self.block: int | None = None
        self.mute = False  # inside an attention kernel: counted as flash SDPA keeps it
        self.bytes: dict[tuple[int | None, str], int] = {}
        self.largest_mask = 0

    def add(self, kind: str, n: int, call: bool = False) -> None:
        key = (self.block, kind)
        self.bytes[key] = self.bytes.get(key, 0) + n
        if call:
            self.largest_mask = max(self.largest_mask, n)

    def total(self, kind: str, block: int | None | str = "all") -> int:
        return sum(v for (b, k), v in self.bytes.items()
                   if k == kind and (block == "all" or b == block))

    def blocks(self) -> list[int]:
        return sorted({b for b, _ in self.bytes if b is not None})


def _estimate(args: argparse.Namespace, ledger: Ledger, device: str) -> dict[str, float]:
    from blsam import TEACHER_OF, blsam_model_registry
    from blsam.train.distill import DistillModel, set_trainable

    seen: set[int] = set()  # storages already counted
    s, m = args.img_size, args.masks_per_image
    with torch.device(device):
        sam = blsam_model_registry[args.model](img_size=s)
        teacher = blsam_model_registry[TEACHER_OF[args.model]](img_size=s)
        set_trainable(sam, args.trainable)
        params = {id(p) for p in sam.parameters()}
        model = DistillModel(sam, 2.5)
        n_pts = {"box": 1, "point": 1, "points": 3}[args.prompt]
        batch = {"masks": [torch.zeros(m, s // 4, s // 4, dtype=torch.uint8)],
                 "kind": [args.prompt],
                 "boxes": [torch.zeros(m, 4)], "points": [torch.zeros(m, n_pts, 2)],
                 "labels": [torch.ones(m, n_pts, dtype=torch.long)]}
        x, t = torch.zeros(1, 3, s, s), torch.zeros(1, 256, s // 16, s // 16)

    def pack(v: torch.Tensor) -> torch.Tensor:
        if id(v) not in params and not ledger.mute:
            st = v.untyped_storage()
            # a storage saved twice is kept once; ``_cdata`` names the storage itself (each
            # ``untyped_storage()`` call makes a new Python wrapper, so its id() cannot)
            if st._cdata not in seen:
                seen.add(st._cdata)
                ledger.add("saved", st.nbytes())
        return v

    # every block's forward attributes what it saves to itself (a plain forward: with
    # checkpointing, distill.enable_grad_checkpointing, the recomputed block keeps exactly
    # this during its backward)
    for i, blk in enumerate(sam.image_encoder.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: setattr(ledger, "block", i))
        blk.register_forward_hook(lambda m, a, o: setattr(ledger, "block", None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        model(x, batch, t)
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in sam.parameters()) - trainable
    per_block = {b: ledger.total("saved", b) + ledger.total("attn", b)
                 for b in ledger.blocks()}
    worst = max(per_block, key=per_block.get) if per_block else None
    if args.grad_checkpoint:
        # kept: every block's input (one fp32 token map each) and what the rest saves; live
        # during the worst block's backward: its recomputed activations and their gradients
        # (about as many bytes again), and its SDPA masks
        spec = sam.image_encoder.spec
        kept = spec.depth * (s // 16) ** 2 * spec.embed_dim * 4
        act = (ledger.total("saved", None) + ledger.total("attn", None) + kept
               + 2 * per_block.get(worst, 0))
        masks = ledger.total("masks", worst) if worst is not None else 0
    else:
        act = ledger.total("saved") + ledger.total("attn")
        masks = ledger.total("masks")
    act32 = act / GiB
    masks /= GiB
    out = {
        "student_params_M": (trainable + frozen) / 1e6,
        "trainable_params_M": trainable / 1e6,
        "weights_grads_adamw_GiB": (16 * trainable + 4 * frozen) / GiB,
        "teacher_weights_GiB": 4 * sum(p.numel() for p in teacher.parameters()) / GiB,
        "activations_fp32_GiB_per_image": act32,
        "sdpa_masks_GiB_per_image": masks,
        "sdpa_mask_largest_GiB_per_image": ledger.largest_mask / GiB,
        "worst_block": float(worst if worst is not None else -1),
        "worst_block_fp32_GiB_per_image": per_block.get(worst, 0) / GiB,
        "outside_blocks_fp32_GiB_per_image": (ledger.total("saved", None)
                                              + ledger.total("attn", None)) / GiB,
        "ddp_grad_buckets_GiB": 4 * trainable / GiB if args.ddp_buckets == "copy" else 0.0,
        "cuda_runtime_GiB": RUNTIME_GIB,
    }
    b = args.batch_size
    base = (out["weights_grads_adamw_GiB"] + out["teacher_weights_GiB"]
            + out["ddp_grad_buckets_GiB"] + out["cuda_runtime_GiB"])
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
