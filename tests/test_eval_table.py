"""``--table`` never lies: rows keyed by everything that changes a number, only full default-
protocol runs in the paper's columns, collisions and bad files are one-line errors."""
import json

import pytest

import blsam.tools.zero_shot as zero_shot
from blsam.evaluation.report import CURVE_KIND, TableError, table_markdown
from blsam.evaluation.runner import ProtocolConfig


def _result(value, prompt="point", k=1, dataset="lvis", limit=None, keep=0.25, name="ViT-B",
            model="vit_b", sha="abc123", img_size=1024, missing=0, **proto):
    cfg = ProtocolConfig(prompt=prompt, num_points=k, **proto)
    metrics = {"AP": value} if prompt == "detector" else {"mIoU": value / 100}
    return {"kind": "blsam.zero_shot", "format": 2, "name": name, "model": model,
            "checkpoint": "w.pth", "checkpoint_sha256": sha,
            "keep_ratio": None if model.startswith("vit") else keep, "img_size": img_size,
            "dataset_kind": dataset, "limit": limit, "protocol": cfg.describe(),
            "counts": {"missing_images": missing, "bad_images": 0}, "metrics": metrics,
            "gflops": 372.0}


def _rows(text):
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")][1:]
            for ln in text.splitlines()[2:]}


def _files(tmp_path, results):
    paths = []
    for i, r in enumerate(results):
        p = tmp_path / f"{i:02d}_{r['protocol']['name']}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    return paths


def test_default_oracle_and_center_runs_each_get_their_own_row(tmp_path):
    # issue: the alphabetically last file (the oracle's) filled the "1 point" column
    paths = _files(tmp_path, [_result(50.0), _result(60.0, point_from="center"),
                              _result(70.0, oracle=True)])
    rows = _rows(zero_shot.main(zero_shot.parse_args(["--table", *paths]))["table"])
    assert rows["ViT-B"][1] == "50.0"
    assert rows["ViT-B [center]"][1] == "60.0"
    assert rows["ViT-B [oracle]"][1] == "70.0"
    assert list(rows)[0] == "ViT-B"  # the paper's row first


def test_limit_run_does_not_replace_the_full_run():
    rows = _rows(table_markdown([_result(50.0), _result(99.0, limit=1),
                                 _result(40.0, missing=3, k=3)]))
    assert rows["ViT-B"][1:3] == ["50.0", "–"]
    assert rows["ViT-B [first 1 images]"][1] == "99.0"
    assert rows["ViT-B [3 images skipped]"][2] == "40.0"


def test_coco_and_lvis_ap_are_separate_columns_and_coco_miou_is_labelled():
    rows = _rows(table_markdown([_result(46.5, "detector", dataset="coco"),
                                 _result(44.7, "detector", dataset="lvis"),
                                 _result(55.0, "box", dataset="coco")]))
    assert rows["ViT-B"][4:] == ["46.5", "44.7"]
    assert rows["ViT-B [COCO]"][3] == "55.0"


def test_keep_ratio_img_size_and_checkpoint_split_rows():
    rows = _rows(table_markdown([
        _result(50.0, model="b_t", name="B+T"), _result(51.0, model="b_t", name="B+T", keep=0.5),
        _result(52.0, model="b_t", name="B+T", img_size=64),
        _result(53.0, model="b_t", name="B+T", sha="fff999")]))
    assert rows["B+T (keep 0.5)"][1] == "51.0" and rows["B+T (64 px)"][1] == "52.0"
    assert rows["B+T (abc123)"][1] == "50.0" and rows["B+T (fff999)"][1] == "53.0"


def test_collision_is_an_error_naming_both_files(tmp_path, capsys):
    paths = _files(tmp_path, [_result(50.0), _result(51.0)])
    assert zero_shot.cli(["--table", *paths]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and paths[0] in err[0] and paths[1] in err[0]
    with pytest.raises(TableError, match="both give '1 pt mIoU'"):
        table_markdown([_result(50.0), _result(51.0)])


@pytest.mark.parametrize("content,match", [("not json {", "not a JSON file"),
                                           ("[1, 2]", "not a zero-shot result"),
                                           ('{"kind": "blsam.zero_shot"}', "'name' missing"),
                                           ('{"name": "old", "config": {}}', "need a re-run")])
def test_bad_table_input_is_one_line(content, match, tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(content)
    assert zero_shot.cli(["--table", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {p}") and match in err[0], err


def test_curve_files_are_skipped_with_a_note(tmp_path, capsys):
    paths = _files(tmp_path, [_result(50.0)])
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"kind": CURVE_KIND, "points": []}))
    assert zero_shot.cli(["--table", *paths, str(curve)]) == 0
    out = capsys.readouterr()
    assert "| ViT-B | 372.0 | 50.0 |" in out.out and "curve" in out.err


@pytest.mark.slow  # eight rows through blsam-eval (~14 s): the fast tier stays under 3 minutes
def test_paper_section_has_all_eight_rows_beside_ours(tmp_path):
    from blsam.evaluation.table2 import PAPER_TABLE2
    from blsam.spec_tables import paper_gflops
    from blsam.specs import get_spec

    paths = _files(tmp_path, [_result(50.0)])
    rows = _rows(zero_shot.main(zero_shot.parse_args(["--table", *paths, "--paper"]))["table"])
    names = list(rows)
    assert names[:2] == ["ViT-B", "ViT-B (paper)"] and rows["ViT-B"][1] == "50.0"
    assert rows["ViT-B (paper)"][:5] == ["372.0", "53.6", "65.2", "76.6", "40.2"]
    for model in PAPER_TABLE2:
        name = get_spec(model).display_name
        assert f"{name} (paper)" in rows
        if model != "vit_b":  # no result: our row exists, GFLOPs computed, metrics empty
            ours = rows[f"{name} (ours: no result)"]
            assert ours[0] == f"{paper_gflops(model):.1f}" and set(ours[1:]) == {"–"}
    assert len(rows) == 16
