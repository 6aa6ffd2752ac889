"""Shared fixtures: one Spark session for the whole test run, small real-text WARCs."""

from __future__ import annotations

import ast
import io
import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def spark():
    from kiln.curation.spark import get_spark

    session = get_spark("kiln-tests", "local[2]")
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
    """A gzip WARC/1.1; each record dict: url, body (bytes), and optional content_type,
    status, date, rec_type ('response' default, or 'request'/'metadata')."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=str(path).endswith(".gz"), warc_version=version)
        for i, r in enumerate(records):
            rec_type = r.get("rec_type", "response")
            headers = None
            if rec_type == "response":
                headers = StatusAndHeaders(
                    f"{r.get('status', 200)} OK",
                    [("Content-Type", r.get("content_type", "text/html; charset=utf-8"))],
                    protocol="HTTP/1.1",
                )
            record = writer.create_warc_record(
                r["url"], rec_type, payload=io.BytesIO(r["body"]), http_headers=headers,
                warc_headers_dict={"WARC-Date": r.get("date", f"2024-01-{i % 28 + 1:02d}T00:00:00Z"),
                                   "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>"},
            )
            writer.write_record(record)
    return path


def locale_sentences(lang: str, min_chars: int = 60, limit: int = 40) -> list[str]:
    """Translated messages from the machine's gettext catalogues: real text in `lang`."""
    import gettext

    out = []
    for mo in sorted(Path(f"/usr/share/locale/{lang}/LC_MESSAGES").glob("*.mo")):
        try:
            catalog = gettext.GNUTranslations(open(mo, "rb"))._catalog
        except Exception:  # noqa: BLE001 - a catalogue this parser cannot read
            continue
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
