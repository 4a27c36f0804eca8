"""Issue 28: training sources beside SA-1B. COCO-format sets (every variant real files use,
bad entries counted not fatal), folders of plain images (feature distillation only), weighted
mixtures (shares = weights, pure function of seed/epoch/rank), each training and resuming
bit-exact; the teacher cache is tied to its source; the fine-tuning recipe (--init-checkpoint
student, SAM teacher, --trainable decoder, validation on a held-out COCO json); option
mistakes are one line and exit 2 before any model is built."""
from __future__ import annotations

import json
import os

import pytest
import torch
from source_fixtures import write_image_folder, write_tiny_coco

from blsam.train.sampler import MixtureBatchSampler, allocate
from blsam.train.tiny_sa1b import write_tiny_sa1b

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    coco = write_tiny_coco(str(root / "coco"), num_images=4, bad=6)
    val = write_tiny_coco(str(root / "coco_val"), num_images=2, first_id=50)
    write_image_folder(str(root / "imgs"), num_images=4)
    write_tiny_sa1b(root / "sa1b", num_shards=1, images_per_shard=2, size=96, fmt="tar")
    (root / "mix.yaml").write_text(
        "sources:\n"
        "  - {name: sa, format: sa1b, data: sa1b, weight: 2}\n"
        f"  - {{name: cells, format: coco, ann_file: {coco['ann_file']}, "
        f"img_dir: {coco['img_dir']}, weight: 1}}\n"
        "  - {name: raw, format: images, data: imgs, weight: 1}\n")
    return {"root": root, "coco": coco, "val": val}


def _source_args(sets, kind):
    if kind == "coco":
        return ["--data-format", "coco", "--ann-file", sets["coco"]["ann_file"], "--img-dir",
                sets["coco"]["img_dir"]]
    if kind == "images":
        return ["--data-format", "images", "--data", str(sets["root"] / "imgs")]
    return ["--data-format", "mixture", "--mixture", str(sets["root"] / "mix.yaml")]


def _argv(ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs", "distill_b_t.yaml"), "--model", "tiny_bl",
            "--data-fraction", "1", "--sam-checkpoint", ckpt, "--output-dir", str(out),
            "--img-size", "64", "--num-workers", "0", "--log-every", "1", "--no-progress",
            "--val-every", "0", "--masks-per-image", "8", "--batch-size", "2",
            "--max-steps", "2", "--warmup-steps", "0", *extra]


def _train(argv):
    from train_checks import train

    from blsam.tools.train import parse_args

    return train(parse_args(argv))


def _cli(argv, capsys):
    from blsam.tools.train import cli

    rc = cli(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def _same_weights(a, b):
    from blsam.checkpoint import read_state_dict

    sa, sb = read_state_dict(a), read_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["coco", pytest.param("images", marks=pytest.mark.slow),
                                  pytest.param("mixture", marks=pytest.mark.slow)])
def test_source_trains_two_steps_and_resumes_bit_exact(sets, kind, tiny_sam_ckpt, tmp_path):
    src = _source_args(sets, kind)
    full = _train(_argv(tiny_sam_ckpt, tmp_path / "a", *src))
    part = _train(_argv(tiny_sam_ckpt, tmp_path / "b", *src, "--stop-after", "1"))
    assert part["stopped"]
    resumed = _train(_argv(tiny_sam_ckpt, tmp_path / "b", *src, "--resume", "auto"))
    assert _same_weights(tmp_path / "a" / "final.pth", tmp_path / "b" / "final.pth")
    assert [h["loss"] for h in resumed["history"]] == [full["history"][1]["loss"]]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    sel, counts = summary["selection"], summary["data_counts"]
    assert summary["run"]["data_format"] == kind and summary["run"]["source"]["format"] == kind
    if kind == "coco":  # bad annotations: counted (5 by the file check, 1 when decoded)
        assert sel["annotations"]["bad"] == 5 and sel["crowd_objects"] == 3
        assert sel["crowd_rule"] == "not used as prompts" and sel["images"] == 4
        assert counts["bad_ann"] >= 1 and summary["run"]["supervised"] is True
    if kind == "images":  # feature distillation only, and it says so
        assert sel["supervised"] is False and summary["run"]["supervised"] is False
        for h in full["history"]:
            assert h["loss_mask"] == h["loss_iou"] == 0.0
            assert h["loss"] == pytest.approx(2.5 * h["loss_fd"])
    if kind == "mixture":
        assert [s["samples_per_epoch"] for s in sel["sources"]] == [5, 3, 2]
        assert sum(counts["samples_by_source"].values()) == 4


