"""Language-model variants: the output layer's time (full softmax vs VQ-Logits) and each variant of the CPU
comparison trained at equal steps; with --vq, VQ-Logits' initialisations against the full softmax. Measures, does
not assert.

    .venv/bin/python benchmarks/lm.py [--vocab 50257 --codes 1024 --dim 768 --tokens 1024] [--steps 300]
    .venv/bin/python benchmarks/lm.py --vq --steps 150 [--vq-codes 1024 256] [--seeds 0 1] [--pre-steps 40]
                                      [--time-seeds 0] [--out benchmarks/results/lm_vq]

1. Output layer, forward + backward of the loss from hidden states (B*S tokens, d) at V = 50k, K = 1024 (the
   paper's 6x claim): the full softmax (h W^T then cross-entropy over V), VQ-Logits as the official code computes it
   (codebook logits scattered to V, then softmax over V), and VQ-Logits' exact loss from the K codebook logits and
   the cluster sizes (lab_kernels/vq_logits.py), which never builds V-sized logits. Times are medians of repeats.
2. The experiments/lm/stdlib_*.yaml variants through the orchestrator's step loop in this process (one rank, no
   Ray, each in a fresh process): tokens/s, peak resident memory of that process, and validation perplexity after
   `--steps` steps on the embedded corpus.
Writes benchmarks/results/lm.{md,json}.

--vq (writes benchmarks/results/lm_vq.{md,json} instead): per seed, stdlib_rope.yaml (full softmax) and, for each
K, stdlib_vq<K>.yaml with the contiguous and the random mapping, each with the codebook drawn at std 0.02 and 1
(the official code's), all `--steps` steps; then the k-means mapping as a user runs it: stdlib_rope_pre40.yaml
(`--pre-steps` softmax steps, its checkpoint kept in a scratch storage_path), then stdlib_vq<K>_kmeans.yaml (its
`vq_init_from: run:lm-stdlib-rope-pre40` resolved by orchestrator.references, checked by orchestrator.preflight)
for `--steps` minus `--pre-steps` steps, with and without the pre-trained body (vq_init_body). Its seconds are
the two runs' together (the k-means fit is in the second's model build). Equal wall time: the best contiguous /
random variant and the best k-means variant of each seed and K are trained again for as many steps as the softmax
run's seconds buy at their measured seconds per step (the k-means variant after its pre-training's seconds), for
the seeds in --time-seeds (default: all; these timings need a quiet machine). The tables are rewritten after each
seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lab_kernels.vq_logits import cluster_sizes, contiguous_mapping, vq_cross_entropy, vq_cross_entropy_reference
from orchestrator import preflight, references
from orchestrator.launch import train_in_process

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("stdlib_rope", "stdlib_complex", "stdlib_complex_sqrt", "stdlib_vq64", "stdlib_vq256", "stdlib_vq1024")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def output_layer(vocab: int, codes: int, dim: int, tokens: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    h = torch.randn(tokens, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    codebook = (torch.randn(codes, dim) * 0.02).requires_grad_()
    mapping = contiguous_mapping(vocab, codes)
    sizes = cluster_sizes(mapping, codes)
    targets = torch.randint(vocab, (tokens,))

    def softmax() -> None:
        F.cross_entropy(h @ weight.T, targets).backward()

    def vq_scatter() -> None:
        vq_cross_entropy_reference(h, codebook, mapping, sizes, targets).backward()

    def vq_exact() -> None:
        vq_cross_entropy(h, codebook, mapping, sizes, targets).backward()

    times = {name: median_seconds(fn, repeats) for name, fn in
             (("softmax", softmax), ("vq_scatter", vq_scatter), ("vq_exact", vq_exact))}
    return {**{f"{k}_ms": 1000 * v for k, v in times.items()},
            "speedup_exact_vs_softmax": times["softmax"] / times["vq_exact"],
            "speedup_scatter_vs_softmax": times["softmax"] / times["vq_scatter"],
            "params_softmax": vocab * dim, "params_vq": codes * dim}


def train_variant(name: str, steps: int, overrides: tuple[str, ...] = (), storage: str | None = None
                  ) -> dict[str, float]:
    """One variant in a fresh process, so that its peak resident memory is its own. With `storage`, it is the
    storage_path and the final checkpoint is kept in its run directory (storage/<name>/checkpoint_<step>)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_sendable_errors, (name, steps, overrides, storage))


def _sendable_errors(*args: object) -> dict[str, float]:
    """`_train_variant`, its errors as RuntimeError: the pool hangs on one it cannot unpickle (SpecError)."""
    try:
        return _train_variant(*args)
    except Exception as err:
        raise RuntimeError(f"{type(err).__name__}: {err}") from None


