"""Issue 27.6: one run owns its --output-dir (a lock naming the holder, a dead holder's lock
taken over with a warning, a live one refusing the run with one line), temp files of a live
process kept, keep-last rotation over this run's own step files, a torn metrics.jsonl line
dropped with a warning (never fatal) on the next ``--resume auto``."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from blsam.train import rundir
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; from blsam.train import rundir; rundir.claim(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rundir")
    write_tiny_sa1b(root, num_shards=1, images_per_shard=2, size=96, fmt="tar")
    return root


def _argv(data, ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data", str(data), "--data-fraction", "1", "--sam-checkpoint", ckpt,
            "--output-dir", str(out), "--img-size", "64", "--num-workers", "0",
            "--log-every", "1", "--no-progress", "--val-every", "0", "--masks-per-image", "2",
            "--prompt-types", "box", "--max-steps", "3", "--warmup-steps", "0",
            "--batch-size", "2", *extra]


def _cli(argv, capsys):
    from blsam.tools.train import cli

    rc = cli(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def _holder(folder):
    """A live process holding ``folder``'s lock, as rank 0 of a running run does."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": ROOT}, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_live_holder_refuses_dead_holder_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        with pytest.raises(rundir.RunDirBusy, match=f"in use by another run .pid {p.pid} on"):
            rundir.claim(out)
    finally:
        p.kill()
        p.wait()
    # the holder died without releasing: its body names it, the kernel dropped its flock
    body = json.loads((out / rundir.LOCK_NAME).read_text())
    assert body["pid"] == p.pid
    with caplog.at_level(logging.WARNING, logger="blsam.train"):
        rundir.claim(out)
    assert f"taking over the lock of a run that is gone (pid {p.pid}" in caplog.text
    assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    rundir.release(out)
    assert not (out / rundir.LOCK_NAME).exists()


def test_temp_file_of_a_live_process_is_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / f".last.pth.tmp.{sleeper.pid}"
        dead_tmp = tmp_path / f".step_0000002.pth.tmp.{dead.pid}"
        dead_link = tmp_path / f".last.pth.link.{dead.pid}"
        for f in (live_tmp, dead_tmp, dead_link):
            f.write_bytes(b"x" * 10)
        removed = rundir.clean_stale_temp_files(str(tmp_path))
        assert sorted(removed) == sorted([dead_tmp.name, dead_link.name])
        assert live_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_second_live_run_refused_with_one_line(data, tiny_sam_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "step_0000007.pth").write_bytes(b"theirs")
    p = _holder(out)
    try:
        t0 = time.monotonic()
        rc, lines, err = _cli(_argv(data, tiny_sam_ckpt, out, "--keep-last", "1"), capsys)
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"is in use by another run (pid {p.pid} on" in lines[0]
    assert sorted(os.listdir(out)) == [rundir.LOCK_NAME, "step_0000007.pth"]  # untouched
    assert took < 30
    print(f"[measured] second live run: exit {rc} after {took:.1f} s")


@pytest.mark.slow  # two tiny CLI runs (~30 s on the shared CPUs)
def test_rotation_leaves_another_runs_step_files_and_torn_log_resumes(data, tiny_sam_ckpt,
                                                                      tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    theirs = ["step_0000500.pth", "step_0001000.pth"]  # a finished run's, higher steps
    for f in theirs:
        (out / f).write_bytes(b"theirs")
    rc, _, err = _cli(_argv(data, tiny_sam_ckpt, out, "--save-every", "1", "--keep-last", "1",
                            "--stop-after", "2"), capsys)
    assert rc == 0, err
    # sorted by name across both runs, the old rule pruned this run's step_0000001/2 first
    assert sorted(f for f in os.listdir(out) if f.startswith("step_")) == [
        "step_0000002.pth", *theirs]
    assert json.loads((out / rundir.STEPS_NAME).read_text())["files"] == ["step_0000002.pth"]
    assert not (out / rundir.LOCK_NAME).exists()  # released at exit

    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 0.1')  # a kill mid-write
    with caplog.at_level(logging.WARNING, logger="blsam.train"):
        rc, lines, err = _cli(_argv(data, tiny_sam_ckpt, out, "--save-every", "1",
                                    "--keep-last", "1", "--resume", "auto"), capsys)
    assert rc == 0 and not lines and "Traceback" not in err, err
    assert "dropped 1 unreadable line(s)" in caplog.text
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 3
    assert sorted(f for f in os.listdir(out) if f.startswith("step_")) == [
        "step_0000003.pth", *theirs]
