"""diffusers folder layout -> the original single-file key names. The one key map in the project.

It is derived from each model's config.json (block counts, layers_per_block, which blocks have
attention), not written out per key, so any SD-v1-shaped UNet/VAE maps. CLIP keys are already the
checkpoint's names, with or without the `text_model.` level.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from models import FAMILIES, PREFIXES, CLIPTextConfig, LDMBertConfig, SDConfig, UNetConfig, VAEConfig
from models.config import BETA_SCHEDULES, SPACINGS, NoiseSchedule
from models.sdxl_text import SDXL_CLIP_L, SDXLTextConfig

from .layout import BadConfig, CheckpointError, factor_problem
from .openclip_keys import openclip_config_from_hf

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # new and old diffusers names
UNET_FIXED = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
              "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _layers_per_block(cfg: dict, where: str) -> int:
    lpb = cfg["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise CheckpointError(f"{where}: layers_per_block {lpb} varies per block; the UNets this package "
                                  "runs (SD v1.x / 2.x, SDXL) have one value for every level")
        lpb = lpb[0]
    return int(lpb)


def unet_key(key: str, cfg: dict, where: str = "unet") -> str:
    """`down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight` (SD v1 numbers)."""
    n = _layers_per_block(cfg, where) + 1  # LDM blocks per level: the resnets plus one resampler slot
    for old, new in UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{1 + i * n + j}" if side == "down" else f"output_blocks.{i * n + j}"
        return f"{block}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
        return f"output_blocks.{i * n + n - 1}.{slot}.conv.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{0 if m[1] == '0' else 2}.{_resnet_rest(m[2])}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key[len("mid_block.attentions.0."):]
    raise CheckpointError(f"{where}: unknown diffusers UNet key `{key}` (not part of the SD v1.x / 2.x / SDXL UNet "
                          "layout)")


def _resnet_rest(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{UNET_RESNET[name]}.{tail}" if name in UNET_RESNET else rest


def vae_key(key: str, cfg: dict, where: str = "vae") -> str:
    """`decoder.up_blocks.0.resnets.1.conv1.weight` -> `decoder.up.3.block.1.conv1.weight` (levels reversed)."""
    levels = len(cfg["block_out_channels"])
    key = key.replace(".conv_shortcut.", ".nin_shortcut.").replace("conv_norm_out.", "norm_out.")
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
        if m[2] not in VAE_ATTN:
            raise CheckpointError(f"{where}: unknown diffusers VAE attention key `{key}`")
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
        inner = f"block.{m[3]}" if m[3] is not None else "downsample"
        return f"encoder.down.{m[1]}.{inner}.{m[4]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
        inner = f"block.{m[3]}" if m[3] is not None else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{inner}.{m[4]}"
    if re.match(r"((en|de)coder\.(conv_in|conv_out|norm_out)|quant_conv|post_quant_conv)\.", key):
        return key
    raise CheckpointError(f"{where}: unknown diffusers VAE key `{key}` (not part of the SD / SDXL VAE layout)")


def clip_key(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def to_ldm_key(part: str, key: str, cfg: dict, where: str) -> str:
    """The prefixed single-file key of a diffusers sub-model's key."""
    local = {"unet": unet_key, "vae": vae_key}.get(part)
    return PREFIXES[part] + (local(key, cfg, where) if local else clip_key(key))


# ------------------------------------------------------------------------------------- configs
# UNet2DConditionModel settings this UNet does not model, with diffusers' defaults (the only values it runs):
# a config that sets another value is refused by name, not run as the default (upcast_attention is not here:
# attention_probs always forms its softmax in fp32, as upcast_attention=True asks)
UNMODELLED = {"norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True,
              "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1, "dual_cross_attention": False,
              "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "timestep_post_act": None,
              "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
              "class_embeddings_concat": False, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
              "cross_attention_norm": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
              "num_class_embeds": None, "time_embedding_dim": None, "time_embedding_act_fn": None}


