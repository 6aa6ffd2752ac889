"""The heuristic filter stage: datatrove's Gopher / C4 / FineWeb rules plus Llama 3's.

Filters run in a fixed order (FILTER_ORDER), first drop wins, and a document's
drop reason is the filter's own string (`gopher_short_doc`, `dup_para_frac`,
`too_few_sentences`, ...), exactly as datatrove reports it. datatrove's filters
are called, not copied: kiln builds the same objects and calls `filter(doc)`.
C4QualityFilter and the duplicated n-gram filter remove lines from documents they
keep; the shortened text flows on, as in a datatrove pipeline.

Recipe tables (`[filter.gopher_quality]`, ...) take `enabled`, `languages` (apply
only to documents whose `lang` is listed; [] = all) and any argument of the
filter's constructor, checked against its signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pyarrow as pa

from kiln.config import ConfigError
from kiln.curation.spark import spark_type
from kiln.formats import schema
from kiln.curation.filters.llama3 import (DirtyWordsFilter, DuplicatedNgramLineFilter, TokenKLFilter,
                                          reference_from_counts, tokens)
from kiln.curation.stage import Stage, columns, output_schema, set_columns, text_bytes


def _datatrove(name: str):
    import datatrove.pipeline.filters as f

    return getattr(f, name)


# key -> (filter class factory, languages it applies to by default)
FILTERS = {
    "dup_ngram_lines": (lambda: DuplicatedNgramLineFilter, []),
    "dirty_words": (lambda: DirtyWordsFilter, ["en"]),
    "token_kl": (lambda: TokenKLFilter, []),
    "gopher_repetition": (lambda: _datatrove("GopherRepetitionFilter"), ["en"]),
    "gopher_quality": (lambda: _datatrove("GopherQualityFilter"), ["en"]),
    "c4_quality": (lambda: _datatrove("C4QualityFilter"), ["en"]),
    "fineweb_quality": (lambda: _datatrove("FineWebQualityFilter"), ["en"]),
}
FILTER_ORDER = list(FILTERS)
# Arguments set by kiln itself, not from a recipe.
_RESERVED = {"self", "exclusion_writer", "reference"}


@dataclass
class FilterSpec:
    key: str
    enabled: bool = True
    languages: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def build(self):
        return FILTERS[self.key][0]()(**self.params)


def filter_specs(table: dict | None = None) -> list[FilterSpec]:
    """FilterSpecs in chain order from a recipe's `[filter]` table (strict keys)."""
    table = dict(table or {})
    unknown = sorted(set(table) - set(FILTERS))
    if unknown:
        raise ConfigError(f"filter: unknown filter {unknown[0]!r} (known: {', '.join(FILTER_ORDER)})")
    specs = []
    for key in FILTER_ORDER:
        opts = dict(table.get(key) or {})
        enabled = opts.pop("enabled", True)
        languages = opts.pop("languages", FILTERS[key][1])
        if not isinstance(enabled, bool):
            raise ConfigError(f"filter.{key}.enabled: expected true or false, got {enabled!r}")
        if not isinstance(languages, list):
            raise ConfigError(f"filter.{key}.languages: expected a list of language codes, got {languages!r}")
        cls = FILTERS[key][0]()
        parameters = inspect.signature(cls.__init__).parameters
        accepted = set(parameters) - _RESERVED
        for name, value in opts.items():
            if name not in accepted:
                raise ConfigError(
                    f"filter.{key}: unknown key {name!r} (known: enabled, languages, {', '.join(sorted(accepted))})"
                )
            check_param(f"filter.{key}.{name}", value, parameters[name].default)
        spec = FilterSpec(key, enabled, languages, opts)
        try:
            spec.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"filter.{key}: {e}") from e
        specs.append(spec)
    return specs


@dataclass
class FilterConfig:
    disable: list[str] = field(default_factory=list)  # filters to switch off, e.g. token_kl (same as enabled = false in its table)
    filters: dict = field(default_factory=dict)  # the [filter.NAME] tables: enabled, languages and the filter's own arguments

    @classmethod
    def from_table(cls, table: dict, where: str = "filter") -> "FilterConfig":
        """The [filter] section: `disable = [...]` beside one table per filter."""
        table = dict(table or {})
        disable = table.pop("disable", [])
        if not isinstance(disable, list) or not all(isinstance(name, str) for name in disable):
            raise ConfigError(f"{where}.disable: expected a list of filter names, got {disable!r}")
        cfg = cls(disable=disable, filters=table)
        try:
            cfg.specs()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        return cfg

    def specs(self) -> list[FilterSpec]:
        unknown = [name for name in self.disable if name not in FILTERS]
        if unknown:
            raise ConfigError(f"disable: unknown filter {unknown[0]!r} (known: {', '.join(FILTER_ORDER)})")
        tables = dict(self.filters)
        for name in self.disable:
            table = tables.get(name) or {}
            tables[name] = {**(table if isinstance(table, dict) else {}), "enabled": False}
        return filter_specs(tables)


