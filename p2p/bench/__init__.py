"""PIE-Bench (Ju et al. 2023, "Direct Inversion" / "PnP Inversion", ICLR 2024): its pictures edited with one row's
published protocol, measured with its metrics as its official code computes them, and tabulated; resumable and
sharded over ranks (docs/pie-bench.md).

The parts: pie.py (the data folder: the mapping file, the pictures, the masks, each entry's edit), protocol.py
(each row's inversion and edit, with the published settings), run.py (one row over the pictures, a PNG and a
record per picture), score.py (each picture measured with `metrics.Evaluator`), report.py (the table: printed,
CSV, JSON), command.py (`p2p bench pie | eval | report`, torchrun); the metrics: metrics.py (the Evaluator),
conventions.py (the official code's quirks as switches: flags, config keys, records), pixels.py, lpips.py,
structure.py, clipscore.py, inputs.py.
"""
from .pie import EDIT_TYPES, Entry, decode_mask, read_mapping
from .protocol import Protocol, run_entry
from .report import report
from .run import run_row
from .score import evaluate_row

__all__ = ["EDIT_TYPES", "Entry", "Protocol", "decode_mask", "evaluate_row", "read_mapping", "report", "run_entry",
           "run_row"]