def check_modelled(c: dict, where: str) -> None:
    """Refuse a UNet config that sets what this UNet does not model (UNMODELLED) to another value than the
    one it runs: such a file would load and give wrong pictures."""
    only_cross = c.get("only_cross_attention", False)
    off = {k: c[k] for k, default in UNMODELLED.items() if k in c and c[k] != default}
    if only_cross not in (False, None) and (not isinstance(only_cross, list) or any(only_cross)):
        off["only_cross_attention"] = only_cross
    if off:
        said = ", ".join(f"{k}={str(v)[:40]!r} (runs: {UNMODELLED.get(k, False)!r})" for k, v in off.items())
        raise BadConfig(f"{where}: unet/config.json sets {said}: this package's UNet runs only the values in "
                        "brackets, so the model would load and give wrong pictures; it is not supported here "
                        "(if the file is a stock SD / SDXL model, fix these keys)")


def unet_config(c: dict, where: str) -> tuple[UNetConfig, int]:
    """UNetConfig from a diffusers UNet2DConditionModel config.json, and its sample_size.

    diffusers' SD v1 configs put the number of heads in `attention_head_dim` (its own loader reads
    it as `num_attention_heads` when that is unset), so heads are read, never inferred from shapes.
    """
    check_modelled(c, where)
    for field in ("class_embed_type", "addition_embed_type"):
        if c.get(field):
            raise CheckpointError(f"{where}: UNet has {field}={c[field]!r}, a conditioning the SD v1.x / 2.x UNet "
                                  "does not read (SDXL's is addition_embed_type 'text_time', in an SDXL folder)")
    boc = list(c["block_out_channels"])
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    num_heads, head_channels = _heads(heads, boc, where)
    depth = c.get("transformer_layers_per_block", 1)
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=boc[0],
        channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=_layers_per_block(c, where),
        attention_resolutions=tuple(2 ** i for i, t in enumerate(c["down_block_types"]) if "CrossAttn" in t),
        num_heads=num_heads, num_head_channels=head_channels,
        transformer_depth=tuple(int(d) for d in depth) if isinstance(depth, (list, tuple)) else int(depth),
        context_dim=int(c.get("cross_attention_dim", 768)),
        use_linear_in_transformer=bool(c.get("use_linear_projection", False)),
        norm_groups=_groups(c, "unet/config.json")), sample_size(c)


def _groups(c: dict, name: str) -> int:
    """A config.json's `norm_num_groups` (diffusers' default 32), which must divide every block's channels."""
    groups = c.get("norm_num_groups", 32)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise BadConfig(f"{name} has `norm_num_groups` {str(groups)[:40]!r}; it must be a whole number (SD: 32)")
    bad = [b for b in c["block_out_channels"] if b % groups]
    if bad:
        raise BadConfig(f"{name} has `norm_num_groups` {groups}, which does not divide the block_out_channels "
                        f"{bad[:4]} (each GroupNorm splits its channels into that many groups): fix the file")
    return groups


