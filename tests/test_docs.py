"""The documentation holds together: docs/flags.md is what vitprune/config.py generates, and
every relative link, #anchor and image in README.md, BENCHMARKS.md and docs/ resolves."""
import os
import re
import subprocess
import sys
from pathlib import Path

from vitprune.__main__ import FLAGS_PAGE_COMMAND, default_text, flags_page
from vitprune.config import FIELDS

REPO = Path(__file__).parent.parent
FLAGS_PAGE = REPO / "docs" / "flags.md"


def doc_files(root: Path = REPO) -> list:
    return [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]


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


# ---- links, anchors and images ------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code spans blanked out."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"(`+)(?:(?!\1).)+?\1", lambda m: " " * len(m.group(0)), line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links as their text, no code ticks or emphasis
    marks), lowercase, punctuation dropped except hyphens and underscores, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading's slug in `path`; a repeated slug gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(files: list, root: Path = REPO) -> list:
    """'FILE:LINE: target (why)' for every relative link or image whose file does not exist or
    whose #anchor is no heading of its target file; http(s) and mailto links are not checked."""
    problems = []
    for path in files:
        for number, line in prose_lines(path.read_text()):
            for image, _, target in LINK.findall(line):
                if not target or re.match(r"(https?|mailto):", target, re.I):
                    continue
                where = f"{path.relative_to(root)}:{number}: {'image ' if image else ''}{target}"
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                if not resolved.exists():
                    problems.append(f"{where} (no such file)")
                elif image and (anchor or not resolved.is_file()):
                    problems.append(f"{where} (not an image file)")
                elif anchor:
                    if resolved.suffix != ".md" or not resolved.is_file():
                        problems.append(f"{where} (an anchor into a file that is not Markdown)")
                    elif anchor not in anchors(resolved):
                        problems.append(f"{where} (no heading with this anchor in {resolved.name})")
    return problems


def test_every_link_anchor_and_image_resolves():
    problems = broken_links(doc_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_slugs_are_githubs():
    assert slug("Equal compute: does the ticket loop beat prune-and-fine-tune?") == \
        "equal-compute-does-the-ticket-loop-beat-prune-and-fine-tune"
    assert slug("Export (`python -m vitprune bench export CHECKPOINT`)") == \
        "export-python--m-vitprune-bench-export-checkpoint"
    assert slug("The memory rule: held or streamed") == "the-memory-rule-held-or-streamed"
    assert slug("`--aug=finetune`'s data path at 224 px") == "--augfinetunes-data-path-at-224-px"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"


def test_the_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "fig.png").write_bytes(b"png")
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Notes\n\n## Notes\n\nBack to the [README](../README.md#start).\n")
    (tmp_path / "README.md").write_text("\n".join([
        "# Start", "",
        "[ok](docs/page.md) [ok](docs/page.md#notes) [ok](docs/page.md#notes-1) [ok](#start)",
        "![ok](docs/fig.png) [web](https://example.com/x.md#nowhere) [mail](mailto:a@b.c)",
        "`[code](nowhere.md)` is code, not a link", "```", "[fenced](nowhere.md)", "```",
        "[gone](docs/missing.md) [bad anchor](docs/page.md#notes-2) [bad local](#nowhere)",
        "![missing figure](docs/missing.png)"]))
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "page.md"], tmp_path)
    assert problems == ["README.md:9: docs/missing.md (no such file)",
                        "README.md:9: docs/page.md#notes-2 (no heading with this anchor in page.md)",
                        "README.md:9: #nowhere (no heading with this anchor in README.md)",
                        "README.md:10: image docs/missing.png (no such file)"]


# ---- the README is a front door ------------------------------------------------------------------

def test_readme_is_a_front_door_to_every_page():
    """README.md stays short, keeps CI's test command, and links every page of docs/; every
    page links back to it."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python -m pytest -q" in readme  # .ci/run runs the README's test command
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
        assert "](../README.md)" in "\n".join(page.read_text().splitlines()[:8]), \
            f"docs/{page.name} does not link back to the README near its top"
