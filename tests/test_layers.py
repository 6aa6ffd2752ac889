"""The import layers of DESIGN.md: formats and config at the bottom, curation and training
side by side, mixing above training. An import that runs the other way is a design bug."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

KILN = Path(__file__).resolve().parents[1] / "kiln"

# Modules of each part may import these parts of kiln (at module level or inside functions).
ALLOWED = {
    "formats": {"config", "formats"},
    "kernels": {"config", "kernels"},
    "curation": {"config", "formats", "curation"},
    "training": {"config", "formats", "kernels", "training"},
    "mixing": {"config", "formats", "kernels", "training", "mixing"},
    "probe": {"config", "formats", "kernels", "curation", "training", "probe"},
    "demo": {"config", "formats", "curation", "demo"},
}


def entry_point(path: Path) -> bool:
    """The CLIs sit on top of every layer: a part's cli.py, `python -m` mains, spark-submit jobs."""
    return path.name in ("cli.py", "__main__.py") or "jobs" in path.parts


def kiln_imports(path: Path) -> set[str]:
    """The kiln parts (`kiln.<part>`) a module imports, anywhere in the file."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "kiln"]
        for name in names:
            bits = name.split(".")
            if bits[0] == "kiln" and len(bits) > 1:
                parts.add(bits[1])
    return parts


def test_no_import_runs_up_the_layers():
    wrong = []
    for part, allowed in ALLOWED.items():
        for path in sorted(p for p in (KILN / part).rglob("*.py") if not entry_point(p)):
            bad = kiln_imports(path) - allowed
            if bad:
                wrong.append(f"{path.relative_to(KILN.parent)} imports kiln.{', kiln.'.join(sorted(bad))}")
    assert wrong == []


HIDE_PYSPARK = """
import importlib.abc, sys

class HidePyspark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pyspark":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, HidePyspark())
"""


def test_training_and_mixing_import_without_pyspark():
    code = HIDE_PYSPARK + """
import kiln.training.train, kiln.training.cli, kiln.training.data, kiln.mixing.cli, kiln.mixing.optimize
import kiln.mixing.proxies, kiln.formats.shards, kiln.formats.mixture, kiln.formats.stats
try:
    import pyspark
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("pyspark was not hidden")
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "pyspark" or m.startswith("kiln.curation"))
print("loaded:", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "loaded: []"


def test_kiln_train_help_runs_without_pyspark():
    code = HIDE_PYSPARK + """
from kiln.cli import main
raise SystemExit(main(["train", "--help"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: kiln train" in done.stdout