def _heads(heads, boc: list, where: str) -> tuple[int, int]:
    """(num_heads, num_head_channels) of UNetConfig from diffusers' heads: one count for every level
    (SD 1: 8), or one per level (SD 2.x: 5, 10, 20, 20), which must then be heads of one width (64)."""
    if not isinstance(heads, (list, tuple)):
        return int(heads), -1
    if len(heads) != len(boc):
        raise CheckpointError(f"{where}: {len(heads)} attention head counts for {len(boc)} levels")
    if len(set(heads)) == 1:
        return int(heads[0]), -1
    widths = {b // h if h and b % h == 0 else None for b, h in zip(boc, heads)}
    if len(widths) != 1 or None in widths:
        raise CheckpointError(f"{where}: attention heads {list(heads)} over channels {boc} are not heads of one "
                              "width (SD 2.x: 64 channels per head) nor one count for every level (SD v1)")
    return -1, widths.pop()


def sample_size(c: dict) -> int:
    """The latent side the UNet was trained at. Folders saved before diffusers 0.9 (SD v1-1 to v1-4)
    wrote 32 where 64 was meant; diffusers' pipeline corrects any side under 64 from those versions
    to 64 (512 px), and so does this."""
    size = int(c.get("sample_size", 64))
    version = c.get("_diffusers_version")
    if size < 64 and isinstance(version, str) and _version(version) < (0, 9):
        return 64
    return size


def _version(text: str) -> tuple:
    """(0, 8) from "0.8.0.dev0"; unreadable parts count as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.split(".")[:2])


SD_V1_VAE = {"block_out_channels": [128, 256, 512, 512]}  # the config.json of SD v1's VAE, all else default


def vae_config(c: dict) -> VAEConfig:
    boc = list(c["block_out_channels"])
    return VAEConfig(in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=int(c.get("layers_per_block", 2)),
                     z_channels=c.get("latent_channels", 4), embed_dim=c.get("latent_channels", 4),
                     resolution=int(c.get("sample_size", 256)), norm_groups=_groups(c, "vae/config.json"),
                     use_quant_conv=bool(c.get("use_quant_conv", True)),
                     use_post_quant_conv=bool(c.get("use_post_quant_conv", True)))


def vae_factors(vae: dict, family: str, where: str) -> dict:
    """scale_factor and shift_factor from vae/config.json's scaling_factor / shift_factor (the family's scale,
    no shift, where it names none), refused unless finite and plausible: before any weight is read."""
    out = dict(scale_factor=vae.get("scaling_factor", FAMILIES[family].scale_factor),
               shift_factor=vae.get("shift_factor") or 0.0)
    for (name, value), key in zip(out.items(), ("scaling_factor", "shift_factor")):
        problem = factor_problem(name, value)
        if problem:
            raise BadConfig(f"{Path(where) / 'vae' / 'config.json'}: {key} is {problem}; the latents would be "
                            "scaled wrongly (SD v1/2: 0.18215, SDXL: 0.13025); fix the file")
    return {name: float(value) for name, value in out.items()}


def text_config(c: dict) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                          width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                          intermediate_size=c["intermediate_size"], hidden_act=c.get("hidden_act", "quick_gelu"),
                          layer_norm_eps=c.get("layer_norm_eps", 1e-5))


def sd_config(unet: dict, vae: dict, text: dict, scheduler: dict | None, where: str, text_cfg=text_config,
              unet_cfg=unet_config, family: str = "sd1") -> SDConfig:
    """SDConfig from the config.json files of a diffusers folder (`text_cfg` reads the text tower's,
    `unet_cfg` the UNet's); the VAE's scale and shift factors from its config.json (the family's scale
    where it names none)."""
    try:
        ucfg, sample = unet_cfg(unet, where)
        kw = dict(unet=ucfg, vae=vae_config(vae), text=text_cfg(text), image_size=sample, family=family,
                  **vae_factors(vae, family, where))
    except CheckpointError:
        raise  # already names the file and the problem
    except KeyError as e:
        raise BadConfig(f"{where}: a diffusers config.json lacks {e}; cannot tell the architecture") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise BadConfig(f"{where}: a diffusers config.json has a value of the wrong kind ({e}); "
                        "cannot tell the architecture") from e
    if scheduler:
        kw.update(scheduler_settings(scheduler, f"{where}/scheduler/scheduler_config.json"))
    try:
        return SDConfig(**kw)
    except ValueError as e:  # the parts' configs disagree (SDXL: the vector conditioning's width)
        raise BadConfig(f"{where}: {e}") from e


# scheduler_config.json key -> (SDConfig / NoiseSchedule field, SD's value, what a value must be)
SCHEDULER_KEYS = {"beta_start": ("linear_start", 0.00085, "a number in (0, 1) (SD: 0.00085)"),
                 "beta_end": ("linear_end", 0.012, "a number in (0, 1) (SD: 0.012)"),
                 "num_train_timesteps": ("num_train_timesteps", 1000, "a whole number in [2, 100000] (SD: 1000)"),
                 "beta_schedule": ("beta_schedule", "scaled_linear", f"one of {', '.join(BETA_SCHEDULES)}"),
                 "rescale_betas_zero_snr": ("zero_snr", False, "true or false"),
                 "timestep_spacing": ("spacing", "leading", f"one of {', '.join(SPACINGS)}"),
                 "trained_betas": ("trained_betas", None, "null or a list of numbers in (0, 1), one per timestep")}


def _schedule_value(key: str, value) -> bool:
    """Whether a scheduler_config.json value is of the kind its key needs."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key in ("beta_start", "beta_end"):
        return number and 0 < value < 1
    if key == "num_train_timesteps":
        return number and value == int(value) and 2 <= value <= 100_000
    if key == "rescale_betas_zero_snr":
        return isinstance(value, bool)
    if key == "trained_betas":
        return value is None or isinstance(value, list) and bool(value) and all(_schedule_value("beta_start", b)
                                                                                 for b in value)
    return value in (BETA_SCHEDULES if key == "beta_schedule" else SPACINGS)


def scheduler_settings(scheduler: dict, path: str) -> dict:
    """SDConfig fields (with its NoiseSchedule) from a folder's scheduler_config.json: the betas and
    the timesteps as diffusers' DDIMScheduler reads them; a value it could not use is refused, naming
    the file, the key and what it must be."""
    got = {}
    for key, (field, default, need) in SCHEDULER_KEYS.items():
        value = scheduler.get(key, default)
        if not _schedule_value(key, value):
            raise BadConfig(f"{path}: `{key}` is {str(value)[:40]!r}; it must be {need}: fix the file, or remove the "
                            "key for SD's value")
        got[field] = tuple(float(b) for b in value) if key == "trained_betas" and value is not None else value
    if got["linear_start"] > got["linear_end"]:
        raise BadConfig(f"{path}: `beta_start` ({got['linear_start']}) exceeds `beta_end` ({got['linear_end']}); "
                        "fix the file (SD: 0.00085 and 0.012)")
    if got["trained_betas"] is not None and len(got["trained_betas"]) != got["num_train_timesteps"]:
        raise BadConfig(f"{path}: `trained_betas` holds {len(got['trained_betas'])} betas for `num_train_timesteps` "
                        f"{got['num_train_timesteps']}; give one per timestep")
    schedule = NoiseSchedule(*(got.pop(f) for f in ("beta_schedule", "trained_betas", "zero_snr", "spacing")))
    return dict(got, num_train_timesteps=int(got["num_train_timesteps"]), schedule=schedule)


# ------------------------------------------------------------------------------------- LDM-400M
# diffusers' LDMBertModel (BART-style names) -> CompVis' BERTEmbedder (x_transformer names). Layer i
# of diffusers is CompVis' attention sublayer 2i and feed-forward sublayer 2i + 1, each [norm, block].
BERT_LAYER = {"self_attn_layer_norm": (0, "0"), "self_attn.q_proj": (0, "1.to_q"), "self_attn.k_proj": (0, "1.to_k"),
              "self_attn.v_proj": (0, "1.to_v"), "self_attn.out_proj": (0, "1.to_out"),
              "final_layer_norm": (1, "0"), "fc1": (1, "1.net.0.0"), "fc2": (1, "1.net.2")}
LDM_TEXT_PREFIX = FAMILIES["ldm"].text_prefix
BERT_FIXED = {"model.embed_tokens.": "token_emb.", "model.embed_positions.": "pos_emb.emb.",
              "model.layer_norm.": "norm.", "to_logits.": "to_logits."}


def bert_key(key: str, where: str = "bert") -> str:
    """`model.layers.3.fc1.weight` -> `attn_layers.layers.7.1.net.0.0.weight` (under the text prefix)."""
    for old, new in BERT_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"model\.layers\.(\d+)\.(.*)\.(weight|bias)$", key):
        if m[2] in BERT_LAYER:
            sub, name = BERT_LAYER[m[2]]
            return f"attn_layers.layers.{2 * int(m[1]) + sub}.{name}.{m[3]}"
    raise CheckpointError(f"{where}: unknown diffusers LDMBert key `{key}` (not part of LDM-400M's text tower)")


