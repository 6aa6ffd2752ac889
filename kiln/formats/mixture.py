"""The mixture file (DESIGN.md contract 4): what the mixer hands the trainer.

```toml
[mixture]            # domain = weight; weights sum to 1; 0 excludes a domain
general = 0.5
math = 0.25
code = 0.17
multilingual = 0.08

[provenance]         # optional, free-form: fit file, predicted loss, interval, tool, date
fit = "fit.json"
predicted_loss = 2.31
```

Domain names are the shard domains as written by the tokenize stage (the `domain`
of each shard index, not its percent-encoded directory name). The trainer's sampler
draws sequences from domains by these weights (kiln.training.data).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import ConfigError, load_toml
from kiln.formats.runs import SUM_TOLERANCE

TABLES = ("mixture", "provenance")


@dataclass
class Mixture:
    weights: dict[str, float]  # domain -> sampling weight; the weights sum to 1, a 0 excludes the domain
    provenance: dict = field(default_factory=dict)  # where the weights came from (fit file, predicted loss, ...)
    path: str = field(default="", compare=False)  # the file it was read from, for error messages; "" if built

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> "Mixture":
        """Build from the parsed file ({"mixture": {...}, "provenance": {...}}); `path`,
        the file it came from, prefixes every error."""
        where = path or "mixture"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table with [mixture], got {data!r}")
        unknown = sorted(set(data) - set(TABLES))
        if unknown:
            raise ConfigError(f"{where}: unknown table {unknown[0]!r} (known tables: {', '.join(TABLES)})")
        if "mixture" not in data:
            raise ConfigError(f"{where}: no [mixture] table (domain = weight)")
        table = data["mixture"]
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [mixture] must be a table of domain = weight, got {table!r}")
        if not table:
            raise ConfigError(f"{where}: [mixture] is empty; give at least one domain = weight")
        weights: dict[str, float] = {}
        for domain, weight in table.items():
            # bool is an int in Python; `code = true` is a typo, not a weight of 1.
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"{where}: weight of domain {domain!r} is {weight!r}, not a number")
            if not math.isfinite(weight):
                raise ConfigError(f"{where}: weight of domain {domain!r} is {weight}, not a finite number")
            if weight < 0:
                raise ConfigError(f"{where}: weight of domain {domain!r} is negative ({weight})")
            weights[str(domain)] = float(weight)
        # fsum: the sum of the written decimals, not an accumulation of rounding errors.
        total = math.fsum(weights.values())
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ConfigError(f"{where}: mixture weights sum to {total!r}, not 1 "
                              f"(tolerance {SUM_TOLERANCE:g})")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ConfigError(f"{where}: [provenance] must be a table, got {provenance!r}")
        return cls(weights=weights, provenance=dict(provenance), path=path)

    def active(self) -> dict[str, float]:
        """The domains the sampler draws from (weight > 0), sorted by name: the order
        of the sampler's domain indices, independent of the order in the file."""
        return {d: w for d, w in sorted(self.weights.items()) if w > 0}

    def describe(self) -> str:
        """The file name if there is one, for error messages."""
        return self.path or "mixture"


def load_mixture(path: str | os.PathLike) -> Mixture:
    return Mixture.from_dict(load_toml(path), path=str(path))


def save_mixture(mixture: Mixture, path: str | os.PathLike) -> None:
    """Write `mixture` as TOML, atomically (a reader never sees half a file). The
    weights are written with repr, so load_mixture(path) == mixture exactly."""
    # Through from_dict: the file written must be one load_mixture accepts.
    Mixture.from_dict({"mixture": mixture.weights, "provenance": mixture.provenance}, path=str(path))
    lines = ["[mixture]"]
    lines += [f"{_key(d)} = {_value(w, path)}" for d, w in mixture.weights.items()]
    if mixture.provenance:
        lines += ["", "[provenance]"]
        scalars = {k: v for k, v in mixture.provenance.items() if not isinstance(v, dict)}
        lines += [f"{_key(k)} = {_value(v, path)}" for k, v in scalars.items()]
        for name, table in mixture.provenance.items():
            if isinstance(table, dict):
                lines += ["", f"[provenance.{_key(name)}]"]
                for k, v in table.items():
                    if isinstance(v, dict):
                        raise ConfigError(f"{path}: provenance.{name}.{k}: tables nested two deep are not written")
                    lines.append(f"{_key(k)} = {_value(v, path)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, target)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _string(key)


def _string(text: str) -> str:
    # A JSON string is a valid TOML basic string: same quotes, same \uXXXX escapes.
    return json.dumps(text, ensure_ascii=False)


def _value(value: Any, path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        # TOML needs a '.' or an exponent to read a float back as a float.
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, path) for v in value) + "]"
    raise ConfigError(f"{path}: cannot write a {type(value).__name__} ({value!r}) as a TOML value")
