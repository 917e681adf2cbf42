"""This project's core metrics against SAELens's own evaluation code on the same SAE and the same tokens.

A TopK and a JumpReLU SAE, trained briefly (30 steps) on a store of the tiny GPT-2's layer 1 (the tiny store's
recipe, from the tiny GPT-2 with its final LayerNorm gain ×30, so that its next-token distributions are not
nearly uniform and the CE-loss score is well conditioned), are exported to the SAELens format
(`trsae.interchange.export_saelens`) and loaded with ``sae_lens.SAE.load_from_disk``; that model becomes a
transformer_lens ``HookedTransformer`` with its own weights (transformer_lens's ``convert_gpt2_weights``, no
LayerNorm folding, no centring: its logits equal the transformers model's, which is checked first). Then
`trsae.evaluate.evaluate_saes` and SAELens's ``run_evals`` (``sae_lens/evals.py``: its
``get_sparsity_and_variance_metrics``, ``get_downstream_reconstruction_metrics`` and ``get_recons_loss``;
``ExplainedVarianceCalculator`` for the pooled explained variance) score the same sequences in the same
batches, and every metric both compute must agree within 1e-3 (absolute; relative for the metrics that carry
the activations' scale: MSE, the summed squared error, L1 and the L2 norms). Compared: explained variance
(pooled and legacy per-token), MSE (both conventions), cosine, L0, L1, L2 norms and ratio, CE without / with
the SAE / zero-ablated and the CE-loss score, KL with the SAE / zero-ablated and the KL-div score.

Checked against sae-lens 6.54.12 with transformer-lens 3.9.0 (the versions the ``saelens`` extra installs).

Definitions that differ, and how the inputs are aligned (neither implementation is changed):

1. Which tokens are special. SAELens's default (``exclude_special_tokens=True``) drops only the tokenizer's
   structural ids (BOS, EOS, PAD, SEP, decoder start); this project drops ``tokenizer.all_special_ids`` (the
   store's ``special_ids``). SAELens is passed the store's ``special_ids`` as ``exclude_special_tokens``.
2. Which positions score cross-entropy. SAELens drops a position when the token it *reads* is special; this
   project also when the token it *predicts* is (`trsae.metrics.next_token_targets`). The two agree when no
   special token follows position 0, which is how stores build sequences (BOS, then text); asserted.
3. Which positions score KL. SAELens's KL has no next token to wait for, so it also scores each sequence's last
   position; this project scores KL on the cross-entropy positions. SAELens's KL is therefore taken from a
   second ``run_evals`` on the same sequences without their last token (a causal model's logits at the other
   positions do not change), which scores exactly this project's KL positions.
4. ``mse``: SAELens's is the squared error summed over dimensions and averaged over tokens, this project's
   ``sse_per_token``; this project's ``mse`` is that divided by ``d``. Both are compared.
5. Activations. SAELens reads the layer output live from the HookedTransformer (``run_with_cache``); this
   project's reconstruction metrics read the store (harvested through transformers/nnsight, float32). The
   two differ by float rounding only (checked below for the tiny model).
6. Scales. SAELens's SAE gets raw activations (the export folds the store's ``norm_scale`` into the weights,
   ``normalize_activations="none"``), with an identity ``ActivationScaler``; codes and reconstructions are
   those of our SAE.
7. Batching. ``explained_variance_legacy`` uses each batch's own mean, so SAELens's batches are this
   project's: a stand-in for its ``ActivationsStore`` hands out the store's sequences in `evaluate_saes`'s order
   and batch size (``get_batch_tokens``, ``reset_input_dataset``).
8. The hook. `export_saelens` writes ``model_name``, ``hook_name`` (here ``blocks.{layer}.hook_resid_post``)
   and ``sae_lens_version`` under ``metadata``; without the version sae-lens 6.54.12 read the ``cfg.json`` as a
   pre-6.0 config and dropped ``metadata`` (this check found that), so the loaded SAE must carry the hook.
9. Not compared: ``relative_reconstruction_bias`` (SAELens averages per-batch ratios, this project pools; the
   two are equal for one batch only); mean ablation (SAELens ablates with zeros only); dead / dense latents
   (this project counts them on a separate train-split pass).
"""

from __future__ import annotations

