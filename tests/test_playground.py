"""The playground page in a real headless Chromium (Debian's package, driven by Playwright): it loads with
nothing fetched from elsewhere, streams a generation into the output, stops on Stop, and shows API errors.

Needs `pip install playwright` and `apt-get install chromium`; skipped with the reason when either is
missing."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import urllib.request
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


def test_tokens_coloured_by_probability_with_top5(page, server, tiny_dir):
    page.fill("#prompt", "Colour me")
    set_range(page, "#temperature", 0)
    set_range(page, "#max_tokens", 30)
    assert page.is_checked("#colour")
    # how many token spans exist each time the output changes: they must arrive over several updates
    page.evaluate("""() => { window.tokCounts = [];
        new MutationObserver(() => window.tokCounts.push(document.querySelectorAll('#output .tok').length))
            .observe(document.getElementById('output'), {childList: true, subtree: true}); }""")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("finished", timeout=30_000)
    assert len(set(page.evaluate("window.tokCounts"))) > 3

    # the same request straight to the API: the page's spans are its tokens and probabilities
    req = urllib.request.Request(
        server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        data=json.dumps({"prompt": "Colour me", "max_tokens": 30, "temperature": 0, "logprobs": 5}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        choice = json.load(r)["choices"][0]
    lp = choice["logprobs"]
    spans = page.eval_on_selector_all("#output .tok",
                                      "els => els.map(e => [e.textContent, Number(e.dataset.p), e.title])")
    assert page.inner_text("#output") == "Colour me" + choice["text"]
    assert "".join(s for s, _, _ in spans) == choice["text"]
    n = len(spans)
    assert [s for s, _, _ in spans] == lp["tokens"][:n] and n >= len(lp["tokens"]) - 1  # all but an end of text
    for (_, p, title), want in zip(spans, lp["token_logprobs"]):
        assert abs(p - math.exp(want)) < 1e-5
        assert title.count("%") == 6  # its own probability and the top 5 (in the title for screen readers)
    assert page.eval_on_selector("#output", "el => el.classList.contains('colour')")
    bg = "e => getComputedStyle(e).backgroundColor"
    assert page.eval_on_selector("#output .tok", bg) not in ("rgba(0, 0, 0, 0)", "transparent")

    # hover: the top-5 alternatives, best first, the chosen (greedy: the best) in bold
    first = page.locator("#output .tok").first
    first.hover()
    tip = page.locator("#tip")
    sync_api.expect(tip).to_be_visible()
    rows = tip.locator("tr")
    sync_api.expect(rows).to_have_count(5)
    top = sorted(lp["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    assert rows.first.get_attribute("class") == "chosen"
    assert json.dumps(top[0][0])[1:-1] in rows.first.inner_text()
    shown = float(re.search(r"([0-9.e+-]+)%$", rows.first.inner_text()).group(1))
    assert shown == pytest.approx(100 * math.exp(top[0][1]), rel=0.05)
    # keyboard: focusing another token shows its alternatives; Escape hides them
    page.mouse.move(0, 0)
    page.locator("#output .tok").nth(2).focus()
    sync_api.expect(tip).to_be_visible()
    assert page.locator("#output .tok").nth(2).get_attribute("aria-describedby") == "tip"
    page.keyboard.press("Escape")
    sync_api.expect(tip).to_be_hidden()
    # a tap (click) shows them too
    page.locator("#output .tok").nth(1).click()
    sync_api.expect(tip).to_be_visible()
    # the toggle turns the colours off
    page.uncheck("#colour")
    assert page.eval_on_selector("#output .tok", bg) in ("rgba(0, 0, 0, 0)", "transparent")


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def chunk(text: str, tokens: list[str], finish: str | None = None) -> dict:
    lp = {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
          "top_logprobs": [{t: -0.5, "x": -1.5} for t in tokens], "text_offset": [0] * len(tokens)}
    return {"choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}


def test_new_controls_are_sent_only_when_set(page):
    sent: list[dict] = []

    def answer(route):
        sent.append(route.request.post_data_json)
        # held-back text, a character split over two byte tokens, the last token cut by a stop string and
        # an end-of-text token: spans cover exactly the text
        body = sse(chunk(" Hello", [" Hello"]), chunk("", ["bytes:\\xe2\\x80"]),
                   chunk("\u2019s", ["bytes:\\x99", "s"]), chunk(" wor", [" world", "<|endoftext|>"], "stop"))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/completions", answer)
    page.fill("#prompt", "Hi")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("finished")
    for field in ("presence_penalty", "frequency_penalty", "typical_p", "no_repeat_ngram_size", "min_tokens",
                  "logit_bias", "bad_words"):
        assert field not in sent[-1]  # defaults are left out: older servers refuse fields they do not know
    assert sent[-1]["logprobs"] == 5
    assert page.inner_text("#output") == "Hi Hello\u2019s wor"
    spans = page.eval_on_selector_all("#output .tok", "els => els.map(e => e.textContent)")
    assert spans == [" Hello", "\u2019", "s", " wor"]

    page.click("#more summary")
    set_range(page, "#presence_penalty", 0.5)
    set_range(page, "#frequency_penalty", -0.25)
    set_range(page, "#typical_p", 0.9)
    page.fill("#no_repeat_ngram_size", "3")
    page.fill("#min_tokens", "5")
    page.fill("#logit_bias", "50256:-100, 198:5\n13 : 2.5")
    page.fill("#bad_words", "foo, bar\nbaz qux,")
    sync_api.expect(page.locator("#more-n")).to_have_text("(7 set)")
    page.uncheck("#colour")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("finished")
    body = sent[-1]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.25 and body["typical_p"] == 0.9
    assert body["no_repeat_ngram_size"] == 3 and body["min_tokens"] == 5
    assert body["logit_bias"] == {"50256": -100, "198": 5, "13": 2.5}
    assert body["bad_words"] == ["foo", "bar", "baz qux"]
    assert "logprobs" not in body

    # a malformed bias is an error on the page, and nothing is sent
    page.fill("#logit_bias", "50256 -100")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text('"50256 -100" is not TOKEN_ID:BIAS')
    assert len(sent) == 2


def test_new_controls_reach_the_server_and_shape_the_text(page, tiny_dir):
    # the real server takes every control the page sends and gives the text Generator gives with them
    page.fill("#prompt", "The playground says")
    set_range(page, "#temperature", 0)
    set_range(page, "#max_tokens", 30)
    page.click("#more summary")
    set_range(page, "#presence_penalty", 0.5)
    set_range(page, "#frequency_penalty", 0.5)
    page.fill("#no_repeat_ngram_size", "2")
    page.fill("#min_tokens", "5")
    page.fill("#logit_bias", "50256:-100")
    page.fill("#bad_words", "the")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("finished", timeout=30_000)
    assert not page.is_visible("#error")
    cfg = GenerationConfig(max_new_tokens=30, temperature=0, presence_penalty=0.5, frequency_penalty=0.5,
                           no_repeat_ngram_size=2, min_tokens=5, logit_bias={50256: -100}, bad_words=("the",))
    want = Generator(*load_model(tiny_dir)).generate("The playground says", cfg)[0].text
    assert page.inner_text("#output") == "The playground says" + want
