"""The PIE-Bench evaluator: which picture and prompt each metric reads (as the benchmark's evaluate.py), the
conventions reaching the metrics (each switch changing its metrics and no other, the docs' switch table), skipped
metrics naming their files, and bad files and inputs refused by name. The metrics' values themselves are held to
torchmetrics, lpips and transformers by tests/test_parity_pie_*.py."""
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.clip_vision import CLIPPair, CLIPVisionConfig
from models.config import CLIPTextConfig
from models.vit import VisionTransformer, ViTConfig
from p2p.bench.clipscore import clip_similarity, load_clip
from p2p.bench.conventions import NAMES, TABLE_END, TABLE_START, markdown_table
from p2p.bench.lpips import SqueezeLPIPS, load_lpips, lpips_unedited
from p2p.bench.metrics import METRICS, Conventions, Evaluator, MetricFiles
from p2p.bench.pixels import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from p2p.bench.structure import load_dino, structure_distance
from pie_oracles import masks, picture_pair
from weights_tools.layout import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCE_PROMPT, TARGET_PROMPT = "a slanted mountain bicycle on the road", "a slanted [rusty] mountain bicycle on the road"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> MetricFiles:
    """Tiny random networks in the real files' layouts: DINO's backbone .pth (12 blocks: the distance reads the
    last of 12), CLIP as one safetensors file of CLIPModel's keys (CLIP's own vocabulary), LPIPS' two .pth (the
    parity tests write the zip format, this one the legacy format)."""
    folder = tmp_path_factory.mktemp("metric-files")
    torch.manual_seed(0)
    dino = VisionTransformer(ViTConfig(width=64, layers=12, heads=1, mlp_width=96, patch_size=8, grid=4))
    for p in dino.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.save(dino.state_dict(), folder / "dino_vitb8_pretrain.pth")
    torch.manual_seed(6)            # a CLIP whose cosines here are positive: CLIPScore's clamp at 0 would hide a mix-up
    clip = CLIPPair(CLIPTextConfig(width=64, layers=1, heads=1, intermediate_size=96),
                    CLIPVisionConfig(width=64, layers=1, heads=1, intermediate_size=96, patch_size=32), 16)
    for p in clip.parameters():     # every weight set, class_embedding included (left unset by the constructor)
        torch.nn.init.normal_(p, std=0.2)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "clip.safetensors")
    net = SqueezeLPIPS().state_dict()
    torch.save({k: v for k, v in net.items() if k.startswith("features.")}, folder / "squeezenet1_1-b8a52dc0.pth",
               _use_new_zipfile_serialization=False)       # torch's legacy format, as lpips' own file is
    torch.save({k: v.abs() for k, v in net.items() if k.startswith("lin")}, folder / "squeeze.pth")
    return MetricFiles(*(str(folder / n) for n in ("dino_vitb8_pretrain.pth", "clip.safetensors",
                                                   "squeezenet1_1-b8a52dc0.pth", "squeeze.pth")))


@pytest.fixture(scope="module")
def case():
    source, edited, box = picture_pair(0, 64)
    return source, edited, masks(64, box)["box+frame"]


def test_without_files_the_pixel_metrics_run_and_each_skip_names_its_file(case):
    ev = Evaluator(MetricFiles())
    assert set(ev.skipped) == set(METRICS) - {"psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"}
    assert ev.skipped["structure_distance"].startswith("no --dino: get DINO")
    assert "--clip" in ev.skipped["clip_similarity_target_image"]
    assert "squeezenet1_1-b8a52dc0.pth" in ev.skipped["lpips_unedit_part"]
    assert "v0.1/squeeze.pth" in ev.skipped["lpips_unedit_part"]
    out = ev(*case, SOURCE_PROMPT, TARGET_PROMPT)
    assert list(out) == ["psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"] == list(ev.metrics)
    only_linear = Evaluator(MetricFiles(lpips_linear="anything"))
    assert "--lpips-backbone" in only_linear.skipped["lpips_unedit_part"]
    assert "--lpips-linear" not in only_linear.skipped["lpips_unedit_part"]


