"""Multi-subject MindEye2 pretraining (accelerate + DeepSpeed). Built in its own issue; nothing here yet."""
