"""Teacher stages: responses under each priming strategy, and the teacher's logits on them."""
