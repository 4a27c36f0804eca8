"""Weights to share: a model's state dict alone, as ``.safetensors``, with what it is in the
file's metadata (registry name, keep ratio, image size).

Why safetensors: it is how the field publishes weights (Hugging Face Hub), it holds tensors
only (no pickle: nothing runs on load), and it is read explicitly through the ``safetensors``
package (a core dependency), not by whatever ``torch.load`` happens to accept. A file is told
apart from a ``torch.save`` checkpoint by its content (an 8-byte header length, then JSON).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .checkpoint import CheckpointError, StateDict
from .utils.files import atomic_write

META_MODEL, META_KEEP, META_SIZE, META_VERSION = (
    "blsam_model", "keep_ratio", "img_size", "blsam_version")


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when the file starts like a safetensors file: a little-endian u64 header size that
    fits the file, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= size


def read_safetensors(path: str | os.PathLike, what: str = "weights"
                     ) -> tuple[StateDict, dict[str, str]]:
    """(state dict, metadata) of a safetensors file, on CPU; a damaged file is one
    ``CheckpointError``."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # header / bounds / dtype errors of a damaged file
        raise CheckpointError(f"could not read {what} {path!r}: damaged safetensors file "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return sd, meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file ({} for any other file); reads the header only."""
    if not is_safetensors(path):
        return {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{os.fspath(path)!r}: damaged safetensors header") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def check_metadata(path: str | os.PathLike, model: str, img_size: int | None) -> None:
    """A shared-weights file that says it is another model, or another input size, than the
    one requested is refused with both named (files without blsam metadata pass: their keys
    and shapes are still checked strictly). ``img_size`` None: any size (a SAM initialisation
    resizes its position tables)."""
    meta = read_metadata(path)
    want_model = meta.get(META_MODEL)
    if want_model is not None and want_model != model:
        raise CheckpointError(f"{os.fspath(path)!r} holds a {want_model!r} model (its metadata), "
                              f"not {model!r}: build {want_model!r} or give its weights")
    size = meta.get(META_SIZE)
    if img_size is not None and size is not None and size != str(img_size):
        raise CheckpointError(f"{os.fspath(path)!r} was saved at img_size {size}, but img_size "
                              f"{img_size} was requested: pass img_size={size}")


def weights_metadata(model: str, keep_ratio: float, img_size: int,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a shared-weights file records (safetensors metadata values are strings)."""
    from . import __version__

    meta = {"format": "pt", META_MODEL: model, META_KEEP: repr(float(keep_ratio)),
            META_SIZE: str(int(img_size)), META_VERSION: __version__}
    meta.update(extra or {})
    return meta


def save_weights(module: torch.nn.Module, path: str | os.PathLike, model: str,
                 keep_ratio: float, img_size: int) -> str:
    """Write ``module``'s state dict alone as safetensors, atomically; returns the path."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = save(sd, metadata=weights_metadata(model, keep_ratio, img_size))
    return atomic_write(path, lambda f: f.write(data))
