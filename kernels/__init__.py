"""muxtune.kernels: segmented multi-task LoRA (Triton kernels, torch references, dispatch), and
fused CPU kernels for the backbone's element-wise chains and the loss (`cpu_fused`) and for LoRA's
products on bf16 activations (`cpu_lora`), C built at first use by `cpu_build`.

Importing this package never imports Triton; `segmented_lora` loads it on first use.
"""

from .lora_dispatch import (
    BACKEND_ENV,
    BackendError,
    SegmentedLoraFunction,
    chosen_backend,
    configured_backend,
    lora_expand,
    lora_shrink,
    lora_weight_grad,
    segmented_lora,
    segmented_path,
)
from .lora_layout import LoraSlots, SegmentLayout, current_stream_id

__all__ = [
    "BACKEND_ENV",
    "BackendError",
    "LoraSlots",
    "SegmentLayout",
    "SegmentedLoraFunction",
    "chosen_backend",
    "configured_backend",
    "current_stream_id",
    "lora_expand",
    "lora_shrink",
    "lora_weight_grad",
    "segmented_lora",
    "segmented_path",
]
