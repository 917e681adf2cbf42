import pytest
import torch

from trsae.lm import ModelError, layer_acts, load_model, logits_with_replacement


def _ids(model, n=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(300, 5000, (n, T), generator=g)
    ids[:, 0] = model.bos_id
    return ids


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tiny_gpt2_layer_acts_equal_hidden_states(tiny_model, layer):
    ids = _ids(tiny_model)
    ref = tiny_model.hf(ids, output_hidden_states=True).hidden_states[layer + 1]
    torch.testing.assert_close(layer_acts(tiny_model, layer, ids), ref, rtol=0, atol=1e-6)


def test_harvest_stops_after_the_layer(tiny_model):
    """The early stop really skips the later blocks: a hook on the last block never fires."""
    fired = []
    h = tiny_model.hf_layer(tiny_model.n_layers - 1).register_forward_hook(lambda *a: fired.append(1))
    try:
        layer_acts(tiny_model, 0, _ids(tiny_model))
    finally:
        h.remove()
    assert fired == []


def test_splice_identity_is_bitwise_and_zero_changes_logits(tiny_model):
    ids = _ids(tiny_model)
    clean = tiny_model.hf(ids).logits
    assert torch.equal(logits_with_replacement(tiny_model, 1, ids, lambda h: h), clean)
    assert torch.equal(logits_with_replacement(tiny_model, 1, ids), clean)
    zeroed = logits_with_replacement(tiny_model, 1, ids, torch.zeros_like)
    assert (zeroed - clean).abs().max() > 1e-3


@pytest.mark.parametrize("keep", [1, 3, 100])
def test_keeping_the_last_positions_equals_slicing_the_full_logits(tiny_model, keep):
    ids = _ids(tiny_model, seed=5)
    f = lambda h: 0.5 * h  # noqa: E731
    for replace in (None, f):
        full = logits_with_replacement(tiny_model, 1, ids, replace)
        kept = logits_with_replacement(tiny_model, 1, ids, replace, keep=keep)
        torch.testing.assert_close(kept, full[:, -keep:])


def test_splice_matches_a_plain_torch_hook(tiny_model):
    """Independent reference: replacing the block output with a forward hook gives the same logits."""
    ids = _ids(tiny_model, seed=3)
    f = lambda h: 0.5 * h + 0.1  # noqa: E731
    hook = tiny_model.hf_layer(1).register_forward_hook(lambda m, i, o: f(o[0] if isinstance(o, tuple) else o))
    try:
        ref = tiny_model.hf(ids).logits
    finally:
        hook.remove()
    torch.testing.assert_close(logits_with_replacement(tiny_model, 1, ids, f), ref)


def test_bad_layer_and_unknown_model(tiny_model):
    with pytest.raises(ModelError, match="out of range"):
        tiny_model.site(tiny_model.n_layers)
    with pytest.raises(ModelError, match="unknown model"):
        load_model("gpt-5")


def test_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="gemma-3-270m, smollm2-135m, tiny-gpt2"):
        load_model("gpt2")


@pytest.mark.slow
def test_gemma_layer_acts_equal_hidden_states(gemma_model):
    ids = _ids(gemma_model, n=2, T=12)
    ref = gemma_model.hf(ids, output_hidden_states=True).hidden_states[7]
    torch.testing.assert_close(layer_acts(gemma_model, 6, ids), ref, rtol=1e-5, atol=1e-3)
    assert gemma_model.d_model == 640 and gemma_model.n_layers == 18
