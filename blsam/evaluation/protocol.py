"""What an evaluation protocol is (prompt, points, mask selection), apart from the runner.

Why a module of its own: ``blsam-eval`` builds its options from it, and its ``--help`` must
work with the core dependencies alone (the runner needs pycocotools, the eval extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPTS = ("point", "box", "detector")
POINT_MODES = ("random", "nested", "center", "iterative")


@dataclass
class ProtocolConfig:
    """What to prompt with and how to pick the mask (see docs/evaluation.md)."""

    prompt: str = "point"
    num_points: int = 1
    # "random" (paper: uniform inside the mask), "nested" (uniform, the 1-point click is the
    # first of the 3), "center" (first click farthest from the boundary), "iterative" (SAM's /
    # EfficientViT-SAM's: center click, then the center of the largest error region)
    point_from: str = "random"
    oracle: bool = False  # multimask output: keep the mask closest to GT, not the best scored
    num_clicks: int = 0  # extra correction clicks (with mask feedback) after the first mask
    box_multimask: bool = False  # box / detector: 3 masks, keep the best predicted IoU
    seed: int = 0
    batch_prompts: int = 64
    max_dets: int | None = None  # per image, highest scores first (LVIS: 300)
    skip_missing_images: bool = False
    save_predictions: bool = False

    @property
    def name(self) -> str:
        """``point1``, ``point3``, ``box`` or ``detector``: the protocol's name in a run."""
        return f"point{self.num_points}" if self.prompt == "point" else self.prompt

    @property
    def multimask(self) -> bool:
        """SAM's 3-mask output (one kept) or a single mask."""
        if self.prompt == "point":
            return self.num_points == 1 or self.point_from == "iterative"
        return self.box_multimask

    def is_default(self) -> bool:
        """The bLViT paper's protocol (random points, GT box, single mask for box and k > 1)."""
        return (self.point_from == "random" and not self.oracle and not self.num_clicks
                and not self.box_multimask)

    def label(self) -> str:
        """Short words for what differs from the paper's protocol ('' when nothing does)."""
        parts = []
        if self.prompt == "point" and self.point_from != "random":
            parts.append(self.point_from)
        if self.box_multimask and self.prompt != "point":
            parts.append("multimask")
        if self.oracle:
            parts.append("oracle")
        if self.num_clicks:
            parts.append(f"+{self.num_clicks} corr. clicks")
        return ", ".join(parts)

    def describe(self) -> dict[str, Any]:
        """The protocol as recorded in the result JSON."""
        d: dict[str, Any] = {"name": self.name, "prompt": self.prompt,
                             "multimask": self.multimask,
                             "selection": "oracle" if self.oracle else "predicted_iou",
                             "paper_default": self.is_default(), "label": self.label()}
        if self.prompt != "detector":  # EfficientViT-SAM's eval prompts crowd objects too
            d["crowd_objects"] = "skipped"
        if self.prompt == "point":
            d.update(num_points=self.num_points, points=self.point_from, seed=self.seed,
                     mask_feedback=bool(self.num_clicks), correction_clicks=self.num_clicks)
        elif self.prompt == "box":
            d.update(correction_clicks=self.num_clicks, mask_feedback=bool(self.num_clicks))
        else:
            d.update(max_dets=self.max_dets)
        return d

    def validate(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.num_points < 1:
            raise ValueError("--num-points must be >= 1")
        if self.point_from not in POINT_MODES:
            raise ValueError(f"--point-from must be one of {POINT_MODES}, got {self.point_from!r}")
        if self.batch_prompts < 1:
            raise ValueError("--batch-prompts must be >= 1")
        if self.num_clicks < 0:
            raise ValueError("--num-clicks must be >= 0")
        if self.max_dets is not None and self.max_dets < 1:
            raise ValueError("--max-dets must be >= 1")
        if self.num_clicks and self.prompt == "detector":
            raise ValueError("--num-clicks needs GT masks: use it with point or box prompts")
        if self.num_clicks and self.point_from == "iterative" and self.prompt == "point":
            raise ValueError("--num-clicks adds mask-feedback clicks; --point-from iterative "
                             "already places its clicks from the errors: use one of them")
        if self.oracle and self.prompt == "detector":
            raise ValueError("--oracle picks by IoU to a GT mask, which a detection does not have")
        if self.oracle and not self.multimask:
            raise ValueError(f"--oracle picks one of 3 masks, but {self.name} is single-mask "
                             f"here (1 point, --point-from iterative or --box-multimask)")
