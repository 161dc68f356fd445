"""Morph-Tokens (ICML 2024) as a PyTorch Lightning research codebase."""

__version__ = "0.1.0"
