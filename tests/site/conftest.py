"""The browser and the served site, shared by the site's tests."""

from __future__ import annotations

import functools
import http.server
import os
import threading

import pytest

from site_pages import CHROMIUM, CHROMIUM_ARGS, built_site


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module", params=["localhost", "disk"])
def base_url(request):
    """The site served on localhost, and opened from disk as the README tells readers to."""
    site = built_site()
    if request.param == "disk":
        yield site.as_uri() + "/"
        return
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}; `make site-check` installs Debian's chromium, or set CHROMIUM=/path"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def served_site():
    """The site on localhost, for tests that read each page once."""
    handler = functools.partial(_QuietHandler, directory=str(built_site()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()
