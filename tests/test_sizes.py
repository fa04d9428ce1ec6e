"""Picture sizes: the multiple a model needs comes from its config (VAE factor times 2 per UNet level after
the first), is exactly what its UNet can run, and a refused size gets an error that says why."""
import pytest
import torch
from PIL import Image

from models import StableDiffusion, load_config
from p2p import generate, invert
from p2p.images import load_image
from p2p.pipeline import initial_latent
from weights_tools import load_checkpoint

# name: (multiple, a size accepted that the old "8 * VAE factor" rule refused, a side refused)
SIZES = {"tiny": (8, (24, 40), 36), "miniature": (8, (56, 40), 60)}


@pytest.mark.parametrize("name, multiple", [("sd-v1", 64), ("tiny", 8), ("miniature", 8)])
def test_the_multiple_is_read_from_the_config(name, multiple):
    cfg = load_config(name)
    assert cfg.size_multiple == multiple
    assert (cfg.default_height, cfg.default_width) == ({"sd-v1": 512}.get(name, 64),) * 2


@pytest.fixture(scope="module", params=sorted(SIZES))
def model(request):
    """The shipped miniature, and a random model of configs/tiny.yaml."""
    torch.manual_seed(0)
    sd = load_checkpoint("miniature") if request.param == "miniature" else StableDiffusion(load_config("tiny"))
    return request.param, sd.eval()


def test_an_accepted_size_runs(model):
    name, sd = model
    height, width = SIZES[name][1]
    out = generate(sd, "a photo", num_steps=1, height=height, width=width, progress=False)
    assert out.images.shape == (1, height, width, 3)


@torch.no_grad()
def test_a_refused_size_is_one_the_unet_cannot_run(model):
    name, sd = model
    multiple, _, side = SIZES[name]
    f = sd.latent_downsample
    context = torch.zeros(1, 77, sd.cfg.unet.context_dim)
    with pytest.raises(RuntimeError):  # the halved latent does not double back to its size
        sd.unet(torch.zeros(1, 4, side // f, side // f), 1, context)
    why = f"multiples of {multiple} \\(the VAE divides the sides by {f}, then the UNet halves that latent"
    with pytest.raises(ValueError, match=why):
        initial_latent(sd, 0, side, multiple)
    with pytest.raises(ValueError, match=f"got {multiple}x{side}; the nearest size at least as large is "
                                         f"{multiple}x{side + multiple - side % multiple}"):
        generate(sd, "a photo", num_steps=1, height=multiple, width=side, progress=False)


def test_invert_refuses_a_size_its_model_cannot_run(model):
    name, sd = model
    multiple, _, side = SIZES[name]
    with pytest.raises(ValueError, match=f"multiples of {multiple} \\(the VAE"):
        invert(sd, torch.zeros(1, 3, side, multiple), "a photo", method="ddim", num_steps=1, progress=False)
    with pytest.raises(ValueError, match=f"multiples of {multiple} \\(the VAE"):
        invert(sd, Image.new("RGB", (64, 64)), "a photo", method="ddim", num_steps=1, height=side, progress=False)
    with pytest.raises(ValueError, match="must be \\(1, 3, H, W\\)"):
        invert(sd, torch.zeros(3, multiple, multiple), "a photo", method="ddim", num_steps=1, progress=False)


def test_load_image_checks_the_multiple_it_is_given():
    img = Image.new("RGB", (32, 32))
    assert load_image(img, 24, 40, multiple=8).shape == (1, 3, 24, 40)
    with pytest.raises(ValueError, match="positive multiples of 8, got 0x40"):
        load_image(img, 0, 40, multiple=8)
