"""--dataset=folder:PATH: ImageFolder trees of PNG files written here, decoded once and cached;
the streaming path (--data_loader=stream) against the tensor path; bad folders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_mid_state, run_cli
from vitprune.config import from_flags
from vitprune.data import load_data
from vitprune.data.core import LoopData, train_batches
from vitprune.data.stream import StreamData
from vitprune.data import folder as folder_module
from vitprune.data import images
from vitprune.data.images import decode

CLASSES = ("cat", "dog", "fox")
MODES = ("RGB", "L", "RGBA")  # colour, grayscale, with alpha


def write_images(folder, n, label, seed):
    """n PNG files of odd sizes, cycling through RGB, grayscale and RGBA; the class shows in the
    colour (and the brightness), under noise, so a model can learn it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = np.roll(np.array([200.0, 60.0, 60.0]), label)
    for i in range(n):
        mode = MODES[i % 3]
        h, w = rng.integers(13, 40, 2)
        rgb = np.clip(colour * (0.6 + 0.2 * label) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        if mode == "L":
            img = rgb.mean(2).astype(np.uint8)
        elif mode == "RGBA":
            img = np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], 2)
        else:
            img = rgb
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")


def write_tree(root, counts: dict):
    """root/SPLIT/CLASS/*.png with counts[SPLIT] + class index images per class (SPLIT '' =
    root/CLASS, the single-folder layout)."""
    for s, (split, n) in enumerate(counts.items()):
        for c, name in enumerate(CLASSES):
            write_images(root / split / name, n + c, c, seed=100 * s + c)
    return root


def files_on_disk(folder):
    return sorted(str(p) for p in folder.rglob("*.png"))


def folder_flags(root, **flags):
    return {"dataset": f"folder:{root}", "model": "vit_micro", "img_size": 16, "patch_size": 4, "batch_size": 16,
            **flags}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("images"), {"train": 40, "val": 8, "test": 6})


@pytest.mark.parametrize("layout", ["train/val/test", "train/val", "train/test", "single"])
def test_split_sizes_follow_the_files_on_disk(tmp_path, layout):
    counts = {"train/val/test": {"train": 20, "val": 4, "test": 3}, "train/val": {"train": 20, "val": 4},
              "train/test": {"train": 20, "test": 3}, "single": {"": 30}}[layout]
    root = write_tree(tmp_path / "set", counts)
    d = load_data(from_flags(folder_flags(root, data_dir=str(tmp_path / "data"), val_size=0.1)))
    n = {split: len(files_on_disk(root / split)) for split in counts}
    assert d.classes == CLASSES and d.num_classes == 3 and d.train_x.shape[1:] == (3, 16, 16)
    sizes = (len(d.train_y), len(d.val_y), len(d.test_y))
    if layout == "train/val/test":
        assert sizes == (n["train"], n["val"], n["test"])
    elif layout in ("train/val", "train/test"):  # val carved from train; the held-out folder is the test split
        held_out = layout.split("/")[1]
        assert sizes == (n["train"] - round(0.1 * n["train"]), round(0.1 * n["train"]), n[held_out])
    else:  # a single folder: val and test carved, --val_size each, together every file once
        v = round(0.1 * n[""])
        assert sizes == (n[""] - 2 * v, v, v)
        per_class = [len(files_on_disk(root / name)) for name in CLASSES]
        labels = torch.cat([d.train_y, d.val_y, d.test_y])
        assert torch.bincount(labels, minlength=3).tolist() == per_class
        other_seed = load_data(from_flags(folder_flags(root, data_dir=str(tmp_path / "data"), seed=1)))
        assert not torch.equal(other_seed.val_y, d.val_y) or not torch.equal(other_seed.val_x, d.val_x)
    # The test images are exactly the decoded files they come from (in ImageFolder's order when given).
    if layout != "single":
        test_dir = root / ("val" if layout == "train/val" else "test")
        expected = torch.stack([decode(f, 16) for f in files_on_disk(test_dir)])
        assert torch.equal(d.test_x, expected)
        assert d.test_y.tolist() == [CLASSES.index(os.path.basename(os.path.dirname(f)))
                                     for f in files_on_disk(test_dir)]


