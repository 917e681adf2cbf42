"""Screenshots of dashboard pages in headless Chromium (Debian's ``chromium`` package, driven by playwright, which
never downloads a browser): the paper's dashboard figure and the pictures notebook 04 shows inline."""

from __future__ import annotations

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from trsae.io import atomic_path


def chromium() -> str | None:
    """The browser binary: ``$TRSAE_CHROMIUM`` if set, else Debian's chromium; None when absent."""
    cands = [os.environ["TRSAE_CHROMIUM"]] if os.environ.get("TRSAE_CHROMIUM") else \
        [shutil.which("chromium"), "/usr/bin/chromium"]
    return next((p for p in cands if p and Path(p).is_file()), None)


PAPER_PANELS = ("section.temporal", "section.contexts")
"""The panels of a feature page that the paper's dashboard figure shows: the token / position / context split of
the pre-activation and the top contexts with their attention strips."""
PAPER_WIDTH = 900
"""Page width (CSS pixels) of a screenshot the paper places at its 6.5 in text width (below 900 px the contexts' term
bars overlap their text)."""
PAPER_MIN_FONT_PX = 12
"""The smallest text (CSS pixels) of the paper's screenshot: placed at the text width, a `PAPER_WIDTH` page prints
at about 0.72 of its size, so 12 px (9 pt) prints at about 6.5 pt; the pages' own smallest text (10 px) would print
below the 6 pt floor (`trsae.paper.figure_font_problems`)."""


def screenshot(pages: list[tuple[Path, str, Path]], width: int = 1280, height: int = 900,
               browser=None, elements: Sequence[str] = (), min_font_px: float | None = None) -> list[Path]:
    """Render each ``(page, fragment, png)``: open ``page`` (a dashboard file) at ``#fragment`` and, once it is
    drawn (``body[data-ready]``), write the full page to ``png`` (atomically), or only the box around the first
    element matching each CSS selector of ``elements`` (e.g. the panels a figure's caption names); ``min_font_px``
    raises every smaller text to that size first (a figure for print, `PAPER_MIN_FONT_PX`). Each PNG records its
    smallest text and the page's size (`_record_font`). One browser for all pages: a playwright ``Browser`` if
    given, else a headless `chromium` started here."""
    args = (pages, width, height, elements, min_font_px)
    if browser is not None:
        return _render(browser, *args)
    try:  # playwright's sync API refuses a thread with a running event loop (a Jupyter kernel): use another
        asyncio.get_running_loop()
    except RuntimeError:
        return _standalone(*args)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_standalone, *args).result()


def _standalone(pages: list[tuple[Path, str, Path]], width: int, height: int, elements: Sequence[str],
                min_font_px: float | None) -> list[Path]:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium to render dashboard pages: install it (Debian: apt-get install chromium; "
                           "./run_all.sh does this as root) or set TRSAE_CHROMIUM to a Chromium binary")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError("the playwright package is missing: pip install -e '.[dev]'") from None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            return _render(browser, pages, width, height, elements, min_font_px)
        finally:
            browser.close()


def _around(page, selectors: Sequence[str]) -> dict | None:
    """The page box (playwright ``clip``) around the first element of each selector; None for no selectors."""
    boxes = []
    for sel in selectors:
        box = page.locator(sel).first.bounding_box() if page.locator(sel).count() else None
        if box is None:
            raise ValueError(f"no element {sel!r} drawn on {page.url}")
        boxes.append(box)
    if not boxes:
        return None
    x0, y0 = min(b["x"] for b in boxes), min(b["y"] for b in boxes)
    x1, y1 = max(b["x"] + b["width"] for b in boxes), max(b["y"] + b["height"] for b in boxes)
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


CSS_PX_PER_IN = 96
"""CSS pixels per inch: a screenshot is saved at this dpi, so that LaTeX reads its size as the page's."""
_MIN_FONT_JS = """(selectors) => {
  const roots = selectors.length ? selectors.map(s => document.querySelector(s)).filter(Boolean) : [document.body];
  let least = Infinity;
  for (const root of roots) {
    for (const el of [root, ...root.querySelectorAll('*')]) {
      const own = [...el.childNodes].some(n => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
      const box = el.getBoundingClientRect();
      if (own && box.width > 0 && box.height > 0 && getComputedStyle(el).visibility !== 'hidden') {
        least = Math.min(least, parseFloat(getComputedStyle(el).fontSize));
      }
    }
  }
  return least;
}"""
"""The smallest computed font size (CSS px) of the visible text inside the given elements (the whole page for
none)."""


_RAISE_FONTS_JS = """(floor) => {
  const small = [...document.querySelectorAll('*')].filter(el => parseFloat(getComputedStyle(el).fontSize) < floor);
  for (const el of small) el.style.fontSize = floor + 'px';  // all read first: a parent's change moves no child
}"""
"""Set every element whose computed font is below the floor (CSS px) to the floor; larger text keeps its size."""


def _record_font(png: Path, min_font_px: float) -> None:
    """Save the screenshot ``png`` again at `CSS_PX_PER_IN` dpi with its smallest font in points as drawn
    (`trsae.report.figures.FONT_KEY`), for the paper's print-size check (`trsae.paper.figure_fonts`)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from trsae.report.figures import FONT_KEY

    info = PngInfo()
    info.add_text(FONT_KEY, f"{min_font_px * 72 / CSS_PX_PER_IN:.2f}")
    with Image.open(png) as im:
        im.load()
        im.save(png, format="PNG", pnginfo=info, dpi=(CSS_PX_PER_IN, CSS_PX_PER_IN))


def _render(browser, pages: list[tuple[Path, str, Path]], width: int, height: int,
            elements: Sequence[str] = (), min_font_px: float | None = None) -> list[Path]:
    out = []
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        for path, fragment, png in pages:
            page.goto(Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else ""))
            page.reload()  # a new fragment on the same page: draw it afresh
            page.wait_for_selector("body[data-ready]", timeout=30_000)
            if min_font_px:
                page.evaluate(_RAISE_FONTS_JS, float(min_font_px))
            with atomic_path(png) as tmp:
                page.screenshot(path=str(tmp), full_page=True, type="png", clip=_around(page, elements))
                _record_font(tmp, page.evaluate(_MIN_FONT_JS, list(elements)))
            out.append(Path(png))
    finally:
        page.close()
    return out
