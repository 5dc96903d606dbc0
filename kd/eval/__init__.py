"""Evaluation: the lm-eval adapter, arms, attention statistics and paired comparisons."""
