"""The ARPA trainer (interpolated modified Kneser-Ney, as lmplz): KenLM loads its files, every
conditional distribution sums to one through KenLM's own state API, ArpaModel and KenLM agree,
lmplz's toy models are reproduced, and the bytes are deterministic."""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from curate.quality.arpa import BOS, EOS, UNK, ArpaModel, ArpaStats, train_arpa

LINES = """the cat sat on the mat
the dog sat on the log
a cat saw a dog
the cat saw the dog on the mat
dogs and cats
the mat
on the log the cat sat
a dog
the dog saw a cat and the cat ran""".splitlines()
EXTRA = "big small red blue is was very quick brown fox jumps over lazy"
WORDS = sorted(set(" ".join([*LINES, EXTRA]).split()))

# Histories to condition on: seen, unseen, with unknown words, longer than any order.
CONTEXTS = [
    [],
    ["the"],
    ["the", "cat"],
    ["sat", "on", "the"],
    ["cat", "sat", "on", "the"],
    ["mat", "the", "mat", "the"],
    ["zebra"],
    ["the", "zebra"],
    ["zebra", "cat"],
    ["on", "zebra", "the", "dog"],
    ["lazy", "lazy", "fox", "fox", "fox"],
]


def corpus() -> list[list[str]]:
    """Hand-written lines plus seeded random ones (skewed word choice, lengths 1 to 9)."""
    rng = random.Random(1234)
    out = [line.split() for line in LINES]
    for _ in range(120):
        out.append(
            [
                WORDS[min(int(rng.paretovariate(1.0)) - 1, len(WORDS) - 1)]
                if rng.random() < 0.5
                else rng.choice(WORDS)
                for _ in range(rng.randint(1, 9))
            ]
        )
    return out


def held_out() -> list[list[str]]:
    """Sentences to score: training lines, reorderings, unknown words, an empty one."""
    rng = random.Random(99)
    out: list[list[str]] = [line.split() for line in LINES] + [[], ["zebra"], [EOS]]
    for _ in range(40):
        sentence = rng.sample(WORDS, rng.randint(1, 8))
        out.append([w if rng.random() > 0.15 else w.upper() + "?" for w in sentence])
    return out


@pytest.fixture(scope="module")
def kenlm() -> ModuleType:
    module: ModuleType = pytest.importorskip("kenlm")
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, ArpaStats]]:
    root = tmp_path_factory.mktemp("arpa")
    data = corpus()
    return {n: (root / f"o{n}.arpa", train_arpa(data, root / f"o{n}.arpa", n)) for n in range(1, 6)}


def kenlm_model(kenlm: ModuleType, path: Path) -> Any:
    """``kenlm.Model`` of ``path``. KenLM refuses unigram models ("assumes at least a bigram
    model"), so a unigram file is read with an empty 2-gram section added, which changes no
    probability."""
    if ArpaModel(path).order > 1:
        return kenlm.Model(str(path))
    text = path.read_text(encoding="utf-8")
    padded = path.with_suffix(".as2.arpa")
    padded.write_text(
        text.replace("\n\n", "\nngram 2=0\n\n", 1).replace("\\end\\", "\\2-grams:\n\n\\end\\"),
        encoding="utf-8",
    )
    return kenlm.Model(str(padded))


def vocabulary(path: Path) -> list[str]:
    """Every word a model predicts: the unigrams (with ``</s>`` and ``<unk>``) but ``<s>``."""
    return [g[0] for g in ArpaModel(path).probs if len(g) == 1 and g[0] != BOS]


def kenlm_mass(
    model: Any, kenlm: ModuleType, vocab: list[str], context: list[str], bos: bool
) -> float:
    """sum_w 10 ** log10 p(w | context) through KenLM's state API."""
    state = kenlm.State()
    (model.BeginSentenceWrite if bos else model.NullContextWrite)(state)
    for word in context:
        out = kenlm.State()
        model.BaseScore(state, word, out)
        state = out
    return float(sum(10.0 ** model.BaseScore(state, word, kenlm.State()) for word in vocab))


