"""The benchmarked encoders: official SAM, the fused vanilla one, bLViT at each keep ratio,
the token-pruning baselines, timm's SAM ViT and the ONNX Runtime rows. ``BenchModel`` names one
row's model (not ``blsam.specs.ModelSpec``, which describes an architecture)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blsam import blsam_model_registry
from blsam.build_blsam import build_vanilla_sam
from blsam.specs import ABLATION_ORDER, FAMILIES, MODEL_SPECS, PRUNING_MODELS

from .config import BenchConfig

TIMM_SAM = {"b": "samvit_base_patch16", "h": "samvit_huge_patch16"}


@dataclass
class BenchModel:
    """One benchmarked encoder: ``kind`` is official, fused, blsam or pruning (a token-pruning
    baseline: ``registry`` names it, e.g. evit_b)."""

    name: str
    family: str
    kind: str
    keep_ratio: float | None = None
    backend: str = "eager"  # or "onnxruntime"
    registry: str | None = None

    def build(self, img_size: int) -> torch.nn.Module:
        vanilla, student = FAMILIES[self.family]
        if self.kind == "timm":
            return TimmSam(TIMM_SAM[self.family], img_size)
        if self.kind == "official":
            return build_vanilla_sam(vanilla, img_size=img_size)
        if self.kind == "fused":
            return build_vanilla_sam(vanilla, img_size=img_size, fused=True)
        if self.kind in ("pruning", "ablation"):
            return blsam_model_registry[self.registry](img_size=img_size,
                                                       keep_ratio=self.keep_ratio)
        return blsam_model_registry[student](img_size=img_size, keep_ratio=self.keep_ratio)


class TimmSam(torch.nn.Module):
    """timm's SAM ViT (random weights) with an ``image_encoder`` that returns the neck
    features, like SAM's: the same 486 GMAC as the official ViT-B, another implementation."""

    def __init__(self, name: str, img_size: int) -> None:
        super().__init__()
        import timm

        model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)

        class Enc(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model, self.img_size = model, img_size

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.forward_features(x)

        self.image_encoder = Enc()


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def model_specs(families: Sequence[str], keep_ratios: Sequence[float],
                baselines: bool = False, ablation: bool = False) -> list[BenchModel]:
    """Per family: official, fused, the bLViT student at every keep ratio and, with
    ``baselines``, the family's token-pruning baselines (EViT, Evo-ViT) at their default
    keep ratio (0.5, the paper's Table 2); with ``ablation``, the student's Table-3 design
    steps (``ABLATION_ORDER`` before the student itself) at the student's keep ratios."""
    specs = []
    for fam in families:
        vanilla, student = FAMILIES[fam]
        specs.append(BenchModel(vanilla, fam, "official"))
        specs.append(BenchModel(f"{vanilla}_sdpa", fam, "fused"))
        for r in keep_ratios:
            specs.append(BenchModel(f"{student}@{r:g}", fam, "blsam", r))
        for name in (PRUNING_MODELS if baselines else ()):
            spec = MODEL_SPECS[name]
            if spec.family == fam:
                r = spec.default_keep_ratio
                specs.append(BenchModel(f"{name}@{r:g}", fam, "pruning", r, registry=name))
        for name in (ABLATION_ORDER[:-1] if ablation else ()):
            if MODEL_SPECS[name].ablation_of == student:
                for r in keep_ratios:
                    specs.append(BenchModel(f"{name}@{r:g}", fam, "ablation", r, registry=name))
    return specs


def extra_specs(cfg: BenchConfig) -> list[BenchModel]:
    """timm's SAM ViT (when timm is installed) and the ONNX Runtime rows (``--onnx``)."""
    specs = []
    for fam in cfg.families:
        if cfg.timm == "auto" and fam in TIMM_SAM and timm_available():
            specs.append(BenchModel(f"timm_{TIMM_SAM[fam]}", fam, "timm"))
    if cfg.onnx:
        for fam in cfg.families:
            vanilla, student = FAMILIES[fam]
            specs.append(BenchModel(f"{vanilla}[ort]", fam, "official", backend="onnxruntime"))
            # the same dense weights through this project's export path (fused attention where
            # ORT has it): separates the gain of routing from the gain of the exported kernels
            specs.append(BenchModel(f"{vanilla}_sdpa[ort]", fam, "fused", backend="onnxruntime"))
            for r in cfg.keep_ratios:
                specs.append(BenchModel(f"{student}@{r:g}[ort]", fam, "blsam", r, "onnxruntime"))
    return specs


def onnx_path(spec: BenchModel, cfg: BenchConfig) -> str:
    return os.path.join(cfg.output_dir, "onnx", f"{spec.name.replace('[ort]', '')}"
                        f"_{cfg.img_size}.onnx")


def export_onnx_rows(cfg: BenchConfig) -> None:
    """Export every ONNX row's encoder as blsam-export-onnx does (random weights, seed 0), at
    the start of every run: a file left by an earlier run may come from older export code."""
    from blsam.tools.export_onnx import DEFAULT_OPSET, export_encoder

    for spec in extra_specs(cfg):
        if spec.backend == "onnxruntime":
            torch.manual_seed(0)
            export_encoder(spec.build(cfg.img_size).eval(), onnx_path(spec, cfg),
                           DEFAULT_OPSET)