def check_param(where: str, value, default) -> None:
    """A filter argument must have its default's type, and a number its range: a filter
    given `min_doc_words = "50"` would otherwise fail on every document and drop them all
    with an error reason. Thresholds whose default is not negative cannot be negative;
    ratios and fractions whose default lies in [0, 1] stay there."""
    if default is inspect.Parameter.empty or default is None:
        return  # no default to learn from; the constructor checks
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and isinstance(value, int)
    elif isinstance(default, float):
        ok = number
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = "list" if isinstance(default, (list, tuple)) else type(default).__name__
        raise ConfigError(f"{where}: expected {kind} (the default is {default!r}), got {value!r}")
    if number and not isinstance(default, bool) and isinstance(default, (int, float)):
        name = where.rsplit(".", 1)[-1]
        if ("ratio" in name or "frac" in name or name.endswith("_thr")) and 0 <= default <= 1 and not 0 <= value <= 1:
            raise ConfigError(f"{where}: expected a ratio between 0 and 1, got {value!r}")
        if default >= 0 and value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value!r}")


class FilterStage(Stage):
    """Gopher / C4 / FineWeb (datatrove) and Llama 3 heuristic filters.

    Filters run in the order of FILTER_ORDER; tune each in a recipe's [filter.NAME]
    table, or with --set filter.NAME.KEY=VALUE."""

    name = "filter"

    def __init__(self, cfg: FilterConfig | None = None):
        self.specs = [s for s in (cfg or FilterConfig()).specs() if s.enabled]
        self._chain = None
        self.kl_reference = None  # Spark broadcast of TokenKLFilter's reference

    def settings(self) -> dict:
        return {s.key: {"languages": s.languages, **s.params} for s in self.specs}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_chain"] = None  # rebuilt lazily on each executor
        return state

    @property
    def chain(self):
        if self._chain is None:
            chain = []
            for spec in self.specs:
                f = spec.build()
                if isinstance(f, TokenKLFilter):
                    f.reference = self.kl_reference.value if self.kl_reference is not None else None
                chain.append((spec.key, frozenset(spec.languages), f))
            self._chain = chain
        return self._chain

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(schema.TEXT, pa.string())]

    def needs_corpus_pass(self) -> bool:
        return any(s.key == "token_kl" for s in self.specs)  # prepare builds the reference from its input

    def prepare(self, spark, df) -> None:
        kl = next((s for s in self.specs if s.key == "token_kl"), None)
        if kl is not None:
            self.kl_reference = spark.sparkContext.broadcast(token_reference(df, kl.build(), kl.languages))

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        from datatrove.data import Document

        data = columns(batch, [schema.TEXT, schema.ID, schema.URL])
        n = batch.num_rows
        langs = columns(batch, [schema.LANG])[schema.LANG] if schema.LANG in batch.schema.names else [None] * n
        texts, reasons = [], []
        for i in range(n):
            doc = Document(text=data[schema.TEXT][i] or "", id=data[schema.ID][i],
                           metadata={"url": data[schema.URL][i], "lang": langs[i]})
            reasons.append(self.run_chain(doc, langs[i]))
            texts.append(doc.text)
        return set_columns(batch, output_schema(self, batch.schema), {
            schema.TEXT: texts, schema.DROP_REASON: reasons,
            schema.IN_BYTES: text_bytes(data[schema.TEXT]),
        })

    def run_chain(self, doc, lang: str | None) -> str | None:
        for key, languages, f in self.chain:
            if languages and lang not in languages:
                continue
            try:
                result = f.filter(doc)
            except Exception:  # noqa: BLE001 - a filter crashing on one document is a counted drop
                return f"{key}_error"
            keep, reason = result if isinstance(result, tuple) else (result, None)
            if not keep:
                return reason or key
        return None


def token_reference(df, f: TokenKLFilter, languages: list[str]) -> dict:
    """First pass: per-language top-`vocab_size` token counts over the corpus, in Spark.

    Each task counts its partition; Spark sums by (lang, token); only the top tokens
    per language and one total per language reach the driver.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    has_lang = schema.LANG in df.columns
    cols = [schema.TEXT] + ([schema.LANG] if has_lang else [])
    keep_langs = set(languages)
    out = pa.schema([("lang", pa.string()), ("token", pa.string()), ("n", pa.int64())])

    def count(batches):
        from collections import Counter

        counts = Counter()
        for batch in batches:
            texts = batch.column(schema.TEXT).to_pylist()
            ls = batch.column(schema.LANG).to_pylist() if has_lang else [""] * len(texts)
            for text, lang in zip(texts, ls):
                lang = lang or ""
                if keep_langs and lang not in keep_langs:
                    continue
                for tok in tokens(text or ""):
                    counts[(lang, tok)] += 1
        items = list(counts.items())
        for start in range(0, len(items), 50_000):
            chunk = items[start:start + 50_000]
            yield pa.RecordBatch.from_arrays(
                [pa.array([k[0] for k, _ in chunk]), pa.array([k[1] for k, _ in chunk]),
                 pa.array([v for _, v in chunk], pa.int64())], schema=out)

    summed = (df.select(*cols).mapInArrow(count, spark_type(out))
              .groupBy("lang", "token").agg(F.sum("n").alias("n")).persist())
    totals = {r["lang"]: r["n"] for r in summed.groupBy("lang").agg(F.sum("n").alias("n")).collect()}
    rank = F.row_number().over(Window.partitionBy("lang").orderBy(F.desc("n"), F.asc("token")))
    top_counts: dict[str, dict[str, int]] = {lang: {} for lang in totals}
    for r in summed.withColumn("rank", rank).where(F.col("rank") <= f.vocab_size).toLocalIterator():
        top_counts[r["lang"]][r["token"]] = r["n"]
    summed.unpersist()
    return reference_from_counts(top_counts, totals, f.alpha)


__all__ = ["FILTERS", "FILTER_ORDER", "FilterSpec", "FilterStage", "filter_specs", "token_reference"]
