"""torch -> QDQ ONNX: placeholder export, layer specs for the writer, validation, the deployable graph."""
