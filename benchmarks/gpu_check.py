"""The GPU check: versions, kernel correctness, kernel timings and end-to-end decode speed, in one run on a CUDA machine.

    bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (see that script); writes OUT_DIR/gpu_check.json
    python benchmarks/gpu_check.py --out DIR --smoke # here, on the CPU, in Triton's interpreter: tiny shapes, no timings

It needs only torch, triton and transformers: the shipped runtime (modeling/ and kernels/) is copied flat into a package
folder, as a checkpoint carries it, and imported from there. Sections, each written to the JSON as soon as it is done,
so a run cut short still reports what it measured:

1. ``correctness``: ``topk_cut`` and ``sparse_gemv`` (cut found in the GEMV, or given; threshold cuts; masked and
   compacted tiles) against the torch reference (exact kept sets) and a float64 GEMV, for bf16 / fp16 / fp32, d in
   {576, 4096, 11008, 14336}, rows 1/3/8, k in {1, 0.2d, d/2, d}, groups of three members, heavy ties, +-0, NaN, inf;
   every output poisoned first.
2. ``decode``: tokens/s of a 32-layer Llama-2-7B-shaped model with random bf16 weights built on the GPU, dense vs
   TopK and threshold at 50% / 80%, batch 1 and 4, eager (a plain decode loop over a static cache) and compiled (the same
   step captured once as a CUDA graph and replayed); then ``generate()`` as a user calls it with transformers' static
   cache, which compiles the decode step (dense vs TopK 50%, batch 1) while time is left.
3. ``kernels``: microseconds of dense ``F.linear`` against selection, GEMV and total (TopK: cut found inside the GEMV,
   and the two-launch variant; threshold), timed with ``triton.testing.do_bench`` and with CUDA-graph replay, at the
   Llama-2-7B and Llama-3-8B shapes, sparsity 0.5 / 0.7 / 0.8 / 0.9, bf16, batch 1, the autotuner's choice of tile
   (recorded); then 2 and 4 programs per SM at two shapes. Weights rotate over enough copies to exceed the L2 cache.
"""

import argparse
import contextlib
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (d_in, d_out)
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
PROGRAMS_SHAPES = [(4096, 4096), (4096, 14336)]  # where 2 and 4 programs per SM are timed too
CHECKS = ("kept_sets_exact", "within_bound", "given_within_bound")  # a correctness row passes when all are true


def import_runtime(folder: Path):
    """The shipped runtime as a checkpoint carries it: modeling/*.py and kernels/*.py side by side in one package."""
    package = folder / "acttail_runtime"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for source in [*(ROOT / "modeling").glob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        if source.name != "__init__.py":
            shutil.copy(source, package / source.name)
    sys.path.insert(0, str(folder))
    import acttail_runtime.modeling_acttail as modeling
    import acttail_runtime.topk as topk
    import acttail_runtime.topk_triton as kernels

    return modeling, topk, kernels


class Report:
    """The JSON written after every section (and every decode row), so a run cut short keeps what it measured."""

    def __init__(self, out: Path, smoke: bool):
        self.path = out / "gpu_check.json"
        cuda = torch.cuda.is_available()
        import transformers
        import triton

        self.data = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, smoke run)",
                     "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "triton": triton.__version__, "transformers": transformers.__version__, "smoke": smoke,
                     "correctness": [], "kernels": [], "decode": [], "errors": []}
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield
        except Exception as error:  # record it and go on: the other sections still measure
            traceback.print_exc()
            self.data["errors"].append(f"{name}: {type(error).__name__}: {error}")
        print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
        self.save()


