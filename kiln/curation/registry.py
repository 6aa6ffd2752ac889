"""Every curation stage kiln knows, one line each: recipe section -> (config, stage).

The section name is the stage's name in `[pipeline] stages`, its recipe table, its
`kiln curate` subcommand (with dashes) and its spark-submit job file. The config is a
dataclass with one commented field per setting (the CLI's options come from it); the
stage class takes that config. Adding a stage is its module, one line here and its test.
"""

from __future__ import annotations

from kiln.curation.classify import DomainConfig, DomainStage, QualityConfig, QualityStage
from kiln.curation.decontam import DecontamConfig, DecontamStage
from kiln.curation.dedup import (ExactDedupConfig, ExactDedupStage, LineDedupConfig, LineDedupStage, MinHashConfig,
                                 MinHashDedupStage, UrlDedupConfig, UrlDedupStage)
from kiln.curation.extract import ExtractConfig, ExtractStage
from kiln.curation.filters import FilterConfig, FilterStage
from kiln.curation.langid import LangIdConfig, LangIdStage
from kiln.curation.scorer import ScorerConfig, ScorerStage
from kiln.curation.token_shards import TokenizeConfig, TokenizeStage

# In the order of a full pipeline.
STAGES: dict[str, tuple[type, type]] = {
    "extract": (ExtractConfig, ExtractStage),
    "langid": (LangIdConfig, LangIdStage),
    "filter": (FilterConfig, FilterStage),
    "dedup_url": (UrlDedupConfig, UrlDedupStage),
    "dedup_exact": (ExactDedupConfig, ExactDedupStage),
    "dedup_minhash": (MinHashConfig, MinHashDedupStage),
    "dedup_lines": (LineDedupConfig, LineDedupStage),
    "quality": (QualityConfig, QualityStage),
    "scorer": (ScorerConfig, ScorerStage),
    "domain": (DomainConfig, DomainStage),
    "decontam": (DecontamConfig, DecontamStage),
    "tokenize": (TokenizeConfig, TokenizeStage),
}
