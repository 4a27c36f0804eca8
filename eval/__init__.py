"""Evaluation scripts (importable for tests)."""
