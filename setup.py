import os

from setuptools import find_packages, setup

# one table of extras and console scripts, shared with blsam.utils.cli (read without importing
# blsam: that would import torch)
_META: dict = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "blsam", "extras.py")) as f:
    exec(f.read(), _META)

setup(
    name="blsam",
    version="0.1.0",
    description="big.LITTLE Vision Transformer image encoders for Segment Anything",
    license="Apache-2.0",
    # torch 2.14 (the pinned, tested version) supports Python >= 3.10
    python_requires=">=3.10",
    packages=find_packages(include=["blsam", "blsam.*"]),
    # training and evaluation configs, found by name (--config distill_b_t) from a wheel
    package_data={"blsam": ["configs/*.yaml", "configs/*/*.yaml"]},
    # the encoder alone: build, load checkpoints, run in SamPredictor
    # safetensors: the shared-weights format (small, no dependencies of its own), so a published
    # .safetensors loads with a plain install
    install_requires=["torch>=2.1", "torchvision", "segment-anything", "numpy", "safetensors"],
    extras_require=_META["extras_require"](),
    entry_points={
        "console_scripts": [f"{name}={entry}" for name, (entry, _) in _META["SCRIPTS"].items()],
    },
)
