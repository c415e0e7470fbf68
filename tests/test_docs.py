"""The documentation: its examples run, its command-line reference shows every option, and the
site builds with `mkdocs build --strict` (no broken link or anchor, no missing API object).

A fenced ``bash`` or ``python`` block right after a line ``<!-- runnable -->`` is an example
that runs (``<!-- runnable: exit 1, expect "TEXT" -->``: it must exit 1, and its output must
say TEXT): on every page of docs/ and in README.md, each page's blocks in order, in one fresh
folder holding links to the repository's models/, examples/ and tests/ (so that the paths
a reader types from a checkout work, and what an example writes lands in the folder).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
#: what a runnable block may use from the repository, linked into its folder
LINKED = ("models", "examples", "tests")
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}

_MARKER = re.compile(r"^(?P<indent>\s*)<!--\s*runnable(?::(?P<args>.*?))?\s*-->\s*$")
_ARGS = re.compile(r'\s*(?:exit\s+(?P<exit>\d+)|expect\s+"(?P<expect>[^"]*)")\s*,?')
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)\s*(?P<lang>[\w-]*)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str  # "bash" or "python"
    code: str
    exit_code: int
    expect: tuple[str, ...] = ()  # text the output must hold

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The runnable blocks of a page; a marker that is not followed by a bash or python fence is
    an error (a typo must not silently turn an example into one that never runs)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, number = [], 0
    while number < len(lines):
        line, fence = lines[number], _FENCE.match(lines[number])
        if fence:  # skip a block that is not marked (a marker shown inside one is text)
            number = _closing(lines, number, fence, page) + 1
            continue
        marker = _MARKER.match(line)
        number += 1
        if not marker:
            continue
        following = next((i for i in range(number, len(lines)) if lines[i].strip()), None)
        fence = _FENCE.match(lines[following]) if following is not None else None
        if fence is None or fence["lang"] not in LANGUAGES:
            raise AssertionError(f"{page.relative_to(ROOT)}:{number}: a runnable marker must be followed "
                                 f"by a fenced {'/'.join(sorted(set(LANGUAGES)))} block")
        indent, end = len(fence["indent"]), _closing(lines, following, fence, page)
        code = "\n".join(text[indent:] for text in lines[following + 1:end]) + "\n"
        exit_code, expect = _arguments(marker["args"] or "", page, number)
        found.append(Block(page, following + 1, LANGUAGES[fence["lang"]], code, exit_code, expect))
        number = end + 1
    return found


def _arguments(text: str, page: Path, number: int) -> tuple[int, tuple[str, ...]]:
    """A marker's `exit N` and `expect "TEXT"` arguments (any order, comma-separated)."""
    exit_code, expect, at = 0, [], 0
    while at < len(text.rstrip()):
        match = _ARGS.match(text, at)
        if not match or match.end() == at:
            raise AssertionError(f"{page.relative_to(ROOT)}:{number}: cannot read the marker's arguments {text!r}")
        if match["exit"]:
            exit_code = int(match["exit"])
        if match["expect"] is not None:
            expect.append(match["expect"])
        at = match.end()
    return exit_code, tuple(expect)


def _closing(lines: list[str], opening: int, fence: re.Match, page: Path) -> int:
    """The line of the fence that closes the block opened at `opening`."""
    for i in range(opening + 1, len(lines)):
        if lines[i].strip() == fence["fence"] and len(lines[i]) - len(lines[i].lstrip()) == len(fence["indent"]):
            return i
    raise AssertionError(f"{page.relative_to(ROOT)}:{opening + 1}: the block is never closed")


def _pages_with_examples() -> list[Path]:
    return [page for page in PAGES if "runnable" in page.read_text(encoding="utf-8")]


