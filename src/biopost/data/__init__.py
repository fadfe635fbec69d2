"""Examples, splits and chat formatting."""

from biopost.data.example import Example, format_target
from biopost.data.splits import LeakageError, SplitRule, Splits, make_splits

__all__ = ["Example", "format_target", "SplitRule", "Splits", "make_splits", "LeakageError"]
