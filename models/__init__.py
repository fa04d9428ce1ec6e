"""Stable Diffusion v1.x in plain PyTorch. Knows nothing about editing."""
from .attention import CrossAttention, Site, attention_probs
from .clip import CLIPTextModel, Tokenizer, default_tokenizer
from .config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig, load_config
from .ddim import DDIM
from .pndm import PNDM
from .sd import PREFIXES, StableDiffusion
from .unet import UNetModel
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CrossAttention", "DDIM", "PNDM", "PREFIXES", "SDConfig",
           "Site", "StableDiffusion", "Tokenizer", "UNetConfig", "UNetModel", "VAEConfig", "attention_probs",
           "default_tokenizer", "load_config"]