import math
import os
from importlib.metadata import version

import pytest
import torch

if os.environ.get("CI"):  # CI installs the extra: a missing package there is a failure, not a skip
    import sae_lens  # noqa: F401
else:
    pytest.importorskip("sae_lens", reason="the optional extra: pip install -e '.[saelens]'")

TOL = 1e-3
SCALED = {"mse", "sse_per_token", "l1", "l2_norm_in", "l2_norm_out"}  # tolerance relative to the value


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"  # the residual stream after block `layer`: trsae.lm's layer output


def hooked_transformer(model, n_ctx: int):
    """transformer_lens's ``HookedTransformer`` holding ``model``'s own weights (a `trsae.lm.LoadedModel`),
    converted by transformer_lens's converters, with no LayerNorm folding, centring or value-bias folding, so
    that its ``hook_resid_post`` equals our layer output and its logits the transformers model's. No hub
    access: GPT-2's config is built from the model's, Gemma 3's comes from transformer_lens's own table."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    arch = model.hf.config.architectures[0] if model.hf.config.architectures else type(model.hf).__name__
    if arch == "GPT2LMHeadModel":
        from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights as convert

        c = model.hf.config
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=min(n_ctx, c.n_positions), d_vocab=c.vocab_size,
            act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
            positional_embedding_type="standard", original_architecture=arch, default_prepend_bos=False)
    elif arch == "Gemma3ForCausalLM" and model.name == "gemma-3-270m":
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config
        from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights as convert

        cfg = get_pretrained_model_config("google/gemma-3-270m", fold_ln=False, n_ctx=n_ctx,
                                          default_prepend_bos=False)
        c = model.hf.config
        assert (cfg.d_model, cfg.n_layers, cfg.d_vocab) == (c.hidden_size, c.num_hidden_layers, c.vocab_size)
    else:
        raise NotImplementedError(f"no transformer_lens conversion for {model.name} ({arch})")
    cfg.tokenizer_name = None  # the tokenizer would come from the hub; SAELens gets the special ids directly
    tl = HookedTransformer(cfg, move_to_device=False)
    tl.load_and_process_state_dict(convert(model.hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval().requires_grad_(False)


class TokenBatches:
    """What SAELens's eval functions use of an ``ActivationsStore``: the given token batches, in order."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.i = batches, 0
        self.store_batch_size_prompts = batches[0].shape[0]
        self.context_size = batches[0].shape[1]

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        b = self.batches[self.i]
        assert b.shape[0] == n, "SAELens asked for another batch size than the store's batches"
        self.i += 1
        return b

    def reset_input_dataset(self) -> None:
        self.i = 0


def eval_batches(store, split: str, max_seqs: int, batch_size: int) -> list[torch.Tensor]:
    """The token batches `evaluate_saes` scores (same order, same batch size), checking alignment 2."""
    out, n = [], 0
    for b in store.batches(split, batch_size=batch_size, shuffle=None, epochs=1, drop_last=False):
        if n >= max_seqs:
            break
        out.append(b.ids_BT)
        n += b.ids_BT.shape[0]
    if len({b.shape for b in out}) != 1:
        raise ValueError("use a max_seqs that the batch size divides (SAELens asks for full batches)")
    special = torch.tensor(store.manifest["special_ids"])
    for ids in out:
        if torch.isin(ids[:, 1:], special).any():
            raise ValueError("a special token after position 0: SAELens would score CE positions we do not")
    return out


@torch.no_grad()
def saelens_metrics(sae_dir, tl, batches: list[torch.Tensor], special_ids, hook: str) -> dict[str, float]:
    """SAELens's ``run_evals`` on ``batches``: everything from the whole sequences, KL (alignment 3) from the
    sequences without their last token. Returns SAELens's names, flattened. The export must name ``hook``
    (alignment 8)."""
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    import trsae.saelens  # noqa: F401  (the TRSAE's architecture, registered with SAELens)

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    assert sae.cfg.metadata.hook_name == hook, "the export's hook_name did not reach SAELens (alignment 8)"
    n, bs = len(batches), batches[0].shape[0]
    common = dict(batch_size_prompts=bs, n_eval_reconstruction_batches=n, n_eval_sparsity_variance_batches=n,
                  library_version=version("sae-lens"), git_hash="n/a")
    full, _ = run_evals(sae, TokenBatches(batches), tl, ActivationScaler(),
                        EvalConfig(compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                                   compute_variance_metrics=True, **common),
                        exclude_special_tokens=list(special_ids))
    short, _ = run_evals(sae, TokenBatches([b[:, :-1] for b in batches]), tl, ActivationScaler(),
                         EvalConfig(compute_kl=True, **common), exclude_special_tokens=list(special_ids))
    out = {}
    for section in ("model_performance_preservation", "reconstruction_quality", "shrinkage", "sparsity"):
        out |= full[section]
    out |= short["model_behavior_preservation"]
    return out


