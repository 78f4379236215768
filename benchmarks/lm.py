"""Language-model variants: the output layer's time (full softmax vs VQ-Logits) and each variant of the CPU
comparison trained at equal steps. Measures, does not assert.

    .venv/bin/python benchmarks/lm.py [--vocab 50257 --codes 1024 --dim 768 --tokens 1024] [--steps 300]

1. Output layer, forward + backward of the loss from hidden states (B*S tokens, d) at V = 50k, K = 1024 (the
   paper's 6x claim): the full softmax (h W^T then cross-entropy over V), VQ-Logits as the official code computes it
   (codebook logits scattered to V, then softmax over V), and VQ-Logits' exact loss from the K codebook logits and
   the cluster sizes (lab_kernels/vq_logits.py), which never builds V-sized logits. Times are medians of repeats.
2. The experiments/lm/stdlib_*.yaml variants through the orchestrator's step loop in this process (one rank, no
   Ray, each in a fresh process): tokens/s, peak resident memory of that process, and validation perplexity after
   `--steps` steps on the embedded corpus.
Writes benchmarks/results/lm.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lab_kernels.vq_logits import cluster_sizes, contiguous_mapping, vq_cross_entropy, vq_cross_entropy_reference
from orchestrator import spec as spec_mod
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


def train_variant(name: str, steps: int) -> dict[str, float]:
    """One variant in a fresh process, so that its peak resident memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_train_variant, (name, steps))


def _train_variant(name: str, steps: int) -> dict[str, float]:
    spec = spec_mod.load(REPO / "experiments" / "lm" / f"{name}.yaml",
                         [f"optim.steps={steps}", "resources.workers=1", "eval.every=null",
                          "checkpoint.every=1000000"])
    started = time.perf_counter()
    metrics = train_in_process(spec, torch.device("cpu"))
    seconds = time.perf_counter() - started
    tokens = steps * spec.optim.batch_size * spec.data.seq_len
    return {"val_ppl": metrics["eval/ppl"], "val_loss": metrics["eval/loss"], "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm"))
    args = parser.parse_args()
    layer = output_layer(args.vocab, args.codes, args.dim, args.tokens, args.repeats)
    print(json.dumps(layer, indent=2), flush=True)
    variants = {}
    for name in args.variants:
        variants[name] = train_variant(name, args.steps)
        print(name, json.dumps(variants[name]), flush=True)
    text = markdown(layer, variants, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"output_layer": layer, "variants": variants}, indent=2))


if __name__ == "__main__":
    main()
