"""Trident: a 3D-parallel LLM pretraining engine (see docs/architecture.md)."""

__version__ = "0.1.0"
