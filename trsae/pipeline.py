"""Cached pipeline steps the notebooks call: a store, a trained SAE, an evaluation — each reused when its
configuration is unchanged (the cache key is a hash of everything it depends on), recomputed otherwise.

    work/stores/<model>-L<layer>-<hash>/     activation store
    work/runs/<arch>-<hash>/                 run folder (checkpoint, log, sae/)
    work/runs/<arch>-<hash>/eval-<split>-<hash>.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from trsae.config import HarvestConfig, TrainConfig, config_hash, figures_path
from trsae.evaluate import evaluate_saes, train_mean
from trsae.lm import LoadedModel, load_model
from trsae.metrics import aggregate_seeds, write_json_atomic
from trsae.saes import SAE, SAEConfig
from trsae.store import ActivationStore, harvest, store_identity
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
    path = Path(work) / "stores" / f"{cfg.model}-L{cfg.layer}-{config_hash(store_identity(cfg))}"
    return harvest(cfg, path, model=model, progress=progress)


def run_dir(sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
            work: str | os.PathLike) -> Path:
    key = config_hash({"sae": sae_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                       "store": store.manifest["config_hash"]})
    return Path(work) / "runs" / f"{sae_cfg.arch}-{key}"  # named by content, so equal configs share a run


def ensure_sae(sae_cfg: SAEConfig, train_cfg: TrainConfig, store: ActivationStore,
               work: str | os.PathLike, progress: bool = True) -> tuple[SAE, Path]:
    out = run_dir(sae_cfg, train_cfg, store, work)
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
            sae, run = ensure_sae(sae_cfg, dataclasses.replace(train_cfg, seed=seed), store, work, progress)
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


# --- what the notebooks compare ------------------------------------------------------------------------

CORE_ROWS = [
    ("training", "step", "training steps"),
    ("sparsity", "l0", "L0"),
    ("reconstruction_quality", "explained_variance", "explained variance (pooled)"),
    ("reconstruction_quality", "explained_variance_legacy", "explained variance (legacy)"),
    ("reconstruction_quality", "cossim", "cosine similarity"),
    ("shrinkage", "l2_ratio", "l2 ratio"),
    ("model_behavior_preservation", "kl_div_score", "KL-divergence score"),
    ("model_performance_preservation", "ce_loss_score", "CE-loss score (zero abl.)"),
    ("model_performance_preservation", "ce_loss_score_mean_ablation", "CE-loss score (mean abl.)"),
    ("sparsity", "dead_frac", "dead latents (eval)"),
]


def baseline_specs(d_in: int, width: int, k: int, l1_coeff: float | None = None) -> dict[str, SAEConfig]:
    """The three baselines at one width: ReLU + L1 (its L0 follows from ``l1_coeff``), TopK and BatchTopK."""
    relu_kw = {} if l1_coeff is None else {"l1_coeff": l1_coeff}
    return {"ReLU-L1": SAEConfig(arch="relu", d_in=d_in, width=width, **relu_kw),
            "TopK": SAEConfig(arch="topk", d_in=d_in, width=width, k=k),
            "BatchTopK": SAEConfig(arch="batchtopk", d_in=d_in, width=width, k=k)}


def frontier(specs: dict[str, list[SAEConfig]], train_cfg: TrainConfig, store: ActivationStore,
             evaluate: Evaluator, work: str | os.PathLike, metric: tuple[str, str],
             progress: bool = True) -> dict[str, list[tuple[float, float, float]]]:
    """``{name: [(l0, metric mean, metric se), ...]}`` over sparsity settings (one seed), for a frontier plot."""
    out = {}
    for name, cfgs in specs.items():
        per = train_and_evaluate({f"{name}-{i}": c for i, c in enumerate(cfgs)}, [train_cfg.seed], train_cfg,
                                 store, evaluate, work, progress)
        pts = []
        for rs in per.values():
            v = rs[0][metric[0]][metric[1]]
            pts.append((rs[0]["sparsity"]["l0"], v, 0.0))
        out[name] = sorted(pts)
    return out


def macros(summary: dict[str, dict], prefix: str, rows: list[tuple[str, str, str]]) -> dict[str, float]:
    """Paper macros ``\\<prefix><Name><Key>`` (mean) and ``...Se`` (standard error) for every name × row."""
    from trsae.report import macro_name

    out = {}
    for name, res in summary.items():
        for section, key, _ in rows:
            leaf = (res.get(section) or {}).get(key)
            if isinstance(leaf, dict) and leaf.get("mean") is not None:
                out[macro_name(prefix, name, key)] = leaf["mean"]
                out[macro_name(prefix, name, key, "se")] = leaf["se"]
    return out


def temporal_specs(d_in: int, width: int, k: int, window: int, curriculum_frac: float = 0.3,
                   **trsae_kw) -> dict[str, SAEConfig]:
    """TRSAE and the baselines it is compared with at matched L0 (k): TopK and BatchTopK at the same width,
    and "TopK-wide", a TopK whose wider dictionary holds as many parameters as the TRSAE."""
    from trsae.saes import make_sae
    from trsae.temporal import TRSAEConfig

    tr = TRSAEConfig(d_in=d_in, width=width, k=k, window=window, curriculum_frac=curriculum_frac, **trsae_kw)
    n_tr = make_sae(tr).n_params()
    per_latent = 2 * d_in + 1  # W_enc column, W_dec row, b_enc entry; b_dec is d_in once
    wide = round((n_tr - d_in) / per_latent)
    return {"TopK": SAEConfig(arch="topk", d_in=d_in, width=width, k=k),
            "BatchTopK": SAEConfig(arch="batchtopk", d_in=d_in, width=width, k=k),
            "TopK-wide": SAEConfig(arch="topk", d_in=d_in, width=wide, k=k),
            "TRSAE": tr}


def temporal_usage(per_seed: list[dict], threshold: float = 0.1,
                   sweep: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)) -> dict:
    """What a trained TRSAE uses of its context: per seed, the features whose gated context strength
    ``g_f‖U_f‖`` exceeds ``threshold`` times their token term ``‖W_enc[:, f]‖`` (open gates), and those with a
    position embedding above it, with their buckets; ``by_threshold`` gives both counts over ``sweep``."""
    from trsae.saes import load_sae

    rows = []
    for res in per_seed:
        sae = load_sae(Path(res["run"]) / "sae")
        pos = sae.positional_features(threshold)
        F = sae.cfg.width
        rows.append({"open_gates": sae.open_gates(threshold), "open_gate_frac": sae.open_gates(threshold) / F,
                     "positional_features": len(pos), "positional_frac": len(pos) / F,
                     "positional_examples": pos[:20],
                     "bucket_counts": _bucket_counts(pos, sae.cfg.n_buckets),
                     "by_threshold": [{"threshold": t, "open_gates": sae.open_gates(t),
                                       "positional_features": len(sae.positional_features(t))} for t in sweep]})
    return {"threshold": threshold, "per_seed": rows}


def _bucket_counts(pos: list[tuple[int, list[int]]], n_buckets: int) -> list[int]:
    counts = [0] * n_buckets
    for _, buckets in pos:
        for b in buckets:
            counts[b] += 1
    return counts


def setup_macros(profile: str, store: ActivationStore, train_cfg: TrainConfig, width_mult: int, k: int,
                 seeds: list[int], eval_seqs: int) -> dict:
    """The experimental setup as paper macros (``\\setup...``), read from the store and configs used."""
    m = store.manifest
    return {"setupProfile": profile, "setupModel": m["model"], "setupLayer": m["layer"],
            "setupData": m["data"].replace("+", " + ").replace("_", "\\_"), "setupHarvestTokens": m["token_count"],
            "setupCtxLen": m["ctx_len"], "setupTrainTokens": train_cfg.tokens, "setupDModel": store.d_model,
            "setupWidthMult": width_mult, "setupWidth": width_mult * store.d_model, "setupK": k,
            "setupSeeds": len(seeds), "setupEvalSeqs": eval_seqs, "setupTestSeqs": len(store.splits["test"])}


def output_dirs(work_dir: str, figures_dir: str) -> tuple[Path, Path]:
    """The work folder (``$TRSAE_WORK_DIR`` overrides it) and `figures_path`, both created."""
    work = Path(os.environ.get("TRSAE_WORK_DIR", work_dir))
    work.mkdir(parents=True, exist_ok=True)
    return work, figures_path(figures_dir)


def ablation_specs(d_in: int, width: int, k: int, window: int, windows: list[int],
                   curriculum_frac: float = 0.3, **trsae_kw) -> dict[str, SAEConfig]:
    """The full TRSAE, each temporal component removed in turn, a sweep of the window w, and the look-ahead
    (acausal) variant, clearly labelled as a reference: codes there see future tokens."""
    from trsae.temporal import TRSAEConfig

    full = TRSAEConfig(d_in=d_in, width=width, k=k, window=window, curriculum_frac=curriculum_frac, **trsae_kw)
    specs = {"full": full,
             "no position emb.": dataclasses.replace(full, use_pos=False),
             "no attention": dataclasses.replace(full, use_attn=False),
             "gates always on": dataclasses.replace(full, use_gates=False),
             "no curriculum": dataclasses.replace(full, curriculum_frac=0.0),
             "look-ahead (reference)": dataclasses.replace(full, causal=False)}
    for w in windows:
        specs[f"w={w}"] = dataclasses.replace(full, window=w, w_start=min(full.w_start, w))
    return specs


ABLATION_ROWS = [row for row in CORE_ROWS if row[1] in
                 ("explained_variance", "kl_div_score", "ce_loss_score", "ce_loss_score_mean_ablation", "dead_frac")]


def ablation_macros(summary: dict[str, dict], windows: list[int], n_seeds: int, train_tokens: int,
                    eval_seqs: int) -> dict:
    """Paper macros of the ablation study: the component whose removal moves explained variance the most (and
    by how much, full minus ablated), the best window, the seeds, windows, training tokens and evaluated test
    sequences used."""
    ev = {n: r["reconstruction_quality"]["explained_variance"]["mean"] for n, r in summary.items()}
    removed = {n: ev["full"] - ev[n] for n in ("no position emb.", "no attention", "gates always on", "no curriculum")}
    largest = max(removed, key=lambda n: abs(removed[n]))
    best_w = max(windows, key=lambda w: ev[f"w={w}"])
    return {"ablSeeds": n_seeds, "ablWindows": ", ".join(map(str, windows)), "ablBestWindow": best_w,
            "ablTrainTokens": train_tokens, "ablEvalSeqs": eval_seqs,
            "ablLargestEffect": largest, "ablLargestEffectDelta": removed[largest],
            "ablFullEV": ev["full"], "ablLookAheadEV": ev["look-ahead (reference)"]}


def window_curve(summary: dict[str, dict], windows: list[int],
                 metric: tuple[str, str] = ("reconstruction_quality", "explained_variance")) -> dict:
    """``{"TRSAE": [(w, mean, se), ...]}`` over the window sweep (w = 0 placed at 0.5 for a log axis)."""
    pts = []
    for w in windows:
        leaf = summary[f"w={w}"][metric[0]][metric[1]]
        pts.append((max(w, 0.5), leaf["mean"], leaf["se"]))
    return {"TRSAE": pts}


def train_all(specs: dict[str, SAEConfig], seeds: list[int], train_cfg: TrainConfig, store: ActivationStore,
              work: str | os.PathLike, progress: bool = True) -> dict[str, list[tuple[Path, SAE]]]:
    """Train (or reload) every named config with every seed: ``{name: [(run folder, sae), ...]}``."""
    return {name: [ensure_sae(cfg, dataclasses.replace(train_cfg, seed=s), store, work, progress)[::-1]
                   for s in seeds] for name, cfg in specs.items()}
