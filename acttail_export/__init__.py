"""acttail-export: export Hugging Face causal LMs with ActTail activation sparsity.

    from acttail_export import ExportOptions, export
    export("./my-llama", "out/my-llama-50", ExportOptions(sparsity=0.5))
"""

__all__ = ["ExportOptions", "ExportResult", "export", "add_perplexity"]


def __getattr__(name: str):
    # On first use only: the runtime (acttail_export.modeling), imported in-process by the studies and user code, needs
    # none of the exporter's imports (matplotlib, the Hub client, calibration).
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
