"""muxtune.specs: the user contract (job spec v1): schema, loading, validation, overrides."""

from .errors import SpecError
from .parse import job_spec_to_dict, load_job_spec, parse_job_spec
from .peft import (
    PEFT_METHODS,
    PEFT_SPECS,
    AdapterSpec,
    BiasSpec,
    IA3Spec,
    LoraSpec,
    PeftSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
)
from .schema import (
    DATA_FORMATS,
    DEVICES,
    DTYPES,
    SCHEDULES,
    ClusterSpec,
    DataSpec,
    JobSpec,
    ScheduleSpec,
    TaskSpec,
)

__all__ = [
    "PEFT_SPECS",
    "AdapterSpec",
    "BiasSpec",
    "IA3Spec",
    "LoraSpec",
    "PrefixTuningSpec",
    "PromptTuningSpec",
    "DATA_FORMATS",
    "DEVICES",
    "DTYPES",
    "PEFT_METHODS",
    "SCHEDULES",
    "ClusterSpec",
    "DataSpec",
    "JobSpec",
    "PeftSpec",
    "ScheduleSpec",
    "SpecError",
    "TaskSpec",
    "job_spec_to_dict",
    "load_job_spec",
    "parse_job_spec",
]
