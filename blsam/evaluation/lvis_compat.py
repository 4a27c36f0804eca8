"""Make the ``lvis`` API (0.5.3) usable on NumPy 2.

Why: ``lvis/eval.py`` calls ``np.float``, an alias NumPy removed in 1.24, so ``LVISEval.run()``
crashes in ``accumulate``. The package is unmaintained, so instead of patching site-packages we
restore the removed aliases (to the builtins they always meant) before ``lvis`` is used. Every
caller must import LVIS through this module.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

_REMOVED_ALIASES = {"float": float, "int": int, "bool": bool, "object": object, "complex": complex,
                    "str": str}


def ensure_numpy_aliases() -> None:
    """Re-add NumPy's removed builtin aliases (``np.float`` ...) if this NumPy lacks them."""
    for name, value in _REMOVED_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def import_lvis() -> tuple[type, type, type]:
    """(LVIS, LVISResults, LVISEval), importable and runnable on NumPy 1 and 2."""
    ensure_numpy_aliases()
    from lvis import LVIS, LVISEval, LVISResults

    return LVIS, LVISResults, LVISEval


def lvis_from_dict(dataset: dict[str, Any], copy_data: bool = True) -> Any:
    """An ``LVIS`` object from an in-memory dataset dict (``LVIS()`` only reads files).
    ``copy_data=False`` adopts ``dataset`` (LVISEval rewrites its segmentations in place)."""
    LVIS, _, _ = import_lvis()
    obj = LVIS.__new__(LVIS)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = copy.deepcopy(dataset) if copy_data else dataset
    obj._create_index()
    return obj
