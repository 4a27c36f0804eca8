"""A fresh venv holding the blsam wheel and ONLY its core dependencies (slow-tier helper).

Why not ``pip install``: that would download torch again. The core packages (``Requires-Dist``
of the wheel without an extra, and their own requirements, transitively) are taken from the
running interpreter's environment: each distribution's top-level files are symlinked into one
folder, which a ``.pth`` file puts on the new venv's path. Nothing else of this environment
(pyyaml, pycocotools, cv2, pytest, ...) is visible there, so a missing extra shows as it would
on a user's machine. Paths derive from ``sys.executable``: it works in any venv (CI's ``.venv``).
"""
from __future__ import annotations

import email
import glob
import os
import subprocess
import sys
import zipfile
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def build_wheel(src: str, out_dir: str) -> str:
    """``pip wheel --no-deps`` of the checkout (no build isolation: no download)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", out_dir, src], check=True, timeout=300)
    (wheel,) = glob.glob(os.path.join(out_dir, "blsam-*.whl"))
    return wheel


def wheel_core_requirements(wheel: str) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` lines that apply without any extra."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.message_from_bytes(z.read(name))
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    return [r for r in reqs if _applies(r)]


def _applies(req: Requirement) -> bool:
    if req.marker is None:
        return True
    env = dict(default_environment(), extra="")
    return req.marker.evaluate(env)


def core_closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Installed distributions ``reqs`` need, transitively (canonical name -> distribution)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(reqs)
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        dist = metadata.distribution(req.name)  # PackageNotFoundError: core dep not installed
        found[key] = dist
        todo.extend(r for r in map(Requirement, dist.requires or []) if _applies(r))
    return found


def link_distributions(dists: dict[str, metadata.Distribution], folder: str) -> set[str]:
    """Symlink every top-level file or folder of ``dists`` into ``folder``; returns the names."""
    os.makedirs(folder, exist_ok=True)
    names: set[str] = set()
    for dist in dists.values():
        base = str(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth") or top in names:
                continue
            target = os.path.join(base, top)
            if os.path.exists(target):
                os.symlink(target, os.path.join(folder, top))
                names.add(top)
    return names


def make_core_venv(wheel: str, root: str) -> str:
    """A venv at ``root`` with the wheel installed and only its core deps visible; returns its
    python."""
    subprocess.run([sys.executable, "-m", "venv", root], check=True, timeout=300)
    py = os.path.join(root, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    core = os.path.join(root, "core-packages")
    link_distributions(core_closure(wheel_core_requirements(wheel)), core)
    with open(os.path.join(site, "blsam-core-deps.pth"), "w") as f:
        f.write(core + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, timeout=300)
    return py
