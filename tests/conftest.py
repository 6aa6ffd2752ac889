"""Shared fixtures: one Spark session for the whole test run, small real-text WARCs."""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import pytest

from kiln.demo.sources import gettext_catalogs
from kiln.demo.warc import Record, http_response
from kiln.demo.warc import write_warc as write_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def spark():
    from kiln.curation.spark import get_spark

    session = get_spark("kiln-tests", "local[2,4]")  # task retries on, as kiln's own local runs
    yield session
    session.stop()


def docstrings(module: str, min_chars: int = 200) -> list[str]:
    """Long docstrings of a standard-library module: real English prose."""
    tree = ast.parse((STDLIB / f"{module}.py").read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                out.append(doc)
    return out


def page(title: str, paragraphs: list[str], charset: str = "utf-8") -> str:
    """A bare page: paragraphs go in unescaped (tests plant raw HTML in them) and the chrome is
    fixed, so tests can assert what extraction keeps; the demo's renderer escapes its text and
    draws its chrome at random."""
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f"<!DOCTYPE html><html><head><meta charset=\"{charset}\"><title>{title}</title></head><body>"
        "<nav><ul><li><a href='/'>Home</a></li><li><a href='/docs'>Docs</a></li>"
        "<li><a href='/blog'>Blog</a></li><li><a href='/about'>About us</a></li></ul></nav>"
        f"<main><article><h1>{title}</h1>\n{body}\n</article></main>"
        "<footer><p>Copyright 2024 Example Docs. All rights reserved.</p>"
        "<p>This website uses cookies to improve your experience.</p></footer></body></html>"
    )


def write_warc(path: Path, records: list[dict], version: str = "1.1") -> Path:
    """A WARC (gzip when the name ends in .gz) written by the demo's writer; each record dict:
    url, body (bytes), and optional content_type, status, date, rec_type ('response' default,
    or 'request'/'metadata')."""
    out = []
    for i, r in enumerate(records):
        rec_type = r.get("rec_type", "response")
        http = None
        if rec_type == "response":
            http = http_response(r.get("status", 200), "OK",
                                 [("Content-Type", r.get("content_type", "text/html; charset=utf-8"))])
        out.append(Record(rec_type, r["url"], r["body"],
                          {"WARC-Date": r.get("date", f"2024-01-{i % 28 + 1:02d}T00:00:00Z"),
                           "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>"}, http=http))
    return write_records(path, out, version=version, gzip=str(path).endswith(".gz"))


def locale_sentences(lang: str, min_chars: int = 60, limit: int = 40) -> list[str]:
    """Translated messages from the machine's gettext catalogues (read as the demo reads
    them): real text in `lang`."""
    out = []
    for _domain, catalog in gettext_catalogs(lang):
        for key, value in sorted(catalog.items(), key=lambda kv: str(kv[0])):
            if key and isinstance(value, str) and len(value) >= min_chars and "%" not in value:
                out.append(" ".join(value.split()))
                if len(out) >= limit:
                    return out
    return out


def read_dropped(stage_dir: Path):
    """A stage's dropped/ side output, with drop_reason from its partition directories."""
    import polars as pl

    return pl.read_parquet(str(stage_dir / "dropped" / "**" / "*.parquet"), hive_partitioning=True)
