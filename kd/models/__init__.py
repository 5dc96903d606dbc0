"""Model registry, materialising GGUF/hub models into safetensors folders, and loading them."""
