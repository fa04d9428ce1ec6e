"""Attention maps kept for LocalBlend and for pictures.

Maps are stored after editing (the reference stores views of the live maps that the edit then
overwrites), for the conditional half of the guidance batch only, averaged over heads, and summed
over steps: `average()` divides by the number of steps, as the reference's `get_average_attention`.
Only the layers asked for are kept, so nothing else is ever materialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.attention import Site, relative_side

# the reference (SD v1 at 512 px) stores cross-attention maps of latent sides up to 32 and injects (and here
# pictures) self-attention up to 16
CROSS_SIDE, SELF_SIDE = 32, 16


def is_read(site: Site) -> bool:
    """Maps are read from down/up cross-attention layers only (the reference's from_where=("up", "down"))."""
    return site.is_cross and site.place in ("down", "up")


def read_level(sites, level: int | None = None) -> int:
    """The one rule for which maps are read (LocalBlend's mask, metrics, attention pictures): the
    down/up cross-attention layers at resolution `level`, or at the deepest level when None, as the
    reference (level 2, 16x16, for SD v1 at 512 px). `sites`: the UNet's or a store's."""
    levels = sorted({s.level for s in sites if is_read(s)})
    if not levels:
        raise ValueError("no down/up cross-attention layers to read maps from (were any stored?)")
    if level is None:
        return levels[-1]
    if level not in levels:
        raise ValueError(f"level={level}: this UNet has down/up cross-attention at levels {levels} only; "
                         f"pick one of them (or None for the deepest, {levels[-1]})")
    return level


def read_sites(sites, level: int | None = None) -> list[Site]:
    """The sites `read_level`'s rule reads, in the order given: down/up cross-attention at that level."""
    sites = list(sites)
    level = read_level(sites, level)
    return [s for s in sites if is_read(s) and s.level == level]


@dataclass
class AttentionStore:
    """Running sums of head-averaged maps, one (B, N, K) tensor per kept layer.

    max_res: keep cross-attention layers whose latent has at most max_res**2 pixels (the
    reference keeps N <= 32**2). self_attention: also keep self-attention layers of at most
    self_max_res**2 pixels; their maps are N x N and formed only when kept, so keep them only
    for pictures (`viz.self_attention_components`). None (the defaults): the reference's 32 and 16,
    scaled with the model's default latent side where it is larger than SD v1's (SDXL at 1024: 64 and
    32; `models.attention.relative_side`); `p2p.edit` tells the store the model's side (default_side)."""
    max_res: int | None = None
    cross: bool = True
    self_attention: bool = False
    self_max_res: int | None = None
    extra: set = field(default_factory=set)  # site indices kept regardless (LocalBlend's layers)
    sums: dict = field(default_factory=dict)    # site index -> (B, N, K) sum over steps
    sites: dict = field(default_factory=dict)   # site index -> Site
    num_steps: int = 0
    default_side: int | None = None  # the model's default latent side (None: SD v1's, 64)

    def side(self, value: int | None, reference: int) -> int:
        """A limit as given, or (None) the reference's side relative to the model."""
        return value if value is not None else relative_side(reference, self.default_side)

    def wants(self, site: Site) -> bool:
        if site.index in self.extra:
            return True
        if site.is_cross:
            return self.cross and site.pixels <= self.side(self.max_res, CROSS_SIDE) ** 2
        return self.self_attention and site.pixels <= self.side(self.self_max_res, SELF_SIDE) ** 2

    def add(self, site: Site, M: torch.Tensor) -> None:
        """M: (B, heads, N, K) probabilities of the conditional rows, after editing. Kept in fp32
        whatever the model's dtype: a half sum over 50 steps loses the small weights."""
        m = M.float().mean(dim=1)
        prev = self.sums.get(site.index)
        self.sums[site.index] = m if prev is None else prev + m
        self.sites[site.index] = site

    def end_step(self) -> None:
        self.num_steps += 1

    def layers(self, places=("down", "mid", "up"), is_cross=True, res=None, level=None) -> list[Site]:
        """Kept sites in call order, filtered by place, kind, side (int or (h, w)) and level."""
        out = []
        for i in sorted(self.sites):
            s = self.sites[i]
            if s.place not in places or s.is_cross != is_cross:
                continue
            if res is not None and (s.h, s.w) != ((res, res) if isinstance(res, int) else tuple(res)):
                continue
            if level is not None and s.level != level:
                continue
            out.append(s)
        return out

    def average(self, site: Site) -> torch.Tensor:
        """The layer's head-averaged map averaged over the steps so far: (B, N, K)."""
        return self.sums[site.index] / max(self.num_steps, 1)

    def layer_mean(self, sites, average: bool = True) -> torch.Tensor:
        """Mean over `sites` (one side) of their head-averaged maps, (B, h, w, K): averaged over the
        steps, or their sums over the steps (LocalBlend's input, as the reference)."""
        maps = [self.average(s) if average else self.sums[s.index] for s in sites]
        return torch.stack([m.reshape(m.shape[0], s.h, s.w, m.shape[-1]) for m, s in zip(maps, sites)]).mean(0)

    def level_maps(self, level: int | None = None, select: int = 0) -> torch.Tensor:
        """Step-averaged down/up cross-attention of prompt `select` at `level` (`read_level`'s rule):
        (h, w, K), what metrics and pictures read."""
        return self.layer_mean(read_sites([self.sites[i] for i in sorted(self.sites)], level))[select]

    def aggregate(self, res, from_where=("up", "down"), is_cross=True, select: int = 0) -> torch.Tensor:
        """The reference's aggregate_attention: mean over layers and heads of the step-averaged
        maps at side `res`, for prompt `select`: (h, w, K)."""
        sites = self.layers(from_where, is_cross, res=res)
        if not sites:
            kept = sorted({(s.h, s.w) for s in self.sites.values() if s.is_cross == is_cross})
            raise ValueError(f"no stored {'cross' if is_cross else 'self'}-attention maps at {res} from "
                             f"{list(from_where)}; stored sides: {kept}. Keep them with "
                             f"AttentionStore(max_res=..., self_attention=...)")
        maps = torch.stack([self.average(s)[select] for s in sites]).mean(0)
        s = sites[0]
        return maps.reshape(s.h, s.w, -1)
