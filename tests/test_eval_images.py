"""Images read the way they were annotated: one reader (PIL) for training and evaluation, the
EXIF orientation ignored by default (COCO/LVIS/SA-1B annotate the stored pixels) or applied
with --exif-orientation apply, tagged images counted; duplicate image ids / file names refused;
single bad annotations skipped and counted under --skip-bad-images, never the whole file."""
import json
import os

import numpy as np
import pytest
from eval_fixtures import make_tiny_dataset
from PIL import Image

import blsam.tools.zero_shot as zero_shot
from blsam.evaluation.datasets import DatasetError, read_image, read_image_oriented
from blsam.train.data import decode_jpeg

SIZE = 64


def _tagged_jpeg(path, pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif.tobytes())


def test_training_and_eval_read_a_tagged_file_alike(tmp_path):
    """A 96x64 (WxH) photo stored with orientation 6 (rotate 90 degrees)."""
    rng = np.random.default_rng(0)
    px = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / "tagged.jpg")
    _tagged_jpeg(path, px, 6)
    train = decode_jpeg(open(path, "rb").read())
    ev, orientation = read_image_oriented(path, 64, 96)
    assert orientation == 6 and ev.shape == (64, 96, 3)
    np.testing.assert_array_equal(ev, train)  # the same pixels, not a rotated copy
    rotated = read_image(path, 96, 64, exif="apply")
    assert rotated.shape == (96, 64, 3)
    with pytest.raises(DatasetError, match="matches only with its EXIF orientation 6 "
                                           "applied: --exif-orientation apply"):
        read_image(path, 96, 64)
    with pytest.raises(DatasetError, match="ignored: --exif-orientation ignore"):
        read_image(path, 64, 96, exif="apply")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("images")), "coco", num_images=2)


def _argv(d, ann_file, ckpt, out, *extra):
    return ["--model", "tiny_vit", "--checkpoint", ckpt, "--img-size", str(SIZE),
            "--dataset", "coco", "--ann-file", ann_file, "--img-dir", d["img_dir"],
            "--output", str(out), "--no-progress", "--no-flops", *extra]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_exif_tag_counted_and_mode_recorded(coco, tiny_sam_ckpt, tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for name in os.listdir(coco["img_dir"]):
        px = np.asarray(Image.open(os.path.join(coco["img_dir"], name)).convert("RGB"))
        _tagged_jpeg(str(img_dir / name), px, 6 if name.endswith("10.jpg") else 1)
    d = dict(coco, img_dir=str(img_dir))
    res = zero_shot.main(zero_shot.parse_args(_argv(d, d["ann_file"], tiny_sam_ckpt,
                                                    tmp_path / "a", "--prompt", "box")))
    r = res["results"][0]
    assert r["counts"]["exif_rotated_images"] == 1
    assert r["images"]["exif_orientation"] == "ignore"
    res = zero_shot.main(zero_shot.parse_args(_argv(d, d["ann_file"], tiny_sam_ckpt,
                                                    tmp_path / "b", "--prompt", "box",
                                                    "--exif-orientation", "apply")))
    r2 = res["results"][0]
    assert r2["images"]["exif_orientation"] == "apply" and r2["config"]["exif_orientation"]
    assert r2["outputs"]["json"].endswith("_exif.json")  # never the same file / row
    assert r2["metrics"] != r["metrics"]


def _fails(argv, capsys, match):
    assert zero_shot.cli(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def test_duplicate_image_ids_and_file_names_refused(coco, tiny_sam_ckpt, tmp_path, capsys):
    ann = json.load(open(coco["ann_file"]))
    dup = dict(ann, images=ann["images"] + [dict(ann["images"][0], file_name="other.jpg")])
    _fails(_argv(coco, _write(tmp_path / "a.json", dup), tiny_sam_ckpt, tmp_path),
           capsys, "image id(s) listed more than once, e.g. [10]")
    same = dict(ann, images=[ann["images"][0], dict(ann["images"][1],
                                                    file_name=ann["images"][0]["file_name"])])
    _fails(_argv(coco, _write(tmp_path / "b.json", same), tiny_sam_ckpt, tmp_path),
           capsys, "file name(s) used by more than one image, e.g. 000000000010.jpg (ids 10 "
                   "and 11)")


def test_bad_annotations_skipped_and_counted(coco, tiny_sam_ckpt, tmp_path, capsys):
    ann = json.load(open(coco["ann_file"]))
    ann["annotations"][1]["bbox"][3] = 0  # zero-height box on a mask: the object is wrong
    ann["annotations"][2]["segmentation"] = [[1, 2, 3, 4, 5]]  # degenerate polygon: for all
    path = _write(tmp_path / "bad.json", ann)
    _fails(_argv(coco, path, tiny_sam_ckpt, tmp_path, "--prompt", "box"), capsys,
           "2 annotation(s) cannot be evaluated as drawn")
    good = zero_shot.main(zero_shot.parse_args(_argv(coco, coco["ann_file"], tiny_sam_ckpt,
                                                     tmp_path / "g", "--prompt", "point1",
                                                     "box")))["results"]
    res = zero_shot.main(zero_shot.parse_args(_argv(coco, path, tiny_sam_ckpt, tmp_path / "o",
                                                    "--prompt", "point1", "box",
                                                    "--skip-bad-images")))["results"]
    by = {r["protocol"]["name"]: r for r in res}
    g = {r["protocol"]["name"]: r for r in good}
    assert by["point1"]["counts"]["bad_annotations"] == 2  # for every protocol
    assert by["box"]["counts"]["bad_annotations"] == 2
    assert by["box"]["annotation_check"]["skipped"] == {"bad_bbox": 1, "bad_polygon": 1,
                                                        "empty_object": 1}
    for name, n in (("point1", 2), ("box", 2)):
        c = by[name]["counts"]
        assert c["annotations_evaluated"] == g[name]["counts"]["annotations_evaluated"] - n
        assert len(by[name]["skipped_annotations"]) == n
