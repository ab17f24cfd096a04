"""Partition of a traced backbone graph into subgraphs: backbone compute, PEFT compute, collectives.

The compiler describes a partition as plain data (`PartitionDescription`, written into the plan);
each rank re-traces its model and rebuilds the same partition from that description
(`rebuild_partition`), refusing a model whose graph does not match. `PartitionedGraph` runs the
subgraphs in sequence, holding intermediate values by graph node name.

Terms: a *compute node* is any graph node but placeholders, attribute reads (`get_attr`, copied into
every subgraph that reads them) and the output. Every compute node belongs to exactly one subgraph;
subgraphs are runs of consecutive compute nodes in graph (topological) order. A node's *layer* is
the first integer component of its module path (`model.layers.3.mlp` → 3); nodes outside every
decoder layer count as layer -1 before the first layer (embeddings) and `num_layers` after the last
(final norm, lm_head); glue between two layers belongs to the layer before.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import operator
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from muxtune.common.errors import UserError

from ..peft import is_anchorable

Kind = Literal["backbone", "peft", "collective"]
KINDS: tuple[str, ...] = ("backbone", "peft", "collective")
# A policy gives each compute node a label (group key, subgraph kind); each maximal run of equal
# labels becomes one subgraph of that kind.
Label = tuple[Hashable, Kind]


@dataclass(frozen=True)
class NodeInfo:
    """What a partition policy sees of one compute node."""

    name: str
    kind: Kind
    layer: int


PartitionPolicy = Callable[[Sequence[NodeInfo], int], Sequence[Label]]


@dataclass(frozen=True)
class SubgraphDescription:
    """One subgraph as plain data: the compute nodes `first_node`..`last_node` (`num_nodes` of them,
    in graph order; `digest` hashes their names, ops, targets and arguments), the layers they cover,
    and the names of the values it reads and the values later subgraphs or the graph output read."""

    id: int
    kind: Kind
    layers: tuple[int, int]
    first_node: str
    last_node: str
    num_nodes: int
    digest: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class PartitionDescription:
    """A whole partition as plain data: graph inputs (placeholders) and outputs, subgraphs in order."""

    policy: str
    num_layers: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    subgraphs: tuple[SubgraphDescription, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready form (lists instead of tuples)."""
        return _listify(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionDescription:
        """Inverse of `to_dict`."""
        subgraphs = tuple(
            SubgraphDescription(
                **{
                    **sub,
                    "layers": tuple(sub["layers"]),
                    "inputs": tuple(sub["inputs"]),
                    "outputs": tuple(sub["outputs"]),
                }
            )
            for sub in data["subgraphs"]
        )
        return cls(
            policy=data["policy"],
            num_layers=data["num_layers"],
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            subgraphs=subgraphs,
        )


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_listify(v) for v in value]
    return value


class PartitionMismatchError(UserError):
    """A partition description does not match the graph of the model it is applied to."""


