"""What a feature's weights say without data: its decoder direction through the model's unembedding, its nearest
decoder neighbours, its best match in another dictionary, and a TRSAE's context and position strengths.

Shapes: F latents, D = d_model, V vocabulary, n neighbours.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from trsae.saes import SAE
from trsae.saes.trsae import TRSAEEncoder


def final_norm(hf: torch.nn.Module) -> torch.nn.Module | None:
    """The final norm before the unembedding (GPT-2's ``transformer.ln_f``, Llama / Gemma's ``model.norm``)."""
    for path in ("transformer.ln_f", "model.norm", "model.final_layernorm", "gpt_neox.final_layer_norm"):
        m = hf
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None:
            return m
    return None


@torch.no_grad()
def unembed_directions(dirs_FD: Tensor, hf: torch.nn.Module) -> Tensor:
    """Each row through the final norm and the unembedding, as the logit change it would add on its own
    [F, V]: ``lm_head(norm(d) - norm(0))`` (the norm's bias, the same for every direction, is taken out)."""
    head = hf.get_output_embeddings()
    norm = final_norm(hf)
    x = dirs_FD.to(head.weight.dtype)
    if norm is not None:
        x = norm(x) - norm(torch.zeros_like(x[:1]))
    return x @ head.weight.T


@torch.no_grad()
def logit_extremes(W_dec_FD: Tensor, hf: torch.nn.Module, n: int = 10,
                   chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top ids [F, n], their logits, bottom ids [F, n], their logits) of `unembed_directions`, in chunks of
    latents so that [chunk, V] fits in memory."""
    outs = [[], [], [], []]
    for i in range(0, W_dec_FD.shape[0], chunk):
        logits = unembed_directions(W_dec_FD[i:i + chunk], hf)
        top = logits.topk(n, dim=1)
        bot = logits.topk(n, dim=1, largest=False)
        for o, t in zip(outs, (top.indices, top.values, bot.indices, bot.values)):
            o.append(t)
    return tuple(torch.cat(o) for o in outs)


def _unit(W_FD: Tensor) -> Tensor:
    return W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest(W_a_FD: Tensor, W_b_GD: Tensor | None = None, n: int = 8,
            chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(indices [F, n], cosines [F, n]) of each row of `W_a`'s `n` nearest rows of `W_b` by cosine (W_b = W_a:
    the neighbours in its own dictionary, itself excluded)."""
    same = W_b_GD is None
    A, B = _unit(W_a_FD.float()), _unit((W_a_FD if same else W_b_GD).float())
    n = min(n, B.shape[0] - int(same))
    idx, val = [], []
    for i in range(0, A.shape[0], chunk):
        cos = A[i:i + chunk] @ B.T
        if same:
            r = torch.arange(cos.shape[0])
            cos[r, r + i] = -float("inf")
        top = cos.topk(n, dim=1)
        idx.append(top.indices)
        val.append(top.values)
    return torch.cat(idx), torch.cat(val)


@torch.no_grad()
def strengths(sae: SAE) -> tuple[np.ndarray, np.ndarray] | None:
    """TRSAE only: (context strength ``g_f ||U_f||``, positional strength ``max_b |P[f, b]|``), each divided by
    the token strength ``||W_enc[:, f]||`` [F]; None for a per-token SAE."""
    enc = sae.encoder
    if not isinstance(enc, TRSAEEncoder):
        return None
    tok = enc.token_strength().clamp_min(1e-12)
    ctx = enc.context_strength() / tok
    pos = enc.P.abs().max(dim=1).values / tok if enc.cfg.use_pos else torch.zeros_like(tok)
    return ctx.numpy(), pos.numpy()
