"""PEFT modules in one representation: attachment kinds, hosts around frozen operators, LoRA."""

from .attach import SUPPORTED_METHODS, TaskPeftConfig, attach_task, detach_task, find_anchors, is_anchorable
from .base import AttachmentKind, OperatorPeftModule, PeftHost
from .lora import LoraConfig, LoraModule

__all__ = [
    "SUPPORTED_METHODS",
    "AttachmentKind",
    "LoraConfig",
    "LoraModule",
    "OperatorPeftModule",
    "PeftHost",
    "TaskPeftConfig",
    "attach_task",
    "detach_task",
    "find_anchors",
    "is_anchorable",
]
