"""A fair queue: one FIFO per tenant, served round-robin, so a tenant that floods the queue
waits behind itself and never in front of another tenant's next job."""

from __future__ import annotations

from collections import deque
from typing import Callable


class FairQueue:
    def __init__(self) -> None:
        self._by_tenant: dict[str, deque[str]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting jobs, next to serve first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self, tenant: str) -> int:
        waiting = self._by_tenant.get(tenant)
        return len(waiting) if waiting else 0

    def push(self, tenant: str, job_id: str) -> None:
        waiting = self._by_tenant.get(tenant)
        if waiting is None:
            waiting = self._by_tenant[tenant] = deque()
            self._turns.append(tenant)
        waiting.append(job_id)
        self._size += 1

    def remove(self, tenant: str, job_id: str) -> bool:
        waiting = self._by_tenant.get(tenant)
        if not waiting or job_id not in waiting:
            return False
        waiting.remove(job_id)
        self._size -= 1
        if not waiting:
            self._drop(tenant)
        return True

    def pop(self, may_start: Callable[[str], bool]) -> tuple[str, str] | None:
        """The next job of the first tenant in turn that may start one; that tenant's turn
        moves to the back."""
        for _ in range(len(self._turns)):
            tenant = self._turns[0]
            self._turns.rotate(-1)
            if may_start(tenant):
                waiting = self._by_tenant[tenant]
                job_id = waiting.popleft()
                self._size -= 1
                if not waiting:
                    self._drop(tenant)
                return tenant, job_id
        return None

    def _drop(self, tenant: str) -> None:
        del self._by_tenant[tenant]
        self._turns.remove(tenant)
