"""acttail-export: export Hugging Face causal LMs with ActTail activation sparsity.

    from acttail_export import ExportOptions, export
    export("./my-llama", "out/my-llama-50", ExportOptions(sparsity=0.5))
"""

from .pipeline import ExportOptions, ExportResult, add_perplexity, export

__all__ = ["ExportOptions", "ExportResult", "export", "add_perplexity"]
