"""Bad input: one clear line naming the flag, exit code 2, nothing created or touched."""
import json
import subprocess
import sys
import time

import pytest

from vitprune.__main__ import main
from vitprune.config import FIELDS, Config, from_flags
from vitprune.flags import Range
from vitprune.errors import ConfigError
from vitprune.log import wandb_group
from vitprune.runfolder import config_hash, run_name


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["vitprune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flag, value, expect", [
    ("method", "prune", "refill, rsst, imp, dense"),
    ("dataset", "mnist", "cifar10, cifar100, synthetic, folder:PATH"),
    ("dataset", "folder:/no/such/images", "folder '/no/such/images' does not exist"),
    ("img_size", "30", "30 is not divisible by --patch_size=4"),
    ("patch_size", "0", "at least 1"),
    ("val_size", "12.5", "neither a fraction below 1"),
    ("val_size", "0", "greater than 0"),
    ("data_loader", "disk", "auto, tensor, stream"),
    ("data_loader", "stream", "stream reads image folders"),
    ("model", "vit_huge", "vit_small, vit_tiny, vit_base, vit_micro"),
    ("criterion", "taylor", "magnitude, l1, l2, remain, saliency, random"),
    ("ratio", "1.0", "[0, 1)"),
    ("ratio", "-0.1", "[0, 1)"),
    ("states", "0", "at least 1"),
    ("epochs", "0", "at least 1"),
    ("rewind", "epoch:x", "init, none, random, epoch:K"),
    ("rewind", "scratch", "init, none, random, epoch:K"),
    ("retrain_lr", "fast", "final, VALUE (a number greater than 0)"),
    ("retrain_lr", "-0.001", "final, VALUE (a number greater than 0)"),
    ("pretrained", "/no/such/weights.pth", "cannot read file"),
    ("kernels", "cuda", "auto, triton, torch"),
    ("lr_rate", "0.1", "unknown flag"),
])
def test_bad_flag_is_one_line_exit_2_and_no_folder(tmp_path, monkeypatch, capsys, flag, value, expect):
    out = tmp_path / "runs"
    dataset = [] if flag == "dataset" else ["--dataset=synthetic"]
    code, err = cli(monkeypatch, capsys, "run", f"--{flag}={value}", *dataset, f"--out_dir={out}", "--wandb=disabled")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: --{flag}") and expect in err, err
    assert not out.exists()


def test_defaults_are_the_seed_recipe():
    c = Config()
    assert (c.model, c.ratio, c.states, c.epochs, c.batch_size) == ("vit_small", 0.7, 16, 60, 128)
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.lr_schedule) == ("sgd", 0.01, 0.9, 1e-4, "multistep")
    assert (c.criterion, c.sorting, c.schedule, c.rewind) == ("magnitude", "global", "oneshot", "init")
    assert (c.reg_schedule, c.reg_granularity_prune, c.exponents) == ("exp_custom_exponents", 1.0, 4.0)


def test_folder_run_names_and_groups_show_the_folder_name(tmp_path):
    (tmp_path / "flowers").mkdir()
    c = from_flags({"dataset": f"folder:{tmp_path}/flowers/", "val_size": 500, "img_size": 224, "patch_size": 16})
    assert run_name(c) == f"flowers_refill_vit_small_r0.7_s0_{config_hash(c.to_dict())}"
    assert wandb_group(c.to_dict()) == "flowers/refill/r0.7/val_size=500.0/img_size=224/patch_size=16"


def test_flag_coercion_and_derived_ratios():
    c = from_flags({"ratio": 0, "head_ratio": 0.5, "target": "both"})
    assert c.ratio == 0.0 and isinstance(c.ratio, float)
    assert (c.head_prune, c.mlp_prune) == (0.5, 0.0)
    assert from_flags({"target": "heads"}).mlp_prune == 0.0
    assert from_flags({"target": "mlp"}).head_prune == 0.0
    assert from_flags({"rewind": "epoch:3", "epochs": 5}).rewind_epoch == 3
    assert from_flags({"rewind": "none"}).rewind_epoch is None
    with pytest.raises(ConfigError, match="--rewind"):
        from_flags({"rewind": "epoch:9", "epochs": 5})
    with pytest.raises(ConfigError, match="K < --epochs"):  # state 1 would have no epoch to train
        from_flags({"rewind": "epoch:5", "epochs": 5})
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        from_flags({"resume": True, "overwrite": True})


