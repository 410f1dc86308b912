"""edgecl: continual learning that ships — train tasks one after another, pack one artifact, run it on a device.

Importing `edgecl` stays light (no torch, no onnx): the heavy parts load only from their subpackages.
"""
__version__ = "0.2.0"

from edgecl.errors import ArtifactError, BudgetError, EdgeclError, UsageError

__all__ = ["__version__", "ArtifactError", "BudgetError", "EdgeclError", "UsageError"]
