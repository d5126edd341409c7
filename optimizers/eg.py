"""Exponentiated gradient: mirror descent on the probability simplex with the entropic geometry."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch.optim import Optimizer


class ExponentiatedGradient(Optimizer):
    r"""Exponentiated gradient (EG) for parameters whose last dimension holds rows on the
    probability simplex (GAEA's architecture weights).

    For each row :math:`\theta` with gradient :math:`g`:

    .. math::
        g &\leftarrow g + \lambda \log\theta
            \qquad\text{(gradient of } \lambda\,\mathrm{KL}(\theta\,\|\,\mathrm{uniform})\text{, up to a constant)}\\
        \theta_i &\leftarrow \frac{\theta_i e^{-\eta g_i}}{\sum_j \theta_j e^{-\eta g_j}}
            = \mathrm{softmax}(\log\theta - \eta g)_i \\
        \theta &\leftarrow \frac{\max(\theta, \epsilon)}{\sum_j \max(\theta_j, \epsilon)}

    computed in log space, so rows stay on the simplex for any finite gradient. Adding a
    constant to a row's gradient changes nothing.

    Args:
        params: iterable of parameters or parameter groups; each row must be on the simplex.
        lr (float): step size :math:`\eta` (default 0.1). LR schedulers drive it as usual.
        floor (float): :math:`\epsilon`, the smallest entry kept after a step (default 1e-5, as in
            the GAEA code); 0 disables it. Must be below 1 / row length.
        entropic_reg (float): :math:`\lambda`, weight of the entropic regulariser (default 0).
        maximize (bool): ascend instead of descend (default False).
    """

    def __init__(self, params: Iterable, lr: float = 0.1, floor: float = 1e-5, entropic_reg: float = 0.0,
                 maximize: bool = False):
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr} (must be a number >= 0)")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"Invalid floor: {floor} (must be in [0, 1))")
        if entropic_reg < 0.0:
            raise ValueError(f"Invalid entropic_reg: {entropic_reg} (must be >= 0)")
        defaults = dict(lr=lr, floor=floor, entropic_reg=entropic_reg, maximize=maximize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._check_row_length(p, group["floor"])
                if p.device.type == "meta":     # no values to check (shape-only runs)
                    continue
                if not (p.detach() >= 0).all() or not torch.allclose(
                        p.detach().sum(-1), torch.ones((), dtype=p.dtype, device=p.device), atol=1e-4):
                    raise ValueError("ExponentiatedGradient parameters must hold rows on the probability simplex "
                                     "(non-negative, summing to 1 along the last dimension); initialise them so")

    @staticmethod
    def _check_row_length(p: torch.Tensor, floor: float) -> None:
        if p.dim() == 0 or floor * p.shape[-1] >= 1.0:
            raise ValueError(f"floor {floor} is too large for rows of length {p.shape[-1] if p.dim() else 0}: "
                             "floor * row length must be < 1")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, floor, lam = group["lr"], group["floor"], group["entropic_reg"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ExponentiatedGradient does not support sparse gradients")
                self._check_row_length(p, floor)
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if lr == 0:  # nothing moves (and no rounding of the row either)
                    continue
                g = -p.grad if group["maximize"] else p.grad
                log_theta = torch.log(p)
                if lam:
                    g = g + lam * log_theta
                finfo = torch.finfo(p.dtype)
                # lr * g can overflow for huge gradients: clip to the largest finite value
                logits = log_theta - torch.nan_to_num(lr * g, nan=0.0, posinf=finfo.max, neginf=-finfo.max)
                theta = torch.softmax(logits, dim=-1)
                if floor > 0:
                    theta = theta.clamp_min(floor)
                    theta = theta / theta.sum(dim=-1, keepdim=True)
                p.copy_(theta)
        return loss
