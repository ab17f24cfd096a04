"""PEFT modules in one representation: attachment kinds, hosts around frozen operators, LoRA."""

from .attach import SUPPORTED_METHODS, TaskPeftConfig, attach_task, detach_task, find_anchors
from .base import AnchoredOperator, AttachmentKind, OperatorPeftModule, Segment, SegmentTable
from .lora import LoraConfig, LoraModule

__all__ = [
    "SUPPORTED_METHODS",
    "AnchoredOperator",
    "AttachmentKind",
    "LoraConfig",
    "LoraModule",
    "OperatorPeftModule",
    "Segment",
    "SegmentTable",
    "TaskPeftConfig",
    "attach_task",
    "detach_task",
    "find_anchors",
]
