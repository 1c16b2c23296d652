"""metrics.jsonl + W&B mirror: offline runs read back from the .wandb file, failures, modes."""
import json
import struct
import warnings

import pytest

from vitprune.config import Config
from vitprune.log import RunLog, read_metrics, record_from_wandb, resolve_wandb_mode

EPOCHS = [
    {"state": s, "epoch": e, "global_epoch": 2 * s + e, "train_loss": 2.0 - 0.1 * e, "train_acc": 30.0 + e,
     "val_acc": 40.0 + s + e, "test_acc": 39.5 + s + e, "lr": 0.01, "reg_lambda": 0.0,
     "target_norm_ratio": None if s == 0 else 0.5, "time_s": 1.25}
    for s in range(2) for e in range(2)]
STATES = [
    {"state": s, "final_val_acc": 41.0 + s, "final_test_acc": 40.5 + s, "best_val_acc": 41.0 + s,
     "best_test_acc": 40.5 + s, "best_epoch": 1, "params_alive": 1000 - 300 * s, "params_total": 1000,
     "heads_alive": 8 - 2 * s, "neurons_alive": 64 - 20 * s, "flops_alive": 5e6, "time_s": 2.5,
     **({"pre_prune_test_acc": 42.0, "target_norm_ratio": 0.25} if s else {})}
    for s in range(2)]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(var, raising=False)


def write_run(run_dir, mode="auto"):
    log = RunLog(run_dir, Config(method="rsst", dataset="synthetic", model="vit_micro").to_dict(), mode)
    for s in range(2):
        for rec in EPOCHS[2 * s:2 * s + 2]:
            log.epoch(rec)
        log.state(STATES[s])
    log.summary({"name": run_dir.name, "status": "finished", "states_done": 2})
    log.close()
    return log


