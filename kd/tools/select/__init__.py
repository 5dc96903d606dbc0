"""`kd select`: measured choices behind a profile (instruction targets, training recipe)."""