def ldm_key(part: str, key: str, cfg: dict, where: str) -> str:
    """The prefixed single-file key of a key of LDM-400M's diffusers folder."""
    if part == "text_encoder":
        return LDM_TEXT_PREFIX + bert_key(key, where)
    return to_ldm_key(part, key, cfg, where)


LDM_VOCABS = ("tokenizer/vocab.txt", "tokenizer/tokenizer.json")  # the first found; transformers 5 writes the json


def ldm_folder_config(folder: Path, configs: dict, scheduler: dict | None, index: dict) -> SDConfig:
    """SDConfig (family "ldm") from LDM-400M's diffusers config.json files, the vocabulary its tokenizer/ holds."""
    vocab = next((folder / n for n in LDM_VOCABS if (folder / n).exists()), None)
    return sd_config(configs["unet"], configs["vae"], configs["text_encoder"], scheduler, str(folder),
                     lambda c: ldmbert_config(c, str(vocab) if vocab else None), family="ldm")


def ldmbert_config(c: dict, vocab: str | None) -> LDMBertConfig:
    """LDMBertConfig from a diffusers `bert/config.json` (diffusers' LDMBertConfig names)."""
    return LDMBertConfig(vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                         width=c["d_model"], layers=c["encoder_layers"], heads=c["encoder_attention_heads"],
                         head_dim=c["head_dim"], intermediate_size=c["encoder_ffn_dim"], vocab=vocab)


