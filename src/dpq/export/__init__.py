"""Deployment: the finished model in a real runtime (ONNX Runtime on CPU), its accuracy measured there.

:mod:`.onnx` writes the graph with the trained low-bit codes as they are; :mod:`.evaluate`
measures the exported model (accuracy, agreement with PyTorch, latency, size);
``python -m dpq.export RUN_DIR`` exports a finished run after the fact.
"""

from dpq.export.onnx import ExportError, ExportReport, OnnxOptions, export_onnx, feed, ort_session

__all__ = ["ExportError", "ExportReport", "OnnxOptions", "export_onnx", "feed", "ort_session"]
