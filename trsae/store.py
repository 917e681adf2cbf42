"""Harvest a hook site of a layer (the residual stream after it, or what its attention or MLP adds) into a
sequence-preserving activation store, and stream training crops from it. One forward pass can write the stores of
several layers and sites at once (`harvest_sites`).

On disk (one folder)::

    manifest.json               model, layer, site, data, ctx_len, dtype, d_model, split, norm_scale, token counts,
                                config hash, the thread count the forwards run on (a resume keeps it), and one
                                entry (file, n_seq, sha256) per finished shard
    shard_00000.safetensors     acts [n_seq, T, d] (float32, bfloat16 or float64) and ids [n_seq, T] (int32)

Sequences stay whole. Shards and the manifest are written to a temporary file and renamed, so a reader
never sees a partial file; the manifest lists only finished shards, so an interrupted harvest resumes at
the first missing one. Sequences (not tokens) are split into train / val / test by a seeded permutation.
Batches are crops of consecutive tokens of one sequence, shuffled by crop or by sequence within a
bounded buffer of shards; BOS and other special tokens are masked out (``mask_BT`` is False there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as tnf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from trsae.config import HarvestConfig, compute_dtype, config_hash
from trsae.data import iter_mixed_documents, make_contexts
from trsae.device import resolve
from trsae.dist import Ranks
from trsae.io import atomic_path, atomic_write_json, folder_lock
from trsae.lm import LoadedModel, fixed_threads, load_model, site_acts
from trsae.timing import phase

MANIFEST = "manifest.json"
STORE_FORMAT = 1
"""The manifest's ``format``: a store of another format is refused with a clear message, not misread."""
SPLITS = ("train", "val", "test")


class StoreError(RuntimeError):
    """A store is missing, incomplete, corrupted, or was built for something else."""


class Batch(NamedTuple):
    """A batch of crops: ``B`` crops of ``T`` consecutive tokens, each from one sequence (with a left margin of
    context tokens when `ActivationStore.batches` is asked for one)."""

    acts_BTD: torch.Tensor
    """Activations in the store's `ActivationStore.dtype`, multiplied by its normalisation scalar (E‖x‖² = d on
    train)."""
    mask_BT: torch.Tensor
    """True on ordinary tokens; False on BOS and other special tokens (never trained on or scored)."""
    pos_BT: torch.Tensor
    """Absolute position of each token in its sequence."""
    ids_BT: torch.Tensor
    """Token ids."""
    seq_B: torch.Tensor
    """Global sequence index of each crop."""
    ctx_BT: torch.Tensor
    """True on the ordinary tokens a temporal encoder may read as context: `mask_BT`'s and, in a crop's left
    margin, the ordinary tokens there (which `mask_BT` leaves out: they are read, not trained on or scored)."""

    def without_margin(self, context: int) -> "Batch":
        """The crops alone: the first ``context`` tokens (the margin) cut off."""
        return Batch(*(t[:, context:] if t.dim() > 1 else t for t in self))


# --- atomic file writes -------------------------------------------------------------------------------

def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; return the file's SHA-256."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    return digest


# --- harvest ------------------------------------------------------------------------------------------

def store_identity(cfg: HarvestConfig) -> dict:
    """The fields that determine a store's content (batch size and the model's device do not; the model's dtype does
    where it is set). A ``resid_post`` store's identity is the one it had before stores held other sites, so its
    stores stay valid."""
    d = dataclasses.asdict(cfg)
    d.pop("batch_size")
    d.pop("device")
    if d["model_dtype"] is None:
        d.pop("model_dtype")
    if d["site"] == "resid_post":
        d.pop("site")
    return d


