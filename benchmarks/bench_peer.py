"""Our TopK trainer against SAELens's TopK SAE, on the same activations, batches and schedule, side by side.

Both train a TopK SAE of the same width and k with Adam at the same learning rate (warm-up and decay as our
trainer's) on the same sequence of batches from an activation store, for the same number of tokens; then
both are scored on the store's validation split (pooled explained variance of the reconstruction). Reported:
training tokens/s of each, the ratio, and the two explained variances. SAELens's training step is its
own ``TopKTrainingSAE.training_forward_pass`` (MSE + its AuxK loss), with the decoder re-normalised after
each step as our trainer does; the loop around it (data, optimiser, schedule) is this script's, shared by both,
so the comparison measures the SAE implementations, not two data pipelines.

    pip install -e '.[saelens]'
    python benchmarks/bench_peer.py --store outputs/stores/<gemma store> --tokens 150000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trsae.config import TrainConfig
from trsae.saes import SAEConfig, make_sae
from trsae.store import ActivationStore
from trsae.train import init_b_dec_, lr_lambda, train_step


def _batches(store: ActivationStore, cfg: TrainConfig, n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, b in enumerate(store.batches("train", batch_size=cfg.batch_size, crop_len=cfg.crop_len,
                                        shuffle=cfg.shuffle, seed=cfg.seed)):
        if i >= n_steps:
            break
        out.append((b.acts_BTD, b.mask_BT))
    return out


def _ours(store, cfg, width, k, batches):
    sae = make_sae(SAEConfig.build(store.d_model, width, "topk", k=k, seed=cfg.seed))
    init_b_dec_(sae, store, cfg)
    sae.normalize_decoder_()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, len(batches), cfg.warmup_frac,
                                                                        cfg.decay_frac))
    dead = torch.zeros(width, dtype=torch.bool)
    t = time.perf_counter()
    for x_BTD, mask_BT in batches:
        train_step(sae, opt, x_BTD, mask_BT, dead_F=dead)
        sched.step()
    return time.perf_counter() - t, lambda x: sae.decode(sae.encode(x[None]))[0]


def _saelens(store, cfg, width, k, batches, b_dec):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(cfg.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=store.d_model, d_sae=width, k=k,
                                                rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1 / 32))
    with torch.no_grad():  # the same start as ours: unit decoder rows, W_enc = W_dec^T, b_dec at the data mean
        sae.b_dec.copy_(b_dec)
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, len(batches), cfg.warmup_frac,
                                                                        cfg.decay_frac))
    dead = torch.zeros(width, dtype=torch.bool)
    t = time.perf_counter()
    for i, (x_BTD, mask_BT) in enumerate(batches):
        x_ND = x_BTD[mask_BT]
        out = sae.training_forward_pass(TrainStepInput(sae_in=x_ND, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=i, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return time.perf_counter() - t, lambda x: sae.decode(sae.encode(x))


@torch.no_grad()
def _explained_variance(store, recon, max_batches: int = 16) -> float:
    rows = []
    for i, b in enumerate(store.batches("val", batch_size=4, shuffle=None, epochs=1)):
        if i >= max_batches:
            break
        for x_TD, m_T in zip(b.acts_BTD, b.mask_BT):
            rows.append((x_TD[m_T], recon(x_TD)[m_T]))
    x = torch.cat([r[0] for r in rows])
    xh = torch.cat([r[1] for r in rows])
    err = (x - xh).pow(2).sum()
    tot = (x - x.mean(0)).pow(2).sum()
    return float(1 - err / tot)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--width-mult", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=150_000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of both trainings; medians")
    a = p.parse_args()
    store = ActivationStore(a.store)
    cfg = TrainConfig(tokens=a.tokens, batch_size=a.batch_size, crop_len=store.ctx_len, lr=a.lr)
    width = a.width_mult * store.d_model
    batches = _batches(store, cfg, max(1, cfg.tokens // (cfg.batch_size * cfg.crop_len)))
    n_tok = sum(int(m.sum()) for _, m in batches)
    probe = make_sae(SAEConfig.build(store.d_model, 8, "topk", k=1))
    init_b_dec_(probe, store, cfg)
    times = {"trsae": [], "sae_lens": []}
    for _ in range(a.repeats):
        t_ours, rec_ours = _ours(store, cfg, width, a.k, batches)
        t_sl, rec_sl = _saelens(store, cfg, width, a.k, batches, probe.b_dec.detach())
        times["trsae"].append(t_ours)
        times["sae_lens"].append(t_sl)
    t_ours, t_sl = statistics.median(times["trsae"]), statistics.median(times["sae_lens"])
    ev_ours, ev_sl = _explained_variance(store, rec_ours), _explained_variance(store, rec_sl)
    print(f"store {store.manifest['model']} L{store.manifest['layer']}, d={store.d_model}, F={width}, k={a.k}, "
          f"{len(batches)} steps, {n_tok} training tokens, {torch.get_num_threads()} threads")
    print(f"trsae    : {n_tok / t_ours:8.0f} tok/s  explained variance (val) {ev_ours:.4f}")
    print(f"sae_lens : {n_tok / t_sl:8.0f} tok/s  explained variance (val) {ev_sl:.4f}")
    print(f"speed ratio trsae / sae_lens: {t_sl / t_ours:.2f}x")


if __name__ == "__main__":
    main()
