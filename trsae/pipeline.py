"""Cached pipeline steps the notebooks call: a store, a trained SAE, an evaluation — each reused when its
configuration is unchanged (the cache key is a hash of everything it depends on), recomputed otherwise.

    work/stores/<model>-L<layer>-<hash>/     activation store
    work/runs/<name>-<hash>/                 run folder (checkpoint, log, sae/)
    work/runs/<name>-<hash>/eval-<split>-<hash>.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from trsae.config import HarvestConfig, TrainConfig, config_hash
from trsae.evaluate import evaluate_sae, train_mean
from trsae.lm import LoadedModel, load_model
from trsae.metrics import aggregate_seeds, write_json_atomic
from trsae.saes import SAE, SAEConfig
from trsae.store import ActivationStore, harvest
from trsae.train import read_log, train_sae


def environment() -> dict:
    """Versions and device, for the first cell of every notebook."""
    import nnsight
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": nnsight.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "data_dir": os.environ.get("TRSAE_DATA_DIR")}


def ensure_store(cfg: HarvestConfig, work: str | os.PathLike, model: LoadedModel | None = None,
                 progress: bool = True) -> ActivationStore:
    path = Path(work) / "stores" / f"{cfg.model}-L{cfg.layer}-{config_hash(dataclasses.replace(cfg, batch_size=0))}"
    return harvest(cfg, path, model=model, progress=progress)


def run_dir(name: str, sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
            work: str | os.PathLike) -> Path:
    key = config_hash({"sae": sae_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                       "store": store.manifest["config_hash"]})
    return Path(work) / "runs" / f"{name}-{key}"


def ensure_sae(name: str, sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
               work: str | os.PathLike, progress: bool = True) -> tuple[SAE, Path]:
    out = run_dir(name, sae_cfg, train_cfg, store, work)
    return train_sae(sae_cfg, train_cfg, store, out, progress=progress), out


class Evaluator:
    """Evaluates SAEs of one store against one model; results are cached in each run folder."""

    def __init__(self, store: ActivationStore, model: LoadedModel | None = None, split: str = "test",
                 max_seqs: int = 64, batch_size: int = 4, with_logits: bool = True):
        self.store, self.split, self.max_seqs, self.batch_size = store, split, max_seqs, batch_size
        self.with_logits = with_logits
        self._model = model
        self._mean = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.store.manifest["model"])
        return self._model

    def path(self, run: Path) -> Path:
        key = config_hash({"split": self.split, "max_seqs": self.max_seqs, "logits": self.with_logits})
        return Path(run) / f"eval-{self.split}-{key}.json"

    def __call__(self, runs: dict[Path, SAE]) -> dict[Path, dict]:
        """Results for each run folder; only the uncached ones are evaluated (together, sharing passes)."""
        todo = {str(r): s for r, s in runs.items() if not self.path(r).exists()}
        if todo:
            if self.with_logits and self._mean is None:
                self._mean = train_mean(self.store)
            res = evaluate_saes(todo, self.store, self.model if self.with_logits else None, split=self.split,
                                max_seqs=self.max_seqs, batch_size=self.batch_size, mean_D=self._mean,
                                with_logits=self.with_logits)
            for r, v in res.items():
                write_json_atomic(self.path(Path(r)), v)
        return {r: json.loads(self.path(r).read_text()) for r in runs}


def train_and_evaluate(specs: dict[str, SAEConfig], seeds: list[int], train_cfg: TrainConfig,
                       store: ActivationStore, evaluate: Evaluator, work: str | os.PathLike,
                       progress: bool = True) -> dict[str, list[dict]]:
    """Train every named SAE config with every seed (cached), then evaluate them; per-seed results by name.

    Each result also carries ``training``: steps, tokens, the last logged training loss terms and tokens/s.
    """
    runs: dict[str, list[tuple[Path, SAE]]] = {}
    for name, sae_cfg in specs.items():
        runs[name] = []
        for seed in seeds:
            sae, run = ensure_sae(name, sae_cfg, dataclasses.replace(train_cfg, seed=seed), store, work, progress)
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


def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
    """Means and standard errors over seeds for every name (`trsae.metrics.aggregate_seeds`)."""
    return {name: aggregate_seeds(rs, keep=("config", "run")) for name, rs in per_seed.items()}
