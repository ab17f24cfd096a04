"""muxtune.specs: the user contract (job spec v1): schema, loading, validation, overrides."""

from .errors import SpecError
from .parse import job_spec_to_dict, load_job_spec, parse_job_spec
from .schema import (
    DATA_FORMATS,
    DEVICES,
    DTYPES,
    PEFT_METHODS,
    SCHEDULES,
    ClusterSpec,
    DataSpec,
    JobSpec,
    PeftSpec,
    ScheduleSpec,
    TaskSpec,
)

__all__ = [
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
