"""The documentation holds together: docs/flags.md is what vitprune/config.py generates."""
import os
import subprocess
import sys
from pathlib import Path

from vitprune.__main__ import FLAGS_PAGE_COMMAND, default_text, flags_page
from vitprune.config import FIELDS

REPO = Path(__file__).parent.parent
FLAGS_PAGE = REPO / "docs" / "flags.md"


# ---- the flags page -----------------------------------------------------------------------------

def test_flags_page_is_generated_from_the_configuration():
    """docs/flags.md is flags_page() as the command at its top writes it: every field, its
    default and its values, grouped as --help groups them."""
    stale = f"docs/flags.md is stale: regenerate it with `{FLAGS_PAGE_COMMAND}`"
    assert FLAGS_PAGE.read_text() == flags_page() + "\n", stale
    page = FLAGS_PAGE.read_text()
    assert FLAGS_PAGE_COMMAND in "\n".join(page.splitlines()[:12])  # named at the top
    for name, f in FIELDS.items():
        assert f"| `--{name}` | `{default_text(f.default)}` |" in page, f"--{name}: {stale}"


def test_the_flags_command_prints_the_page(tmp_path):
    command = FLAGS_PAGE_COMMAND.split(" > ")[0].split()
    assert command[:3] == ["python", "-m", "vitprune"]
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stderr == "" and r.stdout == flags_page() + "\n"
    assert not list(tmp_path.iterdir())
