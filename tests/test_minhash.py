"""MinHash dedup: signatures against a pure-Python reference, the Jaccard estimate,
the compiled kernel against numpy, components against union-find, and the stage
end to end on a local Ray (determinism across CPUs, units and partitions)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from curate.stages.minhash_dedup import MinHashDedupConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from curate.api import check, run
from curate.config.yamlpos import ConfigError
from curate.dedup import graph, kernel
from curate.dedup import minhash as mh
from curate.stage import StageContext, decision_schema

M64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- reference


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _poly(values: list[int], base: int) -> int:
    return sum(v * pow(base, k, 1 << 64) for k, v in enumerate(values)) & M64


def reference_shingles(normalized: str, shingle: str, n: int) -> set[int]:
    """The documented shingle hashes, one Python loop at a time."""
    if shingle == "word":
        toks = [_mix(_poly([b + 1 for b in w.encode()], mh.P_BYTE)) for w in normalized.split(" ")]
        toks = [t for t, w in zip(toks, normalized.split(" "), strict=True) if w]
    else:
        toks = [_mix(_poly([b + 1 for b in ch.encode()], 257)) for ch in normalized]
    grams = [toks[i : i + n] for i in range(len(toks) - n + 1)] if len(toks) >= n else [toks]
    return {_mix(_poly(g, mh.P_TOKEN) ^ ((len(g) * mh.LEN_MULT) & M64)) for g in grams if g}


def vocabulary(size: int = 3000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(size)]


def word_set(text: str, n: int) -> set[tuple[str, ...]]:
    words = mh.normalize(pa.array([text]), mh.Normalization()).to_pylist()[0].split(" ")
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# ----------------------------------------------------------------------------- signatures

TEXTS = [
    "",
    "   ",
    "!!! ... ???",
    "one",
    "two words",
    "The Quick, brown fox; jumps over 12 lazy dogs -- 3.14 times!",
    "Grüße aus Köln — café NAÏVE résumé ½ ﬁne",
    "东京 タワー 123 東京",
    "tabs\tand\nnew\x0blines\x0c\rhere  and   there",
    "emoji 🎉🎉 ok\u2003wide\u00a0space",
]


@pytest.mark.parametrize(("shingle", "n"), [("word", 5), ("word", 1), ("char", 4)])
def test_shingles_match_reference(shingle: str, n: int) -> None:
    norm = mh.normalize(pa.array(TEXTS), mh.Normalization())
    toks = mh.word_tokens(norm) if shingle == "word" else mh.char_tokens(norm)
    sh = mh.shingles(toks, n)
    for i, text in enumerate(norm.to_pylist()):
        assert set(sh.values[sh.doc == i].tolist()) == reference_shingles(text, shingle, n), text


def test_normalization_steps() -> None:
    norm = mh.normalize(pa.array(["Héllo, WÖRLD! 2024-11 ﬁ\u00a0x"]), mh.Normalization())
    assert norm.to_pylist() == ["hello world 0 0 fi x"]
    raw = mh.Normalization(unicode="none", lowercase=False, diacritics=False, numbers=False)
    assert mh.normalize(pa.array(["A,b  1"]), raw).to_pylist() == ["A b 1"]


def _both_paths(texts: list[str], spec: mh.SignatureSpec) -> None:
    a, b = mh.permutations(spec.num_perm, spec.seed)
    arr = pa.array(texts, pa.string())
    ref = mh._signatures_numpy(mh.normalize(arr, spec.normalization()), spec, a, b)
    fast = mh._signatures_kernel(arr, spec, a, b)
    assert np.array_equal(ref[1], fast[1])
    assert np.array_equal(ref[0], fast[0])


@pytest.mark.skipif(not kernel.HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize(
    "spec",
    [
        mh.SignatureSpec(num_perm=16),
        mh.SignatureSpec(shingle="char", ngram=5, num_perm=16),
        mh.SignatureSpec(ngram=2, num_perm=8, norm=mh.Normalization(punctuation=False)),
        mh.SignatureSpec(
            shingle="char",
            ngram=3,
            num_perm=8,
            norm=mh.Normalization(lowercase=False, numbers=False, unicode="NFC"),
        ),
    ],
)
def test_kernel_equals_numpy_on_edge_cases(spec: mh.SignatureSpec) -> None:
    _both_paths(TEXTS, spec)


@pytest.mark.skipif(not kernel.HAVE_NUMBA, reason="numba is not installed")
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.one_of(
                st.sampled_from("aAbB zZ09,.-_!\t\n\x0b\x0c\r  "),
                st.characters(codec="utf-8", exclude_categories=("Cs",)),
            ),
            max_size=40,
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["word", "char"]),
    st.integers(1, 4),
)
def test_kernel_equals_numpy(texts: list[str], shingle: str, n: int) -> None:
    _both_paths(texts, mh.SignatureSpec(shingle=shingle, ngram=n, num_perm=8))  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [32, 64])
def test_lsh_keys_in_chunks_equal_band_keys_of_signatures(
    monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    spec = mh.SignatureSpec(num_perm=24, hash_bits=bits)  # type: ignore[arg-type]
    texts = pa.array(TEXTS * 3)
    sig, counts = mh.signatures(texts, spec)
    want = mh.band_keys(sig.astype(np.uint64), 4, 6)
    monkeypatch.setattr(mh, "KEY_CHUNK", 4)
    keys, counts2 = mh.lsh_keys(texts, spec, 4, 6)
    assert np.array_equal(keys, want) and np.array_equal(counts, counts2)
    monkeypatch.setenv("CURATE_MINHASH_KERNEL", "numpy")
    keys3, _ = mh.lsh_keys(texts, spec, 4, 6)
    assert np.array_equal(keys3, want)


def test_numpy_fallback_when_kernel_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = mh.SignatureSpec(num_perm=32, hash_bits=32)
    fast = mh.signatures(pa.array(TEXTS), spec)
    monkeypatch.setenv("CURATE_MINHASH_KERNEL", "numpy")
    assert not kernel.available()
    slow = mh.signatures(pa.array(TEXTS), spec)
    assert slow[0].dtype == np.uint32
    assert np.array_equal(fast[0], slow[0])


def test_truncation_keeps_estimate_near_true_jaccard() -> None:
    """Truncating a text by 0-95 % keeps the MinHash estimate within a band of the
    true Jaccard similarity of the word 5-gram sets."""
    rng = random.Random(3)
    vocab = vocabulary()
    spec = mh.SignatureSpec(num_perm=256)
    errors = []
    for trial in range(80):
        words = [rng.choice(vocab) for _ in range(400)]
        cut = rng.uniform(0.0, 0.95) if trial else 0.0
        full, short = " ".join(words), " ".join(words[: max(5, round(400 * (1 - cut)))])
        sig, _ = mh.signatures(pa.array([full, short]), spec)
        est = float((sig[0] == sig[1]).mean())
        a, b = word_set(full, 5), word_set(short, 5)
        true = len(a & b) / len(a | b)
        sigma = math.sqrt(true * (1 - true) / spec.num_perm)
        assert abs(est - true) <= 4.5 * sigma + 0.02, (trial, cut, est, true)
        errors.append(est - true)
    assert abs(float(np.mean(errors))) < 0.01


def test_exact_jaccard_matches_python_sets() -> None:
    rng = random.Random(5)
    vocab = vocabulary(200)
    left, right = [], []
    for _ in range(30):
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
        other = [w if rng.random() < 0.8 else rng.choice(vocab) for w in words]
        left.append(" ".join(words))
        right.append(" ".join(other))
    got = graph.jaccard(pa.array(left), pa.array(right), mh.SignatureSpec(ngram=3))
    for i, (x, y) in enumerate(zip(left, right, strict=True)):
        a, b = word_set(x, 3) or {tuple(x.split())}, word_set(y, 3) or {tuple(y.split())}
        a, b = {s for s in a if s != ("",)}, {s for s in b if s != ("",)}
        want = len(a & b) / len(a | b) if a | b else 1.0
        assert got[i] == pytest.approx(want), (x, y)


def test_band_keys_depend_on_band_and_values() -> None:
    sig = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [3, 4, 1, 2]], dtype=np.uint64)
    keys = mh.band_keys(sig, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0]
    assert keys[0, 1] != keys[1, 1]
    assert keys[2, 0] != keys[0, 1]  # same values, other band


# ----------------------------------------------------------------------------- config


def test_presets_and_overrides() -> None:
    nemo = MinHashDedupConfig(preset="nemo").resolved()
    assert (nemo["shingle"], nemo["ngram"], nemo["bands"], nemo["rows"]) == ("char", 24, 20, 13)
    assert nemo["hash_bits"] == 32 and nemo["seed"] == 42
    fineweb = MinHashDedupConfig(bands=20, rows=5).resolved()
    assert fineweb["num_perm"] == 112 and fineweb["ngram"] == 5
    bigger = MinHashDedupConfig(bands=20, rows=10).resolved()
    assert bigger["num_perm"] == 200
    gopher = MinHashDedupConfig(preset="gopher", verify=False).resolved()
    assert gopher["jaccard_threshold"] is None and gopher["keep"] == "random"
    norm = MinHashDedupConfig(normalization={"numbers": False}).resolved()["norm"]
    assert norm == mh.Normalization(numbers=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bands": 20, "rows": 8, "num_perm": 100}, "exceeds num_perm"),
        ({"keep": "score"}, "needs score_column"),
        ({"score_column": "q"}, "only used with keep: score"),
        ({"preset": "minhashlsh"}, "Input should be"),
        ({"jaccard_threshold": 1.5}, "less than or equal to 1"),
    ],
)
def test_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MinHashDedupConfig.model_validate(fields)


# ----------------------------------------------------------------------------- Ray


def reference_components(u: list[int], v: list[int]) -> dict[int, int]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u, v, strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


@pytest.mark.parametrize("parts", [1, 3])
def test_components_match_union_find(ray_local: None, parts: int) -> None:
    import ray

    rng = np.random.default_rng(parts)
    # Chains, stars and random edges over 600 nodes with large 64-bit ids.
    ids = np.unique(rng.integers(1, 1 << 62, 600, dtype=np.int64).astype(np.uint64))
    pairs = [(ids[i], ids[i + 1]) for i in range(0, 80)]  # a long chain
    pairs += [(ids[100], ids[j]) for j in range(101, 140)]  # a star
    pairs += [tuple(rng.choice(ids, 2, replace=False)) for _ in range(150)]
    u = np.array([p[0] for p in pairs], dtype=np.uint64)
    v = np.array([p[1] for p in pairs], dtype=np.uint64)
    pieces = graph.both_ways(u, v, parts)
    edges = [[ray.put(pieces[p])] for p in range(parts)]
    stats: dict[str, Any] = {}
    labels = graph._components(edges, parts, stats, count_candidates=True)
    got = {}
    for table in ray.get(labels):
        for node, label in zip(
            table.column("u").to_pylist(), table.column("v").to_pylist(), strict=True
        ):
            got[node] = label
    want = reference_components([int(x) for x in u], [int(x) for x in v])
    assert got == want
    assert stats["candidate_pairs"] == len({(min(a, b), max(a, b)) for a, b in pairs})


def make_corpus(path: Path, seed: int = 11) -> list[dict[str, Any]]:
    """Unique documents plus clusters of near-copies (a few words changed)."""
    rng = random.Random(seed)
    vocab = vocabulary()
    rows = []
    for c in range(12):
        base = [rng.choice(vocab) for _ in range(rng.randint(120, 300))]
        for k in range(rng.randint(2, 5)):
            words = list(base)
            for _ in range(2 if k else 0):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            rows.append({"doc": f"c{c:02d}-{k}", "text": " ".join(words), "q": rng.random()})
    for u in range(60):
        words = [rng.choice(vocab) for _ in range(rng.randint(30, 200))]
        rows.append({"doc": f"u{u:02d}", "text": " ".join(words), "q": rng.random()})
    rows.append({"doc": "empty-1", "text": "", "q": 0.5})
    rows.append({"doc": "empty-2", "text": "...", "q": 0.5})
    rng.shuffle(rows)
    write_jsonl(path, rows)
    return rows


PIPE = """\
name: fuzzy
sources:
  docs: {{uri: docs.jsonl, id_column: doc, columns: {{q: float64}}}}
