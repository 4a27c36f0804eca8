"""Bad input fails fast (before any model is built) with one error line and exit code 2, or is a
counted skip; under torchrun an error on one rank ends every rank with that error."""
import json
import os
import socket
import subprocess
import sys

import pytest
from eval_fixtures import make_tiny_dataset, with_wrong_size_image

import blsam.evaluation.pipeline as pipeline
import blsam.tools.zero_shot as zero_shot
from blsam.testing import save_random_sam_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    out = {k: make_tiny_dataset(str(d / k), k, num_images=2) for k in ("coco", "lvis")}
    out["ckpt"] = save_random_sam_checkpoint("tiny_vit", d / "sam_b.pth", img_size=SIZE)
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Every check here must fire before a model is built."""
    def refuse(args):
        raise AssertionError("the model was built before the bad input was found")

    monkeypatch.setattr(pipeline, "build_model", refuse)


def _argv(data, kind, out, *extra):
    d = data[kind]
    return ["--model", "tiny_vit", "--checkpoint", data["ckpt"], "--img-size", str(SIZE),
            "--dataset", kind, "--ann-file", d["ann_file"], "--img-dir", d["img_dir"],
            "--output", str(out), "--no-progress", "--no-flops", *extra]


def _fails(argv, capsys, match):
    assert zero_shot.cli(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("extra,match", [
    (["--max-dets", "-1", "--prompt", "detector"], "--max-dets must be >= 1"),
    (["--max-dets", "0", "--prompt", "detector"], "--max-dets must be >= 1"),
    (["--num-points", "0"], "--num-points must be >= 1"),
    (["--prompt", "point0"], "number of points must be >= 1"),
    (["--batch-prompts", "0"], "--batch-prompts must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1]"),
    (["--keep-ratios", "0.5"], "tiny_vit has no token routing"),
    (["--prompt", "points"], "--prompt 'points'"),
    (["--prompt", "point1", "point"], "listed twice"),
    (["--prompt", "point3", "--oracle"], "no protocol of this run is multimask"),
    (["--prompt", "point3", "--box-multimask"], "--box-multimask needs a box or detector"),
    (["--prompt", "box", "--point-from", "nested"], "needs a point prompt"),
    (["--point-from", "iterative", "--num-clicks", "1"], "use one of them"),
    (["--prompt", "detector"], "needs --det-file"),
    (["--reference", "x.json"], "give --keep-ratios"),
])
def test_bad_options_one_line_before_the_model(extra, match, data, tmp_path, capsys, no_model):
    _fails(_argv(data, "lvis", tmp_path, *extra), capsys, match)


def test_reference_of_another_protocol_fails_before_the_model(data, tmp_path, capsys,
                                                              no_model):
    from test_eval_table import _result

    ref = _write(tmp_path / "ref.json", _result(50.0, "box"))
    _fails(_argv(data, "lvis", tmp_path, "--model", "tiny_bl", "--keep-ratios", "0.5",
                 "--reference", ref), capsys, "none of this run's protocols")


def test_bad_output_fails_before_the_model(data, tmp_path, capsys, no_model):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    _fails(_argv(data, "coco", a_file), capsys, "is a file, not a folder")
    _fails(_argv(data, "coco", a_file / "sub"), capsys, "is not writable")
    _fails(_argv(data, "coco", tmp_path, "--save-predictions", str(a_file / "p.jsonl")),
           capsys, "is a file, not a folder")


def test_bad_files_fail_before_the_model(data, tmp_path, capsys, no_model):
    coco = data["coco"]
    empty = _write(tmp_path / "empty.json", [])
    _fails(_argv(data, "coco", tmp_path, "--prompt", "detector", "--det-file", empty), capsys,
           "holds no detections")
    dets = json.load(open(coco["det_file"]))
    dets[2]["bbox"][2] = 0.0
    zero = _write(tmp_path / "zero.json", dets)
    _fails(_argv(data, "coco", tmp_path, "--prompt", "detector", "--det-file", zero), capsys,
           "detection 2 in")
    dets[2]["bbox"][2], dets[3]["bbox"][3] = 5.0, -3.0
    _fails(_argv(data, "coco", tmp_path, "--prompt", "detector", "--det-file",
                 _write(tmp_path / "neg.json", dets)), capsys, "empty or invalid box")
    ann = json.load(open(coco["ann_file"]))
    ann["annotations"][1]["bbox"][3] = 0
    bad_ann = {**data, "coco": {**coco, "ann_file": _write(tmp_path / "ann.json", ann)}}
    _fails(_argv(bad_ann, "coco", tmp_path, "--prompt", "box"), capsys,
           f"annotation {ann['annotations'][1]['id']} (image 10): bbox [16.0, 26.0, 48.0, 0] has "
           f"no positive width and height (bad_bbox)")
    _fails(_argv(data, "lvis", tmp_path, "--dataset", "coco"), capsys, "looks like LVIS")


def test_truncated_jpeg_fails_or_is_a_counted_skip(data, tmp_path, capsys, monkeypatch):
    coco = data["coco"]
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for name in os.listdir(coco["img_dir"]):
        blob = open(os.path.join(coco["img_dir"], name), "rb").read()
        (img_dir / name).write_bytes(blob[: len(blob) // 2] if name.endswith("11.jpg") else blob)
    cut = {**data, "coco": {**coco, "img_dir": str(img_dir)}}
    real = pipeline.build_model
    monkeypatch.setattr(pipeline, "build_model", lambda a: pytest.fail("model built"))
    _fails(_argv(cut, "coco", tmp_path, "--prompt", "box"), capsys, "truncated JPEG")
    monkeypatch.setattr(pipeline, "build_model", real)
    res = zero_shot.main(zero_shot.parse_args(
        _argv(cut, "coco", tmp_path, "--prompt", "box", "--skip-bad-images")))["results"][0]
    saved = json.load(open(res["outputs"]["json"]))
    assert saved["counts"]["bad_images"] == 1 and saved["counts"]["images"] == 1
    assert saved["skipped_images"]["bad"][0]["id"] == 11
    assert "truncated JPEG" in saved["skipped_images"]["bad"][0]["reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_error_on_one_rank_ends_every_rank(data, tmp_path):
    """Image 11 (rank 1's shard) is not the size its annotation claims: found only when rank 1
    reads it, after rank 0 finished its shard and waits to gather. Both ranks must end with
    rank 1's error line (exit 2), none may hang."""
    bad = {**data, "coco": with_wrong_size_image(data["coco"], 11, str(tmp_path), 144)}
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), os.path.join(REPO, "eval", "zero_shot.py"),
           *_argv(bad, "coco", tmp_path, "--prompt", "box")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    msg = "error: on rank 1: image"
    assert text.count(msg) == 2, text[-3000:]  # printed by both ranks
    assert "is 144x128, but the annotation file says" in text.split(msg)[1]
