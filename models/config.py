"""Frozen architecture configs, read from CompVis-style YAML (`v1-inference.yaml`) or built in code.

The defaults are Stable Diffusion v1.x. `SDConfig.from_ldm(d)` reads the dict of a CompVis
`v1-inference.yaml` (the file users keep beside their checkpoints, also stored as JSON in the
safetensors metadata key `ldm_config` of the files `weights_tools.make_tiny` writes). A real
`v1-inference.yaml` names `FrozenCLIPEmbedder` without parameters: that is CLIP ViT-L/14; SD 2.x's
`v2-inference(-v).yaml` names `FrozenOpenCLIPEmbedder`: OpenCLIP ViT-H/14. Tiny test models add a
`tiny_clip_text` / `tiny_openclip_text` block to `cond_stage_config.params`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .textfile import parse_json, read_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class UNetConfig:
    """The CompVis / SGM `UNetModel` parameters. SD 1: `num_heads` heads everywhere; SD 2 and SDXL:
    `num_head_channels` 64, so the head count grows with the level's channels (5 / 10 / 20 at 320 /
    640 / 1280); SDXL also skips attention at the first level, deepens the transformers per level and
    adds a vector conditioning `y` of `adm_in_channels` (pooled text + size ids, see models/sdxl.py)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsample factors that get a SpatialTransformer
    num_heads: int = 8            # heads per transformer, used when num_head_channels is -1
    num_head_channels: int = -1   # > 0: heads of this width, heads = channels // num_head_channels
    transformer_depth: int | tuple = 1  # blocks per SpatialTransformer: one for all levels, or one per level
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD v1: proj_in / proj_out are 1x1 convs; SD 2 / SDXL: Linear
    adm_in_channels: int = 0      # > 0: the `label_emb` vector conditioning (SDXL base: 2816); 0: none
    norm_groups: int = 32         # groups of every GroupNorm (diffusers' norm_num_groups; CompVis: always 32)
    # distilled SDXL (SSD-1B, Segmind-Vega): a depth per output block (None: its level's), a middle block of
    # one resnet ("resnet"; "attention": resnet, transformer, resnet)
    transformer_depth_output: tuple | None = None
    middle: str = "attention"

    @property
    def downsample(self) -> int:
        """How much the UNet shrinks its input: it halves it once per level after the first."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, head width) of a SpatialTransformer on `ch` channels (CompVis' rule)."""
        if self.num_head_channels > 0:
            return ch // self.num_head_channels, self.num_head_channels
        return self.num_heads, ch // self.num_heads

    def depth(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at `level`; the middle block takes the last level's."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    def output_depth(self, n: int, level: int) -> int:
        """Transformer blocks of output block `n` (at `level`): its own where the config gives one per block."""
        out = self.transformer_depth_output
        return out[n] if out is not None else self.depth(level)

    @classmethod
    def from_ldm(cls, u: dict) -> "UNetConfig":
        """From the `params` of a CompVis `unet_config` (SD 1 / 2) or SGM `network_config` (SDXL)."""
        if u.get("num_classes") not in (None, "sequential"):
            raise ValueError(f"UNet config has num_classes={u['num_classes']!r} (a class-conditional UNet); "
                             "text-to-image UNets have none, or 'sequential' with adm_in_channels (SDXL)")
        if u.get("num_classes") == "sequential" and not u.get("adm_in_channels"):
            raise ValueError("UNet config has num_classes='sequential' without adm_in_channels (the width of "
                             "its vector conditioning, SDXL base: 2816): add it")
        if u.get("num_heads", -1) == -1 and u.get("num_head_channels", -1) == -1:
            raise ValueError("UNet config gives neither num_heads (SD 1: 8) nor num_head_channels (SD 2 / SDXL: 64)")
        depth = u.get("transformer_depth", 1)
        middle = u.get("transformer_depth_middle")
        if isinstance(depth, (list, tuple)):
            depth = tuple(depth)
            if len(depth) != len(u["channel_mult"]):
                raise ValueError(f"UNet config has transformer_depth {list(depth)} for {len(u['channel_mult'])} "
                                 "levels (channel_mult): give one depth, or one per level")
        if middle is not None and middle != (depth[-1] if isinstance(depth, tuple) else depth):
            raise ValueError(f"UNet config has transformer_depth_middle={middle}; this UNet gives the middle "
                             "block the last level's depth: drop the key or set it to that depth")
        return cls(
            in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4),
            model_channels=u["model_channels"], channel_mult=tuple(u["channel_mult"]),
            num_res_blocks=u["num_res_blocks"], attention_resolutions=tuple(u["attention_resolutions"]),
            num_heads=u.get("num_heads", -1), num_head_channels=u.get("num_head_channels", -1),
            transformer_depth=depth, context_dim=u["context_dim"],
            use_linear_in_transformer=u.get("use_linear_in_transformer", False),
            adm_in_channels=u["adm_in_channels"] if u.get("num_classes") == "sequential" else 0,
            norm_groups=u.get("norm_num_groups", 32),
            transformer_depth_output=tuple(u["transformer_depth_output"]) if u.get("transformer_depth_output") else None,
            middle=u.get("middle_block", "attention"))

    def to_ldm(self, image_size: int) -> dict:
        """The inverse of `from_ldm`: the `params` of a CompVis-style UNet config."""
        d = self.transformer_depth
        u = dict(image_size=image_size, in_channels=self.in_channels, out_channels=self.out_channels,
                 model_channels=self.model_channels, attention_resolutions=list(self.attention_resolutions),
                 num_res_blocks=self.num_res_blocks, channel_mult=list(self.channel_mult),
                 use_spatial_transformer=True, transformer_depth=list(d) if isinstance(d, tuple) else d,
                 context_dim=self.context_dim, use_checkpoint=False, legacy=False)
        if self.num_head_channels > 0:  # SD 2 / SDXL configs name the head width and no head count
            u["num_head_channels"] = self.num_head_channels
        else:
            u["num_heads"] = self.num_heads
        if self.use_linear_in_transformer:
            u["use_linear_in_transformer"] = True
        if self.adm_in_channels:
            u.update(num_classes="sequential", adm_in_channels=self.adm_in_channels)
        if self.norm_groups != 32:  # not a CompVis key (its GroupNorms have 32 groups): written where it differs
            u["norm_num_groups"] = self.norm_groups
        if self.transformer_depth_output is not None:
            u["transformer_depth_output"] = list(self.transformer_depth_output)
        if self.middle != "attention":
            u["middle_block"] = self.middle
        return u


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    attn_resolutions: tuple = ()  # SD v1 has attention only in the mid block
    norm_groups: int = 32         # groups of every GroupNorm (diffusers' norm_num_groups; CompVis: always 32)
    # the 1x1 convs between the encoder and the latent, the latent and the decoder; SD3's and Flux's 16-channel
    # VAEs have neither (diffusers' use_quant_conv / use_post_quant_conv False)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    output_layer: str = "last"  # the context: the "last" layer's output (SD v1) or the "penultimate" (SDXL)
    final_ln: bool = True  # final_layer_norm applied to that output (SD v1: yes; SDXL's CLIP-L: no)
    tokenizer: str | None = None  # a folder's own tokenizer/ when it is not CLIP's vocabulary (None: CLIP's)

    def __post_init__(self):
        check_output_layer(self.output_layer, self.layers)
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"the text tower's hidden_act {str(self.hidden_act)[:40]!r} is not one this CLIP "
                             f"implements ({', '.join(CLIP_ACTIVATIONS)}; CLIP-L: quick_gelu)")

    @classmethod
    def from_ldm(cls, params: dict) -> "CLIPTextConfig":
        """From a CompVis `FrozenCLIPEmbedder`'s params: CLIP ViT-L/14 unless a `tiny_clip_text` block
        (tests) gives the sizes."""
        t = params.get("tiny_clip_text")
        if t is None:
            return cls()
        return cls(vocab_size=t["vocab_size"], max_position_embeddings=t["max_position_embeddings"],
                   width=t["width"], layers=t["layers"], heads=t["heads"], intermediate_size=t["intermediate_size"],
                   hidden_act=t.get("hidden_act", "quick_gelu"), layer_norm_eps=t.get("layer_norm_eps", 1e-5))

    def to_ldm(self) -> dict:
        """The inverse of `from_ldm`: a CompVis cond_stage_config (a `tiny_clip_text` block where sizes differ)."""
        cond = {"target": CLIP_EMBEDDER}
        if self != CLIPTextConfig():
            cond["params"] = {"tiny_clip_text": {k: getattr(self, k) for k in TINY_CLIP_FIELDS}}
        return cond


CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"  # SD v1's cond_stage_config target
TINY_CLIP_FIELDS = ("vocab_size", "max_position_embeddings", "width", "layers", "heads", "intermediate_size",
                    "hidden_act", "layer_norm_eps")
OUTPUT_LAYERS = ("last", "penultimate")
# transformers' names (ACT2FN) of the activations models.clip.ACTIVATIONS implements; any other is refused
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


def check_output_layer(output_layer: str, layers: int) -> None:
    """A text tower's context is its last or penultimate layer's output, and that layer must exist."""
    if output_layer not in OUTPUT_LAYERS:
        raise ValueError(f"output_layer must be one of {', '.join(OUTPUT_LAYERS)}, got {output_layer!r}")
    if layers < 1 + (output_layer == "penultimate"):
        raise ValueError(f"a text tower of {layers} layer(s) has no {output_layer} layer")


def context_layers(layers: int, output_layer: str) -> int:
    """How many layers run before the context is read: all, or all but the last."""
    return layers - (output_layer == "penultimate")


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """An OpenCLIP text tower (models/openclip.py): ViT-H/14 for SD 2.x, bigG/14 for SDXL's second."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    output_layer: str = "penultimate"  # whose hidden states are the context: "last" or "penultimate" block
    final_ln: bool = True  # whether ln_final is applied to that context (SD 2.x: yes, SDXL: no)
    projection_dim: int | None = None  # text_projection's output: the pooled vector (SDXL); None: no pooling
    tokenizer: str | None = None  # a folder's own tokenizer/ when it is not CLIP's vocabulary (None: CLIP's)

    def __post_init__(self):
        check_output_layer(self.output_layer, self.layers)
        if self.heads <= 0 or self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible into {self.heads} heads")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_ldm(cls, params: dict) -> "OpenCLIPTextConfig":
        """From a CompVis `FrozenOpenCLIPEmbedder`'s params: `layer` ("penultimate", SD 2.x's, or "last");
        the tower is ViT-H/14 unless a `tiny_openclip_text` block (tests) gives its sizes."""
        t = params.get("tiny_openclip_text") or {}
        output_layer = params.get("layer", "penultimate")
        return cls(**{k: t[k] for k in TINY_OPENCLIP_FIELDS if k in t}, output_layer=output_layer)

    def to_ldm(self) -> dict:
        """The inverse of `from_ldm`: a CompVis cond_stage_config (SD 2.x's, with ln_final on the context)."""
        if not self.final_ln or self.projection_dim is not None:
            raise ValueError("only SD 2.x's OpenCLIP tower (context through ln_final, no pooled projection) has a "
                             "CompVis FrozenOpenCLIPEmbedder config")
        params = {"freeze": True, "layer": self.output_layer}
        sizes = {k: getattr(self, k) for k in TINY_OPENCLIP_FIELDS}
        if sizes != {k: getattr(OpenCLIPTextConfig(), k) for k in TINY_OPENCLIP_FIELDS}:
            params["tiny_openclip_text"] = sizes
        return {"target": OPENCLIP_EMBEDDER, "params": params}


OPENCLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"  # SD 2.x's cond_stage_config target
TINY_OPENCLIP_FIELDS = ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio")


PREDICTION_TYPES = ("epsilon", "v")  # CompVis configs say `parameterization: "v"`; absent means epsilon


@dataclass(frozen=True)
class Family:
    """A model family, the model side: everything shared code needs to build, condition and describe a
    model of it. One row per family in `FAMILIES` (models/families.py fills it); weights_tools' file-side
    rows (weights_tools/layouts.py) are keyed by the same `code`.

    The text side is one module built from one config (`text_config`), which may hold several towers
    (SDXL: CLIP-L and bigG; `towers` lists them); its module names are the single file's keys under
    `text_prefix`. `conditioning` turns what the text encoder gives into what the denoiser reads."""
    code: str                   # the key of FAMILIES and of SDConfig.family ("sd1", "sdxl", ...)
    name: str                   # what people call it, in messages and `p2p inspect` ("SD v1", "SDXL")
    text_config: type           # the dataclass of its text conditioning (all towers)
    text_encoder: type          # nn.Module(text config): token ids -> the context tensor
    tokenizer: Callable         # text config -> its tokenizer (encode, decode, __call__, bos, eos, pad, length)
    text_prefix: str            # the text encoder's key prefix in the single-file layout
    towers: Callable            # text config -> tuple of its towers' configs (bounds checks, reports)
    conditioning: Callable      # (SDConfig, context, height, width) -> (cross-attention context, vector y or None)
    read_text: Callable         # a CompVis / SGM `model.params` dict -> text config
    write_text: Callable        # text config -> the `model.params` entries that describe it
    default_config: str         # configs/<name>.yaml: the config of a file that says nothing about itself
    image_size: Callable        # (the config's image_size or None, prediction type) -> latent side trained at
    scale_factor: float         # the VAE latent scale of a config that names none
    check: Callable             # SDConfig -> None, or a ValueError naming what disagrees and the fix
    reads: Callable | None = None  # `model.params` -> whether it describes this family; None: the fallback
    unet_key: str = "unet_config"  # the params' name for the denoiser's config (SGM: network_config)


# code -> Family, filled by models/families.py (which imports every text tower module); in reading order:
# `SDConfig.from_ldm` takes the first row whose `reads` accepts a config, else the row whose `reads` is None
FAMILIES: dict[str, Family] = {}


def family(code: str) -> Family:
    """The row of FAMILIES for `code`, or a ValueError naming the known codes."""
    if code not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {code!r}")
    return FAMILIES[code]


def family_of_params(p: dict) -> Family:
    """The family a CompVis / SGM `model.params` dict describes (see FAMILIES)."""
    found = next((f for f in FAMILIES.values() if f.reads is not None and f.reads(p)), None)
    return found or next(f for f in FAMILIES.values() if f.reads is None)


BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")  # diffusers' names
SPACINGS = ("leading", "trailing", "linspace")  # how N sampling timesteps are placed among the trained ones
# CompVis `beta_schedule` names -> diffusers' (CompVis "linear" is linear in sqrt(beta): SD's scaled_linear)
LDM_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class NoiseSchedule:
    """How the betas are made beyond their ends (SDConfig.linear_start / linear_end) and where N sampling
    steps fall: diffusers' DDIMScheduler settings of the same names (`beta_schedule`, `trained_betas`,
    `rescale_betas_zero_snr`, `timestep_spacing`). The default is SD's."""
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple | None = None   # every beta, given (then beta_schedule and the ends are not used)
    zero_snr: bool = False               # rescale the betas to zero terminal SNR (Lin et al. 2023)
    spacing: str = "leading"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {self.spacing!r}")
        if not isinstance(self.zero_snr, bool):
            raise ValueError(f"rescale_betas_zero_snr must be true or false, got {self.zero_snr!r}")
        if self.trained_betas is not None:
            bad = [b for b in self.trained_betas if isinstance(b, bool) or not isinstance(b, (int, float))
                   or not 0 < b < 1]
            if bad or not self.trained_betas:
                raise ValueError(f"trained_betas must be numbers in (0, 1), one per training timestep; got "
                                 f"{str(bad[0])[:20] if bad else 'none'}")


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    text: CLIPTextConfig = CLIPTextConfig()
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_train_timesteps: int = 1000
    image_size: int = 64  # latent side the model was trained at (64 -> 512 px for SD v1)
    family: str = "sd1"              # a key of FAMILIES: which text tower, conditioning and defaults
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (noise) or "v" (SD 2.x 768)
    shift_factor: float = 0.0  # latents = (VAE mean - shift_factor) * scale_factor (0 but for later families)
    schedule: NoiseSchedule = NoiseSchedule()  # the betas' shape, zero terminal SNR, the timesteps' spacing

    def __post_init__(self):
        fam = family(self.family)
        if not isinstance(self.text, fam.text_config):
            raise ValueError(f"family {self.family!r} reads its text with {fam.text_config.__name__}, "
                             f"got a {type(self.text).__name__}")
        fam.check(self)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        check_betas(self)

    @property
    def default_height(self) -> int:
        return self.image_size * self.vae.downsample

    @property
    def default_width(self) -> int:
        return self.default_height  # SD trains on square latents (image_size x image_size)

    @property
    def size_multiple(self) -> int:
        """Picture sides must be multiples of this: the VAE divides them by its downsampling factor,
        then the UNet halves the latent once per level after the first and doubles it back."""
        return self.vae.downsample * self.unet.downsample

    def check_size(self, height: int, width: int) -> None:
        """A clear error for a picture size this model cannot denoise."""
        check_size(height, width, self.size_multiple,
                   f"the VAE divides the sides by {self.vae.downsample}, then the UNet halves that latent "
                   f"{len(self.unet.channel_mult) - 1} time(s) and doubles it back")

    # ---- reading and writing CompVis-style configs ----
    @classmethod
    def from_ldm(cls, cfg: dict) -> "SDConfig":
        """Build from the dict of a CompVis `v1-inference.yaml` (keys model.params....)."""
        p = cfg["model"]["params"] if "model" in cfg else cfg["params"]
        unet = UNetConfig.from_ldm((p.get("unet_config") or p["network_config"])["params"])
        fs = p["first_stage_config"]["params"]
        dd = fs["ddconfig"]
        vae = VAEConfig(
            in_channels=dd.get("in_channels", 3), out_ch=dd.get("out_ch", 3), ch=dd["ch"],
            ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"], z_channels=dd["z_channels"],
            embed_dim=fs.get("embed_dim", dd["z_channels"]), resolution=dd.get("resolution", 256),
            attn_resolutions=tuple(dd.get("attn_resolutions", ())), norm_groups=dd.get("norm_num_groups", 32))
        fam = family_of_params(p)
        prediction = prediction_type(p.get("parameterization", "eps"))
        return cls(unet=unet, vae=vae, text=fam.read_text(p), family=fam.code,
                   scale_factor=p.get("scale_factor", fam.scale_factor), shift_factor=p.get("shift_factor", 0.0),
                   linear_start=p.get("linear_start", 0.00085), linear_end=p.get("linear_end", 0.012),
                   num_train_timesteps=p.get("timesteps", 1000), image_size=fam.image_size(p.get("image_size"), prediction),
                   prediction_type=prediction, schedule=schedule_from_ldm(p))

    def to_ldm(self) -> dict:
        """The inverse of `from_ldm`: a CompVis-style config dict (JSON/YAML serialisable)."""
        u, v, t = self.unet, self.vae, self.text
        unet = u.to_ldm(self.image_size)
        ddconfig = dict(double_z=True, z_channels=v.z_channels, resolution=v.resolution, in_channels=v.in_channels,
                        out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                        attn_resolutions=list(v.attn_resolutions), dropout=0.0,
                        **({"norm_num_groups": v.norm_groups} if v.norm_groups != 32 else {}))
        fam = family(self.family)
        params = dict(
            linear_start=self.linear_start, linear_end=self.linear_end, num_timesteps_cond=1,
            timesteps=self.num_train_timesteps, first_stage_key="jpg", cond_stage_key="txt",
            image_size=self.image_size, channels=u.in_channels, cond_stage_trainable=False,
            conditioning_key="crossattn", scale_factor=self.scale_factor, use_ema=False,
            **{fam.unet_key: {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}},
            first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                                "params": dict(embed_dim=v.embed_dim, ddconfig=ddconfig,
                                               lossconfig={"target": "torch.nn.Identity"})},
            **fam.write_text(t))
        if self.shift_factor:
            params["shift_factor"] = self.shift_factor
        if self.prediction_type == "v":
            params["parameterization"] = "v"
        params.update(schedule_to_ldm(self.schedule))
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}

    def to_json(self) -> str:
        return json.dumps(self.to_ldm(), sort_keys=True)

    def replace(self, **kw) -> "SDConfig":
        return dataclasses.replace(self, **kw)