# ------------------------------------------------------------------------------------- SDXL
# diffusers' SDXL UNet names its vector-conditioning MLP `add_embedding`; SGM's is `label_emb.0` (Linear, SiLU, Linear)
SDXL_UNET = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
SDXL_CLIP_PREFIX = FAMILIES["sdxl"].text_prefix + "embedders.0.transformer.text_model."  # text_encoder/ (CLIP ViT-L)
SDXL_OPENCLIP_PREFIX = FAMILIES["sdxl"].text_prefix + "embedders.1.model."              # text_encoder_2/ (bigG)
# diffusers' "text_time" conditioning: what SGM's size embedders are; addition_time_embed_dim is their width
SDXL_TEXT_TIME = ("addition_embed_type", "addition_time_embed_dim")


def sdxl_key(part: str, key: str, cfg: dict, where: str) -> str:
    """The single-file key of an SDXL folder's unet/, vae/ or text_encoder/ key (text_encoder_2/ is
    OpenCLIP-mapped: openclip_keys.hf_plan)."""
    if part == "text_encoder":
        return SDXL_CLIP_PREFIX + clip_key(key)
    for old, new in SDXL_UNET.items():
        if part == "unet" and key.startswith(old):
            return PREFIXES["unet"] + new + key[len(old):]
    return to_ldm_key(part, key, cfg, where)