def test_every_metric_reads_the_picture_and_prompt_evaluate_py_gives_it(files, case):
    source, edited, mask = case
    out = Evaluator(files)(source, edited, mask, SOURCE_PROMPT, TARGET_PROMPT)
    assert list(out) == list(METRICS)
    clip, bare = load_clip(files.clip), TARGET_PROMPT.replace("[", "").replace("]", "")
    want = {
        "structure_distance": structure_distance(load_dino(files.dino), source, edited),
        "psnr_unedit_part": peak_signal_noise_ratio(source, edited, mask),
        "lpips_unedit_part": lpips_unedited(load_lpips(files.lpips_backbone, files.lpips_linear), source, edited, mask),
        "mse_unedit_part": mean_squared_error(source, edited, mask),
        "ssim_unedit_part": structural_similarity(source, edited, mask),
        "clip_similarity_source_image": clip_similarity(clip, source, SOURCE_PROMPT),
        "clip_similarity_target_image": clip_similarity(clip, edited, bare),
        "clip_similarity_target_image_edit_part": clip_similarity(clip, edited, bare, mask=mask)}
    assert out == pytest.approx(want, rel=1e-6)
    assert out["structure_distance"] > 0 and out["lpips_unedit_part"] > 0 and min(out.values()) > 0
    assert out["clip_similarity_target_image"] != pytest.approx(clip_similarity(clip, edited, TARGET_PROMPT))
    assert out["clip_similarity_target_image_edit_part"] != pytest.approx(out["clip_similarity_target_image"])


def test_conventions_reach_their_metrics(files, case):
    source, edited, mask = case
    conventions = Conventions(average="region", ssim_border="reflect", lpips_norm="torchmetrics")
    ev = Evaluator(MetricFiles(lpips_backbone=files.lpips_backbone, lpips_linear=files.lpips_linear),
                   conventions=conventions)
    out = ev(source, edited, mask, SOURCE_PROMPT, TARGET_PROMPT)
    assert out["mse_unedit_part"] == mean_squared_error(source, edited, mask, average="region")
    assert out["psnr_unedit_part"] == peak_signal_noise_ratio(source, edited, mask, average="region")
    assert out["ssim_unedit_part"] == structural_similarity(source, edited, mask, border="reflect", average="region")
    assert out["lpips_unedit_part"] == lpips_unedited(ev.lpips, source, edited, mask, norm="torchmetrics")
    assert out != Evaluator(MetricFiles(lpips_backbone=files.lpips_backbone, lpips_linear=files.lpips_linear))(
        source, edited, mask, SOURCE_PROMPT, TARGET_PROMPT)
    with pytest.raises(ValueError, match="ssim_border='same'.*valid"):
        Conventions(ssim_border="same")


def test_network_conventions_reach_their_metrics(files, case):
    source, edited, mask = case
    long_prompt = " ".join(["a rusty mountain bicycle"] * 30)           # over 77 ids: where keep_eos matters
    conventions = Conventions(dino_pixel_range=1.0, dino_antialias=True, clip_keep_eos=True)
    ev = Evaluator(MetricFiles(dino=files.dino, clip=files.clip), conventions=conventions)
    out = ev(source, edited, mask, long_prompt, long_prompt)
    official = Evaluator(MetricFiles(dino=files.dino, clip=files.clip))(source, edited, mask, long_prompt, long_prompt)
    assert out["structure_distance"] == pytest.approx(
        structure_distance(ev.dino, source, edited, pixel_range=1.0, antialias=True), rel=1e-6)
    assert out["clip_similarity_target_image"] == pytest.approx(
        clip_similarity(ev.clip, edited, long_prompt, keep_eos=True), rel=1e-6)
    for name in ("structure_distance", "clip_similarity_source_image", "clip_similarity_target_image_edit_part"):
        assert out[name] != pytest.approx(official[name], rel=1e-6), name


def test_nothing_unedited_gives_nan_for_the_unedited_metrics(files, case):
    source, edited, _ = case
    out = Evaluator(MetricFiles(lpips_backbone=files.lpips_backbone, lpips_linear=files.lpips_linear))(
        source, edited, np.ones((64, 64)), SOURCE_PROMPT, TARGET_PROMPT)
    assert all(math.isnan(v) for v in out.values()) and len(out) == 4


def test_a_given_file_that_is_missing_truncated_or_the_other_one_is_refused_by_name(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*squeezenet1_1-b8a52dc0.pth"):
        Evaluator(MetricFiles(lpips_backbone=str(tmp_path / "nowhere.pth"), lpips_linear=files.lpips_linear))
    data = open(files.lpips_backbone, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated.*squeezenet1_1-b8a52dc0.pth"):
        Evaluator(MetricFiles(lpips_backbone=str(tmp_path / "cut.pth"), lpips_linear=files.lpips_linear))
    with pytest.raises(CheckpointError, match="squeeze.pth: lacks 50 of the 50 tensors.*features.0.weight.*"
                                              "holds .'lin0.model.1.weight'.*get torchvision's ImageNet SqueezeNet 1.1"):
        Evaluator(MetricFiles(lpips_backbone=files.lpips_linear, lpips_linear=files.lpips_linear))
    torch.save({f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))},
               tmp_path / "alex.pth")
    with pytest.raises(CheckpointError, match="alex.pth: lacks 2 of the 7 tensors.*lin5.*LPIPS v0.1's SqueezeNet"):
        load_lpips(files.lpips_backbone, tmp_path / "alex.pth")


