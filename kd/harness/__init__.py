"""Reproducibility machinery: kd repro, verify, invalidation, code deps and the DVC project."""
