"""Writes tests/data/quant_ref.gguf: fp32 inputs and their encodings by the PyPI `gguf` package's own
quantizer (gguf.quants.quantize), so test_gguf.c can check distill's quantizer bit for bit against an
independent implementation. Run: python tests/data/make_quant_ref.py tests/data/quant_ref.gguf"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

rng = np.random.default_rng(2024)
x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 10, size=(8, 1))).astype(np.float32)
x[0, :32] = 0.0                      # all-zero block
x[1, :32] = 1.25                     # constant block
x[2, :32] = np.linspace(-1, 1, 32)   # exact grid values
x[3, 5] = 65504.0 * 2                # beyond fp16 range (inf in F16)
w = gguf.GGUFWriter(sys.argv[1], "quantref")
w.add_tensor("x", x)
for t in (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1):
    q = gguf.quants.quantize(x, t)
    w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=t)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
