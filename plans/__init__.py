"""muxtune.plans: the plan IR shared by compiler and runtime (schema v1), without torch."""

from .errors import PlanError
from .fingerprint import compute_fingerprint, fingerprint_payload
from .instructions import (
    INSTRUCTION_TYPES,
    BuildTasks,
    Checkpoint,
    ExportAdapters,
    ForwardBackward,
    Instruction,
    LoadBackbone,
    Opcode,
    OptimizerStep,
    instruction_to_dict,
)
from .io import dump_plan, load_plan, save_plan
from .schema import (
    SCHEMA_VERSION,
    Alignment,
    ClusterPlan,
    HTask,
    JobSummary,
    Plan,
    Predictions,
    RankProgram,
    TaskPlan,
)
from .serialize import plan_from_dict, plan_to_dict, validate_plan

__all__ = [
    "INSTRUCTION_TYPES",
    "SCHEMA_VERSION",
    "Alignment",
    "BuildTasks",
    "Checkpoint",
    "ClusterPlan",
    "ExportAdapters",
    "ForwardBackward",
    "HTask",
    "Instruction",
    "JobSummary",
    "LoadBackbone",
    "Opcode",
    "OptimizerStep",
    "Plan",
    "PlanError",
    "Predictions",
    "RankProgram",
    "TaskPlan",
    "compute_fingerprint",
    "dump_plan",
    "fingerprint_payload",
    "instruction_to_dict",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "save_plan",
    "validate_plan",
]