def test_missing_cifar_names_data_dir_and_synthetic(tmp_path, monkeypatch, capsys):
    import torchvision
    def no_network(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    out = tmp_path / "runs"
    code, err = cli(monkeypatch, capsys, "run", "--dataset=cifar10", f"--data_dir={tmp_path / 'none'}",
                    f"--out_dir={out}", "--wandb=disabled")
    assert code == 2 and err.count("\n") == 1
    assert "--data_dir" in err and "--dataset=synthetic" in err
    assert not out.exists()


def test_existing_run_folder_is_refused_untouched(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "epoch"}\n')
    code, err = cli(monkeypatch, capsys, "run", "--dataset=synthetic", "--model=vit_micro",
                    f"--out_dir={tmp_path / 'runs'}", "--name=demo", "--wandb=disabled")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"kind": "epoch"}\n'
    code, err = cli(monkeypatch, capsys, "run", "--dataset=synthetic", "--model=vit_micro", "--resume",
                    f"--out_dir={tmp_path / 'runs'}", "--name=demo", "--wandb=disabled")
    assert code == 2 and err.startswith("error: --resume")
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]


def test_cli_subprocess_bad_method():
    r = subprocess.run([sys.executable, "-m", "vitprune", "run", "--method=prune"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --method: unknown value 'prune'; choose from refill, rsst, imp, dense"]


def test_rewind_to_the_last_epoch_is_refused_at_once(tmp_path):
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vitprune", "run", "--rewind=epoch:2", "--epochs=2",
                        "--dataset=synthetic", f"--out_dir={tmp_path / 'runs'}"], capture_output=True, text=True)
    assert time.monotonic() - start < 3
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --rewind: 'epoch:2' is not valid; choose from init, none, random, epoch:K with 0 <= K < --epochs (2)"]
    assert list(tmp_path.iterdir()) == []


def test_run_names_differ_by_configuration_only():
    name = lambda **flags: run_name(Config(dataset="synthetic", **flags))
    assert name() == name() and name().startswith("synthetic_refill_vit_small_r0.7_s0_")
    assert name(schedule="geometric") != name() and name(lr=0.001) != name()  # not shown, still apart
    assert name(seed=1) == name().replace("_s0_", "_s1_")  # the seed is shown; the hash leaves it out
    assert name(data_loader="tensor", wandb="disabled", out_dir="x", precision="fp32") == name()  # how, not what
    assert name(name="mine") == "mine"
    # a flag that does not apply leaves the hash alone: it cannot change what is computed
    assert config_hash({**Config().to_dict(), "reg_residual": 0.5}) == config_hash(Config().to_dict())
    assert config_hash({**Config(method="rsst").to_dict(), "reg_residual": 0.5}) != \
        config_hash(Config(method="rsst").to_dict())
    # a flag added later at a default that keeps the old behaviour leaves old names alone
    old = {k: v for k, v in Config(lr=0.001).to_dict().items() if k != "label_smoothing"}
    assert config_hash(old) == config_hash(Config(lr=0.001).to_dict())


def resumable_folder(root, **config):
    run_dir = root / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    (run_dir / "config.json").write_text(json.dumps(Config(dataset="synthetic", name="r", **config).to_dict()))
    return run_dir


def test_resume_of_a_finished_run_still_refuses_a_changed_configuration(tmp_path, monkeypatch, capsys):
    """`--resume --lr=...` on a finished run is refused in one line, not answered "nothing to
    resume" with the flag silently dropped."""
    run_dir = resumable_folder(tmp_path, lr=0.05)
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    code, err = cli(monkeypatch, capsys, "run", "--resume", f"--out_dir={tmp_path / 'runs'}", "--name=r", "--lr=0.1")
    assert code == 2 and err.startswith("error: --lr: 0.1 differs from 0.05") and err.count("\n") == 1


def test_resume_refuses_a_changed_configuration_and_warns_on_changed_execution(tmp_path, monkeypatch, capsys):
    resumable_folder(tmp_path, method="rsst", lr=0.05)
    started = []
    monkeypatch.setattr("vitprune.train.run", lambda cfg, folder=None: started.append(cfg))
    base = ["run", "--resume", f"--out_dir={tmp_path / 'runs'}", "--name=r"]
    code, err = cli(monkeypatch, capsys, *base, "--lr=0.1")
    assert code == 2 and err.startswith("error: --lr: 0.1 differs from 0.05") and not started
    code, err = cli(monkeypatch, capsys, *base, "--reg_residual=0.01")
    assert code == 2 and err.startswith("error: --reg_residual") and not started
    monkeypatch.setattr(sys, "argv", ["vitprune", *base, "--kernels=torch", "--precision=fp32", "--wandb=disabled"])
    main()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --kernels 'auto' -> 'torch', --precision 'auto' -> 'fp32'")
    assert "not be bit-identical" in err
    (cfg,) = started
    assert (cfg.method, cfg.lr, cfg.kernels, cfg.wandb, cfg.resume) == ("rsst", 0.05, "torch", "disabled", True)


