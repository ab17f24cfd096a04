"""Checks across the rank programs of each phase, on bodies that are each valid: every send has
exactly one matching recv in the peer's body and vice versa, two ranks receive each other's
messages in the order they are sent, the ranks of an all-reduce group issue the same all-reduces
in the same order, and the bodies cannot deadlock (a recv waits for its send, a send never
blocks, an all-reduce waits for every rank of its group)."""

from __future__ import annotations

from collections import Counter, deque

from muxtune.common.text import quote
from muxtune.specs.checks import add_error, at, join

from .check_text import describe, listing
from .instructions import AllReduce, Instruction, Recv, Send
from .schema import Plan

MAX_PHASE_ERRORS = 20
"""Problems reported per phase; the rest are counted."""

_Key = tuple[int, int, int, bool]
"""A message between two ranks: (hTask, micro-batch, subgraph, grad)."""


def _key(instruction: Send | Recv) -> _Key:
    return (instruction.htask, instruction.microbatch, instruction.subgraph, instruction.grad)


def _message(key: _Key) -> str:
    h, m, s, grad = key
    return f"the {'gradient' if grad else 'activation'} after subgraph {s} (hTask {h}, micro-batch {m})"


class _Exchange:
    """The messages and all-reduces of one phase's round bodies."""

    def __init__(self, plan: Plan, phase: int, errors: list[str]):
        self.phase = phase
        self.bodies: list[tuple[Instruction, ...]] = [program.phases[phase] for program in plan.programs]
        self.errors = errors
        self.count = 0
        self.sends: dict[tuple[int, int], list[tuple[_Key, int]]] = {}
        self.recvs: dict[tuple[int, int], list[tuple[_Key, int]]] = {}
        self.reduces: dict[frozenset[int], dict[int, list[tuple[tuple[str, ...], int]]]] = {}
        for rank, body in enumerate(self.bodies):
            for index, instruction in enumerate(body):
                if isinstance(instruction, Send):
                    self.sends.setdefault((rank, instruction.peer), []).append((_key(instruction), index))
                elif isinstance(instruction, Recv):
                    self.recvs.setdefault((instruction.peer, rank), []).append((_key(instruction), index))
                elif isinstance(instruction, AllReduce):
                    calls = self.reduces.setdefault(frozenset(instruction.group), {})
                    calls.setdefault(rank, []).append((instruction.tasks, index))

    def body_path(self, rank: int) -> str:
        return at(join(at("programs", rank), "phases"), self.phase)

    def error(self, rank: int, index: int | None, message: str) -> None:
        self.count += 1
        if self.count <= MAX_PHASE_ERRORS:
            path = self.body_path(rank)
            add_error(self.errors, path if index is None else at(path, index), message)

    def check_matching(self) -> None:
        """Every send has exactly one recv and every recv exactly one send."""
        for pair in sorted(set(self.sends) | set(self.recvs)):
            src, dst = pair
            sends, recvs = self.sends.get(pair, []), self.recvs.get(pair, [])
            unreceived = Counter(key for key, _ in recvs)
            for key, index in sends:
                if unreceived[key]:
                    unreceived[key] -= 1
                else:
                    instruction = self.bodies[src][index]
                    self.error(src, index, f"{describe(instruction)} has no matching recv in {self.body_path(dst)}")
            unsent = Counter(key for key, _ in sends)
            for key, index in recvs:
                if unsent[key]:
                    unsent[key] -= 1
                else:
                    instruction = self.bodies[dst][index]
                    self.error(dst, index, f"{describe(instruction)} has no matching send in {self.body_path(src)}")

    def check_order(self) -> None:
        """Two ranks receive each other's messages in the order they are sent."""
        for (src, dst), sends in sorted(self.sends.items()):
            for (sent, _), (received, index) in zip(sends, self.recvs[(src, dst)]):
                if sent != received:
                    self.error(
                        dst,
                        index,
                        f"{describe(self.bodies[dst][index])} comes out of order: rank {src} sends "
                        f"{_message(sent)} first (messages between two ranks arrive in the order they are sent)",
                    )
                    break

    def check_reduces(self) -> None:
        """The ranks of a group issue the same all-reduces over it, in the same order."""
        for group, calls in sorted(self.reduces.items(), key=lambda item: sorted(item[0])):
            first = min(calls)
            expected = [tasks for tasks, _ in calls[first]]
            for rank in sorted(group):
                issued = [tasks for tasks, _ in calls.get(rank, [])]
                if issued != expected:
                    mine, theirs = quote([list(t) for t in issued]), quote([list(t) for t in expected])
                    self.error(
                        rank,
                        None,
                        f"its all-reduces over ranks {listing(sorted(group))} (tasks {mine}) "
                        f"differ from {self.body_path(first)}'s (tasks {theirs})",
                    )

    def check_progress(self) -> None:
        """Replay all bodies together; a rank that cannot finish is in a deadlock."""
        send_at = {(src, dst, key): index for (src, dst), sends in self.sends.items() for key, index in sends}
        reduce_at: dict[tuple[int, int], tuple[frozenset[int], int]] = {}
        reduce_index: dict[tuple[frozenset[int], int, int], int] = {}
        for group, calls in self.reduces.items():
            for rank, issued in calls.items():
                for k, (_, index) in enumerate(issued):
                    reduce_at[(rank, index)] = (group, k)
                    reduce_index[(group, k, rank)] = index
        position = [0] * len(self.bodies)

        def waits_for(rank: int) -> int | None:
            """The rank that ``rank``'s next instruction waits for, or None when it can run."""
            instruction = self.bodies[rank][position[rank]]
            if isinstance(instruction, Recv):
                peer = instruction.peer
                return peer if position[peer] <= send_at[(peer, rank, _key(instruction))] else None
            if isinstance(instruction, AllReduce):
                group, k = reduce_at[(rank, position[rank])]
                behind = [r for r in sorted(group) if position[r] < reduce_index[(group, k, r)]]
                return behind[0] if behind else None
            return None

        blocked_on: dict[int, list[int]] = {}
        queue = deque(range(len(self.bodies)))
        while queue:
            rank = queue.popleft()
            start = position[rank]
            while position[rank] < len(self.bodies[rank]):
                other = waits_for(rank)
                if other is not None:
                    blocked_on.setdefault(other, []).append(rank)
                    break
                position[rank] += 1
            if position[rank] > start:
                queue.extend(blocked_on.pop(rank, []))
        for rank, body in enumerate(self.bodies):
            if position[rank] < len(body):
                other = waits_for(rank)
                self.error(
                    rank,
                    position[rank],
                    f"{describe(body[position[rank]])} waits forever (deadlock: rank {other} is itself blocked at "
                    f"{at(self.body_path(other), position[other])})",
                )

    def check(self, replay: bool) -> None:
        before = len(self.errors)
        self.check_matching()
        self.check_reduces()
        if len(self.errors) == before:
            self.check_order()
        if replay and len(self.errors) == before:
            self.check_progress()
        if self.count > MAX_PHASE_ERRORS:
            add_error(
                self.errors,
                f"phases[{self.phase}]",
                f"{self.count - MAX_PHASE_ERRORS} more problems across the rank programs",
            )


def check_exchanges(plan: Plan, errors: list[str], replay: bool) -> None:
    """All cross-rank checks, phase by phase; the deadlock replay only when ``replay`` (every
    body is valid on its own)."""
    for phase in range(len(plan.phases)):
        _Exchange(plan, phase, errors).check(replay)
