"""Hugging Face transformers through both integration paths, on model families built from
small configs (no download), with padding: attn_implementation="fused_attn" (our attention
function) and the model's own "sdpa" mode under fused_attn.activate() (torch's SDPA
provider). Outputs and every parameter's gradient hold the 2x rule against "eager" (float32
and float64), and a call counter proves our kernel ran in every attention layer."""

import copy

import pytest
import torch

import fused_attn
from fused_attn import dispatch, provider, testing

from conftest import usable

transformers = pytest.importorskip("transformers")
from fused_attn.integrations import huggingface  # noqa: E402

pytestmark = pytest.mark.skipif(not usable("cpu"), reason="the cpu kernels are not built")
ATTENTION = "scaled_dot_product_attention"
V = 100


def _pad(length, left, cut=3):
    am = torch.ones(2, length, dtype=torch.long)
    if left:
        am[1, :cut] = 0
    else:
        am[1, length - cut:] = 0
    return am


_g = torch.Generator().manual_seed(0)
IDS = torch.randint(3, V, (2, 9), generator=_g)
DEC = torch.randint(3, V, (2, 6), generator=_g)
IMG = torch.randn(2, 3, 16, 16, generator=_g)
MEL = torch.randn(2, 8, 16, generator=_g)
RIGHT, LEFT, DEC_PAD = _pad(9, False), _pad(9, True), _pad(6, False, 2)
TOKENS = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _real(t, am):  # outputs at real (not padding) positions: padded rows are garbage in every implementation
    return t[am.bool()]


def _dtype(m):
    return next(m.parameters()).dtype


def _families():
    tf = transformers
    enc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    s2s = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64)
    return {
        # name: (model class, config, run -> output, attention calls per forward)
        "bert": (tf.BertModel, tf.BertConfig(**TOKENS, **enc),
                 lambda m: _real(m(IDS, attention_mask=RIGHT).last_hidden_state, RIGHT), 2),
        "roberta": (tf.RobertaModel, tf.RobertaConfig(**TOKENS, **enc, max_position_embeddings=32),
                    lambda m: _real(m(IDS, attention_mask=RIGHT).last_hidden_state, RIGHT), 2),
        "distilbert": (tf.DistilBertModel, tf.DistilBertConfig(**TOKENS, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
                       lambda m: _real(m(IDS, attention_mask=RIGHT).last_hidden_state, RIGHT), 2),
        "bart": (tf.BartForConditionalGeneration, tf.BartConfig(**TOKENS, **s2s),
                 lambda m: m(IDS, attention_mask=RIGHT, decoder_input_ids=DEC).logits, 6),
        "t5": (tf.T5ForConditionalGeneration,
               tf.T5Config(**TOKENS, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                           relative_attention_num_buckets=8, decoder_start_token_id=0),
               lambda m: m(IDS, attention_mask=RIGHT, decoder_input_ids=DEC, decoder_attention_mask=DEC_PAD).logits, 6),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(**TOKENS, n_embd=32, n_layer=2, n_head=4, n_positions=32),
                 lambda m: _real(m(IDS, attention_mask=LEFT).logits, LEFT), 2),
        # right padding: under left padding eager's float64 run itself turns NaN (a padded query's
        # row of finfo(float64).min + score overflows to -inf, and the next layer reads its NaN values)
        "llama_gqa": (tf.LlamaForCausalLM, tf.LlamaConfig(**TOKENS, **dec),
                      lambda m: _real(m(IDS, attention_mask=RIGHT).logits, RIGHT), 2),
        "mistral_window": (tf.MistralForCausalLM, tf.MistralConfig(**TOKENS, **dec, sliding_window=4),
                           lambda m: _real(m(IDS, attention_mask=RIGHT).logits, RIGHT), 2),
        "whisper": (tf.WhisperForConditionalGeneration,
                    tf.WhisperConfig(**TOKENS, **s2s, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
                                     decoder_start_token_id=1),
                    lambda m: m(MEL.to(_dtype(m)), decoder_input_ids=DEC, decoder_attention_mask=DEC_PAD).logits, 6),
        "vit": (tf.ViTModel, tf.ViTConfig(image_size=16, patch_size=4, **enc),
                lambda m: m(IMG.to(_dtype(m))).last_hidden_state, 2),
        "clip_text": (tf.CLIPTextModel, tf.CLIPTextConfig(**TOKENS, **enc, max_position_embeddings=16),
                      lambda m: _real(m(IDS, attention_mask=RIGHT).last_hidden_state, RIGHT), 2),
        "clip_vision": (tf.CLIPVisionModel, tf.CLIPVisionConfig(image_size=16, patch_size=4, **enc),
                        lambda m: m(IMG.to(_dtype(m))).last_hidden_state, 2),
        "gpt_oss_sinks": (tf.GptOssForCausalLM,
                          tf.GptOssConfig(**TOKENS, **dict(dec, intermediate_size=32), head_dim=8, num_local_experts=2,
                                          num_experts_per_tok=1, sliding_window=4),
                          lambda m: _real(m(IDS, attention_mask=RIGHT).logits, RIGHT), 2),
    }


