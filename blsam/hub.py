"""Hugging Face Hub: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for a
bLViT-SAM (or any registry model), through ``huggingface_hub``'s ``PyTorchModelHubMixin``.

    from blsam.hub import BLViTSam
    sam = BLViTSam.from_pretrained("user/blsam-b_t")        # or a local folder
    sam.save_pretrained("blsam-b_t"); sam.push_to_hub("user/blsam-b_t")

A ``BLViTSam`` is a ``segment_anything.modeling.Sam`` (``SamPredictor`` takes it). The folder
holds ``config.json`` (model, keep_ratio, img_size, skip_padding) and ``model.safetensors``
written by ``blsam.weights.save_weights``; loading reads it with the registry's own strict key
checks and metadata checks (the mixin's default load is not strict). Needs the ``hub`` extra.
"""
from __future__ import annotations

import os
from pathlib import Path

from .utils.cli import extra_message, missing_modules

if missing_modules("hub"):
    raise ModuleNotFoundError(extra_message("hub", missing_modules("hub")),
                              name="huggingface_hub")

from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download  # noqa: E402
from segment_anything.modeling import Sam  # noqa: E402

from .build_blsam import build_model  # noqa: E402
from .checkpoint import adapt_sam_state_dict, load_strict, read_state_dict  # noqa: E402
from .utils.images import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from .weights import check_metadata, save_weights  # noqa: E402

WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors


class BLViTSam(Sam, PyTorchModelHubMixin, library_name="blsam",
               repo_url="https://github.com/facebookresearch/segment-anything",
               tags=["segment-anything", "image-segmentation", "blvit"]):
    """A registry model (``b_t``, ``h_b``, ...) with random weights; load trained ones with
    ``from_pretrained``."""

    def __init__(self, model: str = "b_t", keep_ratio: float = 0.25, img_size: int = 1024,
                 skip_padding: bool = False) -> None:
        built = build_model(model, keep_ratio=keep_ratio, img_size=img_size,
                            skip_padding=skip_padding)
        self._adopt(built, model, keep_ratio, img_size)

    def _adopt(self, sam: Sam, model: str, keep_ratio: float, img_size: int) -> None:
        Sam.__init__(self, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder,
                     list(PIXEL_MEAN), list(PIXEL_STD))
        self.blsam_model, self.keep_ratio, self.img_size = model, keep_ratio, img_size
        self.eval()

    @classmethod
    def wrap(cls, sam: Sam, model: str, keep_ratio: float = 0.25, img_size: int = 1024,
             skip_padding: bool = False) -> BLViTSam:
        """A built registry model as a ``BLViTSam`` (same modules, nothing rebuilt)."""
        self = cls.__new__(cls, model=model, keep_ratio=keep_ratio, img_size=img_size,
                           skip_padding=skip_padding)
        self._adopt(sam, model, keep_ratio, img_size)
        return self

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self, Path(save_directory) / WEIGHTS_NAME, self.blsam_model,
                     self.keep_ratio, self.img_size)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None,
                         cache_dir: str | None, force_download: bool,
                         local_files_only: bool, token: str | None,
                         map_location: str = "cpu", strict: bool = True,
                         **model_kwargs) -> BLViTSam:
        """Always strict (``strict`` is accepted for the mixin's signature only)."""
        if os.path.isdir(model_id):
            path = os.path.join(model_id, WEIGHTS_NAME)
        else:
            path = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                   cache_dir=cache_dir, force_download=force_download,
                                   token=token, local_files_only=local_files_only)
        model = cls(**model_kwargs)
        check_metadata(path, model.blsam_model, model.img_size)
        sd = read_state_dict(path, "weights")
        load_strict(model, adapt_sam_state_dict(sd, model.state_dict()), f"weights {path!r}")
        return model.to(map_location).eval()
