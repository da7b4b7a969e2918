"""graphs: the ONNX side. QDQ writers, graph passes, target legalizers and checkers. No torch."""
