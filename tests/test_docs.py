"""README.md and docs/*.md stay true to the code.

- Every relative link and image resolves to a file, and a ``#anchor`` to a heading there.
- Every repository path shown in code (``snexp/norm/op.py``, ``configs/nas/quick.toml``) exists,
  and every dotted name (``snexp.importance_param_groups``, ``snexp.runtime.study``) imports.
- Every command line shown in code (fenced blocks and inline spans) that runs one of this
  project's entry points, ``python -m <pkg>.<verb> ...``, ``torchrun ... -m <pkg>.<verb> ...``
  or ``python benchmarks/<script>.py ...``, parses with today's flags: the entry point's
  ``main`` is called with that command line, and its argument parsing is stopped right after
  it returns, so no job runs. For config entry points (those built on
  :func:`snexp.runtime.config.parse_args`) that includes every ``--set KEY=VALUE``: the key
  must exist in that command's config and the value must parse and pass the config's checks.

Shell syntax in the docs is read as a shell would, as far as commands go: line continuations,
comments, ``VAR=value`` prefixes, ``;``/``&&``/``|``/``&`` between commands, redirections,
``for X in a b; do ... done`` (``$X`` takes the first value). Other ``$...`` expansions and a
whole-word ``<placeholder>`` become ``0``; a placeholder inside a word (``runs/<stamp>``) ``x``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # a script imports its helper modules by name
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("snexp", "nas", "stylize")  # `python -m` of anything else (pip, pytest) is not ours
SHELL_LANGS = ("", "bash", "sh", "shell", "console")

# Command lines shown in the docs that are not meant to parse, each with the reason.
ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class _Code:
    doc: Path
    line: int
    text: str
    lang: str | None  # the fence's language; None for an inline span

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^ *(`{3,}|~{3,})(.*)$")


def _split(doc: Path) -> tuple[str, list[_Code]]:
    """The prose of ``doc`` (fenced blocks blanked, line numbers kept) and its fenced blocks."""
    prose, blocks, fence, lang, start, body = [], [], None, "", 0, []
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, lang, start, body = match.group(1), match.group(2).strip(), number, []
        elif fence is not None and line.strip().startswith(fence) and not line.strip(fence[0]):
            blocks.append(_Code(doc, start + 1, "\n".join(body), lang))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
            continue
        prose.append("")
    assert fence is None, f"{doc}: a code fence opened at line {start} is never closed"
    return "\n".join(prose), blocks


def _spans(doc: Path, prose: str) -> list[_Code]:
    """Inline code spans of the prose (a span may wrap over lines: joined with a space)."""
    return [
        _Code(doc, prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()), None)
        for m in re.finditer(r"(`+)(.+?)\1", prose, flags=re.S)
    ]


_DOCS = {doc: _split(doc) for doc in DOC_FILES}
_BLOCKS = [b for _, blocks in _DOCS.values() for b in blocks]
_SPANS = [s for doc, (prose, _) in _DOCS.items() for s in _spans(doc, prose)]


# --- links ---------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    prose, _ = _DOCS.get(doc) or _split(doc)
    for line in prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _links() -> list[tuple[str, Path, str]]:
    found = []
    for doc, (prose, _) in _DOCS.items():
        text = re.sub(r"(`+).+?\1", lambda m: " " * len(m.group(0)), prose, flags=re.S)
        for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", doc, match.group(1)))
        for match in re.finditer(r"^\s*\[[^\]]+\]:\s*(\S+)", text, flags=re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", doc, match.group(1)))
    return found


@pytest.mark.parametrize(("where", "doc", "target"), _links(), ids=lambda v: str(v))
def test_link_resolves(where: str, doc: Path, target: str) -> None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked (no network)
        return
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    # a relative link points at a file of this repository
    assert file.exists(), f"{where}: {target!r} -> {file} does not exist"
    if anchor and file.suffix == ".md":
        # an anchor names a heading of the file it points into
        assert anchor in _anchors(file), (
            f"{where}: {target!r}: no heading with anchor #{anchor} in {file.name}; "
            f"anchors there: {sorted(_anchors(file))}")


def test_docs_pages_are_linked_from_readme() -> None:
    # every docs page can be reached from the door
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, d, t in _links() if d == readme}
    for page in DOC_FILES[1:]:
        assert page in linked, f"README.md does not link {page.relative_to(ROOT)}"


# --- paths and names shown in code -----------------------------------------------------------

_PATH = re.compile(
    r"(?<![\w./-])((?:snexp|nas|stylize|benchmarks|configs|tests|docs|\.ci)/[\w./-]*)")
_NAME = re.compile(r"(?<![\w./:-])((?:snexp|nas|stylize)(?:\.[A-Za-z_]\w*)+)")


def _code_items(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    items = {}
    for code in _BLOCKS + _SPANS:
        if code.lang not in (None, *SHELL_LANGS, "python"):
            continue
        for match in pattern.finditer(code.text):
            item = match.group(1).rstrip(".")
            end = code.text[match.end():match.end() + 1]
            if end in ("<", "{", "*") or "<" in item:  # a pattern, not a path
                continue
            line = code.line + code.text.count("\n", 0, match.start())
            items.setdefault(item, f"{code.doc.relative_to(ROOT)}:{line}")
    return sorted((where, item) for item, where in items.items())


@pytest.mark.parametrize(("where", "path"), _code_items(_PATH), ids=lambda v: str(v))
def test_shown_path_exists(where: str, path: str) -> None:
    # a repository path shown in the docs exists (where the run's outputs are shown, they are
    # under runs/ or <out>/, not these folders)
    assert (ROOT / path).exists(), f"{where}: {path} does not exist"


@pytest.mark.parametrize(("where", "name"), _code_items(_NAME), ids=lambda v: str(v))
def test_shown_name_imports(where: str, name: str) -> None:
    # a dotted name shown in the docs is a module, or an attribute of one
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                raise
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{where}: {name}: {obj.__name__} has no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{where}: {name}: no such module")


_SETTING = re.compile(r"^(?:--set )?([a-z_]+(?:\.[a-z_0-9]+)+) ?=")


def _settings() -> list[tuple[str, str]]:
    found = []
    for code in _SPANS:
        match = _SETTING.match(code.text)
        if match:
            found.append((code.where, match.group(1)))
    return found


@pytest.mark.parametrize(("where", "key"), _settings(), ids=lambda v: str(v))
def test_shown_setting_key_exists(where: str, key: str) -> None:
    # a config key shown on its own (`--set data.limit=2000`, `child.norm = "..."`) is a key of
    # an entry point's config
    from nas.config import RetrainConfig, SearchConfig
    from snexp.runtime.config.schema import _leaf_keys
    from stylize.apply import ApplyConfig
    from stylize.config import StylizeConfig
    from stylize.tune_loop import TuneConfig

    keys = set()
    for cls in (SearchConfig, RetrainConfig, StylizeConfig, TuneConfig, ApplyConfig):
        keys.update(_leaf_keys(cls))
    assert key in keys, f"{where}: {key} is no key of nas.search, nas.train or stylize.*"


# --- command lines ---------------------------------------------------------------------------

_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
_KEYWORDS = {"do", "then", "else", "time", "!"}


def _logical_lines(code: _Code) -> list[tuple[int, str]]:
    """``(line number, text)`` of each command line, continuation lines (``\\``) joined."""
    lines, pending, first = [], "", code.line
    for number, raw in enumerate(code.text.split("\n"), code.line):
        first = first if pending else number
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
        else:
            lines.append((first, pending + raw))
            pending = ""
    return lines + ([(first, pending)] if pending else [])


def _commands(code: _Code) -> list[tuple[str, list[str]]]:
    """The simple commands of a code block or span: ``(where, argv)``."""
    loops = re.findall(r"\bfor (\w+) in ([^;\n]+); do", code.text)
    found = []
    for number, line in _logical_lines(code):
        for var, values in loops:
            line = re.sub(rf"\$(?:{var}\b|\{{{var}\}})", values.split()[0], line)
        line = re.sub(r"\$\([^)]*\)|\$\{\w+\}|\$\$|\$\w+", "0", line)  # other expansions
        line = re.sub(r"(?<!\S)<[A-Za-z][\w .,-]*>(?!\S)", "0", line)  # --seed <seed>
        line = re.sub(r"<[A-Za-z][\w .,-]*>", "x", line)  # runs/<stamp>/optuna.db
        if not line.strip():
            continue
        line = re.sub(r"(?<=\s)\d+(?=[<>])", "", line)  # 2>&1: the descriptor is no argument
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as exc:  # an unclosed quote: not a command line
            if code.lang is None:
                continue
            raise AssertionError(f"{code.where}: cannot read {line!r}: {exc}") from None
        argv: list[str] = []
        skip = False
        for token in [*tokens, ";"]:
            if skip:
                skip = False
            elif token in _SEPARATORS:
                if argv:
                    found.append((f"{code.doc.relative_to(ROOT)}:{number}", argv))
                argv = []
            elif re.fullmatch(r"&?[<>]+&?", token):
                skip = True  # `> file`, `>& 1`: the target is the next token
            elif not argv and (token in _KEYWORDS or re.match(r"^\w+=", token)):
                continue  # `do`, VAR=value before the command
            else:
                argv.append(token)
    return found


@dataclass(frozen=True)
class _Invocation:
    where: str
    target: str  # "module:nas.search" or "script:benchmarks/nas_study.py"
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where} {self.target.split(':', 1)[1]} {shlex.join(self.argv)}"


def _invocation(where: str, argv: list[str]) -> _Invocation | None:
    if argv[0] == "torchrun" and "-m" in argv:
        rest = argv[argv.index("-m") + 1:]
        return _Invocation(where, f"module:{rest[0]}", tuple(rest[1:]))
    if argv[0] not in ("python", "python3") or len(argv) < 2:
        return None
    if argv[1] == "-m" and len(argv) > 2:
        return _Invocation(where, f"module:{argv[2]}", tuple(argv[3:]))
    if argv[1].endswith(".py"):
        return _Invocation(where, f"script:{argv[1]}", tuple(argv[2:]))
    return None


_COMMAND_SPAN = re.compile(r"^(\w+=\S+ )*(python3? |torchrun |for )")


def _invocations() -> list[_Invocation]:
    found = []
    for code in _BLOCKS + _SPANS:
        if code.lang is not None and code.lang not in SHELL_LANGS:
            continue
        if code.lang is None and not _COMMAND_SPAN.match(code.text):
            continue  # an inline span that is not a command line
        for where, argv in _commands(code):
            call = _invocation(where, argv)
            if call is None:
                continue
            kind, name = call.target.split(":", 1)
            if kind == "module" and name.split(".")[0] not in PACKAGES:
                continue
            found.append(call)
    return found


_INVOCATIONS = _invocations()


class _Parsed(Exception):
    """Raised in place of the job once the command line has parsed."""


def _entry_module(call: _Invocation):
    kind, name = call.target.split(":", 1)
    if kind == "module":
        try:
            return importlib.import_module(f"{name}.__main__")
        except ModuleNotFoundError as exc:
            if exc.name != f"{name}.__main__":
                raise
        return importlib.import_module(name)
    path = ROOT / name
    assert path.is_file(), f"{call.where}: {name} does not exist"
    assert path.parent == ROOT / "benchmarks", f"{call.where}: {name}: only benchmarks/ scripts"
    return importlib.import_module(path.stem)


@contextlib.contextmanager
def _parse_only(module, argv: list[str]):
    """Stop ``module.main`` right after it parsed ``argv``: raise :class:`_Parsed` instead.

    Every argparse parse is stopped; a config entry point's :func:`parse_args` is let run to
    its end first (argparse inside it included), so its ``--set`` keys and values are checked.
    """
    from snexp.runtime.config import cli

    saved_argv, saved_parse = sys.argv, argparse.ArgumentParser.parse_args
    config_parse = getattr(module, "parse_args", None)
    inside_config = []

    def parse_plain(self, args=None, namespace=None):
        result = saved_parse(self, args, namespace)
        if inside_config:
            return result
        raise _Parsed(result)

    def parse_config(*args, **kwargs):
        inside_config.append(True)
        try:
            result = config_parse(*args, **kwargs)
        finally:
            inside_config.pop()
        raise _Parsed(result)

    sys.argv = [getattr(module, "__file__", None) or "prog", *argv]
    argparse.ArgumentParser.parse_args = parse_plain
    if config_parse is cli.parse_args:
        module.parse_args = parse_config
    try:
        yield
    finally:
        sys.argv = saved_argv
        argparse.ArgumentParser.parse_args = saved_parse
        if config_parse is cli.parse_args:
            module.parse_args = config_parse


@pytest.mark.parametrize("call", _INVOCATIONS, ids=str)
def test_shown_command_parses(call: _Invocation, tmp_path, monkeypatch) -> None:
    if str(call) in ALLOWED:
        pytest.skip(ALLOWED[str(call)])
    monkeypatch.chdir(tmp_path)  # `--resume --out runs/x` must not find a real run here
    module = _entry_module(call)
    assert hasattr(module, "main"), f"{call.where}: {call.target} has no main()"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            with _parse_only(module, list(call.argv)):
                module.main()
        except _Parsed:
            return  # the command line parsed; nothing ran
        except SystemExit as exc:
            pytest.fail(f"{call}\nis refused (exit {exc.code}):\n{stderr.getvalue().strip()}")
    pytest.fail(f"{call}\nran to the end without parsing a command line")


def test_commands_are_found() -> None:
    # the extraction sees the commands the docs show (a broken regex would pass everything)
    targets = {c.target for c in _INVOCATIONS}
    for name in ("module:nas.search", "module:nas.train", "module:stylize.train",
                 "module:stylize.apply", "module:stylize.tune", "module:snexp.inspect",
                 "module:snexp.bench", "script:benchmarks/nas_study.py"):
        assert name in targets, f"no command line of {name} found in the docs"
    assert any("--set" in c.argv for c in _INVOCATIONS)
    assert not set(ALLOWED) - {str(c) for c in _INVOCATIONS}, "stale ALLOWED entries"
