"""Typed, self-checking configurations for each stage (parameter files: `trsae.params`).

Imports nothing of trsae. Every dataclass validates itself in ``__post_init__`` and raises a ``ValueError``
that says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Root of the project's caches (converted models, downloaded data): ``$TRSAE_CACHE`` or ``~/.cache/trsae``."""
    return Path(os.environ.get("TRSAE_CACHE", Path.home() / ".cache" / "trsae"))


def figures_path(figures_dir: str) -> Path:
    """The figures folder, created: ``$TRSAE_FIGURES_DIR`` overrides the notebook's parameter (the test suite
    sets it so that a smoke run never overwrites the paper's figures)."""
    figures = Path(os.environ.get("TRSAE_FIGURES_DIR", figures_dir))
    figures.mkdir(parents=True, exist_ok=True)
    return figures


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dataclasses are converted first)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


STORE_DTYPES = ("float32", "bfloat16", "float64")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
"""Dtypes a model can run in while harvesting (`HarvestConfig.model_dtype`)."""
AMP_DTYPES = ("bfloat16",)
"""Mixed-precision dtypes the trainer accepts (`TrainConfig.amp`)."""


def check_device(device: str) -> None:
    """Refuse a device name that is neither ``cpu`` nor ``cuda`` / ``cuda:N`` (whether it can run here is
    `trsae.device.resolve`'s question, asked when the work starts)."""
    kind, colon, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


SITES = ("resid_post", "attn_out", "mlp_out")
"""Hook sites of a decoder block a store can hold (`trsae.lm` says what each is in each model family)."""


def compute_dtype(store_dtype: str) -> str:
    """The dtype a store of ``store_dtype`` is computed and read in: float64 for a float64 store, else float32."""
    return "float64" if store_dtype == "float64" else "float32"


