"""Persistent worker processes that each hold one job (a model) and answer one command at a time.

Why: timing several models in one process lets them share a heap. glibc then hands one model's
freed buffers to the next, and an encoder that allocates big activations keeps page-faulting
even with the allocator tuned (the official ViT-B took 2.8 M minor faults per forward with six
models in one process, 0 alone). One process per model, all started with the same allocator
settings, gives every model its own heap; the parent still drives them round-robin, one command
at a time, so timed runs stay interleaved and a drifting machine slows every model alike.

Protocol: the child is ``python -m <module> --serve <job JSON> <argv>``; it imports, waits for
a ``build`` line (so workers start together but build and warm up one at a time), writes one
JSON line (the job's ``hello``) when built, then one JSON line per command line read from
stdin, until ``quit`` or end of input. Anything else the child prints goes to stderr, never
into the replies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Protocol


class Job(Protocol):
    """What runs inside a worker: built by its factory, then ``call``-ed per command."""

    hello: dict[str, object]

    def call(self, cmd: str, arg: str) -> dict[str, object]: ...


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def serve(job: Mapping[str, object], factory: Callable[[Mapping[str, object]], Job]) -> int:
    """Child side: build the job, then answer commands from stdin until ``quit``."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints (tqdm, warnings) must not interleave with the replies

    def reply(obj: dict[str, object]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if sys.stdin.readline().strip() != "build":
        return 0  # the parent gave up before building
    try:
        worker = factory(job)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        reply({"error": _first_line(e)})
        return 1
    reply(dict(worker.hello, pid=os.getpid()))
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        try:
            reply(worker.call(cmd, arg))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory in one forward
            reply({"error": _first_line(e)})
    return 0


class WorkerError(RuntimeError):
    """A worker process died or its job failed."""


class RemoteJob:
    """Parent side: one job in its own persistent process. ``__init__`` starts it (several
    workers import in parallel); reading ``hello`` first builds it (one at a time)."""

    def __init__(self, module: str, job: Mapping[str, object], argv: list[str],
                 env: Mapping[str, str] | None = None) -> None:
        self.job = dict(job)
        cmd = [sys.executable, "-m", module, "--serve", json.dumps(self.job), *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(env) if env is not None else None)
        self._hello: dict[str, object] | None = None

    def _read(self) -> dict[str, object]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            why = " (SIGKILL: out of memory? every worker holds its model's peak memory; run "\
                "fewer models per command)" if code == -9 else " (its stderr is above)"
            raise WorkerError(f"worker {self.job.get('name', '')!r} exited with code {code}{why}")
        return json.loads(line)

    @property
    def hello(self) -> dict[str, object]:
        """The job's first reply: what it built (or ``{"error": ...}``)."""
        if self._hello is None:
            try:
                self.proc.stdin.write("build\n")
                self.proc.stdin.flush()
                self._hello = self._read()
            except BrokenPipeError:
                self._hello = {"error": f"worker exited with code {self.proc.wait()}"}
            except WorkerError as e:
                self._hello = {"error": str(e)}
        return self._hello

    def call(self, cmd: str, arg: str = "") -> dict[str, object]:
        if "error" in self.hello:
            raise WorkerError(str(self.hello["error"]))
        try:
            self.proc.stdin.write(f"{cmd} {arg}".strip() + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports the exit code
        reply = self._read()
        if "error" in reply:
            raise WorkerError(str(reply["error"]))
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class LocalJob:
    """The same interface in this process (tests, and ``--isolation shared``)."""

    def __init__(self, factory: Callable[[Mapping[str, object]], Job],
                 job: Mapping[str, object]) -> None:
        self.job = dict(job)
        try:
            self._worker: Job | None = factory(job)
            self.hello = dict(self._worker.hello, pid=os.getpid())
        except (RuntimeError, ImportError, ValueError) as e:
            self._worker, self.hello = None, {"error": _first_line(e)}

    def call(self, cmd: str, arg: str = "") -> dict[str, object]:
        if self._worker is None:
            raise WorkerError(str(self.hello["error"]))
        try:
            return self._worker.call(cmd, arg)
        except RuntimeError as e:
            raise WorkerError(_first_line(e)) from e

    def close(self) -> None:
        self._worker = None
