"""Dashboard of F = 5120 features: build time, size on disk per SAE, and the load time of its pages in headless
Chromium (navigation start to the table, or the feature, rendered: the ``data-ready`` mark the page's script
sets), median of fresh page loads.

Untrained SAEs (a TopK and a TRSAE with non-zero position and context terms) on a tiny-gpt2 store harvested
for the purpose: every feature fires, so each feature page carries its full share of contexts, which bounds
the size of a trained SAE's site from above.

    python benchmarks/bench_dashboard.py --width 5120 --tokens 32768 --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trsae.config import HarvestConfig
from trsae.dashboard import build
from trsae.lm import load_model
from trsae.saes import SAE, SAEConfig
from trsae.store import ActivationStore, harvest


def random_saes(d_in: int, width: int, k: int) -> list[SAE]:
    topk = SAE(SAEConfig.build(d_in, width, "topk", k=k, seed=1)).eval()
    trsae = SAE(SAEConfig.build(d_in, width, "topk", "trsae", k=k, seed=2, window=16)).eval()
    with torch.no_grad():
        trsae.encoder.P.normal_(0, 0.3)
        trsae.encoder.U.normal_(0, 0.3)
    return [topk, trsae]


def load_times(pages: list[tuple[str, str]], repeats: int, chromium: str) -> dict[str, list[float]]:
    """{label: [ms from navigation start to data-ready, per fresh page]}."""
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {label: [] for label, _ in pages}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(repeats):
            for label, url in pages:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.wait_for_selector("body[data-ready]", timeout=30_000)
                out[label].append(float(page.get_attribute("body", "data-ready")))
                if errors:
                    raise RuntimeError(f"{url}: {errors}")
                page.close()
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=5120)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens harvested (all encoded, train split)")
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--store", default=None, help="an existing store instead (its model must load)")
    ap.add_argument("--out", default=None, help="site folder (default: a temporary one, removed after)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dashboard_"))
    try:
        if a.store:
            store = ActivationStore(a.store)
            model = load_model(store.manifest["model"])
        else:
            model = load_model("tiny-gpt2", seed=0)
            cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=a.tokens, ctx_len=a.ctx_len,
                                seqs_per_shard=64, batch_size=16, val_frac=0.05, test_frac=0.05)
            t0 = time.perf_counter()
            store = harvest(cfg, tmp / "store", model=model, progress=False)
            print(f"harvested {a.tokens} tokens of tiny-gpt2 in {time.perf_counter() - t0:.1f} s")
        out = Path(a.out) if a.out else tmp / "site"
        site = build(store, random_saes(store.d_model, a.width, a.k), out, model=model, split="train",
                     max_tokens=a.tokens)
        print(f"built {len(site.names)} × F={a.width} in {site.seconds:.1f} s ({store.n_tokens('train')} "
              f"train tokens available)")
        for name in site.names:
            n_files = sum(1 for _ in (out / name / "data" / "f").iterdir())
            index_kb = (out / name / "data" / "index.js").stat().st_size / 1e3
            print(f"  {name:12s} {site.bytes[name] / 1e6:6.1f} MB on disk, {n_files} feature files, "
                  f"index data {index_kb:.0f} kB")
        pages = [(f"{n} index", site.page(n).as_uri()) for n in site.names]
        pages += [(f"{n} feature", site.page(n, 0).as_uri() + "#0") for n in site.names]
        times = load_times(pages, a.repeats, a.chromium)
        for label, ms in times.items():
            print(f"  load {label:22s} median {statistics.median(ms):6.0f} ms  (min {min(ms):.0f}, max "
                  f"{max(ms):.0f}, {len(ms)} fresh pages)")
    finally:
        if not a.out:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
