"""`torchrun --nproc_per_node=2 -m p2p.bench pie`: two CPU ranks (gloo) share the pictures; every picture is
edited once, by one rank, into the same bytes as a one-process run; rank 0 writes the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2p.bench import Protocol, read_mapping, run_row
from p2p.bench.run import picture_files
from pie_tiny import make_pie

ROOT = Path(__file__).parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_two_gloo_ranks_edit_each_picture_once_as_one_process(tmp_path, golden_dir, tiny_sd):
    data = make_pie(tmp_path / "data")
    ckpt = golden_dir / "tiny-sd-a.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "p2p.bench",
           "pie", str(data), "--method", "masactrl", "--inversion", "direct", "-o", str(tmp_path / "two"), "--ckpt",
           str(ckpt), "--steps", "2", "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 to run on 2 ranks" in proc.stdout and proc.stdout.count("3 pictures, 0 done") == 1   # rank 0 speaks
    assert (tmp_path / "two" / "pie_bench.csv").exists()

    p, entries = Protocol("masactrl", "direct", num_steps=2), read_mapping(data)
    weights = json.loads(picture_files(tmp_path / "two", p.row, entries[0].id)[1].read_text())
    weights = {k: weights[k] for k in ("checkpoint", "checkpoint_sha256", "dtype", "reading")}
    run_row(tiny_sd, p, entries, tmp_path / "one", weights, progress=False, log=lambda *a: None)
    for e in entries:
        two, one = (picture_files(tmp_path / d, p.row, e.id) for d in ("two", "one"))
        assert two[0].read_bytes() == one[0].read_bytes(), e.id
        assert json.loads(two[1].read_text())["key"] == json.loads(one[1].read_text())["key"]
    assert "device" in json.loads(two[1].read_text())
