"""Stable Diffusion (and its family of latent diffusion models) in plain PyTorch. Knows nothing about editing."""
from .attention import CrossAttention, Site, attention_probs
from .clip import CLIPTextModel, Tokenizer, default_tokenizer
from .config import FAMILIES, PREDICTION_TYPES, CLIPTextConfig, Family, OpenCLIPTextConfig, SDConfig, UNetConfig, VAEConfig, load_config
from .ddim import DDIM
from .ldmbert import LDMBertConfig, LDMBertModel
from .pndm import PNDM
from .sd import PREFIXES, SAMPLERS, StableDiffusion, prefixes
from .unet import UNetModel
from .vae import AutoencoderKL
from .wordpiece import WordPieceTokenizer

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CrossAttention", "DDIM", "FAMILIES", "Family", "LDMBertConfig",
           "LDMBertModel", "OpenCLIPTextConfig", "PNDM", "PREDICTION_TYPES", "PREFIXES", "SAMPLERS", "SDConfig", "Site", "StableDiffusion",
           "Tokenizer", "UNetConfig", "UNetModel", "VAEConfig", "WordPieceTokenizer",
           "attention_probs", "default_tokenizer", "load_config", "prefixes"]
