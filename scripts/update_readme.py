#!/usr/bin/env python3
"""Regenerate the README's address-space section from the parameter registry.

The section between the `params:start` and `params:end` markers is the output of
`dreamdeck params --markdown`; tests/test_paramdoc.py fails when they drift apart.
"""

import sys
from pathlib import Path

from engine.catalog import build_registry
from engine.paramdoc import readme_with_params

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    new = readme_with_params(text, build_registry())
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("README.md: address space updated")
    sys.exit(0)
