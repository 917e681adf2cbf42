"""Command line: ``python -m trsae harvest | train | eval | tune | dashboard | check-params | params | timing``.

Every bad input ends with one line ``error: <what is wrong and what to do>`` and exit status 2; a training stopped
by SIGTERM or Ctrl-C checkpoints, says so in one line ``stopped: ...`` and exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def _out_folder(out: str) -> None:
    """Refuse an ``--out`` that is, or lies inside, a file before any work."""
    for p in (Path(out), *Path(out).parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f"--out must be a folder; {p} is a file")
            return


def _harvest(a: argparse.Namespace) -> None:
    import dataclasses

    from trsae.config import HarvestConfig, given
    from trsae.dist import Ranks
    from trsae.store import harvest_sites

    _out_folder(a.out)
    cfg = HarvestConfig(**given(a, a.harvest_fields))
    cfgs, outs = [cfg], [a.out]
    if a.sites:
        if {"layer", "site"} & set(given(a, a.harvest_fields)):
            raise ValueError("give either --sites or --layer/--site, not both")
        cfgs = [dataclasses.replace(cfg, layer=layer, site=site) for layer, site in map(_layer_site, a.sites)]
        outs = [Path(a.out) / f"L{c.layer}-{c.site}" for c in cfgs]
    stores = harvest_sites(cfgs, outs, data_dir=a.data_dir, progress=not a.quiet)
    if Ranks.current().main:
        print(*stores, sep="\n")


def _layer_site(text: str) -> tuple[int, str]:
    layer, sep, site = text.partition(":")
    if not (sep and layer.isdigit() and site):
        raise ValueError(f"--sites takes LAYER:SITE pairs such as 6:resid_post or 3:attn_out, got {text!r}")
    return int(layer), site


def _train(a: argparse.Namespace) -> None:
    from trsae.train import train_from_args

    _out_folder(a.out)
    train_from_args(a)


def _eval(a: argparse.Namespace) -> None:
    from trsae.evaluate import eval_from_args

    eval_from_args(a)


def _tune(a: argparse.Namespace) -> None:
    from trsae.tuning import LR_GRID, tune_from_params

    md, chosen = tune_from_params(a.params, a.out, tuple(a.lrs or LR_GRID), progress=not a.quiet, only=a.families)
    print(f"wrote {md} and {chosen}")


def _check_params(a: argparse.Namespace) -> None:
    from trsae.params import check_params_file

    params = check_params_file(a.params, a.notebooks)
    print(f"{a.params}: {len(params)} section(s), every key known to its notebooks")


def _check_paper(a: argparse.Namespace) -> None:
    from trsae.paper import check_paper

    problems = check_paper(a.tex, a.figures)
    if problems:
        raise ValueError(f"{a.tex} shows what the notebooks did not write ({len(problems)} problem(s)); rerun the "
                         "notebooks or fix the paper:\n  " + "\n  ".join(problems))
    print(f"{a.tex}: every figure, table and number comes from {a.figures}")


def _params(a: argparse.Namespace) -> None:
    import yaml

    from trsae.params import load_params, notebook_view

    view = notebook_view(load_params(a.params), a.notebook, a.params)
    print(yaml.safe_dump(view, sort_keys=False), end="")


def _dashboard(a: argparse.Namespace) -> None:
    from trsae.dashboard import build, load_labels

    _out_folder(a.out)
    if len(a.labels) > len(a.sae):
        raise ValueError(f"{len(a.labels)} --labels files for {len(a.sae)} --sae runs (one per --sae, in order)")
    labels = [load_labels(f) for f in a.labels] + [None] * (len(a.sae) - len(a.labels))
    site = build(a.store, a.sae, a.out, labels=labels, names=a.name or None, split=a.split,
                 max_tokens=a.max_tokens, logits=not a.no_logits, progress=not a.quiet)
    for name in site.names:
        print(f"{name}: {site.page(name)} ({site.bytes[name] / 1e6:.1f} MB)")
    print(f"open {site.out / 'index.html'}")


def _timing(a) -> None:
    from trsae import timing

    if a.record:
        timing.record(a.csv, a.record[0], a.record[0], float(a.record[1]))
    rows = timing.read(a.csv)
    if not rows:
        raise ValueError(f"no timing table at {a.csv}: run the notebooks (./run_all.sh) first")
    if a.readme:
        timing.write_readme(a.readme, rows, a.label, a.csv)
    else:
        print(timing.summary(rows))


def build_parser() -> argparse.ArgumentParser:
    from trsae.config import HarvestConfig, TrainConfig, add_config_arguments, add_parts_arguments
    from trsae.saes.config import part_classes, part_names

    p = argparse.ArgumentParser(prog="python -m trsae", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    h = sub.add_parser("harvest", help="harvest a hook site of a layer (default its residual stream) into an "
                                       "activation store")
    h.set_defaults(fn=_harvest, harvest_fields=add_config_arguments(h, HarvestConfig))
    h.add_argument("--data-dir", default=None, help="data mirror (default: $TRSAE_DATA_DIR, then the cache)")
    h.add_argument("--out", required=True, help="the store's folder; with --sites, the folder of one store per "
                                                "site (OUT/L<layer>-<site>)")
    h.add_argument("--sites", nargs="+", metavar="LAYER:SITE", default=None,
                   help="several layers and sites (resid_post, attn_out, mlp_out) from the same forward passes")
    h.add_argument("--quiet", action="store_true")

    t = sub.add_parser("train", help="train an SAE on a store (resumes from the run folder's checkpoint)",
                       description="Options after --sparsity/--encoder are the settings of those parts; each "
                                   "applies only to the part that has it.")
    t.add_argument("--store", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--sparsity", default="topk", choices=part_names("sparsity"))
    t.add_argument("--encoder", default="token", choices=part_names("encoder"))
    t.add_argument("--width", type=int, default=None, help="dictionary size F (default 8 × d)")
    t.add_argument("--crop-len", type=int, default=None,
                   help="tokens per training crop (default: the store's context length, at most 128)")
    train_fields = add_config_arguments(t, TrainConfig, skip=("crop_len",))
    part_fields = add_parts_arguments(t, {name: part_classes(kind, name)[0] for kind in ("sparsity", "encoder")
                                          for name in part_names(kind)})
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this call, with a checkpoint (rerun to resume)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_train, train_fields=train_fields, part_fields=part_fields)

    e = sub.add_parser("eval", help="core metrics of a trained SAE on a store's test split")
    e.add_argument("--store", required=True)
    e.add_argument("--sae", required=True)
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--max-seqs", type=int, default=64, help="sequences of the CE / KL metrics (LM passes)")
    e.add_argument("--recon-seqs", type=int, default=160,
                   help="sequences of the reconstruction, sparsity and persistence metrics (store only)")
    e.add_argument("--density-tokens", type=int, default=100_000,
                   help="training tokens over which dead / dense latents are counted")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--out", default=None, help="results JSON (default: print)")
    e.set_defaults(fn=_eval)

    c = sub.add_parser("check-params", help="reject parameter-file keys that no notebook declares")
    c.add_argument("params")
    c.add_argument("notebooks", nargs="+")
    c.set_defaults(fn=_check_params)
    cp = sub.add_parser("check-paper", help="refuse a paper that shows what the notebooks did not write "
                                           "(missing files, undefined macros, hand-typed numbers)")
    cp.add_argument("tex")
    cp.add_argument("figures")
    cp.set_defaults(fn=_check_paper)
    v = sub.add_parser("params", help="print the flat parameters papermill gives one notebook (YAML)")
    v.add_argument("params")
    v.add_argument("notebook")
    v.set_defaults(fn=_params)
    tm = sub.add_parser("timing", help="seconds per notebook and phase, from the notebooks' profile_times.csv "
                                       "(Markdown)")
    tm.add_argument("csv", nargs="?", default="figures/profile_times.csv")
    tm.add_argument("--record", nargs=2, metavar=("NAME", "SECONDS"),
                    help="first add one row (e.g. the paper's build): NAME's rows replaced by NAME SECONDS")
    tm.add_argument("--readme", help="write the table into this README's timing section instead of printing it")
    tm.add_argument("--label", default="./run_all.sh", help="what was run, for the README's sentence")
    tm.set_defaults(fn=_timing)
    tu = sub.add_parser("tune", help="choose each SAE family's learning rate (and ReLU + L1's L1 weight) on the "
                                     "val split, for a parameter file's profile")
    tu.add_argument("params")
    tu.add_argument("--out", default="params/tuning", help="folder of <profile>.md (the table) and <profile>.yaml")
    tu.add_argument("--lrs", type=float, nargs="+", default=None, help="the learning-rate grid (default: "
                    "trsae.tuning.LR_GRID)")
    tu.add_argument("--families", nargs="+", default=None,
                    help="tune these families alone, replacing their entries in an earlier tuning's files")
    tu.add_argument("--quiet", action="store_true")
    tu.set_defaults(fn=_tune)
    d = sub.add_parser("dashboard", help="a static feature dashboard (opens from disk) of one or two SAEs")
    d.add_argument("--store", required=True)
    d.add_argument("--sae", required=True, action="append", help="run or SAE folder; twice to compare two")
    d.add_argument("--out", required=True)
    d.add_argument("--labels", action="append", default=[],
                   help="JSON {feature: [label, f1]}, one per --sae in order (optional)")
    d.add_argument("--name", action="append", default=[], help="folder name of each SAE (default its kind)")
    d.add_argument("--split", default="test", choices=["train", "val", "test"])
    d.add_argument("--max-tokens", type=int, default=1 << 16, help="tokens of the split to encode")
    d.add_argument("--no-logits", action="store_true", help="skip the model: no logits, token ids as text")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_dashboard)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: missing files, a full disk (trsae.io)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # trsae.train.TrainingInterrupted (SIGTERM or SIGINT), or Ctrl-C elsewhere
        print(f"stopped: {str(e) or 'interrupted (Ctrl-C); rerun the same command to resume'}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
