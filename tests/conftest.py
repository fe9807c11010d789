"""Suite-wide setup. Triton decides compiled vs interpreted when it is first imported, so on machines
without CUDA the interpreter is switched on here, before any test module can import triton. On CPU the
model still uses the torch references unless TRIDENT_KERNELS=triton is set (see engine/kernels/dispatch.py).

It also records which test modules pytest collected, so that tests/test_layout.py can fail when a
``tests/**/test_*.py`` file is never collected (a folder pytest skips, such as ``dist`` or ``build``)."""

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

COLLECTED_MODULES = pytest.StashKey[set]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[COLLECTED_MODULES] = set()


def pytest_itemcollected(item: pytest.Item) -> None:
    # called for every test found, before -m deselects any: a gpu-only module still counts as collected
    item.config.stash[COLLECTED_MODULES].add(pathlib.Path(item.path).resolve())
