"""Static web assets shipped in the package (DESIGN §4.9): ``client.js``, the
browser client, and the web console (``console.html`` and its modules).

The HTTP server serves them (``GET /client.js``, ``GET /console``,
``GET /console/<asset>``); a web application that would rather serve the client
from its own origin can read the same bytes here.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["ASSETS", "read_asset"]

_JS = "text/javascript; charset=utf-8"

#: the files a server may hand out, and their media types
ASSETS = {
    "client.js": _JS,
    # the console: a page, its style sheet and its ES modules (console.js imports the others)
    "console.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": _JS,
    "console-lib.js": _JS,
    "console-tail.js": _JS,
    "console-tasks.js": _JS,
    "console-dlq.js": _JS,
    "console-status.js": _JS,
}


def read_asset(name: str) -> bytes:
    """The bytes of the asset ``name`` (one of :data:`ASSETS`).

    Raises KeyError for any other name, so a request path can never reach
    another file of the package.
    """
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()
