"""Orthogonality regularizer: zero on orthogonal factors, both forms against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora import LoRALinear, SVDLinear, orthogonal_regularization


def _svd(n_in, n_out, r):
    return SVDLinear(nn.Linear(n_in, n_out), r)


def _orthogonal(layer: SVDLinear) -> None:
    with torch.no_grad():
        qa, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.r))  # (in, r), orthonormal columns
        qb, _ = torch.linalg.qr(torch.randn(layer.out_features, layer.r))  # (out, r)
        layer.lora_A.copy_(qa.T)  # orthonormal rows
        layer.lora_B.copy_(qb)  # orthonormal columns


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_zero_for_orthogonal_factors(form):
    layers = [_svd(8, 6, 3), _svd(5, 7, 4)]
    for layer in layers:
        _orthogonal(layer)
    assert orthogonal_regularization(layers, form=form).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        layers[1].lora_B[0, 0] += 0.5  # break one column: the penalty notices
    assert orthogonal_regularization(layers, form=form).item() > 1e-2


def test_both_forms_match_hand_computation_for_two_modules():
    m1, m2 = _svd(4, 3, 2), _svd(3, 5, 2)
    with torch.no_grad():
        m1.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))  # A Aᵀ = [[1,1],[1,2]]
        m1.lora_B.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # Bᵀ B = [[4,0],[0,1]]
        m2.lora_A.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))  # orthonormal rows: 0
        m2.lora_B.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))  # [[1,1],[1,1]]
    # deviations from I: m1.A [[0,1],[1,1]] -> ‖‖² = 3; m1.B [[3,0],[0,0]] -> 9; m2.A -> 0; m2.B [[0,1],[1,0]] -> 2
    sq = torch.tensor([3.0, 9.0, 0.0, 2.0])
    adapters = {"a": m1, "b": m2}
    torch.testing.assert_close(orthogonal_regularization(adapters), sq.sqrt().mean())  # default: reference
    torch.testing.assert_close(orthogonal_regularization(adapters, form="reference"), sq.sqrt().mean())
    torch.testing.assert_close(orthogonal_regularization(adapters, form="paper"), sq.sum())
    # a list of layers works as well as the dict from inject_adapters
    torch.testing.assert_close(orthogonal_regularization([m1, m2], form="paper"), torch.tensor(14.0))


def test_gradient_reaches_A_and_B_only_and_descent_reduces_it():
    layers = [_svd(8, 6, 3), _svd(6, 8, 3)]
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.5)
    opt = torch.optim.SGD(params, lr=0.1)
    r0 = orthogonal_regularization(layers)
    r0.backward()
    for layer in layers:
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
        assert layer.lora_E.grad is None
    opt.step()
    for _ in range(50):
        opt.zero_grad()
        orthogonal_regularization(layers).backward()
        opt.step()
    assert orthogonal_regularization(layers).item() < 0.5 * r0.item()


def test_lora_and_rank_zero_adapters_are_skipped():
    lora = LoRALinear(nn.Linear(4, 4), 2)
    empty = SVDLinear(nn.Linear(4, 4), 0)
    assert orthogonal_regularization([lora, empty]).item() == 0.0
    m = _svd(4, 3, 2)
    torch.testing.assert_close(orthogonal_regularization([m, lora, empty]), orthogonal_regularization([m]))


def test_unknown_form_raises():
    with pytest.raises(ValueError, match="form"):
        orthogonal_regularization([_svd(4, 4, 2)], form="frobenius")
