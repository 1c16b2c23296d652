"""vitprune: structured lottery tickets (attention heads, MLP neurons) in Vision Transformers.

The subpackage vitprune.kernels is the repository's top-level folder kernels/ (see setup.py).
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import vitprune` stays light: vitprune.load_exported(DIR) -> ready nn.Module.
    if name == "load_exported":
        from vitprune.deploy import load_exported
        return load_exported
    raise AttributeError(f"module 'vitprune' has no attribute {name!r}")
