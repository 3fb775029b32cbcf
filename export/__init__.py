"""Export of the VAR graphs to ONNX and TensorRT engines: ``python -m export.build --help``."""
