"""params.yaml: the typed schema of every section and the profiles that fill it."""