def check_betas(cfg: SDConfig) -> None:
    """The schedule's numbers as diffusers' DDIMScheduler needs them: betas in (0, 1), one per timestep."""
    start, end, steps = cfg.linear_start, cfg.linear_end, cfg.num_train_timesteps
    for name, x in (("beta_start", start), ("beta_end", end)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1:
            raise ValueError(f"{name} must be a number in (0, 1) (SD: 0.00085 and 0.012), got {str(x)[:40]!r}")
    if start > end:
        raise ValueError(f"beta_start ({start}) must not exceed beta_end ({end})")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 100_000:
        raise ValueError(f"num_train_timesteps must be a whole number in [2, 100000] (SD: 1000), "
                         f"got {str(steps)[:40]!r}")
    betas = cfg.schedule.trained_betas
    if betas is not None and len(betas) != steps:
        raise ValueError(f"trained_betas holds {len(betas)} betas for num_train_timesteps {steps}: "
                         "give one per timestep")


def schedule_from_ldm(p: dict) -> NoiseSchedule:
    """The NoiseSchedule of a CompVis / SGM `model.params` (`beta_schedule`, `given_betas`, and the
    diffusers-named keys `rescale_betas_zero_snr` / `timestep_spacing` that to_ldm writes)."""
    name = p.get("beta_schedule", "linear")
    if name not in LDM_BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {str(name)[:40]!r} is not one of {', '.join(LDM_BETA_SCHEDULES)}")
    given = p.get("given_betas")
    return NoiseSchedule(LDM_BETA_SCHEDULES[name], tuple(given) if given is not None else None,
                         p.get("rescale_betas_zero_snr", False), p.get("timestep_spacing", "leading"))


def schedule_to_ldm(s: NoiseSchedule) -> dict:
    """The inverse of schedule_from_ldm: only what differs from SD's."""
    out = {}
    if s.beta_schedule != "scaled_linear":
        out["beta_schedule"] = next(k for k, v in LDM_BETA_SCHEDULES.items() if v == s.beta_schedule)
    if s.trained_betas is not None:
        out["given_betas"] = list(s.trained_betas)
    if s.zero_snr:
        out["rescale_betas_zero_snr"] = True
    if s.spacing != "leading":
        out["timestep_spacing"] = s.spacing
    return out


def prediction_type(parameterization: str) -> str:
    """Our name for a CompVis config's `parameterization` ("eps" or "v"); "x0" models are not supported."""
    names = {"eps": "epsilon", "v": "v"}
    if parameterization not in names:
        raise ValueError(f"parameterization {parameterization!r} is not supported: the sampler needs "
                         f"\"eps\" (noise prediction) or \"v\" (v-prediction)")
    return names[parameterization]


def check_size(height: int, width: int, multiple: int, why: str = "") -> None:
    """height and width positive multiples of `multiple`, or a ValueError that names them (and why)."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        up = [max(1, -(-side // multiple)) * multiple for side in (height, width)]
        raise ValueError(f"height and width must be positive multiples of {multiple}"
                         f"{f' ({why})' if why else ''}, got {height}x{width}; "
                         f"the nearest size at least as large is {up[0]}x{up[1]}")


def load_config(path_or_name) -> SDConfig:
    """An `SDConfig` from a YAML/JSON file path, or a name in configs/ ("sd-v1", "tiny")."""
    path = Path(path_or_name)
    if not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        stem = Path(path_or_name).stem
        near = f"; did you mean the shipped {stem!r}?" if stem in names else ""
        raise FileNotFoundError(f"config {str(path_or_name)!r} not found: no such file from {Path.cwd()}, and no "
                                f"shipped config of that name{near} (the shipped configs: {', '.join(names)}; give a "
                                f"name or a path to a YAML file)")
    text = read_text(path, "model config")
    d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else parse_json(text, str(path))
    if not isinstance(d, dict) or not ("model" in d or "params" in d):
        raise ValueError(f"{path}: not a CompVis-style model config (expected a top-level 'model:' key)")
    return SDConfig.from_ldm(d)