def test_mixture_shares_match_weights_ranks_disjoint_and_pure():
    assert allocate([0.8, 0.2], 10) == [8, 2] and allocate([1, 1, 1], 10) == [4, 3, 3]
    sizes, weights = [50, 7, 20], [0.6, 0.3, 0.1]
    s = MixtureBatchSampler(sizes, weights, batch_size=4, world_size=1, seed=3,
                            epoch_size=1000)
    for epoch in (0, 1):
        order = s.epoch_order(epoch)
        member = [s.member_of(i) for i in order]
        assert [member.count(k) for k in range(3)] == [600, 300, 100]
        for k, n in enumerate(sizes):  # a member's images come equally often (+-1)
            uses = [order.count(s.offsets[k] + i) for i in range(n)]
            assert max(uses) - min(uses) <= 1
    assert s.epoch_order(0) != s.epoch_order(1)
    ranks = [MixtureBatchSampler(sizes, weights, 4, r, 3, seed=3, epoch_size=1000)
             for r in range(3)]
    again = MixtureBatchSampler(sizes, weights, 4, 1, 3, seed=3, epoch_size=1000)
    assert again.rank_indices(2) == ranks[1].rank_indices(2)  # a pure function
    per_rank = [r.rank_indices(0) for r in ranks]
    order = ranks[0].epoch_order(0)
    padded = (order * 2)[:ranks[0].per_rank * 3]
    assert sorted(p for r in range(3) for p in range(r, len(padded), 3)) == list(
        range(len(padded)))  # ranks take disjoint positions of one order
    assert [padded[r::3] for r in range(3)] == per_rank
    ranks[1].set_position(0, 5)  # resume in the middle of an epoch
    assert list(ranks[1])[0] == [(0, i) for i in per_rank[1][20:24]]
    manual = [0, 0, 0]
    for e, limit in ((0, None), (1, 40)):  # one whole epoch, then 10 batches of 4 per rank
        for r in ranks:
            for i in r.rank_indices(e)[:limit]:
                manual[r.member_of(i)] += 1
    assert ranks[0].seen(1, 10) == manual and sum(manual) == 3 * ranks[0].per_rank + 3 * 40


