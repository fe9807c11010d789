"""Trident build: pure-Python packages plus one pybind11 extension for the data-index math.

The extension is built with plain setuptools + pybind11 (not torch's cpp_extension) so pip's isolated
build never pulls a CUDA torch; the index math needs nothing from torch.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "engine.data._index_cpp",
        ["csrc/index.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="trident-engine",
    version="0.1.0",
    description="3D-parallel LLM pretraining engine: ZeRO 1-3 x tensor x pipeline, Triton kernels",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "triton>=3.0",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "safetensors>=0.4",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "hypothesis>=6",
            "ruff>=0.4",
            "tensorboard>=2.10",
            "deepspeed>=0.14",
            "transformers>=4.40",
            "safetensors>=0.4",
            "pyarrow>=12",
            "pybind11>=2.11",
        ],
        "parquet": ["pyarrow>=12"],
        "mpi": ["mpi4py>=3.1"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
