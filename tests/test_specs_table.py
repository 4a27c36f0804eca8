"""``blsam-specs --table``: GFLOPs computed (never typed), ordered, the paper's beside."""
from __future__ import annotations

import pytest

from blsam.spec_tables import PAPER_TABLE2_GFLOPS, gflops_table, paper_gflops
from blsam.tools.specs import cli as main


def test_table_orders_by_computed_gflops_and_marks_rows():
    names = ["tiny_bl", "tiny_vit", "tiny_bl_early_prune", "tiny_evit"]
    lines = gflops_table(names, img_size=128).splitlines()
    rows = lines[2:]
    assert [r.split("|")[1].strip(" `") for r in rows] == sorted(
        names, key=lambda n: paper_gflops(n, 128))
    assert all("| – | – |" in r for r in rows)  # no paper numbers for test models


def test_table_b_t_has_paper_number_and_both_roles(capsys):
    assert main(["b_t", "--table"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    cells = [c.strip() for c in row.split("|")]
    ours, paper = float(cells[4]), float(cells[5])
    assert paper == PAPER_TABLE2_GFLOPS["b_t"] and ours == pytest.approx(paper, rel=0.01)
    assert cells[7] == "Table 2; ablation step 4"
