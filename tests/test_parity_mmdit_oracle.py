"""p2p.edit on MM-DiT models against an oracle of the official MM-DiT Prompt-to-Prompt (tests/mmdit_oracle.py:
their algorithm on diffusers' own StableDiffusion3Pipeline / FluxPipeline), on cases beyond the recorded golden
ones: every projection method, other replace fractions, LocalBlend blocks (SD3 block 0, Flux single-stream
blocks alone), thresholds, blend windows, sizes, step counts, guidance, prompts with punctuation and
multi-token words, an SD3.5-like model (qk-norm, attn2 layers shifting the block indices) and a
FLUX.1-schnell-like one. The oracle first reproduces the six golden cases exactly."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import p2p
from p2p.joint_control import JointController, JointReplace, blend_alpha, blend_mask, model_layout, smooth
from p2p.joint_pipeline import joint_generate
from tests.mmdit_oracle import alpha_layers, load_pipe, run_official, schnell_folder, sd35_folder
from weights_tools import load_checkpoint
from weights_tools.mmdit_text import load_flux_text, load_sd3_text

FIX = Path(__file__).parent / "fixtures" / "mmdit"
GOLDEN = ["sd3_plain", "sd3_qiki", "sd3_qiki_localblend_th", "flux_plain", "flux_qiki_full", "flux_qiki_localblend_th"]
SD3_PROMPTS = ["a watercolor painting of a cat sitting on a red car.",
               "a watercolor painting of a capybara sitting on a red car."]
FLUX_PROMPTS = ["a photo of a fox, inside is a smaller fox.", "a photo of a bear, inside is a smaller bear."]
SD3_WORDS, FLUX_WORDS = [["cat"], ["capybara"]], [["fox,", "fox."], ["bear,", "bear."]]
GUIDANCE = {"sd3": 7.0, "sd35": 7.0, "flux": 3.5, "schnell": 0.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmdit")
    return {"sd3": FIX / "tiny-sd3", "flux": FIX / "tiny-flux", "sd35": sd35_folder(FIX / "tiny-sd3", tmp / "sd35"),
            "schnell": schnell_folder(FIX / "tiny-flux", tmp / "schnell")}


@pytest.fixture(scope="module")
def pair(folders, one_thread):
    """name -> (the library's model, as a user loads it; diffusers' pipeline of the same folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            m = load_checkpoint(folders[name])
            if m.text is None:
                m.text = (load_sd3_text if name.startswith("sd3") else load_flux_text)(folders[name])
            cache[name] = m, load_pipe(folders[name])
        return cache[name]
    return get


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", GOLDEN)
def test_the_oracle_reproduces_the_golden_cases(pair, name):
    t, meta = load_file(FIX / f"{name}.safetensors"), json.loads((FIX / f"{name}.json").read_text())
    c = meta.get("controller") or {}
    z, ctrl = run_official(
        pair(meta["family"])[1], meta["prompts"], t["x_T"], meta["num_inference_steps"], meta["guidance_scale"],
        meta["height"], meta["width"], method=c.get("method"), replace_steps=c.get("replace_steps", 0.2),
        replace_blocks=c.get("replace_blocks"), words=c.get("local_blend_words"),
        threshold=c.get("local_blend_threshold", 0.3), blend_steps=c.get("local_blend_steps", 0.5),
        aggregate_blocks=c.get("aggregate_blocks"))
    assert rel(z, t["z0_unpacked"] if "z0_unpacked" in t else t["z0"]) <= 1e-5
    if "mask_steps" in t:
        assert torch.equal(ctrl.alpha, t["alpha_layers"])
        assert len(ctrl.masks) == len(t["mask_steps"]) and all(map(torch.equal, ctrl.masks, t["mask_steps"]))


def library_masks(m, prompts, spec, blend, **kw):
    """The library's LocalBlend mask at every blend step (recomputed from its maps as it blends)."""
    ctrl = JointController(prompts, spec, kw["num_steps"], model_layout(m), blend)
    masks, after = [], ctrl.after_step

    def record(i, x):
        b = ctrl.blend
        if i in b.steps and b.entries:
            masks.append(blend_mask(smooth(b.aggregate(), b.grid), b.grid, tuple(x.shape[2:]), b.threshold, b.pool))
        return after(i, x)
    ctrl.after_step = record
    joint_generate(m, prompts, controller=ctrl, progress=False, **kw)
    return masks


def as_official(mask, family):
    """The library's (1, 1, h, w) mask as the official code's: SD3 the same, Flux one value a packed token."""
    return mask.float() if family == "sd3" else mask[:, 0, ::2, ::2].reshape(1, -1, 1).float()


# model, method, replace_steps, LocalBlend (words, threshold, end_blend, blocks) or None, height, width, steps,
# guidance (None: the model's), prompts (None: the model's pair)[, {"blocks": JointReplace blocks,
# "start_blend": LocalBlend start_blend}]
CASES = {
    **{f"sd3_{mm}": ("sd3", mm, 0.2, None, 96, 128, 10, None, None)
       for mm in ("qi", "ki", "qk", "qikt", "qtki", "qtkt", "kivi")},
    **{f"flux_{mm}": ("flux", mm, 0.2, None, 96, 128, 10, None, None)
       for mm in ("qi", "ki", "qk", "qikt", "qtki", "qtkt", "kivi")},
    "sd3_replace_0.5": ("sd3", "qiki", 0.5, None, 96, 128, 10, None, None),
    "sd3_replace_1.0": ("sd3", "qiki", 1.0, None, 96, 128, 10, None, None),
    "flux_replace_0.5": ("flux", "qiki", 0.5, None, 96, 128, 10, None, None),
    "sd3_blend_block0": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.9, 0.5, (0,)), 96, 128, 10, None, None),
    "sd3_blend_all_end0.3": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.93, 0.3, (0, 1, 2)), 96, 128, 10, None, None),
    "sd3_blend_end1.0": ("sd3", "qiki", 0.5, (SD3_WORDS, 0.92, 1.0, (1, 2)), 96, 128, 10, None, None),
    "sd3_blend_128x96": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.9, 0.5, (1, 2)), 128, 96, 10, None, None),
    "sd3_blend_64x64_7steps": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.97, 0.5, (1, 2)), 64, 64, 7, None, None),
    "sd3_blend_160x96_4steps": ("sd3", "qk", 0.5, (SD3_WORDS, 0.9, 0.5, (2,)), 160, 96, 4, None, None),
    "sd3_blend_guidance4.5": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.9, 0.5, (1, 2)), 96, 128, 10, 4.5, None),
    "sd3_guidance1_no_cfg": ("sd3", "qiki", 0.2, (SD3_WORDS, 0.92, 0.5, (1, 2)), 96, 128, 10, 1.0, None),
    "sd3_punctuation": ("sd3", "qiki", 0.2, ([["cat,", "blue"], ["capybara,", "blue"]], 0.9, 0.5, (1, 2)), 96, 128,
                        10, None, ["a cat, sitting on a blue car!", "a capybara, sitting on a blue car!"]),
    "flux_blend_single_only": ("flux", "qiki", 0.2, (FLUX_WORDS, 0.75, 0.5, (2, 3)), 96, 128, 10, None, None),
    "flux_blend_single3_end1.0": ("flux", "qiki", 0.2, (FLUX_WORDS, 0.8, 1.0, (3,)), 96, 128, 10, None, None),
    "flux_blend_double0_end0.3": ("flux", "qiki", 0.5, (FLUX_WORDS, 0.7, 0.3, (0,)), 96, 128, 10, None, None),
    "flux_blend_128x96_7steps": ("flux", "qiki", 0.2, (FLUX_WORDS, 0.75, 0.5, (1, 2)), 128, 96, 7, None, None),
    "flux_blend_64x64_4steps": ("flux", "kivi", 0.5, (FLUX_WORDS, 0.7, 0.5, (0, 1, 2, 3)), 64, 64, 4, None, None),
    "flux_blend_160x96_guidance1": ("flux", "qiki", 0.2, (FLUX_WORDS, 0.75, 0.5, (1, 2)), 160, 96, 10, 1.0, None),
    "flux_multitoken": ("flux", "qiki", 0.2, ([["capybara"], ["hedgehog"]], 0.75, 0.5, (1, 2)), 96, 128, 10, None,
                        ["a capybara sitting on a red car.", "a hedgehog sitting on a red car."]),
    "sd35_qiki": ("sd35", "qiki", 0.2, None, 96, 128, 10, None, None),
    "sd35_blend_2_4": ("sd35", "qiki", 0.2, (SD3_WORDS, 0.9, 0.5, (2, 4)), 96, 128, 10, None, None),
    "sd35_blend_0_64x64": ("sd35", "qtki", 0.5, (SD3_WORDS, 0.985, 1.0, (0,)), 64, 64, 7, None, None),
    "sd3_replace_pair_80x112": ("sd3", "qiki", (0.1, 0.6), (SD3_WORDS, 0.9, 0.5, (1, 2)), 80, 112, 10, None, None),
    "flux_replace_single_blocks": ("flux", "qiki", 0.5, None, 96, 128, 10, None, None, {"blocks": (2, 3)}),
    "flux_blend_start0.2": ("flux", "qiki", 0.2, (FLUX_WORDS, 0.75, 0.6, (1, 2)), 96, 128, 10, None, None,
                            {"start_blend": 0.2}),
    "sd35_replace_blocks_0_4": ("sd35", "qk", 0.5, (SD3_WORDS, 0.95, 0.5, (4,)), 96, 128, 10, None, None,
                                {"blocks": (0, 4)}),
    "sd35_blend_every_block": ("sd35", "qiki", 0.2, (SD3_WORDS, 0.9, 0.5, None), 96, 128, 10, None, None),
    "schnell_qiki": ("schnell", "qiki", 0.5, None, 96, 128, 4, None, None),
    "schnell_blend_single": ("schnell", "qiki", 0.5, (FLUX_WORDS, 0.75, 0.5, (2, 3)), 96, 128, 4, None, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_library_agrees_with_the_oracle(pair, name):
    model, method, rs, lb, h, w, n, g, prompts, *extra = CASES[name]
    extra = extra[0] if extra else {}
    m, pipe = pair(model)
    family = "sd3" if model.startswith("sd3") else "flux"
    prompts = prompts or (SD3_PROMPTS if family == "sd3" else FLUX_PROMPTS)
    g = GUIDANCE[model] if g is None else g
    x_T = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(864))
    start = extra.get("start_blend", 0.0)
    blend = None if lb is None else p2p.LocalBlend(lb[0], threshold=lb[1], start_blend=start, end_blend=lb[2],
                                                   blocks=lb[3])
    spec = JointReplace(replace_steps=rs, method=method, blocks=extra.get("blocks"))
    kw = dict(latents=x_T, num_steps=n, guidance_scale=g, height=h, width=w)
    out = p2p.edit(m, prompts, spec, local_blend=blend, progress=False, **kw)
    z, ctrl = run_official(pipe, prompts, x_T, n, g, h, w, method=method, replace_steps=rs,
                           replace_blocks=extra.get("blocks"), words=None if lb is None else lb[0],
                           threshold=0.3 if lb is None else lb[1],
                           blend_steps=0.5 if lb is None else (start, lb[2]),
                           aggregate_blocks=None if lb is None or lb[3] is None else list(lb[3]))
    assert rel(out.latents, z) <= 1e-5
    assert rel(out.latents[1], out.latents[0]) > 1e-3            # the target row is edited
    if lb is not None:
        assert min(ctrl.margins) > 1e-4                           # no mask value sits on the threshold
        masks = [as_official(k, family) for k in library_masks(m, prompts, spec, blend, **kw)]
        assert len(masks) == len(ctrl.masks) == int(n * lb[2]) - int(n * start)
        assert all(map(torch.equal, masks, ctrl.masks))
        assert any(0 < k.mean() < 1 for k in masks)               # a partial mask at some step


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_more_prompts_edit_each_row_as_the_official_edits_a_pair(pair, model):
    """The official code takes two prompts; here every edited row is the official pair (source, that row):
    rows of the joint attention batch do not mix, and each row's mask is its own OR the source's."""
    m, pipe = pair(model)
    if model == "sd3":
        prompts = SD3_PROMPTS + ["a watercolor painting of a dog sitting on a red car."]
        words, th, g = SD3_WORDS + [["dog"]], 0.9, 7.0
    else:
        prompts = FLUX_PROMPTS + ["a photo of a cat, inside is a smaller cat."]
        words, th, g = FLUX_WORDS + [["cat,", "cat."]], 0.75, 3.5
    x_T = torch.randn((1, 16, 12, 16), generator=torch.Generator().manual_seed(864))
    out = p2p.edit(m, prompts, JointReplace(0.2), local_blend=p2p.LocalBlend(words, threshold=th, blocks=(1, 2)),
                   latents=x_T, num_steps=10, guidance_scale=g, height=96, width=128, progress=False)
    for r in (1, 2):
        z, _ = run_official(pipe, [prompts[0], prompts[r]], x_T, 10, g, 96, 128, words=[words[0], words[r]],
                            threshold=th, aggregate_blocks=[1, 2])
        assert rel(out.latents[[0, r]], z) <= 1e-5


