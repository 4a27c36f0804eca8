from setuptools import find_packages, setup

_TRAIN = ["pyyaml", "tqdm", "tensorboard", "scikit-image", "opencv-python-headless", "pillow"]
_EVAL = ["pyyaml", "tqdm", "pycocotools", "lvis", "opencv-python-headless", "matplotlib",
         "scikit-image", "pillow"]
_BENCH = ["matplotlib", "onnx", "onnxruntime", "scikit-image", "opencv-python-headless"]

setup(
    name="blsam",
    version="0.1.0",
    description="big.LITTLE Vision Transformer image encoders for Segment Anything",
    license="Apache-2.0",
    # torch 2.14 (the pinned, tested version) supports Python >= 3.10
    python_requires=">=3.10",
    packages=find_packages(include=["blsam", "blsam.*"]),
    # the encoder alone: build, load checkpoints, run in SamPredictor
    install_requires=["torch>=2.1", "torchvision", "segment-anything", "numpy"],
    extras_require={
        "train": _TRAIN,
        "eval": _EVAL,
        "bench": _BENCH,
        "all": sorted(set(_TRAIN + _EVAL + _BENCH)),
        "dev": sorted(set(_TRAIN + _EVAL + _BENCH + ["pytest", "ruff"])),
    },
    entry_points={
        "console_scripts": [
            "blsam-train=blsam.tools.train:cli",
            "blsam-eval=blsam.tools.zero_shot:cli",
            "blsam-cache-teacher=blsam.tools.cache_teacher:cli",
            "blsam-routing=blsam.tools.visualize_routing:cli",
            "blsam-demo=blsam.tools.demo:cli",
            "blsam-make-tiny-sa1b=blsam.tools.make_tiny_sa1b:cli",
            "blsam-estimate-train-memory=blsam.tools.estimate_train_memory:cli",
            "blsam-benchmark=blsam.tools.benchmark:cli",
            "blsam-export-onnx=blsam.tools.export_onnx:cli",
            "blsam-benchmark-train=blsam.tools.benchmark_train:cli",
            "blsam-specs=blsam.specs:main",
        ],
    },
)
