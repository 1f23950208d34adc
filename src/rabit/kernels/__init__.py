"""The packed RaBiT linear y = sum_i g_i * (B_i @ (h_i * x)) + bias, behind one dispatch.

Entry point: ``rabit_linear(x, packed, g, h, bias, backend="auto", threads=None)``, registered with PyTorch as
the custom operator ``torch.ops.rabit.packed_linear`` (see ``dispatch``). Everything that runs a packed layer
goes through it: ``PackedRaBiTLinear``, the decoders of ``rabit.generate`` and the benchmarks.

Backends
  "reference"  plain PyTorch (unpack the sign planes to +-1, dense matmuls); any device, differentiable. The
               ground truth every fast kernel is tested against.
  "cpu"        native C kernel (lookup tables over 4 inputs, 3 on AVX2; AVX-512/AVX2/scalar picked at run time, OpenMP
               threads); CPU tensors.  Built with the system C compiler on first use.
  "cpu_int8"   the same native kernel with int8 lookup tables for one-row inputs (batch-1 decoding): h * x
               rounded with one scale per 64 inputs (as llama.cpp's Q8_K activations, per 4-input sum); relative
               error ~5e-3, fewer instructions per sign bit, read from a byte-planar copy of the sign planes
               that its prepared call keeps (2x their memory). Several rows run the exact path. Never chosen by
               "auto".
  "triton"     Triton GEMV (decode) / GEMM (prefill) kernels; CUDA tensors, needs ``triton``.

``backend="auto"`` (default) takes ``$RABIT_KERNEL_BACKEND`` if set, else "triton" for CUDA tensors when
available, "cpu" for CPU tensors when the native library builds, and "reference" otherwise (with a one-time
warning when an accelerated backend was expected but is unavailable).  Gradients: when autograd would need to
flow through the call, "auto" uses the reference; an explicitly chosen fast backend computes the forward and the
reference's formula gives the gradients.

The group-quantized linear of a quantized embedding's output head (``--embed-bits``) has its own entry,
``groupwise_linear``: the native kernel ``groupwise_cpu`` for decoding-sized CPU inputs, tested against
``groupwise_linear_reference``.
"""
from __future__ import annotations

from .dispatch import (BACKENDS, ENV_VAR, OP_NAME, available_backends, backend_available, dense_weight,
                       groupwise_linear, rabit_linear, select_backend)
from .reference import dense_weight_reference, groupwise_linear_reference, rabit_linear_reference

__all__ = ["BACKENDS", "ENV_VAR", "OP_NAME", "available_backends", "backend_available", "select_backend",
           "rabit_linear", "dense_weight", "rabit_linear_reference", "dense_weight_reference", "groupwise_linear",
           "groupwise_linear_reference"]