def test_decode_gives_rgb_squares_of_the_shorter_side():
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_image
    img = Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30))  # grayscale, 30 wide
    path = f"/tmp/vitprune_decode_{os.getpid()}.png"
    img.save(path)
    try:
        x = decode(path, 10)
        gray = decode_image(path)  # [1, 20, 30]
        expected = TF.center_crop(TF.resize(gray, [10], antialias=True), [10, 10]).expand(3, 10, 10)
    finally:
        os.remove(path)
    assert x.shape == (3, 10, 10) and x.dtype == torch.uint8 and torch.equal(x, expected)



def test_a_changed_folder_is_decoded_again(tmp_path):
    """The decode cache is keyed by the file list: a rewritten or an added image is decoded
    again, never read stale from the cache of the folder as it was."""
    root = write_tree(tmp_path / "images", {"train": 20, "val": 4})
    data_dir = str(tmp_path / "data")
    first = folder_module.decoded(folder_module.scan(str(root)), 16, data_dir)
    changed = root / "val" / "cat" / "img_000.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(changed)  # a black image in its place
    second = folder_module.decoded(folder_module.scan(str(root)), 16, data_dir)
    i = folder_module.scan(str(root)).sources["val"][0].index(str(changed))
    assert second["val"][i].max() == 0 and first["val"][i].max() > 0
    for k in range(3):  # three more dogs
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(root / "train" / "dog" / f"new_{k}.png")
    third = folder_module.decoded(folder_module.scan(str(root)), 16, data_dir)
    assert len(third["train"]) == len(second["train"]) + 3
    assert len(list((tmp_path / "data" / "decoded").iterdir())) == 3

# ---- the streaming path against the tensor path ----------------------------------------------

def both_paths(root, tmp_path, **flags):
    cfg = lambda loader: from_flags(folder_flags(root, data_dir=str(tmp_path / "data"), data_loader=loader, **flags))
    tensor, stream = load_data(cfg("tensor")), load_data(cfg("stream"))
    assert isinstance(stream, StreamData) and not isinstance(tensor, StreamData)
    assert isinstance(stream, LoopData) and isinstance(tensor, LoopData)  # what the loop reads, both provide
    return tensor, stream


