"""Issue 27.3: a deterministic failure (user error, non-finite stop) is not retried by torchrun:
a restart attempt finds the previous attempt's fatal record and exits at once with it, before
any model is built; a new torchrun (attempt 0) is never refused."""
from __future__ import annotations

import sys
import tempfile
import time

import pytest
from test_train_cluster import _argv, _torchrun

from blsam.train import fatal


@pytest.fixture
def torchrun_env(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")

    def attempt(n):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(n))
    return attempt


def test_restart_after_user_error_exits_at_once_with_it(torchrun_env, capsys):
    calls = []

    def bad():
        calls.append(1)
        sys.stderr.write("error: --lr must be > 0, got -1\n")
        return 2

    torchrun_env(0)
    assert fatal.guarded(bad) == 2 and len(calls) == 1
    torchrun_env(1)  # torchrun's restart: the record answers, the run never starts
    assert fatal.guarded(bad) == 2 and len(calls) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: --lr must be > 0, got -1 [not retried: attempt 0")
    torchrun_env(0)  # a new torchrun of the user's (restart 0) is never refused
    assert fatal.guarded(lambda: 0) == 0


def test_crash_and_preemption_are_still_retried(torchrun_env):
    torchrun_env(0)
    assert fatal.guarded(lambda: 1) == 1
    assert fatal.guarded(lambda: 75) == 75
    torchrun_env(1)
    assert fatal.guarded(lambda: 0) == 0


@pytest.mark.slow  # three torchrun attempts of 2 gloo ranks
def test_torchrun_max_restarts_bad_resume_file_one_setup(tiny_sam_ckpt, tmp_path):
    from blsam.train.tiny_sa1b import write_tiny_sa1b

    write_tiny_sa1b(tmp_path / "data", num_shards=1, images_per_shard=2, size=96, fmt="tar")
    bogus = tmp_path / "not_a_checkpoint.pth"
    bogus.write_bytes(b"not a checkpoint")
    argv = _argv(tmp_path / "data", tiny_sam_ckpt, tmp_path / "run", "--max-steps", "2",
                 "--resume", str(bogus))
    times = {}
    for restarts in ("0", "2"):
        t0 = time.monotonic()
        proc = _torchrun(tmp_path, argv, "--max-restarts", restarts)
        _, err = proc.communicate(timeout=300)
        times[restarts] = time.monotonic() - t0
        if restarts == "2":
            assert proc.returncode != 0
            refused = [ln for ln in err.splitlines() if "[not retried: attempt 0" in ln]
            assert len(refused) == 4, err  # 2 ranks x attempts 1 and 2
            # the data was indexed (setup) in attempt 0 only
            assert err.count("batches/epoch/rank") <= 1, err
    print(f"torchrun --max-restarts 0: {times['0']:.1f} s; --max-restarts 2: "
          f"{times['2']:.1f} s", file=sys.__stderr__)
