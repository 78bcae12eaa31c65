#!/usr/bin/env python3
"""Compositor frame time (source + scene + 3 effects) at 1280x720 and 1920x1080, as JSON.

Same as `dreamdeck bench render`; kept as a script for CI logs and soak runs.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "render", *sys.argv[1:]]))
