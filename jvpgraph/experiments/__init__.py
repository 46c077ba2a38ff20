"""Experiments: the paper's models and (later) datasets and training loops."""
