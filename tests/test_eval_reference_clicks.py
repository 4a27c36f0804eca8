"""--point-from iterative follows EfficientViT-SAM's Clicker rule by rule (hand-built masks
where each rule alone decides the click): distance transform over the whole error region with
clicked pixels zeroed afterwards; a depth tie gives a negative click; with no error left the
object is still clicked (negative, first raster position) and decoded again."""
import numpy as np
from test_eval_protocols import ScriptedPredictor

from blsam.evaluation.prompts import iterative_click
from blsam.evaluation.runner import Evaluator, ProtocolConfig


def test_clicked_pixels_are_zeroed_after_the_distance_transform():
    gt = np.zeros((32, 32), bool)
    gt[10:19, 10:19] = True  # 9x9 missed square, center (14, 14) clicked before
    clicked = np.zeros_like(gt)
    clicked[14, 14] = True
    xy, label = iterative_click(np.zeros_like(gt), gt, clicked)
    # the reference keeps depths computed without the hole: the next click is right next to
    # the earlier one (first of the 8 neighbours of depth 4 in raster order), not pushed away
    assert label == 1 and xy.tolist() == [13, 13]


def test_depth_tie_gives_a_negative_click():
    gt = np.zeros((32, 32), bool)
    gt[2:7, 2:7] = True            # 5x5 missed
    pred = np.zeros_like(gt)
    pred[20:25, 20:25] = True      # 5x5 false positive: the same depth
    xy, label = iterative_click(pred, gt, np.zeros_like(gt))
    assert label == 0 and xy.tolist() == [22, 22]
    pred[19:26, 19:26] = True      # deeper false positive: still negative
    assert iterative_click(pred, gt, np.zeros_like(gt))[1] == 0
    pred[:] = False
    pred[20:23, 20:23] = True      # shallower false positive: positive, in the missed square
    xy, label = iterative_click(pred, gt, np.zeros_like(gt))
    assert label == 1 and xy.tolist() == [4, 4]


def test_no_error_left_still_clicks_and_decodes():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    xy, label = iterative_click(gt.copy(), gt, np.zeros_like(gt))
    assert label == 0 and xy.tolist() == [0, 0]
    left = np.zeros_like(gt)
    left[8:24, 8:16] = True
    empty = np.zeros_like(gt)
    script = {1: ([gt, empty, left], [0.9, 0.1, 0.5]),   # perfect at the first click
              2: ([left, empty, gt], [0.8, 0.1, 0.5])}   # the reference decodes again
    pred = ScriptedPredictor(script)
    ev = Evaluator(pred, None, "", ProtocolConfig(num_points=2, point_from="iterative"))
    coords, labels, chosen, _, _, step_ious = ev._iterative(ev.cfg, gt[None])
    assert len(pred.calls) == 2
    assert coords[0, 1].tolist() == [0, 0] and labels[0].tolist() == [1, 0]
    assert (chosen[0] == left).all()  # the second decode's mask counts, as in the reference
    assert [round(float(s[0]), 3) for s in step_ious] == [1.0, 0.5]
