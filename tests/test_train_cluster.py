"""Issue 18: a training run that survives a cluster (tiny_bl student, tiny_vit teacher, 64 px).

Non-finite guard (skip + count on every rank, stop after N in a row, never save or resume a
non-finite tensor, damaged newest checkpoint skipped by --resume auto), one-line user errors
(output folder checked first, teacher cache, --val-only result kept); slow: 2-rank gloo torchrun
runs for ranks that disagree, SIGTERM at a step boundary + exact resume, and a SIGKILLed rank
restarted by torchrun --max-restarts, ending bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cluster")
    write_tiny_sa1b(root / "a", num_shards=2, images_per_shard=2, size=96, fmt="tar")
    write_tiny_sa1b(root / "b", num_shards=1, images_per_shard=2, size=96, fmt="tar", seed=1)
    return root


def _argv(data_dir, ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data", str(data_dir), "--data-fraction", "1", "--sam-checkpoint", ckpt,
            "--output-dir", str(out), "--img-size", "64", "--num-workers", "0",
            "--log-every", "1", "--no-progress", "--val-every", "0", "--masks-per-image", "2",
            "--prompt-types", "box", "--batch-size", "1", "--warmup-steps", "0",
            "--save-every", "1", "--keep-last", "0", *extra]


def _cli(argv, capsys):
    from blsam.tools.train import cli

    rc = cli(argv)
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.startswith("error:")], cap


def _model(path):
    sd = torch.load(path, weights_only=True)
    return sd["model"] if "optimizer" in sd else sd


def _finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.fixture
def poison(monkeypatch):
    """``poison(steps)``: the loss of those (1-based) forward calls becomes NaN."""
    from blsam.train.distill import DistillModel

    orig = DistillModel.forward
    calls = {"n": 0, "bad": set()}

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in calls["bad"] or ("from" in calls and calls["n"] >= calls["from"]):
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(DistillModel, "forward", forward)

    def set_bad(steps=(), start=None):
        calls["bad"] = set(steps)
        if start is not None:
            calls["from"] = start
    return set_bad


# ---------------------------------------------------------------- 1. non-finite guard


def test_nan_loss_step_is_skipped_counted_and_never_saved(data, tiny_sam_ckpt, tmp_path,
                                                          poison, caplog):
    from train_checks import train

    from blsam.tools.train import parse_args

    poison(steps=[3])
    out = tmp_path / "run"
    summary = train(parse_args(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "4")))
    assert summary["nonfinite_steps"] == 1 and summary["ranks_in_sync"]
    assert "step 3: non-finite loss: optimizer step skipped" in caplog.text
    rec = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["nonfinite_steps"] for r in rec] == [0, 0, 1, 1]
    # the skipped step left the weights as they were; every checkpoint is finite
    s2, s3, s4 = (_model(out / f"step_000000{i}.pth") for i in (2, 3, 4))
    assert all(torch.equal(s2[k], s3[k]) for k in s2)
    assert not all(torch.equal(s3[k], s4[k]) for k in s3)
    for f in os.listdir(out):
        if f.endswith(".pth"):
            sd = torch.load(out / f, weights_only=True)
            assert _finite(sd.get("model", sd)), f
    assert torch.load(out / "last.pth", weights_only=True)["nonfinite_steps"] == 1


def test_consecutive_nonfinite_steps_stop_with_one_line(data, tiny_sam_ckpt, tmp_path, poison,
                                                        capsys):
    poison(start=2)
    out = tmp_path / "run"
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "6",
                                "--max-nonfinite-steps", "2"), capsys)
    assert rc == 3 and len(lines) == 1, cap.err[-2000:]
    assert "step 3: 2 consecutive steps with a non-finite loss" in lines[0]
    assert "step_0000002.pth" in lines[0] and "Traceback" not in cap.err
    assert not (out / "step_0000003.pth").exists() and not (out / "final.pth").exists()
    assert _finite(_model(out / "last.pth"))


@pytest.fixture(scope="module")
def two_steps(data, tiny_sam_ckpt, tmp_path_factory):
    """A finished 2-step run: step_0000001.pth, step_0000002.pth (= last.pth), final.pth."""
    from train_checks import train

    from blsam.tools.train import parse_args

    out = tmp_path_factory.mktemp("two_steps") / "run"
    train(parse_args(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "2")))
    return out


def test_resume_refuses_nonfinite_and_damaged_checkpoints(two_steps, data, tiny_sam_ckpt,
                                                          tmp_path, capsys, caplog):
    import shutil

    ck = torch.load(two_steps / "last.pth", weights_only=True)
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = ck["model"][name].clone()
    ck["model"][name].view(-1)[0] = float("nan")
    torch.save(ck, tmp_path / "nan.pth")
    out = tmp_path / "o"
    rc, lines, _ = _cli(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "2", "--resume",
                              str(tmp_path / "nan.pth")), capsys)
    assert rc == 2 and len(lines) == 1
    assert "non-finite" in lines[0] and f"model.{name}" in lines[0]

    # 4 KB of garbage inside the tensor data of a copy: its CRC-32 no longer matches
    raw = bytearray((two_steps / "step_0000002.pth").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4096] = os.urandom(4096)
    (tmp_path / "garbage.pth").write_bytes(bytes(raw))
    rc, lines, _ = _cli(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "2", "--resume",
                              str(tmp_path / "garbage.pth")), capsys)
    assert rc == 2 and len(lines) == 1 and "damaged" in lines[0], lines

    # --resume auto: a truncated last.pth is skipped, naming it, for the intact step_2
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    (run / "final.pth").unlink()
    full = (run / "last.pth").read_bytes()
    (run / "last.pth").unlink()  # a new file: the hard link to step_2 stays intact
    (run / "last.pth").write_bytes(full[:len(full) // 3])
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, run, "--max-steps", "2", "--resume",
                                str(run / "last.pth")), capsys)  # named explicitly: refused
    assert rc == 2 and "step_0000002.pth" in lines[0] and "--resume auto" in lines[0]
    caplog.clear()
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, run, "--max-steps", "2", "--resume",
                                "auto"), capsys)
    assert rc == 0, cap.err[-2000:]
    assert f"skipping {run / 'last.pth'}" in caplog.text
    assert f"resuming from {run / 'step_0000002.pth'} (step 2)" in caplog.text
    # nothing valid at all: one error naming every file
    for f in ("step_0000001.pth", "step_0000002.pth"):
        (run / f).write_bytes(b"\0" * 100)
    rc, lines, _ = _cli(_argv(data / "a", tiny_sam_ckpt, run, "--max-steps", "2", "--resume",
                              "auto"), capsys)
    assert rc == 2 and len(lines) == 1 and "no valid checkpoint" in lines[0]
    assert all(f in lines[0] for f in ("last.pth", "step_0000001.pth", "step_0000002.pth"))


# ---------------------------------------------------------------- 5. one-line errors


def test_output_dir_checked_before_anything(data, tiny_sam_ckpt, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, want in ((afile, "is a file, not a folder"), (afile / "sub", "is a file")):
        # --data does not exist either: the output folder is refused first (before indexing)
        rc, lines, cap = _cli(_argv(tmp_path / "no_data", tiny_sam_ckpt, out, "--max-steps",
                                    "1"), capsys)
        assert rc == 2 and len(lines) == 1 and want in lines[0] and "--output-dir" in lines[0]
        assert "Traceback" not in cap.err


def test_cache_errors_are_one_line(data, tiny_sam_ckpt, tmp_path, capsys):
    empty = tmp_path / "cache"
    empty.mkdir()
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, tmp_path / "o", "--max-steps", "1",
                                "--teacher-cache", str(empty)), capsys)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in cap.err, cap.err[-2000:]
    assert "index.json" in lines[0]
    # tools/cache_teacher.py: argparse errors and user errors, one line, exit 2
    from blsam.tools.cache_teacher import cli as cache_cli

    for argv in (["--no-such-flag"], ["--data", str(tmp_path / "missing"), "--sam-checkpoint",
                                      tiny_sam_ckpt, "--output", str(tmp_path / "c")],
                 ["--data", str(data / "a"), "--sam-checkpoint", tiny_sam_ckpt, "--img-size",
                  "65", "--output", str(tmp_path / "c")]):
        rc = cache_cli(argv)
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "error:" in err and "Traceback" not in err


def test_val_only_keeps_its_result_when_the_folder_fails(data, tiny_sam_ckpt, tmp_path, capsys,
                                                         monkeypatch):
    from blsam import blsam_model_registry
    from blsam.train import loop

    model = tmp_path / "student.pth"
    torch.save(blsam_model_registry["tiny_bl"](img_size=64).state_dict(), model)

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "write_json_atomic", fail)
    argv = _argv(data / "a", tiny_sam_ckpt, tmp_path / "v")
    rc, lines, cap = _cli(argv + ["--val-only", "--checkpoint", str(model), "--val-images", "1",
                                  "--val-masks", "2", "--data-fraction", "0.5"], capsys)
    assert rc == 0 and lines == [], cap.err[-2000:]
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert res["checkpoint"] == str(model) and "cos_sim" in res


# ---------------------------------------------------------------- torchrun (slow)


WRAPPER = """
import os, sys
sys.argv = [a.replace("@RANK@", os.environ["RANK"]) for a in sys.argv]
sys.path.insert(0, {root!r})
if os.environ.get("BLSAM_TEST_HOOK"):  # a test's fault injection (test_train_rank_failures)
    exec(open(os.environ["BLSAM_TEST_HOOK"]).read())
