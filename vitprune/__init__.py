"""vitprune: structured lottery tickets (attention heads, MLP neurons) in Vision Transformers.

The library (docs/library.md), the functions the state loop itself calls:
    prunable(model)                     a plain timm ViT's heads and neurons made prunable, in place
    select(model, ratio=..., ...)       -> Structure: the groups to keep
    apply(model, structure, optimizer)  prune to it (dead groups zero, skipped; their moments zero)
    RsstRegularizer(model, keep, steps) RSST's penalty around your optimizer step, then its hard prune
    compact(model)                      -> the physically smaller timm model
    export(model, folder, card=None)    the deploy formats and a model card
    load_exported(folder)               -> what export wrote, ready to run
They load lazily, so `import vitprune` stays light. The subpackage vitprune.kernels is the
repository's top-level folder kernels/ (see setup.py).
"""
__version__ = "0.1.0"
__all__ = ["prunable", "select", "apply", "RsstRegularizer", "Structure", "compact", "export", "load_exported"]


def __getattr__(name):
    if name == "prunable":
        from vitprune.model import prunable as value
    elif name == "select":
        from vitprune.importance import select as value
    elif name == "apply":
        from vitprune.structure import apply_structure as value
    elif name == "Structure":
        from vitprune.structure import Structure as value
    elif name == "RsstRegularizer":
        from vitprune.methods import RsstRegularizer as value
    elif name == "compact":
        from vitprune.deploy import compact as value
    elif name == "export":
        from vitprune.deploy import export_model as value
    elif name == "load_exported":
        from vitprune.deploy import load_exported as value
    else:
        raise AttributeError(f"module 'vitprune' has no attribute {name!r}")
    return value


def __dir__():
    return sorted([*globals(), *__all__])
