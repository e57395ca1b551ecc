"""Read a pipeline file, apply ``--set`` overrides, validate everything at once."""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from curate.config.model import BoundStage, PipelineSpec, StageSpec
from curate.config.yamlpos import ConfigError, Issue, Loc, Positions, load_yaml_file
from curate.models import PACKAGED
from curate.registry import RegistryError, get_stage_class, import_plugins, suggest


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: the spec, its bound stages and where it came from."""

    spec: PipelineSpec
    stages: dict[str, BoundStage]
    file: str
    base_dir: Path
    positions: Positions = field(compare=False, repr=False, default_factory=lambda: Positions(""))

    def normalized(self) -> dict[str, Any]:
        """The spec with every default filled in: what the manifest records."""
        data = self.spec.model_dump(mode="json")
        for name, bound in self.stages.items():
            data["stages"][name] = {
                "type": bound.type,
                "input": list(bound.inputs),
                "resources": bound.resources.model_dump(mode="json"),
                "cache": bound.cache,
                **bound.config.model_dump(mode="json"),
            }
        return data

    def spec_hash(self) -> str:
        text = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def output_hash(self) -> str:
        """The hash of the spec less what no data byte depends on: how storage is
        reached (endpoint, retries), where it writes, where the cache lives, the error
        limit (a run within it writes the same bytes), when a unit is isolated (a sandbox
        writes the same bytes, only slower), the description and each stage's
        resources (the manifest records the spec a run finishes with). ``--resume``
        compares it, so a run stopped by a flaky endpoint or its error limit, or begun
        on a cluster of another shape, can be finished after changing those."""
        data = self.normalized()
        for key in NOT_IN_OUTPUT_HASH:
            data.pop(key, None)
        for key in EXECUTION_NOT_IN_OUTPUT_HASH:
            data["execution"].pop(key, None)
        for stage in data["stages"].values():
            stage.pop("resources", None)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


#: Top-level spec keys and ``execution`` keys that no output byte depends on.
NOT_IN_OUTPUT_HASH = ("storage", "output", "description")
EXECUTION_NOT_IN_OUTPUT_HASH = ("cache_dir", "max_errors", "isolate_after")


_SHORT = reprlib.Repr()  # keyword arguments arrive in Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 3, 4, 4, 50


def _describe(value: Any) -> str:
    """A short repr: bounded in depth and width, so a YAML alias bomb prints in O(1)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: ErrorDetails) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "redacted":  # the value may be a secret: say what is expected, never echo it
        return f"expected {msg}"
    if kind == "extra_forbidden":
        return f"unknown key (got {_describe(err['input'])})"
    expected = msg.removeprefix("Input should be ").removeprefix("Value error, ")
    return f"expected {expected}, got {_describe(err['input'])}"


