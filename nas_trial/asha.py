"""The plan Determined 0.38.1's master makes for an ``adaptive_asha`` searcher, recomputed
from an experiment's ``searcher`` section by the master's own rules
(``master/pkg/searcher/adaptive_asha.go`` and ``asha_stopping.go`` at tag v0.38.1):

* rungs: ``max_rungs`` is capped so the top rung is reachable,
  ``min(max_rungs, int(log(max_time)/log(d)) + 1, int(log(max_trials)/log(d)) + 1)``;
  ``mode`` turns it into brackets (aggressive: ``[R]``; standard: ``(R-1)//2+1 .. R``;
  conservative: ``1 .. R``), most rungs first, unless ``bracket_rungs`` names them;
* trials per bracket: proportional to ``d**(rungs-1) / rungs``, truncated, at least 1, the
  remainder to the first bracket;
* rung ``i`` of ``n`` is reached after ``max(int(max_time / d**(n-1-i)), 1)`` time units;
* this ASHA *stops* trials (it never promotes or resumes one): a trial whose validation at a
  rung is not in the top ``1/d`` of that rung so far stops; the others train on.

The master marks a stopped trial STOPPING_COMPLETED and sends its running allocation no
signal in 0.38.1 (``master/internal/trial.go``, ``transition``), so a trial learns of the stop
only by asking: ``nas_trial.stopping`` does, after every validation. A trial class that does
not ask trains every trial to ``max_time``: the plan's ``max_units``.

The epochs a bracket costs depend on the order results arrive; the plan gives the usual
estimate, ``trials / d**i`` trials training from rung ``i-1`` to rung ``i``, and the bound
where no trial is stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

# expconf v0 defaults for adaptive_asha (schemas/expconf/v0/searcher-adaptive-asha.json)
DEFAULTS = {"divisor": 4.0, "max_rungs": 5, "mode": "standard", "max_concurrent_trials": 16}
MODES = ("aggressive", "standard", "conservative")


@dataclass(frozen=True)
class Bracket:
    rungs: tuple[int, ...]        # time units (e.g. epochs) at which trials are ranked; the last is max_time
    trials: int
    max_concurrent_trials: int

    def expected_units(self, divisor: float) -> float:
        """Time units trained in this bracket if ``trials / d**i`` trials pass rung ``i - 1``."""
        total, previous = 0.0, 0
        for i, units in enumerate(self.rungs):
            total += self.trials / divisor ** i * (units - previous)
            previous = units
        return total


@dataclass(frozen=True)
class AshaPlan:
    brackets: tuple[Bracket, ...]
    divisor: float
    mode: str
    max_time: int
    time_metric: str

    @property
    def trials(self) -> int:
        return sum(b.trials for b in self.brackets)

    @property
    def expected_units(self) -> float:
        return sum(b.expected_units(self.divisor) for b in self.brackets)

    @property
    def max_units(self) -> int:
        return self.trials * self.max_time

    def comment(self, prefix: str = "# ") -> str:
        """The plan as YAML comment lines (what the experiments' headers print)."""
        unit = self.time_metric
        lines = [f"ASHA plan by Determined 0.38.1's rules (adaptive_asha, mode {self.mode}, divisor "
                 f"{self.divisor:g}): {self.trials} trials in {len(self.brackets)} bracket(s)"]
        for k, b in enumerate(self.brackets, 1):
            lines.append(f"  bracket {k}: {b.trials} trials ({b.max_concurrent_trials} at a time), ranked at "
                         f"{', '.join(map(str, b.rungs))} {unit}; ~{b.expected_units(self.divisor):,.0f} {unit}")
        lines.append(f"  expected total ~{self.expected_units:,.0f} {unit} "
                     f"(~{self.expected_units / self.max_time:.1f} full runs); {self.max_units:,} {unit} "
                     "if no trial were stopped")
        lines.append("  A trial outside the top 1/divisor of a rung stops for good: nothing is promoted or resumed.")
        lines.append("  Determined 0.38.1 never tells a running trial that ASHA stopped it: this project's trials ask the")
        lines.append("  master after every validation and stop themselves (nas_trial/stopping.py); a trial class that")
        lines.append(f"  does not ask trains every trial to max_time ({self.max_units:,} {unit} here).")
        return "\n".join(prefix + line for line in lines)


def _bracket_rungs(max_rungs: int, mode: str) -> list[int]:
    if mode == "aggressive":
        return [max_rungs]
    if mode == "standard":
        return list(range((max_rungs - 1) // 2 + 1, max_rungs + 1))
    return list(range(1, max_rungs + 1))


def _trials_per_bracket(max_trials: int, divisor: float, brackets: list[int]) -> list[int]:
    weights = [divisor ** (n - 1) / n for n in brackets]
    trials = [max(int(w / sum(weights) * max_trials), 1) for w in weights]
    trials[0] += max(max_trials - sum(trials), 0)
    return trials


def _concurrency(max_concurrent: int, divisor: float, trials: list[int]) -> list[int]:
    n = len(trials)
    if max_concurrent == 0:
        per, remainder = max(trials[-1], int(divisor)), 0
    else:
        max_concurrent = max(max_concurrent, n)
        per, remainder = divmod(max_concurrent, n)
    return [per + (1 if i < remainder else 0) for i in range(n)]


def _rungs(num_rungs: int, divisor: float, max_time: int) -> tuple[int, ...]:
    return tuple(max(int(max_time / divisor ** (num_rungs - i - 1)), 1) for i in range(num_rungs))


def plan(searcher: Mapping[str, Any]) -> AshaPlan:
    """The master's plan for an ``adaptive_asha`` searcher section."""
    if searcher.get("name") != "adaptive_asha":
        raise ValueError(f"searcher {searcher.get('name')!r} is not adaptive_asha: there is no ASHA plan")
    for key in ("max_trials", "max_time", "time_metric"):
        if searcher.get(key) in (None, ""):
            raise ValueError(f"adaptive_asha searcher needs {key!r}")
    s = {**DEFAULTS, **{k: v for k, v in searcher.items() if v is not None}}
    divisor, max_trials, max_time = float(s["divisor"]), int(s["max_trials"]), int(s["max_time"])
    if s["mode"] not in MODES:
        raise ValueError(f"adaptive_asha mode {s['mode']!r} is not one of {', '.join(MODES)}")
    if divisor <= 1 or max_trials < 1 or max_time < 1:
        raise ValueError("adaptive_asha needs divisor > 1, max_trials >= 1 and max_time >= 1")
    rungs = list(s.get("bracket_rungs") or [])
    if not rungs:
        max_rungs = min(int(s["max_rungs"]), int(math.log(max_time) / math.log(divisor)) + 1,
                        int(math.log(max_trials) / math.log(divisor)) + 1)
        rungs = _bracket_rungs(max_rungs, s["mode"])
    rungs.sort(reverse=True)
    trials = _trials_per_bracket(max_trials, divisor, rungs)
    concurrent = _concurrency(int(s["max_concurrent_trials"]), divisor, trials)
    brackets = tuple(Bracket(_rungs(n, divisor, max_time), t, c) for n, t, c in zip(rungs, trials, concurrent))
    return AshaPlan(brackets, divisor, s["mode"], max_time, str(s["time_metric"]))
