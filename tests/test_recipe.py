"""The fine-tuning recipe (--aug=finetune), distillation (--distill) and compute accounting
(train_flops / train_time_s in the records)."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from vitprune import train
from vitprune import runtime
from vitprune.config import Config, from_flags
from vitprune.errors import ConfigError
from vitprune.data.augment import Mixer, crop_boxes, resized_crop
from vitprune.data.core import Data, finetune_input, model_input
from vitprune.data.synth import synthetic
from vitprune.distill import load_teacher, training_loss
from vitprune.kernels.reference import masked_linear
from vitprune.model import build_model
from vitprune.step import make_optimizer
from vitprune.structure import Structure
from vitprune.zoo import ALIASES

from conftest import run_cli, small_data

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


# ---- random-resized crop -----------------------------------------------------------------

def torchvision_boxes(n, height, width, scale=SCALE, ratio=RATIO):
    torch.manual_seed(1)
    img = torch.zeros(3, height, width)
    return torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("height, width", [(64, 64), (40, 96)])
def test_crop_boxes_lie_inside_and_match_torchvision_in_distribution(height, width):
    n = 4000
    ours = crop_boxes(n, height, width, SCALE, RATIO, torch.Generator().manual_seed(0))
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    theirs = torchvision_boxes(n, height, width)
    area = lambda b: (b[:, 2] * b[:, 3]).double() / (height * width)
    aspect = lambda b: (b[:, 3] / b[:, 2]).double()
    centre = lambda b: ((b[:, 1] + b[:, 3] / 2) / width).double()
    for stat in (area, aspect, centre):  # fixed seeds: the p-values are fixed too
        assert ks_2samp(stat(ours).numpy(), stat(theirs).numpy()).pvalue > 0.01, stat
    # The test has the power to see a wrong range: a smallest scale of 0.16 instead of 0.08.
    wrong = crop_boxes(n, height, width, (0.16, 1.0), RATIO, torch.Generator().manual_seed(0))
    assert ks_2samp(area(wrong).numpy(), area(theirs).numpy()).pvalue < 1e-6


def test_resized_crop_samples_only_inside_its_box():
    size, out = 64, 48
    ramp = torch.arange(size, dtype=torch.uint8) * 4  # the pixel value says where it is
    x = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                     torch.full((size, size), 200, dtype=torch.uint8)])[None].repeat(64, 1, 1, 1)
    boxes = crop_boxes(64, size, size, SCALE, RATIO, torch.Generator().manual_seed(3))
    flips = torch.arange(64) % 2 == 0
    y = resized_crop(x, boxes, flips, out)
    assert ((y[:, 2] - 200).abs() < 1e-3).all()
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        assert 4 * left - 1e-3 <= y[b, 0].min() and y[b, 0].max() <= 4 * (left + w - 1) + 1e-3
        assert 4 * top - 1e-3 <= y[b, 1].min() and y[b, 1].max() <= 4 * (top + h - 1) + 1e-3
        cols = y[b, 0, 0]  # the column ramp runs right to left where flipped
        assert (cols.diff() <= 1e-4).all() if flips[b] else (cols.diff() >= -1e-4).all()


def test_resized_crop_of_the_whole_image_is_torchvision_resize():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32]] * 4)
    ref = F.interpolate(x.float(), size=(96, 96), mode="bilinear", align_corners=False)
    no_flip = resized_crop(x, boxes, torch.zeros(4, dtype=torch.bool), 96)
    assert (no_flip - ref).abs().max() < 1e-3
    assert (resized_crop(x, boxes, torch.ones(4, dtype=torch.bool), 96) - ref.flip(-1)).abs().max() < 1e-3
    # Any box: torchvision's crop, then resize (bilinear upsampling: antialiasing changes nothing).
    boxes = crop_boxes(4, 32, 32, SCALE, RATIO, torch.Generator().manual_seed(5))
    ours = resized_crop(x, boxes, torch.zeros(4, dtype=torch.bool), 96)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[b:b + 1, :, top:top + h, left:left + w].float(), size=(96, 96), mode="bilinear",
                            align_corners=False)
        assert (ours[b:b + 1] - ref).abs().max() < 1e-2


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_downsampling_crop_is_torchvisions_antialiased_resize_of_its_box(interpolation):
    """CIFAR's 32 px at --img_size=16: the crop is antialiased as evaluation's resize is; a crop
    resampled without antialiasing (the old grid_sample) is told apart."""
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 32, 32], [2, 3, 28, 24], [5, 0, 27, 32], [0, 6, 30, 26], [1, 1, 31, 31],
                          [10, 4, 20, 22]])  # all larger than 16: downsampled
    flips = torch.tensor([False, True, False, True, False, False])
    mode = TF.InterpolationMode(interpolation)
    ours = resized_crop(x, boxes, flips, 16, interpolation)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[b].float(), top, left, h, w, [16, 16], interpolation=mode, antialias=True)
        ref = ref.flip(-1) if flips[b] else ref
        assert (ours[b] - ref).abs().max() < 1e-2, b
        aliased = F.interpolate(x[b:b + 1, :, top:top + h, left:left + w].float(), size=(16, 16),
                                mode=interpolation, align_corners=False)[0]
        assert (aliased.flip(-1) if flips[b] else aliased).sub(ref).abs().max() > 10, b
    # Evaluation's resize of a whole image (model_input) is the same rule: a crop of the whole box.
    prep = Data(*[torch.zeros(0)] * 6, num_classes=10, img_size=16, interpolation=interpolation)
    norm = lambda t: (t / 255 - 0.5) / 0.5
    assert (model_input(x, prep) - norm(resized_crop(x, boxes[:1].expand(6, 4), torch.zeros(6, dtype=torch.bool), 16,
                                                     interpolation))).abs().max() < 1e-5
    whole = TF.resize(x.float(), [16, 16], interpolation=mode, antialias=True)
    assert (model_input(x, prep) - norm(whole)).abs().max() < 1e-4
    assert (finetune_input(x, boxes, flips, prep) - norm(ours)).abs().max() < 1e-5  # the training crops


# ---- mixup / cutmix ----------------------------------------------------------------------

def test_mixup_cutmix_soft_targets_sum_to_one_and_depend_only_on_the_step():
    mixer = Mixer(0.8, 1.0, 0.1, num_classes=10)
    x0, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    np.random.seed(123)
    outer = np.random.get_state()[1].copy()
    targets = {}
    for step in range(20):
        x, t = mixer(x0.clone(), y, 0, 1, 2, step)
        assert t.shape == (8, 10) and torch.allclose(t.sum(1), torch.ones(8)) and (t >= 0).all()
        x2, t2 = mixer(x0.clone(), y, 0, 1, 2, step)
        assert torch.equal(x, x2) and torch.equal(t, t2)  # the same step mixes the same way
        targets[step] = t
    assert len({tuple(t[0].tolist()) for t in targets.values()}) > 10  # steps mix differently
    # Images are mixed in pairs (2k, 2k + 1): each half of a batch (a process's share under
    # torchrun) mixes as the whole batch does.
    for step in range(20):
        whole = mixer(x0.clone(), y, 0, 1, 2, step)
        halves = [mixer(x0[h].clone(), y[h], 0, 1, 2, step) for h in (slice(0, 4), slice(4, 8))]
        assert torch.allclose(whole[0], torch.cat([halves[0][0], halves[1][0]]))
        assert torch.equal(whole[1], torch.cat([halves[0][1], halves[1][1]]))
        assert set((whole[1][0] > 0.0101).nonzero().flatten().tolist()) <= {0, 1}  # image 0 with image 1
    assert (np.random.get_state()[1] == outer).all()  # numpy's global stream is left as it was
    _, smooth = Mixer(0.0, 0.0, 0.1, 10)(x0, y, 0, 0, 0, 0)
    assert torch.allclose(smooth.sum(1), torch.ones(8)) and smooth.max() == pytest.approx(0.91)


# ---- distillation ------------------------------------------------------------------------

def micro_teacher(tmp_path, seed=7):
    torch.manual_seed(seed)
    teacher = build_model("vit_micro", 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    return teacher


def test_distilled_loss_is_kl_plus_ce_by_hand_and_the_teacher_never_changes(tmp_path):
    reference = micro_teacher(tmp_path)
    cfg = Config(model="vit_micro", distill=str(tmp_path / "teacher.pth"), distill_temp=2.0, distill_alpha=0.3,
                 states=2, optimizer="adamw", lr=1e-2, epochs=1)
    teacher = load_teacher(cfg, tmp_path, 10, torch.device("cpu"), masked_linear)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    loss_fn = training_loss(cfg, teacher)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.randn(6, 10)
    with torch.no_grad():
        t = reference.eval()(x)
    T, a = 2.0, 0.3
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    log_p_s = logits / T - torch.log(torch.exp(logits / T).sum(1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() / 6 * T * T
    log_q = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    ce = -log_q[torch.arange(6), y].mean()
    assert loss_fn(logits, x, y).item() == pytest.approx((a * kl + (1 - a) * ce).item(), rel=1e-5)
    # Training steps move the student, never the teacher.
    torch.manual_seed(0)
    student = build_model("vit_micro", 10)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    opt, sched = make_optimizer(cfg, student, 10, torch.device("cpu"))
    import contextlib
    for step in range(3):
        train.train_step(student, opt, sched, x, y, step + 1, contextlib.nullcontext, loss_fn=loss_fn)
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
    assert not torch.equal(student.blocks[0].mlp.fc1.weight, build_model("vit_micro", 10).blocks[0].mlp.fc1.weight)


def test_bad_distill_and_recipe_flags_fail_in_one_line(tmp_path):
    for flags, needle in [({"distill": "nothere.pth"}, "--distill: 'nothere.pth' is not a readable file"),
                          ({"distill": "state0", "states": 1}, "--distill: state0 teaches states >= 1"),
                          ({"distill_alpha": 0.2}, "--distill_alpha: applies only with --distill"),
                          ({"aug": "finetune", "batch_size": 33}, "--batch_size: 33 is odd"),
                          ({"mixup_alpha": 0.2}, "--mixup_alpha: applies only with --aug=finetune"),
                          ({"aug": "cutout"}, "--aug: unknown value 'cutout'; choose from crop_flip, finetune")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("|", r"\|")):
            from_flags({"out_dir": str(tmp_path), **flags})
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    cfg = Config(model="vit_micro", distill=str(tmp_path / "bad.pth"), states=2)
    with pytest.raises(ConfigError, match="--distill: cannot read"):
        load_teacher(cfg, tmp_path, 10, torch.device("cpu"), masked_linear)
    torch.save(build_model("vit_micro", 100).state_dict(), tmp_path / "c100.pth")
    cfg = Config(model="vit_micro", distill=str(tmp_path / "c100.pth"), states=2)
    with pytest.raises(ConfigError, match="--distill: .* is not a vit_micro with 10 classes"):
        load_teacher(cfg, tmp_path, 10, torch.device("cpu"), masked_linear)


# ---- compute accounting on real (tiny) runs ----------------------------------------------

SIZES = (64, 16, 200)  # train, val, test images; batch 32: 2 steps per epoch
BATCH = 32


def hand_forward_flops(heads_alive, neurons_alive, dim=64, head_dim=16, tokens=65, patches=64, patch_px=4,
                       classes=10):
    """Multiply-adds × 2 of vit_micro's forward at 32 px for the given alive heads / neurons per
    layer: patch embedding, per layer qkv, q·kᵀ, attention·v, proj, fc1, fc2; the classifier."""
    total = 2 * patches * (3 * patch_px * patch_px) * dim + 2 * dim * classes
    for a, n in zip(heads_alive, neurons_alive):
        width = a * head_dim
        total += 2 * tokens * dim * 3 * width + 2 * tokens * tokens * width * 2 + 2 * tokens * width * dim
        total += 2 * tokens * dim * n * 2
    return total


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    runs = {"refill": [], "rsst": [], "imp": [], "refill_distill": ["--distill=state0"],
            "rsst_finetune": ["--aug=finetune", "--distill=state0"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_data", small_data(SIZES))
        for name, extra in runs.items():
            assert run_cli(mp, "run", f"--method={name.split('_')[0]}", "--dataset=synthetic", "--model=vit_micro",
                           "--ratio=0.5", "--states=2", "--epochs=1", f"--batch_size={BATCH}", "--optimizer=adamw",
                           "--lr=1e-3", f"--out_dir={out}", f"--name={name}", "--wandb=disabled", *extra) == 0
    return out


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["refill", "rsst", "imp", "refill_distill", "rsst_finetune"])
def test_train_flops_of_one_epoch_by_hand(tiny_runs, name):
    run_dir = tiny_runs / name
    epochs, states = records(run_dir, "epoch"), records(run_dir, "state")
    full = hand_forward_flops([4] * 4, [128] * 4)
    images = 2 * BATCH  # one epoch: 2 steps of 32
    assert epochs[0]["train_flops"] == 3 * full * images  # state 0: the dense network, forward + backward
    ticket = Structure.from_state_dict(torch.load(run_dir / "checkpoints" / "state_01.pt", weights_only=True)["structure"])
    assert not ticket.heads.all() or name == "imp"
    if name.startswith("refill"):  # trains the ticket
        trained = hand_forward_flops(ticket.heads.sum(1).tolist(), ticket.neurons.sum(1).tolist())
    else:  # RSST: the ticket and its targets, still alive; imp: element masks, the dense shape
        trained = full
    teacher = full if "distill" in name or "finetune" in name else 0  # State 0, dense: its forward
    assert epochs[1]["train_flops"] - epochs[0]["train_flops"] == images * (3 * trained + teacher)
    for s in (0, 1):
        assert states[s]["train_flops"] == epochs[s]["train_flops"]
        assert states[s]["train_time_s"] == epochs[s]["train_time_s"] > 0
    assert epochs[1]["train_time_s"] > epochs[0]["train_time_s"]


def plain_timm_accuracy(checkpoint, data) -> float:
    """Test accuracy (%) of a state checkpoint in timm's own VisionTransformer (dead groups are
    zero in the weights, so the dense timm model computes the pruned network)."""
    model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, qkv_bias=True, **ALIASES["vit_micro"][1])
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    with torch.inference_mode():
        pred = model.eval()((data.test_x.float() / 255 - 0.5) / 0.5).argmax(1)
    return 100.0 * (pred == data.test_y).sum().item() / len(data.test_y)


@pytest.mark.slow
def test_distilled_run_reports_the_students_accuracy(tiny_runs):
    run_dir = tiny_runs / "refill_distill"
    data = synthetic(0, sizes=SIZES)
    states = records(run_dir, "state")
    student = plain_timm_accuracy(run_dir / "checkpoints" / "state_01.pt", data)
    teacher = plain_timm_accuracy(run_dir / "checkpoints" / "state_00.pt", data)
    assert states[1]["final_test_acc"] == pytest.approx(student, abs=1e-9)
    assert states[0]["final_test_acc"] == pytest.approx(teacher, abs=1e-9)
    assert student != teacher  # the two networks are told apart on this test set
    # Distillation starts at state 1: State 0 is the plain run's; state 1 learns something else.
    plain = records(tiny_runs / "refill", "epoch")
    distilled = records(run_dir, "epoch")
    assert distilled[0]["train_loss"] == plain[0]["train_loss"]
    assert distilled[1]["train_loss"] != plain[1]["train_loss"]


# ---- exact resume with the recipe ----------------------------------------------------------

WRAPPER = ("import sys; sys.path.insert(0, 'tests'); from conftest import small_data; from vitprune import runtime; "
           "runtime.load_data = small_data((256, 32, 32)); from vitprune.__main__ import main; "
           "sys.argv = ['vitprune'] + sys.argv[1:]; main()")
RECIPE = ["run", "--method=rsst", "--dataset=synthetic", "--model=vit_micro", "--optimizer=adamw", "--lr=1e-3",
          "--states=2", "--epochs=1", "--batch_size=16", "--img_size=16", "--aug=finetune", "--distill=state0",
          "--wandb=disabled"]


def comparable(run_dir):
    """Every metric except wall-clock times."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s")}
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_sigint_mid_epoch_with_the_finetune_recipe_resumes_exactly(tmp_path):
    cmd = [sys.executable, "-c", WRAPPER, *RECIPE, f"--out_dir={tmp_path}"]
    assert subprocess.run([*cmd, "--name=whole"], capture_output=True).returncode == 0
    proc = subprocess.Popen([*cmd, "--name=stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "stopped" / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while time.time() < deadline:  # last.pt is written by rename: never torn
        ck = torch.load(last, weights_only=True) if last.exists() else {}
        if (ck.get("state"), ck.get("next_epoch")) == (1, 0):  # state 1 begins: the teacher is loaded next
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # in the middle of state 1's (distilled) epoch
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-2000:]
    ck = torch.load(last, weights_only=True)
    assert (ck["state"], ck["next_epoch"]) == (1, 0) and 0 < ck["step"] < 16
    r = subprocess.run([*cmd, "--name=stopped", "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at state 1, epoch 0, step {ck['step']}" in r.stdout
    assert comparable(tmp_path / "stopped") == comparable(tmp_path / "whole")
    whole = records(tmp_path / "whole", "state")
    assert whole[1]["train_flops"] > whole[0]["train_flops"] > 0
