"""As a new user gets it: the README's "Use it like SAM" snippet runs as written, and a wheel
installed into a fresh venv with only the core dependencies runs every console script's
``--help`` without a traceback (a tool whose extra is missing says so in one line, exit 2), the
snippet, and finds the packaged configs by name from outside the source tree.

Slow tier: the snippet builds ``b_t`` and runs it at 1024 px (about 10-20 s on 2 cores), and
the venv test builds a wheel and a venv (tests/core_env.py says how torch is not downloaded).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    """The first ``python`` block under the README's "Use it like SAM" heading."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Use it like SAM", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(argv, cwd, env=None, timeout=600):
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_snippet_is_found():
    code = readme_snippet()
    assert 'blsam_model_registry["b_t"]' in code and "torch.cuda.is_available()" in code
    compile(code, "README.md", "exec")


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path):
    code = readme_snippet() + "\nassert masks.shape == (3, 480, 640) and len(routing) == 4\n"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = _run([sys.executable, "-c", code], tmp_path, env)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import core_env

    root = tmp_path_factory.mktemp("core_venv")
    wheel = core_env.build_wheel(ROOT, str(root / "wheel"))
    return core_env.make_core_venv(wheel, str(root / "venv"))


@pytest.mark.slow
def test_wheel_with_core_dependencies_only(core_venv, tmp_path):
    from blsam.extras import EXTRAS, SCRIPTS

    py = core_venv
    bindir = os.path.dirname(py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    core = set(os.listdir(os.path.join(os.path.dirname(bindir), "core-packages")))
    extra_only = {m for mods in EXTRAS.values() for m in mods.values()} - core  # PIL: torchvision's
    assert {"yaml", "pycocotools", "cv2", "skimage", "huggingface_hub"} <= extra_only
    for module in sorted(extra_only):
        found = _run([py, "-c", f"import importlib.util as u; print(u.find_spec({module!r}))"],
                     tmp_path, env)
        assert found.stdout.strip() == "None", f"{module} is visible in the core venv"
    for name, (_, extra) in SCRIPTS.items():
        proc = _run([os.path.join(bindir, name), "--help"], tmp_path, env, timeout=300)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr)
        if extra is not None:  # a real run stops at once with the one line naming the extra
            proc = _run([os.path.join(bindir, name)], tmp_path, env, timeout=300)
            assert proc.returncode == 2, (name, proc.stderr)
            assert proc.stderr.count("\n") == 1, (name, proc.stderr)
            assert f'pip install "blsam[{extra}]"' in proc.stderr, (name, proc.stderr)
    where = _run([py, "-c", "import blsam, sys; from blsam.utils.config import resolve_config; "
                  "from segment_anything import sam_model_registry as r; "
                  "assert 'b_t' in blsam.add_to_sam_registry() and 'h_b' in r; "
                  "print(blsam.__file__); print(resolve_config('distill_b_t')); "
                  "print(resolve_config('configs/eval_lvis_all.yaml'))"], tmp_path, env)
    assert where.returncode == 0, where.stderr
    pkg, cfg, cfg2 = where.stdout.split()
    assert not pkg.startswith(ROOT) and os.path.isfile(cfg) and os.path.isfile(cfg2)
    assert cfg.startswith(os.path.dirname(pkg)), cfg
    hub = _run([py, "-c", "import blsam.hub"], tmp_path, env)
    assert 'pip install "blsam[hub]"' in hub.stderr, hub.stderr
    snippet = _run([py, "-c", readme_snippet()], tmp_path, env)
    assert snippet.returncode == 0, snippet.stderr
