"""Real text found on this machine, which the demo's pages wrap in site chrome.

* the Python standard library sources -> docstring prose, code listings and
  maths reference text;
* gettext catalogues in ``/usr/share/locale/*/LC_MESSAGES/*.mo`` ->
  multilingual prose (translated program messages);
* HTML manuals under ``/usr/share/doc`` -> article bodies;
* kiln's dirty-word list (``filters/dirty_words_en.txt``) -> adult spam.

Every reader returns what it finds: a missing source just gives fewer pages.
File listings are sorted, so two builds on one machine read the same text.
"""

from __future__ import annotations

import ast
import gettext
import re
import struct
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Scripts without spaces between words: shorter sentences, joined without " ".
CJK_LANGS = ("ja", "zh_CN", "zh_TW", "ko")
LOCALE_DIR = Path("/usr/share/locale")
DOC_DIR = Path("/usr/share/doc")
#: Block elements kept from /usr/share/doc manual pages.
DOC_BLOCK_TAGS = ("h1", "h2", "h3", "h4", "p", "pre", "ul", "ol", "dl", "table", "blockquote")

#: Modules whose docs feed the maths pages (and are kept out of plain prose).
MATH_MODULES = ("math", "statistics", "fractions", "decimal", "cmath", "random")
MATH_SOURCE_FILES = {"statistics": "statistics.py", "fractions": "fractions.py",
                     "decimal": "_pydecimal.py", "random": "random.py"}
#: Stdlib directories that are not documentation-like library code.
STDLIB_SKIP_PARTS = ("test", "tests", "idle_test", "site-packages",
                     "__pycache__", "turtledemo", "__phello__")

#: Only these (mild) entries of the installed profanity list are used: the
#: pages need a few dirty-word hits, not the worst words of the list.
MILD_DIRTY_WORDS = ("nude", "naked", "porn", "xxx", "horny", "erotic", "booty",
                    "busty", "kinky", "playboy", "boobs", "damn", "crap", "sex")


def word_count(text: str) -> int:
    return len(text.split())


_RST_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_UNDERLINE = re.compile(r"[-=~^*#]{3,}")
_RST_TABLE = re.compile(r"=+( +=+)+")


def clean_rst(text: str) -> str:
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return text.replace("`", "")


def doc_blocks(doc: str) -> list:
    """Turn a docstring into article blocks: paragraphs, lists, code."""
    blocks: list = []
    for para in re.split(r"\n\s*\n", clean_rst(doc)):
        lines = [ln.rstrip() for ln in para.splitlines() if ln.strip()]
        if not lines:
            continue
        # Split "Example:\n>>> code" into prose + code.
        cut = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith(">>>")), None)
        if cut is None and len(lines) > 1 and all(ln.startswith((" ", "\t")) for ln in lines):
            cut = 0
        if cut is not None:
            if cut:
                blocks.append(("p", " ".join(ln.strip() for ln in lines[:cut])))
            blocks.append(("pre", textwrap.dedent("\n".join(lines[cut:]))))
            continue
        if len(lines) >= 2 and _RST_UNDERLINE.fullmatch(lines[1].strip()):
            blocks.append(("h3", lines[0].strip()))
            lines = lines[2:]
            if not lines:
                continue
        if any(_RST_TABLE.fullmatch(ln.strip()) for ln in lines):  # reST table
            blocks.append(("pre", textwrap.dedent("\n".join(lines))))
            continue
        if re.match(r"\s*[-*] ", lines[0]):
            items = re.split(r"\n\s*[-*] ", "\n" + "\n".join(lines))
            items = [" ".join(i.split()) for i in items if i.strip()]
            blocks.append(("ul", items))
            continue
        blocks.append(("p", " ".join(ln.strip() for ln in lines)))
    return blocks


@dataclass
class ModuleInfo:
    relpath: str
    name: str
    doc: str
    sections: list  # [(heading, docstring)]
    source: str
    functions: list  # [(qualname, first_line, last_line, docstring)]


def stdlib_modules() -> list[ModuleInfo]:
    """Parse every documentation-like .py file of the standard library."""
    try:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py")
                       if not any(part in STDLIB_SKIP_PARTS for part in p.relative_to(root).parts))
    except (OSError, KeyError):
        return []
    mods = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        name = rel[:-3].replace("/", ".")
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        sections, functions = [], []

        def visit(body, prefix: str) -> None:
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = f"{prefix}{node.name}"
                    doc = ast.get_docstring(node) or ""
                    private = node.name.startswith("_") and node.name != "__init__"
                    if isinstance(node, ast.ClassDef):
                        if doc and word_count(doc) >= 25 and not private:
                            sections.append((f"class {qual}", doc))
                        visit(node.body, qual + ".")
                    else:
                        if doc and word_count(doc) >= 25 and not private:
                            sections.append((f"{qual}()", doc))
                        functions.append((qual, node.lineno, node.end_lineno or node.lineno, doc))

        visit(tree.body, "")
        mods.append(ModuleInfo(rel, name, ast.get_docstring(tree) or "", sections, source, functions))
    return mods


