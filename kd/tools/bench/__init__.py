"""`kd bench`: speed and batch-invariance benchmarks."""
