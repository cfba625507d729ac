"""ONNX / TensorRT engines and service files. Built in its own issue; nothing here yet."""
