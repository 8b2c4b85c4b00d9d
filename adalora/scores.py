"""Importance scores as pure functions over flat tensors.

Per entry w of A, E, B: the sensitivity I = |w ⊙ ∂L/∂w|, its EMA Ī ← β1 Ī + (1 − β1) I and the uncertainty
Ū ← β2 Ū + (1 − β2) |I − Ī| (with the Ī just updated); s = Ī ⊙ Ū. A triplet's score is
S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji) (computed by the allocator from these).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_importance(w: torch.Tensor, g: torch.Tensor, ema_ipt: torch.Tensor, ema_unc: torch.Tensor | None,
                      beta1: float, beta2: float) -> None:
    """In place: Ī ← β1 Ī + (1−β1) I and Ū ← β2 Ū + (1−β2) |I − Ī| with I = |w ⊙ g|.

    Ū uses the Ī just updated, as in the reference. One temporary of the size of ``w``.
    """
    ipt = torch.mul(w, g).abs_()  # I, the sensitivity
    ema_ipt.lerp_(ipt, 1.0 - beta1)  # β1 Ī + (1 − β1) I, one kernel
    if ema_unc is not None:
        ema_unc.lerp_(ipt.sub_(ema_ipt).abs_(), 1.0 - beta2)


@torch.no_grad()
def update_importance_finite(w: torch.Tensor, g: torch.Tensor, ema_ipt: torch.Tensor, ema_unc: torch.Tensor | None,
                             beta1: float, beta2: float) -> torch.Tensor:
    """``update_importance``, except that the EMAs stay exactly as they were when any I = |w ⊙ g| is NaN or inf
    (a NaN would stay in an EMA for good). Returns the 0-dim bool "updated" without a host sync.

    Two passes more than the plain update (a sum to test, a nan_to_num so that the gated lerp reads finite
    values): EMA + 0 · (I − EMA) is EMA exactly, but only for a finite I.
    """
    ipt = torch.mul(w, g).abs_()  # I >= 0, so the sum is finite iff every entry is (accumulated in >= fp32)
    ok = ipt.sum(dtype=torch.promote_types(ipt.dtype, torch.float32)).isfinite()
    ipt.nan_to_num_(0.0, 0.0, 0.0)
    gate = ok.to(ema_ipt.dtype)  # 0-dim: 1 updates, 0 leaves the EMAs untouched
    ema_ipt.lerp_(ipt, gate * (1.0 - beta1))
    if ema_unc is not None:
        ema_unc.lerp_(ipt.sub_(ema_ipt).abs_(), gate * (1.0 - beta2))
    return ok


def _fused_step(w, g, ema_ipt, ema_unc, beta1: float, beta2: float):
    ipt = (w * g).abs()
    new_ipt = ema_ipt + (1.0 - beta1) * (ipt - ema_ipt)
    ema_ipt.copy_(new_ipt)
    if ema_unc is not None:
        ema_unc.copy_(ema_unc + (1.0 - beta2) * ((ipt - new_ipt).abs() - ema_unc))


_COMPILED = None
FUSE_MIN_NUMEL = 1_000_000


def fused_importance_update(w: torch.Tensor, min_numel: int = FUSE_MIN_NUMEL):
    """The same update compiled into a single pass over the buffers (reads w, g, Ī, Ū once; no temporary).

    Returns ``update_importance`` (eager) when the buffers are small (compiling costs seconds once) or when
    torch.compile cannot run here; the compiled kernel is checked against the eager one before use.
    """
    global _COMPILED
    if w.numel() < min_numel:
        return update_importance
    if _COMPILED is None:
        try:
            fn = torch.compile(_fused_step, dynamic=False, fullgraph=True)
            x = torch.rand(64, device=w.device, dtype=w.dtype)
            got = [torch.zeros_like(x), torch.zeros_like(x)]
            want = [torch.zeros_like(x), torch.zeros_like(x)]
            for _ in range(2):
                fn(x, x.flip(0), *got, 0.85, 0.85)
                update_importance(x, x.flip(0), *want, 0.85, 0.85)
            ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))
            _COMPILED = torch.no_grad()(fn) if ok else False
        except Exception:  # noqa: BLE001 - no compiler, unsupported backend, ...: stay eager
            _COMPILED = False
    return _COMPILED or update_importance


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
