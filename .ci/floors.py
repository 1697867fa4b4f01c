"""Print `name==floor` for every `name>=floor` requirement of fmtune's dependencies and its dev extra (pyproject.toml):
the constraints `make test-min` installs, so the fast tier runs on the oldest versions fmtune says it supports."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: {requirement!r} has no >= floor; every dependency of fmtune names the oldest version it was tested with")
    name, floor = match.groups()
    if name != "torch":  # installed first, from its pinned file
        print(f"{name}=={floor}")
