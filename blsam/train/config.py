"""Typed training configuration: one dataclass per component, built once from the parsed
options (``TrainConfig.from_options``), checked in one place (``validate``) and the source of
the run signature (``signature``).

The flat view (``options()``) is the option-name -> value dict the checkpoints store as their
``config`` and the run signature reads, key for key what ``vars(args)`` was, so checkpoints
written before this module resume unchanged. Options a component does not declare (a data
source's own flags, options added later) are kept in ``extra``, never dropped.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sources.spec import SourceSpec


@dataclass
class DataConfig:
    """What images, how many masks and prompts per image, the teacher's cache."""

    data: str | None
    data_format: str
    ann_file: str | None
    img_dir: str | None
    mixture: str | None
    exif_orientation: str
    shards: list[str] | None
    data_fraction: float
    seed: int
    num_workers: int
    masks_per_image: int
    max_mask_fraction: float
    prompt_types: list[str]
    max_points: int
    prompt_iters: int
    teacher_cache: str | None
    teacher_compile: bool


@dataclass
class ModelConfig:
    """The student (and, through ``model``, its teacher) and what of it trains."""

    model: str
    sam_checkpoint: str | None
    img_size: int
    keep_ratio: float | None
    grad_checkpoint: bool
    trainable: str
    init_checkpoint: str | None
    init: str = "sam"  # P-blocks from the SAM checkpoint, or "random" (Table-3 ablation)


@dataclass
class OptimConfig:
    """Steps, batch, AdamW, the warmup-cosine schedule, the loss and the precision."""

    epochs: float
    max_steps: int | None
    batch_size: int
    accum_steps: int
    lr: float
    weight_decay: float
    betas: list[float]
    warmup_steps: int
    min_lr_ratio: float
    clip_grad: float
    lambda_fd: float
    fd_padding: str
    amp: str


@dataclass
class ValidationConfig:
    """Held-out validation during training, or ``val_only`` of one checkpoint."""

    val_every: int
    val_images: int
    val_masks: int
    val_data: str | None
    val_data_format: str | None
    val_ann_file: str | None
    val_img_dir: str | None
    val_only: bool
    checkpoint: str | None


@dataclass
class CheckpointConfig:
    """Where the run writes, how often it saves, what it resumes from."""

    output_dir: str | None
    resume: str | None
    resume_remap: bool
    save_every: int
    keep_last: int
    stop_after: int | None
    async_checkpoint: str


@dataclass
class LoggingConfig:
    """Log lines, the progress bar and the profiler trace."""

    log_every: int
    no_progress: bool
    profile: int


@dataclass
class ClusterConfig:
    """Device, process-group timeouts, preemption signals and the non-finite-step guard."""

    device: str | None
    max_nonfinite_steps: int
    preempt_signals: list[str]
    dist_timeout: float
    write_timeout: float
    preempt_grace: float | None = None  # seconds; None: torchrun's shutdown timeout or 30
    deterministic: bool = False  # bit-identical on CUDA too (precision.deterministic_mode)


SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataConfig), ("model", ModelConfig), ("optim", OptimConfig),
    ("val", ValidationConfig), ("ckpt", CheckpointConfig), ("log", LoggingConfig),
    ("cluster", ClusterConfig))


@dataclass
class TrainConfig:
    """The whole run's options, by component."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    val: ValidationConfig
    ckpt: CheckpointConfig
    log: LoggingConfig
    cluster: ClusterConfig
    extra: dict[str, Any] = field(default_factory=dict)  # options no component declares
    order: tuple[str, ...] = ()  # the options' order as parsed (the stored config's order)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainConfig:
        """The one conversion of the CLI's parsed options (``vars()`` of them), by option
        name, in their order; a missing option is a KeyError."""
        flat = dict(options)
        order = tuple(flat)
        parts: dict[str, Any] = {}
        for name, kind in SECTIONS:
            keys = [f.name for f in dataclasses.fields(kind)]
            parts[name] = kind(**{k: flat.pop(k) for k in keys})
        return cls(**parts, extra=flat, order=order)

    def options(self) -> dict[str, Any]:
        """Option name -> value, in the parsed order: what ``vars(args)`` was."""
        flat: dict[str, Any] = dict(self.extra)
        for name, _ in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        order = [k for k in self.order if k in flat] + [k for k in flat if k not in self.order]
        return {k: flat[k] for k in order}

    def validate(self) -> None:
        """Every option check, before any data is indexed or model built
        (``options.check_config``); resolves the model's default ``keep_ratio`` so the
        signature records the value."""
        from .options import check_config

        check_config(self)

    def source_spec(self) -> SourceSpec:
        """The training source (``sources.spec``), from the data options."""
        from .sources.spec import source_spec_of

        return source_spec_of(self.data)

    def val_source_spec(self) -> SourceSpec | None:
        """The held-out source of ``--val-data...``, or None (held out of the training one)."""
        from .sources.spec import held_out_spec

        v = self.val
        return held_out_spec(val_data=v.val_data, val_data_format=v.val_data_format,
                             val_ann_file=v.val_ann_file, val_img_dir=v.val_img_dir,
                             data_format=self.data.data_format,
                             exif_orientation=self.data.exif_orientation)

    def signature(self, world_size: int, total_steps: int, keys: Sequence[str]
                  ) -> dict[str, Any]:
        """The run signature (``resume.run_signature``) of these options."""
        from .resume import run_signature

        return run_signature(self.options(), world_size, total_steps, keys)
