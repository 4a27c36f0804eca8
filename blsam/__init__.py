"""blsam: big.LITTLE Vision Transformer image encoders for Segment Anything."""
from .build_blsam import (
    TEACHER_OF,
    blsam_model_registry,
    build_blsam,
    build_model,
    build_vanilla_sam,
    dense_spec,
)
from .checkpoint import CheckpointError
from .modeling import BLViTImageEncoder

__all__ = [
    "TEACHER_OF",
    "blsam_model_registry",
    "build_blsam",
    "build_model",
    "build_vanilla_sam",
    "dense_spec",
    "CheckpointError",
    "BLViTImageEncoder",
]
__version__ = "0.1.0"
