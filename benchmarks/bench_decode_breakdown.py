"""Where a SmolLM2 decode step's time goes on CPU, dense against sparse: the projections, lm_head, and everything else
transformers does in a step; and the speed-up a sparse GEMV at dense's own bandwidth would give.

    python benchmarks/bench_decode_breakdown.py --dtype float32
    python benchmarks/bench_decode_breakdown.py --dtype bfloat16 --sparsity 0.5

One process loads the first export (``from_pretrained(..., trust_remote_code=True)``, as a user would) and times
``generate()`` of ``--new-tokens`` greedy tokens for the dense row (every k = d_in, weights in their checkpoint layout)
and each sparse row, ``--rounds`` times after a warm-up, keeping each row's fastest run. During the runs the seven
projections (``TopKLinear.forward`` and the sparse groups run by their parents' pre-hooks, outermost call only) and
``lm_head`` are timed; a one-token ``generate()`` (the prompt) is subtracted from every figure, so they are per decode
step. "rest" is the step minus both: norms, rotary embeddings, attention over the cache, residuals, sampling, Python.

The bound: the step if the projections took the dense row's projection time scaled by the share of weight bytes the
sparse row reads (a GEMV at dense's bandwidth, selection free), with lm_head and rest as measured in that sparse row.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import checkpoint_layout, saved_blocks, smollm2_exports  # noqa: E402


class StepClock:
    """Seconds spent in the projections and in lm_head since the last ``reset`` (outermost projection calls only:
    a single-member group runs inside its module's forward)."""

    def __init__(self, model):
        self.modeling = sys.modules[type(model).__module__]
        self.projections = self.head = 0.0
        self.depth = 0
        for cls, method in ((self.modeling.TopKLinear, "forward"), (self.modeling.SparseGroup, "__call__")):
            setattr(cls, method, self._timed(getattr(cls, method)))
        model.lm_head.register_forward_pre_hook(self._head_start)
        model.lm_head.register_forward_hook(self._head_end)

    def _timed(self, function):
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:
                    self.projections += time.perf_counter() - start
        return timed

    def _head_start(self, module, args):
        self._head_started = time.perf_counter()

    def _head_end(self, module, args, output):
        self.head += time.perf_counter() - self._head_started

    def reset(self) -> None:
        self.projections = self.head = 0.0


def decode_step(model, clock: StepClock, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    """(step, projections, lm_head) seconds per decode step of one ``generate()``, the prompt's share subtracted."""
    def run(n: int) -> tuple[float, float, float]:
        clock.reset()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, clock.projections, clock.head

    prompt = min((run(1) for _ in range(2)), key=lambda r: r[0])
    return tuple((whole - part) / (new_tokens - 1) for whole, part in zip(run(new_tokens), prompt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--sparsity", default="0.5,0.7", help="comma-separated sparsities of the exports")
    parser.add_argument("--new-tokens", type=int, default=49)
    parser.add_argument("--rounds", type=int, default=3, help="timed generate() calls per row")
    parser.add_argument("--exports", type=Path, default=None, help="reuse the exports in this folder (one per sparsity)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from acttail_export.evaluate import dense_block
    from acttail_export.text import wikipedia_text

    sparsities = [float(s) for s in args.sparsity.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.exports or Path(tmp)
        blocks = saved_blocks(sparsities, folder) or smollm2_exports(sparsities, folder)[1]
        checkpoint = folder / f"s{sparsities[0]}"
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True,
                                                     dtype=getattr(torch, args.dtype)).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        ids = tokenizer(wikipedia_text()[:20000], return_tensors="pt").input_ids[:, :64]
        clock = StepClock(model)
        rows = {"dense": dense_block(blocks[sparsities[0]]), **{f"{s:.0%}": blocks[s] for s in sparsities}}
        best = {}
        for round_ in range(args.rounds + 1):  # round 0 warms every row up (numba's cache, the allocator)
            for name, block in (list(rows.items()) if round_ % 2 else list(rows.items())[::-1]):
                model.set_activation_sparsity(block)
                if name == "dense":
                    checkpoint_layout(model)
                measured = decode_step(model, clock, ids, args.new_tokens if round_ else 4)
                if round_ and (name not in best or measured[0] < best[name][0]):
                    best[name] = measured
        print(f"SmolLM2-135M {args.dtype}, batch 1, generate() of {args.new_tokens} tokens after a 64-token prompt, "
              f"fastest of {args.rounds} per row, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| row | step ms | projections ms | lm_head ms | rest ms | speed-up | bound: GEMV at dense's bandwidth |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        dense_step, dense_projections, _ = best["dense"]
        for name, (step, projections, head) in best.items():
            rest = step - projections - head
            read = 1.0 if name == "dense" else 1 - rows[name]["effective_sparsity"]
            bound = dense_step / (dense_projections * read + head + rest)
            print(f"| {name} | {step * 1e3:.2f} | {projections * 1e3:.2f} | {head * 1e3:.2f} | {rest * 1e3:.2f} | "
                  f"{dense_step / step:.2f}x | {bound:.2f}x |")


if __name__ == "__main__":
    main()
