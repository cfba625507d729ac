"""Evaluation: the paper's metrics (spec §6), its retrieval protocol and reports."""
