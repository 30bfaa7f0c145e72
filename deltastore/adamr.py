"""AdamR (DAREx-L2/L1): Adam that decays toward the base weights instead of zero.

Each step, before the Adam update (decoupled, as AdamW does):
    L2: theta <- theta - lambda * lr / s * (theta - theta_base)
    L1: theta <- theta - lambda * lr / s * sign(theta - theta_base)
with s = sqrt(mean over all parameters of v_hat), v_hat the bias-corrected second
moment (AdamS-style), so lambda does not depend on the gradients' scale. It keeps
fine-tuning deltas small and well-conditioned, so DARE survives p = 0.99.
With lambda = 0 it is Adam, step for step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch.optim import Optimizer


class AdamR(Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reg: float = 0.0,
        norm: Literal["l2", "l1"] = "l2",
    ):
        if lr < 0 or eps < 0 or reg < 0:
            raise ValueError(f"lr, eps and reg must be >= 0 (got {lr}, {eps}, {reg})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "reg": reg, "norm": norm})
        # The base each parameter decays toward: its value when the optimizer is built.
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["base"] = p.detach().clone()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = torch.enable_grad()(closure)() if closure is not None else None
        live = []
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                live.append((group, p, st))
        s = self._second_moment_scale(live)
        for group, p, st in live:
            b1, b2 = group["betas"]
            lr, t = group["lr"], st["step"]
            if group["reg"] > 0 and s > 0:
                drift = p - st["base"]
                pull = drift if group["norm"] == "l2" else drift.sign()
                p.sub_(pull, alpha=group["reg"] * lr / s)
            bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
            denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
        return loss

    @staticmethod
    def _second_moment_scale(
        live: list[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]],
    ) -> float:
        """s = sqrt(mean over all parameter entries of v_hat)."""
        total, count = 0.0, 0
        for group, _p, st in live:
            total += float(st["exp_avg_sq"].sum()) / (1 - group["betas"][1] ** st["step"])
            count += st["exp_avg_sq"].numel()
        return math.sqrt(total / count) if count else 0.0
