"""Feature-detected shims over torch APIs that moved between the supported releases (2.11-2.15).

Each name is looked up by what the installed torch has, never by its version string.
"""

try:  # torch >= 2.13 (and some 2.12 builds)
    from torch.fx.experimental.symbolic_shapes import optimization_hint as size_hint
except ImportError:  # torch 2.11: the same read of a symbolic size's example value, without a guard
    from torch.fx.experimental.symbolic_shapes import hint_int as size_hint

__all__ = ["size_hint"]
