"""The pipeline's stages, one small script each; DVC runs them as modules (`python -m stages.<name>`, dvc.yaml) from
the project root, so the `kd` package next to them is the one that runs."""
