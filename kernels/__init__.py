"""Attention kernels behind one registry. No model code lives here."""

from smartdiff.kernels.registry import AttentionBackend, available_backends, get_backend

__all__ = ["AttentionBackend", "available_backends", "get_backend"]
