"""The training teacher runs the fused encoder and equals SAM's official ImageEncoderViT."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blsam.build_blsam import build_vanilla_sam
from blsam.modeling.image_encoder import BLViTImageEncoder
from blsam.train.teacher import Teacher


def test_teacher_is_fused_and_matches_official_encoder(tiny_sam_ckpt):
    """fp32, 256 px (16x16 grid: windows padded to 28x28), random rel_pos/pos_embed from the
    fixture checkpoint: cos-sim >= 0.9999 per image."""
    for size in (256,):
        teacher = Teacher("tiny_vit", tiny_sam_ckpt, size, torch.device("cpu"),
                          amp_dtype=torch.bfloat16)  # bf16 is ignored on CPU
        assert teacher.amp_dtype is None
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        got = teacher.encode(x)
        assert isinstance(teacher.encoder, BLViTImageEncoder)
        assert not got.is_inference() and got.dtype == torch.float32
        ref_enc = build_vanilla_sam("tiny_vit", tiny_sam_ckpt, img_size=size).image_encoder
        assert type(ref_enc).__name__ == "ImageEncoderViT"
        with torch.no_grad():
            ref = ref_enc.eval()(x)
        cos = F.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1)
        assert cos.min().item() >= 0.9999, cos
        assert (got - ref).abs().max().item() < 1e-3
        # the output is a plain tensor: a loss may save it for backward
        s = torch.zeros_like(got, requires_grad=True)
        (1 - F.cosine_similarity((s + 1).flatten(1), got.flatten(1))).sum().backward()
        assert teacher.images_computed == 2


def test_teacher_embeddings_mix_cache_and_encoder(tiny_sam_ckpt):
    teacher = Teacher("tiny_vit", tiny_sam_ckpt, 64, torch.device("cpu"))
    x = torch.randn(3, 3, 64, 64)
    full = teacher.encode(x)
    cached = [full[0].half(), None, full[2].half()]
    out = teacher.embeddings(x, cached)
    assert teacher.images_computed == 3 + 1  # only the missing image was encoded
    torch.testing.assert_close(out[1], full[1])
    torch.testing.assert_close(out[0], full[0].half().float())
    all_cached = teacher.embeddings(x, [f.half() for f in full])
    assert teacher.images_computed == 4 and all_cached.dtype == torch.float32
