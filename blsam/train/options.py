"""Distillation training of a bLViT-SAM student from its vanilla SAM teacher (paper §3.3, §4.1).

The options (``build_parser``) and their checks (``check_config``, run by ``TrainConfig.validate``
before any model is built); ``blsam.train.trainer.Trainer``'s ``fit()`` drives single-process
and torchrun/DDP runs alike: setup, resume, the step loop (logging, validation, checkpoints) and
finish. A step is one optimizer update
(``accum_steps`` micro-batches). The data stream is addressed by (epoch, batch-in-epoch) and
every random choice is a function of the seed and that address, so checkpoints resume exactly;
``blsam.train.resume`` refuses a checkpoint of a differently-shaped run unless remapping is
asked for.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from ..build_blsam import INIT_CHOICES
from ..checkpoint import check_not_blsam, read_state_dict
from ..specs import TEACHER_OF, check_img_size, check_keep_ratio, default_keep_ratio
from ..utils.cli import OptionError, check_option
from .cluster import OutputDirError, check_output_dir, signal_numbers
from .data import MAX_MASK_FRACTION, add_data_args
from .distill import FD_PADDING, parse_trainable
from .prompts import PROMPT_TYPES

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("blsam.train")


def build_parser() -> argparse.ArgumentParser:
    """Every option is also a config key (``--config`` YAML sets defaults)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--config", default=None, help="YAML file of option: value defaults")
    add_data_args(p)
    g = p.add_argument_group("samples and prompts")
    g.add_argument("--masks-per-image", type=int, default=16)
    g.add_argument("--max-mask-fraction", type=float, default=MAX_MASK_FRACTION,
                   help="drop GT masks covering more than this fraction of the image (SAM: "
                        "0.9); 1 keeps all")
    g.add_argument("--prompt-types", nargs="+", default=list(PROMPT_TYPES), choices=PROMPT_TYPES,
                   help=f"drawn per image from {', '.join(PROMPT_TYPES)}")
    g.add_argument("--max-points", type=int, default=3, help="clicks for the 'points' prompt")
    g.add_argument("--prompt-iters", type=int, default=1,
                   help="prompt/decoder iterations per mask: 1 = one prompt; >1 = SAM's "
                        "interactive training (error-region clicks, previous logits as mask "
                        "prompt, loss on each; SAM used 11)")
    g.add_argument("--teacher-cache", default=None, help="dir written by blsam-cache-teacher")
    g.add_argument("--teacher-compile", action="store_true",
                   help="torch.compile the teacher encoder (when no cache covers the data)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="b_t", choices=sorted(TEACHER_OF))
    g.add_argument("--sam-checkpoint", default=None, help="SAM weights: teacher + P-block init")
    g.add_argument("--img-size", type=int, default=1024)
    g.add_argument("--keep-ratio", type=float, default=None,
                   help="share of tokens kept/routed; default: the model's (0.25 bLViT, 0.5 "
                        "EViT / Evo-ViT)")
    g.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute encoder blocks in backward (h_b at batch 8 needs it)")
    g.add_argument("--trainable", default="image_encoder",
                   help="comma list of image_encoder, prompt_encoder, mask_decoder; or 'all'")
    g.add_argument("--init", choices=INIT_CHOICES, default="sam",
                   help="P-block initialisation: sam (the official checkpoint, the paper's "
                        "'Pretrain' step) or random (SAM's encoder init, the ablation without "
                        "it); the teacher, prompt encoder and mask decoder stay SAM's")
    g.add_argument("--init-checkpoint", default=None,
                   help="start the student from this trained bLViT-SAM state dict (domain "
                        "fine-tuning); the teacher stays --sam-checkpoint (recorded: sha256)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps; beats --epochs")
    g.add_argument("--batch-size", type=int, default=8, help="images per process per micro-step")
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--warmup-steps", type=int, default=250)
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine floor, x lr")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm; 0 disables")
    g.add_argument("--lambda-fd", type=float, default=2.5)
    g.add_argument("--fd-padding", default="exclude", choices=FD_PADDING,
                   help="feature loss over SAM's zero padding: exclude (EdgeSAM) or include")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="auto: bf16 where native (GPU capability >= 8.0; CPU with AVX512-BF16 "
                        "or AMX), else fp16 + GradScaler on GPU, fp32 on CPU")
    g = p.add_argument_group("validation")
    g.add_argument("--val-every", type=int, default=0,
                   help="validate every N steps (and at start and end) on held-out images; "
                        "0: off")
    g.add_argument("--val-images", type=int, default=100, help="held-out images")
    g.add_argument("--val-masks", type=int, default=16, help="GT masks per held-out image")
    g.add_argument("--val-data", default=None,
                   help="where held-out images come from (default: --data, minus the "
                        "training subset)")
    g.add_argument("--val-data-format", default=None, choices=("sa1b", "coco"),
                   help="format of the held-out images (default: coco with --val-ann-file, "
                        "else --data-format)")
    g.add_argument("--val-ann-file", default=None, help="held-out COCO / LVIS instances json")
    g.add_argument("--val-img-dir", default=None, help="the folder of --val-ann-file's images")
    g.add_argument("--val-only", action="store_true",
                   help="evaluate --checkpoint on the held-out images and exit")
    g.add_argument("--checkpoint", default=None, help="bLViT-SAM checkpoint for --val-only")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None)
    g.add_argument("--resume", default=None, help="'auto' (output-dir/last.pth if any) or a path")
    g.add_argument("--resume-remap", action="store_true",
                   help="resume a checkpoint of another world size / batch / accumulation / "
                        "step count / data selection by the number of images seen")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--save-every", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="step_*.pth files kept")
    g.add_argument("--stop-after", type=int, default=None,
                   help="save and exit after this many steps (time-limited jobs; resume later)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--async-checkpoint", default="auto", choices=("auto", "on", "off"),
                   help="write checkpoints in a background thread (auto: on CUDA only; on a "
                        "CPU run the writer would take the training's cores)")
    g.add_argument("--profile", type=int, default=0,
                   help="write a torch.profiler trace of this many steps (0: none)")
    g = p.add_argument_group("cluster (docs/training.md: Running on a cluster)")
    g.add_argument("--max-nonfinite-steps", type=int, default=20,
                   help="a step whose loss or gradient norm is NaN/inf is skipped on every rank "
                        "and counted; this many in a row end the run (exit 3); 0: never")
    g.add_argument("--preempt-signals", nargs="+", default=["SIGTERM", "SIGUSR1"],
                   help="signals that stop every rank at the next step boundary with a "
                        "checkpoint (exit 75); SIGINT always does; 'none': only SIGINT")
    g.add_argument("--preempt-grace", type=float, default=None, metavar="SECONDS",
                   help="seconds between a preemption signal and SIGKILL (torchrun "
                        "--shutdown-timeout, SLURM KillWait); the run warns when its measured "
                        "checkpoint write does not fit (default: $TORCH_ELASTIC_SHUTDOWN_TIMEOUT "
                        "or 30)")
    g.add_argument("--deterministic", action="store_true",
                   help="bit-identical reruns and resumes on CUDA too (they are on CPU "
                        "without it): deterministic algorithms and SDPA's math kernel; slower, "
                        "more memory (docs/training.md, Checkpoints and exact resume)")
    g.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes a collective waits for the slowest rank before the process "
                        "group fails (NCCL watchdog)")
    g.add_argument("--write-timeout", type=float, default=120.0,
                   help="minutes the other ranks wait for rank 0's checkpoint / final-weight "
                        "writes; they wait outside any collective, so a write may take longer "
                        "than --dist-timeout")
    return p


