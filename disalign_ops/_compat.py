"""Feature-detected shims over torch APIs that moved between the supported releases (2.11-2.15).

Each name is looked up by what the installed torch has, never by its version string.
"""

import torch.fx.experimental.symbolic_shapes as _symbolic_shapes

# The example value of a symbolic size, read without adding a guard. newer torch (2.14) calls it
# `optimization_hint`; torch 2.11 `size_hint` (its `hint_int` is the same, but deprecated: it warns
# with a FutureWarning on every call).
size_hint = getattr(_symbolic_shapes, "optimization_hint", None) or _symbolic_shapes.size_hint

__all__ = ["size_hint"]