def test_kenlm_loads_every_order(
    kenlm: ModuleType, models: dict[int, tuple[Path, ArpaStats]]
) -> None:
    with pytest.raises(OSError, match="at least a bigram"):
        kenlm.Model(str(models[1][0]))
    for order, (path, stats) in models.items():
        model = kenlm_model(kenlm, path)
        assert model.order == max(order, 2) and stats.order == order
        assert ArpaModel(path).counts == list(stats.counts)
        assert (
            stats.counts[0]
            == stats.vocab_size
            == len(set(WORDS) | set(" ".join(LINES).split())) + 3
        )
        assert stats.tokens == sum(map(len, corpus()))
        assert stats.sentences == len(corpus())
        for k, (d1, d2, d3) in enumerate(stats.discounts, start=1):
            assert 0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3, (k, stats.discounts)
    # Tiny data: closed-form discounts for the 2- and 3-grams, fallback for 1-, 4- and 5-grams.
    assert models[5][1].fallback_orders == (1, 4, 5)
    assert models[3][1].fallback_orders == (1,)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_distributions_sum_to_one(
    kenlm: ModuleType, models: dict[int, tuple[Path, ArpaStats]], order: int
) -> None:
    path = models[order][0]
    model, vocab = kenlm_model(kenlm, path), vocabulary(path)
    assert EOS in vocab and UNK in vocab
    for context in CONTEXTS:
        for bos in (True, False):
            assert kenlm_mass(model, kenlm, vocab, context, bos) == pytest.approx(1.0, abs=1e-4), (
                context,
                bos,
            )
    reader = ArpaModel(path)
    for context in CONTEXTS:
        mass = sum(10.0 ** reader.log10_prob(w, [BOS, *context]) for w in vocab)
        assert mass == pytest.approx(1.0, abs=1e-4), context


def test_wrong_backoff_breaks_the_sum(
    kenlm: ModuleType, models: dict[int, tuple[Path, ArpaStats]], tmp_path: Path
) -> None:
    """The sum-to-one check has teeth: one backoff set to log 0 (i.e. 1) is caught."""
    path = models[3][0]
    lines = path.read_text(encoding="utf-8").split("\n")
    at = next(i for i, line in enumerate(lines) if line.split("\t")[1:2] == ["the cat"])
    assert float(lines[at].split("\t")[2]) < -0.05
    lines[at] = "\t".join([*lines[at].split("\t")[:2], "0"])
    broken = tmp_path / "broken.arpa"
    broken.write_text("\n".join(lines), encoding="utf-8")
    vocab = vocabulary(path)
    mass = kenlm_mass(kenlm.Model(str(broken)), kenlm, vocab, ["the", "cat"], True)
    assert abs(mass - 1.0) > 1e-2
    assert kenlm_mass(kenlm.Model(str(path)), kenlm, vocab, ["the", "cat"], True) == pytest.approx(
        1.0, abs=1e-4
    )


def test_arpa_model_matches_kenlm(
    kenlm: ModuleType, models: dict[int, tuple[Path, ArpaStats]]
) -> None:
    for path, _ in models.values():
        reference, reader = kenlm_model(kenlm, path), ArpaModel(path)
        for sentence in held_out():
            for bos in (True, False):
                for eos in (True, False):
                    expected = reference.score(" ".join(sentence), bos=bos, eos=eos)
                    got = reader.score(sentence, bos=bos, eos=eos)
                    assert got == pytest.approx(expected, abs=1e-4), (path.name, sentence, bos, eos)
        # <unk> gets interpolation mass, <s> is never predicted.
        assert -10.0 < reader.probs[(UNK,)] < 0.0
        assert reader.probs[(BOS,)] == -99.0
        assert reader.log10_prob("zebra", ["the"]) == reader.log10_prob(UNK, ["the"])


def test_higher_order_fits_training_text_better(
    kenlm: ModuleType, models: dict[int, tuple[Path, ArpaStats]]
) -> None:
    text = [" ".join(s) for s in corpus()]
    ppl = {
        n: sum(kenlm_model(kenlm, p).perplexity(t) for t in text) for n, (p, _) in models.items()
    }
    assert ppl[3] < ppl[2] < ppl[1]
    assert ppl[5] < ppl[1]


# lmplz --discount_fallback -o 3 on these two inputs: KenLM's lm/common/test_data/toy{0,1}.arpa
# (lmplz writes 0 for <s>, this trainer -99).
TOY = {
    "a a b a\nb a a b": {
        "<unk>": (-0.90309, 0.0),
        "a": (-0.46943438, -0.30103),
        "</s>": (-0.5720968, 0.0),
        "b": (-0.5720968, -0.30103),
        "<s> a": (-0.37712017, -0.30103),
        "a a": (-0.37712017, -0.30103),
        "b a": (-0.2984526, -0.30103),
        "a </s>": (-0.58682007, 0.0),
        "b </s>": (-0.5220179, 0.0),
        "<s> b": (-0.41574955, -0.30103),
        "a b": (-0.58682007, -0.30103),
        "<s> a a": (-0.14885087, None),
        "b a a": (-0.33741078, None),
        "<s> b a": (-0.124077894, None),
        "a b a": (-0.2997394, None),
        "b a </s>": (-0.42082912, None),
        "a b </s>": (-0.397617, None),
        "a a b": (-0.20102891, None),
    },
    "a a b b b b b b b\nc": {
        "<unk>": (-1.0, 0.0),
        "a": (-0.6146491, -0.30103),
        "</s>": (-0.6146491, 0.0),
        "c": (-0.7659168, -0.30103),
        "b": (-0.6146491, -0.30103),
        "<s> a": (-0.4301247, -0.30103),
        "a a": (-0.4301247, -0.30103),
        "c </s>": (-0.20660876, 0.0),
        "b </s>": (-0.5404639, 0.0),
        "<s> c": (-0.4740302, -0.30103),
        "a b": (-0.4301247, -0.30103),
        "b b": (-0.3422159, -0.47712123),
        "<s> a a": (-0.1638568, None),
        "<s> c </s>": (-0.09113217, None),
        "b b </s>": (-0.7462621, None),
        "a a b": (-0.1638568, None),
        "a b b": (-0.13823806, None),
        "b b b": (-0.13375957, None),
    },
}