stages:
  dedup:
    type: minhash_dedup
    input: docs
{extra}
sinks:
  out: {{input: dedup}}
execution: {{unit_bytes: {unit}}}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fuzzy")
    make_corpus(root / "docs.jsonl")
    yield root


def run_fuzzy(
    root: Path, name: str, extra: str = "", unit: str = "8KiB", cpus: int | None = None
) -> tuple[dict[str, Any], dict[str, tuple[str, int]], dict[str, str]]:
    """Run the pipeline; return the dedup stage's manifest row, the kept rows'
    ``id -> (cluster_id, cluster_size)`` and the rejects' ``id -> reason``."""
    pipe = root / f"{name}.yaml"
    pipe.write_text(PIPE.format(extra=extra, unit=unit), encoding="utf-8")
    out = root / name
    if cpus is None:
        manifest = run(str(pipe), str(out), overwrite=True).manifest
    else:
        cmd = [sys.executable, "-m", "curate.cli", "run", str(pipe), "--output", str(out)]
        subprocess.run([*cmd, "--overwrite", "--num-cpus", str(cpus)], check=True, timeout=300)
        manifest = json.loads((out / "manifest.json").read_text())
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((out / "out").glob("*.parquet")))
    rejects = pa.concat_tables(
        pq.read_table(p) for p in sorted((out / "rejects" / "dedup").glob("*.parquet"))
    )
    stage = next(s for s in manifest["stages"] if s["name"] == "dedup")
    clusters = {
        r["id"]: (r["cluster_id"], r["cluster_size"])
        for r in kept.select(["id", "cluster_id", "cluster_size"]).to_pylist()
    }
    return stage, clusters, {r["id"]: r["reason"] for r in rejects.to_pylist()}


