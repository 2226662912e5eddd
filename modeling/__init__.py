"""The ActTail runtime, installed: ``acttail_export.modeling`` (this folder) beside ``acttail_export.kernels``.

In a checkpoint the files of both folders sit flat side by side, and the modeling files import the kernel files as
siblings (``from .topk import X``). Installed, the kernel files are ``acttail_export.kernels.<name>``: the finder below
answers ``acttail_export.modeling.<name>`` with that same module object (imported on first use, since Triton and numba
take seconds to import), so the runtime works in-process, editable or not. Not shipped: checkpoints need no help.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

_KERNELS = __name__.rpartition(".")[0] + ".kernels"


class _KernelFiles(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``<this package>.<name>`` as the module ``<package>.kernels.<name>``: one module, two names."""

    def find_spec(self, name, path=None, target=None):
        package, _, stem = name.rpartition(".")
        if package != __name__ or importlib.util.find_spec(f"{_KERNELS}.{stem}") is None:
            return None
        return importlib.machinery.ModuleSpec(name, self, loader_state=f"{_KERNELS}.{stem}")

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = module.__spec__  # import sets __spec__ to this alias's spec; exec_module puts it back
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


# Appended: this package's own files are found first, by the finders before it.
sys.meta_path.append(_KernelFiles())
