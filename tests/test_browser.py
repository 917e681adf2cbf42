"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` package, driven by playwright, which
never downloads a browser here) opens the index and feature pages of a small dashboard from disk, checks that
the table renders, sorts and filters, that hovering a token shows its value, that no page logs an error, and
saves screenshots (under the test's tmp folder, and in $TRSAE_SCREENSHOT_DIR when set).

Outside CI the test skips when chromium or playwright is missing; in CI (CI=true) it fails instead, since
.ci/run installs chromium and the dev extra installs playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trsae.dashboard import build
from trsae.dashboard.shots import PAPER_MIN_FONT_PX, PAPER_PANELS
from trsae.paper import figure_font_problems
from trsae.dashboard.shots import PAPER_WIDTH as PAPER_VIEWPORT
from trsae.dashboard.shots import chromium
from trsae.saes import SAE, SAEConfig

CHROMIUM = chromium()
"""The browser binary (`trsae.dashboard.shots.chromium`): $TRSAE_CHROMIUM if set, else Debian's chromium."""


def _missing(what: str) -> None:
    msg = f"{what}; install it with `apt-get install chromium` and `pip install -e '.[dev]'`"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        _missing("no chromium binary ($TRSAE_CHROMIUM, or Debian's chromium on the PATH or at /usr/bin/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tiny_store, tiny_model, tmp_path_factory):
    saes = []
    for seed, encoder, kw in ((1, "token", {}), (2, "trsae", dict(window=4, d_k=8, d_v=16, d_ctx=16))):
        sae = SAE(SAEConfig.build(64, 160, "topk", encoder, k=8, seed=seed, **kw)).eval()
        if encoder == "trsae":
            with torch.no_grad():
                sae.encoder.P.normal_(0, 0.5)
                sae.encoder.U.normal_(0, 0.5)
        saes.append(sae)
    return build(tiny_store, saes, tmp_path_factory.mktemp("site"), model=tiny_model, split="train",
                 labels=[{"1": ["NOUN", 0.8]}, None])


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    out = os.environ.get("TRSAE_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=True)


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def open(self, path: Path, hash_: str = "") -> None:
        self.page.goto(path.as_uri() + hash_)
        self.page.wait_for_selector("body[data-ready]", timeout=15_000)


def test_index_renders_sorts_and_filters(browser, site, tmp_path):
    p = Page(browser)
    p.open(site.page("trsae-topk"))
    page = p.page
    rows = page.locator("#features tbody tr")
    assert rows.count() == 100  # the first of two pages (160 features, some may be inactive)
    assert "features" in page.locator("#count").inner_text()
    page.click("th[data-col=density]")  # descending density
    dens = [float(x) for x in page.locator("#features tbody tr td:nth-child(2)").all_inner_texts()[:20]]
    assert dens == sorted(dens, reverse=True) and dens[0] > 0
    page.fill("#q", "#7")
    assert rows.count() == 1 and rows.first.locator("td").first.inner_text() == "#7"
    page.fill("#q", "")
    page.click("#pnext")
    assert "page 2" in page.locator("#pager").inner_text()
    _shot(page, tmp_path, "index.png")
    assert p.errors == []
    page.close()


def test_feature_page_shows_values_on_hover(browser, site, tmp_path):
    p = Page(browser)
    index = site.page("trsae-topk")
    p.open(index)
    p.page.click("th[data-col=density]")
    f = int(p.page.locator("#features tbody tr td").first.inner_text().lstrip("#"))  # the densest feature
    p.open(site.page("trsae-topk", f), f"#{f}")
    page = p.page
    assert page.locator("h1").first.inner_text().startswith(f"Feature #{f}")
    here = page.locator(".ctx .toks:not(.attn) .tok.here").first
    value = here.get_attribute("title")
    assert float(value) > 0
    here.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible", timeout=5_000)
    assert value in tip.inner_text()
    assert page.locator(".toks.attn").count() > 0 and page.locator("svg.terms").count() > 0
    assert page.locator("svg.plot").count() >= 3  # histogram, position (mean, rate)
    _shot(page, tmp_path, "feature_trsae.png")
    page.click("#next")  # hash navigation loads the next feature
    page.wait_for_selector(f"h1:has-text('Feature #{f + 1}')", timeout=5_000)
    assert p.errors == []
    page.close()


def test_side_by_side(browser, site, tmp_path):
    p = Page(browser)
    p.open(site.out / "compare.html", "#topk=1&trsae-topk=2")
    page = p.page
    page.wait_for_selector("#side1 h1", timeout=5_000)
    assert page.locator("#side0 h1").inner_text().startswith("Feature #1")
    assert page.locator("#side1 h1").inner_text().startswith("Feature #2")
    assert "NOUN" in page.locator("#side0").inner_text()
    _shot(page, tmp_path, "compare.png")
    assert p.errors == []
    page.close()


def test_screenshots_of_the_showcased_features(browser, site, tmp_path):
    # what notebook 04 and the paper do: pick two temporal features, then render their pages to PNG
    import numpy as np

    from trsae.dashboard import screenshot, showcase

    fs = site.features["trsae-topk"]
    picks = showcase(site, "trsae-topk", min_density=0.0)
    assert picks["context"] == int(np.argmax(fs["context"]))
    assert picks["positional"] != picks["context"]
    assert fs["positional"][picks["positional"]] == max(v for f, v in enumerate(fs["positional"])
                                                        if f != picks["context"])
    with pytest.raises(ValueError, match="not a temporal SAE"):
        showcase(site, "topk")
    pngs = screenshot([(site.page("trsae-topk", f), str(f), tmp_path / f"f{f}.png") for f in picks.values()],
                      browser=browser)
    for png in pngs:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1280
    assert pngs[0].read_bytes() != pngs[1].read_bytes()  # two different features were drawn
    # the paper's figure: only the panels its caption names, from a narrower page, so that its text prints readably
    crop = screenshot([(site.page("trsae-topk", picks["context"]), str(picks["context"]), tmp_path / "crop.png")],
                      width=PAPER_VIEWPORT, browser=browser, elements=PAPER_PANELS,
                      min_font_px=PAPER_MIN_FONT_PX)[0]
    head = crop.read_bytes()[:24]
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    full_h = int.from_bytes(pngs[0].read_bytes()[20:24], "big")
    assert w <= PAPER_VIEWPORT and h < full_h  # the two panels, not the page
    # it records its smallest text (CSS px at 96 to the inch, as points) and a dpi that gives the page's size
    from PIL import Image

    from trsae.report.figures import FONT_KEY
    with Image.open(crop) as im:
        font_pt, dpi = float(im.info[FONT_KEY]), im.info["dpi"]
    assert dpi == pytest.approx((96, 96), abs=0.1) and font_pt == pytest.approx(PAPER_MIN_FONT_PX * 0.75)
    # placed at the text width (as the paper does), its smallest text prints above the floor
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "paper.tex").write_text(f"\\includegraphics[width=\\linewidth]{{{crop}}}\n")
    assert not figure_font_problems(tmp_path / "paper" / "paper.tex")
    with pytest.raises(ValueError, match="no element"):
        screenshot([(site.page("topk", 0), "0", tmp_path / "none.png")], browser=browser, elements=PAPER_PANELS)


def test_screenshot_works_inside_a_running_event_loop(tmp_path):
    # a Jupyter kernel runs an asyncio loop, where playwright's sync API refuses to start (notebook 04)
    import asyncio

    from trsae.dashboard import screenshot

    if CHROMIUM is None:
        _missing("no chromium binary")
    page = tmp_path / "p.html"
    page.write_text("<html><body data-ready='1'><p>drawn</p></body></html>")

    async def inside_a_loop():
        return screenshot([(page, "", tmp_path / "p.png")])

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: this module's browser fixture holds this one's loop
        assert pool.submit(asyncio.run, inside_a_loop()).result() == [tmp_path / "p.png"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