def test_stream_sees_the_batches_of_the_tensor_path(tree, tmp_path):
    tensor, stream = both_paths(tree, tmp_path)
    for epoch in (0, 1):
        a = list(train_batches(tensor, 16, seed=5, state=1, epoch=epoch))
        b = list(train_batches(stream, 16, seed=5, state=1, epoch=epoch))
        assert len(a) == len(b) == len(tensor.train_y) // 16
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    for split in ("val", "test"):
        for (xa, ya), (xb, yb) in zip(tensor.batches(split, 7), stream.batches(split, 7)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_finetune_crops_are_the_same_on_both_paths_and_replay_from_any_step(tree, tmp_path):
    tensor, stream = both_paths(tree, tmp_path)
    tensor.crop = stream.crop = ((0.08, 1.0), (3 / 4, 4 / 3))  # what --aug=finetune sets
    a = list(train_batches(tensor, 16, seed=5, state=1, epoch=2))
    b = list(train_batches(stream, 16, seed=5, state=1, epoch=2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    rest = list(train_batches(stream, 16, seed=5, state=1, epoch=2, start_step=1))
    assert all(torch.equal(x, fx) for (x, _), (fx, _) in zip(rest, a[1:]))
    crop_flip = next(train_batches(both_paths(tree, tmp_path)[0], 16, seed=5, state=1, epoch=2))[0]
    assert not torch.equal(a[0][0], crop_flip)  # the crops are in effect


@pytest.mark.parametrize("path", ["tensor", "stream"])
def test_start_step_and_ddp_shares_replay_the_epoch(tree, tmp_path, path):
    data = dict(zip(("tensor", "stream"), both_paths(tree, tmp_path)))[path]
    full = list(train_batches(data, 16, seed=1, state=0, epoch=3))
    # Resuming at step 4 yields exactly what the uninterrupted epoch yields from there.
    rest = list(train_batches(data, 16, seed=1, state=0, epoch=3, start_step=4))
    assert len(rest) == len(full) - 4
    assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(rest, full[4:]))
    # Two processes: each takes its half of the same global batch.
    halves = [list(train_batches(data, 16, seed=1, state=0, epoch=3, rank=r, world=2, start_step=2))
              for r in (0, 1)]
    for (x0, y0), (x1, y1), (fx, fy) in zip(*halves, full[2:]):
        assert torch.equal(torch.cat([x0, x1]), fx) and torch.equal(torch.cat([y0, y1]), fy)


def test_auto_streams_what_exceeds_the_memory_budget(tree, tmp_path, monkeypatch):
    cfg = from_flags(folder_flags(tree, data_dir=str(tmp_path / "data")))
    assert not isinstance(load_data(cfg), StreamData)
    monkeypatch.setenv(folder_module.BUDGET_ENV, "1000")  # bytes: the set takes ~120 KB decoded
    assert isinstance(load_data(cfg), StreamData)


# ---- runs: the CLI on a folder, the decode cache, a streamed run killed and resumed ----------

RUN = ["--method=refill", "--model=vit_micro", "--img_size=16", "--patch_size=4", "--batch_size=16",
       "--optimizer=adamw", "--lr=1e-3", "--states=2", "--epochs=2", "--wandb=disabled"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny steps: one thread is faster than two fighting


def vitprune(*args):
    return subprocess.run([sys.executable, "-m", "vitprune", *map(str, args)], capture_output=True, text=True,
                          env=ENV)


def comparable(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tensor_run(tree, tmp_path_factory):
    """A 2-state run on the tree through the tensor path: (out_dir, data_dir, stdout)."""
    tmp = tmp_path_factory.mktemp("folder_runs")
    r = vitprune("run", f"--dataset=folder:{tree}", *RUN, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp}",
                 "--name=tensor", "--data_loader=tensor")
    assert r.returncode == 0, r.stderr
    return tmp, tmp / "data", r.stdout


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_folder_run_counts_the_files_and_reuses_the_decode_cache(tree, tensor_run, monkeypatch, capsys,
                                                                 one_thread):
    out, data_dir, stdout = tensor_run
    n = {split: len(files_on_disk(tree / split)) for split in ("train", "val", "test")}
    assert f"{n['train']} train images (PATH/train), {n['val']} val images (PATH/val), " \
           f"{n['test']} test images (PATH/test)" in stdout
    assert f"{n['train'] // 16} steps/epoch" in stdout
    cache = list((data_dir / "decoded").iterdir())
    assert len(cache) == 1 and f"decoded {sum(n.values())} images at 16 px" in stdout
    states = [r for r in comparable(out / "tensor") if r["kind"] == "state"]
    assert len(states) == 2 and states[0]["final_test_acc"] > 50  # the classes differ in colour
    for r in states:  # accuracies are whole images out of the split sizes
        assert round(r["final_val_acc"] * n["val"] / 100, 6).is_integer()
        assert round(r["final_test_acc"] * n["test"] / 100, 6).is_integer()
    # A second run decodes nothing: every decode now fails, and the run still succeeds.
    def no_decoding(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr(images, "decode", no_decoding)
    mtime = cache[0].stat().st_mtime_ns
    assert run_cli(monkeypatch, "run", f"--dataset=folder:{tree}", *RUN, "--states=1", "--epochs=1",
                   f"--data_dir={data_dir}", f"--out_dir={out}", "--name=again") == 0
    assert f"read {sum(n.values())} decoded images at 16 px from {cache[0]}" in capsys.readouterr().out
    assert cache[0].stat().st_mtime_ns == mtime and list((data_dir / "decoded").iterdir()) == cache


@pytest.mark.slow
def test_report_on_a_folder_run(tree, tensor_run, tmp_path):
    """`report` on a real folder run: files named after the folder, not after folder:PATH."""
    from vitprune import report
    out, _, _ = tensor_run
    md = tmp_path / "r.md"
    report.main(str(out / "tensor"), out=str(md))
    text = md.read_text()
    assert f"## folder:{tree}" in text and "**tensor**" in text
    for kind in ("states", "epochs"):
        png = tmp_path / f"r_{tree.name}_{kind}.png"
        assert f"]({png.name})" in text and png.stat().st_size > 1000


@pytest.mark.slow
def test_streamed_run_killed_and_resumed_equals_the_tensor_run(tree, tensor_run):
    out, data_dir, _ = tensor_run
    args = ["run", f"--dataset=folder:{tree}", *RUN, f"--data_dir={data_dir}", f"--out_dir={out}", "--name=stream",
            "--data_loader=stream"]
    kill_mid_state([sys.executable, "-m", "vitprune", *args], out / "stream", state=1, next_epoch=1, env=ENV)
    assert len([r for r in comparable(out / "stream") if r["kind"] == "state"]) == 1  # killed inside state 1
    r = vitprune(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "at state 1, epoch 1" in r.stdout
    # Same images in the same order with the same augmentation: the same numbers, bit for bit.
    assert comparable(out / "stream") == comparable(out / "tensor")


@pytest.mark.slow
def test_runs_of_one_seed_record_the_same_splits_and_state0(tmp_path, monkeypatch, one_thread):
    """Refill and RSST of one seed on a single image folder (val and test both carved with the seed)
    record the same split_fingerprint and state0_fingerprint, in summary.json and every state record:
    the report may pair them. The State-0 fingerprint is the SHA-256 of state_00.pt's weights,
    recomputed here; a run of another seed has another split."""
    import hashlib
    root = write_tree(tmp_path / "set", {"": 30})  # PATH/<class>/*: 93 images, 9 val and 9 test carved
    found = {}
    for method, seed in (("refill", 0), ("rsst", 0), ("refill", 1)):
        name = f"{method}_s{seed}"
        assert run_cli(monkeypatch, "run", f"--dataset=folder:{root}", *[f for f in RUN if "method" not in f],
                       f"--method={method}", f"--seed={seed}", "--epochs=1", f"--data_dir={tmp_path / 'data'}",
                       f"--out_dir={tmp_path / 'runs'}", f"--name={name}") == 0
        run_dir = tmp_path / "runs" / name
        summary = json.loads((run_dir / "summary.json").read_text())
        states = [r for r in comparable(run_dir) if r["kind"] == "state"]
        weights = torch.load(run_dir / "checkpoints" / "state_00.pt", weights_only=True)["model"]
        h = hashlib.sha256()
        for key in sorted(weights):
            t = weights[key].contiguous()
            h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode() + t.numpy().tobytes())
        for r in [summary, *states]:
            assert (r["split_fingerprint"], r["state0_fingerprint"]) == (summary["split_fingerprint"], h.hexdigest())
        found[name] = summary["split_fingerprint"], summary["state0_fingerprint"]
    assert found["refill_s0"] == found["rsst_s0"]
    assert found["refill_s1"][0] != found["refill_s0"][0]


# ---- bad input: one line, exit 2, nothing on disk ---------------------------------------------

def bad_tree(tmp_path, kind):
    root = tmp_path / "bad"
    if kind == "one class":
        write_images(root / "cat", 3, 0, seed=0)
    elif kind == "no images":
        for name in CLASSES:
            (root / name).mkdir(parents=True)
            (root / name / "notes.txt").write_text("not an image")
    elif kind in ("undecodable", "tiny budget", "val_size", "image too small"):
        write_tree(root, {"": 10})
        if kind == "undecodable":
            (root / "dog" / "img_004.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.mark.parametrize("kind, flags, expect", [
    ("missing", [], "error: --dataset: folder "),
    ("one class", [], "error: --dataset: "),
    ("no images", [], "error: --dataset: no images (.jpg, .jpeg, .png, .webp)"),
    ("undecodable", [], "error: --dataset: cannot decode "),
    ("tiny budget", ["--data_loader=tensor"], "error: --data_loader: {n} images at 32 px take {kib:.1f} KiB decoded, "
                                              "more than the memory budget of 1000 B"),
    ("val_size", ["--val_size=20"], "error: --val_size: 20 per split (val and test) out of {n} training images"),
    ("image too small", ["--img_size=18"], "error: --img_size: 18 is not divisible by --patch_size=4"),
])
def test_bad_folder_is_one_line_exit_2_and_nothing_created(tmp_path, monkeypatch, capsys, kind, flags, expect):
    root = bad_tree(tmp_path, kind)
    if kind == "tiny budget":
        monkeypatch.setenv(folder_module.BUDGET_ENV, "1000")  # bytes
    code = run_cli(monkeypatch, "run", f"--dataset=folder:{root}", *[f for f in RUN if "img_size" not in f],
                   *flags, "--batch_size=4", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'runs'}")
    err = capsys.readouterr().err
    n = len(files_on_disk(root))  # 3 bytes a pixel at the default 32 px
    assert code == 2 and err.count("\n") == 1 and err.startswith(expect.format(n=n, kib=n * 3 * 32 * 32 / 1024)), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


# ---- links, truncated and oversized images: counted once, or named in one line before training --

def test_a_symlink_loop_counts_each_image_once(tmp_path):
    """cat/loop -> .. leads back to the root: without cycle detection 6 images became 246 and
    the dog images were labelled cat."""
    root = tmp_path / "set"
    write_images(root / "cat", 3, 0, seed=0)
    write_images(root / "dog", 3, 1, seed=1)
    (root / "cat" / "loop").symlink_to("..")
    (root / "cat" / "dogs").symlink_to("../dog")  # a class reached twice: counted once, as itself
    files, labels = folder_module.scan(str(root)).sources["all"]
    assert len(files) == 6 and sorted(map(os.path.realpath, files)) == files_on_disk(root)
    assert [CLASSES[label] for label in labels] == [os.path.basename(os.path.dirname(f)) for f in files]


def test_symlinked_folders_are_followed(tmp_path):
    """Datasets often live behind links: a linked class folder and a linked folder inside a class."""
    root, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    write_images(root / "cat", 3, 0, seed=0)
    write_images(elsewhere / "dogs", 4, 1, seed=1)
    write_images(elsewhere / "more_cats", 2, 0, seed=2)
    (root / "dog").symlink_to(elsewhere / "dogs")
    (root / "cat" / "more").symlink_to(elsewhere / "more_cats")
    layout = folder_module.scan(str(root))
    files, labels = layout.sources["all"]
    assert layout.classes == ["cat", "dog"] and len(files) == 9
    assert [CLASSES[label] for label in labels].count("cat") == 5
    dogs = {os.path.realpath(f) for f, label in zip(files, labels) if label == 1}
    assert dogs == set(files_on_disk(elsewhere / "dogs"))


def write_jpegs(root, per_class=8):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = np.clip(np.roll([200.0, 60.0, 60.0], c) + rng.normal(0, 40, (20, 24, 3)), 0, 255)
            Image.fromarray(rgb.astype(np.uint8)).save(root / name / f"img_{i:03d}.jpg", quality=90)
    return root


def truncate(path):
    """Cut a JPEG half-way through its image data: the header, which PIL checks, stays whole."""
    data = path.read_bytes()
    start = data.index(b"\xff\xda")  # start of scan
    path.write_bytes(data[:start + (len(data) - start) // 2])


@pytest.mark.parametrize("loader", ["tensor", "stream"])
@pytest.mark.parametrize("kind", ["dangling link", "truncated jpeg", "over the pixel limit"])
def test_a_bad_image_is_named_in_one_line_before_training(tmp_path, monkeypatch, capsys, loader, kind):
    root = write_jpegs(tmp_path / "set")
    bad, flags = root / "dog" / "img_005.jpg", []
    if kind == "dangling link":
        bad = root / "dog" / "gone.jpg"
        bad.symlink_to(tmp_path / "nowhere.jpg")
        expect = f"error: --dataset: {bad} is a link to {tmp_path / 'nowhere.jpg'}, which does not exist"
    elif kind == "truncated jpeg":
        truncate(bad)
        expect = f"error: --dataset: cannot decode {bad} ("
    else:  # every other image is 24 x 20 = 480 pixels
        Image.fromarray(np.full((30, 24, 3), 90, np.uint8)).save(bad, quality=90)
        flags = ["--max_image_pixels=600"]
        expect = f"error: --max_image_pixels: {bad} is 24x30 = 720 pixels, more than 600"
    code = run_cli(monkeypatch, "run", f"--dataset=folder:{root}", *[f for f in RUN if "img_size" not in f],
                   *flags, f"--data_loader={loader}", "--batch_size=4", "--val_size=2",
                   f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'runs'}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(expect), err
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "data").rglob("*.pt"))


def test_the_pixel_limit_default_is_pils():
    from PIL import Image
    from vitprune.config import Config
    assert Config().max_image_pixels == Image.MAX_IMAGE_PIXELS
