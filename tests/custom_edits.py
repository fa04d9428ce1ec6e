"""A researcher's own edit specs, named by import path in configs (`mode: custom_edits:WeightedMix`)."""
from dataclasses import dataclass

from p2p import Edit


@dataclass(frozen=True)
class WeightedMix(Edit):
    """The edited prompt's maps mixed with the source's: weight * M_t + (1 - weight) * M*_t."""
    weight: float = 0.5

    def cross_edit(self, tokenizer, prompts):
        w = self.weight
        return lambda i, M_src, M_edit: w * M_src + (1 - w) * M_edit


class NotAnEdit:
    """A class that is not an edit spec."""