def collective(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `fn` as a collective: its calls (fx leaves, via `torch.fx.wrap`) become `collective`
    subgraphs of their own."""
    fn.__muxtune_collective__ = True
    return fn


def is_collective(target: Any) -> bool:
    """True for functions marked with `collective` and for `torch.distributed` functions."""
    module = getattr(target, "__module__", None) or ""
    return bool(getattr(target, "__muxtune_collective__", False)) or module.startswith("torch.distributed")


def carries_peft(module: nn.Module) -> bool:
    """True for a PEFT host with at least one task's module attached (a host without any is
    plain backbone compute)."""
    return is_anchorable(module) and len(module.adapters) > 0


def fine(nodes: Sequence[NodeInfo], num_layers: int) -> list[Label]:
    """A new subgraph at every change of kind or layer; one subgraph per collective."""
    return [((node.kind, i if node.kind == "collective" else node.layer), node.kind) for i, node in enumerate(nodes)]


def per_layers(n: int) -> PartitionPolicy:
    """Backbone and PEFT compute of `n` consecutive decoder layers in one `backbone` subgraph per
    block; the embeddings and the final norm / lm_head in one subgraph each; one per collective."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_layers needs a positive number of layers, got {n!r}")

    def policy(nodes: Sequence[NodeInfo], num_layers: int) -> list[Label]:
        labels: list[Label] = []
        for i, node in enumerate(nodes):
            if node.kind == "collective":
                labels.append((("collective", i), "collective"))
            elif 0 <= node.layer < num_layers:
                labels.append((("layers", node.layer // n), "backbone"))
            else:
                labels.append((("edge", node.layer), "backbone"))
        return labels

    policy.__name__ = policy.__qualname__ = f"per_layers({n})"
    return policy


def stage_of_layer(first_layers: Sequence[int]) -> Callable[[int], int]:
    """The layer -> pipeline stage map of stages starting at ``first_layers`` (stage s holds
    layers ``first_layers[s]..first_layers[s + 1] - 1``): the embeddings (layer -1) are on stage
    0, what follows the last layer (``num_layers``) on the last stage."""
    starts = tuple(first_layers)

    def stage_of(layer: int) -> int:
        return max(bisect.bisect_right(starts, layer) - 1, 0)

    return stage_of


def per_stage(first_layers: Sequence[int], n: int) -> PartitionPolicy:
    """`per_layers(n)` within each pipeline stage (stage s starts at decoder layer
    ``first_layers[s]``): blocks of at most `n` consecutive layers of one stage, so no subgraph
    crosses a stage boundary; the embeddings (stage 0) and the final norm / lm_head (last stage)
    in one subgraph each; one per collective. Named ``per_stage(0,4,8;n)``."""
    starts = tuple(first_layers)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_stage needs a positive number of layers per block, got {n!r}")
    if not starts or any(isinstance(x, bool) or not isinstance(x, int) for x in starts) or starts[0] != 0:
        raise ValueError(f"per_stage needs the stages' first layers, starting at 0, got {starts!r}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"per_stage needs strictly increasing first layers (every stage holds a layer), got {starts!r}"
        )
    stage_of = stage_of_layer(starts)

    def policy(nodes: Sequence[NodeInfo], num_layers: int) -> list[Label]:
        if starts[-1] >= num_layers:
            raise ValueError(
                f"policy {policy.__name__}: stage {len(starts) - 1} starts at layer {starts[-1]}, "
                f"beyond the model's {num_layers} layers"
            )
        labels: list[Label] = []
        for i, node in enumerate(nodes):
            if node.kind == "collective":
                labels.append((("collective", i), "collective"))
            elif 0 <= node.layer < num_layers:
                stage = stage_of(node.layer)
                labels.append((("layers", stage, (node.layer - starts[stage]) // n), "backbone"))
            else:
                labels.append((("edge", node.layer), "backbone"))
        return labels

    policy.__name__ = policy.__qualname__ = f"per_stage({','.join(map(str, starts))};{n})"
    return policy


@dataclass(frozen=True)
class GraphFacts:
    """What partitioning needs to know of a traced graph."""

    graph_module: torch.fx.GraphModule
    compute: tuple[torch.fx.Node, ...]
    infos: tuple[NodeInfo, ...]
    num_layers: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _module_path(node: torch.fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _layer_of_path(path: str) -> int | None:
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def _node_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Kind:
    if node.op == "call_module" and carries_peft(gm.get_submodule(str(node.target))):
        return "peft"
    if node.op == "call_function" and is_collective(node.target):
        return "collective"
    return "backbone"


def analyze(gm: torch.fx.GraphModule) -> GraphFacts:
    """Compute nodes of `gm` with their kinds and layers, graph inputs and outputs."""
    nodes = list(gm.graph.nodes)
    compute = tuple(n for n in nodes if n.op not in ("placeholder", "get_attr", "output"))
    own = [_layer_of_path(_module_path(n)) for n in compute]
    num_layers = max((layer for layer in own if layer is not None), default=-1) + 1
    layers: list[int] = []
    for i, layer in enumerate(own):
        if layer is None:
            after = any(x is not None for x in own[i + 1 :])
            layer = (layers[-1] if layers else -1) if after else num_layers
        layers.append(layer)
    infos = tuple(NodeInfo(n.name, _node_kind(gm, n), layer) for n, layer in zip(compute, layers))
    output = next(n for n in reversed(nodes) if n.op == "output")
    returned: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output.args, returned.append)
    return GraphFacts(
        graph_module=gm,
        compute=compute,
        infos=infos,
        num_layers=num_layers,
        inputs=tuple(n.name for n in nodes if n.op == "placeholder"),
        outputs=tuple(dict.fromkeys(n.name for n in returned)),
    )


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', type(target).__qualname__)}"


_TRACER_CONSTANT = re.compile(r"_tensor_constant\d+")


def _format_arg(arg: Any, facts: GraphFacts) -> str:
    if isinstance(arg, torch.fx.Node):
        if arg.op != "get_attr" or not _TRACER_CONSTANT.fullmatch(str(arg.target)):
            return f"%{arg.name}"
        # A tensor torch.fx baked into the graph (named `_tensor_constant<N>`): its name depends on
        # how often the model was traced, its device on where; only its shape and dtype count.
        value = operator.attrgetter(str(arg.target))(facts.graph_module)
        return f"constant{tuple(getattr(value, 'shape', ()))}:{getattr(value, 'dtype', type(value).__qualname__)}"
    if isinstance(arg, (tuple, list)):
        return "(" + ",".join(_format_arg(a, facts) for a in arg) + ")"
    if isinstance(arg, dict):
        return "{" + ",".join(f"{k!r}:{_format_arg(v, facts)}" for k, v in arg.items()) + "}"
    if isinstance(arg, slice):
        return f"slice({_format_arg((arg.start, arg.stop, arg.step), facts)})"
    if arg is None or isinstance(arg, (bool, int, float, str, torch.dtype, torch.device, type(...))):
        return repr(arg)
    return _target_name(arg) if callable(arg) else type(arg).__qualname__


def _digest(facts: GraphFacts, nodes: Sequence[torch.fx.Node]) -> str:
    sha = hashlib.sha256()
    for n in nodes:
        args, kwargs = _format_arg(n.args, facts), _format_arg(n.kwargs, facts)
        sha.update(f"{n.name}|{n.op}|{_target_name(n.target)}|{args}|{kwargs}\n".encode())
    return "sha256:" + sha.hexdigest()[:16]


def _describe_run(facts: GraphFacts, sid: int, kind: Kind, start: int, end: int) -> SubgraphDescription:
    """The description of the subgraph made of compute nodes [start, end)."""
    nodes = facts.compute[start:end]
    members = set(nodes)
    inputs: dict[str, None] = {}
    for n in nodes:
        for used in n.all_input_nodes:
            if used not in members and used.op != "get_attr":
                inputs[used.name] = None
    returned = set(facts.outputs)
    outputs = tuple(
        n.name
        for n in nodes
        if n.name in returned or any(user not in members for user in n.users if user.op != "output")
    )
    layers = [info.layer for info in facts.infos[start:end]]
    return SubgraphDescription(
        id=sid,
        kind=kind,
        layers=(min(layers), max(layers)),
        first_node=nodes[0].name,
        last_node=nodes[-1].name,
        num_nodes=len(nodes),
        digest=_digest(facts, nodes),
        inputs=tuple(inputs),
        outputs=outputs,
    )


def _kind_problem(facts: GraphFacts, kind: str, run: range) -> str | None:
    """Why a subgraph of `kind` over compute nodes `run` is malformed, or None."""
    kinds = [info.kind for info in facts.infos[run.start : run.stop]]
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {KINDS}"
    if (kind == "collective") != ("collective" in kinds) or (kind == "collective" and len(kinds) != 1):
        return f"a collective must be a subgraph of its own, got a {kind} subgraph of {sorted(set(kinds))} nodes"
    if kind == "peft" and set(kinds) != {"peft"}:
        return f"a peft subgraph holds PEFT host calls only, got nodes of kinds {sorted(set(kinds))}"
    return None


def describe(gm: torch.fx.GraphModule, policy: PartitionPolicy) -> PartitionDescription:
    """Run `policy` over the compute nodes of `gm` and describe the resulting partition."""
    facts = analyze(gm)
    labels = list(policy(facts.infos, facts.num_layers))
    assert len(labels) == len(facts.infos), f"policy gave {len(labels)} labels for {len(facts.infos)} nodes"
    subgraphs: list[SubgraphDescription] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            problem = _kind_problem(facts, labels[start][1], range(start, i))
            assert problem is None, f"policy {policy}: subgraph {len(subgraphs)}: {problem}"
            subgraphs.append(_describe_run(facts, len(subgraphs), labels[start][1], start, i))
            start = i
    name = getattr(policy, "__name__", type(policy).__name__)
    return PartitionDescription(name, facts.num_layers, facts.inputs, facts.outputs, tuple(subgraphs))


_MISMATCH = "the model's graph does not match the plan's partition"


def _mismatch(where: str, field: str, planned: Any, actual: Any) -> PartitionMismatchError:
    return PartitionMismatchError(
        f"{_MISMATCH}: {where}: {field} is {planned!r} in the plan, "
        f"{actual!r} in the model (recompile the plan for this model)"
    )


def match_description(gm: torch.fx.GraphModule, description: PartitionDescription) -> tuple[GraphFacts, list[range]]:
    """Check that `description` is exactly the partition of `gm` it describes; returns the graph's
    analysis and the compute-node range of each subgraph. Raises `PartitionMismatchError` naming the
    first difference."""
    facts = analyze(gm)
    for field in ("num_layers", "inputs", "outputs"):
        if getattr(description, field) != getattr(facts, field):
            raise _mismatch("graph", field, getattr(description, field), getattr(facts, field))
    index = {n.name: i for i, n in enumerate(facts.compute)}
    runs: list[range] = []
    cursor = 0
    for sub in description.subgraphs:
        where = f"subgraph {sub.id} ({sub.kind}, layers {sub.layers[0]}..{sub.layers[1]})"
        if sub.id != len(runs):
            raise _mismatch(where, "id", sub.id, len(runs))
        actual_first = facts.compute[cursor].name if cursor < len(facts.compute) else None
        if sub.first_node != actual_first:
            raise _mismatch(where, "first_node", sub.first_node, actual_first)
        end = index.get(sub.last_node, -1) + 1
        if end <= cursor:
            actual_last = facts.compute[min(cursor + max(sub.num_nodes, 1), len(facts.compute)) - 1].name
            raise _mismatch(where, "last_node", sub.last_node, actual_last)
        problem = _kind_problem(facts, sub.kind, range(cursor, end))
        if problem is not None:
            raise PartitionMismatchError(f"{_MISMATCH}: {where}: {problem} (recompile the plan for this model)")
        rebuilt = _describe_run(facts, sub.id, sub.kind, cursor, end)
        for field in dataclasses.fields(SubgraphDescription):
            if getattr(sub, field.name) != getattr(rebuilt, field.name):
                raise _mismatch(where, field.name, getattr(sub, field.name), getattr(rebuilt, field.name))
        runs.append(range(cursor, end))
        cursor = end
    if cursor != len(facts.compute):
        raise _mismatch("graph", "first node after the last subgraph", None, facts.compute[cursor].name)
    return facts, runs
