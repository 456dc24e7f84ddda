"""Notebook shape of the library notebooks: export-cell sizes and how many are followed by a check.

    python tools/nbshape.py [NBS_DIR] [--per-notebook]

Prints one JSON line for the folder (library notebooks only: not workflows/ or dashboard/), and with
--per-notebook one line per notebook before it. The targets (issue 10): no export cell over 100 non-blank
lines, median under 25, at least 80 % of export cells followed by a code cell that checks them."""
import json
import statistics
import sys
from pathlib import Path


def _is_export(src: str) -> bool:
    return any(l.strip().replace(" ", "").startswith("#|export") for l in src.lstrip().splitlines()[:3])


def _is_check(src: str) -> bool:
    head = [l.strip().replace(" ", "") for l in src.lstrip().splitlines()[:3]]
    return bool(src.strip()) and not any(h.startswith(("#|export", "#|hide", "#|default_exp")) for h in head)


def shape(notebooks) -> dict:
    sizes, followed = [], 0
    for nb in notebooks:
        src = ["".join(c["source"]) for c in json.loads(Path(nb).read_text())["cells"] if c["cell_type"] == "code"]
        for i, s in enumerate(src):
            if not _is_export(s):
                continue
            sizes.append(len([l for l in s.splitlines() if l.strip()]))
            followed += i + 1 < len(src) and _is_check(src[i + 1])
    n = len(sizes)
    return {"export_cells": n, "max_lines": max(sizes, default=0), "median_lines": statistics.median(sizes) if n else 0,
            "over_100": sum(s > 100 for s in sizes), "share_followed_by_check": round(followed / max(n, 1), 3)}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    nbs = sorted(Path(args[0] if args else "nbs").glob("*.ipynb"))
    if "--per-notebook" in sys.argv:
        for nb in nbs:
            print(json.dumps({"notebook": nb.name, **shape([nb])}))
    print(json.dumps(shape(nbs)))
