"""Evaluation: metrics and the loops that compute them."""
