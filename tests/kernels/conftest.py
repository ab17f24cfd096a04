"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no CUDA device.

`TRITON_INTERPRET=1` must be set before the `@triton.jit` functions are decorated and stays set
for the session, because the interpreter also reads it at launch time. Without CUDA, Triton cannot
run any kernel without it, so keeping it set changes nothing for tests outside this folder (none
of them import Triton, and the dispatcher picks the torch reference for CPU tensors regardless).
With CUDA these tests run the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from muxtune.kernels import lora_triton

    if not lora_triton.INTERPRETED:  # imported earlier in this process without the interpreter
        importlib.reload(lora_triton)
