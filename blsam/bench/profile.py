"""``--profile-ops``: where one forward's CPU time goes, per op class (torch.profiler, self
CPU time per op), so a regression shows up as a row of the table, not a guess."""
from __future__ import annotations

from collections.abc import Callable

CLASSES = ("gemm", "attention", "elementwise", "gather/scatter", "copy", "other")

_GEMM = ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "conv", "mkldnn", "_mkl")
_ATTENTION = ("scaled_dot_product", "flash_attention", "softmax", "_efficient_attention")
_GATHER = ("gather", "scatter", "index", "take", "masked", "nonzero", "topk", "sort",
           "argsort", "argmax")
_COPY = ("copy", "to", "clone", "contiguous", "cat", "stack", "pad",
         "constant_pad_nd", "empty", "zeros", "fill", "zero", "new", "resize", "roll",
         "flip", "repeat", "expand_copy")
_ELEMENTWISE = ("add", "mul", "div", "sub", "gelu", "relu", "silu", "norm", "exp", "tanh",
                "sigmoid", "pow", "sqrt", "rsqrt", "mean", "sum", "neg", "abs", "clamp",
                "max", "min", "erf", "lerp", "addcmul", "reciprocal", "log", "where")


def op_class(name: str) -> str:
    """The class of one profiler event's op name (``aten::addmm`` -> gemm)."""
    op = name.split("::")[-1].lower().strip("_")
    words = op.split("_")
    for cls, keys in (("attention", _ATTENTION), ("gemm", _GEMM),
                      ("gather/scatter", _GATHER), ("copy", _COPY),
                      ("elementwise", _ELEMENTWISE)):
        if any(op.startswith(k) or k in words or (len(k) > 6 and k in op) for k in keys):
            return cls
    return "other"


def profile_ops(forward: Callable[[], None]) -> dict[str, float]:
    """Self CPU milliseconds of one ``forward()`` per op class, plus ``total`` and the top op
    of each class by name (``top:<class>``, as ``name ms`` in the JSON only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    out: dict[str, float] = {c: 0.0 for c in CLASSES}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or ev.key.startswith("mkldnn"):
            out[op_class(ev.key)] += ev.self_cpu_time_total / 1e3
        else:  # Python-level or profiler records: other
            out["other"] += ev.self_cpu_time_total / 1e3
    out["total"] = sum(out[c] for c in CLASSES)
    return {k: round(v, 3) for k, v in out.items()}
