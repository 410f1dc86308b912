"""The README's model-coverage count is the recorded one (tools/results/model_coverage.json): a merge that keeps one
side's paragraph and the other's results leaves the README claiming a count no run measured."""
from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_count_is_the_recorded_coverage():
    with open(os.path.join(ROOT, "tools", "results", "model_coverage.json"), encoding="utf-8") as f:
        results = json.load(f)
    rows = results["models"]
    assert results["of"] == len(rows)
    assert results["go_in"] == sum(1 for r in rows.values() if r["ok"] and r.get("parity", True))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    claimed = re.findall(r"\*\*(\d+) of (\d+)\*\* torchvision and timm models", readme)
    assert claimed == [(str(results["go_in"]), str(results["of"]))]
