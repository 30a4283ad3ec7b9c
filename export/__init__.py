"""itera-export: checkpoint to a validated ONNX bundle."""
