"""Sparse autoencoders over ``[B, T, d]`` activations: one SAE class composed of an encoder part and a sparsity
part, each registered by name. Pure torch (+ safetensors, json): this package never imports the model, data or
store layers.

Shapes are in variable names: B batch, T time, D = d_in, F = width (latents), N = B*T flattened tokens,
M = number of active (token, latent) pairs. `mask_BT` is a bool mask, False on BOS / special tokens, which never
enter a loss or a statistic; `pos_BT` holds absolute positions (per-token encoders ignore it).

    config.py      SAEConfig and the part registry
    sparse_ops.py  pair selection, sparse backward, pair decoding
    encoders.py    the per-token encoder ("token")
    context.py     position buckets, windowed linear attention
    temporal.py    the TRSAE encoder ("trsae"), with its optional selective temporal decoder (pred_k)
    tsae.py        the T-SAE encoder ("tsae": per-token, plus a contrastive loss on adjacent codes)
    tfa.py         the TFA encoder ("tfa": attention over earlier codes predicts part of the code)
    sparsity.py    ReLU + L1 ("relu"), TopK ("topk"), BatchTopK ("batchtopk")
    jumprelu.py    JumpReLU ("jumprelu")
    matryoshka.py  Matryoshka BatchTopK ("matryoshka")
    sae.py         the SAE, save / load
"""

from trsae.saes.config import SAEConfig, part_names  # noqa: F401
from trsae.saes.encoders import TokenEncoder, TokenEncoderConfig  # noqa: F401
from trsae.saes.sparsity import (BatchTopK, BatchTopKConfig, ReLUConfig, ReLUL1, TopK, TopKConfig)  # noqa: F401
from trsae.saes.trsae import TRSAEEncoder, TRSAEEncoderConfig  # noqa: F401
from trsae.saes.tsae import TSAEEncoder, TSAEEncoderConfig  # noqa: F401
from trsae.saes.tfa import TFAEncoder, TFAEncoderConfig  # noqa: F401
from trsae.saes.jumprelu import JumpReLU, JumpReLUConfig  # noqa: F401
from trsae.saes.matryoshka import Matryoshka, MatryoshkaConfig  # noqa: F401
from trsae.saes.sae import SAE, ForwardOutput, load_sae, make_sae  # noqa: F401
