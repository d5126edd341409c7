"""One search step, framework-agnostic: the caller passes its own backward and weight-step
functions (a plain loop passes ``loss.backward`` and an optimizer step; the Determined trial
passes ``context.backward`` and ``context.step_optimizer``).

Bilevel (default): an architecture step on a held-out batch, then a weight step on a
training batch. Single-level: one training batch's loss updates both.

* The architecture step runs the supernet with detached copies of its weight parameters
  (``torch.func.functional_call``) and asks autograd for the architecture gradients only,
  so no weight gradient is computed and convolutions keep no inputs for one; it bypasses the
  DistributedDataParallel wrapper, and ``ArchitectureOptimizer.sync_grads`` averages the
  architecture gradients over ranks. Nothing toggles ``requires_grad``.
* The weight step detaches the architecture weights, so no architecture gradient is computed.
* Under a cost budget (``arch.budget``), the architecture objective adds the budget's
  ``multiplier * E[cost] / target`` (``optimizers/budget.py``); the reported losses do not.
* ``check_finite=True`` (default): a non-finite loss or architecture gradient raises
  :class:`NonFiniteLossError` before any parameter changes (one host synchronisation per
  loss). ``check_finite=False`` returns the same check as a device flag,
  ``StepResult.finite``, for the caller to read when it reports (the Determined trial).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .architecture import ArchitectureOptimizer


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN or infinite; raised before the update, so no bad state is stored."""


@dataclass
class StepResult:
    loss: torch.Tensor                   # weight-step (training batch) loss, detached
    accuracy: Optional[torch.Tensor]     # training-batch top-1 accuracy (class labels only)
    arch_loss: Optional[torch.Tensor]    # architecture-step (held-out batch) loss, bilevel only
    finite: torch.Tensor                 # device bool: losses and architecture gradients all finite


def _finite(values: Sequence[torch.Tensor], what: str, check: bool) -> torch.Tensor:
    """A device bool: every value finite. ``check`` reads it now and raises if not."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all()
    if check and not finite:
        raise NonFiniteLossError(f"{what} is not finite: stopping before the update so no bad checkpoint is "
                                 "written; lower the learning rate or check the data")
    return finite


def detached_weights(arch: ArchitectureOptimizer) -> dict[str, torch.Tensor]:
    """The supernet's weight parameters, detached (they take no gradient in the architecture step)."""
    return {n: p.detach() for n, p in arch.weight_named_parameters}


