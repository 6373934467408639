"""Static web assets shipped in the package: ``client.js``, the browser client (DESIGN §4.9).

The HTTP server serves them (``GET /client.js``); a web application that would
rather serve the client from its own origin can read the same bytes here.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["ASSETS", "read_asset"]

#: the files a server may hand out, and their media types
ASSETS = {"client.js": "text/javascript; charset=utf-8"}


def read_asset(name: str) -> bytes:
    """The bytes of the asset ``name`` (one of :data:`ASSETS`).

    Raises KeyError for any other name, so a request path can never reach
    another file of the package.
    """
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()
