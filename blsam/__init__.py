"""blsam: big.LITTLE Vision Transformer image encoders for Segment Anything."""
from .build_blsam import blsam_model_registry, build_blsam, build_model, build_vanilla_sam
from .checkpoint import CheckpointError
from .modeling import BLViTImageEncoder
from .sam_registry import add_to_sam_registry
from .specs import MODEL_SPECS, TEACHER_OF, ModelSpec, dense_spec, get_spec

__all__ = [
    "TEACHER_OF",
    "add_to_sam_registry",
    "blsam_model_registry",
    "build_blsam",
    "build_model",
    "build_vanilla_sam",
    "dense_spec",
    "CheckpointError",
    "BLViTImageEncoder",
    "MODEL_SPECS",
    "ModelSpec",
    "get_spec",
]
__version__ = "0.1.0"
