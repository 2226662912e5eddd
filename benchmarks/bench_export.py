"""Wall time and peak RSS of `acttail-export export` on SmolLM2-135M, from the GGUF and from its safetensors folder.

Each export runs in its own process; its peak RSS is its own ``VmHWM`` (``bench_export_7b.run_measured``). The GGUF row starts from an
empty conversion cache, so it includes dequantizing the GGUF with transformers.

    .venv/bin/python benchmarks/bench_export.py
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_export_7b import run_measured  # noqa: E402

CLI = str(Path(sys.executable).parent / "acttail-export")


def measure(args: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one CLI run."""
    wall, _, peak, _ = run_measured([CLI, *args], env)
    return wall, peak


ACTTAIL_50 = ["--sparsity", "0.5", "--allocation", "acttail"]  # the rows BENCHMARKS.md records (no calibration)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ACTTAIL_CACHE": f"{tmp}/cache"}
        rows = [("GGUF (default model, cold conversion cache)", *measure(["export", f"{tmp}/a", *ACTTAIL_50], env))]
        folder = next(Path(f"{tmp}/cache/gguf").iterdir())
        rows.append(("converted safetensors folder", *measure(["export", str(folder), f"{tmp}/b", *ACTTAIL_50], env)))
    print("| input | wall time (s) | peak RSS (GiB) |")
    print("|---|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
