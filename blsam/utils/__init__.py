"""Small shared helpers for the training, evaluation and benchmark scripts."""