def wandb_file_records(path):
    """Protobuf records of a .wandb file. It is a LevelDB log (32 KiB blocks, 7-byte chunk
    headers crc/length/type, type 1 = whole record, 2-4 = first/middle/last piece) after a
    7-byte W&B header; wandb 0.31 has no Python reader for it any more, only the Go core."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += room
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(path):
    rows = []
    for record in wandb_file_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                         for i in record.history.item})
    return rows


def test_offline_wandb_mirrors_metrics_jsonl(offline, tmp_path):
    import wandb
    run_dir = tmp_path / "synthetic_rsst_vit_micro_r0.7_s0"
    write_run(run_dir)
    wandb.teardown()  # finish() may return before wandb-core has flushed the .wandb file; this waits
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    from_wandb = [r for r in map(record_from_wandb, wandb_history(files[0])) if r]
    expected = [{k: v for k, v in r.items() if v is not None} for r in read_metrics(run_dir)]
    assert len(expected) == len(EPOCHS) + len(STATES)
    assert from_wandb == expected
    # charts are declared against global_epoch / state
    steps = {r.metric.name: r.metric.step_metric for r in wandb_file_records(files[0])
             if r.WhichOneof("record_type") == "metric"}
    assert steps["val_acc"] == "global_epoch" and steps["state/final_test_acc"] == "state"
    assert json.loads((run_dir / "wandb_id.txt").read_text())["id"] == files[0].stem.split("-")[1]


def test_resume_reuses_wandb_run_id(offline, tmp_path):
    run_dir = tmp_path / "r"
    first = write_run(run_dir)
    run_id = json.loads((run_dir / "wandb_id.txt").read_text())["id"]
    second = RunLog(run_dir, first.config, "offline")
    assert second.wandb_run.id == run_id
    second.close()


def test_a_copy_beside_its_original_gets_a_wandb_run_of_its_own(offline, tmp_path, capsys):
    """Copies share wandb_id.txt: a copy resumed while its original (on this machine) still logs
    to that W&B run gets its own, with one line; a moved folder keeps its run."""
    import shutil
    original = tmp_path / "r"
    first = write_run(original)
    run_id = json.loads((original / "wandb_id.txt").read_text())["id"]
    shutil.copytree(original, tmp_path / "copy")
    capsys.readouterr()
    copy = RunLog(tmp_path / "copy", first.config, "offline")
    assert copy.wandb_run.id != run_id
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("W&B: ")]
    assert said == [f"W&B: {tmp_path / 'copy'} is a copy of {original}, which logs to W&B run {run_id}: this copy "
                    f"logs to a W&B run of its own, {copy.wandb_run.id}"]
    own = copy.wandb_run.id
    copy.close()
    assert json.loads((tmp_path / "copy" / "wandb_id.txt").read_text())["id"] == own
    shutil.move(original, tmp_path / "moved")  # moved, not copied: the same W&B run goes on
    moved = RunLog(tmp_path / "moved", first.config, "offline")
    assert moved.wandb_run.id == run_id
    moved.close()


def test_wandb_init_failure_warns_once_and_keeps_logging(offline, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no W&B today")
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="no W&B today") as caught:
        write_run(tmp_path / "r", mode="online")  # online fails, then the offline fallback too
    assert len(caught) == 1
    assert len(read_metrics(tmp_path / "r")) == len(EPOCHS) + len(STATES)


def test_wandb_online_failure_falls_back_to_offline(offline, tmp_path, monkeypatch):
    import wandb
    real_init = wandb.init

    def init(mode, **kwargs):
        if mode == "online":
            raise ConnectionError("api.wandb.ai unreachable")
        return real_init(mode=mode, **kwargs)
    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(RuntimeWarning, match="unreachable.*logging offline, upload later with `wandb sync") as caught:
        write_run(tmp_path / "r", mode="online")
    assert len(caught) == 1
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_agent_run_id_wins(offline, tmp_path, monkeypatch):
    """Under `wandb agent` the run must be the agent's (WANDB_RUN_ID), not a stored one."""
    import wandb
    wandb.teardown()  # wandb reads the environment once per process: start afresh, as an agent's child does
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "wandb_id.txt").write_text("stored1")
    monkeypatch.setenv("WANDB_RUN_ID", "agent123")
    log = RunLog(tmp_path / "r", Config().to_dict(), "offline")
    assert log.wandb_run.id == "agent123" and json.loads((tmp_path / "r" / "wandb_id.txt").read_text())["id"] == "agent123"
    log.close()
    wandb.teardown()  # forget WANDB_RUN_ID for the next tests


def test_wandb_log_failure_warns_once(offline, tmp_path):
    log = RunLog(tmp_path / "r", Config().to_dict(), "offline")
    real_run = log.wandb_run
    log.wandb_run.log = lambda row: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.warns(RuntimeWarning, match="disk full") as caught:
        for rec in EPOCHS:
            log.epoch(rec)
    assert len(caught) == 1 and log.wandb_run is None
    assert len(read_metrics(tmp_path / "r")) == len(EPOCHS)
    real_run.finish()


def test_disabled_writes_no_wandb_files(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_run(tmp_path / "r", mode="disabled")
    assert not (tmp_path / "r" / "wandb").exists()
    assert (tmp_path / "r" / "summary.json").exists()


def test_auto_mode(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_truncate_drops_redone_work(tmp_path):
    log = RunLog(tmp_path / "r", {}, "disabled")
    for s in range(2):
        for rec in EPOCHS[2 * s:2 * s + 2]:
            log.epoch(rec)
        log.state(STATES[s])
    log.truncate(state=1, next_epoch=1)
    kept = read_metrics(tmp_path / "r")
    assert [(r["kind"], r["state"]) for r in kept] == [("epoch", 0), ("epoch", 0), ("state", 0), ("epoch", 1)]


def test_offline_by_choice_prints_no_credentials_hint(offline, tmp_path, capsys):
    write_run(tmp_path / "chosen", mode="offline")
    err = capsys.readouterr().err
    assert "W&B offline" in err and "no credentials" not in err
