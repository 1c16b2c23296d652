"""vitprune: structured lottery tickets (attention heads, MLP neurons) in Vision Transformers."""
__version__ = "0.1.0"
