"""The published protocol of each row of PIE-Bench's main table that this library runs: how a picture is
inverted and edited, with the settings of PnPInversion's runners (run_editing_p2p.py, run_editing_masactrl.py,
run_editing_pnp.py) as defaults.

| row | inversion | edit |
|---|---|---|
| {ddim, null-text, negative-prompt, direct}+p2p | the source prompt, guidance 7.5 | Refine, cross 0.4, self 0.6 (self-attention injected in layers up to 32x32), LocalBlend on the blended words (start 0.2, thresholds 0.3) and the target word reweighted x2 when the entry has blended words |
| {ddim, direct}+masactrl | the empty prompt | prompts ["", target], MutualSelfAttention from UNet call 4 and block 10 |
| direct+pnp | the source prompt, conditional only (guidance 1), DDIM | PlugAndPlay (features 0.8, q/k 0.5), source row on the inversion's latents, negative prompt "ugly, blurry, black, low res, unrealistic" |

All rows: 50 DDIM steps, guidance 7.5. P2P and MasaCtrl sample the timesteps 980..0 (their schedulers' steps
offset 0), PnP 981..1 (SD v1.5's scheduler config, offset 1). The official P2P runner always builds Refine
(is_replace_controller=False), even where the prompts have as many words. With Direct Inversion the source row
follows the inversion's latents (`source_row` "trajectory", the default); "residual" adds the stored residuals
as their code does. The official PnP row whose source
row is a DDIM reconstruction ("ddim+pnp") is not offered: this library's PlugAndPlay follows the inversion's
stored latents, which is their "directinversion+pnp".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..blend import LocalBlend
from ..control import Refine, Reweight
from ..inversion import invert
from ..mutual import MutualSelfAttention
from ..pipeline import edit
from ..pnp import PlugAndPlay
from ..settings import METHODS, SOURCE_ROWS
from .pie import Entry

EDIT_METHODS = ("p2p", "masactrl", "pnp")
# the published table's rows: UNet inversions only (the flow inversion is an MM-DiT model's; PIE-Bench's rows are SD v1)
INVERSIONS = {"p2p": tuple(m for m in METHODS if m != "flow"), "masactrl": ("ddim", "direct"), "pnp": ("direct",)}
PNP_NEGATIVE = "ugly, blurry, black, low res, unrealistic"


@dataclass(frozen=True)
class Protocol:
    """One row's settings (the defaults are the published ones; the overridable ones are the CLI's flags)."""
    method: str
    inversion: str
    num_steps: int = 50
    guidance_scale: float = 7.5
    num_inner_steps: int = 10          # null-text's inner iterations
    cross_replace_steps: float = 0.4
    self_replace_steps: float = 0.6
    self_replace_max_res: int = 32     # PnPInversion's controller injects self-attention up to 32x32
    start_blend: float = 0.2
    blend_threshold: float = 0.3
    reweight: float = 2.0
    masactrl_step: int = 4
    masactrl_layer: int = 10
    pnp_feature_steps: float = 0.8
    pnp_attention_steps: float = 0.5
    source_row: str | None = None      # None: the inversion's own rule (Inversion.source_correction)

    def __post_init__(self):
        if self.method not in EDIT_METHODS:
            raise ValueError(f"--method must be one of {', '.join(EDIT_METHODS)}, got {self.method!r}")
        if self.inversion not in INVERSIONS[self.method]:
            raise ValueError(f"--method {self.method} runs with --inversion {' / '.join(INVERSIONS[self.method])} "
                             f"(the rows of the published table this library has), got {self.inversion!r}"
                             + (": PnP's DDIM row edits from a DDIM reconstruction, which PlugAndPlay does not"
                                if self.method == "pnp" else ""))
        if self.source_row is not None and (self.source_row not in SOURCE_ROWS or self.method == "pnp"):
            raise ValueError(f"--source-row takes one of {', '.join(SOURCE_ROWS)} with --method p2p or masactrl (PnP's "
                             f"source row is the inversion's latents), got {self.source_row!r} with {self.method}")

    @property
    def row(self) -> str:
        """The table row's name, e.g. "direct+p2p"."""
        return f"{self.inversion}+{self.method}"

    @property
    def steps_offset(self) -> int:
        return 1 if self.method == "pnp" else 0

    def settings(self) -> dict:
        return dataclasses.asdict(self) | {"row": self.row, "steps_offset": self.steps_offset}


def p2p_edit(p: Protocol, entry: Entry):
    """(spec, LocalBlend or None) of the official P2P runner for this entry."""
    refine = Refine(cross_replace_steps=p.cross_replace_steps, self_replace_steps=p.self_replace_steps,
                    self_replace_max_res=p.self_replace_max_res)
    if entry.blend_words is None:
        return refine, None
    src, tgt = entry.blend_words
    spec = Reweight(cross_replace_steps=p.cross_replace_steps, self_replace_steps=p.self_replace_steps,
                    self_replace_max_res=p.self_replace_max_res, equalizer={tgt: p.reweight}, base=refine)
    blend = LocalBlend(words=((src,), (tgt,)), start_blend=p.start_blend, th=(p.blend_threshold, p.blend_threshold))
    return spec, blend


def run_entry(sd, p: Protocol, entry: Entry, progress: bool = False):
    """Invert the entry's picture and edit it as the row's protocol says: (the edited picture, uint8 (H, W, 3);
    what the record keeps of the run: spec, LocalBlend, inversion details)."""
    common = dict(num_steps=p.num_steps, steps_offset=p.steps_offset, progress=progress)
    if p.method == "p2p":
        spec, blend = p2p_edit(p, entry)
        inv = invert(sd, entry.image, entry.source_prompt, method=p.inversion, guidance_scale=p.guidance_scale,
                     num_inner_steps=p.num_inner_steps, **common)
        out = edit(sd, [entry.source_prompt, entry.target_prompt], spec, local_blend=blend, inversion=inv,
                   source_row=p.source_row, progress=progress)
    elif p.method == "masactrl":
        spec, blend = MutualSelfAttention(p.masactrl_step, p.masactrl_layer), None
        inv = invert(sd, entry.image, "", method=p.inversion, guidance_scale=p.guidance_scale, **common)
        out = edit(sd, ["", entry.target_prompt], spec, inversion=inv, source_row=p.source_row, progress=progress)
    else:
        spec, blend = PlugAndPlay(p.pnp_feature_steps, p.pnp_attention_steps), None
        inv = invert(sd, entry.image, entry.source_prompt, method="ddim", guidance_scale=1.0, **common)
        out = edit(sd, [entry.source_prompt, entry.target_prompt], spec, inversion=inv, num_steps=p.num_steps,
                   guidance_scale=p.guidance_scale, negative_prompt=PNP_NEGATIVE, progress=progress)
    return out.images[1], {"spec": repr(spec), "local_blend": repr(blend), "inversion_method": inv.method,
                           "inversion_info": inv.info}