def test_bad_pictures_and_masks_are_refused_with_the_fix(case):
    source, edited, mask = case
    ev = Evaluator(MetricFiles())
    with pytest.raises(ValueError, match="0/255 mask divided by 255"):
        ev(source, edited, mask * 255, SOURCE_PROMPT, TARGET_PROMPT)
    with pytest.raises(ValueError, match=r"mask: shape \(32, 32\).*\(64, 64\)"):
        ev(source, edited, mask[:32, :32], SOURCE_PROMPT, TARGET_PROMPT)
    with pytest.raises(ValueError, match="differ in size"):
        ev(source, edited[:32], mask, SOURCE_PROMPT, TARGET_PROMPT)
    with pytest.raises(ValueError, match="uint8 .H, W, 3."):
        ev(source.astype(np.float32), edited, mask, SOURCE_PROMPT, TARGET_PROMPT)


# each switch of p2p.bench.conventions, its other choice and the metrics it changes (and no other)
ALTERNATIVES = {"average": ("region", {"psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"}),
                "ssim_border": ("reflect", {"ssim_unedit_part"}),
                "lpips_norm": ("torchmetrics", {"lpips_unedit_part"}),
                "dino_pixel_range": (1.0, {"structure_distance"}),
                "dino_antialias": (True, {"structure_distance"}),
                "clip_keep_eos": (True, set(METRICS[5:])),
                "clip_empty_mask": ("score", {"clip_similarity_target_image_edit_part"})}


@pytest.fixture(scope="module")
def wide_case():
    """A 256 x 256 pair (DINO's resize to 224 shrinks it: where antialiasing matters), its box mask and no mask."""
    source, edited, box = picture_pair(1, 256)
    return source, edited, {"box": masks(256, box)["box+frame"], "empty": np.zeros((256, 256))}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_every_switch_is_listed_here():
    assert set(ALTERNATIVES) == set(NAMES)


@pytest.fixture(scope="module")
def small_last_map(files, tmp_path_factory) -> MetricFiles:
    """LPIPS whose last map (its last Fire block's expand layers scaled by 1e-5) holds feature vectors near zero,
    where the two normalisations differ, and whose other six linear layers are zero: on the other maps the two
    agree to float32's rounding, and their terms would hide the last map's in the sum."""
    folder = tmp_path_factory.mktemp("small-last-map")
    state = torch.load(files.lpips_backbone, weights_only=True)
    torch.save({k: v * 1e-5 if k.startswith("features.12.expand") else v for k, v in state.items()},
               folder / "squeezenet1_1-b8a52dc0.pth")
    linear = torch.load(files.lpips_linear, weights_only=True)
    torch.save({k: v if k.startswith("lin6") else torch.zeros_like(v) for k, v in linear.items()},
               folder / "squeeze.pth")
    return dataclasses.replace(files, lpips_backbone=str(folder / "squeezenet1_1-b8a52dc0.pth"),
                               lpips_linear=str(folder / "squeeze.pth"))


@pytest.mark.parametrize("name", ALTERNATIVES)
def test_each_switch_changes_its_metrics_and_no_other(files, small_last_map, wide_case, name):
    source, edited, mask_of = wide_case
    value, changes = ALTERNATIVES[name]
    files = small_last_map if name == "lpips_norm" else files
    mask = mask_of["empty" if name == "clip_empty_mask" else "box"]
    long_prompt = " ".join(["a rusty mountain bicycle"] * 30)           # over 77 ids: where keep_eos matters
    official = Evaluator(files)(source, edited, mask, long_prompt, long_prompt)
    other = Evaluator(files, conventions=Conventions(**{name: value}))(source, edited, mask, long_prompt, long_prompt)
    assert {m for m in METRICS if not same(official[m], other[m])} == changes
    if name == "clip_empty_mask":
        assert math.isnan(official["clip_similarity_target_image_edit_part"])
        assert other["clip_similarity_target_image_edit_part"] >= 0


def test_the_docs_switch_table_is_the_declarations():
    text = (Path(__file__).parent.parent / "docs" / "pie-bench-metrics.md").read_text()
    assert TABLE_START in text and TABLE_END in text, "docs/pie-bench-metrics.md lost its switch table markers"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert table == markdown_table(), ("docs/pie-bench-metrics.md's switch table is stale: paste "
                                       "p2p.bench.conventions.markdown_table() between its markers")
