"""The playground page in a real headless Chromium (Debian's package, driven by Playwright): it loads with
nothing fetched from elsewhere, streams a generation into the output, stops on Stop, and shows API errors.

Needs `pip install playwright` and `apt-get install chromium`; skipped with the reason when either is
missing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")

from gpt2kit.checkpoints import load_model  # noqa: E402
from gpt2kit.generate import GenerationConfig, Generator  # noqa: E402
from gpt2kit.server import BackgroundServer, ServerSettings, create_app  # noqa: E402

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"  # ../shared/data from the root
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "page-key"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser test needs Chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def server(tiny_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(tiny_dir)
    # pace the tiny model (a few ms a step) so that a stream really spans time: otherwise all of it can
    # arrive in one network read and the page has nothing to show "in pieces"
    forward = model.forward

    def paced(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    model.forward = paced
    srv = BackgroundServer(create_app(model, tok, ServerSettings(model_name="tiny", api_key=KEY)))
    srv.start()
    yield srv
    srv.stop()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context()
    pg = ctx.new_page()
    foreign: list[str] = []
    pg.on("request", lambda r: None if urlparse(r.url).hostname == "127.0.0.1" else foreign.append(r.url))
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    sync_api.expect(pg.locator("#model")).to_contain_text("tiny")  # /health answered
    pg.fill("#api-key", KEY)
    yield pg
    ctx.close()
    assert foreign == [], "the page fetched something from outside this server"
    assert errors == [], "script errors on the page"


def set_range(pg, sel: str, value) -> None:
    pg.eval_on_selector(sel, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def test_generation_streams_into_the_output(page, tiny_dir):
    page.fill("#prompt", "The playground says")
    set_range(page, "#temperature", 0)
    set_range(page, "#max_tokens", 60)
    page.fill("#seed", "1")
    # count how many times the output changes while the answer streams in
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('output'),
            {characterData: true, childList: true, subtree: true}); }""")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("finished", timeout=30_000)
    want = Generator(*load_model(tiny_dir)).generate("The playground says",
                                                     GenerationConfig(max_new_tokens=60, temperature=0))[0].text
    assert page.inner_text("#output") == "The playground says" + want
    assert page.evaluate("window.updates") > 3  # text arrived in pieces, not at once
    assert not page.is_visible("#error")
    assert page.is_enabled("#generate") and not page.is_enabled("#stop-btn")


def test_stop_button(page, server):
    page.fill("#prompt", "Go on and on")
    set_range(page, "#max_tokens", 1024)
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').innerText.length > 40", timeout=30_000)
    page.click("#stop-btn")
    sync_api.expect(page.locator("#status")).to_have_text("stopped")
    assert page.is_enabled("#generate")
    deadline = time.monotonic() + 10  # the server frees the row
    engine = server.server.config.app.state.engine
    while engine.stats.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.active == 0


def test_api_errors_are_shown(page):
    page.fill("#seed", "-1")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text("seed must be")
    page.fill("#seed", "")
    page.fill("#stop", "")
    page.fill("#api-key", "wrong")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text("incorrect API key")
    page.fill("#api-key", KEY)
    page.fill("#prompt", "")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text("empty prompt")
