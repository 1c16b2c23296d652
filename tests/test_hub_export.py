"""export --push and load_exported("hf-hub:ORG/NAME"), offline: the upload against a mocked
HfApi (one commit holding exactly the export's files; none when an upload fails part-way), the
load against a Hub cache laid out by hand under HF_HUB_OFFLINE=1, the card's Hub header, and
one line when there is no token, no network or a bad name."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

import vitprune
from vitprune import hub
from vitprune.config import Config
from vitprune.deploy import load_exported
from vitprune.model import build_model

from conftest import run_cli

RECORD = {"final_val_acc": 61.234, "final_test_acc": 59.876}
TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # the card only names it: nothing is downloaded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """my_run/checkpoints/state_01.pt as a run saves it: vit_micro, half of its groups pruned
    (select + apply on random weights), the state record's accuracies, --pretrained a timm tag."""
    torch.manual_seed(0)
    model = build_model("vit_micro", 10)
    keep = vitprune.select(model, ratio=0.5)
    vitprune.apply(model, keep)
    cfg = Config(model="vit_micro", dataset="cifar10", method="refill", ratio=0.5, states=2, epochs=1,
                 pretrained=TAG)
    path = tmp_path_factory.mktemp("runs") / "my_run" / "checkpoints" / "state_01.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state": 1, "model": model.state_dict(), "structure": keep.state_dict(), "config": cfg.to_dict(),
                "record": RECORD}, path)
    return path


class FakeHub:
    """The HfApi calls a push makes, against one repository in memory: `files` it holds,
    `uploaded` what was sent, `commits` what was committed. fail_on: uploading that file
    raises, as a dropped connection does."""

    def __init__(self, files=None, private=False, fail_on=None):
        self.files = dict(files or {".gitattributes": b"*.onnx filter=lfs\n"})
        self.private, self.fail_on = private, fail_on
        self.uploaded, self.commits, self.calls = {}, [], []

    def __call__(self, *args, **kwargs):  # HfApi() gives this hub
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(private=self.private)

    def list_repo_files(self, repo_id, **kwargs):
        return sorted(self.files)

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for op in additions:
            if op.path_in_repo == self.fail_on:
                raise ConnectionError("Connection reset by peer")
            self.uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        adds = {op.path_in_repo: self.uploaded[op.path_in_repo]  # a file not uploaded first cannot be committed
                for op in operations if isinstance(op, CommitOperationAdd)}
        deletes = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        self.commits.append({"repo": repo_id, "adds": adds, "deletes": deletes, "message": commit_message})
        self.files = {**{k: v for k, v in self.files.items() if k not in deletes}, **adds}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


@pytest.fixture
def logged_in(monkeypatch):
    """A token and a Hub that answers (neither is used: HfApi is mocked)."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)


def listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_makes_one_commit_of_exactly_the_exports_files(checkpoint, tmp_path, monkeypatch, logged_in, capsys):
    """The commit adds every file the export folder holds, byte for byte, and nothing else; it
    deletes the file of an earlier export the new one lacks, and leaves the repository's own."""
    fake = FakeHub({".gitattributes": b"x", "notes.md": b"ours", "model.onnx.data": b"an earlier export's"})
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", checkpoint, "--out", out, "--push=my-lab/vit-micro-refill") == 0
    exported = listing(out)
    assert sorted(exported) == ["README.md", "config.json", "model.onnx", "model.pt2", "model.safetensors"]
    assert len(fake.commits) == 1
    commit = fake.commits[0]
    assert commit["repo"] == "my-lab/vit-micro-refill" and commit["adds"] == exported
    assert commit["deletes"] == ["model.onnx.data"]
    assert fake.files == {".gitattributes": b"x", "notes.md": b"ours", **exported}
    assert fake.calls == [("create_repo", "my-lab/vit-micro-refill", None, True)]
    assert "pushed " in capsys.readouterr().out
    # the card on the model page loads from the Hub
    card = exported["README.md"].decode()
    assert 'vitprune.load_exported("hf-hub:my-lab/vit-micro-refill")' in card
    assert 'hf_hub_download("my-lab/vit-micro-refill", "model.pt2")' in card


