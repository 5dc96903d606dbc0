"""Batch-invariant greedy decoding and its CPU kernels, shared by the teacher stage and evaluation."""