def sdxl_unet_config(c: dict, where: str) -> tuple[UNetConfig, int]:
    """An SDXL UNet2DConditionModel config.json: SD's fields plus the "text_time" vector conditioning of
    `projection_class_embeddings_input_dim` channels (base: 1280 pooled + 6 x 256 size ids = 2816; whether
    that sum holds is checked with the towers, SDConfig). The first level has no attention; its
    transformer depth, which diffusers writes as 1, is read as 0 as in SGM's sd_xl_base.yaml, and the
    attention levels are listed as SGM lists them, deepest first."""
    if c.get("addition_embed_type", "text_time") != "text_time":
        raise CheckpointError(f"{where}: unet/config.json has addition_embed_type={c['addition_embed_type']!r}; "
                              "SDXL's vector conditioning is 'text_time'")
    for name in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        if not isinstance(c.get(name), int) or c[name] <= 0:
            raise BadConfig(f"{where}: unet/config.json has {name}={c.get(name)!r}; SDXL's vector conditioning "
                            "needs it (base: projection_class_embeddings_input_dim 2816, addition_time_embed_dim 256)")
    ucfg, sample = unet_config({k: v for k, v in c.items() if k not in SDXL_TEXT_TIME}, where)
    attends = ["CrossAttn" in t for t in c["down_block_types"]]
    depth = ucfg.transformer_depth
    if isinstance(depth, tuple):
        depth = tuple(d if a else 0 for d, a in zip(depth, attends))
    return dataclasses.replace(ucfg, adm_in_channels=int(c["projection_class_embeddings_input_dim"]),
                               attention_resolutions=tuple(sorted(ucfg.attention_resolutions, reverse=True)),
                               transformer_depth=depth, **distilled_unet(c, ucfg.num_res_blocks, where)), sample


# diffusers' middle blocks -> UNetConfig.middle (UNetMidBlock2D: one resnet, as diffusers builds it in a
# UNet2DConditionModel; SSD-1B and Segmind-Vega)
MIDDLE_BLOCKS = {"UNetMidBlock2DCrossAttn": "attention", "UNetMidBlock2D": "resnet"}


def distilled_unet(c: dict, num_res_blocks: int, where: str) -> dict:
    """A distilled SDXL's UNet fields (SSD-1B, Segmind-Vega): `reverse_transformer_layers_per_block` (per up
    block, one depth or one per block) as a depth per output block, and the middle block's kind."""
    mid = c.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid not in MIDDLE_BLOCKS:
        raise CheckpointError(f"{where}: mid_block_type {str(mid)[:40]!r}; this package builds "
                              f"{' or '.join(MIDDLE_BLOCKS)}")
    out = {"middle": MIDDLE_BLOCKS[mid]}
    reverse = c.get("reverse_transformer_layers_per_block")
    if reverse is not None:
        per_block = [list(d) if isinstance(d, (list, tuple)) else [d] * (num_res_blocks + 1) for d in reverse]
        if len(per_block) != len(c["up_block_types"]) or any(len(d) != num_res_blocks + 1 for d in per_block):
            raise BadConfig(f"{where}: reverse_transformer_layers_per_block {reverse} is not one depth (or "
                            f"{num_res_blocks + 1}) per up block for {len(c['up_block_types'])} up blocks")
        attends = ["CrossAttn" in t for t in c["up_block_types"]]
        out["transformer_depth_output"] = tuple(int(d) if a else 0 for ds, a in zip(per_block, attends) for d in ds)
    return out


def sdxl_folder_config(folder: Path, configs: dict, scheduler: dict | None, index: dict) -> SDConfig:
    """SDConfig (family "sdxl") from an SDXL folder's config.json files: the towers from text_encoder/ and
    text_encoder_2/ (which must be a CLIPTextModelWithProjection), with the folder's own tokenizers where their
    vocabulary is not CLIP's (own_tokenizers), the size ids' width from unet/ (addition_time_embed_dim), how ""
    encodes from model_index.json's force_zeros_for_empty_prompt."""
    text_2 = openclip_config_from_hf(configs["text_encoder_2"], "sdxl", str(folder / "text_encoder_2"))
    if text_2.projection_dim is None:
        raise CheckpointError(f"{folder / 'text_encoder_2'} is not a CLIPTextModelWithProjection (SDXL's second "
                              "text encoder: its pooled projection conditions the UNet)")
    zeros = force_zeros(index, folder)

    def towers(c: dict) -> SDXLTextConfig:
        clip = dataclasses.replace(text_config(c), output_layer=SDXL_CLIP_L.output_layer, final_ln=SDXL_CLIP_L.final_ln)
        clip, openclip = own_tokenizers(folder, clip, text_2)
        return SDXLTextConfig(clip=clip, openclip=openclip, zeros_for_empty=zeros,
                              size_embed_dim=configs["unet"]["addition_time_embed_dim"])

    return sd_config(configs["unet"], configs["vae"], configs["text_encoder"], scheduler, str(folder), text_cfg=towers,
                     unet_cfg=sdxl_unet_config, family="sdxl")


