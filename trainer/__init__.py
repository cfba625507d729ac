"""Multi-subject MindEye2 pretraining: ``rtdecode pretrain --config trainer/configs/NAME.toml`` (docs/training.md).

Data sources (``data/``), frozen targets (``targets``), the paper's losses and recipe (``losses``, ``recipe``),
the accelerate loop with exact resume (``loop``, ``checkpoints``), per-epoch retrieval (``validation``).
"""
