"""The plan fingerprint: what plan and runtime must agree on before replaying anything."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from muxtune.specs import TaskSpec
from muxtune.specs.parse import to_plain

from .schema import Partition, Phase


def fingerprint_payload(
    backbone: Mapping[str, Any], tasks: Sequence[TaskSpec], phases: Sequence[Phase], partition: Partition
) -> dict[str, Any]:
    """The structural content that is hashed: backbone config, each task's PEFT config (in
    plan order), each phase's hTask grouping and the subgraph partition. Hyperparameters such
    as ``lr`` are not part of it."""
    return {
        "backbone": to_plain(dict(backbone)),
        "tasks": [{"name": t.name, "peft": to_plain(t.peft)} for t in tasks],
        "phases": [[{"id": h.id, "tasks": list(h.tasks)} for h in phase.htasks] for phase in phases],
        "partition": to_plain(partition),
    }


def compute_fingerprint(
    backbone: Mapping[str, Any], tasks: Sequence[TaskSpec], phases: Sequence[Phase], partition: Partition
) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no spaces) of `fingerprint_payload`."""
    payload = fingerprint_payload(backbone, tasks, phases, partition)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
