"""Every architecture this project builds, in one table of frozen specs.

Why one module: the registry, the checkpoint checks, the training/eval/benchmark choices and
the result tables all need the same facts (widths, depths, which SAM is whose teacher, display
names). They are derived from ``MODEL_SPECS`` so a new variant is added in one place.

What is printed from them (per-layer summaries, GFLOPs tables) is ``blsam.spec_tables``;
``blsam-specs b_t`` (``blsam.tools.specs``) prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .modeling.image_encoder import EncoderSpec
from .modeling.pruning import PruningSpec

# the keep-ratio rule is one of the specs' rules, beside check_img_size (its home: routing)
from .modeling.routing import check_keep_ratio  # noqa: F401

FULL, BIG_LITTLE, P_ONLY = "full", "big_little", "p_only"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the image encoder's architecture plus what surrounds it."""

    name: str  # registry key
    display_name: str  # name in result tables (paper Table 2 style)
    encoder: EncoderSpec
    teacher: str | None = None  # bLViT: the SAM whose blocks initialise P-blocks and teach
    checkpoint_file: str = ""  # the official SAM file this variant loads (documentation)
    test_only: bool = False  # tiny architectures for the fast test tier
    family: str = ""  # benchmark family (bLViT models): compared with their teacher
    # token-pruning baselines (EViT, Evo-ViT): a vanilla SAM ViT whose tokens are pruned; they
    # have a teacher (trained like bLViT) but no parameters beyond SAM's
    pruning: PruningSpec | None = None
    default_keep_ratio: float = 0.25
    ablation_of: str = ""  # a Table-3 design step of this full bLViT model

    @property
    def is_blvit(self) -> bool:
        return self.teacher is not None and self.pruning is None

    @property
    def is_pruning(self) -> bool:
        return self.pruning is not None

    @property
    def has_keep_ratio(self) -> bool:
        """bLViT and the pruning baselines take ``keep_ratio``; vanilla SAM does not."""
        return self.teacher is not None


def _vit(name: str, dim: int, depth: int, heads: int, glob: tuple[int, ...]) -> EncoderSpec:
    return EncoderSpec(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=glob,
                       layer_modes=(FULL,) * depth, name=name)


_VIT_B = _vit("vit_b", 768, 12, 12, (2, 5, 8, 11))
_VIT_L = _vit("vit_l", 1024, 24, 16, (5, 11, 17, 23))
_VIT_H = _vit("vit_h", 1280, 32, 16, (7, 15, 23, 31))
# Tiny vanilla teacher for tests: window and global attention, pad slots at any img_size that
# is not a multiple of 14 * 16 = 224.
_TINY_VIT = _vit("tiny_vit", 64, 6, 2, (1, 3, 5))

_B_T = EncoderSpec(  # paper Table 1: ViT-B P-blocks + ViT-Tiny E-blocks
    embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
    layer_modes=(FULL,) + (BIG_LITTLE,) * 11,
    predictor_after=(0, 3, 6, 9),  # after layers 1, 4, 7, 10
    e_dim=192, e_heads=3, name="b_t",
)

_H_B = EncoderSpec(  # paper Table 1: ViT-H P-blocks + ViT-B E-blocks
    embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31),
    layer_modes=(
        FULL, FULL, FULL, FULL, FULL, FULL, FULL, FULL, FULL,  # layers 1-9
        BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY,  # layers 10-15
        BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY,  # layers 16-21
        BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY,  # layers 22-27
        BIG_LITTLE, P_ONLY, BIG_LITTLE, P_ONLY, BIG_LITTLE,  # layers 28-32
    ),
    predictor_after=(7, 15, 23),  # after layers 8, 16, 24
    e_dim=768, e_heads=12, name="h_b",
)

_TINY_BL = EncoderSpec(  # every layer kind of b_t and h_b, at a width tests afford
    embed_dim=64, depth=6, num_heads=2, global_attn_indexes=(1, 3, 5),
    # window / global: full, full, big.LITTLE, P-only, P-only, big.LITTLE
    layer_modes=(FULL, FULL, BIG_LITTLE, P_ONLY, P_ONLY, BIG_LITTLE),
    predictor_after=(1, 3),  # after layers 2 and 4: one before a P-only layer
    e_dim=32, e_heads=2, name="tiny_bl",
)

