"""Strict YAML reading that remembers where every value came from.

Admins fix what a message points at, so every value keeps its ``line:col``. The loader also
closes YAML 1.1 traps that could silently change a policy: duplicate keys (PyYAML keeps the
last one), ``on``/``off``/``yes``/``no`` turning into booleans, ``010`` being octal, merge keys
and several documents in one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """1-based position in the source file."""

    line: int
    col: int


@dataclass(slots=True)
class Source:
    """Parsed YAML data plus the position (and raw spelling) of each value and key."""

    data: Any
    marks: dict[Path_, Mark] = field(default_factory=dict)
    key_marks: dict[Path_, Mark] = field(default_factory=dict)
    raw: dict[Path_, str] = field(default_factory=dict)

    def mark(self, path: Path_) -> Mark:
        """The mark of ``path`` or of its nearest ancestor that exists in the file."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), Mark(1, 1))


class YamlError(Exception):
    """A file that is not valid YAML for a policy (syntax, duplicate key...)."""

    def __init__(self, message: str, mark: Mark, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark
        self.hint = hint


class StrictLoader(yaml.SafeLoader):
    """SafeLoader; the composed node tree is walked by :func:`parse_yaml`."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_DECIMAL_WITH_ZERO = re.compile(r"^[-+]?0[0-9_]+$")


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def parse_yaml(text: str) -> Source:
    """Parse one YAML document into plain data with marks; raises :class:`YamlError`."""
    try:
        loader = StrictLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark
        mark = Mark(m.line + 1, m.column + 1) if m is not None else Mark(1, 1)
        raise YamlError(f"YAML syntax error: {exc.problem}", mark,
                        "check indentation and quoting around this position") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"YAML error: {exc}", Mark(1, 1)) from None
    src = Source(data=None)
    if node is None:
        src.data = None
        return src
    src.data = _walk(node, (), src, StrictLoader(""))
    return src


def _walk(node: yaml.Node, path: Path_, src: Source, ctor: StrictLoader) -> Any:
    src.marks[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError("YAML merge keys ('<<') are not allowed in a policy",
                                _mark(key_node), "write the keys out in full; reviewers must "
                                "see every rule as it is applied")
            key = _walk(key_node, (*path, "<key>"), src, ctor)
            if isinstance(key, (list, dict)):
                raise YamlError("a mapping key must be a plain value", _mark(key_node))
            if key in out:
                first = src.key_marks.get((*path, key))
                where = f" (first at line {first.line}, column {first.col})" if first else ""
                raise YamlError(f"duplicate key {key!r}{where}", _mark(key_node),
                                "YAML would silently keep only the last one; remove or merge "
                                "the duplicates")
            src.key_marks[(*path, key)] = _mark(key_node)
            out[key] = _walk(value_node, (*path, key), src, ctor)
        src.marks.pop((*path, "<key>"), None)
        src.raw.pop((*path, "<key>"), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(child, (*path, i), src, ctor) for i, child in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    src.raw[path] = node.value
    if node.tag == _BOOL_TAG and node.value.lower() not in ("true", "false"):
        return node.value  # YAML 1.1 'on'/'off'/'yes'/'no' stay words
    if node.tag == _INT_TAG and _DECIMAL_WITH_ZERO.match(node.value):
        return int(node.value.replace("_", ""), 10)  # '010' is ten, not octal eight
    try:
        return ctor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:  # e.g. a tag no constructor knows ('!operator')
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlError(f"YAML error: {problem}", _mark(node),
                        "a policy uses plain YAML values only: remove the '!' tag") from None
