"""The big.LITTLE ViT image encoder: a drop-in for SAM's ``ImageEncoderViT``."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import PatchEmbed

from .attention import exporting
from .blocks import BigLittleBlock
from .predictor import TokenPredictor
from .routing import Routing, check_keep_ratio, route_tokens, tokens_per_window

SCORERS = ("predictor", "attention")
P_ATTENTIONS = ("semi", "self")


class PatchProj(nn.Conv2d):
    """SAM's patch-embedding convolution (kernel = stride, no padding) as one GEMM over the
    flattened 16x16 patches: the same sums, but the CPU convolution kernel runs this shape at
    under half the GEMM rate (107 vs 42 ms at 1024 px, 2 cores). Still an ``nn.Conv2d``:
    parameter names, forward hooks and the FLOP conventions are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ci, h, w = x.shape
        kh, kw = self.kernel_size
        gh, gw = h // kh, w // kw
        patches = x.reshape(b, ci, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        y = F.linear(patches.reshape(b * gh * gw, ci * kh * kw),
                     self.weight.view(self.out_channels, -1), self.bias)
        return y.view(b, gh, gw, -1).permute(0, 3, 1, 2)  # NCHW view of NHWC memory


@dataclass(frozen=True)
class RoutingStage:
    """What one predictor routed in the last forward (``BLViTImageEncoder.last_routing``).

    after_layer: 1-based layer whose output the predictor scored; mask: (B, H, W) bool, the
    tokens routed to the P-blocks until the next predictor (real tokens only); scores: (B, H, W)
    fp32 predictor scores, detached; k: tokens routed per attention window; share: (B,) routed
    share of each image's real (or, with skip_padding, content) tokens; skip_padding: whether
    padding-aware routing was on. ``stage["mask"]`` still works (read-only, as the old dicts).
    """

    after_layer: int
    mask: torch.Tensor
    scores: torch.Tensor
    k: int
    share: torch.Tensor
    skip_padding: bool

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class EncoderSpec:
    """Architecture of one encoder variant (the registered specs live in ``blsam.specs``)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    layer_modes: tuple[str, ...]  # per block: "full" | "big_little" | "p_only"
    predictor_after: tuple[int, ...] = ()  # 0-based blocks whose output a predictor scores
    e_dim: int = 0
    e_heads: int = 0
    e_mlp_ratio: float = 4.0
    mlp_ratio: float = 4.0
    window_size: int = 14
    patch_size: int = 16
    out_chans: int = 256
    # Table-3 ablation switches (docs/architecture.md, "Design steps"): how tokens are scored
    # for routing -- "predictor" (learned, paper §3.2) or "attention" (the attention a token
    # receives in the dense layer before, as pruning baselines score) -- and whom the routed
    # tokens attend to in P-blocks: "semi" (every token, paper's semi-cross attention) or
    # "self" (the routed tokens only)
    scorer: str = "predictor"
    p_attention: str = "semi"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.layer_modes) != self.depth:
            raise ValueError(f"{len(self.layer_modes)} layer modes for depth {self.depth}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.p_attention not in P_ATTENTIONS:
            raise ValueError(f"p_attention must be one of {P_ATTENTIONS}, got "
                             f"{self.p_attention!r}")
        if self.scorer == "attention" and any(
                self.layer_modes[i] != "full" for i in self.predictor_after):
            # a routed layer's P-attention (semi or self) has not every token as a query, so
            # the received attention of the unrouted tokens is undefined there
            raise ValueError("attention scoring needs dense layers: score after 'full' layers")
        first_routed = next((i for i, m in enumerate(self.layer_modes) if m != "full"), None)
        if first_routed is not None and not any(p < first_routed for p in self.predictor_after):
            raise ValueError("the first routed layer has no predictor before it")


class BLViTImageEncoder(nn.Module):
    """bLViT encoder: (B, 3, S, S) -> (B, out_chans, S/16, S/16), like SAM's image encoder.

    ``keep_ratio`` (0 < r <= 1) can be changed at run time; r = 1 routes every token.
    After each forward ``last_routing`` holds, per predictor stage, the routed-token mask
    (B, H, W), the scores, k and the achieved ``share`` (B,) of routed tokens (detached).

    ``skip_padding`` (default False, the paper's routing): tokens whose input patch is exactly
    zero -- the padding ``SamPredictor`` adds after normalisation -- are never routed, and the
    budget (keep_ratio of the content tokens) goes to windows with image content. A real
    photo never produces an exact-zero patch (SAM's pixel mean is not an integer).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        img_size: int = 1024,
        keep_ratio: float = 0.25,
        skip_padding: bool = False,
    ) -> None:
        super().__init__()
        if img_size % spec.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of {spec.patch_size}")
        self.spec = spec
        self.img_size = img_size
        self.window_size = spec.window_size
        grid = img_size // spec.patch_size
        c = spec.embed_dim
        self.patch_embed = PatchEmbed(
            kernel_size=(spec.patch_size, spec.patch_size),
            stride=(spec.patch_size, spec.patch_size),
            in_chans=3,
            embed_dim=c,
        )
        conv = self.patch_embed.proj  # same parameters (and RNG draws) in a GEMM-backed conv
        proj = PatchProj(3, c, conv.kernel_size, conv.stride, device="meta")
        proj.weight, proj.bias = conv.weight, conv.bias
        self.patch_embed.proj = proj
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, c))
        self.blocks = nn.ModuleList(
            BigLittleBlock(
                dim=c,
                num_heads=spec.num_heads,
                mlp_ratio=spec.mlp_ratio,
                window_size=0 if i in spec.global_attn_indexes else spec.window_size,
                input_size=(grid, grid),
                mode=mode,
                e_dim=spec.e_dim or None,
                e_heads=spec.e_heads or None,
                e_mlp_ratio=spec.e_mlp_ratio,
                p_attention=spec.p_attention,
                modulate=spec.scorer == "predictor",
            )
            for i, mode in enumerate(spec.layer_modes)
        )
        self.predictors = nn.ModuleList(
            TokenPredictor(c) for _ in spec.predictor_after if spec.scorer == "predictor")
        self._predictor_at = {blk: j for j, blk in enumerate(spec.predictor_after)}
        self.neck = nn.Sequential(
            nn.Conv2d(c, spec.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(spec.out_chans),
            nn.Conv2d(spec.out_chans, spec.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(spec.out_chans),
        )
        self.keep_ratio = keep_ratio
        self.skip_padding = skip_padding
        self.last_routing: list[RoutingStage] = []

    @property
    def keep_ratio(self) -> float:
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        self._keep_ratio = check_keep_ratio(value)

    @property
    def skip_padding(self) -> bool:
        return self._skip_padding

    @skip_padding.setter
    def skip_padding(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"skip_padding must be a bool, got {value!r}")
        self._skip_padding = value

    def content_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) input -> (B, S/16, S/16) bool: the patch has a nonzero pixel."""
        b, _, s, _ = x.shape
        p = self.spec.patch_size
        return x.ne(0).any(1).view(b, s // p, p, s // p, p).any(4).any(2)

    @property
    def tokens_per_window(self) -> int:
        grid = self.img_size // self.spec.patch_size
        return tokens_per_window(self.keep_ratio, (grid, grid), self.window_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got dtype {x.dtype}")
        s = self.img_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"expected input of shape (B, 3, {s}, {s}) (SAM-preprocessed), got {tuple(x.shape)}"
            )

    def forward(
        self, x: torch.Tensor, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[Routing]]:
        self._check_input(x)
        # PatchEmbed permutes PatchProj's NCHW view back to its NHWC memory: contiguous already
        content = None
        if self.skip_padding and self.keep_ratio < 1.0 and x.device.type != "meta":
            if exporting():
                raise RuntimeError("skip_padding routing has data-dependent shapes and cannot "
                                   "be exported; set encoder.skip_padding = False")
            content = self.content_mask(x)
        x = (self.patch_embed(x) + self.pos_embed).contiguous()
        routing = None
        stages: list[Routing] = []
        export = exporting()
        # reused attention-bias buffers (eager inference only: out= ops don't export)
        workspace: dict | None = None if export else {}
        by_attention = self.spec.scorer == "attention"
        for i, blk in enumerate(self.blocks):
            j = self._predictor_at.get(i)
            if j is not None and by_attention:
                x, scores = blk(x, routing, workspace, score=True)
            else:
                x = blk(x, routing, workspace)
                scores = self.predictors[j](x) if j is not None else None
            if j is not None:
                routing = route_tokens(scores, self.keep_ratio, self.window_size, content)
                stages.append(routing)
        feats = self.neck(x.permute(0, 3, 1, 2))
        if export:
            return (feats, stages) if return_routing else feats  # exported graphs: features only
        self.last_routing = [
            RoutingStage(after_layer=self.spec.predictor_after[j] + 1, mask=r.mask,
                         scores=r.score_map, k=r.k, share=r.share,
                         skip_padding=content is not None)
            for j, r in enumerate(stages)
        ]
        return (feats, stages) if return_routing else feats

