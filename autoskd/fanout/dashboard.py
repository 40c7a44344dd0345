"""``autoskd dashboard``: optuna-dashboard for a tune's storage, on 127.0.0.1 unless asked otherwise.

The dashboard reads the same RDB storage the tune writes (SQLite file or PostgreSQL URL), so a
running tune's trials appear as they finish.
"""

from __future__ import annotations

import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import AutoSKDError
from .study import open_storage, storage_url

__all__ = ["make_dashboard_server", "serve_dashboard"]


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - one line per request is noise here
        pass


def make_dashboard_server(storage: str, host: str = "127.0.0.1", port: int = 8080):
    """A WSGI server (not started) serving optuna-dashboard for ``storage``."""
    import optuna_dashboard

    url = storage_url(storage, ".") if "://" not in storage else storage
    if url.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(url[len("sqlite:///"):]).exists():
            raise AutoSKDError(f"storage {url!r} does not exist yet; run `autoskd tune --storage {storage}` first")
    app = optuna_dashboard.wsgi(open_storage(url))
    try:
        return make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as err:
        raise AutoSKDError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port") from None


def serve_dashboard(storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    server = make_dashboard_server(storage, host, port)
    print(f"optuna-dashboard for {storage} on http://{host}:{server.server_port}/dashboard/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sys.stdout.flush()