def comparison_rows(ours: dict, theirs: dict, d: int) -> list[tuple[str, float, float, float]]:
    """``(metric, ours, SAELens, tolerance)`` for every metric both define the same way (see the docstring)."""
    rq, mpp, mbp = ours["reconstruction_quality"], ours["model_performance_preservation"], \
        ours["model_behavior_preservation"]
    pairs = [
        ("explained_variance", rq["explained_variance"], theirs["explained_variance"]),
        ("explained_variance_legacy", rq["explained_variance_legacy"], theirs["explained_variance_legacy"]),
        ("mse", rq["mse"], theirs["mse"] / d),
        ("sse_per_token", rq["sse_per_token"], theirs["mse"]),
        ("cossim", rq["cossim"], theirs["cossim"]),
        ("l0", ours["sparsity"]["l0"], theirs["l0"]),
        ("l1", ours["sparsity"]["l1"], theirs["l1"]),
        ("l2_norm_in", ours["shrinkage"]["l2_norm_in"], theirs["l2_norm_in"]),
        ("l2_norm_out", ours["shrinkage"]["l2_norm_out"], theirs["l2_norm_out"]),
        ("l2_ratio", ours["shrinkage"]["l2_ratio"], theirs["l2_ratio"]),
        ("ce_loss_without_sae", mpp["ce_loss_without_sae"], theirs["ce_loss_without_sae"]),
        ("ce_loss_with_sae", mpp["ce_loss_with_sae"], theirs["ce_loss_with_sae"]),
        ("ce_loss_with_ablation", mpp["ce_loss_with_ablation"], theirs["ce_loss_with_ablation"]),
        ("ce_loss_score", mpp["ce_loss_score"], theirs["ce_loss_score"]),
        ("kl_div_with_sae", mbp["kl_div_with_sae"], theirs["kl_div_with_sae"]),
        ("kl_div_with_ablation", mbp["kl_div_with_ablation"], theirs["kl_div_with_ablation"]),
        ("kl_div_score", mbp["kl_div_score"], theirs["kl_div_score"]),
    ]
    return [(k, float(a), float(b), TOL * max(1.0, abs(a)) if k in SCALED else TOL) for k, a, b in pairs]


def format_table(title: str, rows) -> str:
    lines = [title, f"{'metric':28s} {'ours':>14s} {'SAELens':>14s} {'|diff|':>10s} {'tol':>9s}"]
    for k, a, b, tol in rows:
        lines.append(f"{k:28s} {a:14.6f} {b:14.6f} {abs(a - b):10.2e} {tol:9.1e}"
                     + ("" if abs(a - b) <= tol else "  <-- DIFFERS"))
    return "\n".join(lines)


def compare(saes: dict, store, model, tl, workdir, split: str, max_seqs: int, batch_size: int,
            density_tokens: int = 1000) -> dict[str, list]:
    """Our `evaluate_saes` and SAELens's ``run_evals`` on the same batches, one row list per SAE."""
    from trsae.evaluate import evaluate_saes
    from trsae.interchange import export_saelens

    batches = eval_batches(store, split, max_seqs, batch_size)
    ours = evaluate_saes(saes, store, model, split=split, max_seqs=max_seqs, batch_size=batch_size,
                         density_tokens=density_tokens)
    rows = {}
    for name, sae in saes.items():
        d = export_saelens(sae, workdir / name, model_name=model.name, hook_name=hook_name(store.manifest["layer"]))
        theirs = saelens_metrics(d, tl, batches, store.manifest["special_ids"], hook_name(store.manifest["layer"]))
        rows[name] = comparison_rows(ours[name], theirs, store.d_model)
    return rows


