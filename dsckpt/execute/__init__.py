"""Execution: carrying out plans, writing outputs atomically in the supported formats."""
