"""Steps run in order, each timed against its budget and stopped at its hard limit; a failure is recorded and the
next step runs."""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acceptance.context import Context


@dataclass
class Check:
    """One yes/no claim: "pass", "fail", or "n/a" (cannot be measured here, e.g. VRAM on a CPU)."""

    name: str
    result: str
    detail: str = ""


@dataclass
class StepResult:
    """What one step measured and checked; ``status`` is "failed" on an exception or a failed check."""

    name: str
    title: str
    budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def over_budget(self) -> bool:
        return self.seconds > self.budget_s

    def check(self, name: str, ok: bool | None, detail: str = "") -> bool | None:
        """Record a check: ``True`` pass, ``False`` fail, ``None`` n/a."""
        result = "n/a" if ok is None else ("pass" if ok else "fail")
        self.checks.append(Check(name, result, detail))
        return ok

    def skip(self, name: str, line: str) -> None:
        """Claim ``name`` cannot be measured here: ``line`` says why, printed, as a note and an "n/a" check."""
        print(line, flush=True)
        self.notes.append(line)
        self.check(name, None, line)


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[Context, StepResult], None]


class StepTimeout(Exception):
    """A step ran past its hard limit (twice its budget, at least a minute more) and was stopped."""


class InjectedFailure(Exception):
    """Raised at the start of the step named by ``--fail-step`` (to see a failure reported)."""


def hard_limit_s(budget: float) -> float:
    return max(2 * budget, budget + 60)


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds``; subprocess.run kills its child then."""

    def expire(signum, frame):
        raise StepTimeout(f"stopped at its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_steps(
    steps: list[Step],
    ctx: Context,
    budgets: dict[str, float],
    *,
    fail_step: str | None = None,
    on_result: Callable[[list[StepResult]], None] | None = None,
) -> list[StepResult]:
    """Run every step in order, whatever the others did; each result says passed or failed, and why."""
    results = []
    for index, step in enumerate(steps):
        result = StepResult(step.name, step.title, float(budgets[step.name]))
        print(f"\n== [{index}/{len(steps) - 1}] {step.title} (budget {result.budget_s:.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            with hard_limit(hard_limit_s(result.budget_s)):
                if step.name == fail_step:
                    raise InjectedFailure(f"failure injected with --fail-step {step.name}")
                step.run(ctx, result)
        except Exception as err:  # a failed step is reported; the next one runs
            result.error = f"{type(err).__name__}: {err}".strip()
            traceback.print_exc()
        result.seconds = time.perf_counter() - start
        failed = result.error is not None or any(c.result == "fail" for c in result.checks)
        result.status = "failed" if failed else "passed"
        over = f", OVER its budget of {result.budget_s:.0f} s" if result.over_budget else ""
        print(f"== {step.name}: {result.status.upper()} in {result.seconds:.1f} s{over}", flush=True)
        results.append(result)
        if on_result:
            on_result(results)
    return results