def test_option_mistakes_are_one_line_exit_2(sets, tiny_sam_ckpt, tmp_path, capsys,
                                             monkeypatch):
    import blsam.train.run as loop

    class NoModels(dict):
        def __getitem__(self, name):
            raise AssertionError("a model was built for a refused run")

    monkeypatch.setattr(loop, "blsam_model_registry", NoModels())
    coco, root = sets["coco"], sets["root"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")

    def mix(text):
        p = tmp_path / f"m{abs(hash(text))}.yaml"
        p.write_text(text)
        return ["--data-format", "mixture", "--mixture", str(p)]

    bad = {
        "needs --ann-file": ["--data-format", "coco", "--img-dir", coco["img_dir"]],
        "needs --img-dir": ["--data-format", "coco", "--ann-file", coco["ann_file"]],
        "--ann-file '/nope.json': no such file": ["--data-format", "coco", "--ann-file",
                                                  "/nope.json", "--img-dir", coco["img_dir"]],
        "holds no images": ["--data-format", "images", "--data", str(tmp_path / "empty")],
        "invalid choice: 'voc'": ["--data-format", "voc"],
        "sum to 0": mix(f"sources:\n  - {{format: images, data: {root}/imgs, weight: 0}}\n"),
        "weight must be >= 0": mix(f"- {{format: images, data: {root}/imgs, weight: -1}}\n"
                                   f"- {{format: images, data: {root}/imgs, weight: 2}}\n"),
        "format 'voc'": mix(f"- {{format: voc, data: {root}/imgs}}\n"),
        "needs --mixture": ["--data-format", "mixture"],
        "--lambda-fd 0 would leave no loss": _source_args(sets, "images") + ["--lambda-fd", "0"],
        "--trainable image_encoder": _source_args(sets, "images") + ["--trainable", "all"],
        "need --data-format coco": ["--data", str(root / "sa1b"), "--ann-file",
                                    coco["ann_file"]],
        "--shards is for sa1b": _source_args(sets, "coco") + ["--shards", "sa_000000"],
        "validation needs labelled": _source_args(sets, "images") + ["--val-every", "5"],
        "--init-checkpoint '/nope.pth'": _source_args(sets, "coco") + ["--init-checkpoint",
                                                                      "/nope.pth"],
    }
    for want, extra in bad.items():
        rc, lines, err = _cli(_argv(tiny_sam_ckpt, tmp_path / "o", *extra), capsys)
        assert rc == 2 and len(lines) == 1 and want in lines[0], (want, err)
        assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


def test_teacher_cache_is_tied_to_its_source(sets, tiny_sam_ckpt, tmp_path, capsys):
    from blsam.tools.cache_teacher import cli as cache_cli

    cache = tmp_path / "cache"
    common = ["--model", "tiny_bl", "--sam-checkpoint", tiny_sam_ckpt, "--img-size", "64",
              "--num-workers", "0", "--data-fraction", "1"]
    assert cache_cli([*_source_args(sets, "coco"), *common, "--output", str(cache)]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["source"]["format"] == "coco" and sum(p["count"] for p in index["parts"]) == 4
    out = _train(_argv(tiny_sam_ckpt, tmp_path / "ok", *_source_args(sets, "coco"),
                       "--teacher-cache", str(cache), "--max-steps", "1"))
    assert out["teacher_built"] is False and out["teacher_images_computed"] == 0
    rc, lines, _ = _cli(_argv(tiny_sam_ckpt, tmp_path / "no", *_source_args(sets, "images"),
                              "--teacher-cache", str(cache)), capsys)
    assert rc == 2 and "made for another source (coco" in lines[0] and "images" in lines[0]
    rc = cache_cli([*_source_args(sets, "images"), *common, "--output", str(cache)])
    assert rc == 2 and "source=" in capsys.readouterr().err


def test_domain_recipe_init_checkpoint_decoder_only_val_on_coco_json(sets, tiny_sam_ckpt,
                                                                     tmp_path, capsys):
    """Start from a trained bLViT-SAM, train prompt encoder + mask decoder on a COCO export,
    validate on a held-out COCO json; the encoder stays the checkpoint's, the teacher SAM."""
    from blsam import blsam_model_registry
    from blsam.checkpoint import read_state_dict
    from blsam.testing import randomize_

    init = tmp_path / "trained_bl.pth"
    torch.save(randomize_(blsam_model_registry["tiny_bl"](img_size=64), seed=7).state_dict(),
               init)
    val = sets["val"]
    out = _train(_argv(tiny_sam_ckpt, tmp_path / "ft", *_source_args(sets, "coco"),
                       "--init-checkpoint", str(init), "--trainable",
                       "prompt_encoder,mask_decoder", "--val-every", "2", "--val-ann-file",
                       val["ann_file"], "--val-img-dir", val["img_dir"], "--val-images", "2"))
    assert len(out["run"]["init_checkpoint_sha256"]) == 64 and out["teacher_built"]
    assert out["val_history"][-1]["images"] == 2 and out["val_history"][-1]["masks"] > 0
    a, b = read_state_dict(init), read_state_dict(tmp_path / "ft" / "final.pth")
    enc = [k for k in a if k.startswith("image_encoder.")]
    dec = [k for k in a if k.startswith("mask_decoder.")]
    assert all(torch.equal(a[k], b[k]) for k in enc)
    assert not all(torch.equal(a[k], b[k]) for k in dec)
    rc, lines, _ = _cli(_argv(tiny_sam_ckpt, tmp_path / "x", *_source_args(sets, "coco"),
                              "--init-checkpoint", tiny_sam_ckpt), capsys)
    assert rc == 2 and "--init-checkpoint" in lines[0]


def test_mixed_batch_supervises_only_its_labelled_images(tiny_sam_ckpt):
    """An image without masks (a folder image in a mixture) adds no prompt: the supervised
    loss of [labelled, unlabelled] is the labelled image's alone; the feature loss covers
    both."""
    from blsam import blsam_model_registry
    from blsam.train.data import collate
    from blsam.train.distill import DistillModel
    from blsam.train.sources.build import open_source
    from blsam.train.sources.spec import SourceSpec

    root = os.path.join(os.path.dirname(tiny_sam_ckpt), "mixed")
    coco = write_tiny_coco(os.path.join(root, "coco"), num_images=1)
    write_image_folder(os.path.join(root, "imgs"), num_images=1)
    kw = dict(img_size=64, masks_per_image=3, prompt_types=["box"], seed=0)
    lab = open_source(SourceSpec("coco", ann_file=coco["ann_file"], img_dir=coco["img_dir"]),
                      0).dataset(**kw)[(0, 0)]
    unl = open_source(SourceSpec("images", os.path.join(root, "imgs")), 0).dataset(**kw)[(0, 0)]
    assert unl.get("masks") is None and lab["masks"].shape[0] == 3
    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=64).eval()
    model = DistillModel(sam, 2.5)
    both, alone = collate([lab, unl]), collate([lab])
    with torch.no_grad():
        teacher = torch.randn(2, 256, 4, 4)
        out2 = model(both["image"].float(), both, teacher)
        out1 = model(alone["image"].float(), alone, teacher[:1])
    assert out2["n_masks"].item() == out1["n_masks"].item() == 3
    for k in ("loss_mask", "loss_iou", "iou"):
        torch.testing.assert_close(out2[k], out1[k], rtol=1e-5, atol=1e-6)


def test_unreadable_images_are_replaced_and_counted_and_coco_holds_out_val(sets, tmp_path):
    from blsam.tools.train import parse_args
    from blsam.train.config import TrainConfig
    from blsam.train.sources.build import open_source, training_data
    from blsam.train.sources.spec import SourceSpec

    root = tmp_path / "imgs"
    paths = write_image_folder(str(root), num_images=3)
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(data[: len(data) // 2])  # truncated
    ds = open_source(SourceSpec("images", str(root)), 0).dataset(img_size=64)
    bad = [r.key for r in ds.records if r.path == paths[0]][0]
    i = [r.key for r in ds.records].index(bad)
    s = ds[(0, i)]
    assert s["skipped"] == [paths[0]] and s["key"] != bad
    # a coco run without --val-ann-file validates on the file's images outside its subset
    args = parse_args(_argv("x", tmp_path / "o", *_source_args(sets, "coco"), "--data-fraction",
                            "0.5", "--val-every", "1", "--val-images", "5"))
    d = training_data(TrainConfig.from_options(vars(args)), 0, 1, "tiny_vit")
    train_keys = {r.key for r in d.records}
    val_keys = {r.key for r in d.val_ds.records}
    assert len(train_keys) == 2 and len(val_keys) == 2 and not train_keys & val_keys
    assert d.val_ds.val and d.val_ds.teacher_cache is None