def test_bad_input_is_refused_naming_the_fix(pair):
    m = pair("sd35")[0]
    kw = dict(latents=torch.randn(1, 16, 8, 8), num_steps=4, height=64, width=64, progress=False)
    with pytest.raises(ValueError, match=r"LocalBlend blocks \[1\] name no joint block of this model; its blocks "
                                         r"are \[0, 2, 4\] \(official counting: image-only attn2"):
        p2p.edit(m, SD3_PROMPTS, JointReplace(), local_blend=p2p.LocalBlend(SD3_WORDS, blocks=(1,)), **kw)
    with pytest.raises(ValueError, match=r"JointReplace blocks \[5\] name no joint block"):
        p2p.edit(m, SD3_PROMPTS, JointReplace(blocks=(5,)), **kw)
    with pytest.raises(ValueError, match=r"word\(s\) \['fox'\] not in prompt .*write 'fox,' for the piece 'fox,'"):
        p2p.edit(pair("flux")[0], FLUX_PROMPTS, JointReplace(), local_blend=p2p.LocalBlend([["fox"], ["bear"]]), **kw)
    with pytest.raises(ValueError, match="one word .* per prompt, source first: 3 prompts"):
        p2p.edit(m, SD3_PROMPTS + SD3_PROMPTS[:1], JointReplace(), local_blend=p2p.LocalBlend(SD3_WORDS), **kw)
    with pytest.raises(ValueError, match="an edit needs a source prompt and at least one edited prompt"):
        p2p.edit(m, SD3_PROMPTS[:1], JointReplace(), **kw)


