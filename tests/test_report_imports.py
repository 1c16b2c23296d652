"""The report (and the config, log and fmt modules it reads) import no torch: a fresh interpreter
with torch, timm and triton unimportable builds a report from tests/fixtures/report_runs."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "report_runs"

BLOCKED = '''
import sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "triton"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Blocked())
'''


def run_blocked(code, *args):
    proc = subprocess.run([sys.executable, "-c", BLOCKED + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr


def test_config_log_fmt_import_without_torch():
    run_blocked("import vitprune.config, vitprune.log, vitprune.fmt\n"
                "assert 'torch' not in sys.modules")


def test_report_builds_without_torch(tmp_path):
    run_blocked("from vitprune.report import main\n"
                "main(*sys.argv[1:3], out=sys.argv[3])\n"
                "assert not {'torch', 'timm', 'triton'} & set(sys.modules)",
                *(str(d) for d in sorted(FIXTURES.iterdir())), str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    assert "**Key result**" in md and (tmp_path / "r_cifar10_states.png").stat().st_size > 1000