def split_assignment(n_seq: int, val_frac: float, test_frac: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted global sequence indices of each split, from a seeded permutation of all sequences."""
    perm = np.random.default_rng(seed).permutation(n_seq)
    n_test, n_val = int(round(n_seq * test_frac)), int(round(n_seq * val_frac))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def harvest(cfg: HarvestConfig, out: str | os.PathLike, model: LoadedModel | None = None,
            data_dir: str | os.PathLike | None = None, progress: bool = True,
            max_shards: int | None = None) -> "ActivationStore":
    """Harvest ``cfg`` into the folder ``out``, resuming a partial store there; return the finished store.

    ``max_shards`` stops after writing that many new shards (the store stays partial; rerun to resume).
    Under ``torchrun`` rank r harvests shards r, r + N, ...: each writes its shards and leaves their manifest
    entries in side files, which rank 0 lists in the manifest in order at the end (and any later run, on
    any number of ranks, at its start), so one store results and an interrupted harvest resumes.
    Another process writing ``out`` meanwhile makes this raise `trsae.io.FolderBusyError` at once.
    """
    return harvest_sites([cfg], [out], model, data_dir, progress, max_shards)[0]


def harvest_sites(cfgs: list[HarvestConfig], outs: list[str | os.PathLike], model: LoadedModel | None = None,
                  data_dir: str | os.PathLike | None = None, progress: bool = True,
                  max_shards: int | None = None) -> list["ActivationStore"]:
    """`harvest` several layers and sites of one model over the same text in one forward pass per batch: ``cfgs``
    may differ only in ``layer``, ``site`` and ``batch_size`` (the forwards take one of theirs); store i goes
    to ``outs[i]``. Each store is what `harvest` of its config alone writes (bit for bit at the same batch size and
    thread count), resumes on its own, and a shard every store already holds costs no forward. ``max_shards``
    counts forward passes over a shard's sequences."""
    if len(cfgs) != len(outs) or not cfgs:
        raise ValueError(f"need one output folder per config, got {len(cfgs)} configs and {len(outs)} folders")

    def shared(c: HarvestConfig) -> dict:  # what the stores of one harvest share: all but the layer and site
        return store_identity(dataclasses.replace(c, layer=0, site="resid_post")) | {"device": c.device}

    if any(shared(c) != shared(cfgs[0]) for c in cfgs):
        raise ValueError("the configs of one harvest may differ only in layer, site and batch_size: they share "
                         "the forward passes over the same text")
    if len({Path(o).resolve() for o in outs}) != len(outs):
        raise ValueError("each store needs its own output folder")
    if model is None:
        resolve(cfgs[0].device)  # a device that cannot run here is refused before any folder is touched
    with contextlib.ExitStack() as locks:
        if Ranks.current().main:  # rank 0 speaks for its job
            for o in outs:
                locks.enter_context(folder_lock(o))
        return _harvest([_Target(c, Path(o)) for c, o in zip(cfgs, outs)], model, data_dir, progress, max_shards)


@dataclasses.dataclass
class _Target:
    """One store of a harvest: its config, folder, (on rank 0) its manifest as written so far, and the thread count
    its forwards run on (the one its harvest began with, so that a resumed store is bitwise the uninterrupted one)."""

    cfg: HarvestConfig
    out: Path
    manifest: dict | None = None
    threads: int = 0

    @property
    def man_path(self) -> Path:
        return self.out / MANIFEST

    def open(self) -> bool:
        """Check a manifest already in the folder against the config; True when that store is complete."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.man_path.exists():
            return False
        self.manifest = _read_manifest(self.out)
        if self.manifest["config_hash"] != config_hash(store_identity(self.cfg)):
            raise StoreError(f"{self.out} holds a store built with another configuration "
                             f"({self.manifest['config']}); choose another output folder or delete it")
        return self.manifest["complete"]


def _harvest(targets: list[_Target], model: LoadedModel | None, data_dir: str | os.PathLike | None,
             progress: bool, max_shards: int | None) -> list["ActivationStore"]:
    ranks = Ranks.current()
    left = [t for t in targets if not t.open()]
    if not left:
        return [ActivationStore(t.out) for t in targets]
    cfg = left[0].cfg  # what the targets share: model, text, contexts, splits, dtypes, device
    compute = getattr(torch, compute_dtype(cfg.dtype))
    runs_in = getattr(torch, cfg.model_dtype) if cfg.model_dtype else compute
    model = model or load_model(cfg.model, device=str(resolve(cfg.device)), dtype=runs_in, data_dir=data_dir)
    if model.name != cfg.model:
        raise StoreError(f"harvest config names {cfg.model!r} but the model passed is {model.name!r}")
    if model.dtype != runs_in:
        why = ("a float64 store is computed in float64 end to end" if cfg.dtype == "float64" else
               f"its model_dtype is {cfg.model_dtype}" if cfg.model_dtype else f"a {cfg.dtype} store is computed in it")
        raise StoreError(f"this store's model runs in {runs_in} ({why}), but the model passed runs in {model.dtype}; "
                         f"pass load_model({cfg.model!r}, dtype={runs_in}) or none")
    for t in left:
        model.check_layer(t.cfg.layer)
    ids_NT = make_contexts(model.tokenizer, iter_mixed_documents(cfg.data, data_dir), cfg.ctx_len, cfg.n_seq,
                           model.bos_id)
    splits = split_assignment(cfg.n_seq, cfg.val_frac, cfg.test_frac, cfg.split_seed)
    is_train = torch.zeros(cfg.n_seq, dtype=torch.bool)
    is_train[torch.from_numpy(splits["train"])] = True
    if ranks.main:
        for t in left:
            if t.manifest is None:
                t.manifest = _new_manifest(t.cfg, model, splits)
                atomic_write_json(t.man_path, t.manifest)
            _absorb_entries(t.out, t.manifest, t.man_path)
    ranks.barrier()
    n_shards = -(-cfg.n_seq // cfg.seqs_per_shard)
    todo: dict[int, list[_Target]] = {}  # shard -> the stores that still need it
    for t in left:
        on_disk = t.manifest if ranks.main else _read_manifest(t.out)
        t.threads = on_disk.get("threads") or torch.get_num_threads()
        for s in range(len(on_disk["shards"]), n_shards):
            if s % ranks.world == ranks.rank and not _entry_path(t.out, s).exists():
                todo.setdefault(s, []).append(t)
    shards = sorted(todo)[:max_shards]
    sites = ", ".join(f"L{t.cfg.layer} {t.cfg.site}" for t in left)
    bar = tqdm(total=len(shards) * cfg.seqs_per_shard * cfg.ctx_len, unit="tok", unit_scale=True,
               desc=f"harvest {cfg.model} {sites}", disable=not (progress and ranks.main))
    with phase("harvest", cfg.model):
        for s in shards:
            lo, hi = s * cfg.seqs_per_shard, min(cfg.n_seq, (s + 1) * cfg.seqs_per_shard)
            valid_NT = model.special_mask(ids_NT[lo:hi]) & is_train[lo:hi, None]
            for n, group in _by_threads(todo[s]):  # one forward per thread count
                acts = _shard_acts(model, [t.cfg for t in group], ids_NT, lo, hi, compute, n, bar)
                for t, acts_NTD in zip(group, acts):
                    _write_shard(t, s, acts_NTD, ids_NT[lo:hi], valid_NT, ranks)
    bar.close()
    ranks.barrier()
    if not ranks.main:
        ranks.barrier()  # rank 0 finishes the manifests
        return [ActivationStore(t.out, allow_partial=True) for t in targets]
    for t in left:
        _absorb_entries(t.out, t.manifest, t.man_path)
        if len(t.manifest["shards"]) == n_shards:
            _complete(t.manifest, t.man_path, model.d_model, cfg.n_seq * cfg.ctx_len)
    ranks.barrier()
    return [ActivationStore(t.out, allow_partial=True) for t in targets]


def _new_manifest(cfg: HarvestConfig, model: LoadedModel, splits: dict[str, np.ndarray]) -> dict:
    ident = store_identity(cfg)
    return {
        "format": STORE_FORMAT, "config": ident, "config_hash": config_hash(ident), "model": cfg.model,
        "layer": cfg.layer, "site": cfg.site, "data": cfg.data, "ctx_len": cfg.ctx_len, "dtype": cfg.dtype,
        "d_model": model.d_model, "n_seq": cfg.n_seq, "seqs_per_shard": cfg.seqs_per_shard,
        "special_ids": list(model.special_ids), "split": {k: len(v) for k, v in splits.items()}, "shards": [],
        "complete": False, "norm_scale": None, "token_count": None, "threads": torch.get_num_threads(),
    }


def _by_threads(targets: list[_Target]) -> list[tuple[int, list[_Target]]]:
    """The stores that need a shard, grouped by the thread count their harvest began on (one forward per group)."""
    groups: dict[int, list[_Target]] = {}
    for t in targets:
        groups.setdefault(t.threads, []).append(t)
    return list(groups.items())


def _write_shard(t: _Target, s: int, acts_NTD: torch.Tensor, ids_NT: torch.Tensor, valid_NT: torch.Tensor,
                 ranks: Ranks) -> None:
    """Write shard ``s`` of store ``t`` and list it: in the manifest when it continues the manifest's run of
    shards on a single process, else in a side file that rank 0 lists later (`_absorb_entries`)."""
    sq = acts_NTD.double().pow(2).sum(-1)[valid_NT].sum().item()
    name = f"shard_{s:05d}.safetensors"
    digest = atomic_save_tensors(t.out / name, {"acts": acts_NTD.to(getattr(torch, t.cfg.dtype)),
                                                "ids": ids_NT.to(torch.int32)})
    entry = {"file": name, "n_seq": len(ids_NT), "sha256": digest, "bytes": (t.out / name).stat().st_size,
             "train_sq_norm": sq, "train_tokens": int(valid_NT.sum()), "rank": ranks.rank}
    if ranks.world == 1 and len(t.manifest["shards"]) == s:
        t.manifest["shards"].append(entry)
        atomic_write_json(t.man_path, t.manifest)
    else:  # another rank may be writing the manifest's next shard: rank 0 lists this one later
        atomic_write_json(_entry_path(t.out, s), entry)


def _shard_acts(model: LoadedModel, cfgs: list[HarvestConfig], ids_NT: torch.Tensor, lo: int, hi: int,
                compute: torch.dtype, threads: int, bar) -> list[torch.Tensor]:
    """Each config's site of sequences ``lo … hi-1``, ``batch_size`` (the first config's) at a time on ``threads``
    threads, all from the same forward passes; non-finite values are refused."""
    sites = [(c.layer, c.site) for c in cfgs]
    acts = [[] for _ in cfgs]
    step = cfgs[0].batch_size
    for b in range(lo, hi, step):
        with fixed_threads(threads):
            got = site_acts(model, sites, ids_NT[b:min(hi, b + step)])
        for c, a, a_BTD in zip(cfgs, acts, got):
            if not torch.isfinite(a_BTD).all():
                raise StoreError(f"non-finite activations from {c.model} layer {c.layer} {c.site} in sequences "
                                 f"{b}…{min(hi, b + step) - 1}; refusing to store them")
            a.append(a_BTD.to(device="cpu", dtype=compute))
        bar.update(got[0].shape[0] * got[0].shape[1])
    return [torch.cat(a) for a in acts]


def _complete(manifest: dict, man_path: Path, d_model: int, token_count: int) -> None:
    """Mark a store whose shards are all listed complete, with the input scale from its training tokens:
    ``norm_scale`` = sqrt(d / E||x||^2) over the ordinary training tokens of every shard."""
    sq = sum(sh["train_sq_norm"] for sh in manifest["shards"])
    n = sum(sh["train_tokens"] for sh in manifest["shards"])
    if n == 0:
        raise StoreError("no ordinary training tokens were harvested; ask for more tokens")
    manifest["norm_scale"] = float(np.sqrt(d_model / (sq / n)))
    manifest["mean_sq_norm"] = sq / n
    manifest["token_count"] = token_count
    manifest["complete"] = True
    atomic_write_json(man_path, manifest)


def _entry_path(out: Path, s: int) -> Path:
    """Where a shard written out of order (by another rank) leaves its manifest entry until rank 0 lists it."""
    return out / f"shard_{s:05d}.entry.json"


def _absorb_entries(out: Path, manifest: dict, man_path: Path) -> None:
    """List in the manifest every finished shard whose entry waits in a side file and that continues the
    manifest's run of consecutive shards; then delete those side files."""
    absorbed = []
    while _entry_path(out, len(manifest["shards"])).exists():
        p = _entry_path(out, len(manifest["shards"]))
        manifest["shards"].append(json.loads(p.read_text()))
        absorbed.append(p)
    if absorbed:
        atomic_write_json(man_path, manifest)
        for p in absorbed:
            p.unlink()