FAMILIES = list(_families())


def _run_with_grads(model, run):
    """run(model) and the gradient of a fixed random weighting of it w.r.t. every parameter."""
    model.zero_grad()
    out = run(model)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * weight.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, float(out.detach().abs().max()) * float(weight.abs().max())


def _compare_with_eager(family, make_fused, counted):
    """Build eager (float32, float64) and ours from one config and weights; return the 2x
    comparisons of the output and every parameter gradient, and our attention call count."""
    cls, cfg, run, layers = _families()[family]
    kw = {"experts_implementation": "eager"} if family.startswith("gpt_oss") else {}  # float64 experts
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager", **kw).eval()
    truth = copy.deepcopy(eager).double()
    ours = make_fused(cls, copy.deepcopy(cfg), kw)
    ours.load_state_dict(eager.state_dict())
    before = counted()
    out_a, grads_a, _ = _run_with_grads(ours, run)
    n_calls = counted() - before
    out_l, grads_l, _ = _run_with_grads(eager, run)
    out_t, grads_t, scale = _run_with_grads(truth, run)
    comparisons = [testing.check_2x("output", out_a, out_l, out_t)]
    assert grads_a.keys() == grads_t.keys()
    comparisons += [testing.check_2x(f"grad {n}", grads_a[n], grads_l[n], grads_t[n], scale=scale) for n in grads_t]
    return comparisons, n_calls, layers


def _our_calls():
    return dispatch.calls[(ATTENTION, "cpu")]


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_fused_attn(family):
    """attn_implementation="fused_attn": every attention layer calls our cpu kernel (counted
    per forward; the backward runs inside the same autograd node)."""
    huggingface.register(backend="cpu")

    def make(cls, cfg, kw):
        model = cls._from_config(cfg, attn_implementation="fused_attn", **kw).eval()
        assert model.config._attn_implementation == "fused_attn"
        return model

    comparisons, n_calls, layers = _compare_with_eager(family, make, _our_calls)
    testing.assert_all_ok(comparisons)
    assert n_calls == layers, f"{n_calls} calls of our attention, the model has {layers} attention layers"


SDPA_FAMILIES = [f for f in FAMILIES if f != "gpt_oss_sinks"]  # gpt-oss has no "sdpa" mode
# attention layers whose SDPA call reaches a flash kernel: torch's SDPA takes its math path
# when the mask requires grad, as T5's self-attention masks do (they carry the learned
# relative bias), so only T5's 2 cross-attention layers reach ours in "sdpa" mode
SDPA_FLASH_LAYERS = {"t5": 2}


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_sdpa_mode_under_the_torch_provider(family):
    """The model's own "sdpa" mode, unmodified, under fused_attn.activated(): torch's SDPA
    runs our cpu kernel forward and backward in every attention layer."""
    def make(cls, cfg, kw):
        return cls._from_config(cfg, attn_implementation="sdpa", **kw).eval()

    provider.reset()
    with fused_attn.activated("cpu"):
        comparisons, n_calls, layers = _compare_with_eager(family, make, lambda: provider.calls["cpu"])
    testing.assert_all_ok(comparisons)
    assert provider.calls["fallback"] == 0, dict(provider.fallback_reasons)
    layers = SDPA_FLASH_LAYERS.get(family, layers)
    assert n_calls == 2 * layers, f"{n_calls} kernel calls, expected forward + backward in {layers} layers"


