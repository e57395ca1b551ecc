"""Can every stage's actor be placed on some node of the cluster?

A stage asks Ray for CPUs, GPUs, memory and custom resources per actor
(:class:`curate.stage.Resources`).  Ray never fails such a request: it waits for a
node that can hold it, forever if none ever will.  This module answers the question
up front, from the shapes of the nodes a cluster has or can get:

* live nodes (``ray.nodes()`` on the driver, the state API for ``curate submit``);
* on an autoscaling cluster, its node types (the autoscaler's node-group configs,
  which Ray keeps in the GCS), so that a GPU stage of a KubeRay cluster whose GPU
  group stands at zero replicas is placeable: the autoscaler starts a GPU node
  when the stage's first actor asks for one.

The same function serves the driver's check before a run and ``curate submit``'s
check before anything is sent, so the two cannot disagree on a node they both see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from curate.stage import Resources


@dataclass(frozen=True)
class NodeShape:
    """The resources of one live node, or of every node of one autoscaler node type."""

    name: str
    resources: Mapping[str, float] = field(default_factory=dict)
    #: ``live``: a node that is up now; ``type``: one the autoscaler can start.
    origin: str = "live"

    def holds(self, need: Mapping[str, float]) -> bool:
        return all(self.resources.get(k, 0.0) >= v for k, v in need.items() if v)


def demand(res: Resources, cluster_gpus: float) -> dict[str, float]:
    """What one actor with ``res`` asks Ray for, in Ray's resource names."""
    need = {"CPU": float(res.num_cpus), "GPU": float(res.gpus(cluster_gpus))}
    if res.memory:
        need["memory"] = float(res.memory)
    need.update(res.custom)
    return {k: v for k, v in need.items() if v}


def possible_gpus(shapes: list[NodeShape]) -> float:
    """GPUs the cluster has or can get: decides what ``num_gpus: auto`` means."""
    return max((s.resources.get("GPU", 0.0) for s in shapes), default=0.0)


def unplaceable(stages: Mapping[str, Resources], shapes: list[NodeShape]) -> list[str]:
    """One message per stage whose actor fits no node shape (empty: all fit)."""
    gpus = possible_gpus(shapes)
    problems = []
    for name, res in stages.items():
        need = demand(res, gpus)
        if any(shape.holds(need) for shape in shapes):
            continue
        missing = sorted(k for k in need if not any(k in s.resources for s in shapes))
        why = (
            f"no node has the resource(s) {', '.join(map(repr, missing))}"
            if missing
            else "no node has that much of it at once"
        )
        problems.append(f"stage {name!r} asks for {_show(need)} per actor; {why}")
    if problems:
        problems.append(f"the cluster's nodes: {describe(shapes)}")
    return problems


def describe(shapes: list[NodeShape]) -> str:
    """The node shapes in a line: ``2 live nodes {CPU: 8}, type gpu {CPU: 3, GPU: 1}``."""
    if not shapes:
        return "none"
    counted: dict[tuple[str, str], int] = {}
    for s in shapes:
        key = (s.origin if s.origin == "live" else f"type {s.name}", _show(s.resources))
        counted[key] = counted.get(key, 0) + 1
    parts = []
    for (origin, shown), n in counted.items():
        label = f"{n} live node{'s' if n > 1 else ''}" if origin == "live" else origin
        parts.append(f"{label} {shown}")
    return ", ".join(parts)


#: Ray's bookkeeping resources: every node has them, no stage asks for them.
_INTERNAL = ("object_store_memory", "node:", "accelerator_type:")


def _show(resources: Mapping[str, float]) -> str:
    shown = []
    for k in sorted(resources, key=lambda k: (k not in ("CPU", "GPU", "memory"), k)):
        if k.startswith(_INTERNAL):
            continue
        v = resources[k]
        if k == "memory":
            shown.append(f"memory: {v / 2**30:.3g} GiB")
        else:
            shown.append(f"{k}: {v:g}")
    return "{" + ", ".join(shown) + "}"


def shapes_from_ray() -> list[NodeShape]:
    """Live nodes and autoscaler node types of the Ray cluster this process is connected to."""
    import ray

    shapes = [
        NodeShape(str(n.get("NodeID", "?"))[:8], dict(n.get("Resources", {})))
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive")
    ]
    return shapes + _autoscaler_types()


def _autoscaler_types() -> list[NodeShape]:
    """The autoscaler's node types that may start at least one node (none without one)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: without it, live nodes only
        return []
    if config is None:
        return []
    return [
        NodeShape(g.name or "?", {k: float(v) for k, v in g.resources.items()}, origin="type")
        for g in config.node_group_configs
        if g.max_count != 0 and g.resources
    ]


def shapes_from_state_api(nodes: list[dict[str, Any]]) -> list[NodeShape]:
    """Live nodes from the dashboard's state API (``GET /api/v0/nodes``) records."""
    return [
        NodeShape(str(n.get("node_id", "?"))[:8], dict(n.get("resources_total") or {}))
        for n in nodes
        if n.get("state") == "ALIVE"
    ]
