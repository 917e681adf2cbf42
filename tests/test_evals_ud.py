"""UD parsing, word -> token alignment (hand-checked with the real GPT-2 tokenizer), labels, features; GAP
positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trsae.evals import text as tx
from trsae.evals import ud

SNIPPET = """# newdoc id = d1
# sent_id = s1
# text = I don't know, because it rained.
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\tSpaceAfter=No
5\t,\t,\tPUNCT\t,\t_\t4\tpunct\t_\t_
6\tbecause\tbecause\tSCONJ\tIN\t_\t8\tmark\t_\t_
7\tit\tit\tPRON\tPRP\t_\t8\tnsubj\t_\t_
7.1\trained\train\tVERB\tVBD\t_\t_\t_\t8:advcl\t_
8\trained\train\tVERB\tVBD\t_\t4\tadvcl:cause\t_\tSpaceAfter=No
9\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = s2
# text = It did.
1\tIt\tit\tPRON\tPRP\t_\t2\tnsubj\t_\t_
2\tdid\tdo\tVERB\tVBD\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t.\t_\t2\tpunct\t_\t_
"""


@pytest.fixture(scope="module")
def gpt2_tok(data_dir):
    from trsae.lm import gpt2_tokenizer

    return gpt2_tokenizer()


def test_parse_conllu_skips_multiword_ranges_and_empty_nodes():
    s1, s2 = ud.parse_conllu(SNIPPET)
    assert s1.words == ["I", "do", "n't", "know", ",", "because", "it", "rained", "."]
    assert s1.upos[7] == "VERB" and s1.xpos[1] == "VBP"
    assert s1.head == [4, 4, 4, 0, 4, 8, 8, 4, 4]
    assert s1.deprel[7] == "advcl:cause"
    assert s1.text == "I don't know, because it rained." and s1.doc_id == "d1" and s2.doc_id == "d1"
    # "don't" = "do" + "n't" splits the surface span; every span is the word's own characters
    assert s1.spans[:4] == [(0, 1), (2, 4), (4, 7), (8, 12)]
    assert [s1.text[a:b] for a, b in s1.spans] == s1.words
    assert ud.parse_conllu(SNIPPET, max_sentences=1)[0].sent_id == "s1"


def test_parse_conllu_rebuilds_text_when_missing():
    body = "\n".join(line for line in SNIPPET.split("\n\n")[0].splitlines() if not line.startswith("# text"))
    (s,) = ud.parse_conllu(body)
    assert s.text == "I don't know, because it rained."


def test_word_labels_by_hand():
    s1, _ = ud.parse_conllu(SNIPPET)
    lab = ud.word_labels(s1)
    assert lab["deprel"] == ["nsubj", "aux", "advmod", "root", "punct", "mark", "nsubj", "advcl", "punct"]
    assert lab["head_dir"] == ["right", "right", "right", "root", "left", "right", "right", "left", "left"]
    assert lab["head_dist"] == ["2-3", "2-3", "1", "root", "1", "2-3", "1", "4-7", "4-7"]
    assert lab["word_pos"] == ["1", "2-3", "2-3", "4-7", "4-7", "4-7", "4-7", "8-15", "8-15"]
    assert lab["connective"] == ["0", "0", "0", "0", "0", "1", "0", "0", "0"]
    # sentence start, and "because" opens the advcl clause headed by "rained"
    assert lab["clause_start"] == ["1", "0", "0", "0", "0", "1", "0", "0", "0"]


def test_log2_bucket():
    assert [ud.log2_bucket(n, 64) for n in (1, 2, 3, 4, 7, 8, 63, 64, 500)] == \
        ["1", "2-3", "2-3", "4-7", "4-7", "8-15", "32-63", "64+", "64+"]
    with pytest.raises(ValueError):
        ud.log2_bucket(0, 8)


def test_alignment_last_subtoken_gpt2(gpt2_tok):
    # [BOS] I | Ġdon | 't | Ġknow | , | Ġbecause | Ġit | Ġr | ained | . || ĠIt | Ġdid | .
    sents = ud.parse_conllu(SNIPPET)
    ctx = ud.tokenize_ud(gpt2_tok, 50256, sents)
    assert gpt2_tok.convert_ids_to_tokens(ctx.ids[0][8:10]) == ["Ġr", "ained"]
    assert ctx.word_tok.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10] + [1, 2, 3]
    assert ctx.word_ctx.tolist() == [0] * 9 + [1] * 3
    assert all(ids[0] == 50256 for ids in ctx.ids)
    assert ctx.labels["abs_pos"].tolist()[:9] == ["1", "2-3", "2-3", "4-7", "4-7", "4-7", "4-7", "8-15", "8-15"]
    packed = ud.tokenize_ud(gpt2_tok, 50256, sents, pack_tokens=64)
    assert len(packed.ids) == 1
    assert packed.word_tok.tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert packed.labels["word_pos"].tolist()[9:] == ["1", "2-3", "2-3"]  # word position restarts per sentence
    assert ud.tokenize_ud(gpt2_tok, 50256, sents, pack_tokens=12).word_ctx.tolist() == [0] * 9 + [1] * 3


def test_alignment_multi_subtoken_words(gpt2_tok):
    # Un bel iev ably | , | ĠK ow al c zyk | 's | Ġtoken izer | Ġworks | .
    text = "Unbelievably, Kowalczyk's tokenizer works."
    words = ["Unbelievably", ",", "Kowalczyk", "'s", "tokenizer", "works", "."]
    spans, cur = [], 0
    for w in words:
        j = text.index(w, cur)
        spans.append((j, j + len(w)))
        cur = j + len(w)
    _, offsets = tx.encode_with_offsets(gpt2_tok, text)
    assert [t + 1 for t in tx.last_token_indices(offsets, spans)] == [4, 5, 10, 11, 13, 14, 15]


def test_load_ud_mirror(data_dir):
    dev = ud.load_ud("dev", max_sentences=3)
    assert len(dev) == 3 and dev[0].words == ["From", "the", "AP", "comes", "this", "story", ":"]
    with pytest.raises(ValueError):
        ud.load_ud("validation")


def test_ud_features_rows_match_layer_acts(tiny_model):
    from trsae.lm import layer_acts
    from trsae.saes import SAEConfig, make_sae

    sents = ud.parse_conllu(SNIPPET)
    ctx = ud.tokenize_ud(tiny_model.tokenizer, tiny_model.bos_id, sents)
    raw = tx.encode_contexts(tiny_model, 1, ctx.ids, batch_size=2)
    rows = raw.rows(ctx.word_ctx, ctx.word_tok)
    direct = layer_acts(tiny_model, 1, torch.tensor([ctx.ids[0]]))[0]  # unpadded, alone
    np.testing.assert_allclose(raw.X[rows[:9]], direct[ctx.word_tok[:9]].numpy(), atol=1e-5)
    assert raw.X.shape[0] == sum(len(x) - 1 for x in ctx.ids)  # every token but BOS
    with pytest.raises(KeyError):
        raw.rows(np.array([0]), np.array([0]))  # BOS has no row
    sae = make_sae(SAEConfig.build(tiny_model.d_model, 32, "topk", k=4, input_scale=2.0)).eval()
    codes = tx.encode_contexts(tiny_model, 1, ctx.ids, sae=sae, batch_size=2)
    assert codes.X.shape == (raw.X.shape[0], 32) and hasattr(codes.X, "toarray")
    want = sae.encode(direct[None] * 2.0, pos_BT=torch.arange(direct.shape[0])[None])[0].detach()
    np.testing.assert_allclose(codes.X[rows[:9]].toarray(), want[ctx.word_tok[:9]].numpy(), atol=1e-5)


def test_gap_positions_and_loader(gpt2_tok, data_dir):
    from trsae.evals.discourse import gap_positions, load_gap

    item = {"text": "Anna met Bob Kowalczyk. She smiled.", "pronoun": "She", "pronoun_offset": 24,
            "a": "Anna", "a_offset": 0, "b": "Bob Kowalczyk", "b_offset": 9}
    ids, (p, a, b) = gap_positions(gpt2_tok, 50256, item)
    toks = gpt2_tok.convert_ids_to_tokens(ids)
    assert toks[p] == "ĠShe" and toks[a] == "Anna" and toks[b] == "zyk"
    rows = load_gap("validation", max_items=5)
    assert len(rows) == 5 and all(r["label"] in ("A", "B", "neither") for r in rows)


def test_reuse_layer_acts_runs_the_model_once_per_batch(tiny_model, monkeypatch):
    """Inside `reuse_layer_acts` a second encoding of the same texts (another SAE) gives the same rows as without it
    while the model runs only for the first; outside, it runs every time."""
    import trsae.lm
    from trsae.saes import SAEConfig, make_sae

    ctx = ud.tokenize_ud(tiny_model.tokenizer, tiny_model.bos_id, ud.parse_conllu(SNIPPET))
    sae = make_sae(SAEConfig.build(tiny_model.d_model, 32, "topk", k=4)).eval()
    raw_ref = tx.encode_contexts(tiny_model, 1, ctx.ids, batch_size=2)
    codes_ref = tx.encode_contexts(tiny_model, 1, ctx.ids, sae=sae, batch_size=2)
    calls = []
    real = trsae.lm.layer_acts
    monkeypatch.setattr(trsae.lm, "layer_acts", lambda *a, **k: calls.append(1) or real(*a, **k))
    n_batches = -(-len(ctx.ids) // 2)
    with tx.reuse_layer_acts():
        raw = tx.encode_contexts(tiny_model, 1, ctx.ids, batch_size=2)
        codes = tx.encode_contexts(tiny_model, 1, ctx.ids, sae=sae, batch_size=2)
        assert len(calls) == n_batches
        tx.encode_contexts(tiny_model, 2, ctx.ids, batch_size=2)  # another layer is another key
        assert len(calls) == 2 * n_batches
    np.testing.assert_array_equal(raw.X, raw_ref.X)
    np.testing.assert_array_equal(codes.X.toarray(), codes_ref.X.toarray())
    tx.encode_contexts(tiny_model, 1, ctx.ids, batch_size=2)  # the memo ended with the block
    assert len(calls) == 3 * n_batches
