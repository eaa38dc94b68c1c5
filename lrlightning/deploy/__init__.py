"""Deployment files: ONNX export and int8 quantization."""
