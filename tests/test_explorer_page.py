"""The explorer page at `/`, driven in a real browser (Debian's Chromium through Playwright).

One browser serves the whole module; each test opens its own context (fresh localStorage) on
the session's node, or on a node of its own when it needs to stop it.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

try:
    from tests.browser import DESKTOP, PHONE, Watch, screenshot
    from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from browser import DESKTOP, PHONE, Watch, screenshot
    from conftest import GENERATION_WAIT, SMOL, NodeProcess

# How long the page may take to show something (ms): a bound for a busy machine, not a budget.
UI_WAIT = 120_000
expect.set_options(timeout=UI_WAIT)
PAGE_FILE = Path(__file__).resolve().parent.parent / "aitbc_node" / "static" / "explorer.html"
# What the page reads on its first paint: one request each, all public.
FIRST_READS = {
    "/api/health",
    "/api/v1/stats",
    "/api/explorer/stats",
    "/api/v1/miners",
    "/api/explorer/blocks",
    "/api/explorer/transactions",
    "/api/explorer/receipts",
    "/api/explorer/timeseries",
}


def open_page(browser: Browser, viewport: dict[str, int] | None = None) -> tuple[Page, Watch]:
    context = browser.new_context(viewport=viewport or DESKTOP)
    context.set_default_timeout(UI_WAIT)
    page = context.new_page()
    return page, Watch.attach(page)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page, _ = open_page(browser)
    yield page
    page.context.close()


def root(node: NodeProcess) -> str:
    return node.url.removesuffix("/api") + "/"


def wait_live(page: Page) -> None:
    """The first poll answered and the lists are on screen."""
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator("#blocks table")).to_be_visible()


def wait_for_polls(page: Page, count: int) -> None:
    """Until `count` more of the page's polls have been answered; every poll but the last of
    them has been rendered by then (the next poll starts only after one is rendered)."""
    for _ in range(count):
        with page.expect_response(lambda r: r.url.split("?")[0].endswith("/api/explorer/stats")):
            pass


def chain_state(node: NodeProcess) -> tuple[Any, ...]:
    stats = node.request("GET", "/explorer/stats").json()
    return tuple(stats[k] for k in ("height", "receipts", "unsealed_receipts", "transactions"))


def sealed_receipt(node: NodeProcess, prompt: str = "Name one colour.") -> dict[str, Any]:
    """Run a short job to completion and wait until its receipt is sealed in a block."""
    job = node.submit(prompt, params={"max_tokens": 12, "seed": 7, "temperature": 0})
    job = node.wait_for(job["job_id"], ("completed",), timeout=GENERATION_WAIT)
    deadline = time.monotonic() + UI_WAIT / 1000
    while True:
        r = node.request("GET", f"/v1/receipts/{job['receipt_id']}/proof")
        if r.status_code == 200:
            return {**job, "block_height": r.json()["block_height"]}
        assert time.monotonic() < deadline, f"receipt never sealed: {r.text}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def done_job(node: NodeProcess) -> dict[str, Any]:
    return sealed_receipt(node)


def test_page_is_small_and_self_contained(node: NodeProcess) -> None:
    body = httpx.get(root(node), timeout=120).content
    assert len(PAGE_FILE.read_bytes()) < 100_000
    assert len(body) < 100_000, f"the page is {len(body)} bytes"
    text = body.decode()
    # Nothing from elsewhere: no external scripts, styles, fonts or images.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text


def test_loads_clean_with_only_page_and_api_reads(node: NodeProcess, browser: Browser) -> None:
    page, watch = open_page(browser)
    try:
        page.goto(root(node))
        wait_live(page)
        first = [(r.method, r.resource_type, r.url) for r in watch.http_requests()]
        base = root(node)
        assert first[0] == ("GET", "document", base), first
        reads = [url.removeprefix(base[:-1]).split("?")[0] for _, _, url in first[1:]]
        assert all(m == "GET" and t == "fetch" for m, t, _ in first[1:]), first
        # One request per API read, and nothing else (no scripts, styles, fonts, images).
        assert sorted(reads) == sorted(FIRST_READS), reads

        health = node.request("GET", "/health").json()["node"]
        expect(page.locator("#node-pubkey")).to_have_text(health["public_key"])
        expect(page.locator("#node-key-id")).to_have_text(health["key_id"])
        stats = page.locator("#stats")
        for label in ("Jobs", "Chain height", "Queue depth", "Miners online", "Tokens generated"):
            expect(stats).to_contain_text(label, ignore_case=True)
        expect(page.locator("#miners")).to_contain_text("builtin")
        expect(page.locator("#miners")).to_contain_text(SMOL)
        # Polls that bring nothing new leave the DOM alone (rows, focus and scroll stay put).
        for _ in range(5):
            before = chain_state(node)
            wait_for_polls(page, 3)  # the page catches up with `before`
            page.evaluate("window.__row = document.querySelector('#blocks tbody tr')")
            page.locator("#blocks tbody a").first.focus()
            wait_for_polls(page, 3)  # two polls or more, rendered
            if chain_state(node) == before:  # else the chain moved meanwhile: try again
                break
        assert page.evaluate("window.__row.isConnected")
        expect(page.locator("#blocks tbody a").first).to_be_focused()
        watch.assert_clean()
        # Later polls re-read the lists only when the chain moved: never the page or assets.
        assert all("/api/" in r.url for r in watch.http_requests()[1:])
    finally:
        page.context.close()


def test_new_job_appears_live_without_reload(node: NodeProcess, browser: Browser) -> None:
    page, watch = open_page(browser)
    try:
        page.goto(root(node))
        wait_live(page)
        page.evaluate("window.__sameDocument = true")
        job = sealed_receipt(node, "Say one word.")
        rid, height = job["receipt_id"], job["block_height"]
        receipt_row = page.locator("#receipts tr", has=page.locator(f"a[href='#/receipt/{rid}']"))
        expect(receipt_row).to_be_visible()
        expect(receipt_row.locator(f"a[href='#/block/{height}']")).to_be_visible()
        expect(page.locator(f"#blocks a[href='#/block/{height}']")).to_be_visible()
        expect(page.locator("#txs")).to_contain_text(rid)
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        documents = [r for r in watch.http_requests() if r.resource_type == "document"]
        assert len(documents) == 1
        watch.assert_clean()
    finally:
        page.context.close()


def test_receipt_view_verifies_signature(
    node: NodeProcess, page: Page, done_job: dict[str, Any]
) -> None:
    rid, height = done_job["receipt_id"], done_job["block_height"]
    key_id = node.request("GET", "/health").json()["node"]["key_id"]
    page.goto(root(node) + f"#/receipt/{rid}")
    verdict = page.locator("#verdict")
    expect(verdict).to_contain_text(f"Signature valid — signed by this node's key {key_id}")
    expect(verdict).to_have_class(re.compile(r"\bok\b"))
    seal = page.locator("#seal-status")
    expect(seal).to_contain_text(f"Sealed in block #{height}")
    expect(seal).to_have_class(re.compile(r"\bok\b"))
    expect(page.locator("#detail h1")).to_contain_text(rid)
    expect(page.locator("#overview")).to_be_hidden()


@pytest.mark.parametrize(
    "field, change",
    [
        ("amount", lambda v: v + 1),
        ("result_sha256", lambda v: ("0" if v[0] != "0" else "1") + v[1:]),
    ],
)
def test_tampered_receipt_is_reported_invalid(
    node: NodeProcess, page: Page, done_job: dict[str, Any], field: str, change: Any
) -> None:
    rid = done_job["receipt_id"]
    original = node.request("GET", f"/v1/receipts/{rid}").json()
    tampered = copy.deepcopy(original)
    tampered[field] = change(original[field])
    assert tampered["signature"] == original["signature"]

    def serve_tampered(route: Route) -> None:
        route.fulfill(status=200, content_type="application/json", body=json.dumps(tampered))

    page.route(f"**/api/v1/receipts/{rid}", serve_tampered)
    page.goto(root(node) + f"#/receipt/{rid}")
    verdict = page.locator("#verdict")
    expect(verdict).to_contain_text("Signature INVALID — ")
    expect(verdict).to_have_class(re.compile(r"\bbad\b"))
    expect(verdict).not_to_contain_text("Signature valid")
    # The block's inclusion proof was made for the real bytes, so it fails too.
    expect(page.locator("#seal-status")).to_contain_text("inclusion proof fails")
    if field == "amount":
        screenshot(page, "receipt-tampered-desktop")


def test_receipt_signed_by_another_key_is_invalid(
    node: NodeProcess, page: Page, done_job: dict[str, Any]
) -> None:
    rid = done_job["receipt_id"]
    forged = node.request("GET", f"/v1/receipts/{rid}").json()
    forged["signature"]["key_id"] = "ed25519:0123456789abcdef"
    page.route(
        f"**/api/v1/receipts/{rid}",
        lambda route: route.fulfill(status=200, content_type="application/json", json=forged),
    )
    page.goto(root(node) + f"#/receipt/{rid}")
    expect(page.locator("#verdict")).to_contain_text("Signature INVALID — ")
    expect(page.locator("#verdict")).to_contain_text("ed25519:0123456789abcdef")


def test_links_routes_and_back_button(
    node: NodeProcess, page: Page, done_job: dict[str, Any]
) -> None:
    page.goto(root(node))
    wait_live(page)
    newest = page.locator("#receipts a[href^='#/receipt/']").first
    rid = newest.get_attribute("href").removeprefix("#/receipt/")
    newest.click()
    expect(page).to_have_url(re.compile(f"#/receipt/{rid}$"))
    expect(page.locator("#verdict")).to_contain_text("Signature valid")
    expect(page.locator("#overview")).to_be_hidden()
    page.locator("#seal-status a").click()
    expect(page).to_have_url(re.compile(r"#/block/\d+$"))
    expect(page.locator("#block-verdict")).to_contain_text("Block signature valid")
    expect(page.locator(f"#detail a[href='#/receipt/{rid}']")).to_be_visible()
    page.go_back()
    expect(page).to_have_url(re.compile(f"#/receipt/{rid}$"))
    expect(page.locator("#verdict")).to_contain_text("Signature valid")
    page.go_back()
    expect(page.locator("#overview")).to_be_visible()
    expect(page.locator("#detail")).to_be_hidden()

    # Shareable URLs open a view directly.
    rid, height = done_job["receipt_id"], done_job["block_height"]
    page.goto(root(node) + f"#/block/{height}")
    expect(page.locator("#detail h1")).to_have_text(f"Block #{height}")
    page.locator(f"#detail a[href='#/receipt/{rid}']").click()
    expect(page.locator("#verdict")).to_contain_text("Signature valid")
    client = node.request("GET", f"/v1/receipts/{rid}").json()["client_address"]
    page.locator(f"#detail a[href='#/address/{client}']").first.click()
    expect(page).to_have_url(re.compile(f"#/address/{client}$"))
    expect(page.locator("#detail h1")).to_contain_text(client)
    expect(page.locator("#detail")).to_contain_text("Balance")
    expect(page.locator("#detail")).to_contain_text(rid)
    page.goto(root(node) + "#/block/0")
    expect(page.locator("#detail h1")).to_have_text("Block #0")
    expect(page.locator("#detail")).to_contain_text("genesis")
    # Unknown things say so.
    page.goto(root(node) + "#/receipt/rcpt-0000000000000000")
    expect(page.locator("#detail")).to_contain_text("receipt rcpt-0000000000000000 not found")
    page.goto(root(node) + "#/block/999999")
    expect(page.locator("#detail")).to_contain_text("Block #999,999 is not sealed yet")
    page.goto(root(node) + "#/nowhere")
    expect(page.locator("#detail h1")).to_have_text("Nothing here")
    # The search box routes what it is given.
    search = page.get_by_label("Find a block height, receipt id or address")
    search.fill(rid)
    search.press("Enter")
    expect(page).to_have_url(re.compile(f"#/receipt/{rid}$"))
    search.fill("0")
    search.press("Enter")
    expect(page.locator("#detail h1")).to_have_text("Block #0")


def test_try_it_runs_a_real_job(node: NodeProcess, browser: Browser) -> None:
    page, watch = open_page(browser)
    try:
        page.goto(root(node))
        wait_live(page)
        expect(page.locator(f"#model option[value='{SMOL}']")).to_be_attached()
        page.get_by_label("API key").fill(node.client_key)
        page.get_by_label("Prompt").fill("List three fruits, one per line.")
        page.get_by_label("Max tokens").fill("48")
        page.get_by_label("Model").select_option(SMOL)
        page.evaluate(
            """() => {
            window.__statuses = [];
            const box = document.querySelector('#job');
            new MutationObserver(() => {
              const s = box.querySelector('.job')?.dataset.status;
              if (s && window.__statuses.at(-1) !== s) window.__statuses.push(s);
            }).observe(box, {subtree: true, childList: true, attributes: true});
          }"""
        )
        page.get_by_role("button", name="Run job").click()
        expect(page.locator("#job .job[data-status='completed']")).to_be_visible(
            timeout=GENERATION_WAIT * 1000
        )
        statuses = page.evaluate("window.__statuses")
        assert statuses[0] == "pending" and statuses[-1] == "completed", statuses
        assert statuses == [s for s in ("pending", "running", "completed") if s in statuses]
        expect(page.locator("#job .steps")).to_contain_text("✓ running")
        result = page.locator("#job-result")
        expect(result).to_be_visible()
        assert result.inner_text().strip()
        assert page.evaluate("localStorage.getItem('aitbc-explorer.api-key')") == node.client_key

        link = page.locator("#job-receipt")
        expect(link).to_be_visible()
        screenshot(page.locator("#try"), "try-it-completed-desktop")
        rid = link.get_attribute("href").removeprefix("#/receipt/")
        job_id = page.locator("#job-status .mono").inner_text()
        job = node.job(job_id)
        assert job["receipt_id"] == rid and job["status"] == "completed"
        assert job["result"].strip() == result.inner_text().strip()
        link.click()
        expect(page).to_have_url(re.compile(f"#/receipt/{rid}$"))
        verdict = page.locator("#verdict")
        expect(verdict).to_contain_text("Signature valid — signed by this node's key")
        expect(page.locator("#seal-status")).to_contain_text("Sealed in block #")

        # The key survives a reload (it is kept in localStorage). The reload itself cuts off
        # the polls the old page had in flight (net::ERR_ABORTED): those are not failures.
        failed_before = len(watch.failed)
        page.goto(root(node))
        expect(page.get_by_label("API key")).to_have_value(node.client_key)
        watch.failed[failed_before:] = [
            f for f in watch.failed[failed_before:] if not f.endswith("net::ERR_ABORTED")
        ]
        watch.assert_clean()
    finally:
        page.context.close()


def test_bad_key_shows_the_api_detail(node: NodeProcess, page: Page) -> None:
    bad = "ait_client_not-a-real-key"
    expected = node.request("POST", "/v1/jobs", bad, json={"prompt": "hi", "model": SMOL}).json()
    assert expected["error_code"] == "INVALID_API_KEY"
    page.goto(root(node))
    wait_live(page)
    page.get_by_label("API key").fill(bad)
    page.get_by_role("button", name="Run job").click()
    error = page.locator("#job-error")
    expect(error).to_contain_text(expected["detail"])
    expect(error).to_contain_text("INVALID_API_KEY")
    # No key at all is caught before asking the node.
    page.get_by_role("button", name="Forget").click()
    page.get_by_label("Prompt").press("Control+Enter")
    expect(error).to_contain_text("Paste a client API key first")
    expect(page.get_by_label("API key")).to_be_focused()


def test_unreachable_node_shows_banner_and_recovers(start_node: Any, page: Page) -> None:
    proc = start_node("--no-miner")
    page.goto(root(proc))
    wait_live(page)
    # A node with no miner and no jobs: deliberate empty states, not blank boxes.
    expect(page.locator("#receipts")).to_contain_text("No receipts yet")
    expect(page.locator("#miners")).to_contain_text("No miners registered")
    expect(page.locator("#model")).to_contain_text("No models served")
    banner = page.locator("#banner")
    expect(banner).to_be_hidden()

    proc.stop()
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Node unreachable")
    expect(page.locator("#live")).to_have_text("Offline")
    expect(page.locator("#banner-sub")).to_contain_text("attempt 2")

    again = NodeProcess(proc.data_dir, "--no-miner")
    again.port, again.url = proc.port, proc.url
    try:
        again.start()
        expect(page.locator("#live")).to_have_text("Live")
        expect(banner).to_be_hidden()
    finally:
        again.stop()


def no_horizontal_overflow(page: Page) -> None:
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal overflow: {width}"


@pytest.mark.parametrize("name, viewport", [("desktop", DESKTOP), ("phone", PHONE)])
def test_screenshots_and_layout(
    node: NodeProcess, browser: Browser, done_job: dict[str, Any], name: str, viewport: Any
) -> None:
    page, watch = open_page(browser, viewport)
    try:
        page.goto(root(node))
        wait_live(page)
        expect(page.locator("#receipts table")).to_be_visible()
        no_horizontal_overflow(page)
        screenshot(page, f"main-{name}")

        rid = done_job["receipt_id"]
        page.goto(root(node) + f"#/receipt/{rid}")
        expect(page.locator("#verdict")).to_contain_text("Signature valid")
        expect(page.locator("#seal-status")).to_contain_text("Sealed in block")
        # Two animation frames: the layout after the last change has been drawn.
        page.evaluate(
            "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
        no_horizontal_overflow(page)
        screenshot(page, f"receipt-{name}")

        page.goto(root(node) + f"#/block/{done_job['block_height']}")
        expect(page.locator("#block-verdict")).to_contain_text("Block signature valid")
        no_horizontal_overflow(page)
        screenshot(page, f"block-{name}")

        client = node.request("GET", f"/v1/receipts/{rid}").json()["client_address"]
        page.goto(root(node) + f"#/address/{client}")
        expect(page.locator("#detail")).to_contain_text("Balance")
        no_horizontal_overflow(page)
        screenshot(page, f"address-{name}")
        watch.assert_clean()
    finally:
        page.context.close()


CONTRAST_JS = """
(selectors) => {
  const rgba = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = c => (c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const over = (top, under) => {
    const a = top.length > 3 ? top[3] : 1;
    return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a));
  };
  const background = el => {
    const layers = [];
    for (let n = el; n; n = n.parentElement) {
      const c = rgba(getComputedStyle(n).backgroundColor);
      if (c.length > 3 && c[3] === 0) continue;
      layers.push(c);
      if (c.length === 3 || c[3] === 1) break;
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255]);
  };
  const out = [];
  for (const sel of selectors) {
    for (const el of document.querySelectorAll(sel)) {
      if (!el.offsetParent || !el.textContent.trim()) continue;
      const fg = over(rgba(getComputedStyle(el).color), background(el));
      const [a, b] = [lum(fg), lum(background(el))].sort((x, y) => y - x);
      out.push([sel, el.textContent.trim().slice(0, 30), (a + 0.05) / (b + 0.05)]);
    }
  }
  return out;
}
"""

A11Y_JS = """
() => {
  const name = el => (el.getAttribute('aria-label') || '').trim()
    || [...(el.labels || [])].map(l => l.textContent.trim()).join(' ')
    || (el.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean)
         .map(id => document.getElementById(id)?.textContent.trim() || '').join(' ')
    || (el.tagName === 'BUTTON' || el.tagName === 'A' ? el.textContent.trim() : '');
  const unnamed = sel => [...document.querySelectorAll(sel)].filter(el => !name(el))
    .map(el => el.outerHTML.slice(0, 80));
  return {
    fields: unnamed('input, select, textarea'),
    buttons: unnamed('button'),
    links: unnamed('a[href]'),
    h1: [...document.querySelectorAll('h1')].filter(h => h.offsetParent).length,
    h2: document.querySelectorAll('h2').length,
    lang: document.documentElement.lang,
    main: document.querySelectorAll('main').length,
    live: document.querySelectorAll('[aria-live], [role=status], [role=alert]').length,
    tables: [...document.querySelectorAll('table')]
      .every(t => t.querySelector('thead th[scope=col]')),
  };
}
"""


def test_accessibility_basics(node: NodeProcess, page: Page, done_job: dict[str, Any]) -> None:
    page.goto(root(node))
    wait_live(page)
    for route in ("", f"#/receipt/{done_job['receipt_id']}", "#/block/0"):
        page.goto(root(node) + route)
        if route:
            expect(page.locator("#detail .verdict").first).to_be_visible()
        report = page.evaluate(A11Y_JS)
        assert report["fields"] == [], report
        assert report["buttons"] == [], report
        assert report["links"] == [], report
        assert report["h1"] == 1 and report["h2"] >= 1, report
        assert report["lang"] == "en" and report["main"] == 1 and report["live"] >= 2, report
        assert report["tables"], report

    # Text contrast: WCAG AA (4.5:1) for the text people read on the overview.
    page.goto(root(node))
    wait_live(page)
    selectors = ["body", "h1", "h2", "th", "td", "a", ".muted", ".faint", ".stat .label", "label"]
    low = [c for c in page.evaluate(CONTRAST_JS, selectors) if c[2] < 4.5]
    assert low == [], low

    # Keyboard: the skip link comes first and lands on the content; links are reachable.
    page.keyboard.press("Tab")
    expect(page.locator("a.skip")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    page.get_by_label("API key").focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Show")).to_be_focused()


def test_canonical_json_matches_the_node(node: NodeProcess, page: Page) -> None:
    from aitbc_node.canonical import canonical_bytes

    page.goto(root(node))
    samples = [
        {"b": 1, "a": [3, 2, {"z": None, "y": True, "x": False}], "": "empty key"},
        {"text": 'quote " backslash \\ slash / tab \t nl \n cr \r bs \b ff \f nul \x00 \x1f'},
        {"unicode": "héllo — ünïcödé ✓ 日本語 🙂 \u2028 \u007f", "ключ": "значение"},
        {"big": 2**63 - 1, "neg": -(2**53) - 7, "zero": 0, "deep": [[[[]]], {}]},
    ]
    for sample in samples:
        text = json.dumps(sample, ensure_ascii=True)  # as the API could send it
        got = page.evaluate("t => aitbcExplorer.canon(aitbcExplorer.parseJSON(t))", text)
        assert got == canonical_bytes(sample).decode(), sample


def test_receipt_cosigned_by_a_remote_miner(start_node: Any, page: Page) -> None:
    from aitbc_node.receipts import hash_result
    from aitbc_node.signing import NodeKey

    proc = start_node("--no-miner")
    miner = NodeKey.generate()
    key = proc.new_key("miner", "gpu-box-1")
    r = proc.request(
        "POST",
        "/v1/miners/register",
        key,
        json={
            "miner_id": "gpu-box-1",
            "capabilities": [SMOL],
            "gpu_info": {"name": "RTX 4090", "memory": "24GB"},
            "public_key": miner.public_key_hex,
        },
    )
    assert r.status_code == 200, r.text
    job = proc.submit("Say hi")
    r = proc.request("POST", f"/v1/jobs/{job['job_id']}/claim", key, json={"miner_id": "gpu-box-1"})
    assert r.status_code == 200, r.text
    result = 'Hi — "ünïcode" ✓\nsecond line'
    signature = miner.sign(hash_result(result).encode("ascii"))
    r = proc.request(
        "POST",
        f"/v1/jobs/{job['job_id']}/complete",
        key,
        json={
            "miner_id": "gpu-box-1",
            "result": result,
            "usage": {"prompt_tokens": 3, "completion_tokens": 7},
            "miner_signature": {
                "alg": "ed25519",
                "public_key": miner.public_key_hex,
                "value": signature,
            },
        },
    )
    assert r.status_code == 200, r.text
    rid = proc.job(job["job_id"])["receipt_id"]
    page.goto(root(proc) + f"#/receipt/{rid}")
    expect(page.locator("#verdict")).to_contain_text("Signature valid")
    expect(page.locator("#cosign .badge.ok")).to_have_text("valid")
    expect(page.locator("#cosign")).to_contain_text(miner.public_key_hex[:6])
    expect(page.locator("#seal-status")).to_contain_text("Sealed in block")
    page.goto(root(proc))
    expect(page.locator("#miners")).to_contain_text("gpu-box-1")
    expect(page.locator("#miners")).to_contain_text("RTX 4090")


def test_receipt_view_waits_for_its_block(start_node: Any, browser: Browser) -> None:
    # Blocks far apart, so the view opens between a job's completion and its block.
    proc = start_node("--block-interval", "60")
    page, watch = open_page(browser)
    try:
        page.goto(root(proc))
        wait_live(page)
        seal = page.locator("#seal-status")
        for _ in range(3):  # the block may be sealed before the view opens: then try again
            job = proc.submit("Say hi", params={"max_tokens": 4})
            job = proc.wait_for(job["job_id"], ("completed",), timeout=GENERATION_WAIT)
            page.goto(root(proc) + f"#/receipt/{job['receipt_id']}")
            expect(seal).to_be_visible()
            if "Not yet sealed" in seal.inner_text():
                break
        else:
            raise AssertionError("never caught a receipt before its block")
        # The signature holds before sealing; the view moves on by itself once the block is in.
        expect(page.locator("#verdict")).to_contain_text("Signature valid")
        expect(seal).to_contain_text("Sealed in block #")
        expect(seal).to_have_class(re.compile(r"\bok\b"))
        watch.assert_clean()  # never asked for the proof of an unsealed receipt (a 409)
    finally:
        page.context.close()
