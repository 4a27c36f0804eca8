"""Metric oracles (GT as prediction -> perfect scores, empty -> 0), prompt sampling, data files."""
import json

import numpy as np
import pytest
from eval_fixtures import GTPredictor, make_tiny_dataset

from blsam.evaluation.datasets import (
    DatasetError,
    ann_to_mask,
    load_dataset,
    load_detections,
    mask_to_rle,
    resolve_image_path,
)
from blsam.evaluation.metrics import (
    coco_segm_eval,
    lvis_segm_eval,
    mask_iou,
    size_of,
    summarize_miou,
    top_k_per_image,
)
from blsam.evaluation.prompts import (
    center_point,
    correction_click,
    object_points,
    xywh_to_xyxy,
)


@pytest.fixture(scope="module", params=["coco", "lvis"])
def tiny(request, tmp_path_factory):
    paths = make_tiny_dataset(str(tmp_path_factory.mktemp(request.param)), request.param)
    return load_dataset(paths["ann_file"], request.param), paths


def _gt_records(ds, empty=False):
    recs = []
    for img in ds.images:
        for ann in ds.anns_by_image.get(img["id"], []):
            if ann.get("iscrowd", 0) or ann["area"] == 0:
                continue
            gt = ann_to_mask(ann, img["height"], img["width"])
            pred = np.zeros_like(gt) if empty else gt
            recs.append({"iou": mask_iou(pred, gt), "size": size_of(ann["area"])})
    return recs


def _gt_results(ds, empty=False):
    out = []
    for img in ds.images:
        for ann in ds.anns_by_image.get(img["id"], []):
            if ann.get("iscrowd", 0) or ann["area"] == 0:
                continue
            m = ann_to_mask(ann, img["height"], img["width"])
            out.append({"image_id": img["id"], "category_id": ann["category_id"], "score": 0.9,
                        "segmentation": mask_to_rle(np.zeros_like(m) if empty else m),
                        "bbox": ann["bbox"]})
    return out


def test_iou_two_rectangles_by_hand():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True   # 20 px
    b[2:6, 3:8] = True   # 20 px, overlap rows 2-3, cols 3-4 = 4 px
    assert mask_iou(a, b) == pytest.approx(4 / 36)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros_like(a), a) == 0.0


def test_miou_oracle_and_empty(tiny):
    ds, _ = tiny
    perfect = summarize_miou(_gt_records(ds))
    assert perfect["mIoU"] == 1.0
    assert all(perfect[f"mIoU_{s}"] == 1.0 for s in ("small", "medium", "large"))
    assert perfect["num_masks"] == 12 and perfect["num_small"] == 3
    assert summarize_miou(_gt_records(ds, empty=True))["mIoU"] == 0.0


def test_ap_oracle_and_empty(tiny):
    ds, _ = tiny
    evaluate = coco_segm_eval if ds.kind == "coco" else lvis_segm_eval
    res = evaluate(ds.raw, _gt_results(ds))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert res[key] == pytest.approx(100.0), (key, res)
    if ds.kind == "lvis":  # LVISEval's accumulate uses np.float: runs on NumPy 2 via the shim
        for key in ("APr", "APc", "APf"):
            assert res[key] == pytest.approx(100.0), (key, res)
    empty = evaluate(ds.raw, _gt_results(ds, empty=True))
    assert empty["AP"] == pytest.approx(0.0)
    assert evaluate(ds.raw, [])["AP"] == 0.0


def test_ap_img_ids_restricts_evaluation(tiny):
    ds, _ = tiny
    evaluate = coco_segm_eval if ds.kind == "coco" else lvis_segm_eval
    first = ds.images[0]["id"]
    only_first = [r for r in _gt_results(ds) if r["image_id"] == first]
    assert evaluate(ds.raw, only_first, img_ids=[first])["AP"] == pytest.approx(100.0)
    assert evaluate(ds.raw, only_first)["AP"] < 100.0


def test_lvis_shim_restores_numpy_aliases():
    from blsam.evaluation.lvis_compat import import_lvis

    _, _, LVISEval = import_lvis()
    assert np.float is float and LVISEval.__module__ == "lvis.eval"