def gettext_catalogs(lang: str) -> Iterator[tuple[str, dict]]:
    """(domain, catalogue) for each readable ``.mo`` file of one locale, in file-name order.

    A catalogue maps a msgid (a ``(msgid, n)`` tuple for plural forms) to its translation.
    """
    for path in sorted((LOCALE_DIR / lang / "LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as fh:
                catalog = gettext.GNUTranslations(fh)._catalog
        except (OSError, ValueError, UnicodeDecodeError, struct.error):
            continue
        yield path.stem, catalog


def catalog_sentences(lang: str) -> list[tuple[str, str]]:
    """Long translated sentences of one locale as (domain, sentence) pairs.

    Program messages are short; keep only full sentences without format
    placeholders or option syntax so the pages read as prose.
    """
    cjk = lang in CJK_LANGS
    min_len = 22 if cjk else 60
    seen: dict[str, str] = {}
    for domain, catalog in gettext_catalogs(lang):
        for key, value in catalog.items():
            msgid = key[0] if isinstance(key, tuple) else key
            if not isinstance(value, str) or not msgid or value == msgid:
                continue
            text = value.strip().replace("\n", "" if cjk else " ")
            if (len(text) < min_len or any(c in text for c in "%{}<>\\\t_=|$@")
                    or "--" in text or "  " in text or text[-1] not in ".!?。！？"):
                continue
            if sum(ch.isalpha() for ch in text) / len(text) < 0.7:
                continue
            seen.setdefault(text, domain)
    return [(domain, text) for text, domain in seen.items()]


def doc_html_articles() -> list[tuple[str, str, str]]:
    """(title, inner HTML, path) of prose-rich manual pages in /usr/share/doc."""
    try:
        import lxml.html  # a trafilatura dependency
    except ImportError:
        return []
    try:
        paths = sorted(DOC_DIR.rglob("*.html"))
    except OSError:
        return []
    drop = ("script", "style", "nav", "header", "footer", "form", "iframe",
            "noscript", "link", "meta", "button", "input", "img")
    out = []
    for path in paths:
        if path.name in ("all.html", "index.html", "Index.html") or "APIchunk" in path.name:
            continue
        try:
            if path.stat().st_size > 600_000:
                continue
            doc = lxml.html.document_fromstring(path.read_bytes())
        except (OSError, ValueError, lxml.etree.ParserError):
            continue
        title = " ".join((doc.findtext(".//title") or "").split())
        main = None
        for ident in ("apicontent", "content", "main"):
            found = doc.xpath(f'//*[@id="{ident}"]')
            if found:
                main = found[0]
                break
        if main is None:
            main = doc.body if doc.find("body") is not None else doc
        for el in list(main.iter(*drop)):
            if el.getparent() is not None:
                el.drop_tree()
        for el in main.xpath('.//*[@id="toc" or @id="column2" or contains(@class,"navheader") '
                             'or contains(@class,"navfooter") or contains(@class,"toc") '
                             'or contains(@class,"nav-panel")]'):
            if el.getparent() is not None:
                el.drop_tree()
        paras = [" ".join(p.text_content().split()) for p in main.iter("p")]
        prose = sum(len(p) for p in paras if len(p) > 80)
        pre = sum(len(p.text_content()) for p in main.iter("pre"))
        # Want prose: not <pre> dumps, nor whole text files in one <p> (valgrind's dist.*).
        if (prose < 1500 or pre > prose or max(map(len, paras)) > 5000 or not title
                or main.xpath('.//*[contains(@class, "literallayout")]')):
            continue
        # Flatten to top-level blocks (manuals nest everything in <div>s) and
        # stop at ~50 kB so that pages keep a realistic size.
        parts, size = [], 0
        for el in main.iter(*DOC_BLOCK_TAGS):
            outer = el.getparent()
            while outer is not None and outer is not main and outer.tag not in DOC_BLOCK_TAGS:
                outer = outer.getparent()
            if (outer is not None and outer is not main) or "nav" in (el.get("class") or ""):
                continue
            frag = lxml.html.tostring(el, encoding="unicode", with_tail=False)
            parts.append(frag)
            size += len(frag)
            if size > 50_000:
                break
        out.append((title, "\n".join(parts), str(path)))
    return out


def dirty_words() -> list[str]:
    from kiln.curation.filters.llama3 import load_word_list

    listed = load_word_list()
    return [w for w in MILD_DIRTY_WORDS if w in listed]


def math_docs(mods_by_name: dict[str, ModuleInfo]) -> dict[str, list[tuple[str, str]]]:
    """(name, docstring) reference entries for each maths module."""
    out: dict[str, list[tuple[str, str]]] = {}
    for mod in ("math", "cmath"):  # C modules: no source, use runtime docs
        module = __import__(mod)
        entries = []
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            doc = getattr(obj, "__doc__", None)
            if name.startswith("_") or not callable(obj) or not doc:
                continue
            entries.append((f"{mod}.{name}()", " ".join(doc.split("\n\n", 1)[-1].split())
                            if doc.startswith(name + "(") else " ".join(doc.split())))
        out[mod] = entries
    for mod, fname in MATH_SOURCE_FILES.items():
        info = next((m for m in mods_by_name.values() if m.relpath == fname), None)
        if info is None:
            out[mod] = []
            continue
        entries = [(f"{mod}.{h.replace('class ', '')}", d) for h, d in info.sections]
        if info.doc:
            entries.insert(0, (mod, info.doc))
        out[mod] = entries
    return out

