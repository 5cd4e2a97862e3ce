"""The documentation stays true to the code.

The site (mkdocs.yml, pages in docs/) builds with `mkdocs build --strict`, so a broken link,
anchor or page fails here. Every fenced code block of README.md and docs/*.md is checked by its
language:

- `yaml`: an experiment config (a fragment is one too: every section has defaults), validated
  by `kd_ops.config.config_from_dict`; a block that is not one says so on the line before with
  `<!-- not a config: WHY -->`.
- `bash`, `console`, `sh`: every `kd-ops ...` line (after any `VAR=value` prefix) is parsed by the
  real CLI parser, so every command and flag shown exists; its config file must exist and its
  `--set` / `--grid` values must validate against it; `make X` names a Makefile target.
- `python`: run in a subprocess, in a temporary directory holding a copy of `examples/`; a block
  that needs a fixture or is too slow says `<!-- not run: WHY -->` on the line before.
- `text`, `json`: output, marked on the line before with what produced it:
  `<!-- output of: tests/FILE.py::TEST -->` (a test that checks that output; it must exist),
  `<!-- output of: COMMAND -->` (an example run: `make X`, `kd-ops ...`, `bench/X.py`),
  `<!-- output of: the python block above -->` (compared with that block's stdout here), or
  `<!-- config error of: kd-ops ... -->` (the command's config error, reproduced here; `...` and
  `…` stand for text left out). The layout listing is `<!-- layout: TEST -->`, checked below.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kd_ops.cli.main import build_parser
from kd_ops.config.loading import config_from_dict, load_config
from kd_ops.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "console", "sh"}
OUTPUT = {"text", "json"}
KNOWN = {"yaml", "python", *SHELL, *OUTPUT}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(
    r"^\s*<!--\s*(?P<kind>not a config|not run|output of|config error of|layout):\s*(?P<what>.+?)\s*-->\s*$"
)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: tuple[str, str] | None  # (kind, what) from the HTML comment on the line before

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        assert end < len(lines), f"{page.name}:{i + 1}: code block never closed"
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mk = MARKER.match(prev)
        body = "\n".join(line[indent:] for line in lines[i + 1 : end])
        out.append(Block(page, i + 1, m["lang"], body, (mk["kind"], mk["what"]) if mk else None))
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


def of(*langs: str) -> list:
    return [pytest.param(b, id=b.where) for b in BLOCKS if b.lang in langs]


def shell_lines(text: str) -> list[list[str]]:
    """Each command line of a shell block as tokens: continuations joined, comments and
    leading VAR=value assignments dropped."""
    out, pending = [], ""
    for raw in text.split("\n"):
        line = raw.rstrip()
        if line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        tokens = shlex.split(line, comments=True)
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            tokens.pop(0)
        if tokens:
            out.append(tokens)
    return out


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_-]+):", text, re.M)}


def check_kd_ops_command(tokens: list[str], where: str) -> None:
    """The CLI parser accepts it; its config exists and its overrides validate."""
    try:
        args = build_parser().parse_args(tokens[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{shlex.join(tokens)}` is not a valid kd-ops command (exit {exc.code})")
    config = getattr(args, "config", None)
    if config is None:
        return
    assert (ROOT / config).is_file(), f"{where}: `{shlex.join(tokens)}`: no such config {config}"
    overrides = list(getattr(args, "set", None) or [])
    load_config(ROOT / config, overrides)
    for grid in getattr(args, "grid", None) or []:
        key, _, values = grid.partition("=")
        for value in values.split(","):
            load_config(ROOT / config, [*overrides, f"{key}={value}"])


# -- the site ---------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "img" / "mlflow-compare.png").is_file()


def test_every_page_is_in_the_nav_in_one_place():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = [next(iter(item.values())) for item in nav]
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(listed) == pages and len(set(listed)) == len(listed)


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert text.count("\n") <= 250
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        assert file.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in slugs, f"README links to {target}: no such heading in {path}"


def slug(heading: str) -> str:
    """Python-Markdown's toc slug."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_method_tables_list_every_method():
    from kd_ops.distill.strategies import method_names

    expected = set(method_names()) - {"none"}  # `none` is the labels-only baseline, not a method
    for page in (ROOT / "README.md", ROOT / "docs" / "methods.md"):
        rows = re.findall(r"^\| `(\w+)` \|", page.read_text(), re.M)
        assert set(rows) == expected, page.name


