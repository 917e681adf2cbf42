"""A float64 store is float64 end to end (the notebooks' smoke defaults; `tests/test_kernels.py` checks that their
outputs then hold across CPU kernels): the model's float32 islands are lifted by `Float64Math`, and the store, the
SAE trained on it, its saved weights and its evaluation stay float64."""

import pytest
import torch

from trsae.config import HarvestConfig, TrainConfig
from trsae.lm import Float64Math
from trsae.saes import SAEConfig, load_sae
from trsae.store import StoreError, harvest
from trsae.train import train_sae


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).double().eval()


def test_rms_norm_is_computed_in_float64_under_float64math():
    """transformers' Gemma3RMSNorm computes in float32 whatever its input; under the mode it matches a float64
    transcription of its formula, x / rms(x) * (1 + w), to float64 rounding (and without the mode it does not)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(48, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 48, dtype=torch.float64) * 30
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    with torch.no_grad(), Float64Math():
        lifted = norm(x)
    plain = norm(x).detach()
    assert lifted.dtype == plain.dtype == torch.float64
    assert (lifted - ref).abs().max() < 1e-13
    assert (plain - ref).abs().max() > 1e-9  # float32 rounding: what the mode removes


def test_gemma3_forward_under_float64math_stays_close_to_float32_and_is_float64_inside():
    """The lifted forward is the same model (its logits agree with the float32 forward to float32 precision), and no
    float32 tensor is produced inside it (forward hooks see float64 everywhere, rotary tables included)."""
    model = _tiny_gemma3()
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.extend(
        t.dtype for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t) and t.is_floating_point()))
        for m in model.modules()]
    with torch.no_grad(), Float64Math():
        lifted = model(ids).logits
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.float64}
    with torch.no_grad():
        single = model.float()(ids).logits
    torch.testing.assert_close(lifted.float(), single, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def float64_store(tmp_path_factory, data_dir):
    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=24 * 32, ctx_len=32, seqs_per_shard=8,
                        batch_size=4, val_frac=0.1, test_frac=0.15, dtype="float64")
    return harvest(cfg, tmp_path_factory.mktemp("store64"), progress=False)


def test_float64_store_trains_saves_and_evaluates_in_float64(float64_store, tmp_path):
    from trsae.evaluate import evaluate_saes
    from trsae.lm import load_model

    store = float64_store
    assert store.dtype == torch.float64 and store.shard(0)["acts"].dtype == torch.float64
    assert next(store.batches("train", batch_size=2)).acts_BTD.dtype == torch.float64
    sae = train_sae(SAEConfig.build(store.d_model, 128, "topk", "trsae", k=4, window=4),
                    TrainConfig(tokens=2 * 32 * 4, batch_size=2, crop_len=32), store, tmp_path / "run", progress=False)
    assert {p.dtype for p in sae.parameters()} == {torch.float64}
    again = load_sae(tmp_path / "run" / "sae")
    assert {p.dtype for p in again.parameters()} == {torch.float64}
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values()))
    res = evaluate_saes({"trsae": again}, store, max_seqs=2, density_tokens=64)["trsae"]
    assert 0 < res["reconstruction_quality"]["explained_variance"] <= 1
    with pytest.raises(ValueError, match="runs in torch.float32"):
        evaluate_saes({"trsae": again}, store, load_model("tiny-gpt2"), max_seqs=2, density_tokens=64)


def test_float64_store_refuses_a_float32_model(tmp_path, tiny_model):
    cfg = HarvestConfig(model="tiny-gpt2", layer=1, data="brown", tokens=8 * 32, ctx_len=32, dtype="float64")
    with pytest.raises(StoreError, match="computed in float64"):
        harvest(cfg, tmp_path / "s", model=tiny_model, progress=False)


def test_unknown_store_dtype_is_refused():
    with pytest.raises(ValueError, match="float32, bfloat16, float64"):
        HarvestConfig(dtype="float16")
