"""Engines: one interface over torch (eager or compiled), onnxruntime and TensorRT.

An engine runs one GPU stage (a graph with named float32 inputs and outputs, see :mod:`rtdecode.stage_graphs`).
Every backend checks its inputs the same way (:meth:`Signature.check`) and returns float32 tensors on its device, so
the daemon swaps an engine in for a torch module without knowing which backend is behind it. ``onnxruntime`` and
``tensorrt`` are imported only by the backend that needs them.
"""