def test_layout_names_folders_and_modules_that_exist():
    (block,) = [b for b in BLOCKS if b.marker and b.marker[0] == "layout"]
    entries: dict[str, str] = {}
    current = None
    for line in block.text.split("\n"):
        if line and not line.startswith(" "):
            current = line.split()[0]
            entries[current] = ""
        entries[current] += " " + line
    for folder, text in entries.items():
        assert (ROOT / folder).is_dir(), f"the layout names {folder}, which does not exist"
        if folder.startswith(("kd_ops/", "flows/", "monitors/")):
            named = set(re.findall(r"\w+", text))
            modules = {p.stem for p in (ROOT / folder).glob("*.py") if not p.stem.startswith("_")}
            assert modules <= named, f"the layout of {folder} does not name {sorted(modules - named)}"
    packages = {
        f"{p.parent.relative_to(ROOT).as_posix()}/"
        for root in ("kd_ops", "flows", "monitors")
        for p in (ROOT / root).rglob("*.py")
    }
    assert packages <= set(entries), f"the layout does not list {sorted(packages - set(entries))}"


# -- the code blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in BLOCKS])
def test_block_language_and_marker(block):
    assert block.lang in KNOWN, f"{block.where}: code block language {block.lang!r}; use one of {sorted(KNOWN)}"
    kind = block.marker[0] if block.marker else None
    allowed = {
        "yaml": {None, "not a config"},
        "python": {None, "not run"},
        "text": {"output of", "config error of", "layout"},
        "json": {"output of"},
    }.get(block.lang, {None})
    assert kind in allowed, f"{block.where}: a {block.lang} block marked {kind!r}; it takes {sorted(map(str, allowed))}"


@pytest.mark.parametrize("block", of("yaml"))
def test_yaml_blocks_are_valid_configs(block):
    if block.marker:
        return
    config_from_dict(yaml.safe_load(block.text), block.where)


@pytest.mark.parametrize("block", of(*SHELL))
def test_shell_commands_exist(block):
    for tokens in shell_lines(block.text):
        if tokens[0] == "kd-ops":
            check_kd_ops_command(tokens, block.where)
        elif tokens[0] == "make":
            assert set(tokens[1:]) <= make_targets(), f"{block.where}: `{shlex.join(tokens)}`: no such target"


@pytest.fixture(scope="module")
def python_outputs(tmp_path_factory) -> dict[str, str]:
    """Runs every python block not marked `not run` once; its stdout by block."""
    out = {}
    for b in BLOCKS:
        if b.lang != "python" or b.marker:
            continue
        cwd = tmp_path_factory.mktemp("block")
        shutil.copytree(ROOT / "examples", cwd / "examples")
        (cwd / "block.py").write_text(b.text)
        proc = subprocess.run(
            [sys.executable, "block.py"], cwd=cwd, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"{b.where}: python block failed:\n{proc.stderr[-3000:]}"
        out[b.where] = proc.stdout
    return out


@pytest.mark.parametrize("block", of("python"))
def test_python_blocks_run(block, python_outputs):
    if block.marker:
        assert len(block.marker[1]) > 10, f"{block.where}: say why the block is not run"
        return
    assert block.where in python_outputs


@pytest.mark.parametrize("block", of(*OUTPUT))
def test_output_blocks_come_from_something_real(block, python_outputs, monkeypatch):
    kind, what = block.marker
    if kind == "layout":
        return  # test_layout_names_folders_and_modules_that_exist
    if kind == "config error of":
        monkeypatch.chdir(ROOT)
        tokens = shlex.split(what)
        args = build_parser().parse_args(tokens[1:])
        with pytest.raises(ConfigError) as err:
            load_config(args.config, args.set or [])
        pattern = r".*?".join(re.escape(part) for part in re.split(r"\.\.\.|…", block.text.strip()))
        assert re.fullmatch(pattern, f"kd-ops: {err.value}", re.S), f"{block.where}: kd-ops says\n{err.value}"
        return
    if what == "the python block above":
        i = BLOCKS.index(block)
        above = BLOCKS[i - 1]
        assert above.page == block.page and above.lang == "python" and not above.marker, block.where
        printed = python_outputs[above.where]
        assert printed.rstrip() == block.text.rstrip(), f"{block.where}: the block printed\n{printed}"
        return
    if "::" in what:
        file, _, name = what.partition("::")
        assert (ROOT / file).is_file(), f"{block.where}: no such test file {file}"
        assert re.search(rf"^\s*(async )?def {re.escape(name)}\(", (ROOT / file).read_text(), re.M), (
            f"{block.where}: no test {name} in {file}"
        )
        return
    tokens = shlex.split(what)
    if tokens[0] == "make":
        assert set(tokens[1:]) <= make_targets(), f"{block.where}: no such make target in {what!r}"
    elif tokens[0] == "kd-ops":
        check_kd_ops_command(tokens, block.where)
    else:
        assert (ROOT / tokens[0]).is_file(), f"{block.where}: output of {what!r}, which is not a file here"
