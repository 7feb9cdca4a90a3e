"""The fair queue: tenants are served in turn, each in its own submission order."""

from __future__ import annotations

from sandboxd.scheduler.queue import FairQueue


def drain(queue: FairQueue, may_start=lambda tenant: True) -> list[tuple[str, str]]:
    order = []
    while (picked := queue.pop(may_start)) is not None:
        order.append(picked)
    return order


def test_a_flooding_tenant_does_not_starve_another():
    queue = FairQueue()
    for n in range(100):
        queue.push("flood", f"f{n}")
    queue.push("quiet", "q0")
    order = drain(queue)
    assert order.index(("quiet", "q0")) <= 1
    assert [job for tenant, job in order if tenant == "flood"] == [f"f{n}" for n in range(100)]


def test_tenants_alternate_and_keep_their_own_order():
    queue = FairQueue()
    for n in range(3):
        queue.push("a", f"a{n}")
        queue.push("b", f"b{n}")
    assert [job for _, job in drain(queue)] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert len(queue) == 0


def test_a_tenant_that_may_not_start_is_skipped_not_dropped():
    queue = FairQueue()
    queue.push("busy", "b0")
    queue.push("free", "f0")
    queue.push("free", "f1")
    assert drain(queue, lambda tenant: tenant != "busy") == [("free", "f0"), ("free", "f1")]
    assert queue.depth("busy") == 1 and len(queue) == 1
    assert queue.pop(lambda tenant: True) == ("busy", "b0")


def test_remove_takes_a_job_out_of_the_line():
    queue = FairQueue()
    queue.push("a", "a0")
    queue.push("a", "a1")
    assert queue.remove("a", "a0") and not queue.remove("a", "a0") and not queue.remove("z", "a1")
    assert drain(queue) == [("a", "a1")]
    assert queue.depth("a") == 0