def test_markers_are_well_formed_and_examples_exist():
    """Every marker opens a block; the README's three examples and the getting-started pages run."""
    every = {page: blocks(page) for page in PAGES}
    readme = every[ROOT / "README.md"]
    assert {b.language for b in readme} == {"bash", "python"}, "the README's examples are not marked runnable"
    assert any("onnxlrp compile" in b.code for b in readme) and any("InferenceSession" in b.code for b in readme)
    for page in ("getting-started/index.md", "getting-started/your-model.md", "guides/audits.md"):
        assert every[DOCS / page], f"docs/{page} has no runnable example"


def test_readme_is_a_front_door():
    """Issue 23: the README stays short; the rest lives on the site."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 250


def test_readme_test_command_is_what_ci_runs():
    """.ci/run runs the README's test command verbatim (it installs the docs extra these tests need)."""
    command = next(line for block in _fenced(ROOT / "README.md") for line in block.splitlines()
                   if "python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert '".[test,ray,docs]"' in command


def _fenced(page: Path) -> list[str]:
    """Every fenced block of a page, marked or not."""
    return re.findall(r"^```[\w-]*\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)


def _run(block: Block, folder: Path, index: int) -> subprocess.CompletedProcess:
    script = folder / f".example_{index}.{'py' if block.language == 'python' else 'sh'}"
    script.write_text(block.code, encoding="utf-8")
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-eo", "pipefail", str(script)]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # the venv's onnxlrp
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, tmp_path):
    """Every runnable block of the page, in order, in one folder: each exits as its marker says."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    for index, block in enumerate(blocks(page)):
        result = _run(block, tmp_path, index)
        output = (result.stdout + result.stderr)[-3000:]
        assert result.returncode == block.exit_code, (
            f"{block.where}: the {block.language} example exited {result.returncode}, "
            f"expected {block.exit_code}\n{block.code}\n--- output (tail) ---\n{output}")
        for text in block.expect:
            assert text in result.stdout + result.stderr, f"{block.where}: the output does not say {text!r}\n{output}"


def _hooks():
    spec = importlib.util.spec_from_file_location("onnxlrp_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_shows_every_option():
    """The generated reference names every command, argument and option (both spellings of a
    flag pair), each under its own command, with the default --help shows."""
    import typer.main

    from onnxlrp.cli import app

    try:  # typer >= 0.29 vendors click
        from typer import _click as click
    except ImportError:
        import click

    reference = _hooks().cli_reference()
    group = typer.main.get_command(app)
    root = click.Context(group, info_name="onnxlrp")
    sections = dict(re.findall(r"^## onnxlrp (\S+)\n(.*?)(?=^## onnxlrp |\Z)", reference, re.S | re.M))
    assert set(sections) == set(group.commands), "a command is missing from the reference"
    top = reference.split("\n## onnxlrp ", 1)[0]
    for param in group.params:
        for name in param.opts + param.secondary_opts:
            assert f"`{name}" in top or f" {name}" in top, f"onnxlrp {name} is missing"
    for name, command in group.commands.items():
        section, ctx = sections[name], click.Context(command, info_name=name, parent=root)
        for param in command.params:
            if type(param).__name__.endswith("Argument"):
                assert f"`{param.name.upper()}" in section, f"onnxlrp {name}: argument {param.name} is missing"
                continue
            for opt in param.opts + param.secondary_opts:
                assert re.search(rf"[`\s]{re.escape(opt)}[\s,`/]", section), f"onnxlrp {name} {opt} is missing"
            default = param.get_help_record(ctx)
            shown = re.search(r"\[default: (\(([^)]*)\)|[^;\]]*)", default[1]) if default else None
            if shown:
                assert f"default: `{shown.group(2) or shown.group(1)}`" in section, f"onnxlrp {name} {param.opts[0]}: default missing"
    assert "<!-- onnxlrp:cli -->" in (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page outside the navigation or an API
    object that does not exist fails the build. CI installs the docs extra, so there it must run."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
    if missing:
        message = f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "onnxlrp explain" in page and "--preset" in page, "the CLI reference was not rendered"