# prompt pairs and blend words whose token columns must be the official ones: punctuation on either side,
# apostrophes, hyphens, digits, capitals (not in the tiny T5 vocabulary), several words in one string,
# multi-token words, doubled spaces, characters the T5 vocabulary lacks
WORD_CASES = [
    (["a (cat) sitting on a red-haired car.", "a (dog) sitting on a red-haired car."], [["(cat)"], ["(dog)"]]),
    (["a cat's hat on a car", "a dog's hat on a car"], [["cat's"], ["dog's"]]),
    (["2 cats sitting on 3 cars", "2 dogs sitting on 3 cars"], [["cats", "2"], ["dogs"]]),
    (["A Cat sitting on a car", "A Dog sitting on a car"], [["Cat"], ["Dog"]]),
    (["a cat sitting on a red car", "a dog sitting on a red car"], [["red car"], ["red car"]]),
    (["a zebra-striped cat; on a car!", "a zebra-striped dog; on a car!"], [["cat;", "zebra-striped"], ["dog;"]]),
    (["a cat... sitting!!", "a dog... sitting!!"], [["cat...", "sitting!!"], ["dog..."]]),
    (["a capybara", "a hedgehog"], [["capybara"], ["hedgehog"]]),
    (["a   cat  sitting", "a dog sitting"], [["cat"], ["dog"]]),
    (["a cat @#$ sitting", "a dog @#$ sitting"], [["sitting"], ["sitting"]]),
    (["a watercolor painting of a cat", "a watercolor painting of a dog"], [["watercolor"], ["painting"]]),
]


@pytest.mark.parametrize("model", ["sd3", "flux"])
@pytest.mark.parametrize("k", range(len(WORD_CASES)))
def test_word_columns_are_the_official_ones(pair, model, k):
    m, pipe = pair(model)
    prompts, words = WORD_CASES[k]
    toks = (pipe.tokenizer, pipe.tokenizer_3 if model == "sd3" else pipe.tokenizer_2)
    want = alpha_layers(model, prompts, words, toks, 256 if model == "sd3" else 512)
    assert want.any() and torch.equal(blend_alpha(model_layout(m), prompts, words).to(want.dtype), want)
