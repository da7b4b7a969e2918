"""Running an exported artifact after export (e.g. an ONNX Runtime session with swappable LoRA adapters)."""
