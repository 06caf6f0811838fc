"""The explorer page as a workshop demo, in a real browser on a real node: Try-it streams the
answer and can stop it, receipts and blocks are checked against a pinned key, the lists page
back to the oldest block, and on a phone Try-it comes right after the overview's numbers.

Screenshots land in tests/artifacts/ (demo-desktop.png, demo-phone.png, demo-key-warning.png).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route, expect

try:
    from tests.browser import DESKTOP, PHONE
    from tests.conftest import GENERATION_WAIT, LONG_PROMPT, SMOL, NodeProcess
    from tests.test_explorer_page import (
        no_horizontal_overflow,
        open_page,
        root,
        sealed_receipt,
        wait_live,
    )
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from browser import DESKTOP, PHONE
    from conftest import GENERATION_WAIT, LONG_PROMPT, SMOL, NodeProcess
    from test_explorer_page import (
        no_horizontal_overflow,
        open_page,
        root,
        sealed_receipt,
        wait_live,
    )

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PIN_STORE = "aitbc-explorer.pinned-key"
# Records what the Try-it box showed at every change: (job status, characters of text shown).
WATCH_JOB_JS = """() => {
  window.__seen = [];
  const box = document.querySelector('#job');
  new MutationObserver(() => {
    const job = box.querySelector('.job'), pre = box.querySelector('#job-result');
    if (job) window.__seen.push([job.dataset.status, pre ? pre.textContent.length : 0]);
  }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def shoot(page: Page, name: str) -> None:
    """A full-page screenshot at tests/artifacts/NAME.png, once the last change is drawn."""
    # From the top, so that the sticky header is drawn where it belongs.
    page.evaluate(
        "() => { scrollTo(0, 0); return new Promise(r => requestAnimationFrame("
        "() => requestAnimationFrame(r))); }"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def long_generation(page: Page) -> None:
    """Make the page's job long by its token count: the same request, with `ignore_eos` and a
    greedy sampler added to its params (the page itself sends only max_tokens)."""

    def add_params(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        body["params"] = {**body.get("params", {}), "ignore_eos": True, "temperature": 0}
        route.continue_(post_data=json.dumps(body))

    page.route(re.compile(r".*/api/v1/jobs$"), add_params)


def start_job(page: Page, node: NodeProcess, max_tokens: int) -> None:
    page.get_by_label("API key").fill(node.client_key)
    page.get_by_label("Model").select_option(SMOL)
    page.get_by_label("Prompt").fill(LONG_PROMPT)
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.evaluate(WATCH_JOB_JS)
    page.get_by_role("button", name="Run job").click()


def test_try_it_streams_text_before_completion(node: NodeProcess, browser: Browser) -> None:
    page, watch = open_page(browser)
    try:
        long_generation(page)
        page.goto(root(node))
        wait_live(page)
        start_job(page, node, 300)
        done = page.locator("#job .job[data-status='completed']")
        expect(done).to_be_visible(timeout=GENERATION_WAIT * 1000)
        seen = page.evaluate("window.__seen")
        early = [s for s in seen if s[0] in ("pending", "running") and s[1] > 0]
        assert early, f"no text was shown before the job completed: {seen[:20]}"
        # The text grew while the job ran (many steps), not in one piece at the end.
        assert len({n for _, n in early}) > 3, early

        job_id = page.locator("#job-status .mono").inner_text()
        job = node.job(job_id)
        assert job["status"] == "completed" and job["usage"]["completion_tokens"] == 300
        assert page.locator("#job-result").text_content() == job["result"]
        stats = page.locator("#job-stats")
        expect(stats).to_contain_text("first token after")
        expect(stats).to_contain_text("tokens/s")
        expect(stats).to_contain_text("300 tokens")  # exact, from the job's usage, at the end
        verdict = page.locator("#job-verdict")
        expect(verdict).to_contain_text("Receipt signature valid")
        expect(verdict).to_contain_text(node.request("GET", "/health").json()["node"]["key_id"])
        expect(page.locator("#job-receipt")).to_have_attribute(
            "href", f"#/receipt/{job['receipt_id']}"
        )

        # The stream was read with the key in a header, never in a URL.
        streams = [r for r in watch.http_requests() if r.url.endswith(f"/{job_id}/stream")]
        assert len(streams) == 1 and streams[0].headers.get("x-api-key") == node.client_key
        assert not [r.url for r in watch.http_requests() if node.client_key in r.url]
        watch.assert_clean()
        expect(page.locator("#receipts")).to_contain_text(job["receipt_id"])
        shoot(page, "demo-desktop")
    finally:
        page.context.close()


def test_stop_cancels_the_job(node: NodeProcess, browser: Browser) -> None:
    page, watch = open_page(browser)
    try:
        long_generation(page)
        page.goto(root(node))
        wait_live(page)
        start_job(page, node, 2000)
        result = page.locator("#job-result")
        expect(result).to_have_text(re.compile(r"\S"), timeout=GENERATION_WAIT * 1000)
        expect(page.locator("#job .job[data-status='running']")).to_be_visible()
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#job .job[data-status='cancelled']")).to_be_visible()
        job = node.job(page.locator("#job-status .mono").inner_text())
        assert job["status"] == "cancelled"
        # What was generated before the stop stays on screen; the Stop button goes away.
        assert result.text_content()
        expect(page.locator("#job-status")).to_contain_text("was stopped")
        expect(page.get_by_role("button", name="Stop")).to_be_hidden()
        watch.assert_clean()
    finally:
        page.context.close()


def test_pinned_key_that_differs_turns_into_a_warning(node: NodeProcess, browser: Browser) -> None:
    from aitbc_node.signing import NodeKey, key_id_for

    job = sealed_receipt(node)
    rid, height = job["receipt_id"], job["block_height"]
    health = node.request("GET", "/health").json()["node"]
    page, watch = open_page(browser)
    try:
        # Trust on first use: the first visit pins the node's own key, and all is green.
        page.goto(root(node) + f"#/receipt/{rid}")
        expect(page.locator("#verdict")).to_contain_text("Signature valid")
        assert page.evaluate(f"localStorage.getItem('{PIN_STORE}')") == health["public_key"]
        expect(page.locator("#pin-state")).to_have_text("✓ pinned key")
        warning = page.locator("#keywarn")
        expect(warning).to_be_hidden()

        # Another key pinned (as if the node had swapped its key since): a loud warning on
        # every route, and receipts and blocks fail against the pinned key.
        other = NodeKey.generate().public_key_hex
        page.locator("#pin summary").click()
        page.get_by_label("Node public key to pin").fill(other)
        page.get_by_role("button", name="Pin this key").click()
        expect(warning).to_be_visible()
        expect(warning).to_contain_text("another key than the one you pinned")
        expect(warning).to_contain_text(health["key_id"])
        expect(page.locator("#pin-state")).to_have_text("✕ not the key you pinned")
        verdict = page.locator("#verdict")
        expect(verdict).to_contain_text("Signature INVALID")
        expect(verdict).to_contain_text(f"not the pinned key {key_id_for(other)}")
        expect(verdict).to_have_class(re.compile(r"\bbad\b"))
        expect(page.locator("#seal-status")).to_contain_text("inclusion proof fails")
        page.reload()  # the pin is kept in this browser
        expect(warning).to_be_visible()
        expect(verdict).to_contain_text("Signature INVALID")
        shoot(page, "demo-key-warning")
        page.goto(root(node) + f"#/block/{height}")
        expect(page.locator("#block-verdict")).to_contain_text("Block INVALID")
        expect(warning).to_be_visible()

        # Re-pinning is deliberate, and turns everything green again.
        page.get_by_role("button", name="Trust the node's new key").click()
        expect(warning).to_be_hidden()
        expect(page.locator("#block-verdict")).to_contain_text("Block signature valid")
        assert page.evaluate(f"localStorage.getItem('{PIN_STORE}')") == health["public_key"]
        watch.assert_clean()
    finally:
        page.context.close()


def test_address_history_pages_with_cursors(node: NodeProcess) -> None:
    rid = sealed_receipt(node)["receipt_id"]
    client = node.request("GET", f"/v1/receipts/{rid}").json()["client_address"]
    whole = node.request("GET", f"/explorer/addresses/{client}?limit=100").json()
    assert whole["next_cursor"] is None and len(whole["transactions"]) >= 2
    paged, cursor = [], ""
    while True:
        r = node.request("GET", f"/explorer/addresses/{client}?limit=1{cursor}")
        assert r.status_code == 200, r.text
        paged += r.json()["transactions"]
        if not r.json()["next_cursor"]:
            break
        cursor = "&cursor=" + r.json()["next_cursor"]
    assert [t["tx_id"] for t in paged] == [t["tx_id"] for t in whole["transactions"]]
    bad = node.request("GET", f"/explorer/addresses/{client}?cursor=nonsense")
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_CURSOR"


def page_through(page: Page, card: str, link: str) -> list[str]:
    """Click "Older" in a list until there is none; the links seen, newest first."""
    seen: list[str] = []
    older = page.locator(f"{card} button", has_text="Older")
    while True:
        links = page.locator(f"{card} a[href^='{link}']")
        expect(links.first).to_be_visible()
        page_links = [h for h in links.evaluate_all("as => as.map(a => a.getAttribute('href'))")]
        assert not set(page_links) & set(seen), "a page repeated rows"
        seen += list(dict.fromkeys(page_links))
        if not older.count():
            return seen
        first = page_links[0]
        older.click()
        expect(page.locator(f"{card} a[href^='{link}']").first).not_to_have_attribute("href", first)


def test_paging_reaches_the_oldest_block(start_node: Any, browser: Browser) -> None:
    # One item per block: every receipt and payment gets a block of its own.
    proc = start_node("--block-max-items", "1", "--block-interval", "0.2")
    for _ in range(4):
        job = proc.submit("Say hi", params={"max_tokens": 2})
        proc.wait_for(job["job_id"], ("completed",), timeout=GENERATION_WAIT)
    deadline = time.monotonic() + GENERATION_WAIT
    while proc.request("GET", "/explorer/stats").json()["unsealed_receipts"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)  # the last payment's block
    page, watch = open_page(browser)
    try:
        page.context.add_init_script("localStorage.setItem('aitbc-explorer.rows', '3')")
        page.goto(root(proc))
        wait_live(page)
        height = proc.request("GET", "/explorer/stats").json()["height"]
        assert height >= 9
        blocks = page_through(page, "#blocks", "#/block/")
        assert blocks[-1] == "#/block/0" and len(blocks) >= height + 1
        assert blocks == [f"#/block/{h}" for h in range(len(blocks) - 1, -1, -1)]
        expect(page.locator("#blocks .lpager")).to_contain_text("older blocks")
        page.locator("#blocks button", has_text="Newest").click()
        expect(page.locator("#blocks button", has_text="Newer")).to_have_count(0)
        expect(page.locator("#blocks a[href^='#/block/']").first).to_have_attribute(
            "href", blocks[0]
        )

        receipts = page_through(page, "#receipts", "#/receipt/")
        api = proc.request("GET", "/explorer/receipts?limit=100").json()["receipts"]
        assert receipts == [f"#/receipt/{e['receipt']['receipt_id']}" for e in api]

        client = api[0]["receipt"]["client_address"]
        txs = proc.request("GET", f"/explorer/addresses/{client}?limit=100").json()
        page.goto(root(proc) + f"#/address/{client}")
        expect(page.locator("#detail")).to_contain_text("page 1")
        older = page.locator("#detail button", has_text="Older")
        for n in range(2, (len(txs["transactions"]) + 2) // 3 + 1):
            older.click()
            expect(page.locator("#detail")).to_contain_text(f"page {n}")
        expect(page.locator("#detail")).to_contain_text("the oldest")
        expect(older).to_have_count(0)
        grant = txs["transactions"][-1]
        assert grant["kind"] == "grant"
        expect(page.locator("#detail tbody")).to_contain_text("grant")
        watch.assert_clean()
    finally:
        page.context.close()


@pytest.mark.parametrize("name, viewport", [("desktop", DESKTOP), ("phone", PHONE)])
def test_overview_layout(node: NodeProcess, browser: Browser, name: str, viewport: Any) -> None:
    page, watch = open_page(browser, viewport)
    try:
        page.goto(root(node))
        wait_live(page)
        expect(page.locator("h1")).to_have_text("Node overview")
        no_horizontal_overflow(page)
        try_box = page.locator("#try").bounding_box()
        run = page.get_by_role("button", name="Run job").bounding_box()
        assert try_box and run
        if name == "phone":
            shoot(page, "demo-phone")
            # Try-it within the first two screens, before the lists; the key card compact.
            assert run["y"] + run["height"] <= 2 * PHONE["height"], try_box
            blocks = page.locator("#blocks").bounding_box()
            assert blocks and try_box["y"] < blocks["y"]
            nodebar = page.locator(".nodebar").bounding_box()
            assert nodebar and nodebar["height"] <= 100, nodebar
            expect(page.locator("#node-key-id")).to_be_visible()
            expect(page.locator("#pin-state")).to_be_visible()
        watch.assert_clean()
    finally:
        page.context.close()
