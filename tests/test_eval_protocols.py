"""Named protocols (nested points, SAM's iterative clicking, box/detector multimask) and several
protocols sharing one encoder pass per image, checked with stand-in predictors (oracles)."""
import copy

import numpy as np
import pytest
import torch
from eval_fixtures import GTPredictor, make_tiny_dataset

from blsam.evaluation.datasets import ann_to_mask, load_dataset
from blsam.evaluation.prompts import farthest_from_boundary, iterative_click, object_points
from blsam.evaluation.results import ShardResult
from blsam.evaluation.runner import (
    Evaluator,
    ProtocolConfig,
    compute_metrics,
    locate_images,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(str(tmp_path_factory.mktemp("coco")), "coco")
    return load_dataset(paths["ann_file"], "coco"), paths


def _gt_dets(ds, img_ids):
    return {i: [{"image_id": i, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in ds.anns_by_image[i] if not a.get("iscrowd", 0) and a["area"] > 0]
            for i in img_ids}


def _evaluate(ds, paths, protos, dets=None, **pred_kw):
    pred = GTPredictor(ds, paths, protos[0], **pred_kw)
    found, missing, _ = locate_images(paths["img_dir"], list(enumerate(ds.images)), False)
    shard = Evaluator(pred, ds, paths["img_dir"], protos, dets).run(found, missing)
    merged = ShardResult.merge([shard])
    return pred, merged, {c.name: compute_metrics(merged, ds, c) for c in protos}


# ----------------------------------------------------------------------------- nested points
def test_nested_points_share_their_first_click(tiny):
    ds, _ = tiny
    img = ds.images[0]
    for ann in ds.anns_by_image[img["id"]][:4]:
        m = ann_to_mask(ann, img["height"], img["width"])
        one = object_points(m, 1, 0, ann["id"], "nested")
        three = object_points(m, 3, 0, ann["id"], "nested")
        np.testing.assert_array_equal(one[0], three[0])
        assert len({tuple(p) for p in three}) == 3 and all(m[int(y), int(x)] for x, y in three)


# ----------------------------------------------------------------------------- iterative
class ScriptedPredictor:
    """Answers step j (j clicks so far) with scripted 3-mask outputs and predicted IoUs, and
    records every call, so the clicks the runner derives from them can be checked."""

    def __init__(self, script):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.transform = ResizeLongestSide(32)
        self.original_size = (32, 32)
        self.device = torch.device("cpu")
        self.script, self.calls = script, []

    def predict_torch(self, pc, pl, bx, multimask_output=True, mask_input=None):
        self.calls.append({"coords": pc.numpy().copy(), "labels": pl.numpy().copy(),
                           "multimask": multimask_output, "mask_input": mask_input})
        masks, iou = self.script[pc.shape[1]]
        return (torch.as_tensor(np.stack(masks))[None], torch.tensor([iou]),
                torch.zeros(1, 3, 8, 8))


def test_iterative_clicks_follow_the_largest_error_region():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    left = np.zeros_like(gt)
    left[8:24, 8:16] = True              # step 1 keeps this: misses the right half
    over = gt.copy()
    over[26:32, :] = True                # step 2 keeps this: a false-positive strip
    empty, full = np.zeros_like(gt), np.ones_like(gt)
    script = {1: ([left, empty, full], [0.9, 0.1, 0.5]),
              2: ([empty, over, full], [0.2, 0.8, 0.3]),
              3: ([full, empty, gt], [0.1, 0.2, 0.7])}
    pred = ScriptedPredictor(script)
    ev = Evaluator(pred, None, "", ProtocolConfig(num_points=3, point_from="iterative"))
    coords, labels, chosen, _, _, step_ious = ev._iterative(ev.cfg, gt[None])
    assert all(c["multimask"] and c["mask_input"] is None for c in pred.calls)
    np.testing.assert_array_equal(coords[0, 0], farthest_from_boundary(gt)[0])  # GT center
    x, y = coords[0, 1].astype(int)
    assert labels[0].tolist() == [1, 1, 0]
    assert gt[y, x] and not left[y, x] and x >= 16       # in the missed right half
    x, y = coords[0, 2].astype(int)
    assert y >= 26 and not gt[y, x]                      # negative click on the strip
    assert [round(float(s[0]), 3) for s in step_ious] == [0.5, round(256 / 448, 3), 1.0]
    assert chosen[0].sum() == gt.sum()


def test_iterative_click_excludes_clicked_pixels():
    gt = np.zeros((20, 20), bool)
    gt[5:16, 5:16] = True
    pred = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    first, label = iterative_click(pred, gt, clicked)
    assert label == 1
    clicked[int(first[1]), int(first[0])] = True
    second, _ = iterative_click(pred, gt, clicked)
    assert tuple(second) != tuple(first) and gt[int(second[1]), int(second[0])]
    one = np.zeros_like(gt)
    one[3, 3] = True  # nothing left to click: EfficientViT-SAM's Clicker clicks (0, 0), negative
    xy, label = iterative_click(np.zeros_like(gt), one, one)
    assert xy.tolist() == [0, 0] and label == 0


# ----------------------------------------------------------------------------- multimask boxes
@pytest.mark.parametrize("prompt", ["box", "detector"])
def test_box_multimask_keeps_the_best_predicted_iou(tiny, prompt):
    ds, paths = tiny
    dets = _gt_dets(ds, ds.image_ids) if prompt == "detector" else None
    key = "AP" if prompt == "detector" else "mIoU"
    best = 100.0 if prompt == "detector" else 1.0
    proto = [ProtocolConfig(prompt=prompt, box_multimask=True, seed=3, batch_prompts=3)]
    pred, _, m = _evaluate(ds, paths, proto, dets)
    assert set(pred.multimask_calls) == {True} and m[prompt][key] == pytest.approx(best)
    # the stand-in gives the empty mask the best score: kept, so the result collapses
    _, _, m = _evaluate(ds, paths, proto, dets, rank_empty_first=True)
    assert m[prompt][key] == pytest.approx(0.0)
    single = [ProtocolConfig(prompt=prompt, seed=3, batch_prompts=3)]
    pred, _, _ = _evaluate(ds, paths, single, dets)
    assert set(pred.multimask_calls) == {False}


def test_protocols_are_recorded():
    d = ProtocolConfig(num_points=3, point_from="iterative").describe()
    assert d["name"] == "point3" and d["points"] == "iterative" and d["multimask"]
    assert not d["paper_default"] and d["label"] == "iterative" and not d["mask_feedback"]
    d = ProtocolConfig(prompt="box", box_multimask=True).describe()
    assert d["multimask"] and d["label"] == "multimask" and not d["paper_default"]
    assert ProtocolConfig(num_points=3).describe()["paper_default"]


# ----------------------------------------------------------------------------- one encoder pass
def test_protocols_share_one_encoder_pass_and_empty_images_are_not_encoded(tiny):
    ds, paths = tiny
    ds = copy.copy(ds)
    last = ds.images[-1]["id"]
    ds.anns_by_image = {k: v for k, v in ds.anns_by_image.items() if k != last}
    ds.raw = dict(ds.raw, annotations=[a for a in ds.raw["annotations"] if a["image_id"] != last])
    dets = _gt_dets(ds, ds.image_ids[:-1])  # no detection on the last image either
    protos = [ProtocolConfig(prompt="point", num_points=1, seed=3, batch_prompts=3),
              ProtocolConfig(prompt="point", num_points=3, seed=3, batch_prompts=3),
              ProtocolConfig(prompt="box", seed=3, batch_prompts=3),
              ProtocolConfig(prompt="detector", seed=3, batch_prompts=3)]
    pred, merged, metrics = _evaluate(ds, paths, protos, dets)
    assert pred.encoded == 2  # 2 images with prompts, 4 protocols: 2 passes, not 8 (or 12)
    assert merged.counts.images_encoded == 2
    assert merged.counts.images_not_encoded == 1
    assert merged.evaluated_image_ids == ds.image_ids  # still counts for AP
    assert [metrics[n]["mIoU"] for n in ("point1", "point3", "box")] == [1.0, 1.0, 1.0]
    assert metrics["detector"]["AP"] == pytest.approx(100.0)
    assert metrics["point1"]["num_masks"] == metrics["box"]["num_masks"] == 8