@pytest.mark.parametrize("flags, message, where_it_applies", [
    ({"method": "imp", "head_ratio": 0.5}, "--head_ratio: applies only with --method=refill|rsst, not with "
                                           "--method=imp", {"method": "refill"}),
    ({"method": "dense", "target": "heads"}, "--target: applies only with --method=refill|rsst", {"method": "rsst"}),
    ({"method": "dense", "mlp_ratio": 0.2}, "--mlp_ratio: applies only with --method=refill|rsst", {"method": "rsst"}),
    ({"method": "refill", "reg_kind": "group_lasso"}, "--reg_kind: applies only with --method=rsst", {"method": "rsst"}),
    ({"method": "refill", "reg_residual": 0.1}, "--reg_residual: applies only with --method=rsst",
     {"method": "rsst"}),
    ({"method": "rsst", "reg_granularity_prune": 5.0}, "--reg_granularity_prune: applies only with --method=rsst "
                                                       "and --reg_formula=seed", {"reg_formula": "seed"}),
    ({"method": "rsst", "reg_schedule": "x", "exponents": 2.0}, "--exponents: applies only with",
     {"reg_schedule": "exp_custom_exponents"}),
    ({"optimizer": "adamw", "momentum": 0.5}, "--momentum: applies only with --optimizer=sgd", {"optimizer": "sgd"}),
    ({"states": 2, "epochs": 2, "rewind": "epoch:1", "retrain_lr": "final"},
     "--retrain_lr: applies only with --rewind=init|none|random, not with --rewind=epoch:1", {"rewind": "none"}),
    ({"states": 1, "rewind": "none", "retrain_lr": "0.001"},
     "--retrain_lr: sets the learning rate of states >= 1, and --states=1 has none", {"states": 2}),
    ({"states": 2, "rewind": "epoch:0", "pruned_epochs": 3},
     "--pruned_epochs: applies only with --rewind=init|none|random", {"rewind": "random"}),
])
def test_flags_that_cannot_apply_are_refused(flags, message, where_it_applies):
    with pytest.raises(ConfigError) as e:
        from_flags(flags)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    from_flags({**flags, **where_it_applies})


@pytest.mark.parametrize("method, formula", [("rsst", "seed"), ("refill", "residual")])
def test_resume_reads_an_older_config_with_the_values_of_then(tmp_path, monkeypatch, capsys, method, formula):
    """A config.json written before flags existed resumes with their values of then: RSST runs
    before --reg_formula used the seed's formula; elsewhere the flag keeps its default."""
    run_dir = resumable_folder(tmp_path, method=method)
    config = json.loads((run_dir / "config.json").read_text())
    for new in ("reg_formula", "reg_residual", "max_image_pixels", "retrain_lr"):
        del config[new]
    (run_dir / "config.json").write_text(json.dumps(config))
    started = []
    monkeypatch.setattr("vitprune.train.run", lambda cfg, folder=None: started.append(cfg))
    monkeypatch.setattr(sys, "argv", ["vitprune", "run", "--resume", f"--out_dir={tmp_path / 'runs'}", "--name=r"])
    main()
    err = capsys.readouterr().err
    assert len(started) == 1, err
    assert started[0].reg_formula == formula and started[0].max_image_pixels == Config().max_image_pixels
    assert "predates --reg_formula, --reg_residual, --retrain_lr, --max_image_pixels: " in err


def test_ranges_are_parsed_once_and_print_as_declared():
    for text in ("[0, 1)", "(0, inf)", "[1, inf)", "(0, 1]", "[0, inf)"):
        assert str(Range.parse(text)) == text
    r = Range.parse("[0, 1)")
    assert r.contains(0) and r.contains(0.5) and not r.contains(1) and not r.contains(float("nan"))
    assert not Range.parse("(0, inf)").contains(float("inf")) and Range.parse("(0, 1]").contains(1)
    assert isinstance(FIELDS["ratio"].metadata["range"], Range)