def _train_variant(name: str, steps: int, overrides: tuple[str, ...] = (), storage: str | None = None
                   ) -> dict[str, float]:
    path = REPO / "experiments" / "lm" / f"{name}.yaml"
    storage_override = [f"storage_path={storage}"] if storage else []
    spec = preflight.load(path, [f"optim.steps={steps}", "resources.workers=1", "eval.every=null",
                                 "checkpoint.every=1000000", *storage_override, *overrides])
    spec = references.resolve(spec, path)  # run:<name> -> that run's latest checkpoint, as `orchestrator run`
    preflight.check_inputs(spec, path)
    checkpoint_root = Path(storage) / spec.name if storage else None
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"), checkpoint_root=checkpoint_root)
    seconds = time.perf_counter() - started
    tokens = steps * spec.optim.batch_size * spec.data.seq_len
    return {"val_ppl": metrics["eval/ppl"], "val_loss": metrics["eval/loss"], "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


VQ_STDS = (0.02, 1.0)


def vq_seed(seed: int, codes: list[int], steps: int, pre_steps: int, scratch: str, with_time: bool
            ) -> dict[str, dict]:
    """One seed of the --vq comparison: {label: result}, each result with its K, step counts and `budget`
    ("steps" or "time": the equal-wall-time runs, when `with_time`)."""
    seeded = (f"seed={seed}",)
    results = {"softmax": {**train_variant("stdlib_rope", steps, seeded), "K": 0, "steps": steps, "budget": "steps"}}
    print(seed, "softmax", json.dumps(results["softmax"]), flush=True)
    storage = f"{scratch}/seed{seed}"
    pre = train_variant("stdlib_rope_pre40", pre_steps, seeded, storage)
    results["softmax pre-training"] = {**pre, "K": 0, "steps": pre_steps, "budget": "steps"}
    print(seed, "softmax pre-training", json.dumps(pre), flush=True)
    for k in codes:
        for mapping in ("contiguous", "random"):
            for std in VQ_STDS:
                label = f"vq{k} {mapping} std {std:g}"
                overrides = (*seeded, f"config.vq_mapping={mapping}", f"config.vq_codebook_std={std}")
                result = train_variant(f"stdlib_vq{k}", steps, overrides)
                results[label] = {**result, "K": k, "steps": steps, "budget": "steps", "overrides": overrides}
                print(seed, label, json.dumps(result), flush=True)
        for body in (True, False):
            label = f"vq{k} kmeans{' + body' if body else ''}"
            overrides = (*seeded, f"config.vq_init_body={body}")
            result = train_variant(f"stdlib_vq{k}_kmeans", steps - pre_steps, overrides, storage)
            results[label] = {**result, "seconds": pre["seconds"] + result["seconds"], "vq_seconds": result["seconds"],
                              "pre_seconds": pre["seconds"], "K": k, "steps": steps, "pre_steps": pre_steps,
                              "budget": "steps", "overrides": overrides}
            print(seed, label, json.dumps(result), flush=True)
    if with_time:
        results.update(time_matched(results, codes, steps, seeded, storage))
    return results


def time_matched(results: dict[str, dict], codes: list[int], steps: int, seeded: tuple[str, ...], storage: str
                 ) -> dict[str, dict]:
    """The best random-init and the best k-means variant of each K again, for the steps that the softmax run's
    seconds buy at their own measured seconds per step."""
    budget = results["softmax"]["seconds"]
    matched = {}
    for k in codes:
        for prefix in (f"vq{k} contiguous", f"vq{k} random"), (f"vq{k} kmeans",):
            candidates = {label: r for label, r in results.items() if label.startswith(prefix)}
            label = min(candidates, key=lambda name: candidates[name]["val_ppl"])
            r = candidates[label]
            pre_seconds, pre_steps = r.get("pre_seconds", 0.0), r.get("pre_steps", 0)
            vq_steps = steps - pre_steps
            per_step = r.get("vq_seconds", r["seconds"]) / vq_steps
            matched_steps = max(1, round((budget - pre_seconds) / per_step))
            name = f"stdlib_vq{k}_kmeans" if pre_steps else f"stdlib_vq{k}"
            result = train_variant(name, matched_steps, r["overrides"], storage if pre_steps else None)
            matched[f"{label} (time)"] = {**result, "seconds": pre_seconds + result["seconds"], "K": k,
                                          "steps": pre_steps + matched_steps, "pre_steps": pre_steps,
                                          "budget": "time", "overrides": r["overrides"]}
            print(seeded, label, "time-matched", matched_steps, json.dumps(result), flush=True)
    return matched


def vq_markdown(runs: dict[int, dict[str, dict]], args: argparse.Namespace) -> str:
    """One row per variant: perplexity and seconds of each seed that ran it, their mean, and its gap to the mean
    softmax perplexity of the same seeds."""
    seeds = sorted(runs)
    labels = list(dict.fromkeys(label for s in seeds for label in runs[s]))
    head = " | ".join(f"ppl seed {s} | s seed {s}" for s in seeds)
    lines = [f"VQ-Logits initialisations against the full softmax (V = 8192, d = 128, 4 layers) on the embedded "
             f"corpus, in-process, one rank, CPU. Equal steps: {args.steps} optimizer steps (k-means: "
             f"{args.pre_steps} softmax pre-training steps + {args.steps - args.pre_steps} VQ steps, seconds of both "
             "runs, k-means fit included). Equal time: the steps the softmax run's seconds buy (same seed) at the "
             "variant's seconds per step of its equal-step run (setup and evaluation included).", "",
             f"| variant | budget | steps | {head} | mean ppl | vs softmax |",
             "|---|---|---|" + "---|---|" * len(seeds) + "---|---|"]
    for label in labels:
        ran = [s for s in seeds if label in runs[s]]
        mean = statistics.mean(runs[s][label]["val_ppl"] for s in ran)
        softmax = statistics.mean(runs[s]["softmax"]["val_ppl"] for s in ran)
        first = runs[ran[0]][label]
        steps = "/".join(str(runs[s][label]["steps"]) for s in ran)
        pre = f" ({first['pre_steps']} softmax + rest)" if first.get("pre_steps") else ""
        cells = " | ".join(f"{runs[s][label]['val_ppl']:.1f} | {runs[s][label]['seconds']:.0f}" if s in ran
                           else "- | -" for s in seeds)
        lines.append(f"| {label} | {first['budget']} | {steps}{pre} | {cells} | {mean:.1f} | "
                     f"{100 * (mean / softmax - 1):+.0f}% |")
    return "\n".join(lines) + "\n"


def vq_main(args: argparse.Namespace) -> None:
    """The tables are rewritten after each seed, so an interrupted comparison keeps the seeds it finished."""
    out = Path(args.out or REPO / "benchmarks" / "results" / "lm_vq")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lm_vq_") as scratch:
        for seed in args.seeds:
            with_time = args.time_seeds is None or seed in args.time_seeds
            runs[seed] = vq_seed(seed, args.vq_codes, args.steps, args.pre_steps, scratch, with_time)
            text = vq_markdown(runs, args)
            print(text, flush=True)
            out.with_suffix(".md").write_text(text)
            out.with_suffix(".json").write_text(json.dumps({str(s): r for s, r in runs.items()}, indent=2))


def markdown(layer: dict[str, float], variants: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [f"Output layer, forward + backward, V = {args.vocab}, K = {args.codes}, d = {args.dim}, "
             f"{args.tokens} tokens, CPU, median of {args.repeats}:", "",
             "| path | ms | vs full softmax |", "|---|---|---|",
             f"| full softmax | {layer['softmax_ms']:.1f} | 1.00x |",
             f"| VQ-Logits, official scatter to V | {layer['vq_scatter_ms']:.1f} | "
             f"{layer['speedup_scatter_vs_softmax']:.2f}x |",
             f"| VQ-Logits, exact from K logits | {layer['vq_exact_ms']:.1f} | "
             f"{layer['speedup_exact_vs_softmax']:.2f}x |", "",
             f"Variants after {args.steps} steps (in-process, one rank, CPU):", "",
             "| variant | val perplexity | tokens/s | seconds | peak RSS (MB) |", "|---|---|---|---|---|"]
    for name, r in variants.items():
        lines.append(f"| {name} | {r['val_ppl']:.2f} | {r['tokens_per_s']:.0f} | {r['seconds']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--vq", action="store_true", help="the VQ-Logits initialisation comparison only")
    parser.add_argument("--vq-codes", type=int, nargs="+", default=[1024], choices=[256, 1024])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pre-steps", type=int, default=40, help="--vq: softmax steps before k-means")
    parser.add_argument("--time-seeds", type=int, nargs="*", help="--vq: the seeds with equal-wall-time runs "
                        "(default: every seed)")
    parser.add_argument("--out", help="default benchmarks/results/lm (--vq: lm_vq)")
    args = parser.parse_args()
    if args.vq:
        vq_main(args)
        return
    layer = output_layer(args.vocab, args.codes, args.dim, args.tokens, args.repeats)
    print(json.dumps(layer, indent=2), flush=True)
    variants = {}
    for name in args.variants:
        variants[name] = train_variant(name, args.steps)
        print(name, json.dumps(variants[name]), flush=True)
    text = markdown(layer, variants, args)
    print(text)
    out = Path(args.out or REPO / "benchmarks" / "results" / "lm")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"output_layer": layer, "variants": variants}, indent=2))


if __name__ == "__main__":
    main()