def _read_manifest(path: Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise StoreError(f"no activation store at {path} ({MANIFEST} missing); build one with "
                         f"`python -m trsae harvest ... --out {path}`")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{p} is not valid JSON ({e}); delete the store {path} and harvest again") from e
    version = m.get("format") if isinstance(m, dict) else None
    if version != STORE_FORMAT:
        who = "a newer" if isinstance(version, int) and version > STORE_FORMAT else "another"
        raise StoreError(f"{p}: store format {version!r} is not one this code reads ({STORE_FORMAT}); {who} "
                         f"version of trsae wrote it: harvest again into a new folder")
    missing = sorted({"config", "config_hash", "complete", "shards", "d_model", "ctx_len", "n_seq"} - set(m))
    if missing:
        raise StoreError(f"{p} is not a valid store manifest (no {', '.join(missing)}); delete the store {path} "
                         "and harvest again")
    return m


# --- reading ------------------------------------------------------------------------------------------

def _distinct_rounds(w: np.ndarray, per_seq: int, batch_size: int, first: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """The crops ``w`` (``[n_seq * per_seq, 2]``, each sequence's crops consecutive) in a random order whose
    batches — a first one of ``first`` crops (what completes the batch the previous group began), then runs of
    ``batch_size`` — each take crops of distinct sequences: every batch draws, among the sequences with crops
    left, those with the most left (ties at random), so the buffer's sequences take turns and the last batches
    are distinct too as long as ``batch_size`` sequences have crops left."""
    n_seq = len(w) // per_seq
    crops = [list(rng.permutation(per_seq)) for _ in range(n_seq)]  # each sequence's crops, in random order
    left = np.full(n_seq, per_seq)
    out, size = [], first or batch_size
    while left.sum():
        key = rng.random(n_seq) - left  # most crops left first, ties at random
        take = np.argsort(key)[:min(size, int((left > 0).sum()))]
        take = take[rng.permutation(len(take))]
        out += [s * per_seq + crops[s].pop() for s in take]
        left[take] -= 1
        size = batch_size
    return w[np.asarray(out, dtype=np.int64)]


class ActivationStore:
    """A finished (or, with ``allow_partial``, a partial) store, read shard by shard."""

    def __init__(self, path: str | os.PathLike, allow_partial: bool = False, verify: bool = True,
                 cache_shards: int = 8):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest["complete"] and not allow_partial:
            raise StoreError(f"the store at {self.path} is incomplete ({len(self.manifest['shards'])} shards "
                             f"written); rerun the same harvest command to resume it")
        self.verify = verify
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_shards
        self._token_counts: dict[str, torch.Tensor] = {}
        m = self.manifest
        self.d_model, self.ctx_len = m["d_model"], m["ctx_len"]
        self.layer, self.site = m["layer"], m.get("site", "resid_post")
        """The block and hook site (`trsae.lm`) the activations were read at; stores from before sites existed are
        ``resid_post``."""
        self.norm_scale = m["norm_scale"]
        self.dtype = getattr(torch, compute_dtype(m["dtype"]))
        """What batches are read in and SAEs on this store compute in: float64 for a float64 store, else float32."""
        self._special = torch.tensor(m["special_ids"], dtype=torch.int32)
        cfg = m["config"]
        self.splits = split_assignment(m["n_seq"], cfg["val_frac"], cfg["test_frac"], cfg["split_seed"])
        n_written = sum(sh["n_seq"] for sh in m["shards"])
        self.splits = {k: v[v < n_written] for k, v in self.splits.items()}
        for sh in m["shards"]:  # a missing or cut shard is refused now, not when a batch first reaches it
            p = self.path / sh["file"]
            if not p.is_file():
                raise StoreError(f"shard {p} listed in the manifest is missing; harvest again into a new folder")
            if "bytes" in sh and p.stat().st_size != sh["bytes"]:
                raise StoreError(f"shard {p} is truncated or altered ({p.stat().st_size} bytes, the manifest "
                                 f"says {sh['bytes']}); delete the store and harvest again")

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({self.path}, {m['model']} L{self.layer} {self.site}, {m['data']}, "
                f"{m['n_seq']}×{m['ctx_len']} tokens, d={m['d_model']}, split={m['split']})")

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``i`` (checked against the manifest's SHA-256 when ``verify``)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        entry = self.manifest["shards"][i]
        p = self.path / entry["file"]
        if not p.is_file():
            raise StoreError(f"shard {p} listed in the manifest is missing; harvest again into a new folder")
        if self.verify:
            with open(p, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != entry["sha256"]:
                    raise StoreError(f"shard {p} is corrupted or truncated (checksum mismatch); delete the "
                                     f"store and harvest again")
        try:
            t = load_file(p)
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"shard {p} cannot be read ({e}); delete the store and harvest again") from e
        if not torch.isfinite(t["acts"]).all():
            raise StoreError(f"shard {p} holds NaN or inf activations; harvest again in float32 (a bfloat16 "
                             f"store or a model run in float16 can overflow)")
        if tuple(t["acts"].shape) != (entry["n_seq"], self.ctx_len, self.d_model):
            raise StoreError(f"shard {p} has shape {tuple(t['acts'].shape)}, expected "
                             f"{(entry['n_seq'], self.ctx_len, self.d_model)}")
        self._cache[i] = t
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return t

    def _locate(self, seq: int) -> tuple[int, int]:
        per = self.manifest["seqs_per_shard"]
        return seq // per, seq % per

    def sequence(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) activations ``[T, d]`` and ids ``[T]`` of global sequence ``seq``."""
        s, j = self._locate(seq)
        t = self.shard(s)
        return t["acts"][j], t["ids"][j]

    def n_tokens(self, split: str) -> int:
        return len(self.splits[split]) * self.ctx_len

    def token_counts(self, split: str) -> torch.Tensor:
        """How often each token id occurs among the ordinary (non-special) tokens of ``split``: an int64 count
        indexed by id, as long as the largest id seen plus one. Reads only the ids of each shard, once per store
        object (every evaluation asks for the train split's)."""
        from safetensors import safe_open

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._token_counts:
            per = self.manifest["seqs_per_shard"]
            seqs = self.splits[split]
            ids = []
            for i in np.unique(seqs // per):
                with safe_open(self.path / self.manifest["shards"][i]["file"], "pt") as f:
                    ids_NT = f.get_tensor("ids").long()[seqs[seqs // per == i] % per]
                ids.append(ids_NT[~torch.isin(ids_NT, self._special.long())])
            self._token_counts[split] = torch.bincount(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long))
        return self._token_counts[split]

    def _crop_order(self, split: str, crop_len: int, shuffle: str | None, seed: int, epoch: int,
                      buffer_shards: int, batch_size: int = 1) -> np.ndarray:
        """``[n_crops, 2]`` (sequence, start) pairs of one epoch, shuffled within groups of shards; with "crop",
        every batch (aligned run of ``batch_size``) takes its crops from distinct sequences where the buffer
        holds that many (`_distinct_rounds`)."""
        seqs = self.splits[split]
        per_seq = self.ctx_len // crop_len
        shard_of = seqs // self.manifest["seqs_per_shard"]
        shards = np.unique(shard_of)
        if shuffle is None:
            groups = [shards]
        else:
            rng = np.random.default_rng([seed, epoch])
            shards = rng.permutation(shards)
            groups = [shards[i:i + buffer_shards] for i in range(0, len(shards), buffer_shards)]
        out = []
        for g in groups:
            gs = seqs[np.isin(shard_of, g)]
            if shuffle == "sequence":
                gs = rng.permutation(gs)
            w = np.stack(np.meshgrid(gs, np.arange(per_seq) * crop_len, indexing="ij"), -1).reshape(-1, 2)
            if shuffle == "crop":
                w = _distinct_rounds(w, per_seq, batch_size, -sum(map(len, out)) % batch_size, rng)
            out.append(w)
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)

    def first(self, split: str, n_seqs: int, batch_size: int = 4, skip: int = 0) -> Iterator[Batch]:
        """The first ``n_seqs`` whole sequences of ``split`` in store order, ``batch_size`` at a time (the last batch
        cut to what is left): the one definition of "the evaluation's tokens", shared by the evaluation, the
        pursuit ceiling, `trsae.runner.test_tokens` and the dashboards, whatever batch size each reads them in.
        ``skip``: leave out the first ``skip`` of them (a later part of the same tokens)."""
        left, skip = n_seqs - skip, max(skip, 0)
        pos = 0
        for b in self.batches(split, batch_size=batch_size, shuffle=None, epochs=1, drop_last=False,
                              start=skip // batch_size):
            if left <= 0:
                return
            lo = skip - skip // batch_size * batch_size if pos == 0 else 0
            pos += 1
            if lo or len(b.seq_B) - lo > left:
                b = Batch(*(t[lo:lo + left] for t in b))
            left -= len(b.seq_B)
            yield b

    def batches(self, split: str = "train", batch_size: int = 32, crop_len: int | None = None,
                shuffle: str | None = "crop", seed: int = 0, start: int = 0, epochs: int | None = None,
                buffer_shards: int = 4, drop_last: bool = True, context: int = 0) -> Iterator[Batch]:
        """Stream batches of whole crops (runs of consecutive tokens of one sequence), starting at batch ``start``
        (a resumable data cursor).

        ``context``: each crop comes with the ``context`` tokens before it in its sequence as a left margin
        (``T = context + crop_len``), marked in `Batch.ctx_BT` but not in `Batch.mask_BT`; before a sequence's
        start the margin is padding (zero activations, id 0, position 0, in neither mask).

        ``shuffle``: "crop" (crops permuted within a buffer of ``buffer_shards`` shards), "sequence"
        (sequences permuted, their crops kept in order) or None (in order). Epochs repeat with a new
        permutation; ``epochs=None`` streams forever. Memory stays bounded by the shard cache.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        crop_len = crop_len or self.ctx_len
        if crop_len <= 0 or self.ctx_len % crop_len:
            raise ValueError(f"crop_len {crop_len} must divide the store's context length {self.ctx_len}")
        if shuffle not in ("crop", "sequence", None):
            raise ValueError(f"shuffle must be 'crop', 'sequence' or None, got {shuffle!r}")
        if not 0 <= context <= self.ctx_len - crop_len:
            raise ValueError(f"context {context} must be in 0 .. ctx_len - crop_len = {self.ctx_len - crop_len}")
        n_crops = len(self.splits[split]) * (self.ctx_len // crop_len)
        if n_crops == 0:
            raise StoreError(f"the {split} split of {self.path} is empty")
        if drop_last and n_crops < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_crops} crops of the {split} split")
        per_epoch = n_crops // batch_size if drop_last else -(-n_crops // batch_size)
        b = start
        while epochs is None or b < epochs * per_epoch:
            epoch, j = divmod(b, per_epoch)
            if j == 0 or b == start:
                order = self._crop_order(split, crop_len, shuffle, seed, epoch, buffer_shards, batch_size)
            chunk = order[j * batch_size:(j + 1) * batch_size]
            acts, ids = [], []
            for seq, st in chunk:
                a_TD, i_T = self.sequence(int(seq))
                lo, pad = st - context, max(0, context - st)
                acts.append(tnf.pad(a_TD[max(lo, 0):st + crop_len], (0, 0, pad, 0)))
                ids.append(tnf.pad(i_T[max(lo, 0):st + crop_len], (pad, 0)))
            ids_BT = torch.stack(ids).long()
            pos_BT = torch.as_tensor(chunk[:, 1:2]) - context + torch.arange(context + crop_len)
            real_BT = pos_BT >= 0
            ctx_BT = ~torch.isin(ids_BT, self._special.long()) & real_BT
            mask_BT = ctx_BT.clone()
            mask_BT[:, :context] = False
            yield Batch(acts_BTD=torch.stack(acts).to(self.dtype) * self.norm_scale, mask_BT=mask_BT,
                        pos_BT=pos_BT.clamp_min(0), ids_BT=ids_BT, seq_B=torch.as_tensor(chunk[:, 0]),
                        ctx_BT=ctx_BT)
            b += 1
