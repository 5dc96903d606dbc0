"""kd-prime: reproducible response-priming knowledge distillation, as a DVC pipeline."""

__version__ = "0.1.0"
