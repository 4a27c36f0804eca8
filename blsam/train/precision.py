"""Which autocast dtype ``--amp auto`` means on this device, decided by what it runs natively.

Why not ``torch.cuda.is_bf16_supported()``: by default it counts emulation, so it is true on
any GPU that can allocate a bf16 tensor (V100, T4). There bf16 GEMMs are emulated and
memory-efficient SDPA refuses bf16 (attention falls back to the math kernel), so the run is
slower than fp16 and fp32 alike. Here bf16 is chosen only where it is native:

* CUDA: compute capability >= 8.0 (Ampere and newer; the same test as
  ``is_bf16_supported(including_emulation=False)``), else fp16 with GradScaler, whose skipped
  steps the non-finite guard counts (``blsam.train.loop.train_step``).
* CPU: an ISA with bf16 arithmetic (AVX512-BF16 or AMX); measured here on an AVX512-BF16
  core: a 4096x768 @ 768x3072 matmul takes 58 ms in bf16 against 250 ms in fp32. Without it
  fp32 (CPU fp16 autocast is not faster, and GradScaler would only add work).

The choice and its reason are logged once per process (``--amp auto: bf16 (CUDA capability
8.0)``); ``--amp bf16`` on a device without native bf16 is allowed with a warning.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger("blsam.train")

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(bf16 arithmetic is native on ``device``, the reason in words)."""
    if device.type == "cuda":
        if torch.version.hip:
            return True, "ROCm GPU"
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 0), f"CUDA capability {major}.{minor}"
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return True, "CPU with AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "CPU with AVX512-BF16"
        return False, f"CPU without AVX512-BF16/AMX ({torch.backends.cpu.get_cpu_capability()})"
    return False, f"{device.type} device"


def amp_choice(amp: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) for ``--amp`` on ``device``."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp != "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        return dtype, f"--amp {amp}"
    native, why = native_bf16(device)
    if native:
        return torch.bfloat16, f"native bf16: {why}"
    if device.type == "cuda":
        return torch.float16, f"no native bf16 ({why}): fp16 with GradScaler"
    return None, f"no native bf16 ({why}): fp32"


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (None: fp32), logged with its reason."""
    dtype, why = amp_choice(amp, device)
    if amp == "auto":
        log.info("--amp auto: %s (%s)", str(dtype).replace("torch.", "") if dtype else "fp32",
                 why)
    elif dtype == torch.bfloat16 and not native_bf16(device)[0]:
        log.warning("--amp bf16 on a device without native bf16 (%s): emulated, slower than "
                    "--amp fp16 / none", native_bf16(device)[1])
    return dtype


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """``--deterministic``: bit-identical reruns and resumes on CUDA too, at a cost.

    Without it, resume is bit-identical on CPU only: on CUDA the backward of ``index_select``
    (routing's gather) accumulates with atomics and the memory-efficient / flash SDPA backward
    kernels do too, so two runs differ in the last bits and drift apart. With it:
    ``torch.use_deterministic_algorithms(True)`` (deterministic scatter-adds; an op without a
    deterministic kernel raises instead of running), ``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
    cuDNN deterministic, and SDPA restricted to its math kernel, which materialises every
    (heads, queries, keys) score matrix and keeps it for backward: slower and, at 1024², up to
    0.5 GiB more per image and global block (``blsam-estimate-train-memory`` does not count
    it). Everything is restored on exit."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:3]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
