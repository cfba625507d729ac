"""Benchmarks behind ``rtdecode bench``: commands that print measured figures, never pass/fail tests."""
