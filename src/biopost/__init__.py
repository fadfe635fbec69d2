"""biopost: post-train biological reasoning models and study what each stage does to ID/OOD generalization."""

__version__ = "0.1.0"
