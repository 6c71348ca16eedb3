"""The documentation points at things that exist: names said to live in a file are defined there, the
markdown files named in the code are in the repository (or in spec/, the specification kept beside it),
every DIT8_* environment variable the package reads is documented in a README, the README's synopses match
the commands' options, and the README's Performance numbers are ones bench/RESULTS.md records."""

from __future__ import annotations

import argparse
import ast
import re
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("runtime", "kernels", "converters")  # the folders of dit8, dit8.kernels, dit8.converters
SOURCES = sorted(p for folder in (*PACKAGE, "tests", "bench") for p in (ROOT / folder).glob("*.py"))
READMES = (ROOT / "README.md", ROOT / "csrc" / "README.md")

# "`name` in folder/file.py", "`name` of file.py" and "folder/file.py `name`" (name possibly dotted: its last
# part must be defined in the file).
_NAME_IN_FILE = re.compile(r"`(?P<n1>[A-Za-z_][\w.]*)` (?:in|of) `?(?P<f1>[\w/]+\.py)"
                           r"|(?P<f2>[\w/]+\.py)`? `(?P<n2>[A-Za-z_][\w.]*)`")


def _defined_names(path: Path) -> set[str]:
    """Every name a file binds: functions, classes, methods, assignments, attributes, parameters, imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[-1])
    return names


def _resolve(file: str) -> Path | None:
    """A file named in the docs: a path from the repository root (dit8/... as installed), or a bare name."""
    for prefix, folder in (("dit8/kernels/", "kernels/"), ("dit8/converters/", "converters/"), ("dit8/", "runtime/")):
        if file.startswith(prefix):
            file = folder + file[len(prefix):]
            break
    if (ROOT / file).is_file():
        return ROOT / file
    matches = [p for p in SOURCES if p.name == file]
    return matches[0] if len(matches) == 1 else None


def _name_references(text: str) -> list[tuple[str, str]]:
    return [(m["f1"] or m["f2"], m["n1"] or m["n2"]) for m in _NAME_IN_FILE.finditer(text)]


def test_the_reference_pattern_finds_both_spellings():
    text = "see `digest` in converters/source.py, and kernels/candidates.py `ADOPTED` (also `a.b` of x.py)"
    assert _name_references(text) == [("converters/source.py", "digest"), ("kernels/candidates.py", "ADOPTED"),
                                      ("x.py", "a.b")]


@pytest.mark.parametrize("doc", [p for p in (*SOURCES, *READMES) if p != Path(__file__).resolve()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_names_said_to_be_in_a_file_are_defined_there(doc):
    text = doc.read_text()
    missing = []
    for file, name in _name_references(text):
        path = _resolve(file)
        if path is None:
            missing.append(f"{file} (no such file) for `{name}`")
        elif name.split(".")[-1] not in _defined_names(path):
            missing.append(f"`{name}` in {file}")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {missing}"


def test_markdown_files_named_in_the_code_exist():
    in_repository = {p.relative_to(ROOT).as_posix() for p in (*ROOT.glob("*.md"), *ROOT.glob("*/*.md"))}
    bare = {Path(p).name for p in in_repository}
    missing = []
    for path in SOURCES:
        for name in set(re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b", path.read_text())):
            if not name.startswith(("spec/", "shared/spec/")) and name not in in_repository and name not in bare:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_converters_docstring_names_each_of_its_modules():
    import dit8.converters

    modules = {p.stem for p in (ROOT / "converters").glob("*.py")} - {"__init__"}
    named = set(re.findall(r"`(\w+)`", dit8.converters.__doc__))
    assert modules <= named, f"converters/ modules its docstring leaves out: {sorted(modules - named)}"


def test_every_environment_variable_the_package_reads_is_documented():
    documented = "\n".join(p.read_text() for p in READMES)
    read = set()
    for folder in PACKAGE:
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                        re.fullmatch(r"DIT8_[A-Z0-9_]+", node.value):
                    read.add(node.value)
    assert "DIT8_BACKEND" in read  # the scan sees the variables (registry.ENV_VAR)
    undocumented = sorted(name for name in read if not re.search(rf"\b{name}\b", documented))
    assert not undocumented, f"read by dit8 but in no README: {undocumented}"


# The README's synopses of the commands: the fenced block of "## Command line" (an entry per line that starts
# with "dit8 ", continued by indented lines) and the `dit8 bench dit [...]` in the prose below it.
def _readme_synopses() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    synopses: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("dit8 "):
            command, rest = line[len("dit8 "):].split(" ", 1)
            synopses[command] = rest
        elif line.strip() and synopses:
            synopses[command] += " " + line.strip()
    for match in re.finditer(r"`dit8 (bench \w+) ([^`]*)`", section):
        synopses[match[1]] = " ".join(match[2].split())
    return synopses


def _synopsis_options(synopsis: str) -> tuple[dict[str, str | None], bool]:
    """{option: its value as written, None for a switch}, and whether the synopsis ends in "..." (more
    options than it shows). A value of `a|b` or `{a,b}` lists the choices."""
    synopsis = synopsis.split("   ")[0]  # what follows a wide gap is a description
    tokens = synopsis.split()
    options: dict[str, str | None] = {}
    for i, token in enumerate(tokens):
        option = token.strip("[]").removesuffix("...").strip("[]")
        if not option.startswith("--"):
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else "|"
        takes_value = not token.rstrip(".").endswith("]") and not following.startswith(("-", "[", "|"))
        options[option] = following.removesuffix("...").rstrip("]") if takes_value else None
    return options, tokens[-1] == "..."


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    from dit8.cli import build_parser

    found = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    found[f"{name} {sub_name}".strip()] = sub
                    walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "")
    return found


def test_the_synopsis_parser_reads_values_switches_and_choices():
    options, more = _synopsis_options("X [--a {p,q}] [--b N]... [--c | --d FILE] [--e x|y] ...")
    assert options == {"--a": "{p,q}", "--b": "N", "--c": None, "--d": "FILE", "--e": "x|y"} and more
    assert _synopsis_options("[--json]     layout, variant") == ({"--json": None}, False)


def test_the_readme_synopsis_of_each_command_matches_its_options():
    synopses, parsers = _readme_synopses(), _command_parsers()
    assert {"info", "convert", "generate", "demo", "bench dit"} <= set(synopses)
    problems = []
    for command, synopsis in synopses.items():
        actions = {o: a for a in parsers[command]._actions for o in a.option_strings if o not in ("-h", "--help")}
        options, more = _synopsis_options(synopsis)
        for option, value in options.items():
            action = actions.get(option)
            if action is None:
                problems.append(f"dit8 {command} {option}: no such option")
                continue
            if (value is None) != (action.nargs == 0):
                problems.append(f"dit8 {command} {option}: " + ("takes a value" if value is None else "is a switch"))
            if value and re.search(r"[|{]", value) and action.choices is not None:  # else an example value
                listed = re.split(r"[|,]", value.strip("{}"))
                if set(listed) != set(action.choices):
                    problems.append(f"dit8 {command} {option}: README lists {listed}, it takes {list(action.choices)}")
        if not more:  # a synopsis without "..." shows every option
            left_out = sorted({a.option_strings[0] for a in actions.values()
                               if not set(a.option_strings) & set(options)})
            problems += [f"dit8 {command}: {option} missing from the README's synopsis" for option in left_out]
    assert not problems, problems


def test_every_public_name_is_in_the_readme():
    """What `dit8` exports and the ops of `dit8.kernels` are each named in the README's code (fenced or inline)."""
    import dit8
    import dit8.kernels

    text = (ROOT / "README.md").read_text()
    ops = [n for n in dit8.kernels.__all__ if n.islower() and n != "available_backends"]
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", " ", text, flags=re.S))
    in_code = set(re.findall(r"\w+", " ".join(fenced + spans)))
    missing = [n for n in (*dit8.__all__, *ops) if n != "__version__" and n not in in_code]
    assert not missing, f"exported but not in README.md: {missing}"


