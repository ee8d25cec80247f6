"""The explorer's page in a real browser: Debian's chromium driven by Playwright with the
system browser (no browser download; `.ci/install-browser.sh` installs both). Opened from
file:// with every network request refused and recorded.

Where the browser cannot start, these tests skip on a developer's machine and FAIL in CI
(CI=true), so a CI run cannot pass without them. Run them without a network namespace's
outside access, as the project's browser runs are:
    unshare -n bash -c 'ip link set lo up && pytest tests/test_explain_browser.py'
"""

import os
from pathlib import Path

import numpy as np
import pytest

from .explain_fixtures import build_explain_setup, explain, partial_export, reference_gains

CHROMIUM = os.environ.get("KNNLM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEIGHBORS, CONTEXT, PAGE = 8, 10, 300


def _unavailable(why):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the browser tests must run in CI: {why} (run .ci/install-browser.sh)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    pw = sync_playwright().start()
    profile = str(tmp_path_factory.mktemp("chromium-profile"))  # pytest's own tmp: not left in /tmp
    try:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS, headless=True,
                                                    viewport={"width": 1400, "height": 900})
    except Exception as e:  # noqa: BLE001 - whatever stops the browser, say it
        pw.stop()
        _unavailable(f"chromium did not start: {str(e)[:500]}")
    yield ctx
    ctx.close()
    pw.stop()


@pytest.fixture(scope="module")
def page_file(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_browser")
    ex = build_explain_setup(tiny, root, without_ids=False)
    out = root / "explorer.html"
    explain(ex["export"], "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out, "--neighbors", NEIGHBORS,
            "--context", CONTEXT, "--page-tokens", PAGE)
    return ex, out


def test_tokens_not_searched_are_hatched(browser, page_file, tmp_path):
    ex, _ = page_file
    searched = partial_export(ex["export"], tmp_path / "partial")
    out = tmp_path / "partial.html"
    explain(tmp_path / "partial", "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out, "--page-tokens", PAGE)
    page, errors, requests = _open(browser, out)
    hatched = page.evaluate("() => [...document.querySelectorAll('#text .tok.nosearch')].map(s => +s.dataset.i)")
    assert hatched == np.flatnonzero(~searched[:PAGE]).tolist()
    page.locator(f'#text .tok[data-i="{hatched[0]}"]').click()
    assert page.locator('#kv tr[data-k="search"] td').nth(1).inner_text() == "not searched: p_LM alone"
    assert float(page.locator('#kv tr[data-k="gain (nats)"] td').nth(1).inner_text()) == 0.0
    assert errors == [] and requests == []
    page.close()


def _open(browser, path):
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if not r.request.url.startswith("file://"):
            requests.append(r.request.url)
            return r.abort()
        return r.continue_()

    page.route("**/*", route)
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_selector("#text .tok")
    return page, errors, requests


def test_page_shades_every_token_and_shows_the_largest_gain_neighbors(browser, page_file, tmp_path):
    from fairseq.data import Dictionary

    from knnlm.offline.export import load_export
    from knnlm.store.datastore import Datastore

    ex, path = page_file
    e = load_export(ex["export"])
    ds = Datastore.open(ex["ds"], load_keys=False)
    symbols = Dictionary.load(ex["dict"]).symbols
    page, errors, requests = _open(browser, path)

    # every token, page by page, is one shaded span
    shaded, pages = 0, 0
    while True:
        spans = page.locator("#text .tok")
        shaded += spans.count()
        assert page.evaluate("() => [...document.querySelectorAll('#text .tok')]"
                             ".every(s => s.style.backgroundColor !== '')")
        pages += 1
        if page.locator("#next").is_disabled():
            break
        page.locator("#next").click()
    assert shaded == e.count and pages == -(-e.count // PAGE) > 1

    # the token with the largest gain (numpy from the export) heads the gains table: select it
    gain = reference_gains(ex["export"])
    best = int(np.argmax(gain))
    page.locator("table.best tr.jump").first.click()
    title = page.locator("#ptitle")
    assert int(title.get_attribute("data-i")) == best
    assert page.locator(f'#text .tok.sel[data-i="{best}"]').count() == 1
    kv = {r.locator("td").nth(0).inner_text(): r.locator("td").nth(1).inner_text()
          for r in page.locator("#kv tr").all()}
    assert float(kv["p_LM"]) == pytest.approx(np.exp(e.lp_lm[best]), rel=1e-3, abs=1e-4)
    assert float(kv["gain (nats)"]) == pytest.approx(gain[best], abs=2e-3)
    assert float(kv["λ"]) == e.meta["lmbda"]

    # its neighbors: rows, values, distances from the export; the text before each from the
    # datastore's values, decoded with fairseq's own dictionary
    rows = page.locator("#nbs tr.nb").all()
    ids = [int(i) for i in e.ids[best, :NEIGHBORS] if i >= 0]
    assert len(rows) == len(ids) > 0
    vals = np.asarray(ds.vals)
    show = lambda t: "\u21b5" if symbols[t] == "</s>" else symbols[t]  # noqa: E731
    for r, i, dist in zip(rows, ids, e.dists[best, :NEIGHBORS]):
        assert int(r.get_attribute("data-id")) == i
        assert int(r.get_attribute("data-value")) == vals[i]
        ctx = vals[max(0, i - CONTEXT):i]
        assert r.get_attribute("data-ctx") == " ".join(str(t) for t in ctx)
        assert r.locator(".nb-ctx").inner_text() == " ".join(show(t) for t in ctx)
        assert r.locator(".nb-next").inner_text().replace(" \u2713", "").strip() == show(vals[i])
        assert float(r.locator(".nb-dist").inner_text()) == pytest.approx(float(dist), rel=1e-4)
        assert ("hit" in r.get_attribute("class")) == (vals[i] == e.targets[best])
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == [] and requests == []
    page.close()


def test_go_to_token_and_plots_are_inline(browser, page_file):
    ex, path = page_file
    page, errors, requests = _open(browser, path)
    last = page.evaluate("() => window.explorer.count") - 1
    page.locator("#goto").fill(str(last))
    page.locator("#goto").dispatch_event("change")
    assert int(page.locator("#ptitle").get_attribute("data-i")) == last
    assert page.locator(f'#text .tok[data-i="{last}"]').count() == 1
    srcs = page.evaluate("() => [...document.images].map(i => [i.src.slice(0, 22), i.naturalWidth])")
    assert len(srcs) >= 4 and all(s == "data:image/png;base64," and w > 0 for s, w in srcs)
    assert errors == [] and requests == []
    page.close()