# ------------------------------------------------------------------------------------------------- tests

SPLIT, MAX_SEQS, BATCH = "train", 8, 4  # 2 batches of 4 sequences of 32 tokens (the test split holds 4)
SHARPEN = 30.0


@pytest.fixture(scope="module")
def sharp_model(data_dir):
    """The tiny GPT-2 with its final LayerNorm gain multiplied by ``SHARPEN``: the random model's next-token
    distributions are otherwise nearly uniform, zero-ablating layer 1 moves CE by ~0.005 nats and the CE-loss
    score (a ratio over that gap) is float noise."""
    from trsae.lm import load_model

    m = load_model("tiny-gpt2", seed=0)
    with torch.no_grad():
        m.hf.transformer.ln_f.weight.mul_(SHARPEN)
    return m


@pytest.fixture(scope="module")
def sharp_store(sharp_model, tmp_path_factory):
    """The tiny store's recipe (40 sequences of 32 tokens of Brown, layer 1), harvested from `sharp_model`."""
    from trsae.config import HarvestConfig
    from trsae.store import harvest

    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=40 * 32, ctx_len=32, seqs_per_shard=8,
                        batch_size=4, val_frac=0.1, test_frac=0.1)
    return harvest(cfg, tmp_path_factory.mktemp("sharp_store"), model=sharp_model, progress=False)


@pytest.fixture(scope="module")
def tiny_tl(sharp_model, sharp_store):
    return hooked_transformer(sharp_model, sharp_store.ctx_len)


@pytest.fixture(scope="module")
def tiny_saes(sharp_store, tmp_path_factory):
    from trsae.config import TrainConfig
    from trsae.saes import SAEConfig
    from trsae.train import train_sae

    tcfg = TrainConfig(tokens=16 * 8 * 30, batch_size=8, crop_len=16, lr=1e-3, seed=0, checkpoint_every=1000,
                       log_every=10, dead_window_frac=0.2)
    root = tmp_path_factory.mktemp("runs")
    specs = {"topk": SAEConfig.build(sharp_store.d_model, 96, "topk", k=4),
             "jumprelu": SAEConfig.build(sharp_store.d_model, 96, "jumprelu", k=4),
             "trsae": SAEConfig.build(sharp_store.d_model, 96, "topk", "trsae", k=4, window=4)}
    return {name: train_sae(cfg, tcfg, sharp_store, root / name, progress=False).eval() for name, cfg in specs.items()}


@pytest.fixture(scope="module")
def rows(tiny_saes, sharp_store, sharp_model, tiny_tl, tmp_path_factory):
    return compare(tiny_saes, sharp_store, sharp_model, tiny_tl, tmp_path_factory.mktemp("saelens"), SPLIT,
                   MAX_SEQS, BATCH)


@torch.no_grad()
def test_hooked_transformer_is_the_tiny_model(sharp_model, sharp_store, tiny_tl):
    from trsae.lm import layer_acts

    ids = eval_batches(sharp_store, SPLIT, MAX_SEQS, BATCH)[0]
    torch.testing.assert_close(tiny_tl(ids), sharp_model.hf(ids).logits, rtol=0, atol=1e-4)
    _, cache = tiny_tl.run_with_cache(ids, names_filter=[hook_name(1)], stop_at_layer=2)
    torch.testing.assert_close(cache[hook_name(1)], layer_acts(sharp_model, 1, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "trsae"])
def test_metrics_agree_with_saelens_run_evals(rows, tiny_saes, arch):
    table = rows[arch]
    print("\n" + format_table(f"{arch} on tiny-gpt2 layer 1 ({SPLIT}, {MAX_SEQS} sequences)", table))
    got = dict((k, (a, b)) for k, a, b, _ in table)
    assert 0 < got["l0"][0] < tiny_saes[arch].cfg.width and got["explained_variance"][0] > 0.1  # non-trivial
    assert abs(got["ce_loss_with_ablation"][0] - got["ce_loss_without_sae"][0]) > 1.0  # a well-conditioned score
    bad = [f"{k}: ours {a:.6g} vs SAELens {b:.6g}" for k, a, b, tol in table
           if not (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol)]
    assert not bad, "\n".join(bad)