def own_tokenizers(folder: Path, clip: CLIPTextConfig, openclip):
    """SDXL's two tower configs, each naming the folder's own tokenizer (tokenizer/, tokenizer_2/) where their
    vocabulary is not CLIP's (diffusers' SDXL test pipelines: 1000); as given (CLIP's BPE) otherwise. The two
    read one vocabulary (SDXLTokenizer.from_folders checks the files agree)."""
    sizes = {clip.vocab_size, openclip.vocab_size}
    if sizes == {CLIPTextConfig.vocab_size}:
        return clip, openclip
    missing = [d for d in ("tokenizer", "tokenizer_2") if not (folder / d).is_dir()]
    if len(sizes) > 1 or missing:
        raise BadConfig(f"{folder}: its text encoders have vocabularies of {sorted(sizes)} (CLIP's: "
                        f"{CLIPTextConfig.vocab_size}); SDXL's two towers read one vocabulary, their own, from the "
                        f"folder's tokenizer/ and tokenizer_2/" + (f", and it lacks {' and '.join(d + '/' for d in missing)}: "
                        "add the tokenizers it was saved with (vocab.json + merges.txt, or tokenizer.json)" if missing
                        else ": give both towers one vocab_size"))
    return (dataclasses.replace(clip, tokenizer=str(folder / "tokenizer")),
            dataclasses.replace(openclip, tokenizer=str(folder / "tokenizer_2")))


def force_zeros(index: dict, folder: Path) -> bool:
    """model_index.json's force_zeros_for_empty_prompt (the pipeline's default, True, when absent)."""
    value = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(value, bool):
        raise CheckpointError(f"{folder / 'model_index.json'}: force_zeros_for_empty_prompt must be true or false, "
                              f"got {str(value)[:40]!r}")
    return value


# ------------------------------------------------------------------------------------- SD v1 / SD 2.x
def sd1_folder_config(folder: Path, configs: dict, scheduler: dict | None, index: dict) -> SDConfig:
    cfg = sd_config(configs["unet"], configs["vae"], configs["text_encoder"], scheduler, str(folder))
    return own_tokenizer(folder, cfg)


def sd2_folder_config(folder: Path, configs: dict, scheduler: dict | None, index: dict) -> SDConfig:
    """SD 2.x: its text_encoder/ is OpenCLIP ViT-H as transformers stores it (cut to 23 layers)."""
    cfg = sd_config(configs["unet"], configs["vae"], configs["text_encoder"], scheduler, str(folder), family="sd2",
                    text_cfg=lambda c: openclip_config_from_hf(c, "sd2", str(folder / "text_encoder")))
    return own_tokenizer(folder, cfg)


def own_tokenizer(folder: Path, cfg: SDConfig) -> SDConfig:
    """`cfg` reading the folder's own tokenizer/ where its vocabulary is not CLIP's (its text tower's vocab_size
    is not 49408: diffusers' test pipelines, a vocabulary of 1000); CLIP's own otherwise, as for a single file."""
    if cfg.text.vocab_size == CLIPTextConfig.vocab_size:
        return cfg
    if not (folder / "tokenizer").is_dir():
        if cfg.text.vocab_size < CLIPTextConfig.vocab_size:  # CLIP's ids would overflow the embedding
            raise BadConfig(f"{folder}: its text encoder has a vocabulary of {cfg.text.vocab_size}, not CLIP's "
                            f"{CLIPTextConfig.vocab_size}, and the folder holds no tokenizer/ to give its ids; add "
                            "the tokenizer/ it was saved with (vocab.json + merges.txt, or tokenizer.json)")
        return cfg
    return cfg.replace(text=dataclasses.replace(cfg.text, tokenizer=str(folder / "tokenizer")))