@contextlib.contextmanager
def poisoned_outputs():
    """Every ``torch.empty`` returns NaN (floats) or -7777 (ints), so an output a kernel forgot to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -7777)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


@contextlib.contextmanager
def one_tile(kernels, pick: int, compact: bool):
    """The GEMV with one tile per element size (``TILES[size][pick]``, masked or compacted), not autotuned:
    correctness needs every variant, not the fastest of each shape. (The interpreter runs one small tile.)"""
    tuners = kernels._sparse_gemv_tuned
    saved = {size: tuner.configs for size, tuner in tuners.items()}
    for size, tuner in tuners.items():
        block_k, num_warps = (32, 4) if kernels.INTERPRET else kernels.TILES[size][pick]
        tuner.configs = [kernels.tile_config(block_k, num_warps, compact)]
    try:
        yield
    finally:
        for size, tuner in tuners.items():
            tuner.configs = saved[size]


def check_kernels(report: Report, topk, kernels, device: str, smoke: bool) -> None:
    """Exact kept sets and float64-close outputs for every dtype, length, batch, k, group and special value (each
    dtype's largest tile), and every other tile on bf16 rows of 4096; masked and compacted tiles alike."""
    for compact in (False, True):
        variant = "compacted" if compact else "masked"
        bf16_tiles = kernels.TILES[2]
        for pick in range(len(bf16_tiles) - 1):
            with one_tile(kernels, pick, compact):
                check_cases(report, topk, kernels, device, [torch.bfloat16], [97 if smoke else 4096], [1],
                            f"{'x'.join(map(str, bf16_tiles[pick]))} {variant}")
        with one_tile(kernels, -1, compact):
            check_cases(report, topk, kernels, device, [torch.bfloat16, torch.float16, torch.float32],
                        (97, 576) if smoke else (576, 4096, 11008, 14336), (1, 3) if smoke else (1, 3, 8),
                        f"largest {variant}")


def check_cases(report: Report, topk, kernels, device: str, dtypes, lengths, batches, tile: str) -> None:
    eps = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}
    generator = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for d in lengths:
            widths = [64, 32, 32] if d < 1000 else [1024, 256, 256]  # a q/k/v-like group
            weight_t = torch.randn(d, sum(widths), generator=generator).to(dtype).to(device)
            bias = torch.randn(sum(widths), generator=generator).to(dtype).to(device)
            for rows in batches:
                for kind in ("randn", "ties", "special"):
                    if kind == "randn":
                        x = torch.randn(rows, d, generator=generator)
                    elif kind == "ties":  # small integers and +-0: kept sets decided by the index rule
                        x = torch.randint(-3, 4, (rows, d), generator=generator).float()
                        x[:, ::7] = -0.0
                    else:  # NaN, inf, -inf and zeros in the first row; the other rows plain
                        x = torch.randn(rows, d, generator=generator)
                        x[0, 1], x[0, 5], x[0, 9], x[0, 20:40] = float("nan"), float("inf"), float("-inf"), 0.0
                    x = x.to(dtype).to(device)
                    ks = sorted({1, max(1, round(0.2 * d)), d // 2, d})
                    for members in (ks[:3], ks[1:]):  # three members, each its own k on the same ranking
                        row = {"dtype": str(dtype), "d": d, "rows": rows, "input": kind, "ks": members, "tile": tile}
                        with poisoned_outputs():
                            cut = kernels.topk_cut(x, members)
                            fused = kernels.sparse_gemv(x, weight_t, bias, widths, members, None, max(members) / d)
                            given = kernels.sparse_gemv(x, weight_t, bias, widths, [], cut, max(members) / d)
                        masks = [topk.topk_mask(x, k) for k in members]
                        row["kept_sets_exact"] = all(torch.equal(kept_by_cut(topk, x, cut[:, m:m + 1])[:, 0], masks[m])
                                                     for m in range(len(members)))
                        row["within_bound"] = gemv_within_bound(x, weight_t, bias, widths, masks, fused, eps[dtype])
                        row["given_within_bound"] = gemv_within_bound(x, weight_t, bias, widths, masks, given, eps[dtype])
                        report.data["correctness"].append(row)
            # threshold cuts: the quantiles of |x| of one plain input
            x = torch.randn(2, d, generator=generator).to(dtype).to(device)
            thresholds = [float(torch.quantile(x.float().abs().flatten().cpu(), s)) for s in (0.5, 0.8, 0.3)]
            with poisoned_outputs():
                cut = kernels.threshold_cut(thresholds, dtype, device)
                y = kernels.sparse_gemv(x, weight_t, bias, widths, [], cut, 0.7)  # the most a member keeps
            masks = [~(x.abs() <= t) for t in thresholds]
            report.data["correctness"].append({
                "dtype": str(dtype), "d": d, "rows": 2, "input": "threshold", "thresholds": thresholds, "tile": tile,
                "within_bound": gemv_within_bound(x, weight_t, bias, widths, masks, y, eps[dtype])})
        failed = [row for row in report.data["correctness"] if row["dtype"] == str(dtype) and not all(
            row.get(key, True) for key in CHECKS)]
        print(f"  {dtype} tile {tile}: {len(failed)} failed", *failed[:3], sep="\n    ", flush=True)


def kept_by_cut(topk, x: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    keys = topk.magnitude_keys(x).int()[:, None, :]
    index = torch.arange(x.shape[1], device=x.device)
    return (keys > cut[..., 0:1]) | ((keys == cut[..., 0:1]) & (index <= cut[..., 1:2]))


def gemv_within_bound(x, weight_t, bias, widths, masks, y, eps) -> bool:
    """|y - ref| <= eps |ref| + 1e-5 sum|x_i w_i| against float64 (NaN where the reference is NaN)."""
    start, ok = 0, True
    for width, mask in zip(widths, masks):
        xs = torch.where(mask, x, 0).double()
        w = weight_t[:, start:start + width].double()
        ref = xs @ w + bias[start:start + width].double()
        mine = y[:, start:start + width].double()
        nan = torch.isnan(ref)
        ok &= bool(torch.equal(torch.isnan(mine), nan))
        bound = eps * ref.abs() + 1e-5 * (xs.abs() @ w.abs())
        ok &= bool(((mine - ref).abs() <= bound)[~nan].all())
        start += width
    return ok


def time_us(fn, graph: bool) -> float:
    """Median microseconds of fn: do_bench (events), or the replay of a CUDA graph of 20 calls, divided by 20. Without
    CUDA (the smoke run) one call's wall time, which only shows that the code runs."""
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    if not graph:
        return 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")
    replay = captured(fn, calls=20)
    return 1000 * do_bench(replay, warmup=10, rep=100, return_mode="median") / 20


def captured(fn, calls: int = 1):
    """``calls`` calls of fn captured as one CUDA graph (after warm-up calls on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def bench_kernels(report: Report, kernels, device: str, smoke: bool, deadline: float) -> None:
    """Dense F.linear against the sparse kernels at 7B / 8B shapes, bf16, batch 1; then, at two shapes, the GEMV with
    2 and 4 programs per SM (more programs hide more memory latency, but each finds its row's cut again)."""
    dtype = torch.bfloat16
    shapes, programs_shapes = ([(128, 96), (96, 128)], [(128, 96)]) if smoke else (KERNEL_SHAPES, PROGRAMS_SHAPES)
    l2 = 0 if smoke else torch.cuda.get_device_properties(device).L2_cache_size
    for d_in, d_out in shapes:
        if time.perf_counter() > deadline:
            report.data["errors"].append(f"kernels: stopped at the time limit before {d_in}x{d_out}")
            break
        nbytes = d_in * d_out * 2
        copies = max(2, math.ceil(3 * l2 / nbytes))  # rotate so that no call finds its weight in L2
        weights = [torch.randn(d_out, d_in, device=device, dtype=dtype) for _ in range(copies)]
        weights_t = [w.t().contiguous() for w in weights]
        xs = [torch.randn(1, d_in, device=device, dtype=dtype) for _ in range(copies)]
        turn = [0]

        def rotating(fn):
            def call():
                i = turn[0] = (turn[0] + 1) % copies
                return fn(i)
            return call

        def add_row(mode, s, graph, dense, sparse_us, **extra):
            kept = max(1, round((1 - s) * d_in)) / d_in
            report.data["kernels"].append({
                "shape": [d_in, d_out], "dtype": "bfloat16", "mode": mode, "sparsity": s, "graph": graph,
                "programs_per_sm": kernels.PROGRAMS_PER_SM, "dense_us": dense, "sparse_us": sparse_us,
                "speedup": dense / sparse_us, "ideal": 1 / kept, "dense_gbs": nbytes / dense / 1e3,
                "sparse_gbs": kept * nbytes / sparse_us / 1e3, **extra})

        def threshold_of(s):
            return kernels.threshold_cut([float(torch.quantile(xs[0].float().abs().flatten().cpu(), s))], dtype, device)

        for graph in (False,) if smoke else (False, True):
            dense = time_us(rotating(lambda i: F.linear(xs[i], weights[i])), graph)
            for s in SPARSITIES:
                k = max(1, round((1 - s) * d_in))
                cuts = [kernels.topk_cut(x, [k]) for x in xs]
                threshold = threshold_of(s)
                timings = {
                    "topk": time_us(rotating(lambda i: kernels.sparse_gemv(xs[i], weights_t[i], None, [d_out], [k], None, k / d_in)), graph),
                    "topk_two_launch": time_us(rotating(lambda i: kernels.sparse_gemv(
                        xs[i], weights_t[i], None, [d_out], [], kernels.topk_cut(xs[i], [k]), k / d_in)), graph),
                    "selection": time_us(rotating(lambda i: kernels.topk_cut(xs[i], [k])), graph),
                    "gemv": time_us(rotating(lambda i: kernels.sparse_gemv(xs[i], weights_t[i], None, [d_out], [], cuts[i], k / d_in)), graph),
                    "threshold": time_us(rotating(lambda i: kernels.sparse_gemv(xs[i], weights_t[i], None, [d_out], [], threshold, 1 - s)), graph),
                }
                for mode in ("topk", "topk_two_launch", "threshold"):
                    extra = {"selection_us": timings["selection"], "gemv_us": timings["gemv"]} if mode == "topk_two_launch" else {}
                    add_row(mode, s, graph, dense, timings[mode], **extra)
                print(f"  {d_in}x{d_out} s={s} graph={graph}: dense {dense:.1f} us, " + ", ".join(
                    f"{name} {us:.1f}" for name, us in timings.items()), flush=True)
        if (d_in, d_out) not in programs_shapes:
            continue
        try:
            for programs in (2, 4):
                kernels.PROGRAMS_PER_SM = programs
                for s in (0.5, 0.8):
                    k = max(1, round((1 - s) * d_in))
                    threshold = threshold_of(s)
                    for mode, fn in (("topk", lambda i: kernels.sparse_gemv(xs[i], weights_t[i], None, [d_out], [k], None, k / d_in)),
                                     ("threshold", lambda i: kernels.sparse_gemv(xs[i], weights_t[i], None, [d_out], [], threshold, 1 - s))):
                        sparse_us = time_us(rotating(fn), graph=not smoke)
                        add_row(mode, s, not smoke, dense, sparse_us)
                        print(f"  {d_in}x{d_out} s={s} {mode} {kernels.PROGRAMS_PER_SM} programs/SM: {sparse_us:.1f} us "
                              f"(dense {dense:.1f})", flush=True)
        finally:
            kernels.PROGRAMS_PER_SM = 1
    # which tile the autotuner chose for each shape: the next tuning starts from these
    report.data["tuned"] = [{"key": [str(part) for part in key], "config": str(config)}
                            for tuner in kernels._sparse_gemv_tuned.values() for key, config in tuner.cache.items()]


def uniform_block(model, sparsity: float, thresholds: dict[str, float] | None = None) -> dict:
    """An activation_sparsity block keeping round((1 - s) d_in) inputs at every projection (speed depends on the bytes
    read, which the budget sets), or with the given thresholds (mode "threshold")."""
    from acttail_runtime.projections import parse_projection  # the runtime's own matcher (see import_runtime)

    modules, weight_total, skipped = {}, 0, 0.0
    for name, module in model.named_modules():
        if parse_projection(name):
            keep = min(max(round((1 - sparsity) * module.in_features), 1), module.in_features)
            modules[name] = {"alpha": 0.0, "sparsity": round(1 - keep / module.in_features, 4), "keep": keep,
                             "in_features": module.in_features}
            if thresholds is not None:
                modules[name]["threshold"] = thresholds[name]
            weight_total += module.weight.numel()
            skipped += module.weight.numel() * (1 - keep / module.in_features)
    return {"format_version": 1, "method": "uniform", "mode": "topk" if thresholds is None else "threshold",
            "sites": "all", "target_sparsity": sparsity, "effective_sparsity": round(skipped / weight_total, 6),
            "estimator": "mid", "epsilon": 0.0, "sparser": "heavy-tail", "prefill": "sparse", "modules": modules}


def build_model(modeling, device: str, smoke: bool):
    from acttail_runtime.configuration_acttail import ActTailLlamaConfig

    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4) if smoke else dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32)
    config = ActTailLlamaConfig(**shape, max_position_embeddings=4096, sparse_backend="triton")
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = modeling.ActTailLlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def calibrated_thresholds(model, sparsity: float, ids: torch.Tensor) -> dict[str, float]:
    """Per projection, the s-quantile of |x| over a prefill of ``ids``, run dense (threshold 0 everywhere)."""
    model.set_activation_sparsity(uniform_block(model, 0.0, {name: 0.0 for name, _ in model.topk_modules().items()}))
    samples, hooks = {}, []
    for name, module in model.topk_modules().items():
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, name=name: samples.__setitem__(name, args[0].detach().float().abs().flatten()[:2**20].cpu())))
    with torch.inference_mode():
        model(ids)
    for hook in hooks:
        hook.remove()
    return {name: float(torch.quantile(values, sparsity)) for name, values in samples.items()}