from blsam.tools.train import cli
sys.exit(cli(sys.argv[1:]))
"""


def _torchrun(tmp_path, argv, *launcher):
    """Popen of ``torchrun --nproc_per_node 2`` over a wrapper that puts the rank into
    ``@RANK@`` in the arguments (ranks with different options)."""
    wrapper = tmp_path / "wrap_train.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "--monitor-interval", "0.2", *launcher,
           str(wrapper), *argv, "--device", "cpu", "--dist-timeout", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _workers(agent_pid):
    """Pids of the agent's worker processes (its children), in start order."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == agent_pid:
                out.append(int(p))
    return sorted(out)


def _wait_step(out, step, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("run ended early: " + proc.stderr.read()[-3000:])
        try:
            steps = [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")]
            if steps and steps[-1] >= step:
                return steps[-1]
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("no progress")


STEPS = "6"


@pytest.fixture(scope="module")
def reference(data, tiny_sam_ckpt, tmp_path_factory):
    """An uninterrupted 2-rank run: its final weights."""
    tmp = tmp_path_factory.mktemp("ref")
    proc = _torchrun(tmp, _argv(data / "a", tiny_sam_ckpt, tmp / "run", "--max-steps", STEPS))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return _model(tmp / "run" / "final.pth")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ranks_that_disagree_stop_together_naming_the_difference(data, tiny_sam_ckpt,
                                                                  tmp_path):
    """rank 0 trains on data/a (4 images), rank 1 on data/b (2): without the check they
    trained on different images (--max-steps) or one waited forever (--epochs)."""
    os.symlink(data / "a", tmp_path / "data0")
    os.symlink(data / "b", tmp_path / "data1")
    t0 = time.time()
    proc = _torchrun(tmp_path, _argv(tmp_path / "data@RANK@", tiny_sam_ckpt, tmp_path / "run",
                                     "--epochs", "2"))
    _, err = proc.communicate(timeout=180)
    elapsed = time.time() - t0
    lines = [ln for ln in err.splitlines() if "error: ranks disagree" in ln]
    assert proc.returncode != 0 and len(lines) == 2, err[-3000:]
    for ln in lines:
        assert "images: 4 on rank 0, 2 on rank 1" in ln and "total steps" in ln
    # (torchrun's agent prints its own ChildFailedError traceback: no frame of ours)
    assert 'File "' + os.path.join(ROOT, "blsam") not in err, err[-3000:]
    assert elapsed < 90


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_a_checkpoint_and_resumes_exactly(
        data, tiny_sam_ckpt, tmp_path, reference):
    argv = _argv(data / "a", tiny_sam_ckpt, tmp_path / "run", "--max-steps", STEPS,
                 "--resume", "auto")
    proc = _torchrun(tmp_path, argv)
    _wait_step(tmp_path / "run", 1, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    t0 = time.time()
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 learns it in the step's all-reduce
    _, err = proc.communicate(timeout=120)
    stop_s = time.time() - t0
    assert "exitcode  : 75" in err or "exitcode: 75" in err.replace(" ", ""), err[-3000:]
    assert "received SIGTERM" in err and "a signal on another rank" in err, err[-3000:]
    ck = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert 1 <= ck["step"] < int(STEPS), err[-3000:]
    assert not (tmp_path / "run" / "final.pth").exists() and stop_s < 60
    proc = _torchrun(tmp_path, argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert _same(_model(tmp_path / "run" / "final.pth"), reference)


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_checkpoints_within_its_shutdown_timeout(
        data, tiny_sam_ckpt, tmp_path, reference):
    """Preemption as it arrives (issue 27.4): SIGTERM to the agent, which forwards it to every
    worker and SIGKILLs them after --shutdown-timeout; the workers finish the step, write
    last.pth and exit 75 in time; --resume auto ends identical to an uninterrupted run."""
    argv = _argv(data / "a", tiny_sam_ckpt, tmp_path / "run", "--max-steps", STEPS,
                 "--resume", "auto", "--preempt-grace", "20")
    proc = _torchrun(tmp_path, argv, "--shutdown-timeout", "20")
    _wait_step(tmp_path / "run", 1, proc)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stop_s = time.time() - t0
    assert proc.returncode != 0 and stop_s < 20, (proc.returncode, stop_s, err[-3000:])
    # the workers' exit 75 (EXIT_PREEMPTED) follows this line; the agent, itself signalled,
    # exits 1 without listing them
    assert "stopped after step" in err and "(SIGTERM): checkpoint" in err, err[-3000:]
    print(f"[measured] SIGTERM to the agent: agent exit {proc.returncode}, out after "
          f"{stop_s:.1f} s")
    # the agent forwarded it to both ranks; it never had to escalate to SIGKILL
    assert err.count("received SIGTERM") == 2 and "closing signal SIGTERM" in err, err[-3000:]
    assert "SIGKILL" not in err, err[-3000:]
    ck = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert 1 <= ck["step"] < int(STEPS), err[-3000:]
    assert not (tmp_path / "run" / "final.pth").exists()
    timing = json.loads((tmp_path / "run" / "ckpt_timing.json").read_text())
    assert timing["step"] == ck["step"] and 0 < timing["seconds"] < 20
    assert timing["bytes"] == os.path.getsize(tmp_path / "run" / "last.pth")
    proc = _torchrun(tmp_path, argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "measured at step" in err, err[-3000:]  # the estimate of the earlier attempt
    assert _same(_model(tmp_path / "run" / "final.pth"), reference)


def test_signal_during_setup_exits_75_at_once(data, tiny_sam_ckpt, tmp_path, capsys,
                                              monkeypatch):
    """Before the first step nothing is lost by stopping: exit 75 at once, not after the
    first step (an h_b setup alone takes minutes); nothing is written."""
    from blsam.train import trainer

    setup = trainer.setup

    def setup_then_signal(config):
        run = setup(config)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run is still being set up
        return run

    monkeypatch.setattr(trainer, "setup", setup_then_signal)
    out = tmp_path / "run"
    t0 = time.time()
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "3"), capsys)
    assert rc == 75 and not lines, cap.err[-2000:]
    assert "stopped: stopped by SIGTERM during setup, before the first step" in cap.err
    assert "Traceback" not in cap.err and time.time() - t0 < 30
    assert not (out / "last.pth").exists() and not (out / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_signal_during_validation_is_acted_on_at_the_next_boundary(data, tiny_sam_ckpt,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """A SIGTERM that arrives while validation runs is noted, validation finishes, and the run
    stops at the step boundary right after it with a checkpoint (exit 75)."""
    from blsam.train import loop

    validate = loop.validate
    calls = []

    def validate_then_signal(run, mlog):
        calls.append(run.step)
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-validation
        return validate(run, mlog)

    monkeypatch.setattr(loop, "validate", validate_then_signal)
    out = tmp_path / "run"
    rc, lines, cap = _cli(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "4",
                                "--val-every", "1", "--val-images", "1", "--save-every", "10",
                                "--data-fraction", "0.5"),  # the other half is held out
                          capsys)
    assert rc == 75 and not lines, cap.err[-2000:]
    assert calls == [0, 1]  # the curve's start and step 1; no step after the signal
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 1
    assert not (out / "final.pth").exists()


def test_checkpoint_write_time_is_measured_against_the_grace(data, tiny_sam_ckpt, tmp_path,
                                                            capsys, caplog):
    """The run warns at start (a write probe scaled to the state's bytes) and after each write
    when a checkpoint does not fit --preempt-grace, and keeps the measured time for the next
    attempt's estimate."""
    caplog.set_level(logging.INFO, logger="blsam.train")
    out = tmp_path / "run"
    argv = _argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "3", "--stop-after", "2",
                 "--preempt-grace", "1e-6")
    rc, lines, cap = _cli(argv, capsys)
    assert rc == 0, cap.err[-2000:]
    warned = [r.getMessage() for r in caplog.records if "preemption grace" in r.getMessage()]
    assert len(warned) == 3, warned  # at start, after the writes of step 1 and step 2
    assert "a write probe in --output-dir" in warned[0] and "measured at step 1" in warned[1]
    assert "--shutdown-timeout >=" in warned[0]
    timing = json.loads((out / "ckpt_timing.json").read_text())
    assert timing["step"] == 2 and timing["bytes"] == os.path.getsize(out / "last.pth")
    assert not [f for f in os.listdir(out) if "probe" in f]
    caplog.clear()
    rc, lines, cap = _cli([*argv[:-4], "--preempt-grace", "600", "--resume", "auto"], capsys)
    assert rc == 0, cap.err[-2000:]
    assert "measured at step 2 of an earlier attempt), within the preemption grace of 600 s" \
        in caplog.text
    for bad in ("0", "-1", "nan", "inf"):
        rc, lines, cap = _cli([*argv, "--preempt-grace", bad], capsys)
        assert rc == 2 and len(lines) == 1 and "--preempt-grace must be > 0" in lines[0], bad


@pytest.mark.slow
def test_sigkilled_rank_is_restarted_by_torchrun_and_ends_identical(data, tiny_sam_ckpt,
                                                                    tmp_path, reference):
    argv = _argv(data / "a", tiny_sam_ckpt, tmp_path / "run", "--max-steps", STEPS,
                 "--resume", "auto")
    proc = _torchrun(tmp_path, argv, "--max-restarts", "1")
    _wait_step(tmp_path / "run", 2, proc)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err, err[-3000:]
    assert _same(_model(tmp_path / "run" / "final.pth"), reference)


# ---------------------------------------------------------------- 4. devices, precision, RNG


def test_device_choice_honours_cuda_n_and_one_gpu_per_process(monkeypatch):
    from blsam.utils.dist import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda:1", 1, 0) == torch.device("cuda", 1)  # was cuda:LOCAL_RANK = 0
    assert pick_device("cuda", 2, 3) == torch.device("cuda", 3)
    assert pick_device(None, 1, 0) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task 1
    assert pick_device("cuda", 8, 5) == torch.device("cuda", 0)  # was cuda:5: invalid ordinal
    assert pick_device("cpu", 8, 5) == torch.device("cpu")


def test_process_group_gets_the_timeout(monkeypatch):
    import torch.distributed as dist

    from blsam.utils import dist as du

    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    du.init_distributed("cpu", timeout_min=1.5)
    assert seen["timeout"].total_seconds() == 90


def test_amp_auto_falls_back_to_fp16_without_bf16(monkeypatch):
    """The device's capability is faked (not the function deciding): a V100 (7.0) or T4 (7.5)
    gets fp16 + GradScaler (was bf16: is_bf16_supported counts emulation), Ampere+ bf16."""
    from blsam.train.precision import amp_dtype

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, want in (((7, 0), torch.float16), ((7, 5), torch.float16),
                      ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d=None, c=cap: type("P", (), {"major": c[0], "minor": c[1]}))
        assert amp_dtype("auto", cuda) == want, cap
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("none", cuda) is None
    cpu = torch.device("cpu")  # the CPU's ISA decides: bf16 with AVX512-BF16 or AMX
    for amx, avx, want in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                           (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx: v)
        assert amp_dtype("auto", cpu) == want, (amx, avx)


def test_fp16_persistent_nan_gradient_stops_like_bf16(data, tiny_sam_ckpt, tmp_path, capsys,
                                                      monkeypatch):
    """--amp fp16: a gradient that is always NaN (the loss finite) was only GradScaler's
    calibration (the scale shrank forever, never counted, never stopped); now each skip is
    counted and --max-nonfinite-steps in a row end the run (exit 3)."""
    from blsam.train.distill import DistillModel

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return x.sum() * 0

        @staticmethod
        def backward(ctx, g):
            return torch.full(ctx.shape, float("nan"), dtype=g.dtype, device=g.device)

    orig = DistillModel.forward

    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        p = next(q for q in self.sam.image_encoder.parameters() if q.requires_grad)
        return dict(out, loss=out["loss"] + NanGrad.apply(p))

    monkeypatch.setattr(DistillModel, "forward", forward)
    rc, errors, cap = _cli(_argv(data / "a", tiny_sam_ckpt, tmp_path / "run", "--max-steps",
                                 "6", "--amp", "fp16", "--max-nonfinite-steps", "3"), capsys)
    assert rc == 3 and len(errors) == 1, cap.err[-3000:]
    assert "step 3: 3 consecutive steps with a non-finite gradient norm" in errors[0], errors


def test_rng_state_is_this_processes_device_only(monkeypatch):
    """get/set_rng_state_all crashed when the same world size resumed on another node shape."""
    from blsam.train import resume

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d))
                        or torch.zeros(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all devices"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("all devices"))
    st = resume.rng_state()
    assert st["cuda"].shape == (4,) and calls == [("get", 1)]
    resume.set_rng_state(st)
    old = dict(st, cuda=[torch.zeros(4, dtype=torch.uint8)])  # an 8-GPU node's list, 1 entry
    resume.set_rng_state(old)  # device 1 not in it: skipped, no crash
    assert calls == [("get", 1), ("set", 1)]


def test_failed_background_write_is_raised_at_the_next_step():
    from blsam.train.async_ckpt import AsyncCheckpointWriter

    def fail(state, *a):
        raise OSError(28, "No space left on device")

    w = AsyncCheckpointWriter(background=True)
    w.save(fail, {"w": torch.zeros(2)})
    w._thread.join()
    with pytest.raises(RuntimeError, match="No space left"):
        w.check()  # called by every train_step; was only raised by the next save
    w.check()  # reported once


def test_pixel_stats_live_on_the_device_once():
    from blsam.train.loader import normalize_images, pixel_stats

    a = pixel_stats(torch.device("cpu"))
    assert a is pixel_stats(torch.device("cpu"))  # one copy per process, not one per step
    img = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    out = normalize_images(img, [(32, 20), (16, 32)])
    ref = (img.float() - a[0].view(1, 3, 1, 1)) / a[1].view(1, 3, 1, 1)
    assert torch.equal(out[0, :, :, :20], ref[0, :, :, :20]) and (out[0, :, :, 20:] == 0).all()


def test_deterministic_switch_is_scoped_to_the_run(data, tiny_sam_ckpt, tmp_path, monkeypatch):
    """``--deterministic`` (issue 27: bit-identical resume holds on CPU, on CUDA only with it):
    deterministic algorithms and the SDPA math kernel inside the run, everything restored
    after it, recorded in summary.json; on CPU the weights agree with a run without it."""
    from train_checks import train

    from blsam.tools.train import parse_args
    from blsam.train.distill import DistillModel

    seen = []
    orig = DistillModel.forward

    def forward(self, *a, **k):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return orig(self, *a, **k)

    monkeypatch.setattr(DistillModel, "forward", forward)
    runs = {}
    for flag in ((), ("--deterministic",)):
        out = tmp_path / f"run{len(flag)}"
        summary = train(parse_args(_argv(data / "a", tiny_sam_ckpt, out, "--max-steps", "2",
                                         *flag)))
        assert json.loads((out / "summary.json").read_text())["deterministic"] is bool(flag)
        runs[bool(flag)] = _model(out / "final.pth")
        assert summary["steps"] == 2
    assert seen == [False, False, True, True]
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    # math vs fused SDPA kernel: last-bit gradient differences, which AdamW's normalised
    # update can carry up to a fraction of one step (lr 5e-4) where a gradient is near zero
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, atol=1e-4, rtol=0)
