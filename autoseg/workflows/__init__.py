"""Compositions of training and inference (end-of-training validation)."""
