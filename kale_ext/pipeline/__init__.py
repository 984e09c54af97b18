"""Lightning modules that train a model with an objective (pre-training, fine-tuning)."""
