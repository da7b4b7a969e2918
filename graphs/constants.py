"""The ONNX-side facts every graphs module shares, written once.

``graphs`` knows nothing of torch or calibless; where a value must equal calibless' (the
activation-scale floor, the group sizes), tests/test_constants.py checks the two agree.
"""
import ml_dtypes
import numpy as np

# Protobuf cannot serialize a message over 2 GiB: a model above this goes to disk with its
# weights in an external data file (ONNX "external data"; https://onnx.ai/onnx/repo-docs/ExternalData.html).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# INT4 / UINT4 tensors and QuantizeLinear / DequantizeLinear with block_size need opset 21.
OPSET = 21

# The floor of dynamic activation scales (an all-zero token quantizes to zeros, not NaN); the
# torch reference uses the same value (calibless.quant.ACT_SCALE_EPS), so both agree op for op.
ACT_SCALE_EPS = 1e-8

GEMMS = ("MatMul", "Gemm")
INT4_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))
INT8_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))

# What ONNX Runtime's MatMulNBits takes as a block size: a power of two from 16 to 256.
MATMULNBITS_BLOCK_SIZES = (256, 128, 64, 32, 16)

# TensorRT's INT4 block sizes ("The supported block sizes are {64, 128}": TensorRT developer guide,
# "Working with Quantized Types", block quantization; INT4 is weight-only and blocked only).
TRT_INT4_BLOCK_SIZES = (128, 64)

# The placeholder node torch.onnx emits for each quantized Linear; write_qdq replaces it.
PLACEHOLDER_DOMAIN = "loraq"
PLACEHOLDER_OP = "LayerPlaceholder"

# How the writer names the branch factors' codes initializers ('{layer}.down_q', '{layer}.up_q'):
# checks and legalizers tell a branch factor from a main weight by these suffixes.
BRANCH_SUFFIXES = (".down_q", ".up_q")
MAIN_WEIGHT_SUFFIX = ".weight_q"
# fuse_down stacks the weights of MatMuls that read one input, main weight first, as
# '{layer}.weight_down_q': 8-bit codes under this name hold a main weight too.
STACKED_MAIN_WEIGHT_SUFFIX = ".weight_down_q"

# TensorRT's static activation scales: batches of example inputs in the data-free calibration.
CALIBRATION_BATCHES = 4

# LoRA adapter-slot initializers (graphs/qdq.py, graphs/lora_slots.py): '<layer>.lora_down', '<layer>.lora_up'
LORA_SLOT_SUFFIXES = (".lora_down", ".lora_up")