def test_an_upload_failing_part_way_makes_no_commit(checkpoint, tmp_path, monkeypatch, logged_in, capsys):
    fake = FakeHub(fail_on="model.pt2")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", checkpoint, "--out", out, "--push=my-lab/vit-micro-refill") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: --push: uploading to my-lab/vit-micro-refill failed (ConnectionError: Connection reset by peer); "
        "no commit was made"), err
    assert fake.uploaded and not fake.commits and set(fake.files) == {".gitattributes"}
    # the local export is written whole and loads
    assert sorted(listing(out)) == ["README.md", "config.json", "model.onnx", "model.pt2", "model.safetensors"]
    assert load_exported(out)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_private_to_an_existing_public_repository_is_refused(checkpoint, tmp_path, monkeypatch, logged_in, capsys):
    fake = FakeHub(private=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    assert run_cli(monkeypatch, "export", checkpoint, "--out", tmp_path / "e", "--push=lab/m", "--private") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --private: lab/m exists and is public"), err
    assert not fake.uploaded and not fake.commits
    assert fake.calls == [("create_repo", "lab/m", True, True)]


@pytest.mark.parametrize("case", ["no token", "no network", "bad name", "private alone"])
def test_a_push_that_cannot_happen_says_so_in_one_line_before_anything_is_written(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys, case):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    flags = ["--push=lab/m"]
    if case == "no token":  # neither the variable nor a login's token file
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    elif case == "no network":
        monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    elif case == "bad name":
        flags = ["--push=lab/sub/m"]
    else:
        flags = ["--private"]
    assert run_cli(monkeypatch, "export", checkpoint, "--out", tmp_path / "export", *flags) == 2
    err = capsys.readouterr().err
    expected = {"no token": "error: --push: no Hugging Face token: log in with `hf auth login`",
                "no network": "error: --push: the Hugging Face Hub cannot be reached",
                "bad name": "error: --push: give a Hub repository as ORG/NAME",
                "private alone": "error: --private: applies only with a push to ORG/NAME"}[case]
    assert err.count("\n") == 1 and err.startswith(expected), err
    assert not (tmp_path / "export").exists() and not fake.calls and not fake.commits


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_carries_the_hubs_header_and_no_local_path(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", checkpoint, "--out", out) == 0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta.get("library_name") != "timm" and "timm" not in meta["tags"]  # timm cannot build these widths
    assert {"vitprune", "pruning", "refill"} <= set(meta["tags"]) and meta["pipeline_tag"] == "image-classification"
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["metrics"] == ["accuracy"]
    assert meta["base_model"] == f"timm/{TAG}" and meta["license"] == "apache-2.0"
    results = {r["dataset"]["split"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert results == {"validation": 61.23, "test": 59.88}  # the state record's, in %
    # the Hub's own parser reads it
    assert len(huggingface_hub.ModelCard(card).data.eval_results) == 2
    assert "| val accuracy (pruned network) | 61.23% |" in card and 'load_exported(".")' in card
    for text in (card, (out / "config.json").read_text()):
        assert str(tmp_path) not in text and "/tmp" not in text and str(Path.home()) not in text


def lay_out_hub_cache(export: Path, home: Path, repo: str) -> Path:
    """HF_HOME/hub/models--ORG--NAME as huggingface_hub leaves it after a download: the files as
    blobs named by their sha256, a snapshot of links to them, refs/main naming the snapshot."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    for folder in (root / "blobs", snapshot, root / "refs"):
        folder.mkdir(parents=True)
    for f in export.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (root / "refs" / "main").write_text(commit)
    return snapshot


LOAD = """
import sys, torch, vitprune
from vitprune.errors import ConfigError
x = torch.load("x.pt", weights_only=True)
with torch.no_grad():
    torch.save(vitprune.load_exported("hf-hub:my-lab/vit-micro-refill")(x), "hub.pt")
try:
    vitprune.load_exported("hf-hub:my-lab/not-cached")
except ConfigError as e:
    print(e)
"""


def test_load_exported_reads_the_hub_cache_offline(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", checkpoint, "--out", out) == 0
    lay_out_hub_cache(out, tmp_path / "hf", "my-lab/vit-micro-refill")
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", LOAD], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "hub.pt", weights_only=True), load_exported(out)(x))
    assert p.stdout.strip() == ("load_exported: hf-hub:my-lab/not-cached is not in the Hugging Face cache and the "
                                "Hub cannot be reached; load it once online (or set HF_HOME to a cache holding it)")
    assert json.loads((out / "config.json").read_text())["format"].startswith("vitprune-export/")