# Token-pruning baselines of paper Table 2 (docs/architecture.md: adaptation to SAM and FLOPs).
# EViT: one cut inside the first global-attention layer; Evo-ViT: dense up to its first pruned
# layer, re-selection at the listed layers (ViT-B: DeiT-B's layers 5 and 9; ViT-H: the first
# layer of each 8-layer stage after the first global-attention layer).
_PRUNING_BASELINES = tuple(
    ModelSpec(name, display, enc, teacher=teacher, checkpoint_file=ckpt,
              pruning=PruningSpec(method, layers), default_keep_ratio=0.5, family=family,
              test_only=teacher == "tiny_vit")
    for name, display, enc, teacher, ckpt, method, layers, family in (
        ("evit_b", "EViT-B @ 0.5", _VIT_B, "vit_b", "sam_vit_b_01ec64.pth", "evit", (2,), "b"),
        ("evovit_b", "Evo-ViT-B", _VIT_B, "vit_b", "sam_vit_b_01ec64.pth", "evovit", (4, 8),
         "b"),
        ("evit_h", "EViT-H @ 0.5", _VIT_H, "vit_h", "sam_vit_h_4b8939.pth", "evit", (7,), "h"),
        ("evovit_h", "Evo-ViT-H", _VIT_H, "vit_h", "sam_vit_h_4b8939.pth", "evovit",
         (8, 16, 24), "h"),
        # tests: window and global layers before, at and after the cut / selections
        ("tiny_evit", "Tiny EViT (tests)", _TINY_VIT, "tiny_vit", "", "evit", (1,), "tiny"),
        ("tiny_evovit", "Tiny Evo-ViT (tests)", _TINY_VIT, "tiny_vit", "", "evovit", (2, 4),
         "tiny"),
    )
)

# Design steps of paper Table 3 on SAM (docs/architecture.md, "Design steps"), one component
# added at a time on the way to B+T: P-blocks on the routed 25% from layer 2 chosen by the
# attention tokens receive in layer 1 (early prune), + E-blocks, + learned predictors (routed
# tokens still attend to routed tokens only), then b_t itself (+ semi-cross attention).
_ATTN_SCORED = {"scorer": "attention", "p_attention": "self"}
_ABLATION_STEPS = tuple(
    ModelSpec(name, display, replace(enc, name=name, **fields), teacher=teacher,
              checkpoint_file=ckpt, ablation_of=of, test_only=of == "tiny_bl")
    for name, display, enc, fields, teacher, ckpt, of in (
        ("b_t_early_prune", "B + T: early prune", _B_T,
         {"layer_modes": (FULL,) + (P_ONLY,) * 11, "predictor_after": (0,), "e_dim": 0,
          "e_heads": 0, **_ATTN_SCORED}, "vit_b", "sam_vit_b_01ec64.pth", "b_t"),
        ("b_t_eblock", "B + T: + E-block", _B_T, {"predictor_after": (0,), **_ATTN_SCORED},
         "vit_b", "sam_vit_b_01ec64.pth", "b_t"),
        ("b_t_predictor", "B + T: + predictor", _B_T, {"p_attention": "self"},
         "vit_b", "sam_vit_b_01ec64.pth", "b_t"),
        # tests: attention scored after a window and a global layer
        ("tiny_bl_early_prune", "Tiny early prune (tests)", _TINY_BL,
         {"layer_modes": (FULL, FULL) + (P_ONLY,) * 4, "predictor_after": (0, 1), "e_dim": 0,
          "e_heads": 0, **_ATTN_SCORED}, "tiny_vit", "", "tiny_bl"),
        ("tiny_bl_eblock", "Tiny + E-block (tests)", _TINY_BL,
         {"predictor_after": (0, 1), **_ATTN_SCORED}, "tiny_vit", "", "tiny_bl"),
        ("tiny_bl_predictor", "Tiny + predictor (tests)", _TINY_BL, {"p_attention": "self"},
         "tiny_vit", "", "tiny_bl"),
    )
)
# Table-3 order: each step adds one component; the last is the full model
ABLATION_ORDER: tuple[str, ...] = ("b_t_early_prune", "b_t_eblock", "b_t_predictor", "b_t")

MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("b_t", "Ours (B + T)", _B_T, teacher="vit_b",
                  checkpoint_file="sam_vit_b_01ec64.pth", family="b"),
        ModelSpec("h_b", "Ours (H + B)", _H_B, teacher="vit_h",
                  checkpoint_file="sam_vit_h_4b8939.pth", family="h"),
        ModelSpec("vit_b", "ViT-B", _VIT_B, checkpoint_file="sam_vit_b_01ec64.pth"),
        ModelSpec("vit_l", "ViT-L", _VIT_L, checkpoint_file="sam_vit_l_0b3195.pth"),
        ModelSpec("vit_h", "ViT-H", _VIT_H, checkpoint_file="sam_vit_h_4b8939.pth"),
        ModelSpec("tiny_bl", "Tiny bLViT (tests)", _TINY_BL, teacher="tiny_vit", test_only=True,
                  family="tiny"),
        ModelSpec("tiny_vit", "Tiny ViT (tests)", _TINY_VIT, test_only=True),
        *_PRUNING_BASELINES,
        *_ABLATION_STEPS,
    )
}
DEFAULT_MODEL = "h_b"

BLVIT_MODELS: tuple[str, ...] = tuple(k for k, s in MODEL_SPECS.items() if s.is_blvit)
PRUNING_MODELS: tuple[str, ...] = tuple(k for k, s in MODEL_SPECS.items() if s.is_pruning)
# models that take keep_ratio (bLViT and the pruning baselines)
KEEP_RATIO_MODELS: tuple[str, ...] = tuple(k for k, s in MODEL_SPECS.items() if s.has_keep_ratio)
VANILLA_MODELS: tuple[str, ...] = tuple(k for k, s in MODEL_SPECS.items() if s.teacher is None)
TEACHER_OF: dict[str, str] = {k: s.teacher for k, s in MODEL_SPECS.items() if s.teacher}
DISPLAY_NAMES: dict[str, str] = {k: s.display_name for k, s in MODEL_SPECS.items()}
# (embed_dim, depth) of a vanilla SAM encoder -> its name, to say what a wrong checkpoint holds
SAM_ENCODER_NAMES: dict[tuple[int, int], str] = {
    (s.encoder.embed_dim, s.encoder.depth): s.display_name
    for s in MODEL_SPECS.values() if s.teacher is None
}
# benchmark family -> (vanilla teacher, bLViT student)
FAMILIES: dict[str, tuple[str, str]] = {
    s.family: (s.teacher, s.name) for s in MODEL_SPECS.values()
    if s.is_blvit and not s.ablation_of
}
BLVIT_BY_SHAPE: dict[tuple[int, int], str] = {
    (s.encoder.embed_dim, s.encoder.depth): s.name for s in MODEL_SPECS.values()
    if s.is_blvit and not s.ablation_of
}


def get_spec(name: str) -> ModelSpec:
    """The spec of registry key ``name``; an unknown name lists the choices."""
    if name == "default":
        name = DEFAULT_MODEL
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def default_keep_ratio(name: str) -> float:
    """The keep ratio a model runs at when none is given (bLViT 0.25, pruning baselines 0.5)."""
    return get_spec(name).default_keep_ratio


def dense_spec(variant: str) -> EncoderSpec:
    """A vanilla SAM ViT as an ``EncoderSpec`` for our fused-attention encoder."""
    spec = get_spec(variant)
    if spec.teacher is not None:
        kind = "token-pruning baseline" if spec.is_pruning else "bLViT model"
        raise ValueError(f"{variant!r} is a {kind}, not a vanilla SAM ViT")
    e = spec.encoder
    return EncoderSpec(e.embed_dim, e.depth, e.num_heads, e.global_attn_indexes,
                       (FULL,) * e.depth, name=f"{variant}_sdpa")


def check_img_size(value: int, what: str = "img_size") -> int:
    """The one input-size rule: a positive multiple of the patch size (16)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
        raise ValueError(f"{what} must be a positive multiple of 16, got {value!r}")
    return value
