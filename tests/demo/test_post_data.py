"""The demo's post-training data: deterministic bytes, TRL's row formats, the documented
counts, answers taken from real docstrings, and rejected answers that are plainly worse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kiln.demo.post import build_post_data
from kiln.demo.sources import clean_rst, stdlib_modules

FILES = ("sft.jsonl", "prefs.jsonl", "prefs_eval.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("post")
    return out, build_post_data(out, seed=1)


@pytest.fixture(scope="module")
def docstrings() -> str:
    """Every docstring of the standard library, whitespace-normalised, in one string."""
    docs = [d for m in stdlib_modules() for d in [m.doc, *(doc for _h, doc in m.sections)]]
    return "\n".join(" ".join(clean_rst(d).split()) for d in docs)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text(value) -> str:
    """A preference field's text: the string, or the content of its one message."""
    if isinstance(value, str):
        return value
    assert len(value) == 1 and set(value[0]) == {"role", "content"}
    return value[0]["content"]


def packages(prompts: list[str]) -> set[str]:
    """The top-level packages that questions name (`json.dumps()` -> json)."""
    return {name.split(".")[0] for p in prompts for name in re.findall(r"`([\w.]+)", p)}


def rejection(chosen: str, rejected: str) -> str:
    if rejected.startswith(chosen.upper() + " ") and " CLICK http://" in rejected:
        return "spam"
    if (chosen.startswith(rejected) and len(rejected.split()) < len(chosen.split())
            and not rejected.endswith((".", ",", ";", ":", "!", "?"))):
        return "truncated"
    assert sorted(rejected.split()) != sorted(chosen.split())
    return "salad"


def test_two_builds_are_byte_identical(built, tmp_path):
    out, counts = built
    assert counts == {"sft": 375, "prefs": 300, "prefs_eval": 60}
    assert build_post_data(tmp_path, seed=1) == counts
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_sft_rows_are_conversations_then_prompt_completion(built, docstrings):
    sft = rows(built[0] / "sft.jsonl")
    conversations, completions = sft[:300], sft[300:]
    assert len(completions) == 75
    systems = two_turns = 0
    for row in conversations:
        assert list(row) == ["messages"]
        roles = [m["role"] for m in row["messages"]]
        systems += roles[0] == "system"
        exchanges = roles[1:] if roles[0] == "system" else roles
        assert exchanges in (["user", "assistant"], ["user", "assistant"] * 2)
        two_turns += len(exchanges) == 4
        for m in row["messages"]:
            assert set(m) == {"role", "content"} and m["content"].strip()
            if m["role"] == "assistant":
                assert m["content"] in docstrings
    assert (systems, two_turns) == (120, 75)
    for row in completions:
        assert list(row) == ["prompt", "completion"]
        assert row["prompt"].startswith(("Question: ", "Summarise: "))
        assert row["prompt"].endswith(("\nAnswer:", "\nSummary:")) and row["completion"].startswith(" ")
        assert row["completion"][1:] in docstrings


def test_preferences_prefer_the_grounded_answer(built, docstrings):
    prefs = rows(built[0] / "prefs.jsonl")
    assert len(prefs) == 300
    kinds = {"salad": 0, "spam": 0, "truncated": 0}
    for i, row in enumerate(prefs):
        assert set(row) == {"prompt", "chosen", "rejected"} | ({"margin"} if i % 2 == 0 else set())
        if i % 5 == 4:  # TRL's conversational preference format
            assert [row[k][0]["role"] for k in ("prompt", "chosen", "rejected")] == ["user", "assistant", "assistant"]
        else:
            assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
        chosen, rejected = text(row["chosen"]), text(row["rejected"])
        assert chosen != rejected and chosen in docstrings
        kind = rejection(chosen, rejected)
        kinds[kind] += 1
        if "margin" in row:
            assert row["margin"] == {"salad": 1.0, "spam": 1.0, "truncated": 0.3}[kind]
    assert kinds == {"salad": 100, "spam": 100, "truncated": 100}
    assert sum(isinstance(r["prompt"], list) for r in prefs) == 60


def test_held_out_preferences_are_about_other_packages(built, docstrings):
    out = built[0]
    held_out = rows(out / "prefs_eval.jsonl")
    assert len(held_out) == 60
    for row in held_out:
        assert set(row) == {"prompt", "chosen", "rejected"} and all(isinstance(v, str) for v in row.values())
        assert row["chosen"] != row["rejected"] and row["chosen"] in docstrings
        rejection(row["chosen"], row["rejected"])
    trained = [text(r["prompt"]) for r in rows(out / "prefs.jsonl")]
    trained += [m["content"] for r in rows(out / "sft.jsonl")[:300] for m in r["messages"] if m["role"] == "user"]
    assert len(packages([r["prompt"] for r in held_out])) >= 5
    assert not packages([r["prompt"] for r in held_out]) & packages(trained)
