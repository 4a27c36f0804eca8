"""Evaluation at full scale, proven small: 2 gloo ranks with a short process-group timeout.
Rank-0-only metric work longer than the timeout still writes every result; an error on rank 1
only ends both ranks with rank 1's message, printed at once (traceback in its log)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from eval_fixtures import make_tiny_dataset, with_wrong_size_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64

# Runs eval/zero_shot.py's cli with one slow step patched in on rank 0 (set by environment).
WRAPPER = '''
import os, sys, time
import segment_anything
import blsam.evaluation.runner as runner
import blsam.tools.zero_shot as zero_shot
rank = int(os.environ.get("RANK", "0"))
mode, pause = os.environ["BLSAM_TEST_MODE"], float(os.environ["BLSAM_TEST_SLEEP"])
if mode == "slow_metrics" and rank == 0:
    real = runner.compute_metrics
    def slow(*a, **k):
        time.sleep(pause)
        return real(*a, **k)
    runner.compute_metrics = slow
if mode == "slow_images" and rank == 0:
    real_set = segment_anything.SamPredictor.set_image
    def slow_set(self, *a, **k):
        time.sleep(pause)
        return real_set(self, *a, **k)
    segment_anything.SamPredictor.set_image = slow_set
sys.exit(zero_shot.cli(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, mode, pause, argv, timeout=240):
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "BLSAM_TEST_MODE": mode, "BLSAM_TEST_SLEEP": str(pause)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), *argv]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def coco3(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("scale")), "coco", num_images=3)


def _argv(d, out, *extra):
    return ["--img-size", str(SIZE), "--dataset", "coco", "--ann-file", d["ann_file"],
            "--img-dir", d["img_dir"], "--output", str(out), "--no-progress", "--no-flops",
            *extra]


@pytest.mark.slow
def test_rank0_metrics_longer_than_timeout_write_every_result(coco3, tiny_sam_ckpt, tmp_path):
    """2 keep ratios x 2 protocols: rank 0 spends 4 s per metric (16 s) with a 3 s
    process-group timeout; rank 1 must not wait for it inside a collective."""
    out = tmp_path / "out"
    proc, _ = _torchrun(tmp_path, "slow_metrics", 4, _argv(
        coco3, out, "--model", "tiny_bl", "--sam-checkpoint", tiny_sam_ckpt,
        "--keep-ratios", "0.5", "1.0", "--prompt", "point1", "box", "--dist-timeout", "0.05"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(f for f in os.listdir(out) if f.endswith(".json") and "curve" not in f)
    assert len(files) == 4, files
    for f in files:
        r = json.load(open(out / f))
        assert r["timing"]["world_size"] == 2 and r["timing"]["dist_timeout_min"] == 0.05
        assert r["config"]["dist_timeout"] == 0.05
        assert r["counts"]["images"] == 3 and r["checkpoint_sha256"]


@pytest.mark.slow
def test_error_on_rank1_ends_both_ranks_at_once(coco3, tiny_sam_ckpt, tmp_path):
    """Image 11 (rank 1's only image) has the wrong size; rank 0 needs 3 s per image for its 2
    images (6 s, longer than the 5 s timeout). Rank 1 prints its error at once, rank 0 stops at
    its next image and ends with the same message; both exit 2."""
    bad = with_wrong_size_image(coco3, 11, str(tmp_path), 144)
    out = tmp_path / "out"
    proc, wall = _torchrun(tmp_path, "slow_images", 3, _argv(
        bad, out, "--model", "tiny_vit", "--checkpoint", tiny_sam_ckpt, "--prompt", "box",
        "--dist-timeout", "0.08"))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    msg = "error: on rank 1: image"
    assert text.count(msg) == 2, text[-3000:]  # rank 1 at once, rank 0 when it joins
    assert "is 144x128, but the annotation file says" in text.split(msg)[1]
    assert "in _evaluate" not in text  # the traceback goes to the log, not to stderr
    log = (out / "error_rank1.log").read_text()
    assert "Traceback" in log and "144x128" in log
