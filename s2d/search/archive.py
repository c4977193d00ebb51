"""``archive.jsonl``: every evaluated arch of a run, one JSON line each, append-only.

Appends are flushed and fsynced line by line, so a killed search loses at most the
evaluation in flight; a torn last line (killed mid-write) is ignored on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Archive:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._torn = False  # the file ends mid-line: the next append starts a new line
        if self.path.exists():
            text = self.path.read_text()
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if rec.get("key") not in self._records:
                    self._order.append(rec["key"])
                self._records[rec["key"]] = rec

    def __len__(self) -> int:
        return len(self._order)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def add(self, key: str, record: dict[str, Any]) -> None:
        rec = {"key": key, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(("\n" if self._torn else "") + json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._torn = False
        if key not in self._records:
            self._order.append(key)
        self._records[key] = rec

    def records(self, searcher: str | None = None) -> list[dict[str, Any]]:
        recs = [self._records[k] for k in self._order]
        return [r for r in recs if searcher is None or r.get("searcher") == searcher]

    def best(self, searcher: str | None = None) -> dict[str, Any] | None:
        recs = self.records(searcher)
        return max(recs, key=lambda r: r["reward"]) if recs else None


def pareto_front(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records not dominated in (higher accuracy, lower average MACs)."""
    front = []
    for r in sorted(records, key=lambda r: (r["average_macs"], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front
