"""Heuristic quality filters: Gopher quality, Gopher repetition, C4, FineWeb.

Each filter measures every document with a compiled kernel
(:mod:`curate.quality.kernel`), then applies its rules in a fixed order; the
first rule a document fails is its drop reason, ``<stage type>:<rule>``, and
the measured value goes to the rejects.  The manifest counts every rule
separately.  ``keep_stats: true`` keeps the measurements as columns (prefixed
``gopher_``, ``c4_``, ``fineweb_``), so thresholds can be studied or re-applied
with ``length_filter``-style stages later without measuring again.

Defaults are the published thresholds (``../shared/SPECS.md`` section 7, from
Rae et al. 2021 App. A, Raffel et al. 2020 and Penedo et al. 2024, as
datatrove implements them); every number can be overridden in YAML, and
``null`` switches a rule off.  Where the sources disagree, see
:class:`FineWebQualityConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.quality import kernel
from curate.quality.heuristics import (
    C4Options,
    c4_stats,
    fineweb_stats,
    gopher_quality_stats,
    gopher_repetition_stats,
)
from curate.rules import Op, Rule, decide
from curate.stage import Filter, StageConfig, Verdict, set_column

Ratio = float


class _HeuristicConfig(StageConfig):
    #: Keep the measurements as columns.
    keep_stats: bool = False


class _Heuristic(Filter):
    """Shared plumbing: measure, decide, optionally keep the measurements."""

    reason_details: ClassVar[bool] = True
    #: Reason prefix and column prefix.
    prefix: ClassVar[str]
    #: Names of the measurement columns, in kernel order.
    stat_names: ClassVar[tuple[str, ...]] = ()

    def reads(self) -> Sequence[str]:
        return ("text",)

    def stat_columns(self) -> tuple[str, ...]:
        return self.stat_names

    def writes(self) -> Mapping[str, pa.DataType]:
        if not self.config.keep_stats:  # type: ignore[attr-defined]
            return {}
        return {f"{self.column_prefix}{name}": pa.float64() for name in self.stat_columns()}

    @property
    def column_prefix(self) -> str:
        return self.prefix.split("_")[0] + "_"

    def measure(self, batch: pa.Table) -> np.ndarray[Any, Any]:
        """One row of measurements per document, for :meth:`decide`; a subclass that
        overrides ``decide`` itself (``c4_quality``, which also rewrites text) need not."""
        raise NotImplementedError(f"{type(self).__name__} measures in its own decide()")

    def rules(self) -> Sequence[Rule]:
        """The thresholds over :meth:`measure`'s columns, in the order they apply."""
        raise NotImplementedError(f"{type(self).__name__} decides in its own decide()")

    def decision_stats(self, stats: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The measurements the rules see (by default, as measured)."""
        return stats

    def decide(self, batch: pa.Table) -> Verdict:
        stats = self.measure(batch)
        keep, reason, value = decide(self.decision_stats(stats), self.rules(), self.prefix)
        return Verdict(keep, reason, value, self.with_stats(batch, stats))

    def with_stats(self, batch: pa.Table, stats: np.ndarray[Any, Any]) -> pa.Table | None:
        if not self.config.keep_stats:  # type: ignore[attr-defined]
            return None
        for i, name in enumerate(self.stat_columns()):
            batch = set_column(batch, f"{self.column_prefix}{name}", pa.array(stats[:, i]))
        return batch


# --------------------------------------------------------------------------------------


GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQualityConfig(_HeuristicConfig):
    """Rae et al. 2021, App. A (Gopher's MassiveWeb quality filter).

    Words are spaCy-style words (punctuation split off); *non-symbol* words have
    a character that is not punctuation or a symbol.  ``min_words`` and
    ``max_words`` count non-symbol words, the mean word length is over them;
    the ratios divide by all words.  ``min_stop_words`` counts *distinct* stop
    words present (lowercase, exact), as datatrove does.
    """

    min_words: int | None = Field(50, ge=0)
    max_words: int | None = Field(100_000, ge=0)
    min_mean_word_length: float | None = Field(3, ge=0)
    max_mean_word_length: float | None = Field(10, ge=0)
    max_hash_ratio: Ratio | None = Field(0.1, ge=0)
    max_ellipsis_ratio: Ratio | None = Field(0.1, ge=0)
    max_bullet_lines_ratio: Ratio | None = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: Ratio | None = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: Ratio | None = Field(0.8, ge=0, le=1)
    min_stop_words: int | None = Field(2, ge=0)
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS


class GopherQuality(_Heuristic):
    """Drops documents failing Gopher's quality rules (reason ``gopher_quality:<rule>``)."""

    Config: ClassVar[type[StageConfig]] = GopherQualityConfig
    config: GopherQualityConfig
    prefix: ClassVar[str] = "gopher_quality"
    stat_names: ClassVar[tuple[str, ...]] = kernel.GOPHER_QUALITY_STATS

    def measure(self, batch: pa.Table) -> np.ndarray[Any, Any]:
        return gopher_quality_stats(batch.column("text"), self.config.stop_words)

    def rules(self) -> Sequence[Rule]:
        c = self.config
        return (
            Rule("min_words", 1, "<", c.min_words),
            Rule("max_words", 1, ">", c.max_words),
            Rule("min_mean_word_length", 2, "<", c.min_mean_word_length),
            Rule("max_mean_word_length", 2, ">", c.max_mean_word_length),
            Rule("hash_ratio", 3, ">", c.max_hash_ratio),
            Rule("ellipsis_ratio", 4, ">", c.max_ellipsis_ratio),
            Rule("bullet_lines", 5, ">", c.max_bullet_lines_ratio),
            Rule("ellipsis_lines", 6, ">", c.max_ellipsis_lines_ratio),
            Rule("alpha_words", 7, "<", c.min_alpha_words_ratio),
            Rule("stop_words", 8, "<", c.min_stop_words),
        )


# --------------------------------------------------------------------------------------


class GopherRepetitionConfig(_HeuristicConfig):
    """Rae et al. 2021, Table A1.  Paragraphs are split on ``\\n{2,}`` (after
    stripping the text), lines on ``\\n+``; character fractions are over the
    whole text's characters.  ``top_n_grams``: the most frequent n-gram's
    characters (words joined by spaces) times its count; ``dup_n_grams``: the
    characters of n-grams that repeat an earlier one, counted without
    overlap.  A maximum drops values strictly above it."""

    max_dup_para_frac: Ratio | None = Field(0.3, ge=0)
    max_dup_para_char_frac: Ratio | None = Field(0.2, ge=0)
    max_dup_line_frac: Ratio | None = Field(0.3, ge=0)
    max_dup_line_char_frac: Ratio | None = Field(0.2, ge=0)
    top_n_grams: dict[int, Ratio] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, Ratio] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @model_validator(mode="after")
    def _positive_n(self) -> GopherRepetitionConfig:
        for name in ("top_n_grams", "dup_n_grams"):
            bad = [n for n in getattr(self, name) if n < 1]
            if bad:
                raise ValueError(f"{name}: n-gram sizes must be >= 1, got {bad}")
        return self


class GopherRepetition(_Heuristic):
    """Drops repetitive documents (reason ``gopher_repetition:<rule>``)."""

    Config: ClassVar[type[StageConfig]] = GopherRepetitionConfig
    config: GopherRepetitionConfig
    prefix: ClassVar[str] = "gopher_repetition"

    def _sizes(self) -> tuple[list[int], list[int]]:
        return sorted(self.config.top_n_grams), sorted(self.config.dup_n_grams)

    def stat_columns(self) -> tuple[str, ...]:
        top, dup = self._sizes()
        return (
            "dup_para_frac",
            "dup_para_char_frac",
            "dup_line_frac",
            "dup_line_char_frac",
            *(f"top_{n}_gram_frac" for n in top),
            *(f"dup_{n}_gram_frac" for n in dup),
        )

    def measure(self, batch: pa.Table) -> np.ndarray[Any, Any]:
        top, dup = self._sizes()
        stats = gopher_repetition_stats(batch.column("text"), top, dup)
        empty = np.isnan(stats[:, :1])
        return np.hstack([empty.astype(np.float64), stats])

    def with_stats(self, batch: pa.Table, stats: np.ndarray[Any, Any]) -> pa.Table | None:
        return super().with_stats(batch, stats[:, 1:])

    def rules(self) -> Sequence[Rule]:
        c = self.config
        top, dup = self._sizes()
        rules = [
            Rule("empty", 0, ">", 0.5),
            Rule("dup_para_frac", 1, ">", c.max_dup_para_frac),
            Rule("dup_para_char_frac", 2, ">", c.max_dup_para_char_frac),
            Rule("dup_line_frac", 3, ">", c.max_dup_line_frac),
            Rule("dup_line_char_frac", 4, ">", c.max_dup_line_char_frac),
        ]
        col = 5
        for n in top:
            rules.append(Rule(f"top_{n}_gram", col, ">", c.top_n_grams[n]))
            col += 1
        for n in dup:
            rules.append(Rule(f"dup_{n}_gram", col, ">", c.dup_n_grams[n]))
            col += 1
        return rules


# --------------------------------------------------------------------------------------

POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4QualityConfig(_HeuristicConfig):
    """Raffel et al. 2020 section 2.2, line by line as TFDS's ``c4_utils`` applies it.

    Each line (``str.splitlines``, stripped) is dropped when a word is longer
    than ``max_word_length``, when it does not end in ``. ? ! " '`` (or ends
    in ``...``), when it has fewer than ``min_words_per_line`` words, when it
    mentions "javascript", or a cookie or terms-of-use phrase.  The page is
    dropped at the first kept-so-far line with "lorem ipsum" or ``{``, or
    when the kept lines hold fewer than ``min_sentences`` sentences.
    Wikipedia-style citations (``[1]``, ``[edit]``) are removed.  With
    ``rewrite_text`` the kept page's text becomes its kept lines joined by
    ``\\n``, as in C4.

    ``preset: fineweb`` turns the terminal-punctuation rule off (FineWeb:
    it alone removed about 30 % of tokens).  C4's bad-words list is not
    included (the reference list is downloaded at run time by other tools;
    nothing here uses the network).
    """

    preset: Literal["c4", "fineweb"] = "c4"
    filter_no_terminal_punct: bool | None = None
    remove_citations: bool = True
    min_sentences: int | None = Field(5, ge=0)
    min_words_per_line: int | None = Field(3, ge=0)
    max_word_length: int | None = Field(1000, ge=1)
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    policy_substrings: tuple[str, ...] = POLICY_SUBSTRINGS
    rewrite_text: bool = True

    def terminal_punct(self) -> bool:
        if self.filter_no_terminal_punct is not None:
            return self.filter_no_terminal_punct
        return self.preset == "c4"


class C4Quality(_Heuristic):
    """C4's line and page rules (reason ``c4_quality:<rule>``); rewrites ``text``."""

    Config: ClassVar[type[StageConfig]] = C4QualityConfig
    config: C4QualityConfig
    prefix: ClassVar[str] = "c4_quality"
    stat_names: ClassVar[tuple[str, ...]] = ("lines", "kept_lines", "sentences")

    def writes(self) -> Mapping[str, pa.DataType]:
        text = {"text": pa.string()} if self.config.rewrite_text else {}
        return {**text, **super().writes()}

    def options(self) -> C4Options:
        c = self.config
        return C4Options(
            remove_citations=c.remove_citations,
            filter_no_terminal_punct=c.terminal_punct(),
            filter_lorem_ipsum=c.filter_lorem_ipsum,
            filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket,
            filter_policy=c.filter_policy and bool(c.policy_substrings),
            count_sentences=c.min_sentences is not None,
            max_word_length=c.max_word_length,
            min_words_per_line=c.min_words_per_line or 0,
            policy_substrings=c.policy_substrings,
        )

    def decide(self, batch: pa.Table) -> Verdict:
        stats, text = c4_stats(batch.column("text"), self.options())
        page = stats[:, 3]
        flags = np.stack([page == kernel.C4_LOREM, page == kernel.C4_CURLY], axis=1)
        measured = np.hstack([flags.astype(np.float64), stats[:, 2:3]])
        rules = (
            Rule("lorem_ipsum", 0, ">", 0.5),
            Rule("curly_bracket", 1, ">", 0.5),
            Rule("too_few_sentences", 2, "<", self.config.min_sentences),
        )
        keep, reason, value = decide(measured, rules, self.prefix)
        out: pa.Table | None = None
        if self.config.rewrite_text:
            index = batch.schema.get_field_index("text")
            out = batch.set_column(index, "text", text.cast(batch.schema.field(index).type))
        if self.config.keep_stats:
            base = out if out is not None else batch
            out = super().with_stats(base, stats[:, :3])
        return Verdict(keep, reason, value, out)


# --------------------------------------------------------------------------------------


class FineWebQualityConfig(_HeuristicConfig):
    """Penedo et al. 2024 section 3.6, FineWeb's own rules.  Lines are split on
    ``\\n``; blank lines are ignored.

    The sources disagree, and we follow the code FineWeb was produced with
    (datatrove's ``FineWebQualityFilter``) by default, ``preset: datatrove``:

    * duplicated-line characters: the paper's section 3.6 says 0.1, its
      App. E.4 and datatrove say **0.01**;
    * comparisons: the paper writes ``<=`` / ``>=``, datatrove uses strict
      ``<`` / ``>``: a ratio exactly at the threshold is **kept**;
    * datatrove also drops lists (newlines per word **> 0.3**), a rule not
      among the paper's three.

    ``preset: paper`` takes the paper's word: 0.1, inclusive comparisons, no
    list rule.  Any field set explicitly overrides the preset.
    """

    preset: Literal["datatrove", "paper"] = "datatrove"
    line_punct_thr: Ratio | None = Field(0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: Ratio | None = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: Ratio | None = Field(0.01, ge=0)
    new_line_ratio: Ratio | None = Field(0.3, ge=0)
    inclusive: bool = False

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """Fill the preset's values into the fields the YAML leaves out (so the
        normalized spec in the manifest shows the values that ran)."""
        if isinstance(data, dict) and data.get("preset") == "paper":
            paper = {"char_duplicates_ratio": 0.1, "new_line_ratio": None, "inclusive": True}
            return {**paper, **data}
        return data


class FineWebQuality(_Heuristic):
    """FineWeb's custom rules (reason ``fineweb_quality:<rule>``)."""

    Config: ClassVar[type[StageConfig]] = FineWebQualityConfig
    config: FineWebQualityConfig
    prefix: ClassVar[str] = "fineweb_quality"
    stat_names: ClassVar[tuple[str, ...]] = kernel.FINEWEB_STATS

    def measure(self, batch: pa.Table) -> np.ndarray[Any, Any]:
        return fineweb_stats(batch.column("text"), self.config.short_line_length)

    def decision_stats(self, stats: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if not self.config.line_punct_exclude_zero:
            return stats
        stats = stats.copy()
        stats[stats[:, 1] == 0, 1] = np.nan  # a page without any punctuated line passes
        return stats

    def rules(self) -> Sequence[Rule]:
        c = self.config
        dup, lists = c.char_duplicates_ratio, c.new_line_ratio
        low: Op = "<=" if c.inclusive else "<"
        high: Op = ">=" if c.inclusive else ">"
        return (
            Rule("empty", 0, "<", 1),
            Rule("line_punct_ratio", 1, low, c.line_punct_thr),
            Rule("short_line_ratio", 2, high, c.short_line_thr),
            Rule("char_dup_ratio", 3, high, dup),
            Rule("list_ratio", 4, ">", lists),
        )