def test_top_k_per_image_keeps_best_scores():
    res = [{"image_id": 1, "score": s} for s in (0.1, 0.9, 0.5)] + [{"image_id": 2, "score": 0.3}]
    kept = top_k_per_image(res, 2)
    assert [r["score"] for r in kept] == [0.9, 0.5, 0.3]


def test_points_inside_masks_reproducible_and_model_independent(tiny):
    ds, _ = tiny
    for img in ds.images:
        for ann in ds.anns_by_image[img["id"]]:
            if ann["area"] == 0 or ann.get("iscrowd", 0):
                continue
            m = ann_to_mask(ann, img["height"], img["width"])
            for k in (1, 3):
                pts = object_points(m, k, seed=7, ann_id=ann["id"])
                assert pts.shape == (k, 2)
                assert all(m[int(y), int(x)] for x, y in pts)
                np.testing.assert_array_equal(pts, object_points(m, k, seed=7, ann_id=ann["id"]))
            other = object_points(m, 3, seed=8, ann_id=ann["id"])
            assert not np.array_equal(other, object_points(m, 3, seed=7, ann_id=ann["id"])) \
                or m.sum() <= 3
            c = object_points(m, 1, seed=0, ann_id=ann["id"], mode="center")
            assert m[int(c[0, 1]), int(c[0, 0])]


def test_center_point_and_correction_click():
    m = np.zeros((20, 30), bool)
    m[5:16, 5:16] = True
    np.testing.assert_array_equal(center_point(m), [[10, 10]])
    pred = np.zeros_like(m)
    pred[5:16, 5:10] = True  # misses the right part: positive click there
    p, label = correction_click(pred, m)
    assert label == 1 and m[int(p[1]), int(p[0])] and not pred[int(p[1]), int(p[0])]
    pred = m.copy()
    pred[0:20, 18:30] = True  # big false positive: negative click
    p, label = correction_click(pred, m)
    assert label == 0 and not m[int(p[1]), int(p[0])]
    np.testing.assert_array_equal(xywh_to_xyxy([1, 2, 3, 4]), [1, 2, 4, 6])


def test_image_lookup_and_masks(tiny):
    ds, paths = tiny
    for img in ds.images:
        assert resolve_image_path(paths["img_dir"], img) is not None
    assert resolve_image_path(paths["img_dir"] + "_nowhere", ds.images[0]) is None
    # RLE annotations decode to the area they claim
    ann = ds.anns_by_image[ds.images[0]["id"]][3]
    assert isinstance(ann["segmentation"], dict)
    assert ann_to_mask(ann, 128, 128).sum() == ann["area"]


def test_bad_annotation_and_detection_files(tmp_path, tiny):
    ds, paths = tiny
    bad = tmp_path / "bad.json"
    bad.write_text("not json {")
    with pytest.raises(DatasetError, match="not a JSON"):
        load_dataset(str(bad))
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="missing key"):
        load_dataset(str(bad))
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(DatasetError, match="detection results"):
        load_dataset(str(bad))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "nope.json"))
    dets = json.load(open(paths["det_file"]))
    dets.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})
    bad.write_text(json.dumps(dets))
    with pytest.raises(DatasetError, match="not in"):
        load_detections(str(bad), ds)
    by_img = load_detections(paths["det_file"], ds)
    scores = [d["score"] for d in by_img[ds.images[0]["id"]]]
    assert scores == sorted(scores, reverse=True)


def _run(ds, paths, empty=False, rank_empty_first=False, **cfg_kw):
    from blsam.evaluation.results import ShardResult
    from blsam.evaluation.runner import (
        Evaluator,
        ProtocolConfig,
        compute_metrics,
        locate_images,
    )

    cfg = ProtocolConfig(seed=3, batch_prompts=3, **cfg_kw)
    dets = None
    if cfg.prompt == "detector":  # GT boxes as detections, score 1
        dets = {img["id"]: [{"image_id": img["id"], "category_id": a["category_id"],
                             "bbox": a["bbox"], "score": 1.0}
                            for a in ds.anns_by_image[img["id"]]
                            if not a.get("iscrowd", 0) and a["area"] > 0] for img in ds.images}
    pred = GTPredictor(ds, paths, cfg, empty, rank_empty_first)
    found, missing, _ = locate_images(paths["img_dir"], list(enumerate(ds.images)), False)
    shard = Evaluator(pred, ds, paths["img_dir"], cfg, dets).run(found, missing)
    merged = ShardResult.merge([shard])
    return compute_metrics(merged, ds, cfg)


