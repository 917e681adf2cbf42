"""Command line: ``python -m trsae harvest | train | eval``.

Every bad input ends with one line ``error: <what is wrong and what to do>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def _harvest(a: argparse.Namespace) -> None:
    from trsae.config import HarvestConfig
    from trsae.dist import Ranks
    from trsae.store import harvest

    cfg = HarvestConfig(model=a.model, layer=a.layer, data=a.data, tokens=a.tokens, ctx_len=a.ctx_len,
                        seqs_per_shard=a.seqs_per_shard, batch_size=a.batch_size, dtype=a.dtype,
                        split_seed=a.split_seed)
    store = harvest(cfg, a.out, data_dir=a.data_dir, progress=not a.quiet)
    if Ranks.current().main:
        print(store)


def _train(a: argparse.Namespace) -> None:
    from trsae.train import train_from_args

    train_from_args(a)


def _eval(a: argparse.Namespace) -> None:
    from trsae.evaluate import eval_from_args

    eval_from_args(a)


def _check_params(a: argparse.Namespace) -> None:
    from trsae.config import check_params_file

    params = check_params_file(a.params, a.notebooks)
    print(f"{a.params}: {len(params)} parameter(s), all known to the notebooks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trsae", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    h = sub.add_parser("harvest", help="harvest a layer's residual stream into an activation store")
    h.add_argument("--model", default="gemma-3-270m")
    h.add_argument("--layer", type=int, default=6)
    h.add_argument("--data", default="brown+sotu", help="sources joined by +, e.g. brown+sotu or hf:<dataset>")
    h.add_argument("--tokens", type=int, default=200_000)
    h.add_argument("--ctx-len", type=int, default=128)
    h.add_argument("--seqs-per-shard", type=int, default=64)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--split-seed", type=int, default=0)
    h.add_argument("--data-dir", default=None, help="data mirror (default: $TRSAE_DATA_DIR, then the cache)")
    h.add_argument("--out", required=True)
    h.add_argument("--quiet", action="store_true")
    h.set_defaults(fn=_harvest)

    t = sub.add_parser("train", help="train an SAE on a store (resumes from the run folder's checkpoint)")
    t.add_argument("--store", required=True)
    t.add_argument("--arch", default="topk", choices=["relu", "topk", "batchtopk", "trsae"])
    t.add_argument("--width", type=int, default=None, help="dictionary size F (default 8 × d)")
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--l1-coeff", type=float, default=None)
    t.add_argument("--window", type=int, default=8, help="TRSAE context window w")
    t.add_argument("--tokens", type=int, default=1_000_000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--window-len", type=int, default=None, help="tokens per window (default: min(T, 128))")
    t.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this call, with a checkpoint (rerun to resume)")
    t.add_argument("--out", required=True)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="core metrics of a trained SAE on a store's test split")
    e.add_argument("--store", required=True)
    e.add_argument("--sae", required=True)
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--max-seqs", type=int, default=64)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--out", default=None, help="results JSON (default: print)")
    e.set_defaults(fn=_eval)

    c = sub.add_parser("check-params", help="reject parameter-file keys that no notebook declares")
    c.add_argument("params")
    c.add_argument("notebooks", nargs="+")
    c.set_defaults(fn=_check_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: missing files, a full disk (trsae.io)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