# A number as the docs write it: with thousands separators (32,760) or without, possibly with decimals.
_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.,])\d+(?:\.\d+)?")


def _recorded_numbers() -> list[Decimal]:
    """Every number bench/RESULTS.md states, outside code (a command's BUDGET=565 records no measurement)."""
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    text = re.sub(r"`[^`]*`", " ", re.sub(r"```.*?```", " ", text, flags=re.S))
    return [Decimal(n.replace(",", "")) for n in _NUMBER.findall(text)]


def _is_recorded(value: Decimal, recorded: list[Decimal]) -> bool:
    """Whether some recorded number, or a recorded ms as seconds, rounds to `value` at its precision."""
    step = Decimal(1).scaleb(value.as_tuple().exponent)
    return any(x.quantize(step, rounding) == value for r in recorded for x in (r, r / 1000)
               for rounding in (ROUND_HALF_UP, ROUND_HALF_EVEN))


def test_the_number_check_rounds_and_converts_ms():
    recorded = [Decimal("2268.4"), Decimal("1.045"), Decimal("21.746")]
    assert all(_is_recorded(Decimal(v), recorded) for v in ("2.27", "1.05", "22", "2268"))
    assert not any(_is_recorded(Decimal(v), recorded) for v in ("565", "2.26", "1.06", "21.8"))


def test_every_number_of_the_readme_performance_table_is_in_results():
    """The README's Performance table quotes bench/RESULTS.md, the record of measured numbers: each of its
    numbers must be one RESULTS.md states (as written or rounded; seconds from ms)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|- ")][1:]
    assert len(rows) >= 10, "the Performance table was not found"
    recorded = _recorded_numbers()
    missing = [f"{n} ({row.split('|')[1].strip()})" for row in rows for n in _NUMBER.findall(row)
               if not _is_recorded(Decimal(n.replace(",", "")), recorded)]
    assert not missing, f"README Performance numbers that bench/RESULTS.md does not state: {missing}"
