"""`kd tune`: optuna study over training recipes, chosen on the validation split."""
