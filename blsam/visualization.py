"""Drawing helpers shared by the demo and the routing figure (paper Fig. 3)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .modeling import RoutingStage


def overlay_mask(image: np.ndarray, mask: np.ndarray, color=(30, 144, 255), alpha=0.55):
    """Blend a boolean (H, W) mask over an RGB uint8 image."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def routing_masks_on_image(
    routing: Sequence[RoutingStage],
    image_hw: Sequence[int],
    img_size: int,
    index: int = 0,
) -> list[np.ndarray]:
    """Per predictor stage, the routed-token mask mapped back to original image pixels.

    The encoder sees the image resized so its longest side is ``img_size`` and padded at the
    bottom/right; only the real-image part of the token grid is drawn.
    """
    import cv2

    h, w = image_hw
    scale = img_size / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    out = []
    for stage in routing:
        m = stage.mask[index].float().cpu().numpy()  # token grid (img_size/16)^2
        up = cv2.resize(m, (img_size, img_size), interpolation=cv2.INTER_NEAREST)[:rh, :rw]
        out.append(cv2.resize(up, (w, h), interpolation=cv2.INTER_NEAREST) > 0.5)
    return out


def padded_canvas(image: np.ndarray, img_size: int, pad_value: int = 96) -> np.ndarray:
    """The encoder's view of ``image``: long side resized to ``img_size``, the bottom/right
    padding drawn in gray (SamPredictor pads with zeros after normalisation)."""
    import cv2

    h, w = image.shape[:2]
    scale = img_size / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    canvas = np.full((img_size, img_size, 3), pad_value, np.uint8)
    canvas[:rh, :rw] = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
    return canvas


def save_routing_figure(
    image: np.ndarray,
    routing: Sequence[RoutingStage],
    img_size: int,
    path: str,
    title: str = "",
    show_padding: bool = False,
) -> None:
    """One panel per predictor stage: routed (P-block) tokens bright, the rest dimmed.

    ``show_padding``: draw the encoder's padded square input, so tokens routed on the padding
    (the paper's per-window top-k spends some there; ``skip_padding`` does not) are visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if show_padding:
        import cv2

        image = padded_canvas(image, img_size)
        masks = [cv2.resize(s.mask[0].float().cpu().numpy(), (img_size, img_size),
                            interpolation=cv2.INTER_NEAREST) > 0.5 for s in routing]
    else:
        masks = routing_masks_on_image(routing, image.shape[:2], img_size)
    n = len(masks)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, stage, m in zip(axes[0], routing, masks):
        shown = (image * np.where(m[..., None], 1.0, 0.25)).astype(np.uint8)
        ax.imshow(shown)
        extra = f", {float(stage.share[0]):.0%} routed"
        ax.set_title(f"after layer {stage.after_layer}: k={stage.k}/window{extra}",
                     fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
