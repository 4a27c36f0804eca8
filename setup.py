from setuptools import find_packages, setup

setup(
    name="blsam",
    version="0.1.0",
    description="big.LITTLE Vision Transformer image encoders for Segment Anything",
    python_requires=">=3.9",
    packages=find_packages(include=["blsam", "blsam.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "segment-anything",
        "numpy",
        "opencv-python-headless",
        "pycocotools",
        "lvis",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "scikit-image",
    ],
    extras_require={
        "dev": ["pytest", "tensorboard", "onnx", "onnxruntime"],
    },
)
