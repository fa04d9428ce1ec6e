"""Prompt-to-Prompt image editing with cross-attention control."""
from .blend import LocalBlend
from .control import Edit, Refine, Replace, Reweight
from .inversion import Inversion, invert
from .joint_control import JointAttentionStore, JointReplace
from .mutual import MutualSelfAttention
from .pipeline import Output, edit, generate
from .pnp import PlugAndPlay
from .store import AttentionStore

__version__ = "0.1.0"
__all__ = ["AttentionStore", "Edit", "Inversion", "JointAttentionStore", "JointReplace", "LocalBlend",
           "MutualSelfAttention", "Output", "PlugAndPlay", "Refine", "Replace", "Reweight", "edit", "generate", "invert"]
