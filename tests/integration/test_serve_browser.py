"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright): load the page, give
the API key, send a prompt, watch streamed text appear, press stop (the server frees the request's row), then a
chat turn. Skipped without chromium locally; under CI (CI=true) a missing browser is a failure."""

import os
import re
import shutil

import pytest

from conftest import skip_without_shared_data_msg

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_support import live_server, make_run, wait_until  # noqa: E402

expect = sync_api.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        skip_without_shared_data_msg("chromium is not installed (apt-get install chromium); .ci/run installs it")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def test_playground_streams_stops_and_chats(browser, tmp_path):
    run = make_run(tmp_path)
    with live_server(run, api_key="pg-key", max_tokens_cap=1_000_000) as (url, app):
        engine = app.state.ctx.engine
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page.goto(url + "/")
        assert page.title() == "gptforge playground"
        page.fill("#prompt", "The king")
        page.click("#send")  # no key yet: the server's 401 message is shown
        expect(page.locator("#status")).to_have_text(re.compile(r"^error: missing API key"))

        page.fill("#api_key", "pg-key")
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_have_text("tiny")
        page.fill("#max_tokens", "1000000")  # far more than can finish before we press stop
        page.click("#send")
        expect(page.locator("#output")).to_have_text(re.compile(r"^The king[\s\S]{10,}"))  # streamed text
        assert page.text_content("#output").startswith("The king")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped")
        wait_until(lambda: engine.num_running == 0, what="the stopped request to leave the engine")
        assert "tokens/s" in page.text_content("#tps")
        assert page.is_enabled("#send") and not page.is_enabled("#stop")

        page.select_option("#mode", "chat")
        page.fill("#max_tokens", "12")
        page.fill("#prompt", "Good day, my lord")
        page.click("#send")
        expect(page.locator("#status")).to_have_text(re.compile(r"^done \((stop|length)\)"))
        turns = page.locator("#output .turn").all_text_contents()
        assert turns[-2] == "User: Good day, my lord" and turns[-1].startswith("Assistant: ")
        assert page.text_content("#prompt") == ""
        page.close()