def decode_rate(model, batch: int, graph: bool, steps: int, prompt: int = 32) -> float:
    """Tokens/s of ``steps`` greedy decode steps after a prompt, over a static KV cache: a plain loop, or one step
    captured as a CUDA graph and replayed."""
    from transformers import StaticCache

    device = model.device
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device)).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt], device=device)

        def step():
            out = model(token, past_key_values=cache, cache_position=position).logits
            token.copy_(out[:, -1:].argmax(-1))
            position.add_(1)

        run = captured(step) if graph else step
        position.fill_(prompt)
        run()  # warm
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_decode(report: Report, modeling, device: str, smoke: bool, deadline: float) -> None:
    model = build_model(modeling, device, smoke)
    steps = 2 if smoke else 64
    calibration = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
    graphs = (False,) if smoke else (False, True)
    for batch in (1, 4):
        for graph in graphs:
            model.set_activation_sparsity(uniform_block(model, 0.0))
            model.prepare_sparse_decode()
            dense = decode_rate(model, batch, graph, steps)
            print(f"  dense batch={batch} graph={graph}: {dense:.1f} tokens/s", flush=True)
            for sparsity in (0.5, 0.8):
                for mode in ("topk", "threshold"):
                    if time.perf_counter() > deadline:
                        report.data["errors"].append("decode: stopped at the time limit")
                        return
                    try:
                        thresholds = calibrated_thresholds(model, sparsity, calibration) if mode == "threshold" else None
                        model.set_activation_sparsity(uniform_block(model, sparsity, thresholds))
                        model.prepare_sparse_decode()
                        paths = sorted({m.group.path for m in model.topk_modules().values() if m.group is not None})
                        rate = decode_rate(model, batch, graph, steps)
                    except Exception as error:  # one row lost, not the section
                        traceback.print_exc()
                        report.data["errors"].append(f"decode {mode} {sparsity} batch={batch} graph={graph}: {error}")
                        continue
                    report.data["decode"].append({
                        "mode": mode, "sparsity": sparsity, "compiled": graph, "how": "cuda-graph" if graph else "eager",
                        "batch": batch, "tokens_per_s": rate, "dense_tokens_per_s": dense, "speedup": rate / dense,
                        "sparse_paths": paths})
                    report.save()
                    print(f"  {mode} {sparsity} batch={batch} graph={graph}: {rate:.1f} tokens/s "
                          f"({rate / dense:.2f}x, paths {paths})", flush=True)
    if time.perf_counter() > deadline - 150:
        report.data["errors"].append("decode: no time left for generate()")
        return
    # generate() as a user calls it: on CUDA, transformers' static cache compiles the decode step (torch.compile)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    new_tokens = 4 if smoke else 64
    rates = {}
    for sparsity in (0.0, 0.5):
        model.set_activation_sparsity(uniform_block(model, sparsity))
        for attempt in ("compile", "timed"):
            synchronize(device)
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           cache_implementation="static")
            synchronize(device)
        rates[sparsity] = new_tokens / (time.perf_counter() - start)
        print(f"  generate(static cache) s={sparsity}: {rates[sparsity]:.1f} tokens/s", flush=True)
    report.data["decode"].append({"mode": "topk", "sparsity": 0.5, "compiled": device == "cuda",
                                  "how": "generate-static-cache", "batch": 1, "tokens_per_s": rates[0.5],
                                  "dense_tokens_per_s": rates[0.0], "speedup": rates[0.5] / rates[0.0]})


