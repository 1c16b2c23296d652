"""Prunable groups: counts, the compact forward, and pruned weights staying exactly zero."""
import pytest
import torch
import torch.nn.functional as F

from vitprune.config import Config
from vitprune.model import build_model
from vitprune.importance import importance, keep_set
from vitprune.structure import Structure, apply_structure, count, dims, zero_dead
from vitprune.step import make_optimizer


def random_structure(model, keep=0.5, seed=0):
    L, H, _, _, M = dims(model)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(L, H, generator=g) < keep
    heads[:, 0] = True
    neurons = torch.rand(L, M, generator=g) < keep
    neurons[:, 0] = True
    return Structure(heads, neurons)


def test_vit_small_counts_match_the_seed():
    torch.manual_seed(0)
    model = build_model("vit_small", 10)
    full = count(model, Structure.full(model))
    assert full["params_total"] == full["params_alive"] == 21_342_346  # the seed's "22M"
    heads, neurons = importance(model, Structure.full(model), "magnitude")
    s = Structure(keep_set(heads, torch.ones_like(heads, dtype=torch.bool), 0.3, "global", 1),
                  keep_set(neurons, torch.ones_like(neurons, dtype=torch.bool), 0.3, "global", 1))
    c = count(model, s)
    assert (c["heads_alive"], c["neurons_alive"]) == (22, 5530)  # round(0.3 · 72), round(0.3 · 18432)
    assert abs(c["params_alive"] - 6.6e6) / 6.6e6 < 0.05
    assert c["params_alive"] == 21_342_346 - 50 * 98_496 - 12_902 * 769
    apply_structure(model, s)
    assert sum(int((p != 0).sum()) for p in model.parameters()) <= c["params_alive"]
    # ViT-Small costs ≈ 2.84 GFLOP per image forward (8.5 per training step).
    assert full["flops_total"] == pytest.approx(2.84e9, rel=0.01)
    assert c["flops_alive"] / full["flops_total"] == pytest.approx(0.3, abs=0.03)


def test_compact_forward_equals_dense_forward_with_zeroed_groups():
    torch.manual_seed(0)
    model = build_model("vit_micro", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    s = random_structure(model)
    zero_dead(model, s)
    dense_out = model(x)  # all groups computed, dead ones are zero
    apply_structure(model, s)  # now the dead ones are skipped
    assert model.blocks[0].mlp.live is not None
    torch.testing.assert_close(model(x), dense_out, rtol=1e-5, atol=1e-5)


def dead_values(model, s):
    """Every entry that belongs to a dead group."""
    L, H, hd, D, M = dims(model)
    out = []
    for l, b in enumerate(model.blocks):
        dh = ~s.heads[l]
        out += [b.attn.qkv.weight.view(3, H, hd, D)[:, dh], b.attn.qkv.bias.view(3, H, hd)[:, dh],
                b.attn.proj.weight.view(D, H, hd)[:, dh]]
        dn = ~s.neurons[l]
        out += [b.mlp.fc1.weight[dn], b.mlp.fc1.bias[dn], b.mlp.fc2.weight[:, dn]]
    return torch.cat([t.flatten() for t in out])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_groups_stay_exactly_zero_through_training(optimizer):
    torch.manual_seed(0)
    model = build_model("vit_micro", 10)
    s = random_structure(model)
    apply_structure(model, s)
    cfg = Config(optimizer=optimizer, lr=0.05, weight_decay=0.1, momentum=0.9, epochs=1)
    opt, sched = make_optimizer(cfg, model, 5, torch.device("cpu"))
    for _ in range(5):
        loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert dead_values(model, s).abs().max() == 0
    # The optimizer state of dead entries is zero too (momentum / Adam moments).
    L, H, hd, D, M = dims(model)
    fc1 = model.blocks[0].mlp.fc1.weight
    for value in opt.state[fc1].values():
        if torch.is_tensor(value) and value.shape == fc1.shape:
            assert value[~s.neurons[0]].abs().max() == 0
    # ... and alive ones did train.
    assert model.blocks[0].mlp.fc1.weight[s.neurons[0]].abs().sum() > 0
