"""A plugin whose import fails: it needs a module that is not installed."""

from __future__ import annotations

import dreamdeck_no_such_module  # noqa: F401
