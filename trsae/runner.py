"""The experiment runner the notebooks call: stores, trained SAEs and evaluations (comparisons, frontiers, the
training-length budgets, ceilings), each cached and reused when everything it depends on is unchanged and
recomputed otherwise. A cache key is a hash of the configuration *and* of the code
(`code_version`: every ``trsae/**/*.py``), so changed code never reuses results that the current code would
not produce.

    work/stores/<model>-L<layer>-<hash>/     activation store
    work/runs/<label>-<hash>/                run folder (checkpoint, log, sae/); label e.g. topk, trsae-topk
    work/runs/<label>-<hash>/eval-<split>-<hash>.json
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

from trsae import timing
from trsae.analysis import TRAIN_FVU, amortisation, summarize, variance_concentration, versus
from trsae.config import HarvestConfig, TrainConfig, config_hash, figures_path, train_identity
from trsae.device import resolve
from trsae.evaluate import evaluate_saes, split_fvu, train_mean
from trsae.io import write_json_atomic
from trsae.lm import LoadedModel, load_model
from trsae.pursuit import ceiling
from trsae.saes import SAE, SAEConfig
from trsae.store import ActivationStore, harvest_sites, store_identity
from trsae.train import read_log, train_sae

PACKAGE = Path(__file__).resolve().parent
"""The ``trsae/`` folder whose source `code_version` hashes."""


def source_hash(root: str | os.PathLike) -> str:
    """sha256 (16 hex digits) over the relative path and the content of every ``*.py`` below ``root``, sorted."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """`source_hash` of the ``trsae/`` package this process imported, computed once per process; part of every
    cache key."""
    return source_hash(PACKAGE)


_started = time.perf_counter()


def environment() -> dict:
    """Versions and device, for the first cell of every notebook (which also starts its clock, see `write_times`)."""
    import nnsight
    import transformers

    global _started
    _started = time.perf_counter()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": nnsight.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "data_dir": os.environ.get("TRSAE_DATA_DIR")}


def write_times(figures: str | os.PathLike, notebook: str) -> Path:
    """The last cell of every notebook: this kernel's seconds per phase (`trsae.timing`), and the rest of its wall
    time since `environment` as ``other``, into ``figures/profile_times.csv`` (the rows of other notebooks stay)."""
    path = Path(figures) / "profile_times.csv"
    timing.write(path, notebook, wall_s=time.perf_counter() - _started)
    return path


def store_dir(cfg: HarvestConfig, work: str | os.PathLike) -> Path:
    """Where the store of ``cfg`` is cached under the current code (named by the model's last path component, a hub
    id's or a folder's; the key tells apart what the name does not)."""
    key = config_hash({"store": store_identity(cfg), "code": code_version()})
    name = re.sub(r"[^\w.-]+", "-", Path(cfg.model).name)
    return Path(work) / "stores" / f"{name}-L{cfg.layer}-{cfg.site}-{key}"


def ensure_store(cfg: HarvestConfig, work: str | os.PathLike, model: LoadedModel | None = None,
                 progress: bool = True) -> ActivationStore:
    """The store of ``cfg``: harvested into `store_dir`, or reopened (resumed) there."""
    return ensure_stores([cfg], work, model, progress)[0]


def ensure_stores(cfgs: list[HarvestConfig], work: str | os.PathLike, model: LoadedModel | None = None,
                  progress: bool = True) -> list[ActivationStore]:
    """The stores of ``cfgs`` (layers and sites of one model over the same text), those not yet in `store_dir`
    harvested together, one forward pass per batch (`trsae.store.harvest_sites`)."""
    return harvest_sites(cfgs, [store_dir(c, work) for c in cfgs], model=model, progress=progress)


def run_dir(sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
            work: str | os.PathLike) -> Path:
    """The run folder of an SAE config trained with ``train_cfg`` on ``store`` under the current code."""
    key = config_hash({"sae": sae_cfg.to_dict(), "train": train_identity(train_cfg),
                       "store": store.manifest["config_hash"], "code": code_version()})
    return Path(work) / "runs" / f"{sae_cfg.label}-{key}"  # named by content, so equal configs share a run


def ensure_sae(sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
               work: str | os.PathLike, progress: bool = True) -> tuple[SAE, Path]:
    out = run_dir(sae_cfg, train_cfg, store, work)
    return train_sae(sae_cfg, train_cfg, store, out, progress=progress), out


_MODELS: dict[tuple[str, torch.dtype, str], LoadedModel] = {}


def shared_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """The model ``name`` in ``dtype`` (a store's `ActivationStore.dtype`) on ``device``, loaded once per process, so
    that every `Evaluator` of a notebook shares it."""
    if (name, dtype, device) not in _MODELS:
        _MODELS[name, dtype, device] = load_model(name, device=str(resolve(device)), dtype=dtype)
    return _MODELS[name, dtype, device]


RECON_SEQS = 160
"""Test sequences of the store-only metrics (reconstruction, sparsity, persistence): 20k ordinary tokens at the
profiles' 128-token contexts, or the whole split where it is smaller."""


class Evaluator:
    """Evaluates SAEs of one store against one model; results are cached in each run folder. CE / KL on the first
    ``max_seqs`` sequences of the split, the store-only metrics on the first ``max(max_seqs, recon_seqs)``
    (`trsae.evaluate.evaluate_saes`)."""

    def __init__(self, store: ActivationStore, model: LoadedModel | None = None, split: str = "test",
                 max_seqs: int = 64, batch_size: int = 4, with_logits: bool = True, density_tokens: int = 100_000,
                 recon_seqs: int = RECON_SEQS, device: str = "cpu"):
        self.store, self.split, self.max_seqs, self.batch_size = store, split, max_seqs, batch_size
        self.with_logits, self.density_tokens, self.recon_seqs = with_logits, density_tokens, recon_seqs
        self._model, self.device = model, device
        self._mean = None

    @property
    def model(self) -> LoadedModel:
        """The store's model on ``device`` (its LM passes run there; the SAEs and the scores stay on the CPU)."""
        if self._model is None:
            self._model = shared_model(self.store.manifest["model"], self.store.dtype, self.device)
        return self._model

    def path(self, run: Path) -> Path:
        key = config_hash({"split": self.split, "max_seqs": self.max_seqs, "logits": self.with_logits,
                           "batch_size": self.batch_size, "density_tokens": self.density_tokens,
                           "recon_seqs": self.recon_seqs, "code": code_version()})
        return Path(run) / f"eval-{self.split}-{key}.json"

    def __call__(self, runs: dict[Path, SAE]) -> dict[Path, dict]:
        """Results for each run folder; only the uncached ones are evaluated (together, sharing passes)."""
        todo = {str(r): s for r, s in runs.items() if not self.path(r).exists()}
        if todo:
            if self.with_logits and self._mean is None:
                self._mean = train_mean(self.store)
            res = evaluate_saes(todo, self.store, self.model if self.with_logits else None, split=self.split,
                                max_seqs=self.max_seqs, batch_size=self.batch_size, mean_D=self._mean,
                                with_logits=self.with_logits, density_tokens=self.density_tokens,
                                recon_seqs=self.recon_seqs)
            for r, v in res.items():
                write_json_atomic(self.path(Path(r)), v)
        return {r: json.loads(self.path(r).read_text()) for r in runs}


def family_train(train_cfg: TrainConfig, name: str, lrs: dict[str, float] | None, **kw) -> TrainConfig:
    """``train_cfg`` for the SAE family ``name``: its tuned learning rate from ``lrs`` (`trsae.tuning`), else
    ``train_cfg.lr``; ``kw`` changes other fields."""
    return dataclasses.replace(train_cfg, lr=(lrs or {}).get(name, train_cfg.lr), **kw)


def train_and_evaluate(specs: dict[str, SAEConfig], seeds: list[int], train_cfg: TrainConfig,
                       store: ActivationStore, evaluate: Evaluator, work: str | os.PathLike,
                       progress: bool = True, lrs: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """Train every named SAE config with every seed (cached; each family at its learning rate in ``lrs``, see
    `family_train`), then evaluate them; per-seed results by name.

    Each result also carries ``training``: steps, tokens, the last logged training loss terms and tokens/s.
    """
    runs: dict[str, list[tuple[Path, SAE]]] = {}
    for name, sae_cfg in specs.items():
        runs[name] = []
        for seed in seeds:
            sae, run = ensure_sae(sae_cfg, family_train(train_cfg, name, lrs, seed=seed), store, work, progress)
            runs[name].append((run, sae))
    results = evaluate({run: sae for rs in runs.values() for run, sae in rs})
    out: dict[str, list[dict]] = {}
    for name, rs in runs.items():
        out[name] = []
        for run, _ in rs:
            res = dict(results[run])
            log = read_log(run)
            res["training"] = {k: log[-1][k] for k in ("step", "tokens", "loss", "fvu", "l0", "dead_frac",
                                                       "tok_per_s") if k in log[-1]}
            res["run"] = str(run)
            out[name].append(res)
    return out


def compare(specs: dict[str, SAEConfig], seeds: list[int], train_cfg: TrainConfig, store: ActivationStore,
            work: str | os.PathLike, eval_seqs: int, model: LoadedModel | None = None, progress: bool = True,
            density_tokens: int = 100_000, lrs: dict[str, float] | None = None
            ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """`train_and_evaluate` with CE / KL on the first ``eval_seqs`` test sequences, the store-only metrics on the
    first `RECON_SEQS` (dead / dense latents over ``density_tokens`` training tokens), and the means ± standard errors over seeds (`trsae.analysis.summarize`):
    ``(per_seed, summary)``."""
    evaluate = Evaluator(store, model, max_seqs=eval_seqs, density_tokens=density_tokens, device=train_cfg.device)
    per_seed = train_and_evaluate(specs, seeds, train_cfg, store, evaluate, work, progress, lrs)
    return per_seed, summarize(per_seed)


def frontier(specs: dict[str, list[SAEConfig]], train_cfg: TrainConfig, store: ActivationStore,
             evaluate: Evaluator, work: str | os.PathLike, metric: tuple[str, str],
             progress: bool = True, lrs: dict[str, float] | None = None) -> dict[str, list[tuple[float, float, float]]]:
    """``{name: [(l0, metric mean, metric se), ...]}`` over sparsity settings (one seed), for a frontier plot.
    Every setting is trained first and then all are evaluated in one pass, so they share its reference passes."""
    flat = {(name, i): c for name, cfgs in specs.items() for i, c in enumerate(cfgs)}
    point_lrs = {f"{name}-{i}": lrs[name] for name, i in flat if name in (lrs or {})}  # a family's rate for all
    per = train_and_evaluate({f"{name}-{i}": c for (name, i), c in flat.items()}, [train_cfg.seed], train_cfg,
                             store, evaluate, work, progress, point_lrs)
    out = {}
    for name in specs:
        out[name] = sorted((rs[0]["sparsity"]["l0"], rs[0][metric[0]][metric[1]], 0.0)
                           for label, rs in per.items() if label.rsplit("-", 1)[0] == name)
    return out


def train_budgets(specs: dict[str, SAEConfig], budget_seeds: dict[int, list[int]], train_cfg: TrainConfig,
                    store: ActivationStore, evaluate: Evaluator, work: str | os.PathLike,
                    progress: bool = True, lrs: dict[str, float] | None = None) -> dict[int, dict[str, list[dict]]]:
    """Every named config trained for each budget of ``budget_seeds`` (training tokens -> seeds; more tokens than
    the training split holds means several epochs over it), with ``train_cfg``'s schedule stretched to the budget
    (the same warm-up and decay fractions), then all evaluated in one pass: ``{tokens: {name: per-seed results}}``.
    Each result also carries its FVU on the first `RECON_SEQS` training sequences (`trsae.analysis.TRAIN_FVU`,
    cached in its run folder). A budget equal to ``train_cfg.tokens`` reuses the comparison's own runs (cached by
    content)."""
    runs = {tokens: train_all(specs, seeds, dataclasses.replace(train_cfg, tokens=int(tokens)), store, work, progress,
                              lrs)
            for tokens, seeds in sorted(budget_seeds.items())}
    results = evaluate({run: sae for by_name in runs.values() for rs in by_name.values() for run, sae in rs})
    return {tokens: {name: [dict(results[run], run=str(run), **{TRAIN_FVU: train_split_fvu(run, sae, store)})
                            for run, sae in rs] for name, rs in by_name.items()}
            for tokens, by_name in runs.items()}


def train_split_fvu(run: Path, sae: SAE, store: ActivationStore, max_seqs: int = RECON_SEQS) -> float:
    """`trsae.evaluate.split_fvu` of a run's SAE on the first ``max_seqs`` training sequences, cached in its run
    folder."""
    key = config_hash({"split": "train", "max_seqs": max_seqs, "code": code_version()})
    path = Path(run) / f"fvu-train-{key}.json"
    if not path.exists():
        write_json_atomic(path, {"fvu": split_fvu({"sae": sae}, store, "train", max_seqs)["sae"]})
    return json.loads(path.read_text())["fvu"]


def ceilings(runs: dict[str, list[tuple[Path, SAE]]], store: ActivationStore,
             max_seqs: int) -> dict[str, list[dict]]:
    """`trsae.pursuit.ceiling` of every trained SAE (`train_all`'s output) on the first ``max_seqs`` test
    sequences, cached in its run folder: ``{name: [per-seed result, ...]}``."""
    key = config_hash({"split": "test", "max_seqs": max_seqs, "code": code_version()})
    out: dict[str, list[dict]] = {}
    for name, rs in runs.items():
        out[name] = []
        for run, sae in rs:
            path = Path(run) / f"ceiling-test-{key}.json"
            if not path.exists():
                write_json_atomic(path, ceiling(sae, store, max_seqs=max_seqs))
            out[name].append(json.loads(path.read_text()))
    return out


def site_map(cells: list[tuple[int, str]], harvest: dict, specs: Callable[[int], dict[str, SAEConfig]],
             pair: tuple[str, str], seeds: list[int], train_cfg: TrainConfig, work: str | os.PathLike, eval_seqs: int,
             density_tokens: int = 100_000, lrs: dict[str, float] | None = None,
             progress: bool = True) -> dict[tuple[int, str], dict]:
    """A temporal SAE against its per-token twin (``pair``: the names of ``specs(d_model)`` to compare, temporal
    first) at every ``(layer, site)`` of ``cells`` of one model: the stores (``harvest``'s model, text and token
    count at each cell) harvested together, one forward pass per batch; at each cell both SAEs trained with every
    seed and evaluated as `compare` does. Per cell: `trsae.analysis.versus`, with ``ceiling`` (the share of the
    twin's amortisation gap the temporal encoder closes, seed by seed, `trsae.analysis.amortisation` over the first
    ``eval_seqs`` test sequences), ``concentration`` (`trsae.analysis.variance_concentration` of the store-only
    metrics' test tokens) and ``depth``, (layer + 1) / the model's number of layers."""
    stores = ensure_stores([HarvestConfig(**(harvest | {"layer": layer, "site": site})) for layer, site in cells],
                           work, progress=progress)
    out = {}
    for cell, store in zip(cells, stores):
        cell_specs = {name: cfg for name, cfg in specs(store.d_model).items() if name in pair}
        per_seed, _ = compare(cell_specs, seeds, train_cfg, store, work, eval_seqs, density_tokens=density_tokens,
                              lrs=lrs, progress=progress)
        trained = train_all(cell_specs, seeds, train_cfg, store, work, progress, lrs)  # the runs just made
        _, closed = amortisation(ceilings(trained, store, eval_seqs), {pair[0]: pair[1]})
        out[cell] = {**versus(per_seed, *pair), "ceiling": closed[pair[0]]["ceiling"],
                     "concentration": variance_concentration(test_tokens(store, RECON_SEQS)),
                     "depth": (cell[0] + 1) / shared_model(store.manifest["model"], store.dtype,
                                                           train_cfg.device).n_layers}
    return out


def test_tokens(store: ActivationStore, max_seqs: int) -> torch.Tensor:
    """The ordinary tokens' activations ``[N, d]`` of the first ``max_seqs`` test sequences (the evaluation's)."""
    return torch.cat([b.acts_BTD[b.mask_BT] for b in store.first("test", max_seqs)])


def output_dirs(work_dir: str, figures_dir: str) -> tuple[Path, Path]:
    """The work folder (``$TRSAE_WORK_DIR`` overrides it) and `figures_path`, both created."""
    work = Path(os.environ.get("TRSAE_WORK_DIR", work_dir))
    work.mkdir(parents=True, exist_ok=True)
    return work, figures_path(figures_dir)


def open_store(work_dir: str, figures_dir: str, harvest: dict, train: dict,
               progress: bool = True) -> tuple[Path, Path, ActivationStore, TrainConfig]:
    """A notebook's start, from its ``harvest`` and ``train`` parameters (fields of `HarvestConfig` and
    `TrainConfig`): its work and figures folders (`output_dirs`), the store (`ensure_store`, harvested if missing)
    and the training config (crops of the store's whole contexts unless ``train`` sets ``crop_len``)."""
    work, figures = output_dirs(work_dir, figures_dir)
    store = ensure_store(HarvestConfig(**harvest), work, progress=progress)
    return work, figures, store, TrainConfig(**({"crop_len": harvest["ctx_len"]} | train))


def train_all(specs: dict[str, SAEConfig], seeds: list[int], train_cfg: TrainConfig, store: ActivationStore,
              work: str | os.PathLike, progress: bool = True,
              lrs: dict[str, float] | None = None) -> dict[str, list[tuple[Path, SAE]]]:
    """Train (or reload) every named config with every seed (at its family's learning rate, `family_train`):
    ``{name: [(run folder, sae), ...]}``."""
    return {name: [ensure_sae(cfg, family_train(train_cfg, name, lrs, seed=s), store, work, progress)[::-1]
                   for s in seeds] for name, cfg in specs.items()}
