"""bLViT-SAM in ``segment_anything.sam_model_registry``, so SAM's own scripts build it by name.

    import blsam; blsam.add_to_sam_registry()
    sam = sam_model_registry["b_t"](checkpoint="sam_vit_b_01ec64.pth")   # e.g. scripts/amg.py

Explicit (importing blsam changes nothing in segment_anything) and idempotent. The entries take
SAM's builder signature, ``(checkpoint=None)``, plus blsam's keywords (``keep_ratio``,
``img_size``, ``skip_padding``). SAM's scripts have one ``--checkpoint`` flag, so the file's
content decides what it is (``blsam.checkpoint.checkpoint_kind``): a trained bLViT-SAM (it has
E-blocks or routing predictors; ``.pth`` or ``.safetensors``) loads strictly, an official SAM
checkpoint of the teacher's size initialises the P-blocks, as ``sam_checkpoint=`` does.
"""
from __future__ import annotations

from collections.abc import Callable

from segment_anything.modeling import Sam

from .specs import MODEL_SPECS


def sam_builder(name: str) -> Callable[..., Sam]:
    """SAM-style builder of registry model ``name`` (``checkpoint`` told apart by content)."""

    def build(checkpoint: str | None = None, **kwargs) -> Sam:
        from .build_blsam import build_blsam
        from .checkpoint import checkpoint_kind

        if checkpoint is not None and checkpoint_kind(checkpoint) == "sam":
            return build_blsam(name, sam_checkpoint=checkpoint, **kwargs)
        return build_blsam(name, checkpoint, **kwargs)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = (f"{MODEL_SPECS[name].display_name}: checkpoint = a trained bLViT-SAM or the "
                     f"official SAM {MODEL_SPECS[name].teacher} checkpoint (P-block init).")
    build.blsam_model = name  # type: ignore[attr-defined]  (marks our entries)
    return build


def add_to_sam_registry(include_test_models: bool = False) -> list[str]:
    """Add every bLViT model of ``blsam.specs`` (``b_t``, ``h_b``, ...; the tiny test models
    too when asked) to ``segment_anything.sam_model_registry``; returns the names. SAM's own
    ``vit_*`` / ``default`` entries are left alone; an entry of that name from elsewhere is a
    ``ValueError`` rather than silently replaced."""
    from segment_anything import sam_model_registry

    names = [n for n, s in MODEL_SPECS.items()
             if s.is_blvit and (include_test_models or not s.test_only)]
    for name in names:
        current = sam_model_registry.get(name)
        if current is not None and getattr(current, "blsam_model", None) != name:
            raise ValueError(f"segment_anything.sam_model_registry already has {name!r} "
                             f"from elsewhere ({current!r}); not replaced")
        sam_model_registry[name] = sam_builder(name)
    return names
