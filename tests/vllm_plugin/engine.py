"""Run one vLLM engine on a checkpoint, as a user's script would, and print what it computed as one JSON line.

``python engine.py REQUEST.json``; the request names the model, engine arguments, token windows to score
teacher-forced (prompt log-probabilities), prompts and chats to answer greedily, and vLLM layers whose input and output
to capture during the scoring. Run in its own process: vLLM spawns its engine, and a finished one frees its memory.
"""

import gc
import json
import os
import sys

import torch

ENGINE = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.1, "max_model_len": 512,
          "max_num_batched_tokens": 1024, "seed": 0}


def _install_hooks(names, model):
    """Forward hooks that keep each named layer's inputs and outputs on the model, every step's tokens in order (run
    inside the worker; the scheduler may split the scored windows into several steps)."""
    model.acttail_captured = {name: ([], []) for name in names}
    for name in names:
        def hook(layer, args, output, name=name):
            output = output[0] if isinstance(output, tuple) else output
            model.acttail_captured[name][0].append(args[0].detach().clone())
            model.acttail_captured[name][1].append(output.detach().clone())
        model.get_submodule(name).register_forward_hook(hook)


def kept_signature(mask: torch.Tensor) -> list[int]:
    """One integer per token naming its kept set (a fixed random weight per input, summed over the kept ones)."""
    weights = torch.randint(0, 2**40, (mask.shape[-1],), generator=torch.Generator().manual_seed(0))
    return (mask.long() * weights).sum(-1).tolist()


def _install_signatures(model):
    """Forward hooks on every sparse vLLM layer: each member's kept-set signature of every token, steps in order."""
    from acttail_export.kernels.topk import topk_mask
    from acttail_export.vllm_sparse import SparseLinearMethod

    model.acttail_signatures = {}
    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        if isinstance(method, SparseLinearMethod):
            def hook(layer, args, output, name=name, method=method):
                x = args[0]
                if method.gather:  # a row-parallel shard: the whole input, as the layer ranks it (every rank runs this)
                    from vllm.distributed import tensor_model_parallel_all_gather
                    x = tensor_model_parallel_all_gather(x, dim=-1)
                masks = [x.abs() > t for t in method.thresholds] or [topk_mask(x, k) for k in method.ks]
                signatures = model.acttail_signatures.setdefault(name, [[] for _ in masks])
                for member, mask in zip(signatures, masks):
                    member.extend(kept_signature(mask))
            layer.register_forward_hook(hook)


def _collect_signatures(model):
    return model.acttail_signatures


def _collect(model):
    return {name: (torch.cat(xs).tolist(), torch.cat(ys).tolist()) for name, (xs, ys) in model.acttail_captured.items()}


def main(request: dict) -> dict:
    from functools import partial

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(request["model"], **{**ENGINE, **request.get("engine", {})})
    report = {}
    if request.get("capture"):
        llm.apply_model(partial(_install_hooks, request["capture"]))
    if request.get("signatures"):
        llm.apply_model(partial(_install_signatures))
    if windows := request.get("windows"):
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], scoring, use_tqdm=False)
        report["logprobs"] = [[step[token].logprob for step, token in zip(out.prompt_logprobs[1:], w[1:])]
                              for out, w in zip(outputs, windows)]
        if request.get("capture"):
            report["captured"] = llm.apply_model(partial(_collect))[0]  # a partial: pickled by reference
    greedy = SamplingParams(max_tokens=request.get("max_tokens", 16), temperature=0)
    if prompts := request.get("prompts"):
        # one at a time, as a server answers one request: a batch of one takes the same decode path
        outputs = [llm.generate([prompt], greedy, use_tqdm=False)[0] for prompt in prompts]
        report["texts"] = [out.outputs[0].text for out in outputs]
        report["tokens"] = [list(out.outputs[0].token_ids) for out in outputs]
        report["prompt_tokens"] = [list(out.prompt_token_ids) for out in outputs]
    if chats := request.get("chats"):
        report["chat_texts"] = [out.outputs[0].text for out in llm.chat(chats, greedy, use_tqdm=False)]
    if request.get("signatures"):  # every token row in order: the windows', then each prompt's forward passes
        report["signatures"] = llm.apply_model(partial(_collect_signatures))[0]
    del llm  # shut the engine down here (its finalizer), while the interpreter is whole
    gc.collect()
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)  # this process only sends requests; the engine process computes
    with open(sys.argv[1]) as file:
        result = main(json.load(file))
    print("\nREPORT " + json.dumps(result), flush=True)
    # Leave without the interpreter's teardown: there, vLLM's front end now and then aborts the process ("terminate
    # called without an active exception", exit -6, after the report was computed: once in CI, once in 16 runs of
    # this script here), a race in vLLM's shutdown that is not what these tests check.
    os._exit(0)