def test_t5_position_bias_reaches_the_kernel():
    """T5's relative position bias is part of the scores (it was silently dropped once):
    zeroing the bias embedding changes our output exactly as it changes eager's."""
    huggingface.register(backend="cpu")
    cls, cfg, run, _ = _families()["t5"]
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="fused_attn").eval()
    ours.load_state_dict(eager.state_dict())
    with torch.no_grad():
        with_bias = run(ours)
        for m in (eager, ours):
            for mod in m.modules():
                if getattr(mod, "has_relative_attention_bias", False):
                    mod.relative_attention_bias.weight.zero_()
        without = run(ours)
        torch.testing.assert_close(without, run(eager), atol=1e-5, rtol=1e-5)
    assert (with_bias - without).abs().max() > 1e-3


def test_unknown_keywords_raise_instead_of_being_ignored():
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(TypeError, match="alibi_slopes"):
        huggingface.fused_attention_forward(module, q, q, q, None, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match="attention weights"):
        huggingface.fused_attention_forward(module, q, q, q, None, output_attentions=True)
    # keywords whose meaning the mask carries, and absent (None) ones, are accepted
    out, _ = huggingface.fused_attention_forward(module, q, q, q, None, sliding_window=4, position_ids=None,
                                                 some_future_option=None)
    assert out.shape == (1, 3, 2, 8)


def test_softcap_equals_gemma2s_eager_formula():
    """softcap: scores c * tanh(s / c) before the mask (Gemma-2's eager attention), forward and
    gradients against the float64 formula."""
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) * 3 for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()

    def formula(q, k, v, mask):
        s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
        s = 2.5 * torch.tanh(s / 2.5)
        return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)

    module = torch.nn.Module()
    before = dispatch.calls[(ATTENTION, "cpu")]
    comparisons = testing.compare(
        lambda q, k, v, mask: huggingface.fused_attention_forward(module, q, k, v, mask, softcap=2.5)[0],
        formula, {"q": q, "k": k, "v": v, "mask": mask}, grad_names=["q", "k", "v"])
    testing.assert_all_ok(comparisons)
    assert dispatch.calls[(ATTENTION, "cpu")] == before + 1  # the cpu kernels capped the scores


def test_sinks_equal_an_explicit_softmax_with_the_sink_logit():
    """s_aux: exp(sink) joins each row's denominator; forward and the sink's gradient against
    the float64 formula (gpt-oss's eager attention)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    sinks = torch.randn(4, generator=g)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()

    def formula(q, k, v, sinks, mask):
        s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
        s = s.masked_fill(~mask, float("-inf"))
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(2, -1, 5, 1)], -1)
        return (s.softmax(-1)[..., :-1] @ v).transpose(1, 2)

    module = torch.nn.Module()
    comparisons = testing.compare(
        lambda q, k, v, sinks, mask: huggingface.fused_attention_forward(module, q, k, v, mask, s_aux=sinks)[0],
        formula, {"q": q, "k": k, "v": v, "sinks": sinks, "mask": mask}, grad_names=["q", "k", "v", "sinks"])
    testing.assert_all_ok(comparisons)


def _table() -> str:
    """The README's table: `python tests/test_huggingface.py`."""
    huggingface.register(backend="cpu")
    rows = ["| family | path | output error (allowed) | worst gradient error / allowed | our kernel calls |",
            "|---|---|---|---|---|"]

    def fused(cls, cfg, kw):
        return cls._from_config(cfg, attn_implementation="fused_attn", **kw).eval()

    def sdpa(cls, cfg, kw):
        return cls._from_config(cfg, attn_implementation="sdpa", **kw).eval()

    for family in FAMILIES:
        paths = [("attn_implementation=\"fused_attn\"", fused, _our_calls, 1)]
        if family in SDPA_FAMILIES:
            paths.append(("\"sdpa\" + fused_attn.activate()", sdpa, lambda: provider.calls["cpu"], 2))
        for path, make, counted, per_layer in paths:
            provider.reset()
            with fused_attn.activated("cpu") if per_layer == 2 else torch.enable_grad():
                comparisons, n_calls, layers = _compare_with_eager(family, make, counted)
            layers = SDPA_FLASH_LAYERS.get(family, layers) if per_layer == 2 else layers
            out, grads = comparisons[0], comparisons[1:]
            worst = max(grads, key=lambda c: c.error / c.allowed)
            ok = all(c.ok for c in comparisons) and n_calls == per_layer * layers
            rows.append(f"| {family} | {path} | {out.error:.1e} ({out.allowed:.1e}) | "
                        f"{worst.error / worst.allowed:.2f} | {n_calls} of {per_layer * layers} "
                        f"{'ok' if ok else 'FAIL'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())