def check_config(cfg: TrainConfig) -> None:
    """Refuse option values that mean nothing, before any data is indexed or model built;
    resolves the model's default keep ratio, so the run signature records the value."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise OptionError(msg)

    data, model, optim, val, ckpt, cluster = (cfg.data, cfg.model, cfg.optim, cfg.val,
                                              cfg.ckpt, cfg.cluster)
    if val.val_only:
        need(bool(val.checkpoint), "--val-only needs --checkpoint (the model to evaluate)")
        if not os.path.isfile(val.checkpoint):
            raise FileNotFoundError(f"--checkpoint {val.checkpoint!r} does not exist")
    else:
        need(bool(ckpt.output_dir), "--output-dir is required")
        need(val.checkpoint is None, "--checkpoint is only for --val-only; training starts "
             "from --sam-checkpoint and continues with --resume")
    need(bool(model.sam_checkpoint),
         "--sam-checkpoint is required (SAM weights for teacher and P-blocks)")
    if not os.path.isfile(model.sam_checkpoint):
        raise FileNotFoundError(f"--sam-checkpoint {model.sam_checkpoint!r} does not exist")
    opts = cfg.options()
    for name in ("batch_size", "accum_steps", "log_every", "save_every", "masks_per_image",
                 "max_points", "prompt_iters", "val_images", "val_masks"):
        need(opts[name] >= 1, f"--{name.replace('_', '-')} must be >= 1, got {opts[name]}")
    for name in ("warmup_steps", "keep_last", "val_every", "num_workers", "weight_decay",
                 "clip_grad", "lambda_fd", "profile"):
        need(opts[name] >= 0, f"--{name.replace('_', '-')} must be >= 0, got {opts[name]}")
    check_option(check_img_size, model.img_size, "--img-size")
    need(0 < data.data_fraction <= 1, f"--data-fraction must be in (0, 1], "
         f"got {data.data_fraction}")
    if model.keep_ratio is None:  # resolved here, so the run signature records the value
        model.keep_ratio = default_keep_ratio(model.model)
    check_option(check_keep_ratio, model.keep_ratio, "--keep-ratio")
    need(0 < data.max_mask_fraction <= 1,
         f"--max-mask-fraction must be in (0, 1], got {data.max_mask_fraction}")
    need(optim.lr > 0, f"--lr must be > 0, got {optim.lr}")
    need(0 <= optim.min_lr_ratio <= 1,
         f"--min-lr-ratio must be in [0, 1], got {optim.min_lr_ratio}")
    need(optim.epochs > 0, f"--epochs must be > 0, got {optim.epochs}")
    need(all(0 <= b < 1 for b in optim.betas), f"--betas must be in [0, 1), got {optim.betas}")
    need(optim.max_steps is None or optim.max_steps >= 1, "--max-steps must be >= 1")
    need(ckpt.stop_after is None or ckpt.stop_after >= 1, "--stop-after must be >= 1")
    need(cluster.max_nonfinite_steps >= 0, f"--max-nonfinite-steps must be >= 0, "
         f"got {cluster.max_nonfinite_steps}")
    need(cluster.dist_timeout > 0,
         f"--dist-timeout must be > 0 minutes, got {cluster.dist_timeout}")
    need(cluster.preempt_grace is None or 0 < cluster.preempt_grace < float("inf"),
         f"--preempt-grace must be > 0 seconds and finite, got {cluster.preempt_grace}")
    need(cluster.write_timeout > 0,
         f"--write-timeout must be > 0 minutes, got {cluster.write_timeout}")
    try:
        signal_numbers(cluster.preempt_signals)
    except ValueError as e:
        raise OptionError(str(e)) from None
    need(not ckpt.resume_remap or bool(ckpt.resume), "--resume-remap needs --resume")
    need(bool(data.prompt_types), "--prompt-types needs at least one type")
    try:
        parse_trainable(model.trainable)
    except ValueError as e:
        raise OptionError(str(e)) from None
    check_sam_checkpoint(model.sam_checkpoint, TEACHER_OF[model.model])
    check_data_config(cfg)
    if ckpt.output_dir:  # before data indexing and model build, not after
        try:
            check_output_dir(ckpt.output_dir)
        except OutputDirError as e:
            raise OptionError(str(e)) from None


def check_data_config(cfg: TrainConfig) -> None:
    """The source flags (``sources.spec``), and what an unlabelled source makes meaningless:
    no --lambda-fd 0 (no loss would be left), no trainable prompt encoder or mask decoder
    (nothing would train them; weight decay alone would move them)."""
    spec = cfg.source_spec()
    lambda_fd, trainable = cfg.optim.lambda_fd, cfg.model.trainable
    if not spec.labelled:
        what = f"--data-format {spec.format}" + (" (no member has masks)"
                                                 if spec.format == "mixture" else "")
        if lambda_fd <= 0:
            raise OptionError(f"{what} trains by feature distillation only: --lambda-fd "
                              f"{lambda_fd:g} would leave no loss; give --lambda-fd > 0")
        if parse_trainable(trainable) != ["image_encoder"]:
            raise OptionError(f"{what} has no masks to train the prompt encoder or mask "
                              f"decoder: --trainable image_encoder")
    val_only = cfg.val.val_only
    if cfg.val.val_every or val_only:
        cfg.val_source_spec()
    init_checkpoint = cfg.model.init_checkpoint
    if cfg.model.init == "random" and (init_checkpoint is not None or val_only):
        raise OptionError("--init random starts the student's encoder from scratch: not with "
                          "--init-checkpoint or --val-only")
    if init_checkpoint is not None:
        if val_only:
            raise OptionError("--init-checkpoint starts training; --val-only evaluates "
                              "--checkpoint")
        if not os.path.isfile(init_checkpoint):
            raise OptionError(f"--init-checkpoint {init_checkpoint!r}: no such file")


def check_sam_checkpoint(path: str, variant: str) -> None:
    """Read the keys (memory-mapped: no 2.5 GB copy) and say what the file is when it is not
    the SAM the teacher needs: a trained bLViT-SAM, another SAM size, or not a checkpoint."""
    from ..build_blsam import check_sam_variant

    sd = read_state_dict(path, "--sam-checkpoint", mmap=True)
    check_not_blsam(sd, path, "--sam-checkpoint")
    check_sam_variant(sd, variant, path)
