"""The `kd` command and its tools: plan, bench, tune, select."""
