"""One run owns its --output-dir: a lock naming the holder, temp files of live processes kept,
keep-last rotation over this run's own step files only.

Why: two runs on one folder (a SLURM requeue while the old job still writes, a typo in a sweep)
interleave their step files and prune each other's; a fresh run in a finished run's folder
pruned its own new step files first (sorted by name against the old run's higher steps); a
``.last.pth.tmp.<pid>`` of a process still writing was deleted at start as stale.

The lock is ``.blsam-run.lock``: ``flock`` held for the process's life (the kernel, or the NFSv4
server for another host, releases it when the holder dies, so a torchrun restart -- same job,
new pids -- or a requeue on another node takes over a dead holder's lock without help) plus a
JSON body naming the holder (host, pid, start time, torchrun job). A body left by a holder that
died without releasing is taken over with a warning; a live holder refuses the run with one
line. Where ``flock`` is unsupported the body alone decides: a holder on this host is alive
when its pid is (and started when recorded); one on another host is trusted (refused).
Under DDP only rank 0 takes the lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
from typing import Any

from ..errors import UserError
from ..utils.files import write_json_atomic

log = logging.getLogger("blsam.train")

LOCK_NAME = ".blsam-run.lock"
STEPS_NAME = ".blsam-steps.json"  # this run's step files, oldest first (keep-last rotation)
_STEP = re.compile(r"^step_(\d+)\.pth$")
_TEMP_PID = re.compile(r"^\..+\.(?:tmp|link)\.(\d+)$")

_held: dict[str, RunDirLock] = {}  # abspath -> the lock this process holds


class RunDirBusy(UserError):
    """Another live run owns the output folder."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def holder_info() -> dict[str, Any]:
    """Who holds the lock: enough for a person to find the process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torchrun_job": os.environ.get("TORCHELASTIC_RUN_ID"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def describe(h: dict[str, Any]) -> str:
    job = "".join(f", {k} {h[k]}" for k in ("slurm_job", "torchrun_job") if h.get(k))
    return f"pid {h.get('pid')} on {h.get('host')} since {h.get('time')}{job}"


def _body_alive(h: dict[str, Any]) -> bool:
    """Without flock: is the recorded holder alive (another host: assume so)."""
    if h.get("host") != socket.gethostname():
        return True
    pid = int(h.get("pid") or 0)
    return pid_alive(pid) and (h.get("start") is None or _proc_start(pid) == h.get("start"))


class RunDirLock:
    """The held lock of one output folder (``claim`` takes it, ``release`` lets it go)."""

    def __init__(self, folder: str) -> None:
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        for _ in range(20):  # the file may be unlinked by a releasing holder between steps
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    body = self._read(fd)
                    os.close(fd)
                    raise RunDirBusy(
                        f"--output-dir {self.folder!r} is in use by another run "
                        f"({describe(body) if body else 'holder unknown'}); wait for it to "
                        f"end, or give another --output-dir") from None
                locked = False  # no flock on this file system: the body alone decides
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked an inode a releasing holder just unlinked
                os.close(fd)
                continue
            body = self._read(fd)
            if body and body.get("pid") == os.getpid() and body.get("host") == (
                    socket.gethostname()):
                pass  # our own earlier, unreleased claim (same process)
            elif body and not locked and _body_alive(body):
                os.close(fd)
                raise RunDirBusy(f"--output-dir {self.folder!r} is in use by another run "
                                 f"({describe(body)}); wait for it to end, or give another "
                                 f"--output-dir")
            elif body:
                log.warning("--output-dir %s: taking over the lock of a run that is gone (%s)",
                            self.folder, describe(body))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise RunDirBusy(f"--output-dir {self.folder!r}: could not take {LOCK_NAME}")

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
            body = json.loads(raw) if raw else None
            return body if isinstance(body, dict) else None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "time": "? (unreadable lock body)"}

    def release(self) -> None:
        """Unlink, then unlock (a waiter that opened the old inode sees it unlinked, retries)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def claim(folder: str) -> RunDirLock:
    """Take (or keep) this process's lock on ``folder``; raise RunDirBusy when a live run holds
    it. Re-entrant within one process (in-process tests, ``--val-only`` after training)."""
    key = os.path.abspath(folder)
    if key in _held:
        return _held[key]
    lock = RunDirLock(key)
    lock.acquire()
    _held[key] = lock
    return lock


def release(folder: str | None = None) -> None:
    """Let go of ``folder``'s lock (all held locks when None); the kernel does it at exit."""
    for key in [os.path.abspath(folder)] if folder else list(_held):
        lock = _held.pop(key, None)
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------- temp files


def clean_stale_temp_files(folder: str) -> list[str]:
    """Remove what a save killed mid-write left (``.<name>.tmp.<pid>``, ``.last.pth.link.<pid>``,
    1.2-9 GB each) when its process is gone; a live process's temp file is kept (it may be
    writing it now). Called by the lock holder at start; returns the removed names."""
    if not os.path.isdir(folder):
        return []
    removed, kept, size = [], [], 0
    for name in sorted(os.listdir(folder)):
        m = _TEMP_PID.match(name)
        if not m or not (".tmp." in name or name.startswith(".last.pth.link.")):
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            kept.append(name)
            continue
        size += os.path.getsize(path)
        os.remove(path)
        removed.append(name)
    if removed:
        log.warning("removed %d stale temp file(s) of an interrupted save (%.1f MB): %s",
                    len(removed), size / 2 ** 20, ", ".join(removed))
    if kept:
        log.warning("kept %d temp file(s) of a live process (pid in the name): %s", len(kept),
                    ", ".join(kept))
    return removed


# ---------------------------------------------------------------- keep-last rotation


def step_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if _STEP.match(f)) if os.path.isdir(folder) \
        else []


def start_rotation(folder: str, resumed_step: int | None) -> None:
    """Begin this run's list of step files: empty for a fresh run (another run's step files in
    the folder are never pruned by this one); a resume keeps the list; a folder written before
    the list existed adopts its step files up to the resumed step."""
    path = os.path.join(folder, STEPS_NAME)
    if resumed_step is None:
        theirs = step_files(folder)
        if theirs:
            log.warning("--output-dir %s holds %d step file(s) of an earlier run (%s ... %s): "
                        "this run's rotation leaves them alone", folder, len(theirs), theirs[0],
                        theirs[-1])
            write_json_atomic({"files": []}, path)
        elif os.path.isfile(path):  # no list: every step file that appears is this run's
            os.remove(path)
    elif not os.path.isfile(path):
        mine = [f for f in step_files(folder) if int(_STEP.match(f).group(1)) <= resumed_step]
        write_json_atomic({"files": mine}, path)


def rotate(folder: str, new_file: str, keep_last: int) -> list[str]:
    """Note ``new_file`` as this run's and delete this run's step files beyond the newest
    ``keep_last``; without a list (a direct call) every step file counts. Returns the removed."""
    path = os.path.join(folder, STEPS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            mine = [str(x) for x in json.load(f)["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        mine = step_files(folder)
    mine = sorted({*mine, os.path.basename(new_file)}, key=lambda f: int(_STEP.match(f).group(1))
                  if _STEP.match(f) else -1)
    drop = mine[:-keep_last] if keep_last > 0 else []
    for f in drop:
        try:
            os.remove(os.path.join(folder, f))
        except FileNotFoundError:
            pass
    write_json_atomic({"files": [f for f in mine if f not in drop]}, path)
    return drop