@pytest.mark.parametrize("text", list(TOY))
def test_reproduces_lmplz(tmp_path: Path, text: str) -> None:
    path = tmp_path / "toy.arpa"
    stats = train_arpa([line.split() for line in text.split("\n")], path, 3)
    assert stats.fallback_orders == (1, 2, 3)
    reader = ArpaModel(path)
    got = {" ".join(g): (p, reader.backoffs.get(g)) for g, p in reader.probs.items() if g != (BOS,)}
    assert got.keys() == TOY[text].keys()
    for gram, (prob, backoff) in TOY[text].items():
        assert got[gram][0] == pytest.approx(prob, abs=1e-6), gram
        assert (got[gram][1] is None) == (backoff is None), gram
        assert got[gram][1] == pytest.approx(backoff, abs=1e-6), gram
    assert reader.backoffs[(BOS,)] == pytest.approx(-0.30103, abs=1e-6)


def test_deterministic_bytes(tmp_path: Path) -> None:
    data = corpus()
    first = train_arpa(data, tmp_path / "a.arpa", 4)
    again = train_arpa((list(s) for s in data), tmp_path / "b.arpa", 4)  # a generator
    shuffled = data[:]
    random.Random(5).shuffle(shuffled)
    train_arpa([*shuffled, [], []], tmp_path / "c.arpa", 4)  # order and empty lines do not matter
    blob = (tmp_path / "a.arpa").read_bytes()
    assert first == again
    assert blob == (tmp_path / "b.arpa").read_bytes() == (tmp_path / "c.arpa").read_bytes()
    text = blob.decode("utf-8")
    assert text.startswith("\\data\\\nngram 1=")
    assert text.endswith("\n\n\\end\\\n")
    top = text.split("\\4-grams:\n")[1].split("\n\n")[0].split("\n")
    assert all(len(line.split("\t")) == 2 for line in top)  # no backoff on the highest order
    assert [line.split("\t")[1].split(" ") for line in top] == sorted(
        line.split("\t")[1].split(" ") for line in top
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arpa", "b.arpa", "c.arpa"]


def test_bad_input_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.arpa"
    with pytest.raises(ValueError, match="no tokens"):
        train_arpa([], path)
    with pytest.raises(ValueError, match="no tokens"):
        train_arpa([[], []], path)
    with pytest.raises(ValueError, match="order"):
        train_arpa([["a"]], path, 0)
    with pytest.raises(ValueError, match="too short"):
        train_arpa([["a"], ["b"]], path, 4)
    with pytest.raises(ValueError, match="whitespace"):
        train_arpa([["a b"]], path)
    with pytest.raises(ValueError, match="empty"):
        train_arpa([["a", ""]], path)
    with pytest.raises(ValueError, match="reserved"):
        train_arpa([["a", "<unk>"]], path)
    with pytest.raises(TypeError, match="tokenized"):
        train_arpa(["a b c"], path)  # a str is a Sequence[str]: caught at run time
    assert not list(tmp_path.iterdir())


def test_skip_symbols_and_a_single_word(tmp_path: Path) -> None:
    train_arpa([["a", "<s>", "b"], ["</s>"], ["c"]], tmp_path / "skip.arpa", 2, skip_symbols=True)
    stats = train_arpa([["a", "b"], ["c"]], tmp_path / "plain.arpa", 2)
    assert (tmp_path / "skip.arpa").read_bytes() == (tmp_path / "plain.arpa").read_bytes()
    assert stats.counts == (6, 5) and stats.tokens == 3 and stats.sentences == 2
    one = ArpaModel(tmp_path / "plain.arpa")
    vocab = [g[0] for g in one.probs if len(g) == 1 and g[0] != BOS]
    for context in ([BOS], [BOS, "a"], ["b"], ["zebra"]):
        assert sum(10.0 ** one.log10_prob(w, context) for w in vocab) == pytest.approx(1.0)
