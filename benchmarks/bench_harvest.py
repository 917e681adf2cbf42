"""Harvest throughput against the floor any harvester pays, and harvest peak memory against --tokens.

1. tokens/s of `trsae.lm.layer_acts` (nnsight, stops after the layer) vs a bare transformers forward that a
   plain torch hook stops right after the same layer; interleaved repeats, medians, printed as a ratio
   (target >= 0.9).
2. peak RSS of `python -m trsae harvest` in a fresh process for growing --tokens (bounded memory means it
   stays flat: activations are written shard by shard).

    python benchmarks/bench_harvest.py --model gemma-3-270m --layer 6 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from trsae.data import iter_mixed_documents, make_contexts
from trsae.lm import layer_acts, load_model


class _Stop(Exception):
    pass


def bare_forward(model, layer, ids_BT):
    """transformers forward stopped by a torch hook right after block ``layer``."""
    out = {}

    def hook(mod, inp, output):
        out["acts"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    h = model.hf_layer(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.hf(ids_BT)
    except _Stop:
        pass
    finally:
        h.remove()
    return out["acts"]


def throughput(args):
    model = load_model(args.model)
    ids = make_contexts(model.tokenizer, iter_mixed_documents("brown"), args.ctx_len, args.batch_size * 4, model.bos_id)
    batches = ids.split(args.batch_size)
    fns = {"nnsight (trsae)": lambda b: layer_acts(model, args.layer, b), "bare transformers": lambda b: bare_forward(model, args.layer, b)}
    for fn in fns.values():  # warm up
        fn(batches[0])
    torch.testing.assert_close(fns["nnsight (trsae)"](batches[0]), fns["bare transformers"](batches[0]))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():  # interleaved, so both see the same machine load
            t = time.perf_counter()
            for b in batches:
                fn(b)
            times[name].append(time.perf_counter() - t)
    n_tok = ids.numel()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:20s} {n_tok / v:9.0f} tok/s (median of {args.repeats})")
    print(f"ratio nnsight / bare = {med['bare transformers'] / med['nnsight (trsae)']:.3f}  (target >= 0.9)")


def memory(args):
    for tokens in args.mem_tokens:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-c", "import resource, sys; "
                   "from trsae.__main__ import main; rc = main(sys.argv[2:]); "
                   "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)", "trsae",
                   "harvest", "--model", args.model, "--layer", str(args.layer), "--data", "brown+sotu",
                   "--tokens", str(tokens), "--out", out, "--quiet"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            rss = [ln for ln in r.stdout.splitlines() if ln.startswith("MAXRSS")]
            print(f"--tokens {tokens:8d}: peak RSS {int(rss[0].split()[1]) / 1024:7.0f} MiB" if rss else r.stderr[-500:])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-tokens", type=int, nargs="*", default=[20_000, 80_000])
    a = p.parse_args()
    throughput(a)
    memory(a)
