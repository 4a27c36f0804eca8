"""blsam-eval trusts no field of a user's annotation, detection or checkpoint file: every
annotation is checked (not the first 100), bad ones are one line or skipped and counted under
--skip-bad-images, images over PIL's pixel limit are bad images (no DecompressionBombError),
detections are capped per image before decoding, NaN weights are refused (eval and export)."""
import json

import pytest
import torch
from eval_fixtures import make_tiny_dataset
from PIL import Image
from test_eval_images import _argv, _write

import blsam.evaluation.pipeline as pipeline
import blsam.tools.zero_shot as zero_shot
from blsam.tools import export_onnx

SIZE = 64  # model input; the photos are PX x PX
PX = 128


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("untrusted")), "coco", num_images=2)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _fails(cli, argv, capsys, match):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def _no_model(monkeypatch):
    monkeypatch.setattr(pipeline, "build_model", lambda a: pytest.fail("model built"))


# annotation index -> the bad field the issue lists (the file has 10 annotations, 2 images)
BAD = {
    0: {"segmentation": {"size": [PX, PX], "counts": [100, 200]}},  # sums to < h*w
    2: {"iscrowd": "0"},
    3: {"bbox": [1e39, 0, 10, 10]},
    5: {"segmentation": [[1e8, 0, 1e8, 1e8, 0, 1e8, 5, 5]]},
    6: {"id": "x7"},
    7: {"id": [7]},
    8: {"image_id": None},
}


def _bad_file(coco, tmp_path):
    ann = _read(coco["ann_file"])
    for i, fields in BAD.items():
        ann["annotations"][i].update(fields)
    del ann["annotations"][9]["image_id"]  # missing
    return _write(tmp_path / "bad.json", ann), ann


def test_every_bad_annotation_refused_or_counted(coco, tiny_sam_ckpt, tmp_path, capsys,
                                                 monkeypatch):
    path, ann = _bad_file(coco, tmp_path)
    real = pipeline.build_model
    _no_model(monkeypatch)
    _fails(zero_shot.cli, _argv(coco, path, tiny_sam_ckpt, tmp_path / "a", "--prompt", "box"),
           capsys, "8 annotation(s) cannot be evaluated as drawn, e.g. annotation 100 (image "
                   "10): RLE runs add up to 300 pixels, not 128x128=16384 (bad_rle)")
    monkeypatch.setattr(pipeline, "build_model", real)
    res = zero_shot.main(zero_shot.parse_args(_argv(
        coco, path, tiny_sam_ckpt, tmp_path / "b", "--prompt", "point1", "box", "detector",
        "--det-file", coco["det_file"], "--skip-bad-images")))["results"]
    by = {r["protocol"]["name"]: r for r in res}
    check = by["box"]["annotation_check"]
    assert check["skipped"] == {"bad_bbox": 1, "bad_id": 2, "bad_image_id": 1, "bad_iscrowd": 1,
                                "bad_polygon": 1, "bad_rle": 1, "missing_image_id": 1}
    assert check["kept"] == len(ann["annotations"]) - 8 and check["bad"] == 8
    for name in ("point1", "box"):
        c = by[name]["counts"]
        assert c["bad_annotations"] == 6  # the two with no usable image_id are in no image
        assert len(by[name]["skipped_annotations"]) == 8
        assert c["annotations_evaluated"] == check["kept"] - c["skipped_crowd"]
    assert by["detector"]["metrics"]["AP"] is not None  # pycocotools saw only checked objects


def test_lvis_frequency_refused_at_load_time(tmp_path, tiny_sam_ckpt, capsys, monkeypatch):
    lv = make_tiny_dataset(str(tmp_path / "lvis"), "lvis", num_images=1, with_detections=False)
    ann = _read(lv["ann_file"])
    ann["categories"][1]["frequency"] = "x"
    path = _write(tmp_path / "l.json", ann)
    _no_model(monkeypatch)
    argv = _argv(lv, path, tiny_sam_ckpt, tmp_path / "o", "--prompt", "point1")
    argv[argv.index("coco")] = "lvis"
    _fails(zero_shot.cli, argv, capsys, "category 2 has LVIS frequency 'x', not one of")


