"""MkDocs hooks: the parts of the site that are rendered from the code at build time, so that
they cannot drift from it.

- ``<!-- onnxlrp:cli -->`` becomes the command-line reference: every command, argument and
  option of the typer app, with its default and help, as ``onnxlrp CMD --help`` prints them
  (the help records come from the same click objects that parse the command line).
- ``<!-- onnxlrp:checks -->`` becomes the table of audit checks from the checks registry.
- ``<!-- onnxlrp:audit-schema -->`` becomes the fields of the audit's JSON report, from
  ``onnxlrp.audit.report.schema()`` (report.schema.json with the registered checks' names:
  what ``report.json`` is validated against).
- The figures that ``examples/`` scripts write stay where the scripts write them; they are
  added to the site under ``assets/`` instead of being copied into ``docs/`` by hand.

tests/test_docs.py imports :func:`cli_reference` to check that every option appears.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: site path -> file in the repository (figures written by the examples' scripts)
ASSETS = {
    "assets/results/methods.png": "examples/results/methods.png",
    "assets/results/conservation.png": "examples/results/conservation.png",
}

_TAIL = re.compile(r"\s*\[([^\[\]]*)\]$")  # click's "  [default: x; x>=1]" / "[required]" suffix


def _split_help(text: str) -> tuple[str, list[str]]:
    """click's help record -> (the help, the bracketed notes it appends: default, range, required).
    typer writes a default given as text in parentheses, which may hold '; ' itself."""
    match = _TAIL.search(text)
    if not match:
        return text.strip(), []
    notes, rest = [], match.group(1)
    while rest:
        if rest.startswith("default: ("):
            close = rest.index(")", len("default: ("))
            notes.append(rest[:close + 1])
            rest = rest[close + 1:]
        else:
            note, _, rest = rest.partition(";")
            notes.append(note.strip())
        rest = rest.lstrip("; ")
    return text[: match.start()].strip(), notes


def _escape(text: str) -> str:
    """Help text as Markdown: characters that Markdown would read as markup are escaped."""
    return re.sub(r"([*_<>\[\]])", r"\\\1", text)


def _param(param, ctx) -> str:
    record = param.get_help_record(ctx)
    names, text = record if record else (param.name, "")
    help_text, notes = _split_help(text)
    line = f"- `{names}`"
    if help_text:
        line += f": {_escape(help_text)}"
    extras = []
    for note in notes:
        if note.startswith("default:"):
            value = note[len("default:"):].strip()
            if value.startswith("(") and value.endswith(")"):  # typer's show_default text
                value = value[1:-1]
            extras.append(f"default: `{value}`")
        elif note == "required":
            extras.append("required")
        else:
            extras.append(f"`{note}`")
    if extras:
        line += f" ({'; '.join(extras)})"
    return line


def _usage(name: str, command) -> str:
    pieces = [f"onnxlrp {name}", "[OPTIONS]"]
    for param in command.params:
        if type(param).__name__.endswith("Argument"):
            metavar = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(metavar if param.required else f"[{metavar}]")
    return " ".join(pieces)


def cli_reference() -> str:
    """Markdown for every command of the `onnxlrp` app: usage, help, arguments, options by group."""
    import typer.main

    from onnxlrp.cli import app

    try:  # typer >= 0.29 vendors click, and its commands are that click's
        from typer import _click as click
    except ImportError:
        import click

    group = typer.main.get_command(app)
    root = click.Context(group, info_name="onnxlrp")
    lines = [_escape(group.help or ""), ""]
    for param in group.params:
        lines.append(_param(param, root))
    lines.append("")
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        if command is None or command.hidden:
            continue
        ctx = click.Context(command, info_name=name, parent=root)
        lines += [f"## onnxlrp {name}", "", "```text", _usage(name, command), "```", ""]
        lines += [_escape(command.help or "").strip(), ""]
        arguments = [p for p in command.params if type(p).__name__.endswith("Argument")]
        options = [p for p in command.params if not type(p).__name__.endswith("Argument")]
        if arguments:
            lines += ["**Arguments**", ""] + [_param(p, ctx) for p in arguments] + [""]
        panels: dict[str, list] = {}
        for option in options:
            if not option.hidden:
                panels.setdefault(getattr(option, "rich_help_panel", None) or "Options", []).append(option)
        panels.setdefault("Options", [])
        for panel, members in panels.items():
            # typer's own --help option is not among the params: every command has it
            if panel == "Options":
                members = members + [None]
            lines += [f"**{panel}**", ""]
            lines += [_param(p, ctx) if p is not None else "- `--help`: Show the help and exit." for p in members]
            lines.append("")
    return "\n".join(lines)


def checks_table() -> str:
    from onnxlrp.audit.findings import CHECKS, DEFAULT_FAIL_ON

    lines = ["| check | what it measures | a finding when | fails by default |", "|---|---|---|---|"]
    for check in CHECKS.values():
        when = f"{'>' if check.direction == 'above' else '<'} {check.threshold:g}"
        if check.warn_at is not None:
            when += f" (a warning {'above' if check.direction == 'above' else 'below'} {check.warn_at:g})"
        fails = "never (informational)" if check.informational else ("yes" if check.name in DEFAULT_FAIL_ON else "no")
        lines.append(f"| `{check.name}` | {_escape(check.summary).replace('|', '&#124;')} | {when} | {fails} |")
    return "\n".join(lines)


def _type(spec: dict) -> str:
    kind = spec.get("type", spec.get("enum") and "one of " + ", ".join(map(json.dumps, spec["enum"])))
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if "const" in spec:
        kind = f"always {json.dumps(spec['const'])}"
    return kind or "any"


def schema_fields() -> str:
    from onnxlrp.audit.report import schema as report_schema

    schema = report_schema()  # the shipped file with the registered checks' names
    required = set(schema.get("required", []))
    lines = ["| field | type | required | meaning |", "|---|---|---|---|"]
    for name, spec in schema["properties"].items():
        lines.append(f"| `{name}` | {_type(spec)} | {'yes' if name in required else 'no'} | "
                     f"{_escape(spec.get('description', '')).replace('|', '&#124;')} |")
    lines += ["", '??? note "The whole schema (`onnxlrp.audit.report.schema()`)"', "",
              "    ```json"]
    lines += ["    " + line for line in json.dumps(schema, indent=2).splitlines()]
    lines += ["    ```", ""]
    return "\n".join(lines)


_GENERATED = {
    "<!-- onnxlrp:cli -->": cli_reference,
    "<!-- onnxlrp:checks -->": checks_table,
    "<!-- onnxlrp:audit-schema -->": schema_fields,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, render in _GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, source in ASSETS.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    return files