def test_stage_finds_every_cluster_and_keeps_smallest_id(ray_local: None, corpus: Path) -> None:
    stage, kept, dropped = run_fuzzy(corpus, "base")
    assert stage["rows_in"] == 62 + sum(1 for k in kept if k.startswith("c")) + len(dropped)
    assert stage["rows_in"] == stage["kept"] + stage["dropped"]
    clusters = {k for k in kept if k.startswith("c")}
    assert clusters == {f"c{c:02d}-0" for c in range(12)}  # "-0" sorts first in each
    for doc, reason in dropped.items():
        keeper = doc.split("-")[0] + "-0"
        assert reason == f"near_duplicate:{keeper}"
        assert kept[keeper][0] == keeper
    for doc in clusters:
        size = 1 + sum(1 for d in dropped if d.startswith(doc[:3]))
        assert kept[doc] == (doc, size)
    for doc in ("u00", "u59", "empty-1", "empty-2"):
        assert kept[doc] == (doc, 1)
    summary = stage["summary"]
    assert summary["clusters"] == 12 and summary["dropped"] == len(dropped)
    assert sum(int(k) * v for k, v in summary["cluster_sizes"].items()) == len(dropped) + 12


def test_stage_is_deterministic_across_cpus_units_and_partitions(
    ray_local: None, corpus: Path
) -> None:
    _, kept, dropped = run_fuzzy(corpus, "a", "    num_partitions: 1", unit="4KiB")
    _, kept2, dropped2 = run_fuzzy(corpus, "b", "    num_partitions: 3", unit="64KiB")
    _, kept3, dropped3 = run_fuzzy(corpus, "c", "    num_partitions: 2", unit="16KiB", cpus=1)
    assert kept == kept2 == kept3
    assert dropped == dropped2 == dropped3


