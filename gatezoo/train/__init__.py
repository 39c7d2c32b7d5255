"""Data pipelines, training loops and command-line entry points (arrive with the models)."""