def unreachable_parameters(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters that ``loss`` does not depend on (ops left out of a sampled architecture,
    or whose output feeds only ops that are), found by walking the autograd graph."""
    seen: set[int] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    visited: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in visited:
            continue
        visited.add(id(fn))
        variable = getattr(fn, "variable", None)
        if variable is not None:
            seen.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return [p for p in params if p.requires_grad and id(p) not in seen]


def zero_touch(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Make ``params`` part of the graph at zero cost and zero value (for DDP buckets)."""
    if not params:
        return loss
    return loss + sum(p.reshape(-1)[0] for p in params) * 0.0


def prepare_supernet(supernet: nn.Module, channels_last: Optional[bool] = None, compile: Union[bool, str] = False,
                     device: Optional[torch.device] = None) -> nn.Module:
    """Apply the speed options that change no math, for the device the supernet will run on
    (``device``, by default the one it is on now). Call it before wrapping the supernet in
    DistributedDataParallel, which builds its gradient buckets from the parameters' layout.

    ``channels_last``: the memory format of the parameters, which the supernet's forward
    gives its input too. ``None`` picks the supernet's own preference for that device
    (``cpu_channels_last``: NAS-Bench-201's dense convolutions run about twice as fast in
    oneDNN's channels-last layout; the DARTS space's 4-16-channel depthwise ops do not).
    ``compile``: ``torch.compile`` of the forward (a string: that backend, e.g. ``"eager"``).
    The forward's control flow does not depend on the architecture weights' values, so it
    compiles once (twice for bilevel search: the architecture and the weight forward)."""
    if channels_last is None:
        device = torch.device(device) if device is not None else next(supernet.parameters()).device
        channels_last = device.type == "cpu" and getattr(supernet, "cpu_channels_last", False)
    supernet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile:
        supernet.compile(**({"backend": compile} if isinstance(compile, str) else {}))
    return supernet


def _loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss in at least float32 (bf16 under autocast is raised; float64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def search_step(model: nn.Module, arch: ArchitectureOptimizer, x_train: torch.Tensor, y_train: torch.Tensor,
                x_val: Optional[torch.Tensor] = None, y_val: Optional[torch.Tensor] = None, *,
                weight_step: Callable[[], None], weight_backward: Callable[[torch.Tensor], None] = None,
                bilevel: bool = True, criterion: Callable = F.cross_entropy,
                ddp_unused: bool = False, autocast: Optional[torch.dtype] = None,
                update_arch: bool = True, check_finite: bool = True) -> StepResult:
    """Run one search step.

    Args:
        model: the supernet, possibly wrapped in DistributedDataParallel.
        arch: the architecture optimizer (owns the architecture parameters of ``model``).
        weight_step: clips, steps and zeroes the weight optimizer (e.g. ``context.step_optimizer``).
        weight_backward: backward for the weight loss (default ``loss.backward()``).
        bilevel: architecture step on ``(x_val, y_val)`` first; else single-level.
        ddp_unused: the model is DDP-wrapped and the optimizer samples architectures: route
            the parameters this step's loss does not depend on through the graph at zero
            cost (DDP, built with ``find_unused_parameters=False``, requires every parameter
            to get a gradient) and drop their zero gradients again, so the update is that of
            the single-process run.
        autocast: run the forward passes under ``torch.autocast`` in this dtype (``torch.bfloat16``).
        update_arch: ``False`` trains the weights only (a warm-up: the architecture is used,
            sampled methods still sample, but it is not updated and no held-out batch is run).
        check_finite: raise :class:`NonFiniteLossError` at once (a host synchronisation), or
            leave the check to the caller through ``StepResult.finite``.
    """
    weight_backward = weight_backward or (lambda loss: loss.backward())
    amp = (lambda: torch.autocast(x_train.device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    supernet = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    arch_loss = None
    finite = []

    if bilevel and arch.learns and update_arch:
        if x_val is None or y_val is None:
            raise ValueError("bilevel search needs a held-out batch (x_val, y_val)")
        with amp():
            logits = functional_call(supernet, detached_weights(arch), (x_val, arch.weights()), strict=False)
            arch_loss = criterion(_loss_precision(logits), y_val)
        finite.append(_finite([arch_loss], "the architecture loss", check_finite))
        penalty = arch.budget_penalty()            # a budget's multiplier * expected cost / target
        torch.autograd.backward(arch_loss if penalty is None else arch_loss + penalty, inputs=arch.parameters())
        arch.sync_grads()
        finite += [_finite(g, "an architecture gradient", check_finite) for g in [_grads(arch)] if g]
        arch.step()
        arch.zero_grad()
        arch_loss = arch_loss.detach()

    single = not bilevel and arch.learns and update_arch
    weights = arch.weights(detach=not single)
    with amp():
        logits = model(x_train, weights)
        loss = criterion(_loss_precision(logits), y_train)
    finite.append(_finite([loss], "the training loss", check_finite))
    unused = unreachable_parameters(loss, [p for _, p in arch.weight_named_parameters]) if ddp_unused else []
    penalty = arch.budget_penalty() if single else None
    weight_backward(zero_touch(loss if penalty is None else loss + penalty, unused))
    for p in unused:
        p.grad = None
    if single:
        arch.sync_grads()
        finite += [_finite(g, "an architecture gradient", check_finite) for g in [_grads(arch)] if g]
        arch.step()
        arch.zero_grad()
    weight_step()
    accuracy = None
    if not y_train.is_floating_point():
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == y_train).float().mean()
    return StepResult(loss=loss.detach(), accuracy=accuracy, arch_loss=arch_loss,
                      finite=torch.stack(finite).all() if len(finite) > 1 else finite[0])


def _grads(arch: ArchitectureOptimizer) -> list[torch.Tensor]:
    return [p.grad for p in arch.parameters() if p.grad is not None]