def test_keep_by_score_and_verification(ray_local: None, corpus: Path) -> None:
    rows = [json.loads(line) for line in (corpus / "docs.jsonl").read_text().splitlines()]
    score = {r["doc"]: r["q"] for r in rows}
    extra = "    keep: score\n    score_column: q\n    jaccard_threshold: 0.5"
    stage, kept, dropped = run_fuzzy(corpus, "score", extra)
    for c in range(12):
        members = [d for d in score if d.startswith(f"c{c:02d}-")]
        best = max(members, key=lambda d: score[d])
        assert best in kept and kept[best][1] == len(members)
        assert all(dropped[d] == f"near_duplicate:{best}" for d in members if d != best)
    summary = stage["summary"]
    assert summary["verified_pairs"] >= summary["dropped"]
    assert summary["candidate_pairs"] == summary["verified_pairs"] + summary["rejected_pairs"]


def test_verification_splits_lsh_false_positives(ray_local: None, tmp_path: Path) -> None:
    """With one row per band every shared minimum is a candidate; exact Jaccard keeps
    only the true near-duplicates, also when the loose match is a bucket's smallest
    node (six groups, so that happens in some of them whatever the hashes)."""
    rng = random.Random(2)
    vocab = vocabulary(400)
    rows = []
    for g in range(6):
        base = [rng.choice(vocab) for _ in range(200)]
        near = list(base)
        near[100] = "changed"
        half = base[:100] + [rng.choice(vocab) for _ in range(100)]
        for name, words in (("a", base), ("b", near), ("c", half)):
            rows.append({"doc": f"{g}{name}", "text": " ".join(words), "q": 0.0})
    write_jsonl(tmp_path / "docs.jsonl", rows)
    loose = "    bands: 64\n    rows: 1\n    num_perm: 64\n"
    stage, kept, dropped = run_fuzzy(tmp_path, "loose", loose)
    assert dropped == {f"{g}{x}": f"near_duplicate:{g}a" for g in range(6) for x in "bc"}
    stage, kept, dropped = run_fuzzy(tmp_path, "strict", loose + "    jaccard_threshold: 0.8")
    assert dropped == {f"{g}b": f"near_duplicate:{g}a" for g in range(6)}
    assert all(kept[f"{g}c"] == (f"{g}c", 1) for g in range(6))
    assert stage["summary"]["rejected_pairs"] >= 6


