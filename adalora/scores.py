"""Importance scores (facts §2) as pure functions over flat tensors."""

from __future__ import annotations

import torch


@torch.no_grad()
def update_importance(w: torch.Tensor, g: torch.Tensor, ema_ipt: torch.Tensor, ema_unc: torch.Tensor | None,
                      beta1: float, beta2: float) -> None:
    """In place: Ī ← β1 Ī + (1−β1) I and Ū ← β2 Ū + (1−β2) |I − Ī| with I = |w ⊙ g|.

    Ū uses the Ī just updated, as in the reference. One temporary of the size of ``w``.
    """
    ipt = torch.mul(w, g).abs_()  # I, the sensitivity
    ema_ipt.mul_(beta1).add_(ipt, alpha=1.0 - beta1)
    if ema_unc is not None:
        ema_unc.mul_(beta2).add_(ipt.sub_(ema_ipt).abs_(), alpha=1.0 - beta2)


def select_top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Bool mask keeping exactly ``budget`` entries: the highest scores, ties to the lower index.

    The reference masks ``S <= kthvalue(S, n - b)``, which prunes more than asked when scores
    tie; a stable sort keeps exactly b, deterministically, and needs no host sync.
    """
    n = scores.numel()
    budget = max(0, min(int(budget), n))
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if budget:
        order = torch.sort(scores, descending=True, stable=True).indices
        keep[order[:budget]] = True
    return keep


def element_scores(ema_ipt: torch.Tensor, ema_unc: torch.Tensor | None) -> torch.Tensor:
    """s = Ī ⊙ Ū (AdaLoRA) or Ī alone (the sensitivity-only ablation)."""
    return ema_ipt if ema_unc is None else ema_ipt * ema_unc