@dataclass
class HarvestConfig:
    """What to harvest: which model, layer and text, how many tokens, and how to store them."""

    model: str = "gemma-3-270m"
    """A name of `trsae.lm.MODELS`, a hub id (``org/name``) or a local transformers folder, of a supported family."""
    layer: int = 6
    """Decoder block (0-based) whose ``site`` is read."""
    site: str = "resid_post"
    """``resid_post`` (the residual stream after the block, ``hidden_states[layer + 1]``), ``attn_out`` or
    ``mlp_out`` (what the block's attention or MLP adds to the residual stream; see `trsae.lm`)."""
    data: str = "brown+sotu"
    """Text sources joined by ``+`` (see `trsae.data`)."""
    tokens: int = 200_000
    """Tokens to harvest (rounded up to whole contexts)."""
    ctx_len: int = 128
    """Context length T, BOS included."""
    seqs_per_shard: int = 64
    """Sequences per shard file; a shard is the unit of resume."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: str = "float32"
    """Storage dtype: float32, bfloat16 or float64. A float64 store is computed in float64 end to end (the model's
    forward, and the SAEs trained and evaluated on it): its results then agree across CPUs whose kernels sum in
    other orders (the notebooks' smoke defaults, checked by nbval on any machine); float32 is for the profiles."""
    val_frac: float = 0.05
    test_frac: float = 0.05
    split_seed: int = 0
    """Seed of the permutation that assigns sequences to train / val / test."""
    device: str = "cpu"
    """Where the model runs: ``cpu``, ``cuda`` or ``cuda:N`` (`trsae.device`); the store is written from the CPU."""
    model_dtype: str | None = None
    """The dtype the model runs in, where it differs from the one the store is computed in (float64 for a float64
    store, else float32), e.g. ``bfloat16`` on a GPU; the activations are stored in ``dtype``."""

    def __post_init__(self) -> None:
        for name in ("tokens", "ctx_len", "seqs_per_shard", "batch_size"):
            _positive(name, getattr(self, name))
        if self.ctx_len < 2:
            raise ValueError(f"ctx_len must be at least 2 (BOS plus one token), got {self.ctx_len}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        check_device(self.device)
        if self.model_dtype is not None and self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be None or one of {', '.join(MODEL_DTYPES)}, got {self.model_dtype!r}")
        if self.model_dtype is not None and self.dtype == "float64" and self.model_dtype != "float64":
            raise ValueError("a float64 store is computed in float64 end to end; leave model_dtype unset")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"val_frac and test_frac must be in [0, 1) and sum below 1, "
                             f"got {self.val_frac}, {self.test_frac}")

    @property
    def n_seq(self) -> int:
        """Number of contexts: tokens / ctx_len, rounded up."""
        return -(-self.tokens // self.ctx_len)


@dataclass
class TrainConfig:
    """How to train one SAE on a store (the SAE's own config lives with the SAE in `trsae.saes`)."""

    tokens: int = 1_000_000
    """Training tokens (valid tokens seen are slightly fewer: BOS is masked)."""
    batch_size: int = 32
    """Training crops per batch."""
    crop_len: int = 128
    """Tokens per training crop (a run of consecutive tokens of one stored sequence); must divide the store's
    context length. Not the TRSAE attention window, which is `TRSAEEncoderConfig.window`."""
    context: int = 0
    """Tokens before each crop that an encoder reading context (a TRSAE, TFA, T-SAE's pairs) sees as a left
    margin, so that a crop's first tokens still have their window; the margin is not trained on or counted, and a
    per-token SAE never reads it. At most the store's context length minus `crop_len`."""
    shuffle: str = "crop"
    """Shuffle whole crops ("crop") or whole sequences ("sequence"); never single tokens."""
    lr: float = 4e-4
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    """Linear decay to zero over the last ``decay_frac`` of training."""
    seed: int = 0
    dead_window_frac: float = 0.1
    """A latent that has not fired in the last ``max(1, round(dead_window_frac * steps))`` training steps is dead
    and feeds the AuxK loss: SAELens's ``dead_feature_window`` (in steps), scaled with the run so that it acts
    in short runs too (a fixed 200k-token window never opened in a 300-step run)."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    log_every: int = 20
    device: str = "cpu"
    """Where the SAE trains: ``cpu``, ``cuda`` or ``cuda:N`` (`trsae.device`; under torchrun ``cuda`` is each
    process's own GPU)."""
    amp: str | None = None
    """Mixed precision: None, or ``bfloat16`` (the forward under `torch.autocast`; parameters, optimiser state
    and gradients stay in the store's dtype)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "crop_len", "lr", "checkpoint_every", "log_every"):
            _positive(name, getattr(self, name))
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"context must be an int >= 0, got {self.context!r}")
        check_device(self.device)
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if not 0 < self.dead_window_frac <= 1:
            raise ValueError(f"dead_window_frac must be in (0, 1], got {self.dead_window_frac}")
        if self.shuffle not in ("crop", "sequence"):
            raise ValueError(f"shuffle must be 'crop' or 'sequence', got {self.shuffle!r}")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.decay_frac <= 1 and self.warmup_frac + self.decay_frac <= 1):
            raise ValueError("warmup_frac and decay_frac must be fractions that sum to at most 1")


def train_identity(cfg: TrainConfig) -> dict:
    """The fields of a `TrainConfig` that determine what a run computes (its run folder's name and run.json): all
    but the device it runs on (like the thread count, a matter of where), and ``amp`` only when set, so that a
    run's identity is the one it had before runs could leave the CPU."""
    d = dataclasses.asdict(cfg)
    d.pop("device")
    if d["amp"] is None:
        d.pop("amp")
    return d


# --------------------------------------------------------------------------------------------- command line


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases), whitespace-collapsed."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def add_config_arguments(parser: Any, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Add ``--field-name`` options for the fields of dataclass `cls`, typed and documented from the dataclass,
    whose defaults stay the dataclass's own: an option not given is absent from the parsed namespace
    (``argparse.SUPPRESS``). Options already on the parser are left alone. Returns the field names added."""
    return add_parts_arguments(parser, {"": cls}, skip)


def add_parts_arguments(parser: Any, classes: dict[str, type], skip: tuple[str, ...] = ()) -> list[str]:
    """`add_config_arguments` for several dataclasses at once (the parts a command combines, by label): one option
    per field name; where parts share a name, its help gives each part's docstring and default
    (``[trsae] ... (default: 0); [tfa] ... (default: None)``), since each part keeps its own default."""
    import argparse
    import typing

    have = {s for a in parser._actions for s in a.option_strings}
    fields: dict[str, list[tuple[str, Any, str, Any]]] = {}
    for label, cls in classes.items():
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            fields.setdefault(f.name, []).append((label, hints[f.name], docs.get(f.name, ""), default))
    added = []
    for name, entries in fields.items():
        opt = "--" + name.replace("_", "-")
        if name in skip or opt in have:
            continue
        args = [a for a in typing.get_args(entries[0][1]) if a is not type(None)]
        kind = args[0] if args else entries[0][1]
        if len(entries) == 1:
            text = f"{entries[0][2]} (default: {entries[0][3]})".strip()
        else:
            text = "; ".join(f"[{label}] " + f"{doc} (default: {default})".strip()
                             for label, _, doc, default in entries)
        text = text.replace("%", "%%")
        if kind is bool:
            parser.add_argument(opt, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(opt, type=kind, default=argparse.SUPPRESS, help=text, metavar=name.upper())
        added.append(name)
    return added


def given(ns: Any, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The options of `names` that were given on the command line."""
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}
