"""TensorRT engines from loraq's exports: input-shape profiles and trtexec lines (shapes.py, no
TensorRT needed) and the Polygraphy build / run / timing (trt.py, TensorRT imported lazily)."""
