"""PollingService: checks on an injected clock; a repeated problem is logged once."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from opensandbox_ingress.polling import PollingService


class Counting(PollingService):
    """Counts its checks; each check reports what C{outcomes} says next."""

    rejected_format = "counting rejected: {problem}"

    def __init__(self, clock: Clock, interval_s: float, outcomes: list[str | None]) -> None:
        super().__init__(clock, interval_s)
        self.checks = 0
        self._outcomes = outcomes

    def check(self) -> None:
        self.checks += 1
        problem = self._outcomes.pop(0) if self._outcomes else None
        if problem is None:
            self.accepted()
        else:
            self.rejected(problem)


def test_checks_at_start_then_every_interval_until_stopped() -> None:
    """One check at start, one per interval of the injected clock, none after stop."""
    clock = Clock()
    service = Counting(clock, 2.0, [])
    service.startService()
    assert service.checks == 1
    clock.advance(1.9)
    assert service.checks == 1
    clock.advance(0.1)
    assert service.checks == 2
    clock.pump([2.0, 2.0])
    assert service.checks == 4
    service.stopService()
    assert not clock.getDelayedCalls()
    clock.advance(10.0)
    assert service.checks == 4
    assert not service.running


def test_stopping_twice_is_harmless() -> None:
    """A second stop does nothing (twistd and tests may both stop a service)."""
    clock = Clock()
    service = Counting(clock, 1.0, [])
    service.startService()
    service.stopService()
    service.stopService()
    assert service.checks == 1


def test_a_problem_is_logged_once_until_it_changes_or_clears() -> None:
    """Every rejection counts; the log has one error line per distinct run of a problem."""
    clock = Clock()
    service = Counting(clock, 1.0, ["broken", "broken", "other", None, "broken"])
    with capturedLogs() as events:
        service.startService()
        clock.pump([1.0] * 4)
    service.stopService()
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert [e["problem"] for e in errors] == ["broken", "other", "broken"]
    assert all(e["log_format"] == "counting rejected: {problem}" for e in errors)
    assert all(e["log_namespace"].endswith("test_polling.Counting") for e in errors)
    assert service.failures == 4
