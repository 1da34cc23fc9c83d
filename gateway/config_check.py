"""`pdmesh config validate FILE` and `pdmesh config schema`: every problem of a serve config at
once, each with its line in the YAML and, for a misspelt key or value, the likely one meant;
and the JSON Schema of the whole file (editors and CI check configs with it).

The verdict is the loader's own (gateway.config.parse): a file validate passes, `pdmesh serve
--config` loads. The field-by-field pass before it exists to name every problem, not the first."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import yaml
from pydantic import TypeAdapter, ValidationError

from gateway.config import ServeConfig, parse
from mesh.api import EngineConfig
from scenarios.spec import SpecError

_PLACEHOLDER_SECRET = "0" * 16  # the real one is made per run


@dataclass(frozen=True)
class Problem:
    path: str  # dotted, as "scenarios.0.slo.ttft_s"; "" for the file as a whole
    line: int | None  # 1-based, in the YAML
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@functools.cache
def _schema() -> dict:
    return schema()


def schema() -> dict:
    """The JSON Schema of a serve config, engine: and transport: included (less the fields each
    scenario or each run sets: the model, the transport's secret)."""
    out = ServeConfig.model_json_schema()
    out["title"] = "pdmesh serve config"
    engine = EngineConfig.model_json_schema()
    engine["properties"].pop("model")
    engine["required"] = [r for r in engine.get("required", []) if r != "model"]
    transport = TypeAdapter(_transport_class()).json_schema()
    transport["properties"].pop("secret")
    for section, sub in (("engine", engine), ("transport", transport)):
        sub["additionalProperties"] = False
        out["properties"][section] = {**sub, "description": out["properties"][section].get("description", "")}
    return out


def _transport_class():
    from transport.config import TransportConfig  # the transport package loads torch

    return TransportConfig


def validate(path: str | Path) -> list[Problem]:
    """Every problem of the config file, in the order of its lines; [] when it loads."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        return [Problem("", None, f"cannot read {path}: {e.strerror}")]
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return [Problem("", mark.line + 1 if mark else None, f"not valid YAML: {getattr(e, 'problem', e)}")]
    if not isinstance(data, dict):
        return [Problem("", 1, "expected a mapping with a non-empty list under 'scenarios:'")]
    errors = [(err, prefix + tuple(err["loc"])) for err, prefix in _errors(data)]
    # a list whose items failed is also "too short" (it counts the valid ones): the items say it
    problems = [_problem(err, loc, root) for err, loc in errors
                if not (err["type"] == "too_short" and any(len(o) > len(loc) and o[:len(loc)] == loc
                                                           for _, o in errors))]
    if not problems:  # the loader's own checks across fields (unique names, ...)
        try:
            parse(data, str(path))
        except SpecError as e:
            problems = [Problem("", None, str(e).removeprefix(f"{path}: "))]
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def _errors(data: dict):
    """(pydantic error, where its loc starts) for every field of the file."""
    sections = {"engine": (EngineConfig, {"model": "-"}), "transport": (_transport_class(),
                                                                         {"secret": _PLACEHOLDER_SECRET})}
    for section, (cls, filled) in sections.items():
        given = data.get(section) or {}
        if not isinstance(given, dict):
            continue  # the whole-file pass says it is no mapping
        if dataclasses.is_dataclass(cls):  # a dataclass takes no unknown field: name each as pydantic would
            known = {f.name for f in dataclasses.fields(cls)}
            yield from (({"type": "extra_forbidden", "loc": (k,), "msg": "Extra inputs are not permitted",
                          "input": given[k]}, (section,)) for k in given if k not in known)
            given = {k: v for k, v in given.items() if k in known}
        try:
            TypeAdapter(cls).validate_python({**given, **filled})
        except ValidationError as e:
            yield from ((err, (section,)) for err in e.errors())
    try:
        ServeConfig.model_validate({**data, "engine": {}, "transport": {}})
    except ValidationError as e:
        yield from ((err, ()) for err in e.errors())


def _problem(err: dict, loc: tuple, root: yaml.Node) -> Problem:
    loc = tuple(part for part in loc if part != "[key]")
    ctx = err.get("ctx", {})
    message = str(ctx["error"]) if err["type"] == "value_error" else err["msg"]
    choices = re.fullmatch(r"\^\(([\w|]+)\)\$", ctx.get("pattern", ""))  # a pattern of alternatives
    if err["type"] == "extra_forbidden":
        message = f"unknown field{_meant(loc[-1], _keys(loc[:-1]))}"
    elif "expected" in ctx:  # an enum or a literal: the values it takes are quoted
        message += _meant(err["input"], re.findall(r"'([^']*)'", ctx["expected"]))
    elif choices:
        message = f"{err['input']!r} is not one of {', '.join(choices[1].split('|'))}" + _meant(
            err["input"], choices[1].split("|"))
    elif err["type"] == "missing":
        message = "required, and missing"
    return Problem(".".join(map(str, loc)), _line(root, loc, key=err["type"] == "extra_forbidden"), message)


def _meant(given: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(given), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else (f"; one of: {', '.join(choices)}" if choices else "")


def _keys(loc: tuple) -> list[str]:
    """The keys the schema allows at loc."""
    full = _schema()
    node = full
    for part in loc:
        node = _resolve(full, node)
        if "properties" in node and str(part) in node["properties"]:
            node = node["properties"][part]
        elif isinstance(part, int) and "items" in node:
            node = node["items"]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return []
    return list(_resolve(full, node).get("properties", {}))


def _resolve(full: dict, node: dict) -> dict:
    """node with its $ref followed, and an optional (anyOf [X, null]) taken as X."""
    while True:
        if "$ref" in node:
            node = full["$defs"][node["$ref"].rsplit("/", 1)[1]]
        elif "anyOf" in node:
            node = next((n for n in node["anyOf"] if n.get("type") != "null"), {})
        else:
            return node


def _line(root: yaml.Node, loc: tuple, key: bool) -> int:
    """The line of loc's node in the YAML (of its key, for an unknown field); of the nearest
    mapping above it when it is missing."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if found is None:
                return line
            node, line = found[1], (found[0] if key else found[1]).start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


@click.group("config")
def config() -> None:
    """Serve configs: check one, or print their JSON Schema."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def validate_command(file: str) -> None:
    """Check FILE as `pdmesh serve --config` reads it: every problem with its line (exit 2), or
    one line saying it is fine (exit 0)."""
    problems = validate(file)
    for p in problems:
        click.echo(f"{file}:{p.line or 1}: {p}", err=True)
    if problems:
        click.echo(f"pdmesh: error: {file}: {len(problems)} problem(s)", err=True)
        raise SystemExit(2)
    cfg = parse(yaml.safe_load(Path(file).read_text()), file)
    click.echo(f"{file}: OK ({len(cfg.scenarios)} scenario(s): {', '.join(s.name for s in cfg.scenarios)})")


@config.command("schema")
def schema_command() -> None:
    """The JSON Schema of a serve config (scenarios:, engine:, transport:, gateway:, controller:)."""
    click.echo(json.dumps(schema(), indent=2))

