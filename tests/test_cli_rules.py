"""Every tool follows one CLI path (``blsam.utils.cli.run_tool`` / ``run_cli``): the shared
model options are checked before any work, and every user error (a bad option, a
``SystemExit("message")``, a failed export check, a device this machine lacks, a path of the
wrong kind) is one ``error:`` line on stderr and exit 2, never a traceback or silence. One test
per class of bug."""
from __future__ import annotations

import math

import pytest
import torch

from blsam.tools import demo, export_onnx, train, visualize_routing
from blsam.utils.cli import run_cli

TOOLS = {"blsam-demo": demo.cli, "blsam-routing": visualize_routing.cli,
         "blsam-export-onnx": export_onnx.cli}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _one_error_line(capsys: pytest.CaptureFixture, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("opt, value, needle", [
    ("--img-size", "100", "--img-size"), ("--keep-ratio", "1.5", "--keep-ratio"),
    ("--checkpoint", "/no/such.pth", "no such file")])
def test_every_tool_checks_the_model_options_first(tool, opt, value, needle, capsys,
                                                   monkeypatch, tmp_path):
    import blsam

    def no_build(*a, **k):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(blsam, "build_model", no_build)
    monkeypatch.chdir(tmp_path)  # nothing written into the repository if a tool got further
    code = TOOLS[tool](["--model", "tiny_bl", opt, value])
    _one_error_line(capsys, code, needle)


def test_a_system_exit_message_is_printed_not_swallowed(capsys):
    def body() -> None:
        raise SystemExit("the check failed\nbadly")

    _one_error_line(capsys, run_cli(body), "the check failed badly")
    assert run_cli(lambda: (_ for _ in ()).throw(SystemExit(0))) == 0
    assert run_cli(lambda: (_ for _ in ()).throw(SystemExit(3))) == 3


@NO_CUDA
def test_benchmark_devices_cuda_without_cuda_is_one_line(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from blsam.tools import benchmark

    code = benchmark.cli(["--devices", "cuda", "--families", "tiny", "--isolation", "shared",
                          "--output-dir", str(tmp_path)])
    _one_error_line(capsys, code, "--devices cuda: CUDA is not available")


def test_export_accuracy_check_fails_on_nan_and_refuses_atol_nan(capsys, tmp_path,
                                                                 monkeypatch):
    assert export_onnx.accuracy_problem(1e-4, 1e-3) is None
    assert "1e-03" in export_onnx.accuracy_problem(1e-2, 1e-3).replace("0.001", "1e-03")
    assert "NaN" in export_onnx.accuracy_problem(math.nan, 1e-3)
    for atol in ("nan", "inf", "-1"):
        _one_error_line(capsys, export_onnx.cli(["--model", "tiny_bl", "--atol", atol]),
                        "--atol")
    # the whole command: a NaN difference from the check fails it with one line
    monkeypatch.setattr(export_onnx, "export_encoder", lambda *a, **k: None)
    monkeypatch.setattr(export_onnx, "check_encoder",
                        lambda *a, **k: {"max_abs_diff": math.nan, "embedding_abs_max": 1.0})
    code = export_onnx.cli(["--model", "tiny_bl", "--img-size", "64",
                            "--output", str(tmp_path / "e.onnx")])
    _one_error_line(capsys, code, "NaN")


@NO_CUDA
@pytest.mark.parametrize("tool", ["blsam-demo", "blsam-routing"])
def test_device_cuda_without_cuda_is_one_line(tool, capsys):
    _one_error_line(capsys, TOOLS[tool](["--model", "tiny_bl", "--device", "cuda"]),
                    "--device cuda: CUDA is not available")


def test_unknown_device_is_one_line(capsys):
    _one_error_line(capsys, demo.cli(["--model", "tiny_bl", "--device", "gpu7"]), "--device")


def test_data_that_is_not_a_folder_is_one_line(capsys, tmp_path, tiny_sam_ckpt):
    code = train.cli(["--model", "tiny_bl", "--data", "/dev/null", "--sam-checkpoint",
                      tiny_sam_ckpt, "--output-dir", str(tmp_path / "run"), "--device", "cpu"])
    _one_error_line(capsys, code, "/dev/null")
