"""GSM8K: loading, slicing, answer parsing, and the priming prompts."""
