"""torch.hub entry points: one per registry model, generated from ``blsam_model_registry``.

    sam = torch.hub.load("path/to/blsam", "b_t", source="local", sam_checkpoint="sam_vit_b.pth")
    sam = torch.hub.load("path/to/blsam", "b_t", source="local", checkpoint="blsam_b_t.pth")

Each entry takes the registry builder's arguments: ``(checkpoint=None, *, sam_checkpoint=None,
keep_ratio=0.25, img_size=1024)`` and returns a ``segment_anything.modeling.Sam``.
"""
from collections.abc import Callable

from blsam.build_blsam import blsam_model_registry as _registry
from blsam.specs import get_spec as _get_spec

dependencies = ["torch", "torchvision", "segment_anything", "numpy", "safetensors"]


def _entry(name: str) -> Callable:
    def entry(checkpoint=None, **kwargs):
        return _registry[name](checkpoint, **kwargs)

    spec = _get_spec(name)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{spec.display_name} ({name}): blsam_model_registry[{name!r}](checkpoint, "
                     f"sam_checkpoint=..., keep_ratio=..., img_size=...)")
    return entry


globals().update({_name: _entry(_name) for _name in _registry})
