"""The status page and phone remote (``StatusServer``) and the feed it shows (``StatusFeed``).

Wiring, in the CLI::

    server = install_status_page(app, StatusConfig(host, port, token))
    print(server.url)   # once: it holds the token when the page is open to the network
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.web.feed import StatusFeed, accelerator_memory, encode_thumbnail
from engine.web.server import DEFAULT_PORT, StatusConfig, StatusServer, is_loopback

__all__ = [
    "DEFAULT_PORT",
    "StatusConfig",
    "StatusFeed",
    "StatusServer",
    "accelerator_memory",
    "encode_thumbnail",
    "install_status_page",
    "is_loopback",
]

if TYPE_CHECKING:
    from engine.app import App


def install_status_page(
    app: App, config: StatusConfig = StatusConfig(), feed: StatusFeed | None = None
) -> StatusServer:
    """Bind the server (an OSError if the port is taken) and plug it and its feed into ``app``."""
    server = StatusServer(app, feed or StatusFeed(), config)
    app.add_output(server.feed)
    app.add_control(server)
    return server
