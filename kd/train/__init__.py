"""Training a LoRA student: examples, the KD loss, the loop, QLoRA, sharding and curves."""