@pytest.mark.parametrize("proto", [dict(prompt="point", num_points=1),
                                   dict(prompt="point", num_points=3),
                                   dict(prompt="point", num_points=1, point_from="center"),
                                   dict(prompt="box")])
def test_runner_with_gt_predictions_scores_perfect_and_empty_zero(tiny, proto):
    ds, paths = tiny
    assert _run(ds, paths, **proto)["mIoU"] == 1.0
    assert _run(ds, paths, empty=True, **proto)["mIoU"] == 0.0


def test_runner_multimask_selection_by_score_or_oracle(tiny):
    ds, paths = tiny
    assert _run(ds, paths, rank_empty_first=True, num_points=1)["mIoU"] == 0.0
    assert _run(ds, paths, rank_empty_first=True, num_points=1, oracle=True)["mIoU"] == 1.0


def test_runner_detector_gt_boxes_give_ap_100(tiny):
    ds, paths = tiny
    m = _run(ds, paths, prompt="detector", max_dets=300 if ds.kind == "lvis" else None)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    assert _run(ds, paths, empty=True, prompt="detector")["AP"] == pytest.approx(0.0)


@pytest.mark.parametrize("name,prompt", [("eval_lvis_points", "point"),
                                         ("eval_lvis_points3", "point"),
                                         ("eval_lvis_box", "box"),
                                         ("eval_coco_detector", "detector"),
                                         ("eval_lvis_detector", "detector")])
def test_configs_parse_and_command_line_overrides(name, prompt):
    import os

    from blsam.tools.zero_shot import parse_args

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", name + ".yaml")
    args = parse_args(["--config", path, "--img-size", "64"])
    assert args.prompt == prompt and args.img_size == 64 and args.ann_file
    assert args.num_points == (3 if name.endswith("3") else 1)
    assert (args.det_file is not None) == (prompt == "detector")


def test_gflops_helper_and_table_row():
    from blsam import blsam_model_registry
    from blsam.evaluation.pipeline import sam_gflops
    from blsam.evaluation.report import table_markdown
    from blsam.flops import count_gflops

    sam = blsam_model_registry["tiny_bl"](img_size=64)
    assert sam_gflops(sam) == pytest.approx(count_gflops(sam, "paper"))
    from blsam.evaluation.runner import ProtocolConfig

    row = {"kind": "blsam.zero_shot", "name": "Ours (B + T)", "model": "b_t", "gflops": 210.5,
           "metrics": {"mIoU": 0.711}, "protocol": ProtocolConfig(num_points=3).describe(),
           "dataset_kind": "lvis", "img_size": 1024, "keep_ratio": 0.25, "limit": None,
           "counts": {}}
    assert table_markdown([row]).splitlines()[2] == \
        "| Ours (B + T) | 210.5 | – | 71.1 | – | – | – |"


def test_dataset_kind_checks(tmp_path):
    from blsam.evaluation.datasets import check_lvis_eval_fields

    coco = make_tiny_dataset(str(tmp_path / "c"), "coco", num_images=1, with_detections=False)
    lvis = make_tiny_dataset(str(tmp_path / "l"), "lvis", num_images=1, with_detections=False)
    assert load_dataset(coco["ann_file"]).kind == "coco"
    assert load_dataset(lvis["ann_file"]).kind == "lvis"
    with pytest.raises(DatasetError, match="looks like COCO"):
        load_dataset(coco["ann_file"], "lvis")
    with pytest.raises(DatasetError, match="looks like LVIS"):  # COCOeval is not LVIS AP
        load_dataset(lvis["ann_file"], "coco")
    with pytest.raises(DatasetError, match="frequency"):
        check_lvis_eval_fields(load_dataset(coco["ann_file"]).raw)
