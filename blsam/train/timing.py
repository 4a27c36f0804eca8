"""Where a training step's time goes: lap timers per phase, and an optional profiler trace.

``PhaseTimer.lap(name)`` charges the time since the previous lap to ``name``, so the training
loop needs one line after each phase and no re-indentation. On CUDA a lap records an event
on the current stream and nothing waits for it until ``collect`` (once per log window): the
laps then measure the GPU timeline, so a "data" lap is the time the GPU sat idle waiting for
the loader, which is what costs throughput. On CPU a lap is wall clock.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

PHASES = ("data", "teacher", "forward", "backward", "optimizer", "checkpoint", "validation")
# not training time: left out of time_step and the global image rate
EXCLUDED = ("checkpoint", "validation")


class PhaseTimer:
    """Per-phase seconds between ``collect`` calls, plus the number of optimizer steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps = 0
        self._laps: list[tuple[str, Any]] = []
        self._host: dict[str, float] = {}
        self._last: Any = self._now()
        self._first: Any = self._last  # CUDA: the event that opens the window

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def reset(self) -> None:
        """Start a window now (drops laps so far)."""
        self._laps, self._host, self.steps = [], {}, 0
        self._last = self._first = self._now()

    def lap(self, name: str) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        now = self._now()
        if self.cuda:
            self._laps.append((name, now))
        else:
            self._host[name] = self._host.get(name, 0.0) + (now - self._last)
        self._last = now
        if name == "optimizer":
            self.steps += 1

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect (synchronises once on CUDA); resets."""
        out = {p: 0.0 for p in PHASES}
        if self.cuda:
            if self._laps:
                self._laps[-1][1].synchronize()
            prev = self._first
            for name, ev in self._laps:
                out[name] += prev.elapsed_time(ev) / 1000.0
                prev = ev
            self._first = prev
        else:
            for k, v in self._host.items():
                out[k] += v
        out["steps"] = float(self.steps)
        self._laps, self._host, self.steps = [], {}, 0
        return out


def window_record(times: dict[str, float], images_global: float) -> dict[str, float]:
    """Log fields from one window's ``collect``: seconds per step for each phase, the data-wait
    share of step time, and global images/s with checkpoint and validation time left out."""
    steps = max(times.get("steps", 0.0), 1.0)
    t = {p: times.get(p, 0.0) for p in PHASES}
    train_s = max(sum(t.values()) - sum(t[p] for p in EXCLUDED), 1e-9)
    rec = {f"time_{p}": t[p] / steps for p in PHASES}
    rec["time_step"] = train_s / steps
    rec["data_wait_share"] = t["data"] / train_s
    rec["global_images_per_s"] = images_global / train_s
    return rec


class StepProfiler:
    """``--profile N``: a torch.profiler trace of N optimizer steps (after 1 skipped and 1
    warm-up step), written as Chrome trace ``<out_dir>/profile_rank<r>.json``. N = 0: no-op."""

    def __init__(self, steps: int, out_dir: str | None, rank: int,
                 device: torch.device) -> None:
        if steps < 0:
            raise ValueError(f"--profile must be >= 0, got {steps}")
        self.path = os.path.join(out_dir or ".", f"profile_rank{rank}.json")
        self.prof = None
        if steps:
            from torch.profiler import ProfilerActivity, profile, schedule

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if device.type == "cuda" else [])
            self.prof = profile(activities=acts,
                                schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                                on_trace_ready=self._save)
            self.prof.start()

    def _save(self, prof: Any) -> None:
        prof.export_chrome_trace(self.path)

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
