"""`torchrun --nproc_per_node=2 -m p2p.sweep`: two CPU ranks (gloo) shard the cells; rank 0's merge
equals a one-process run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import p2p.sweep

ROOT = Path(__file__).parent.parent
# 4 cells in 2 batches (one per tau): each rank gets one batch
ABLATION = """ckpt: {ckpt}
prompt: a cat riding a bicycle
edits: [a cat riding a car]
mode: replace
num_steps: 2
height: 64
width: 64
grid:
  self_replace_steps: [0.0, 0.5]
  edit: [a cat riding a car, a cat riding a horse]
"""
METRICS = ("psnr_bg", "ssim_bg", "change_in_mask", "mask_fraction", "latent_l2", "attention_iou", "batch_cells")

pytestmark = pytest.mark.usefixtures("one_thread")



def test_two_gloo_ranks_equal_one_process(tmp_path, golden_dir, tiny_sd):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(ABLATION.format(ckpt=golden_dir / "tiny-sd-a.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "p2p.sweep", str(cfg), "-o", str(tmp_path / "two"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 ranks" in proc.stdout

    one = p2p.sweep.run_sweep(cfg, tmp_path / "one", sd=tiny_sd, progress=False, log=lambda *a: None)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["cells"]
    assert [r["cell"] for r in two] == [r["cell"] for r in one] and len(one) == 4
    for a, b in zip(one, two):
        assert a["config_hash"] == b["config_hash"]
        for k in METRICS:
            x, y = a["metrics"][k], b["metrics"][k]
            assert (x is None and y is None) or x == y or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4), (a["cell"], k)
    # the merged files were written once, by rank 0, from both ranks' cells
    assert (tmp_path / "two" / "figure.png").exists() and len(list((tmp_path / "two" / "cells").glob("*.yaml"))) == 4
