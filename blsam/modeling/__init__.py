from .attention import Attention, rel_pos_bias
from .blocks import BigLittleBlock, EBlock
from .image_encoder import BLViTImageEncoder, EncoderSpec, RoutingStage
from .predictor import TokenPredictor
from .routing import Routing, route_tokens, tokens_per_window

__all__ = [
    "Attention",
    "rel_pos_bias",
    "BigLittleBlock",
    "EBlock",
    "BLViTImageEncoder",
    "EncoderSpec",
    "RoutingStage",
    "TokenPredictor",
    "Routing",
    "route_tokens",
    "tokens_per_window",
]
