"""Every notebook in notebooks/ runs top to bottom on a tiny run: nbclient executes it
in a kernel of this venv's Python (ipykernel), with ``CURATE_RUN`` naming the run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from test_stats import PIPELINE, corpus

from curate.api import run

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notebook_run")
    corpus(root)
    (root / "pipe.yaml").write_text(PIPELINE)
    run(str(root / "pipe.yaml"), str(root / "out"))
    return root / "out"


@pytest.fixture(scope="module")
def mix_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SlimPajama mix recipe on its bundled stand-ins, with a small budget."""
    out = tmp_path_factory.mktemp("notebook_mix") / "out"
    recipe = REPO / "pipelines" / "recipes" / "slimpajama_mix.yaml"
    run(str(recipe), str(out), ["stages.mix.tokens=30000", "stages.mix.shards=3"])
    return out


def test_the_notebooks_are_there_and_committed_without_outputs() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"shard_statistics.ipynb", "drop_reasons.ipynb", "mixture_report.ipynb"} <= names
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(
    path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    mixture = path.stem == "mixture_report"  # needs a run with a mix stage
    folder = request.getfixturevalue("mix_run" if mixture else "tiny_run")
    monkeypatch.setenv("CURATE_RUN", str(folder))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    text = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert ("run slimpajama_mix" if mixture else "run stats_t") in text
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "data" in out]
    assert any("image/png" in out["data"] for out in images)
