"""What one benchmark run measures, as a typed record built once from the command line.

Library code takes a ``BenchConfig``, never an ``argparse.Namespace``: the worker processes
receive it as JSON (``to_json``/``from_json``), so a child sees exactly the parent's settings.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# dtype name -> what the model runs in ("autocast": fp32 weights under torch.autocast bf16)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
          "autocast": torch.bfloat16}


@dataclass
class BenchConfig:
    """Every option of ``blsam-benchmark`` (same names as the flags, ``-`` as ``_``)."""

    families: list[str] = field(default_factory=lambda: ["b"])
    keep_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    baselines: bool = False
    ablation: bool = False
    devices: list[str] | None = None
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    cpu_batch_sizes: list[int] | None = None
    cpu_dtypes: list[str] | None = None
    img_size: int = 1024
    threads: int = 2
    warmup: int = 2
    repeats: int = 5
    malloc: str = "both"
    tune_malloc: bool = False
    isolation: str = "process"
    onnx: bool = False
    timm: str = "auto"
    allow_emulated_bf16: bool = False
    e2e: bool = False
    e2e_photos: list[str] = field(default_factory=lambda: ["4:3"])
    e2e_amg_repeats: int = 1
    e2e_points_per_side: int = 32
    quick: bool = False
    cpu_memory: str = "probe"
    gemm_rate: str = "measure"
    photos: list[str] = field(default_factory=list)
    skip_models: bool = False
    rows: list[str] | None = None
    profile_ops: bool = False
    output_dir: str = "outputs/benchmark"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BenchConfig:
        """The fields of ``values`` this record has (an argparse ``vars()``, a JSON dict)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        return cls.from_mapping(json.loads(text))

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_devices() -> list[str]:
    """The rows to run without ``--devices``: the GPU alone where there is one, else the CPU."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def malloc_modes(cfg: BenchConfig) -> list[str]:
    return ["default", "tuned"] if cfg.malloc == "both" else [cfg.malloc]
