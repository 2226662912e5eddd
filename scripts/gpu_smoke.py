"""GPU smoke check (run on a CUDA machine): spectra on the GPU match the CPU's, and an exported checkpoint loads with
trust_remote_code, runs in bf16 on the GPU and generates with the KV cache.

    python scripts/gpu_smoke.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from acttail_export.spectra import alphas_from_spectra, compute_spectra
from acttail_export.weights import resolve_model

CLI = str(Path(sys.executable).parent / "acttail-export")


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(f"{tmp}/tiny")
        source = resolve_model(f"{tmp}/tiny")
        cpu = alphas_from_spectra(compute_spectra(source, "cpu", progress=False))
        gpu = alphas_from_spectra(compute_spectra(source, "cuda", progress=False))
        worst = max(abs(cpu[n] - gpu[n]) / cpu[n] for n in cpu)
        print(f"alpha cpu vs cuda: max relative difference {worst:.2e}")
        assert worst < 1e-3
        subprocess.run([CLI, "export", f"{tmp}/tiny", f"{tmp}/out", "--sparsity", "0.5", "--allocation", "acttail",
                        "--device", "cuda"], check=True)
        reference = AutoModelForCausalLM.from_pretrained(f"{tmp}/out", trust_remote_code=True, dtype=torch.float32)
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(f"{tmp}/out", trust_remote_code=True, dtype=dtype).cuda()
            with torch.inference_mode():
                got = model(ids.cuda()).logits.float().cpu()
                want = reference(ids).logits
            print(f"{dtype} cuda vs float32 cpu logits: max abs difference {(got - want).abs().max():.3e} "
                  f"(scale {want.abs().max():.2f})")
        cached = model.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
        uncached = model.generate(ids.cuda(), max_new_tokens=8, do_sample=False, use_cache=False)
        print("generate with cache == without:", torch.equal(cached, uncached))
        print(type(model).__name__, np.unique([m.keep for m in model.modules() if hasattr(m, "keep")]).size, "distinct keeps")


if __name__ == "__main__":
    main()
