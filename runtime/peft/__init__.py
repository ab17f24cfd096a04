"""PEFT modules in one representation: attachment kinds, hosts around frozen backbone modules,
and the method registry."""

from .attach import attach_task, detach_task, is_anchorable
from .base import AttachmentKind, OperatorHost, OperatorPeftModule, PeftHost
from .lora import LoraConfig, LoraModule
from .registry import (
    METHODS,
    AdapterError,
    AttachContext,
    ExportContext,
    PeftAttachError,
    PeftMethod,
    find_anchors,
    method_of,
    prepare_examples,
)

__all__ = [
    "METHODS",
    "AdapterError",
    "AttachContext",
    "AttachmentKind",
    "ExportContext",
    "LoraConfig",
    "LoraModule",
    "OperatorHost",
    "OperatorPeftModule",
    "PeftAttachError",
    "PeftHost",
    "PeftMethod",
    "attach_task",
    "detach_task",
    "find_anchors",
    "is_anchorable",
    "method_of",
    "prepare_examples",
]
