"""One tuning protocol for every SAE family, on the val split (as SAEBench tunes its baselines): each family's
learning rate from one small grid at the main budget, and ReLU + L1's L1 weight chosen so that its L0 lands at the
matched L0 k. The test split is never read here; it is for the paper only.

    python -m trsae tune params/cpu.yaml        # writes params/tuning/cpu.md (the table) and cpu.yaml (the choice)

Rule: a family's learning rate is the grid value with the lowest val FVU among those whose val L0 lies within
`L0_TOLERANCE` of the family's target (k for the matched-L0 SAEs; no target for TFA, whose dense prediction is
counted, and TRSAE-pred) and whose dictionary keeps dead latents under `DEAD_LIMIT`. When none qualifies: the value
whose L0 is nearest the target among the runs that keep dead latents under the limit and reconstruct better than the
mean (FVU < 1; among all runs when none does), then the fewest dead latents. (High rates can buy a lower FVU with a
dictionary half dead: TopK at 3.2e-3 on gemma-3-270m, 300k tokens, reconstructs best with 48 % of its latents dead.)

ReLU + L1's L0 follows the learning rate as much as its L1 weight (on gemma-3-270m at 300k tokens the weight that
gives L0 = k at 4e-4 gives L0 4 at 1.6e-3), so its weight is searched at every rate of the grid (a secant search on
log L0 against log weight, each rate starting from the previous rate's weight) and the rule chooses among those
runs, each at its own weight; one weight for the whole grid would leave only the rate it was found at near k.
JumpReLU, whose L0 follows learned thresholds and a
penalty around k rather than a selection, goes the same way with its penalty's weight: times `PENALTY_MULTS` in
turn while its run does not qualify, at the base rate, then the grid at that weight, then again at the chosen rate
(the rule above then chooses among those runs). Every run is one seed (the profile's first)
and is cached like the notebooks' runs, so rerunning the command after an interruption only does what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from trsae.saes import SAEConfig

LR_GRID = (4e-4, 8e-4, 1.6e-3, 3.2e-3)
"""Learning rates tried for every family (Adam; the profiles' shared rate is 4e-4; TopK diverges at 6.4e-3)."""
L0_TOLERANCE = 0.1
"""A run is at its target L0 when ``|L0 / target - 1| <= L0_TOLERANCE``."""
DEAD_LIMIT = 0.1
"""A run qualifies only with less than this share of dead latents (`trsae.evaluate.density_stats`)."""
L1_SEARCH_RUNS = 6
"""At most this many runs per L1 weight search."""
PENALTY_MULTS = (4.0, 16.0, 64.0)
"""JumpReLU's L0-penalty weight times these, tried in turn at one rate until a run qualifies."""
UNTARGETED = ("TFA", "TRSAE-pred")
"""Families without an L0 target: TFA's L0 counts its dense prediction, TRSAE-pred may leave predicted slots empty."""


def families(d_in: int, width: int, k: int, temporal: dict[str, Any]) -> dict[str, SAEConfig]:
    """Every family the notebooks compare at the main budget (01's baselines, 02's comparison and field), once."""
    from trsae import experiments

    out = dict(experiments.baseline_specs(d_in, width, k))
    out |= experiments.temporal_specs(d_in, width, k, **temporal)
    out |= experiments.field_specs(d_in, width, k, **temporal)
    return out


def target_l0(name: str, cfg: SAEConfig, k: int) -> int | None:
    return None if name in UNTARGETED else k


def at_target(l0: float, target: int | None) -> bool:
    return target is None or abs(l0 / target - 1) <= L0_TOLERANCE


def qualifies(trial: dict, target: int | None) -> bool:
    """At the target L0 with dead latents under `DEAD_LIMIT`."""
    return at_target(trial["l0"], target) and trial["dead_frac"] < DEAD_LIMIT


def choose(trials: list[dict], target: int | None) -> dict:
    """The trial the rule of the module docstring takes from ``[{"fvu", "l0", "dead_frac", ...}, ...]``."""
    ok = [t for t in trials if qualifies(t, target)]
    if ok:
        return min(ok, key=lambda t: t["fvu"])
    usable = [t for t in trials if t["dead_frac"] < DEAD_LIMIT and t["fvu"] < 1] or trials
    return min(usable, key=lambda t: (0.0 if target is None else abs(t["l0"] - target), t["dead_frac"]))


def choose_lr(trials: list[dict], target: int | None) -> float:
    """The learning rate of `choose` over ``[{"lr", "fvu", "l0", "dead_frac"}, ...]``."""
    return choose(trials, target)["lr"]


def next_l1(points: list[tuple[float, float]], target: float) -> float:
    """The next L1 weight of a secant search for L0 = target in log-log coordinates over ``[(weight, L0), ...]``:
    between the nearest points on either side of the target when the search has them, else from the two latest
    points (a factor-4 step from a single one)."""
    logs = [(math.log(w), math.log(max(l0, 1e-3))) for w, l0 in points]
    goal = math.log(target)
    below = [p for p in logs if p[1] < goal]  # L0 below target: weight too high
    above = [p for p in logs if p[1] >= goal]
    if below and above:
        a = min(below, key=lambda p: goal - p[1])
        b = min(above, key=lambda p: p[1] - goal)
    elif len(logs) >= 2:
        a, b = logs[-2], logs[-1]
    else:
        return points[0][0] * (4.0 if logs[0][1] > goal else 0.25)
    if abs(a[1] - b[1]) < 1e-9:
        return math.exp((a[0] + b[0]) / 2)
    w = a[0] + (goal - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
    lo, hi = min(p[0] for p in logs) - math.log(8), max(p[0] for p in logs) + math.log(8)
    return math.exp(min(max(w, lo), hi))


class Tuner:
    """Runs and scores the tuning runs of one store (cached in ``work`` like every notebook run)."""

    def __init__(self, store, train_cfg, work: str | Path, k: int, progress: bool = False):
        from trsae import runner

        self.store, self.train_cfg, self.work, self.k, self.progress = store, train_cfg, Path(work), k, progress
        self.evaluate = runner.Evaluator(store, split="val", max_seqs=0, with_logits=False,
                                         density_tokens=min(100_000, train_cfg.tokens))

    def score(self, cfg: SAEConfig, lr: float) -> dict:
        from trsae import runner

        tc = dataclasses.replace(self.train_cfg, lr=lr)
        sae, run = runner.ensure_sae(cfg, tc, self.store, self.work, self.progress)
        res = self.evaluate({run: sae})[run]
        return {"lr": lr, "fvu": 1 - res["reconstruction_quality"]["explained_variance"],
                "l0": res["sparsity"]["l0"], "dead_frac": res["sparsity"]["dead_frac"]}

    def l1_search(self, cfg: SAEConfig, lr: float) -> tuple[SAEConfig, list[dict]]:
        """The ReLU + L1 config whose val L0 is at k (or nearest it after `L1_SEARCH_RUNS` runs), and the runs."""
        trials: list[dict] = []
        weight = cfg.sparsity.l1_coeff
        for _ in range(L1_SEARCH_RUNS):
            t = self.score(cfg.replace(l1_coeff=weight), lr) | {"l1_coeff": weight}
            trials.append(t)
            if at_target(t["l0"], self.k):
                break
            weight = next_l1([(u["l1_coeff"], u["l0"]) for u in trials], self.k)
        best = min(trials, key=lambda u: abs(math.log(max(u["l0"], 1e-3) / self.k)))
        return cfg.replace(l1_coeff=best["l1_coeff"]), trials

    def penalty_search(self, cfg: SAEConfig, first: dict) -> tuple[SAEConfig, list[dict]]:
        """JumpReLU's L0-penalty weight at the rate of ``first`` (the run of ``cfg`` at that rate): the weight
        times each of `PENALTY_MULTS` while the latest run does not qualify; the config `choose` takes among these
        runs and ``first``, and the runs."""
        base = cfg.sparsity.l0_coeff
        trials = [first | {"l0_coeff": base}]
        for m in PENALTY_MULTS:
            if qualifies(trials[-1], self.k):
                break
            trials.append(self.score(cfg.replace(l0_coeff=base * m), first["lr"]) | {"l0_coeff": base * m})
        return cfg.replace(l0_coeff=choose(trials, self.k)["l0_coeff"]), trials

    def tune(self, specs: dict[str, SAEConfig], lrs: tuple[float, ...] = LR_GRID, base_lr: float | None = None) -> dict:
        """``{"lrs": {family: lr}, "relu_l1_coeff": weight, "jumprelu_l0_coeff": weight, "trials": {family: [...]},
        "l1_trials": [...], "penalty_trials": [...]}`` (the weights for the families in ``specs``; ReLU + L1's row of
        ``trials`` holds, per rate, the run of its search that `l1_search` kept)."""
        base_lr = self.train_cfg.lr if base_lr is None else base_lr
        specs = dict(specs)
        chosen: dict[str, float] = {}
        trials: dict[str, list[dict]] = {}
        l1_trials: list[dict] = []
        penalty_trials: list[dict] = []
        relu_at: dict[float, SAEConfig] = {}
        if "ReLU-L1" in specs:  # its weight found at each rate, the rate chosen among those runs
            cfg, trials["ReLU-L1"] = specs.pop("ReLU-L1"), []
            for lr in lrs:
                cfg, found = self.l1_search(cfg, lr)
                l1_trials += [t | {"stage": f"at lr {lr:g}"} for t in found]
                trials["ReLU-L1"].append(next(t for t in found if t["l1_coeff"] == cfg.sparsity.l1_coeff))
                relu_at[lr] = cfg
            chosen["ReLU-L1"] = choose_lr(trials["ReLU-L1"], self.k)
        if "JumpReLU" in specs:
            cfg = specs["JumpReLU"]
            specs["JumpReLU"], found = self.penalty_search(cfg, self.score(cfg, base_lr))
            penalty_trials += [t | {"stage": "at the base rate"} for t in found]
        for name, cfg in specs.items():
            trials[name] = [self.score(cfg, lr) for lr in lrs]
            chosen[name] = choose_lr(trials[name], target_l0(name, cfg, self.k))
        out = {"lrs": chosen, "trials": trials}
        if "JumpReLU" in specs:
            first = next(t for t in trials["JumpReLU"] if t["lr"] == chosen["JumpReLU"])
            jump, found = self.penalty_search(specs["JumpReLU"], first)
            out["penalty_trials"] = penalty_trials + [t | {"stage": "at the chosen rate"} for t in found]
            out["jumprelu_l0_coeff"] = jump.sparsity.l0_coeff
        if relu_at:
            out["relu_l1_coeff"] = relu_at[chosen["ReLU-L1"]].sparsity.l1_coeff
        out["l1_trials"] = l1_trials
        return out


SEARCH_TITLES = {"ReLU-L1": "ReLU + L1's L1 weight", "JumpReLU": "JumpReLU's L0-penalty weight"}
"""The family whose tuning runs each weight search, and the first words of that search's section in `markdown`."""


def markdown(result: dict, k: int, profile: str, budget: int) -> str:
    """The table that made the choice: val FVU and L0 per family and learning rate, the chosen one in bold."""
    lrs = sorted({t["lr"] for ts in result["trials"].values() for t in ts})
    lines = [f"# Tuning on the val split: profile {profile}",
             "",
             f"Written by `python -m trsae tune` (`trsae.tuning`): one seed, {budget:,} training tokens, k = {k}. "
             f"Each cell is val FVU (L0, dead latents); the chosen learning rate of each family is in bold (lowest "
             f"FVU among the runs within {L0_TOLERANCE:.0%} of the family's target L0 with under {DEAD_LIMIT:.0%} "
             f"dead latents).",
             "",
             "| family | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for name, ts in result["trials"].items():
        by_lr = {t["lr"]: t for t in ts}
        cells = []
        for lr in lrs:
            t = by_lr.get(lr)
            cell = "" if t is None else f"{t['fvu']:.4f} ({t['l0']:.1f}, {t['dead_frac']:.0%})"
            cells.append(f"**{cell}**" if t is not None and lr == result["lrs"][name] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['lrs'][name]:g} |")
    searches = (("l1_trials", f"{SEARCH_TITLES['ReLU-L1']} (target L0 {k}):", "relu_l1_coeff", "Chosen L1 weight",
                 ("stage", "lr", "L1 weight", "val L0", "val FVU"),
                 lambda t: (t["stage"], f"{t['lr']:g}", f"{t['l1_coeff']:.4g}", f"{t['l0']:.1f}", f"{t['fvu']:.4f}")),
                ("penalty_trials", f"{SEARCH_TITLES['JumpReLU']} (target L0 {k}):",
                 "jumprelu_l0_coeff", "Chosen L0-penalty weight",
                 ("stage", "lr", "L0-penalty weight", "val L0", "dead latents", "val FVU"),
                 lambda t: (t["stage"], f"{t['lr']:g}", f"{t['l0_coeff']:.4g}", f"{t['l0']:.1f}", f"{t['dead_frac']:.0%}",
                            f"{t['fvu']:.4f}")))
    for key, title, chosen, says, heads, cells in searches:  # the weight searches, one table each
        if result.get(key):
            lines += ["", title, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
            lines += ["| " + " | ".join(cells(t)) + " |" for t in result[key]]
            lines += ["", f"{says}: {result[chosen]:.4g}."]
    return "\n".join(lines) + "\n"


def _split_markdown(md: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """A table of `markdown` as (the lines up to the main table's rows, {family: its row}, {owner: its search
    section})."""
    blocks = md.rstrip("\n").split("\n\n")
    head_end = next(i for i, b in enumerate(blocks) if b.startswith("| family |"))
    table = blocks[head_end].split("\n")
    rows = {ln.split(" | ")[0][2:]: ln for ln in table[2:]}
    sections: dict[str, list[str]] = {}
    owner = None
    for b in blocks[head_end + 1:]:
        owner = next((o for o, t in SEARCH_TITLES.items() if b.startswith(t)), owner)
        sections.setdefault(owner, []).append(b)
    return blocks[:head_end] + ["\n".join(table[:2])], rows, {o: "\n\n".join(bs) for o, bs in sections.items()}


def merge_markdown(old: str, new: str, families: list[str]) -> str:
    """The table of `markdown` for every family of ``old`` where the rows and weight searches of ``families``
    come from ``new`` (a tuning of those families alone, on the same grid): what tuning every family at once
    writes when the others' runs are unchanged."""
    head, rows, sections = _split_markdown(old)
    new_head, new_rows, new_sections = _split_markdown(new)
    if head[-1] != new_head[-1]:
        raise ValueError("the two tunings used different learning-rate grids; tune every family at once")
    missing = [f for f in families if f not in new_rows]
    if missing:
        raise ValueError(f"{missing} not in the new table")
    rows |= {f: new_rows[f] for f in families}
    for owner in SEARCH_TITLES:
        if owner in families:
            sections.pop(owner, None)
            if owner in new_sections:
                sections[owner] = new_sections[owner]
    order = [sections[o] for o in SEARCH_TITLES if o in sections]
    table = head[-1] + "\n" + "\n".join(rows.values())
    return "\n\n".join(head[:-1] + [table] + order) + "\n"


def tune_from_params(params_path: str | Path, out_dir: str | Path, lrs: tuple[float, ...] = LR_GRID,
                     notebook: str | Path = "notebooks/02_temporal.ipynb", progress: bool = True,
                     only: list[str] | None = None) -> tuple[Path, Path]:
    """Tune for a parameter file's profile, as `notebook` (02) sees it: store, budget, width, k, window, first seed,
    and its work folder (relative to the notebook, as under papermill; ``$TRSAE_WORK_DIR`` overrides it), so the
    runs are cached beside the notebooks'. Writes ``<out_dir>/<profile>.md`` and ``<profile>.yaml``.

    ``only``: tune these families alone and replace their rows, searches and choices in the files of an earlier
    tuning of every family (the others' entries are what a full tuning would write again while their code is
    unchanged)."""
    import yaml

    from trsae import runner
    from trsae.io import atomic_write_text
    from trsae.params import load_params, notebook_defaults, notebook_view

    nb = Path(notebook)
    if not nb.is_file():
        raise FileNotFoundError(f"{nb} not found: run the command from the repository's root (or pass the notebook)")
    view = notebook_defaults(nb) | notebook_view(load_params(params_path), nb, str(params_path))
    profile = Path(params_path).stem
    work, _, store, train_cfg = runner.open_store(str(nb.parent / view["work_dir"]), str(nb.parent / view["figures_dir"]),
                                                  view["harvest"], view["train"], progress=progress)
    train_cfg = dataclasses.replace(train_cfg, seed=view["seeds"][0])
    k, width = view["sae"]["k"], view["sae"]["width_mult"] * store.d_model
    specs = families(store.d_model, width, k, view["temporal"])
    out_dir = Path(out_dir)
    md, chosen = out_dir / f"{profile}.md", out_dir / f"{profile}.yaml"
    choice: dict[str, Any] = {"lrs": {}}
    if only:
        unknown = sorted(set(only) - set(specs))
        if unknown:
            raise ValueError(f"unknown families {unknown}; the families are {list(specs)}")
        if not (md.is_file() and chosen.is_file()):
            raise FileNotFoundError(f"{md} and {chosen} (a tuning of every family) must exist to tune {only} alone")
        choice = yaml.safe_load(chosen.read_text())
        specs = {n: c for n, c in specs.items() if n in only}
    result = Tuner(store, train_cfg, work, k, progress).tune(specs, lrs)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(result, k, profile, train_cfg.tokens)
    atomic_write_text(md, merge_markdown(md.read_text(), table, list(specs)) if only else table)
    choice["lrs"] |= {n: float(v) for n, v in result["lrs"].items()}
    for key in ("relu_l1_coeff", "jumprelu_l0_coeff"):
        if key in result:
            choice[key] = float(result[key])
    atomic_write_text(chosen, f"# chosen by python -m trsae tune {params_path} (table: {md.name})\n"
                      + yaml.safe_dump(choice, sort_keys=False))
    return md, chosen
