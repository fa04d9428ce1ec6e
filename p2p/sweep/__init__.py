"""`p2p sweep configs/ablations/NAME.yaml -o runs/NAME`: an ablation grid, resumable, sharded over ranks.

The cells are the product of the config's `grid`. Each cell is one source prompt and one edited
prompt with all its knobs resolved; its settings are written to cells/CELL.yaml (a plain edit
config: `p2p edit --config runs/NAME/cells/CELL.yaml -o x.png` reruns it alone).

Shared computation. Every edited row of a Prompt-to-Prompt batch depends only on the source row
and itself (the edit, alpha, equalizer and LocalBlend mask are per edited prompt; the source row
is never edited), so cells that differ only in the edited prompt, the reweight c (a per-prompt
equalizer list) or the edited prompt's LocalBlend word run as one batch
[source, edit_1, edit_2, ...] and the source is computed once. Cells that differ in tau, the
self-attention window or the blend threshold need their own batch: the controller has one
schedule per batch (that could be extended per edited prompt; it is not done here).

Resuming. Each cell's images and metrics are written atomically once its batch finishes
(cells/CELL.json last, holding a hash of the cell's settings): a rerun skips cells whose JSON
matches, so an interrupted run loses at most the batch in flight (`batch_size: 1` makes that one
cell). metrics.csv, metrics.json and figure.png are rebuilt from the per-cell files every time.

The parts: plan.py (the grid -> cells, the batches they share, the shards), run.py (one batch run
and measured, the per-cell files), report.py (metrics.csv, metrics.json, figure.png), command.py
(the driver and its command line).

Scaling out: `torchrun --nproc_per_node=N -m p2p.sweep CONFIG -o OUT` shards the batches over the
ranks with torch.distributed (nccl on GPUs, gloo on CPUs, one GPU per rank); rank 0 merges.
"""
from .command import add_arguments, main, run_from_args, run_sweep
from .plan import batch_settings, plan_batches, prepare
from .run import is_done, run_batch

__all__ = ["add_arguments", "batch_settings", "is_done", "main", "plan_batches", "prepare", "run_batch",
           "run_from_args", "run_sweep"]
