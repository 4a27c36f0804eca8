"""Used from SAM's own code and shared as the field shares weights: the SAM registry (as SAM's
scripts/amg.py builds a model), torch.hub, safetensors weights with metadata, the Hub mixin,
packaged configs by name, and the one-line missing-extra rule. Tiny models only (fast tier)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from blsam import CheckpointError, blsam_model_registry
from blsam.testing import randomize_

IMG = 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_trained(tiny_sam_ckpt):
    """A tiny bLViT-SAM with every parameter random (a stand-in for trained weights)."""
    sam = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=IMG)
    return randomize_(sam, seed=3, fusion=True)


@pytest.fixture
def sam_registry():
    """``segment_anything.sam_model_registry`` restored after the test."""
    from segment_anything import sam_model_registry

    before = dict(sam_model_registry)
    yield sam_model_registry
    sam_model_registry.clear()
    sam_model_registry.update(before)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_add_to_sam_registry_covers_the_spec_table(sam_registry):
    import blsam
    from blsam.specs import MODEL_SPECS

    vanilla = {k: sam_registry[k] for k in ("vit_b", "vit_h", "default")}
    names = blsam.add_to_sam_registry()
    assert set(names) == {n for n, s in MODEL_SPECS.items() if s.is_blvit and not s.test_only}
    assert {"b_t", "h_b"} <= set(names) and "tiny_bl" not in sam_registry
    assert blsam.add_to_sam_registry() == names  # idempotent
    assert all(sam_registry[k] is v for k, v in vanilla.items())  # SAM's own entries untouched
    sam_registry["b_t"] = lambda checkpoint=None: None  # someone else's entry is not replaced
    with pytest.raises(ValueError, match="from elsewhere"):
        blsam.add_to_sam_registry()


def test_sam_amg_script_lines_with_a_blsam_model(sam_registry, tiny_sam_ckpt, photo, tmp_path):
    """SAM's scripts/amg.py after ``import blsam; blsam.add_to_sam_registry()``: its model line,
    its generator call and both output modes (masks as PNGs, COCO RLE as JSON)."""
    import cv2
    from segment_anything import SamAutomaticMaskGenerator

    import blsam

    blsam.add_to_sam_registry(include_test_models=True)
    sam = sam_registry["tiny_bl"](checkpoint=tiny_sam_ckpt)  # amg.py: an official SAM file
    _ = sam.to(device="cpu")
    key = "image_encoder.blocks.0.attn.qkv.weight"  # a P-block weight, from the SAM file
    sam_sd = torch.load(tiny_sam_ckpt, weights_only=True)
    assert sam.image_encoder.img_size == 1024 and torch.equal(sam.state_dict()[key], sam_sd[key])
    # the mask generation below at 256 px: the fast tier's budget (at 1024 it takes ~10 s)
    sam = sam_registry["tiny_bl"](checkpoint=tiny_sam_ckpt, img_size=IMG)
    image = cv2.cvtColor(cv2.cvtColor(photo[::4, ::4].copy(), cv2.COLOR_RGB2BGR),
                         cv2.COLOR_BGR2RGB)
    for output_mode in ("binary_mask", "coco_rle"):
        generator = SamAutomaticMaskGenerator(sam, output_mode=output_mode, points_per_side=4,
                                              pred_iou_thresh=0.0, stability_score_thresh=0.0)
        masks = generator.generate(image)
        assert masks and all("segmentation" in m for m in masks)
        if output_mode == "binary_mask":
            for i, m in enumerate(masks):
                assert cv2.imwrite(str(tmp_path / f"{i}.png"), m["segmentation"] * 255)
        else:
            (tmp_path / "out.json").write_text(json.dumps(masks))
            assert set(masks[0]["segmentation"]) == {"size", "counts"}


def test_sam_registry_tells_trained_from_sam_checkpoints(sam_registry, tiny_trained, tmp_path):
    import blsam
    from blsam.weights import save_weights

    blsam.add_to_sam_registry(include_test_models=True)
    pth, st = tmp_path / "trained.pth", tmp_path / "trained.safetensors"
    torch.save(tiny_trained.state_dict(), pth)
    save_weights(tiny_trained, st, "tiny_bl", 0.25, IMG)
    for path in (pth, st):
        loaded = sam_registry["tiny_bl"](checkpoint=str(path), img_size=IMG)
        assert _same_weights(loaded, tiny_trained), path
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        sam_registry["tiny_bl"](checkpoint=str(tmp_path / "junk.pth"))


def test_safetensors_round_trip_and_metadata(tiny_trained, tmp_path):
    from blsam.weights import is_safetensors, read_metadata, save_weights

    path = save_weights(tiny_trained, tmp_path / "w.safetensors", "tiny_bl", 0.5, IMG)
    meta = read_metadata(path)
    assert (meta["blsam_model"], meta["keep_ratio"], meta["img_size"]) == ("tiny_bl", "0.5", "256")
    assert is_safetensors(path) and not is_safetensors(__file__)
    loaded = blsam_model_registry["tiny_bl"](checkpoint=path, img_size=IMG)
    assert _same_weights(loaded, tiny_trained)
    with pytest.raises(CheckpointError, match="holds a 'tiny_bl' model"):
        blsam_model_registry["tiny_vit"](checkpoint=path, img_size=IMG)
    with pytest.raises(CheckpointError, match="pass img_size=256"):
        blsam_model_registry["tiny_bl"](checkpoint=path, img_size=512)
    data = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read|is not"):
        blsam_model_registry["tiny_bl"](checkpoint=tmp_path / "cut.safetensors", img_size=IMG)


def test_hub_mixin_round_trip_offline(tiny_trained, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from blsam.hub import BLViTSam

    hub = BLViTSam.wrap(tiny_trained, "tiny_bl", keep_ratio=0.5, img_size=IMG)
    hub.save_pretrained(tmp_path / "repo")
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config == {"model": "tiny_bl", "keep_ratio": 0.5, "img_size": IMG,
                      "skip_padding": False}
    loaded = BLViTSam.from_pretrained(str(tmp_path / "repo"))
    assert loaded.image_encoder.keep_ratio == 0.5 and _same_weights(loaded, tiny_trained)
    via_registry = blsam_model_registry["tiny_bl"](
        checkpoint=tmp_path / "repo" / "model.safetensors", img_size=IMG)
    assert _same_weights(via_registry, tiny_trained)


def test_hubconf_local_entries(tiny_sam_ckpt):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(ROOT, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {k for k in dir(hubconf) if callable(getattr(hubconf, k)) and not k.startswith("_")}
    assert entries - {"Callable"} == set(blsam_model_registry)
    torch.manual_seed(1)  # E-blocks and predictors start random: the same draw for both
    sam = torch.hub.load(ROOT, "tiny_bl", source="local", sam_checkpoint=tiny_sam_ckpt,
                         img_size=IMG)
    torch.manual_seed(1)
    ref = blsam_model_registry["tiny_bl"](sam_checkpoint=tiny_sam_ckpt, img_size=IMG)
    assert _same_weights(sam, ref)


def test_export_weights_tool(tiny_trained, tmp_path, capsys):
    from blsam.tools.export_weights import cli

    ckpt = tmp_path / "final.pth"
    torch.save({"model": tiny_trained.state_dict(), "step": 1}, ckpt)
    out = tmp_path / "w.safetensors"
    assert cli(["--model", "tiny_bl", "--checkpoint", str(ckpt), "--img-size", str(IMG),
                "--output", str(out)]) == 0
    assert _same_weights(blsam_model_registry["tiny_bl"](checkpoint=out, img_size=IMG),
                         tiny_trained)
    assert cli(["--model", "tiny_bl", "--checkpoint", str(ckpt), "--output", "x.pth"]) == 2
    assert "*.safetensors" in capsys.readouterr().err


def test_packaged_configs_by_name(tmp_path, monkeypatch):
    from blsam.utils import config as C

    want = os.path.join(C.PACKAGED_CONFIGS, "distill_b_t.yaml")
    monkeypatch.chdir(tmp_path)  # outside the source tree: configs/ is not here
    for name in ("distill_b_t", "distill_b_t.yaml", "configs/distill_b_t.yaml"):
        assert C.resolve_config(name) == want
    assert C.load_yaml_config("distill_b_t")["model"] == "b_t"
    (tmp_path / "pkg" / "table2").mkdir(parents=True)
    (tmp_path / "pkg" / "table2" / "b_t.yaml").write_text("model: b_t\n")
    monkeypatch.setattr(C, "PACKAGED_CONFIGS", str(tmp_path / "pkg"))
    assert C.resolve_config("table2/b_t").endswith(os.path.join("table2", "b_t.yaml"))
    with pytest.raises(C.ConfigError, match=r"does not exist.*packaged: table2/b_t$"):
        C.resolve_config("nope")
    with pytest.raises(C.ConfigError):
        C.resolve_config("../pkg/table2/b_t")


def test_missing_extra_is_one_line(monkeypatch, capsys):
    from blsam.utils import cli as U

    monkeypatch.setitem(U.EXTRAS, "fake", {"fake-pkg": "no_such_module_blsam"})
    ran = []
    assert U.run_cli(lambda: ran.append(1), extra="fake", argv=[]) == 2
    err = capsys.readouterr().err
    assert not ran and err.count("\n") == 1 and 'pip install "blsam[fake]"' in err
    assert U.run_cli(lambda: ran.append(1), extra="fake", argv=["--help"]) == 0 and ran

    def imports_it() -> None:
        import no_such_module_blsam  # noqa: F401

    assert U.run_cli(imports_it, extra="fake", argv=["-h"]) == 2
    assert 'blsam[fake]' in capsys.readouterr().err


def test_extras_table_matches_setup():
    from importlib import metadata

    from blsam.extras import SCRIPTS, extras_require

    assert {"train", "eval", "bench", "demo", "onnx", "hub", "all", "dev"} <= set(
        extras_require())
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
           if ep.name.startswith("blsam-")}
    if not eps:
        pytest.skip("blsam is not pip-installed in this environment")
    assert all(eps.get(name, entry) == entry for name, (entry, _) in SCRIPTS.items())