def _issues(exc: ValidationError, prefix: Loc, pos: Positions) -> list[Issue]:
    out = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        message = _message(err)
        if err["type"] == "extra_forbidden":
            loc_parent = loc[:-1]
            message = f"unknown key {loc[-1]!r}"
            loc = (*loc_parent, loc[-1])
        out.append(pos.issue(loc, message))
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b.c=5'`` -> (['a', 'b', 'c'], 5); the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([Issue((), f"expected KEY=VALUE, got {item!r}", "--set")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], pos: Positions, base_dir: Path
) -> None:
    """Set each ``KEY=VALUE``; the location of an overridden value becomes ``--set``."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for part in path[:-1]:
            if not isinstance(node, dict):
                raise ConfigError([Issue(tuple(path), f"cannot set inside {node!r}", "--set")])
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([Issue(tuple(path), f"cannot set inside {node!r}", "--set")])
        node[path[-1]] = _rebase(path[-1], value, base_dir)
        pos.overridden.add(tuple(path))


#: Keys whose relative values on the command line are paths, rebased to the file's folder.
PATH_KEYS = ("uri", "output", "image_root", "cache_dir", "request_cache")
#: Keys that name a model file or a packaged / hub name: rebased when the path exists.
MODEL_KEYS = ("model", "checkpoint", "arch_config", "tokenizer")


def _rebase(key: str, value: Any, base_dir: Path) -> Any:
    """Paths on the command line are relative to the current folder, paths in the
    file to the file's folder: rewrite the former relative to the file's folder, so
    that the same files give the same provenance (and ids) whichever way they came.
    Values inside a mapping given whole (``backend={kind: ..., model: DIR}``) too."""
    if isinstance(value, dict):
        return {k: _rebase(k, v, base_dir) for k, v in value.items()}
    if key not in PATH_KEYS + MODEL_KEYS:
        return value
    if isinstance(value, list):
        return [_rebase(key, v, base_dir) for v in value]
    if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
        if key in MODEL_KEYS and (value in PACKAGED or not os.path.exists(value)):
            return value  # a packaged model's or a hub's name, not a path
        return os.path.relpath(Path(value).absolute(), base_dir)
    return value


def _resolve_inputs(specs: dict[str, StageSpec], sources: list[str]) -> dict[str, tuple[str, ...]]:
    """Default ``input``: the previous stage, or the only source for the first stage."""
    out: dict[str, tuple[str, ...]] = {}
    previous: str | None = sources[0] if len(sources) == 1 else None
    for name, spec in specs.items():
        if spec.input is None:
            out[name] = (previous,) if previous else ()
        else:
            out[name] = (spec.input,) if isinstance(spec.input, str) else tuple(spec.input)
        previous = name
    return out


def _bind_stages(spec: PipelineSpec, pos: Positions, issues: list[Issue]) -> dict[str, BoundStage]:
    bound: dict[str, BoundStage] = {}
    inputs = _resolve_inputs(spec.stages, list(spec.sources))
    for name, stage in spec.stages.items():
        loc: Loc = ("stages", name)
        try:
            cls = get_stage_class(stage.type)
        except RegistryError as exc:
            issues.append(pos.issue((*loc, "type"), str(exc)))
            continue
        try:
            config = cls.Config.model_validate(stage.params())
        except ValidationError as exc:
            issues.extend(_issues(exc, loc, pos))
            continue
        if not inputs[name]:
            issues.append(pos.issue(loc, "expected an 'input:' naming a source or stage"))
            continue
        if len(set(inputs[name])) != len(inputs[name]):
            issues.append(pos.issue((*loc, "input"), "an input is listed twice"))
            continue
        resources = cls.resources_for(config)
        if stage.resources is not None:  # the YAML's fields over the stage's defaults
            given = stage.resources.model_fields_set
            resources = resources.model_copy(update={k: getattr(stage.resources, k) for k in given})
        bound[name] = BoundStage(
            name=name,
            type=stage.type,
            inputs=inputs[name],
            config=config,
            resources=resources,
            cache=cls.cache_default if stage.cache is None else stage.cache,
        )
    return bound


#: Folders and files of the output root that a sink may not take (and every name
#: starting with ``_`` or ``.``: _work, _commits, _cache, _state, _index, _progress.json).
RESERVED_SINK_NAMES = {"rejects", "stats", "manifest.json"}


def _check_names(spec: PipelineSpec, pos: Positions, issues: list[Issue]) -> None:
    for name in spec.sinks:
        if name in RESERVED_SINK_NAMES or name.startswith(("_", ".")):
            issues.append(
                pos.issue(("sinks", name), f"sink name {name!r} is reserved for run files")
            )
        elif "/" in name or "\\" in name:
            issues.append(pos.issue(("sinks", name), f"sink name {name!r}: one folder, no '/'"))
    seen: dict[str, str] = {}
    for section in ("sources", "stages", "sinks"):
        for name in getattr(spec, section):
            if name in seen:
                issues.append(
                    pos.issue((section, name), f"name {name!r} is already a {seen[name]}")
                )
            seen.setdefault(name, section[:-1])


def validate_data(data: Any, pos: Positions, base_dir: Path) -> Pipeline:
    """Validate plain data; raise :class:`ConfigError` with every problem found."""
    if not isinstance(data, dict):
        raise ConfigError([pos.issue((), f"expected a mapping, got {_describe(data)}")])
    issues: list[Issue] = list(pos.issues)
    plugins = data.get("plugins") or []
    modules = [str(p) for p in plugins] if isinstance(plugins, list) else []
    for module, exc in import_plugins(modules):
        message = f"cannot import plugin module {module!r}: {type(exc).__name__}: {exc}"
        issues.append(pos.issue(("plugins", modules.index(module)), message))
    try:
        spec = PipelineSpec.model_validate(data)
    except RecursionError:
        raise ConfigError([*issues, pos.issue((), "a YAML alias refers to itself")]) from None
    except ValidationError as exc:
        issues.extend(_issues(exc, (), pos))
        stages = data.get("stages")
        if isinstance(stages, dict):
            _check_stage_params_only(stages, pos, issues)
        _check_raw_inputs(data, pos, issues)
        raise ConfigError(issues) from None
    _check_names(spec, pos, issues)
    bound = _bind_stages(spec, pos, issues)
    if issues:
        _check_raw_inputs(data, pos, issues)
        raise ConfigError(issues)
    return Pipeline(spec=spec, stages=bound, file=pos.file, base_dir=base_dir, positions=pos)


def unknown_input(name: str, known: set[str]) -> str:
    """The message for an ``input:`` that names no source or stage."""
    return f"expected the name of a source or stage ({', '.join(sorted(known))}), got {name!r}"


def _check_raw_inputs(data: dict[str, Any], pos: Positions, issues: list[Issue]) -> None:
    """When the file itself is invalid, still report inputs that name nothing."""
    sections: dict[str, dict[str, Any]] = {}
    for key in ("sources", "stages", "sinks"):
        value = data.get(key)
        sections[key] = value if isinstance(value, dict) else {}
    nodes = {*sections["sources"], *sections["stages"]}
    for section in ("stages", "sinks"):
        for name, raw in sections[section].items():
            wanted = raw.get("input") if isinstance(raw, dict) else None
            parents = [wanted] if isinstance(wanted, str) else wanted
            for parent in parents if isinstance(parents, list) else []:
                if isinstance(parent, str) and parent not in nodes:
                    message = unknown_input(parent, nodes - {name})
                    issues.append(pos.issue((section, name, "input"), message))


def _check_stage_params_only(stages: dict[str, Any], pos: Positions, issues: list[Issue]) -> None:
    """When the top level is invalid, still report the stages' own parameter errors."""
    for name, raw in stages.items():
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            continue
        try:
            cls = get_stage_class(raw["type"])
        except RegistryError as exc:
            issues.append(pos.issue(("stages", name, "type"), str(exc)))
            continue
        params = {k: v for k, v in raw.items() if k not in StageSpec.model_fields}
        try:
            cls.Config.model_validate(params)
        except ValidationError as exc:
            issues.extend(_issues(exc, ("stages", name), pos))


def load_pipeline(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Pipeline:
    """Load, override and validate a pipeline file."""
    file = Path(path)
    data, pos = load_yaml_file(file)
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError([pos.issue((), "expected a mapping at the top level")])
        apply_overrides(data, overrides, pos, file.resolve().parent)
    return validate_data(data, pos, file.resolve().parent)


__all__ = ["ConfigError", "Pipeline", "load_pipeline", "suggest", "validate_data"]
