"""Human-readable progress lines for runs (rank 0 only): rate, ETA, losses, validations."""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _num(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class Progress:
    def __init__(self, name: str, total_steps: int, every_seconds: float = 10.0, enabled: bool = True,
                 stream=None):
        self.name, self.total, self.every = name, total_steps, every_seconds
        self.enabled, self._stream = enabled, stream       # None: sys.stdout as it is when printing
        self.t0 = self.last = None
        self.start_step = 0

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Called after training step ``step`` (1-based) with that step's metrics."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.t0 is None:
            self.t0, self.last, self.start_step = now, now, step - 1
            return
        if now - self.last < self.every and step != self.total:
            return
        self.last = now
        rate = (step - self.start_step - 1) / max(now - self.t0, 1e-9)
        parts = [f"[{self.name}] step {step}/{self.total}", f"{rate:.2f} batch/s",
                 f"ETA {_fmt_time((self.total - step) / rate) if rate > 0 else '?'}"]
        for key in ("loss", "arch_loss", "train_accuracy", "lr"):
            v = _num(metrics.get(key))
            if v is not None:
                parts.append(f"{key} {v:.4g}")
        print("  ".join(parts), file=self.stream, flush=True)

    def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"[{self.name}] validation at step {step}:"]
        for key, v in metrics.items():
            f = _num(v)
            if key == "genotype":
                continue
            parts.append(f"{key} {f:.4g}" if f is not None else f"{key} {v}")
        print("  ".join(parts), file=self.stream, flush=True)
        if "genotype" in metrics:
            print(f"[{self.name}] genotype: {metrics['genotype']}", file=self.stream, flush=True)
