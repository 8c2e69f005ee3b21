"""Recent routing decisions by request id, so any response's route can be looked up later."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from coordinator.services.routing import Decision


@dataclass
class RouteRecord:
    request_id: str
    client: str
    model: str
    decision: Decision
    at: float = field(default_factory=time.time)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # worker, outcome, segment

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.model,
            "at": self.at,
            "decision": self.decision.as_dict(),
            "attempts": list(self.attempts),
        }


class DecisionLog:
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity  # decisions kept; older ones are forgotten
        self._records: OrderedDict[str, RouteRecord] = OrderedDict()

    def add(self, record: RouteRecord) -> RouteRecord:
        self._records[record.request_id] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)
        return record

    def get(self, request_id: str) -> RouteRecord | None:
        return self._records.get(request_id)

    def recent(self, limit: int = 50) -> list[RouteRecord]:
        return list(reversed(list(self._records.values())[-limit:]))
