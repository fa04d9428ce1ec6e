"""Prompt-to-Prompt image editing with cross-attention control."""
from .pipeline import Output, generate

__version__ = "0.1.0"
__all__ = ["Output", "generate"]
