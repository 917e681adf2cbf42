"""Screenshots of dashboard pages in headless Chromium (Debian's ``chromium`` package, driven by playwright, which
never downloads a browser): the paper's dashboard figure and the pictures notebook 04 shows inline."""

from __future__ import annotations

import asyncio
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trsae.io import atomic_path


def chromium() -> str | None:
    """The browser binary: ``$TRSAE_CHROMIUM`` if set, else Debian's chromium; None when absent."""
    cands = [os.environ["TRSAE_CHROMIUM"]] if os.environ.get("TRSAE_CHROMIUM") else \
        [shutil.which("chromium"), "/usr/bin/chromium"]
    return next((p for p in cands if p and Path(p).is_file()), None)


def screenshot(pages: list[tuple[Path, str, Path]], width: int = 1280, height: int = 900,
               browser=None) -> list[Path]:
    """Render each ``(page, fragment, png)``: open ``page`` (a dashboard file) at ``#fragment`` and, once it is
    drawn (``body[data-ready]``), write the full page to ``png`` (atomically). One browser for all pages: a
    playwright ``Browser`` if given, else a headless `chromium` started here."""
    if browser is not None:
        return _render(browser, pages, width, height)
    try:  # playwright's sync API refuses a thread with a running event loop (a Jupyter kernel): use another
        asyncio.get_running_loop()
    except RuntimeError:
        return _standalone(pages, width, height)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_standalone, pages, width, height).result()


def _standalone(pages: list[tuple[Path, str, Path]], width: int, height: int) -> list[Path]:
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
            return _render(browser, pages, width, height)
        finally:
            browser.close()


def _render(browser, pages: list[tuple[Path, str, Path]], width: int, height: int) -> list[Path]:
    out = []
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        for path, fragment, png in pages:
            page.goto(Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else ""))
            page.reload()  # a new fragment on the same page: draw it afresh
            page.wait_for_selector("body[data-ready]", timeout=30_000)
            with atomic_path(png) as tmp:
                page.screenshot(path=str(tmp), full_page=True, type="png")
            out.append(Path(png))
    finally:
        page.close()
    return out
