"""The demo writes its two PNGs (small image size to stay fast)."""
import os

import pytest

from blsam.tools.demo import main, parse_args


def test_demo_writes_overlay_and_routing_map(tmp_path, tiny_sam_ckpt):
    with pytest.warns(UserWarning, match="random weights"):
        main(parse_args(["--model", "tiny_bl", "--img-size", "256",
                         "--output-dir", str(tmp_path / "a")]))
    out = main(parse_args(["--model", "tiny_bl", "--img-size", "256",
                           "--sam-checkpoint", tiny_sam_ckpt, "--point", "200", "150",
                           "--output-dir", str(tmp_path / "b")]))
    for key in ("overlay", "routing_map"):
        assert os.path.getsize(out[key]) > 1000