def markdown(data: dict) -> str:
    lines = [f"GPU check on {data['device']}, {data['date']}: torch {data['torch']}, triton {data['triton']}, "
             f"transformers {data['transformers']}", ""]
    checks = data["correctness"]
    failed = [row for row in checks if not all(row.get(k, True) for k in CHECKS)]
    lines += [f"Correctness: {len(checks) - len(failed)} of {len(checks)} cases pass.", ""]
    if data["kernels"]:
        lines += ["| shape (in x out) | mode | s | timing | programs/SM | dense us | sparse us | speed-up | ideal | "
                  "sparse GB/s |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for row in data["kernels"]:
            lines.append(f"| {row['shape'][0]}x{row['shape'][1]} | {row['mode']} | {row['sparsity']} | "
                         f"{'graph' if row['graph'] else 'do_bench'} | {row['programs_per_sm']} | {row['dense_us']:.1f} | "
                         f"{row['sparse_us']:.1f} | {row['speedup']:.2f}x | {row['ideal']:.1f}x | {row['sparse_gbs']:.0f} |")
        lines.append("")
    if data["decode"]:
        lines += ["| decode | s | batch | how | tokens/s | dense tokens/s | speed-up |", "|---|---:|---:|---|---:|---:|---:|"]
        for row in data["decode"]:
            lines.append(f"| {row['mode']} | {row['sparsity']} | {row['batch']} | {row['how']} | "
                         f"{row['tokens_per_s']:.1f} | {row['dense_tokens_per_s']:.1f} | {row['speedup']:.2f}x |")
    if data.get("tuned"):
        lines += ["", "Autotuned GEMV tiles (key: D, N, rows per split, cut found, atomic, BLOCK_N, kept eighths, dtypes):",
                  *[f"- {', '.join(row['key'])}: {row['config']}" for row in data["tuned"]]]
    if data["errors"]:
        lines += ["", "Errors:", *[f"- {error}" for error in data["errors"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    parser.add_argument("--minutes", type=float, default=7.0, help="time limit; later sections stop early")
    parser.add_argument("--sections", default="correctness,decode,kernels", help="some of correctness,decode,kernels; they run in that order")
    args = parser.parse_args()
    deadline = time.perf_counter() + 60 * args.minutes
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    report = Report(args.out, args.smoke)
    print(f"{report.data['device']}: torch {torch.__version__}, triton {report.data['triton']}, "
          f"transformers {report.data['transformers']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        modeling, topk, kernels = import_runtime(Path(folder))
        sections = args.sections.split(",")
        if "correctness" in sections:
            with report.section("correctness"):
                check_kernels(report, topk, kernels, device, args.smoke)
        if "decode" in sections:  # before the kernel timings: end-to-end speed is the headline
            with report.section("decode"):
                bench_decode(report, modeling, device, args.smoke, deadline)
        if "kernels" in sections:
            with report.section("kernels"):
                bench_kernels(report, kernels, device, args.smoke, deadline)
    (args.out / "gpu_check.md").write_text(markdown(report.data))
    print(markdown(report.data))


if __name__ == "__main__":
    main()
