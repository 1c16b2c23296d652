"""Criteria, sortings, min_keep and schedules on hand-checkable cases."""

import pytest
import torch

from vitprune.data.synth import synthetic
from vitprune.model import build_model
from vitprune.importance import calibration_batches, importance, keep_elements, keep_fraction, keep_set
from vitprune.structure import Structure, apply_structure, dims


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("vit_micro", 10)  # L=4, H=4, hd=16, D=64, M=128


def set_group_weights(model, head_values, neuron_values):
    """Every weight of head (l, h) := head_values[l][h], of neuron (l, n) := neuron_values[l][n]."""
    L, H, hd, D, M = dims(model)
    with torch.no_grad():
        for l, b in enumerate(model.blocks):
            hv = torch.tensor(head_values[l], dtype=torch.float)
            b.attn.qkv.weight.view(3, H, hd, D)[:] = hv[None, :, None, None]
            b.attn.qkv.bias.view(3, H, hd)[:] = hv[None, :, None]
            b.attn.proj.weight.view(D, H, hd)[:] = hv[None, :, None]
            nv = torch.tensor(neuron_values[l], dtype=torch.float)
            b.mlp.fc1.weight[:] = nv[:, None]
            b.mlp.fc1.bias[:] = nv
            b.mlp.fc2.weight[:] = nv[None, :]


def test_magnitude_is_l1_of_group_in_and_out(model):
    L, H, hd, D, M = dims(model)
    heads = [[1, -2, 3, 4], [0.5, 0.5, 0.5, 0.5], [1, 1, 1, 1], [2, 2, 2, 2]]
    neurons = [[(l + 1) * 0.01 * (n + 1) for n in range(M)] for l in range(L)]
    set_group_weights(model, heads, neurons)
    h, n = importance(model, Structure.full(model), "magnitude")
    per_head = 3 * hd * D + 3 * hd + D * hd  # qkv rows + bias entries + proj columns
    assert torch.allclose(h[0], torch.tensor([1., 2, 3, 4]) * per_head)
    assert torch.allclose(n[1, 9], torch.tensor(2 * 0.01 * 10 * (2 * D + 1)))


def test_global_vs_layerwise_and_min_keep():
    scores = torch.tensor([[9., 8, 7, 6], [1, 2, 3, 4], [5, 5, 0, 0]])
    alive = torch.ones(3, 4, dtype=torch.bool)
    # Global, keep 50% = 6 groups; each layer first gets its best one, then the best of the rest.
    g = keep_set(scores, alive, 0.5, "global", 1)
    assert g.tolist() == [[True, True, True, True], [False, False, False, True], [True, False, False, False]]
    # min_keep=2 forces two per layer.
    g2 = keep_set(scores, alive, 0.5, "global", 2)
    assert g2.sum(1).tolist() == [2, 2, 2]
    # Layerwise keeps the best half of every layer; ties break by position.
    lw = keep_set(scores, alive, 0.5, "layerwise", 1)
    assert lw.tolist() == [[True, True, False, False], [False, False, True, True], [True, True, False, False]]


def test_selection_is_monotone(model):
    alive = torch.tensor([[True, False, True, False]] * 4)
    s = Structure(alive, torch.ones(4, 128, dtype=torch.bool))
    apply_structure(model, s)
    heads, _ = importance(model, s, "random", seed=1)
    assert torch.isinf(heads[~alive]).all()
    kept = keep_set(heads, alive, 0.75, "global", 1)  # 12 wanted, only 8 alive: keep those 8
    assert kept.equal(alive)


def test_schedules():
    assert keep_fraction("oneshot", 0, 16, 0.7) == 1.0
    assert keep_fraction("oneshot", 5, 16, 0.7) == pytest.approx(0.3)
    assert keep_fraction("geometric", 15, 16, 0.7) == pytest.approx(0.3)
    assert keep_fraction("geometric", 5, 16, 0.7) == pytest.approx(0.3 ** (5 / 15))
    assert keep_fraction("geometric", 3, 4, 0.0) == 1.0


def test_remain_counts_survivors_of_global_magnitude_prune(model):
    L, H, hd, D, M = dims(model)
    set_group_weights(model, [[l + 1] * H for l in range(L)], [[0.5] * M] * L)
    per_head_weights = 3 * hd * D + D * hd  # weights only: the unstructured prune ignores biases
    total = L * (H * per_head_weights + 2 * M * D)
    # Keep exactly block 3's head weights (the largest, value 4).
    h, n = importance(model, Structure.full(model), "remain", keep=H * per_head_weights / total)
    assert h[3].tolist() == [per_head_weights] * H
    assert h[:3].sum() == 0 and n.sum() == 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "saliency"])
def test_activation_criteria_rank_a_silenced_head_last(model, criterion):
    data = synthetic(0, sizes=(256, 32, 32))
    L, H, hd, D, M = dims(model)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.view(3, H, hd, D)[2, 3] = 0  # v of head 3 in block 1
        model.blocks[1].attn.qkv.bias.view(3, H, hd)[2, 3] = 0       # -> its output is zero
        model.blocks[2].mlp.fc1.weight[5] = 0
        model.blocks[2].mlp.fc1.bias[5] = -10                          # GELU(-10) ≈ 0
    h, n = importance(model, Structure.full(model), criterion, calibration_batches(data, 2, 64, seed=0))
    assert h[1].argmin() == 3 and h[1, 3] == pytest.approx(0, abs=1e-6)
    assert n[2].argmin() == 5 and n[2, 5] < 1e-5
    assert (h[0] > 0).all()


def test_activation_criteria_respect_dead_groups(model):
    data = synthetic(0, sizes=(256, 32, 32))
    s = Structure(torch.tensor([[True, False, True, True]] * 4), torch.ones(4, 128, dtype=torch.bool))
    apply_structure(model, s)
    h, _ = importance(model, s, "l1", calibration_batches(data, 1, 64, seed=0))
    assert torch.isinf(h[:, 1]).all() and torch.isfinite(h[:, [0, 2, 3]]).all()


def test_imp_element_masks_exact_global_sparsity(model):
    masks = keep_elements(model, Structure.full(model), 0.3)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
    # Monotone: the next prune stays inside the previous mask.
    s = Structure(torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 128, dtype=torch.bool), masks)
    apply_structure(model, s)
    masks2 = keep_elements(model, s, 0.1)
    assert all((masks2[k] <= masks[k]).all() for k in masks)
    assert sum(int(m.sum()) for m in masks2.values()) == round(0.1 * total)
