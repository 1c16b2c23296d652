"""The Python API (docs/library.md): its page's code runs as written and does what the page
says; select/apply/compact/export on a user's own model, loop and optimizer; one keep set on
every process under torch.distributed; bad arguments in one line."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import vitprune
from vitprune.errors import ConfigError

REPO = Path(__file__).parent.parent
PAGE = REPO / "docs" / "library.md"


def page_code() -> list:
    """The ```python blocks of docs/library.md, in order."""
    return re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(), flags=re.S | re.M)


def micro():
    """A plain timm ViT of vit_micro's shapes, as a user builds it."""
    return timm.create_model("vit_tiny_patch16_224", embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                             img_size=32, patch_size=4, num_classes=10)


def dead_slices(model, structure):
    """Every tensor slice of a dead head or neuron, cut by hand from timm's layout."""
    H, hd, D = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim, model.embed_dim
    slices = []
    for l, b in enumerate(model.blocks):
        for h in (~structure.heads[l]).nonzero().flatten().tolist():
            slices += [b.attn.qkv.weight.view(3, H, hd, D)[:, h], b.attn.qkv.bias.view(3, H, hd)[:, h],
                       b.attn.proj.weight.view(D, H, hd)[:, h]]
        dead = ~structure.neurons[l]
        slices += [b.mlp.fc1.weight[dead], b.mlp.fc1.bias[dead], b.mlp.fc2.weight[:, dead]]
    return slices


def check_pruned_state(ns, widths_multiple_of: int):
    """What the page claims after a block: the compacted model computes what the masked one
    does, and dead groups stay exactly zero through more steps of the user's optimizer."""
    model, structure = ns["model"], ns["keep"]
    assert vitprune.Structure.live(model).heads.equal(structure.heads)
    assert vitprune.Structure.live(model).neurons.equal(structure.neurons)
    assert (structure.neurons.sum(1) % widths_multiple_of == 0).all()
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    small = vitprune.compact(model)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)
    assert all(bool((s == 0).all()) for s in dead_slices(model, structure))
    ns["train"](3)  # momentum buffers that were not zeroed would move the dead groups here
    assert all(bool((s == 0).all()) for s in dead_slices(model, structure))
    assert any(bool((b.mlp.fc1.weight != 0).any()) for b in model.blocks)  # the alive ones did train


def test_the_page_runs_and_does_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = page_code()
    assert len(blocks) == 2
    loop, rsst = blocks
    lines = [line for line in loop.splitlines() if line.strip()]
    assert len(lines) <= 32, f"the user loop is {len(lines)} lines"
    ns = {}
    exec(compile(loop, str(PAGE), "exec"), ns)
    model, keep = ns["model"], ns["keep"]
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    assert ns["optimizer"].param_groups[0]["momentum"] == 0.9
    # select(ratio=0.5, round_to=8): half of the neurons go, within 8/128 of half; MLP widths multiples of 8
    assert abs(1 - keep.neurons.float().mean().item() - 0.5) <= 8 / 128
    assert keep.heads.sum() == 8
    with torch.no_grad():  # the compacted model the page made computes what the model computes
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(ns["small"](x), model(x), rtol=0, atol=1e-5)
        exported = vitprune.load_exported(tmp_path / "pruned-vit")
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "pruned-vit" / "config.json").read_text())
    assert config["mlp_hidden"] == keep.neurons.sum(1).tolist()
    assert config["num_heads"] == keep.heads.sum(1).tolist()
    assert {p.name for p in (tmp_path / "pruned-vit").iterdir()} >= {
        "model.safetensors", "config.json", "model.pt2", "README.md"}
    card = (tmp_path / "pruned-vit" / "README.md").read_text()  # the card shows the widths and what went
    assert all(f"| {l} | {h} | {n} |" in card for l, (h, n) in enumerate(zip(config["num_heads"], config["mlp_hidden"])))
    assert f"| removed | 50.0% of the heads, {1 - keep.neurons.float().mean().item():.1%} of the MLP neurons |" in card
    assert str(tmp_path) not in card
    check_pruned_state(ns, 8)

    before = vitprune.Structure.live(model)
    exec(compile(rsst, str(PAGE), "exec"), ns)
    keep = ns["keep"]
    assert (keep.heads <= before.heads).all() and (keep.neurons <= before.neurons).all()  # never returns
    assert abs(1 - keep.neurons.float().mean().item() - 0.75) <= 8 / 128
    check_pruned_state(ns, 8)


def test_the_rsst_hooks_pull_the_targets_to_the_residual():
    """The penalty alone (lr 0: the optimizer moves nothing) leaves reg_residual of every
    target's norm after `steps` steps, measured on the weights; the kept groups are untouched."""
    torch.manual_seed(0)
    model = vitprune.prunable(micro())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    keep = vitprune.select(model, ratio=0.5)
    norm = lambda: torch.stack([s.detach().norm() for s in dead_slices(model, keep)]).norm()
    kept = [b.mlp.fc1.weight[keep.neurons[l]].clone() for l, b in enumerate(model.blocks)]
    start = norm()
    rsst = vitprune.RsstRegularizer(model, keep, 30, reg_residual=0.01, reg_schedule="x")
    for step in range(1, 31):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        rsst.before_step(step)
        optimizer.step()
        rsst.after_step(step)
    assert float(norm() / start) == pytest.approx(0.01, rel=1e-3)
    assert all(b.mlp.fc1.weight[keep.neurons[l]].equal(k) for (l, b), k in zip(enumerate(model.blocks), kept))
    rsst.prune(optimizer)
    assert vitprune.Structure.live(model).neurons.equal(keep.neurons) and float(norm()) == 0


def test_round_to_on_vit_small_shapes():
    """vit_small (12 blocks, MLP 1536) at ratio 0.7: every MLP width a multiple of 8, the one
    nearest the unrounded selection's width in its block, its best neurons; the heads as
    unrounded; the share removed within 8/1536 of 0.7."""
    from vitprune.model import build_model
    torch.manual_seed(0)
    model = build_model("vit_small", 10)
    plain = vitprune.select(model, ratio=0.7)
    rounded = vitprune.select(model, ratio=0.7, round_to=8)
    assert rounded.heads.equal(plain.heads)
    widths, unrounded = rounded.neurons.sum(1), plain.neurons.sum(1)
    assert (widths % 8 == 0).all() and not (unrounded % 8 == 0).all()
    for w, u in zip(widths.tolist(), unrounded.tolist()):
        assert abs(w - u) <= 4 and min(abs(m - u) for m in range(0, 1537, 8)) == abs(w - u)
        assert abs(w - u) < 4 or w > u  # a tie rounds up
    for l in range(12):  # the best by magnitude: one set holds the other
        a, b = rounded.neurons[l], plain.neurons[l]
        assert (a <= b).all() or (b <= a).all()
    achieved = 1 - int(widths.sum()) / (12 * 1536)
    assert abs(achieved - 0.7) <= 8 / 1536


def test_round_widths_min_keep_and_narrow_layers():
    from vitprune.importance import keep_set
    scores = torch.arange(30, 0, -1, dtype=torch.float).view(3, 10)  # descending: group 0 is best
    alive = torch.ones(3, 10, dtype=torch.bool)
    alive[2, 6:] = False  # layer 2 has 6 alive
    kept = keep_set(scores, alive, 0.5, "layerwise", 1, round_to=4)  # 5 each -> nearest multiple: 4 (6 alive: 4)
    assert kept.sum(1).tolist() == [4, 4, 4] and kept[:, :4].all()
    kept = keep_set(scores, alive, 0.6, "layerwise", 1, round_to=4)  # 6 -> 8 (tie up); layer 2: at most 4 alive
    assert kept.sum(1).tolist() == [8, 8, 4]
    kept = keep_set(scores, alive, 0.1, "layerwise", 3, round_to=4)  # min_keep 3 rounds up to 4
    assert kept.sum(1).tolist() == [4, 4, 4]
    narrow = torch.zeros(3, 10, dtype=torch.bool)
    narrow[:, :3] = True  # fewer alive than round_to: all of them
    assert keep_set(scores, narrow, 0.5, "global", 1, round_to=4).sum(1).tolist() == [3, 3, 3]


def test_prunable_keeps_the_optimizer_and_refuses_other_models():
    model = micro()
    params = list(model.parameters())
    assert vitprune.prunable(model) is model and list(model.parameters()) == params
    assert vitprune.prunable(model) is model  # twice: nothing more
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(ConfigError) as e:
        vitprune.prunable(swin)
    message = str(e.value)
    assert "\n" not in message and message.startswith("prunable: swin_tiny_patch4_window7_224 cannot be pruned: "
                                                      "it is a SwinTransformer, not a plain VisionTransformer")
    from vitprune.zoo import check_model  # the CLI's line for --model
    with pytest.raises(ValueError) as cli:
        check_model("swin_tiny_patch4_window7_224")
    assert str(cli.value).removeprefix("--model: ") == message.removeprefix("prunable: ")


@pytest.mark.parametrize("call,line", [
    (lambda m: vitprune.select(m, ratio=1.5), "select: ratio: 1.5 is not in [0, 1)"),
    (lambda m: vitprune.select(m, round_to=0), "select: round_to: 0 is not at least 1"),
    (lambda m: vitprune.select(m, criterion="taylor"), "select: criterion: unknown value 'taylor'; choose from"),
    (lambda m: vitprune.select(m, criterion="l2"), "select: criterion='l2' measures activations: give batches"),
    (lambda m: vitprune.RsstRegularizer(m, vitprune.select(m), 10, reg_residual=0),
     "RsstRegularizer: reg_residual: 0 is not in (0, 1]"),
    (lambda m: vitprune.select(micro()), "the model's heads and neurons are not prunable: call vitprune.prunable"),
])
def test_bad_arguments_fail_in_one_line(call, line):
    model = vitprune.prunable(micro())
    with pytest.raises(ConfigError) as e:
        call(model)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


DDP_SCRIPT = textwrap.dedent('''
    import sys, timm, torch, torch.distributed as dist
    import vitprune
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = vitprune.prunable(timm.create_model("vit_tiny_patch16_224", embed_dim=64, depth=4, num_heads=4,
                                                mlp_ratio=2.0, img_size=32, patch_size=4, num_classes=10))
    g = torch.Generator().manual_seed(100 + rank)  # every process its own batches
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    l1 = vitprune.select(model, ratio=0.5, criterion="l1", batches=batches)
    if rank == 1:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(torch.rand(p.shape))  # weights that differ from the first process's
    magnitude = vitprune.select(model, ratio=0.5)
    keep = lambda s: {"heads": s.heads, "neurons": s.neurons}  # tensors only: loaded with weights_only=True
    torch.save({"l1": keep(l1), "magnitude": keep(magnitude), "batches": batches}, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_every_process_keeps_the_same_groups(tmp_path):
    """2 processes on gloo, each with its own calibration batches (and, for magnitude, its own
    weights): both keep the same groups; the l1 keep set is the one a single process selects
    from all their batches, so both processes' batches counted."""
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "ddp.py"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    for kind in ("l1", "magnitude"):
        assert a[kind]["heads"].equal(b[kind]["heads"]) and a[kind]["neurons"].equal(b[kind]["neurons"]), kind
    torch.manual_seed(0)
    model = vitprune.prunable(micro())
    single = vitprune.select(model, ratio=0.5, criterion="l1", batches=a["batches"] + b["batches"])
    assert single.heads.equal(a["l1"]["heads"]) and single.neurons.equal(a["l1"]["neurons"])
    alone = vitprune.select(model, ratio=0.5, criterion="l1", batches=a["batches"])
    assert not alone.neurons.equal(a["l1"]["neurons"])  # the second process's batches changed the choice
    assert a["magnitude"]["neurons"].equal(vitprune.select(model, ratio=0.5).neurons)  # the first process's


@pytest.mark.slow
def test_a_round_to_run_records_prints_and_exports_its_widths(tmp_path, monkeypatch, capsys):
    """--round_to=8 on vit_micro (2 states × 1 epoch): state 1's record and structure line show
    MLP widths that are multiples of 8, the checkpoint's keep set is vitprune.select's on state
    0's weights (the loop calls it), and the export's config.json and card have the same widths."""
    from conftest import run_cli, small_data
    from vitprune import runtime
    from vitprune.deploy import masked_model, load_checkpoint
    monkeypatch.setattr(runtime, "load_data", small_data((64, 16, 16)))
    assert run_cli(monkeypatch, "run", "--method=refill", "--dataset=synthetic", "--model=vit_micro", "--ratio=0.6",
                   "--round_to=8", "--states=2", "--epochs=1", "--batch_size=32", "--optimizer=adamw", "--lr=1e-3",
                   f"--out_dir={tmp_path}", "--name=r", "--wandb=disabled") == 0
    out = capsys.readouterr().out
    run = tmp_path / "r"
    state = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert state["kind"] == "state" and state["state"] == 1
    assert all(w % 8 == 0 for w in state["mlp_widths"]) and state["mlp_widths"] != [128] * 4
    assert f"MLP widths {state['mlp_widths']}" in out
    assert abs(state["mlp_ratio_achieved"] - 0.6) <= 8 / 128
    assert state["head_ratio_achieved"] == 1 - sum(state["heads_per_layer"]) / 16
    ck = load_checkpoint(run / "checkpoints" / "state_01.pt")
    kept = vitprune.Structure.from_state_dict(ck["structure"])
    assert kept.neurons.sum(1).tolist() == state["mlp_widths"] and kept.heads.sum(1).tolist() == state["heads_per_layer"]
    trained, _ = masked_model(load_checkpoint(run / "checkpoints" / "state_00.pt"))
    selected = vitprune.select(trained, ratio=0.6, round_to=8)
    assert selected.heads.equal(kept.heads) and selected.neurons.equal(kept.neurons)
    assert run_cli(monkeypatch, "export", run / "checkpoints" / "state_01.pt", "--out", tmp_path / "export") == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["mlp_hidden"] == state["mlp_widths"] and config["num_heads"] == state["heads_per_layer"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{state['mlp_ratio_achieved']:.1%} of the MLP neurons; MLP widths in multiples of 8" in card


def test_round_to_names_its_runs_only_when_it_rounds():
    """--round_to=1 is the seed's selection: existing run names stay; any other value is another
    configuration (its hash, its report cell); it means nothing to imp and dense."""
    from vitprune.config import configuration, from_flags
    from vitprune.runfolder import run_name
    flags = {"dataset": "synthetic", "model": "vit_micro"}
    assert run_name(from_flags(flags)) == run_name(from_flags({**flags, "round_to": 1}))
    assert run_name(from_flags(flags)) != run_name(from_flags({**flags, "round_to": 8}))
    assert configuration(from_flags({**flags, "round_to": 8}).to_dict())["round_to"] == 8
    with pytest.raises(ConfigError, match=re.escape("--round_to: applies only with --method=refill|rsst")):
        from_flags({**flags, "method": "imp", "round_to": 8})
