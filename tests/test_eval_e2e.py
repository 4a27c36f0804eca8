"""End to end: eval/zero_shot.py on tiny COCO/LVIS sets of real photos with small random models
(tiny_bl and tiny_vit at img_size 64), every protocol, bad inputs, and torchrun sharding (2 gloo
ranks)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from eval_fixtures import make_tiny_dataset

import blsam.evaluation.pipeline as pipeline
import blsam.tools.zero_shot as zero_shot
from blsam import blsam_model_registry
from blsam.evaluation.datasets import DatasetError
from blsam.testing import save_random_sam_checkpoint
from blsam.tools.zero_shot import main, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_ckpt")
    sam = save_random_sam_checkpoint("tiny_vit", d / "sam_b.pth", img_size=SIZE)
    torch.manual_seed(0)
    blsam = blsam_model_registry["tiny_bl"](sam_checkpoint=sam, img_size=SIZE)
    torch.save(blsam.state_dict(), d / "blsam_tiny_bl.pth")  # stands in for a trained bLViT-SAM
    return {"tiny_vit": sam, "tiny_bl": str(d / "blsam_tiny_bl.pth")}


@pytest.fixture(autouse=True, scope="module")
def _reuse_models():
    """Build each (model, checkpoint) once: building dominates these tiny runs on 2 cores.
    The first call of each still goes through the real ``build_model``."""
    real, cache = pipeline.build_model, {}

    def cached(args):
        key = (args.model, args.checkpoint, args.sam_checkpoint, args.img_size, args.keep_ratio)
        if key not in cache:
            cache[key] = real(args)
        if hasattr(cache[key].image_encoder, "keep_ratio"):  # --keep-ratios changes it
            cache[key].image_encoder.keep_ratio = args.keep_ratio
        return cache[key]

    pipeline.build_model = cached
    yield
    pipeline.build_model = real


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return {k: make_tiny_dataset(str(tmp_path_factory.mktemp(k)), k, num_images=2)
            for k in ("coco", "lvis")}


def _args(model, kind, ckpts, data, out, *extra):
    d = data[kind]
    return parse_args(["--model", model, "--checkpoint", ckpts[model], "--img-size", str(SIZE),
                       "--dataset", kind, "--ann-file", d["ann_file"], "--img-dir", d["img_dir"],
                       "--output", str(out), "--no-progress", *extra])


def _one(out):
    """The only result of a one-protocol run."""
    assert len(out["results"]) == 1
    return out["results"][0]


def _check_outputs(res, column, images=2):
    assert os.path.isfile(res["outputs"]["json"]) and os.path.isfile(res["outputs"]["markdown"])
    saved = json.load(open(res["outputs"]["json"]))
    assert saved["metrics"] == res["metrics"]
    assert saved["counts"]["images"] == images
    assert len(saved["checkpoint_sha256"]) == 12
    assert saved["gflops"] > 0 and saved["gflops_convention"] == "paper"
    md = open(res["outputs"]["markdown"]).read()
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    row = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert header == ["Model", "GFLOPs", "1 pt mIoU", "3 pts mIoU", "box mIoU", "COCO AP",
                      "LVIS AP"]
    filled = [h for h, v in zip(header[2:], row[2:]) if v != "–"]
    assert filled == [column], md
    return saved


@pytest.mark.parametrize("model", ["tiny_bl", "tiny_vit"])
def test_lvis_point_and_box_protocols(model, ckpts, data, tmp_path):
    preds = tmp_path / "preds.jsonl"
    one = _one(main(_args(model, "lvis", ckpts, data, tmp_path, "--prompt", "point",
                          "--num-points", "1", "--save-predictions", str(preds))))
    saved = _check_outputs(one, "1 pt mIoU")
    m = one["metrics"]
    assert 0.0 <= m["mIoU"] <= 1.0 and m["num_masks"] == 8
    assert m["num_small"] == 2 and m["num_large"] == 2
    assert saved["counts"]["skipped_empty"] == 1 and saved["counts"]["annotations_evaluated"] == 8
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 8 and {"segmentation", "prompt", "iou", "ann_id"} <= set(lines[0])
    three = _one(main(_args(model, "lvis", ckpts, data, tmp_path, "--prompt", "point",
                            "--num-points", "3", "--batch-prompts", "3", "--limit", "1")))
    _check_outputs(three, "3 pts mIoU", images=1)
    assert three["metrics"]["num_masks"] == 4
    box = _one(main(_args(model, "lvis", ckpts, data, tmp_path, "--prompt", "box",
                          "--limit", "1")))
    _check_outputs(box, "box mIoU", images=1)
    assert box["metrics"]["num_masks"] == 4
    table = main(parse_args(["--table", one["outputs"]["json"], three["outputs"]["json"],
                             box["outputs"]["json"]]))["table"].splitlines()
    assert len(table) == 4  # the full run fills the paper's row, the --limit 1 runs their own
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert rows[0][2:] == [f"{100 * one['metrics']['mIoU']:.1f}", "–", "–", "–", "–"]
    assert rows[1][0].endswith("[first 1 images]")
    assert rows[1][2:] == ["–"] + [f"{100 * r['metrics']['mIoU']:.1f}" for r in (three, box)] \
        + ["–", "–"]


def test_points_do_not_depend_on_the_model(ckpts, data, tmp_path):
    """Same seed -> both models are prompted with exactly the same clicks."""
    prompts = []
    for model in ("tiny_bl", "tiny_vit"):
        f = tmp_path / f"{model}.json"
        main(_args(model, "coco", ckpts, data, tmp_path, "--num-points", "3", "--limit", "1",
                   "--seed", "5", "--save-predictions", str(f)))
        prompts.append([(p["ann_id"], p["prompt"]) for p in json.load(open(f))])
    assert prompts[0] == prompts[1] and len(prompts[0]) == 4


@pytest.mark.parametrize("model,kind", [("tiny_bl", "lvis"), ("tiny_vit", "coco")])
def test_detector_protocol(model, kind, ckpts, data, tmp_path):
    res = _one(main(_args(model, kind, ckpts, data, tmp_path, "--prompt", "detector",
                          "--det-file", data[kind]["det_file"], "--save-predictions",
                          str(tmp_path / "dets.json"))))
    _check_outputs(res, kind.upper() + " AP")
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl") + (("APr", "APc", "APf")
                                                          if kind == "lvis" else ())
    assert all(k in res["metrics"] for k in keys)
    assert 0.0 <= res["metrics"]["AP"] <= 100.0
    out = json.load(open(tmp_path / "dets.json"))
    assert len(out) == res["metrics"]["num_masks"] == 9  # 4 boxes per image + 1 false positive
    assert {"image_id", "category_id", "segmentation", "score"} <= set(out[0])


def test_coco_point_with_correction_clicks_and_crowd(ckpts, data, tmp_path):
    res = _one(main(_args("tiny_vit", "coco", ckpts, data, tmp_path, "--num-clicks", "2",
                          "--oracle")))
    assert res["counts"]["skipped_crowd"] == 1 and res["counts"]["skipped_empty"] == 1
    for k in ("mIoU", "mIoU_click2", "mIoU_click3"):
        assert 0.0 <= res["metrics"][k] <= 1.0


def test_bad_inputs_fail_clearly(ckpts, data, tmp_path, capsys):
    lvis = data["lvis"]
    argv = ["--ann-file", lvis["ann_file"], "--img-dir", str(tmp_path), "--no-flops"]
    assert zero_shot.cli(argv) == 2  # the command line prints one line, no traceback
    assert capsys.readouterr().err.startswith("error: 2 image(s) not found in")
    with pytest.raises(DatasetError, match="not found in"):
        main(_args("tiny_vit", "lvis", ckpts, {"lvis": {**lvis, "img_dir": str(tmp_path)}},
                   tmp_path))
    dets = json.load(open(lvis["det_file"])) + [
        {"image_id": 12345, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.3}]
    bad_dets = tmp_path / "dets.json"
    bad_dets.write_text(json.dumps(dets))
    with pytest.raises(DatasetError, match="image id"):
        main(_args("tiny_vit", "lvis", ckpts, data, tmp_path, "--prompt", "detector",
                   "--det-file", str(bad_dets)))
    not_coco = tmp_path / "sa1b.json"
    not_coco.write_text(json.dumps({"image": {"id": 1}, "annotations": []}))
    with pytest.raises(DatasetError, match="not a COCO/LVIS annotation file"):
        main(_args("tiny_vit", "lvis", ckpts, {"lvis": {**lvis, "ann_file": str(not_coco)}},
                   tmp_path))


def test_blsam_from_sam_checkpoint_warns(ckpts, data, tmp_path):
    args = _args("tiny_bl", "coco", ckpts, data, tmp_path, "--prompt", "box", "--limit", "1")
    args.checkpoint, args.sam_checkpoint = None, ckpts["tiny_vit"]
    with pytest.warns(UserWarning, match="not meaningful"):
        res = _one(main(args))
    assert res["counts"]["images"] == 1 and res["checkpoint"] == ckpts["tiny_vit"]
    assert res["name"] == "Tiny bLViT (tests) (SAM init)"


def test_skip_missing_images_counts_them(ckpts, data, tmp_path):
    coco = data["coco"]
    os.rename(os.path.join(coco["img_dir"], "000000000011.jpg"), tmp_path / "moved.jpg")
    try:
        res = _one(main(_args("tiny_vit", "coco", ckpts, data, tmp_path, "--prompt", "box",
                              "--skip-missing-images")))
    finally:
        os.rename(tmp_path / "moved.jpg", os.path.join(coco["img_dir"], "000000000011.jpg"))
    assert res["counts"]["missing_images"] == 1 and res["counts"]["images"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun: several processes
@pytest.mark.parametrize("kind,extra", [("lvis", ["--num-points", "1"]),
                                        ("coco", ["--prompt", "detector"])])
def test_torchrun_two_ranks_match_one_process(kind, extra, ckpts, data, tmp_path):
    if kind == "coco":
        extra = extra + ["--det-file", data[kind]["det_file"]]
    argv = ["--model", "tiny_vit", "--checkpoint", ckpts["tiny_vit"], "--img-size", str(SIZE),
            "--dataset", kind, "--ann-file", data[kind]["ann_file"],
            "--img-dir", data[kind]["img_dir"], "--no-progress", "--no-flops", *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks (OMP_NUM_THREADS=1): same kernels, same floats
    try:
        single = _one(main(parse_args(argv + ["--output", str(tmp_path / "one"),
                                              "--save-predictions",
                                              str(tmp_path / "one.jsonl")])))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), os.path.join(REPO, "eval", "zero_shot.py"),
           *argv, "--output", str(tmp_path / "two"), "--save-predictions",
           str(tmp_path / "two.jsonl")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / os.path.basename(single["outputs"]["json"])))
    assert two["timing"]["world_size"] == 2
    assert two["metrics"] == single["metrics"]
    assert two["counts"] == single["counts"]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


def test_several_protocols_in_one_pass_equal_separate_runs(ckpts, data, tmp_path):
    """point1 + point3 + box + detector share one encoder pass per image and give exactly the
    numbers of four separate runs; each result records its protocol and the shared pass."""
    coco = data["coco"]
    extra = ("--det-file", coco["det_file"])
    both = main(_args("tiny_vit", "coco", ckpts, data, tmp_path / "all", "--prompt", "point1",
                      "point3", "box", "detector", *extra))["results"]
    assert [r["protocol"]["name"] for r in both] == ["point1", "point3", "box", "detector"]
    for r in both:
        alone = _one(main(_args("tiny_vit", "coco", ckpts, data, tmp_path / r["protocol"]["name"],
                                "--prompt", r["protocol"]["name"], *extra)))
        assert r["metrics"] == alone["metrics"], r["protocol"]["name"]
        assert r["counts"]["images_encoded"] == alone["counts"]["images_encoded"] == 2
        assert r["run"]["shared_encoder_pass"] and not alone["run"]["shared_encoder_pass"]
        assert r["timing"]["encoder_s_per_image"] > 0


def test_named_protocols_in_json_and_markdown(ckpts, data, tmp_path):
    res = main(_args("tiny_vit", "lvis", ckpts, data, tmp_path, "--prompt", "point3", "box",
                     "--point-from", "iterative", "--box-multimask", "--limit", "1"))["results"]
    p3, box = res
    saved = json.load(open(p3["outputs"]["json"]))
    assert saved["protocol"]["points"] == "iterative" and saved["protocol"]["multimask"]
    assert set(saved["metrics"]) >= {"mIoU", "mIoU_point1", "mIoU_point2"}
    assert json.load(open(box["outputs"]["json"]))["protocol"]["multimask"]
    assert "[iterative, first 1 images]" in open(p3["outputs"]["markdown"]).read()
    assert "[multimask, first 1 images]" in open(box["outputs"]["markdown"]).read()


def test_keep_ratio_curve_from_one_checkpoint(ckpts, data, tmp_path):
    ref = _one(main(_args("tiny_vit", "lvis", ckpts, data, tmp_path / "ref", "--prompt", "box")))
    out = main(_args("tiny_bl", "lvis", ckpts, data, tmp_path, "--prompt", "point1", "box",
                     "--keep-ratios", "0.5", "1.0", "--reference", ref["outputs"]["json"]))
    rows = out["results"]
    assert [(r["keep_ratio"], r["protocol"]["name"]) for r in rows] == [
        (0.5, "point1"), (0.5, "box"), (1.0, "point1"), (1.0, "box")]
    assert rows[2]["gflops"] > rows[0]["gflops"]  # counted at each ratio
    assert all(r["timing"]["encoder_s_per_image"] > 0 for r in rows)
    assert len({r["outputs"]["json"] for r in rows}) == 4
    table = out["table"]
    assert "(keep 0.5, 64 px)" in table and "(keep 1, 64 px)" in table
    curve = json.load(open(out["curve"]["json"]))
    assert len(curve["points"]) == 4 and curve["references"][0]["model"] == "tiny_vit"
    assert open(out["curve"]["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the 1.0 rows were really evaluated at 1.0: same numbers as a plain --keep-ratio 1.0 run
    plain = main(_args("tiny_bl", "lvis", ckpts, data, tmp_path / "plain", "--prompt", "point1",
                       "box", "--keep-ratio", "1.0"))["results"]
    assert [r["metrics"] for r in plain] == [r["metrics"] for r in rows[2:]]
    assert [r["gflops"] for r in plain] == [r["gflops"] for r in rows[2:]]


def test_help_shows_defaults_and_every_option_has_help(capsys):
    from blsam.utils.cli import add_model_args

    parser = zero_shot.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "prompts per decoder batch (default: 64)" in text
    assert "(default: random)" in text  # --keep-ratio: the model's own default, named
    assert "default: the model's (0.25 bLViT, 0.5 baselines" in text
    shared = {a.dest: a.help for a in add_model_args(__import__("argparse").ArgumentParser())
              ._actions}
    mine = {a.dest: a.help for a in parser._actions}
    assert all(mine[k] == v for k, v in shared.items() if k != "help")  # the shared options


def test_library_keeps_no_test_fixtures_or_duplicates():
    import blsam.evaluation.datasets as datasets
    import blsam.evaluation.metrics as metrics
    import blsam.evaluation.runner as runner

    assert not hasattr(datasets, "make_tiny_dataset")
    assert not hasattr(metrics, "_has_geometry") and not hasattr(runner, "_has_geometry")
    assert metrics.has_geometry is runner.has_geometry is datasets.has_geometry
