"""Counts, not timings: what one search step asks of the device.

    python benchmarks/step_audit.py                 # both spaces, GAEA and DARTS, the papers' sizes
    python benchmarks/step_audit.py --batch 8       # quicker

One JSON line per (space, method, form, path, precision):

* ``aten_calls``: aten operator calls in one step (each a kernel launch on a GPU), counted
  with a TorchDispatchMode (``optimizers.audit.StepAudit``);
* ``saved_bytes``: bytes autograd keeps for backward over the step, each storage once,
  parameters left out (``optimizers.audit.SavedBytes``);
* ``mixed_dtype_calls``: convolutions and matrix products that got floating tensors of more
  than one dtype (cuDNN refuses them).

Paths: ``meta`` runs the device-agnostic path (the one CUDA takes) on the meta device, shapes
only, where any host synchronisation raises (``host_sync`` says whether one did); ``cpu`` the
CPU path with its kernel tricks; ``cpu-agnostic`` the device-agnostic path computed on the CPU
(the only way to run it under autocast here). bf16 runs under CPU autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import optimizers  # noqa: E402
import search_spaces  # noqa: E402
from benchmarks.bench_search import SPACES  # noqa: E402  (the benchmark's sizes)
from optimizers.audit import SavedBytes, StepAudit  # noqa: E402
from search_spaces import cpu_kernels  # noqa: E402



def search_setup(space: str, method: str, device, batch: int, seed: int = 0):
    """A seeded supernet of ``space`` at the benchmark's sizes on ``device``, its architecture
    optimizer, the weight step the trial takes (SGD momentum 0.9, weight decay 3e-4, clip 5),
    and one random batch: (net, arch, weight_step, x, y)."""
    name, kw = SPACES[space]
    device = torch.device(device)
    torch.manual_seed(seed)
    net = search_spaces.create(name, **kw).to(device)
    arch = optimizers.create(method, net, seed=seed)
    sgd = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)

    def weight_step() -> None:
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return net, arch, weight_step, x, y


def audit(space: str, method: str, bilevel: bool, path: str, precision: str, batch: int, steps: int = 1) -> dict:
    net, arch, weight_step, x, y = search_setup(space, method, "meta" if path == "meta" else "cpu", batch)
    autocast = torch.bfloat16 if precision == "bf16" else None
    out = {"space": space, "method": method, "form": "bilevel" if bilevel else "single_level", "path": path,
           "precision": precision, "batch": batch}
    with cpu_kernels.disabled() if path == "cpu-agnostic" else contextlib.nullcontext():
        for _ in range(steps - 1):      # a warm-up step: optimizer state exists in the counted one
            optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step,
                                   autocast=autocast, check_finite=False)
        counter, saved = StepAudit(), SavedBytes(exclude=list(net.parameters()))
        try:
            with counter, saved:
                optimizers.search_step(net, arch, x, y, x, y, bilevel=bilevel, weight_step=weight_step,
                                       autocast=autocast, check_finite=False)
            out["host_sync"] = False
        except NotImplementedError as e:     # meta: "Cannot copy out of meta tensor"
            out["host_sync"] = str(e)[:80]
    out.update(aten_calls=counter.total, saved_bytes=saved.bytes, mixed_dtype_calls=len(counter.mixed),
               mixed_ops=sorted({op for op, _ in counter.mixed}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    p.add_argument("--methods", nargs="+", default=["gaea", "darts"])
    p.add_argument("--forms", nargs="+", default=["bilevel", "single_level"])
    p.add_argument("--paths", nargs="+", default=["meta", "cpu", "cpu-agnostic"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    for space in args.spaces:
        for method in args.methods:
            for form in args.forms:
                for path in args.paths:
                    for precision in args.precisions:
                        if path == "meta" and precision == "bf16":
                            continue            # no autocast on the meta device
                        print(json.dumps(audit(space, method, form == "bilevel", path, precision, args.batch, 2)),
                              flush=True)


if __name__ == "__main__":
    main()