def test_equal_ids_and_keep_first_are_deterministic(ray_local: None, tmp_path: Path) -> None:
    """Ids from a source column may repeat; the kept row must not depend on partitions."""
    rng = random.Random(4)
    vocab = vocabulary(400)
    base = [rng.choice(vocab) for _ in range(600)]
    rows = []
    for k in range(6):
        words = list(base)
        words[rng.randrange(600)] = f"edit{k}"
        rows.append({"doc": "same" if k < 4 else f"other{k}", "text": " ".join(words), "q": 0.0})
    write_jsonl(tmp_path / "docs.jsonl", rows)

    def kept_rows(name: str, extra: str) -> list[Any]:
        run_fuzzy(tmp_path, name, extra)
        out = tmp_path / name / "out"
        table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
        return table.select(["id", "provenance", "cluster_size"]).to_pylist()

    one = kept_rows("p1", "    num_partitions: 1")
    assert one == kept_rows("p4", "    num_partitions: 4")
    assert len(one) == 1 and one[0]["id"] == "other4" and one[0]["cluster_size"] == 6
    same = kept_rows("s1", "    num_partitions: 1\n    bands: 20\n    rows: 2\n    keep: first")
    assert same == kept_rows(
        "s4", "    num_partitions: 4\n    bands: 20\n    rows: 2\n    keep: first"
    )
    assert same[0]["provenance"]["row"] == 0  # keep: first keeps the first line


def test_keep_score_ranks_null_and_nan_last() -> None:
    members = pa.table(
        {
            graph.NODE: pa.array([3, 2, 1, 4], pa.uint64()),
            "_unit": pa.array([0, 0, 0, 0], pa.int64()),
            "_pos": pa.array([0, 1, 2, 3], pa.int64()),
            "id": ["a", "b", "c", "d"],
            "q": pa.array([float("nan"), None, 0.1, 0.05]),
            "component": pa.array([7, 7, 7, 7], pa.uint64()),
        }
    )
    spec = graph.ClusterSpec(partitions=1, threshold=None, keep="score", score_column="q")
    from curate.stages.minhash_dedup import MinHashDedup

    schema = decision_schema(MinHashDedup(MinHashDedupConfig(), StageContext("s", 0)))
    decisions, stats = graph.choose_keepers._function(spec, schema, members)
    assert set(decisions.column("cluster_id").to_pylist()) == {"c"}
    assert stats == {"clusters": 1, "dropped": 3, "sizes": {4: 1}}


def test_stage_refuses_to_overwrite_an_input_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b c", "cluster_size": "x"}])
    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        "name: clash\nsources:\n  docs: {uri: docs.jsonl, columns: {cluster_size: string}}\n"
        "stages:\n  dedup: {type: minhash_dedup, input: docs}\n"
        "sinks:\n  out: {input: dedup}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="writes column 'cluster_size' as int64, but its input"):
        check(str(pipe))


def test_random_keep_is_seeded(ray_local: None, corpus: Path) -> None:
    _, kept, dropped = run_fuzzy(corpus, "r1", "    keep: random\n    seed: 5")
    _, kept2, dropped2 = run_fuzzy(corpus, "r2", "    keep: random\n    seed: 5")
    assert (kept, dropped) == (kept2, dropped2)
    assert {d.split("-")[0] for d in kept if d.startswith("c")} == {f"c{c:02d}" for c in range(12)}
