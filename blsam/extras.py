"""Optional dependencies, in one table: which pip packages each extra installs, the module each
package provides, and which extra each console script needs.

Why one table with no imports: ``setup.py`` reads it (``exec``, without importing blsam or
torch) to declare ``extras_require`` and ``console_scripts``, and ``blsam.utils.cli.run_cli``
reads it to tell a user with only the core dependencies which extra a command needs, in one
line (``pip install "blsam[eval]"``), instead of a ``ModuleNotFoundError`` traceback.
"""

# extra -> {pip package: top-level module it provides}
EXTRAS = {
    "train": {"pyyaml": "yaml", "tqdm": "tqdm", "tensorboard": "tensorboard",
              "scikit-image": "skimage", "opencv-python-headless": "cv2",
              "pycocotools": "pycocotools", "pillow": "PIL"},
    "eval": {"pyyaml": "yaml", "tqdm": "tqdm", "pycocotools": "pycocotools", "lvis": "lvis",
             "opencv-python-headless": "cv2", "matplotlib": "matplotlib",
             "scikit-image": "skimage", "pillow": "PIL"},
    "bench": {"matplotlib": "matplotlib", "onnx": "onnx", "onnxruntime": "onnxruntime",
              "scikit-image": "skimage", "opencv-python-headless": "cv2", "tqdm": "tqdm"},
    "demo": {"opencv-python-headless": "cv2", "matplotlib": "matplotlib",
             "scikit-image": "skimage"},
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime", "scikit-image": "skimage"},
    "hub": {"huggingface_hub": "huggingface_hub"},
}
DEV = ["pytest", "ruff==0.17.6"]  # pinned: `ruff format --check` in make lint is version-exact

# console script -> (entry point, the extra it needs; None: core dependencies only)
SCRIPTS = {
    "blsam-train": ("blsam.tools.train:cli", "train"),
    "blsam-eval": ("blsam.tools.zero_shot:cli", "eval"),
    "blsam-cache-teacher": ("blsam.tools.cache_teacher:cli", "train"),
    "blsam-routing": ("blsam.tools.visualize_routing:cli", "demo"),
    "blsam-demo": ("blsam.tools.demo:cli", "demo"),
    "blsam-make-tiny-sa1b": ("blsam.tools.make_tiny_sa1b:cli", "train"),
    "blsam-estimate-train-memory": ("blsam.tools.estimate_train_memory:cli", None),
    "blsam-benchmark": ("blsam.tools.benchmark:cli", "bench"),
    "blsam-export-onnx": ("blsam.tools.export_onnx:cli", "onnx"),
    "blsam-export-weights": ("blsam.tools.export_weights:cli", None),
    "blsam-benchmark-train": ("blsam.tools.benchmark_train:cli", "train"),
    "blsam-specs": ("blsam.tools.specs:cli", None),
}


def extras_require():
    """``setup.py``'s ``extras_require``: every extra, ``all`` and ``dev`` (= all + tools)."""
    out = {name: sorted(pkgs) for name, pkgs in EXTRAS.items()}
    out["all"] = sorted({p for pkgs in EXTRAS.values() for p in pkgs})
    out["dev"] = sorted(set(out["all"]) | set(DEV))
    return out
