"""Safe YAML loading that remembers where every value came from.

PyYAML's ``SafeLoader`` builds only plain data (no tags that construct Python
objects), so nothing in a pipeline file can execute code.  We compose the node
tree first, record the line of every mapping key and sequence item under its
path, then construct the plain data from the same tree.  Duplicate keys, which
PyYAML silently resolves to the last one, are reported as errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Issue:
    """One problem found in a pipeline file, located as precisely as we can."""

    loc: Loc
    message: str
    file: str = "<input>"
    line: int | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        path = ".".join(str(p) for p in self.loc) or "<root>"
        return f"{where}: {path}: {self.message}"


class ConfigError(Exception):
    """All problems found in one pipeline file, reported together."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.file, i.line or 0, i.loc.__repr__()))
        super().__init__("\n".join(i.render() for i in self.issues))


@dataclass
class Positions:
    """Maps value paths to 1-based line numbers in one file."""

    file: str
    lines: dict[Loc, int] = field(default_factory=dict)
    #: Paths whose value came from a ``--set`` on the command line.
    overridden: set[Loc] = field(default_factory=set)
    #: Problems found while reading (duplicate keys), reported with validation's.
    issues: list[Issue] = field(default_factory=list)

    def line_of(self, loc: Loc) -> int | None:
        """Line of ``loc``, or of its nearest located ancestor."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None

    def issue(self, loc: Loc, message: str) -> Issue:
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.overridden:
                return Issue(loc=loc, message=message, file="--set")
        return Issue(loc=loc, message=message, file=self.file, line=self.line_of(loc))


def _walk(node: yaml.Node, loc: Loc, pos: Positions, issues: list[Issue], seen: set[int]) -> None:
    pos.lines.setdefault(loc, node.start_mark.line + 1)
    if id(node) in seen:  # an alias: walked once already (also stops recursive anchors)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*loc, key)
            pos.lines[child] = key_node.start_mark.line + 1
            if key in keys:
                issues.append(pos.issue(child, f"duplicate key {key!r}"))
            keys.add(key)
            _walk(value_node, child, pos, issues, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), pos, issues, seen)


def load_yaml(text: str, file: str) -> tuple[Any, Positions]:
    """Parse ``text`` safely; return plain data and the position of every value.

    Duplicate keys are kept in ``Positions.issues`` and reported with the rest.
    """
    pos = Positions(file=file)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}, pos
            _walk(node, (), pos, pos.issues, set())
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([Issue((), f"invalid YAML: {exc.problem or exc}", file, line)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Issue((), f"invalid YAML: {exc}", file)]) from None
    return data, pos


def load_yaml_file(path: Path) -> tuple[Any, Positions]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Issue((), f"cannot read pipeline file: {exc}", str(path))]) from None
    return load_yaml(text, str(path))