def test_huge_images_are_bad_images_not_tracebacks(coco, tiny_sam_ckpt, tmp_path, capsys,
                                                   monkeypatch):
    ann = _read(coco["ann_file"])
    ann["images"][1].update(height=20000, width=20000)  # the file claims a 20000^2 image
    ann["annotations"] = [a for a in ann["annotations"]  # its RLEs are of the real size
                          if a["image_id"] != 11 or isinstance(a["segmentation"], list)]
    path = _write(tmp_path / "big.json", ann)
    real = pipeline.build_model
    _no_model(monkeypatch)
    _fails(zero_shot.cli, _argv(coco, path, tiny_sam_ckpt, tmp_path / "a", "--prompt", "box"),
           capsys, "20000x20000 = 400000000 pixels, more than the")
    monkeypatch.setattr(pipeline, "build_model", real)
    r = zero_shot.main(zero_shot.parse_args(_argv(
        coco, path, tiny_sam_ckpt, tmp_path / "b", "--prompt", "box",
        "--skip-bad-images")))["results"][0]
    assert r["counts"]["bad_images"] == 1 and r["skipped_images"]["bad"][0]["id"] == 11
    # a file whose header is over PIL's limit (the limit lowered: no 400 MP file written)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PX * PX // 3)  # > 2x: PIL's bomb error
    r = zero_shot.main(zero_shot.parse_args(_argv(
        coco, coco["ann_file"], tiny_sam_ckpt, tmp_path / "c", "--prompt", "box",
        "--skip-bad-images")))["results"][0]
    assert r["counts"]["bad_images"] == 2 and r["counts"]["images_encoded"] == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PX * PX - 1)  # just over: header check
    from blsam.utils.images import decode_rgb

    with pytest.raises(ValueError, match="more than the 16383-pixel limit"):
        decode_rgb(coco["img_dir"] + "/000000000010.jpg")


def test_detections_capped_per_image_before_decoding(coco, tiny_sam_ckpt, tmp_path):
    dets = [{"image_id": 10, "category_id": 1 + i % 3, "bbox": [i % 40, i % 30, 10, 12],
             "score": (i * 7919 % 20000) / 20000} for i in range(20000)]
    det_file = _write(tmp_path / "dets.json", dets)
    r = zero_shot.main(zero_shot.parse_args(_argv(
        coco, coco["ann_file"], tiny_sam_ckpt, tmp_path / "o", "--prompt", "detector",
        "--det-file", det_file)))["results"][0]
    assert r["protocol"]["max_dets"] == 100 and r["counts"]["detections_evaluated"] == 100
    assert r["detection_counts"] == {"detections_in_file": 20000, "max_per_image": 100,
                                     "detections_kept": 100,
                                     "detections_dropped_over_max": 19900}
    bad = [dict(dets[0], image_id="10")]
    _write(tmp_path / "s.json", bad)
    assert zero_shot.cli(_argv(coco, coco["ann_file"], tiny_sam_ckpt, tmp_path / "p",
                               "--prompt", "detector", "--det-file",
                               str(tmp_path / "s.json"))) == 2


def test_nan_checkpoint_refused_by_eval_and_export(coco, tiny_sam_ckpt, tmp_path, capsys):
    sd = torch.load(tiny_sam_ckpt, weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point() and "mask_decoder" in k)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    bad = str(tmp_path / "nan.pth")
    torch.save(sd, bad)
    _fails(zero_shot.cli, _argv(coco, coco["ann_file"], bad, tmp_path / "o", "--prompt", "box"),
           capsys, f"holds non-finite values (NaN/inf) in {key}")
    _fails(export_onnx.cli, ["--model", "tiny_vit", "--checkpoint", bad, "--img-size", "64",
                             "--output", str(tmp_path / "x.onnx")], capsys,
           f"holds non-finite values (NaN/inf) in {key}")
