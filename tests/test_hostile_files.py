"""Corrupt and hostile checkpoint files get a CheckpointError naming the problem, from loading and from
`inspect` alike, before anything large is allocated or built (each file is built here, a few bytes)."""
import json
import pickle
import shutil
import struct
import zipfile
import zlib

import pytest
import torch
from PIL import Image

from p2p.config import load_edit_config
from weights_tools import CheckpointError, inspect_checkpoint, load_checkpoint
from weights_tools.safe_pickle import TorchZip

from conftest import GOLDEN_CKPT


def raw_safetensors(path, header: dict, data: bytes = b"", length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def refused_everywhere(path, pattern):
    """load_checkpoint and inspect_checkpoint both refuse the file with the same kind of message."""
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=pattern):
            read(path)


F32 = lambda shape, begin: {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * _n(shape)]}  # noqa
_n = lambda shape: eval("*".join(map(str, shape)) or "1")  # noqa: E731


@pytest.mark.parametrize("header, data, pattern", [
    ({"a": F32([2], 0), "b": F32([2], 4)}, bytes(12), "overlaps the previous tensor"),
    ({"a": F32([2], 0), "b": F32([2], 12)}, bytes(20), "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), r"0 <= begin <= end"),
    ({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, bytes(32), "dtype 'F128' is not one of"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "is 12 bytes, its data_offsets span 8"),
    ({"a": [1, 2, 3]}, b"", "must be a mapping with dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "must be a mapping with dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
    ({"a": F32([4], 0)}, bytes(8), "truncated safetensors file"),
    ({"__metadata__": {"x": 1}, "a": F32([2], 0)}, bytes(8), "__metadata__ must map names to strings"),
])
def test_corrupt_safetensors_headers(tmp_path, header, data, pattern):
    refused_everywhere(raw_safetensors(tmp_path / "bad.safetensors", header, data), pattern)


def test_header_length_beyond_the_file(tmp_path):
    path = raw_safetensors(tmp_path / "bad.safetensors", {"a": F32([2], 0)}, bytes(8), length=3 << 30)
    refused_everywhere(path, "its header alone should be 3221225472 bytes")


def test_header_longer_than_safetensors_allows(tmp_path):
    path = raw_safetensors(tmp_path / "bad.safetensors", {"a": F32([2], 0)}, bytes(8), length=200 << 20)
    path.write_bytes(path.read_bytes() + bytes(200 << 20))  # the file is long enough: the format's limit refuses it
    refused_everywhere(path, "more than the 104857600 safetensors allows")


def with_ldm_config(tmp_path, edit):
    """The golden checkpoint with its ldm_config metadata edited (the tensors' bytes kept as they are)."""
    raw = GOLDEN_CKPT.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    cfg = json.loads(header["__metadata__"]["ldm_config"])
    edit(cfg["model"]["params"])
    header["__metadata__"]["ldm_config"] = json.dumps(cfg)
    text = json.dumps(header).encode()
    path = tmp_path / "edited.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return path


@pytest.mark.parametrize("field, value, pattern", [
    ("num_heads", 0, r"unet.num_heads = 0, outside 1..256"),
    ("num_res_blocks", 200000, r"unet.num_res_blocks = 200000, outside 1..16"),
    ("model_channels", "32", r"unet.model_channels = 32, outside"),
    ("channel_mult", [1] * 40, r"unet.channel_mult = .*not 1 to 8 levels"),
])
def test_implausible_architecture_metadata_is_refused_at_once(tmp_path, field, value, pattern):
    path = with_ldm_config(tmp_path, lambda p: p["unet_config"]["params"].__setitem__(field, value))
    refused_everywhere(path, pattern)  # before any model is built from it (200000 blocks took minutes)


@pytest.mark.parametrize("value", [-0.18215, 1e30, 0, 1e-30, float("nan")])
def test_an_implausible_vae_scale_in_ldm_config_is_refused_at_once(tmp_path, value):
    path = with_ldm_config(tmp_path, lambda p: p.__setitem__("scale_factor", value))
    refused_everywhere(path, r"ldm_config metadata\): its architecture has scale_factor = .*not a finite number")


@pytest.mark.parametrize("content, pattern", [("{}", "lacks 'block_out_channels'"), ("[1, 2]", "mapping of settings"),
                                              ('{"block_out_channels": 3}', "wrong kind")])
def test_diffusers_unet_config_of_the_wrong_shape(tmp_path, content, pattern):
    folder = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        shutil.copy(GOLDEN_CKPT, folder / part / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "config.json").write_text(content)
    refused_everywhere(folder, pattern)


# ------------------------------------------------------------------------------------ .ckpt (torch zip)
def torch_zip(path, pickle_bytes: bytes, records: dict | None = None, compress=zipfile.ZIP_STORED):
    """A zip laid out as torch.save writes it: archive/data.pkl, archive/data/KEY, archive/byteorder."""
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def claim_size(path, name: str, size: int):
    """Rewrite the central directory's uncompressed size of `name` (what zipfile believes)."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry
    while True:
        n, m, k = struct.unpack("<HHH", raw[at + 28:at + 34])
        if raw[at + 46:at + 46 + n].decode() == name:
            struct.pack_into("<I", raw, at + 24, size)
            path.write_bytes(bytes(raw))
            return path
        at = raw.index(b"PK\x01\x02", at + 46 + n + m + k)


def test_memo_index_beyond_the_pickle(tmp_path):
    pkl = b"\x80\x02}r" + struct.pack("<I", 1 << 28) + b"."   # {} memoised at index 2**28
    refused_everywhere(torch_zip(tmp_path / "memo.ckpt", pkl), "names memo entry 268435456")


def test_bytearray_larger_than_the_file(tmp_path):
    pkl = b"\x80\x02c__builtin__\nbytearray\n\x8a\x05" + (3 << 30).to_bytes(5, "little") + b"\x85R."
    refused_everywhere(torch_zip(tmp_path / "alloc.ckpt", pkl), "bytearray of 3221225472 bytes")


def test_str_of_a_shared_nested_list_is_not_allowed(tmp_path):
    """builtins.str of memo-shared nested lists (each level holds the previous one twice) grows
    exponentially with the depth; checkpoints never need str() called, so the name is refused."""
    levels = b"".join(b"0]q" + bytes([i + 1]) + b"(h" + bytes([i]) + b"h" + bytes([i]) + b"e" for i in range(40))
    pkl = b"\x80\x02c__builtin__\nstr\n]q\x00" + levels + b"\x85R."
    refused_everywhere(torch_zip(tmp_path / "str.ckpt", pkl), r"`__builtin__.str`")


def test_records_claiming_more_than_the_file_holds(tmp_path):
    state = {"w": torch.zeros(4)}
    torch.save(state, tmp_path / "ok.ckpt")
    src = zipfile.ZipFile(tmp_path / "ok.ckpt")
    pkl_name = next(n for n in src.namelist() if n.endswith("data.pkl"))
    data_name = next(n for n in src.namelist() if "/data/" in n)
    shutil.copy(tmp_path / "ok.ckpt", tmp_path / "pkl.ckpt")
    refused_everywhere(claim_size(tmp_path / "pkl.ckpt", pkl_name, 2 << 30), r"data.pkl` claims 2147483648 bytes")
    shutil.copy(tmp_path / "ok.ckpt", tmp_path / "rec.ckpt")
    claim_size(tmp_path / "rec.ckpt", data_name, int(3.5 * (1 << 30)))
    with pytest.raises(CheckpointError, match="claims 3758096384 bytes"):
        TorchZip(tmp_path / "rec.ckpt").read(TorchZip(tmp_path / "ok.ckpt").obj["w"])


def test_deflated_pickle_beyond_the_limit(tmp_path):
    pkl = pickle.dumps({"x": "a" * 10}, protocol=2)
    path = torch_zip(tmp_path / "big.ckpt", pkl, compress=zipfile.ZIP_DEFLATED)
    refused_everywhere(claim_size(path, "archive/data.pkl", 300 << 20), "claims 314572800 bytes")


@pytest.mark.parametrize("length", [6, 7])
def test_storage_record_of_half_or_odd_length(tmp_path, length):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as src, zipfile.ZipFile(tmp_path / "cut.ckpt", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:length] if "/data/" in name else data)
    zip_ = TorchZip(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match=f"has {length} bytes, which is not the whole torch.float32 elements"):
        zip_.read(zip_.obj["state_dict"]["w"])


# ------------------------------------------------------------------------------------ YAML configs
def laughs(key: str, depth: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases stand for 10**depth values under `key`."""
    lines = ['_a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"_a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, depth)]
    return "\n".join(lines + [f"{key}: *a{depth - 1}"]) + "\n"


@pytest.mark.parametrize("key", ["prompt", "edits", "cross_replace_steps", "local_blend", "seed"])
def test_yaml_aliases_that_expand_without_bound(tmp_path, key):
    path = tmp_path / "bomb.yaml"
    path.write_text(laughs(key))
    assert path.stat().st_size < 1000
    with pytest.raises(ValueError, match="aliases .* expand to more than 10000 values") as e:
        load_edit_config(path)
    assert len(str(e.value)) < 500


def test_a_long_value_is_shortened_in_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("prompt: a cat\nedits: [a dog]\nseed: [" + ", ".join(["12345678"] * 5000) + "]\n")
    with pytest.raises(ValueError, match="'seed' has the wrong type") as e:
        load_edit_config(path)
    assert len(str(e.value)) < 500


# ------------------------------------------------------------------------------------ pictures
def png_claiming(path, width: int, height: int):
    """A PNG of a few bytes whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_decompression_bomb_picture(tmp_path):
    from p2p.images import open_image

    with pytest.raises(ValueError, match=r"too large to open safely .* `PIL.Image.MAX_IMAGE_PIXELS = N`"):
        open_image(png_claiming(tmp_path / "huge.png", 20000, 20000))


# ------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("flags, pattern", [
    (["--seed", str(2 ** 70)], r"'seed' must be a finite number from 0 to 18446744073709551615, got 1180591620"),
    (["--guidance", "nan"], r"'guidance_scale' must be a finite number .* got nan"),
    (["--guidance", "inf"], r"'guidance_scale' .* got inf"),
    (["--guidance", "1e30"], r"'guidance_scale' .* got 1e\+30"),
    (["--weight", "square=nan"], r"'equalizer' gives 'square' the weight nan"),
    (["--weight", "square=1e30"], r"'equalizer' gives 'square' the weight 1e\+30"),
    (["--steps", "10000000"], r"'num_steps' must be a finite number from 1 to 1000"),
    (["--height", "100000"], r"'height' must be a finite number from 8 to 16384"),
    (["--steps-offset", "-500"], r"'steps_offset' must be a finite number from 0 to 999"),
    (["--cross-steps", "abc"], r"--cross-steps takes F, START END, or F WORD=F .*'abc' is not a number"),
    (["--cross-steps", "0.5", "square=x"], r"--cross-steps takes .*'x' is not a number"),
    (["--weight", "square=abc"], r"--weight takes WORD=C or WORD=C1,C2 .*'abc' is not a number"),
])
def test_absurd_settings_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, flags, pattern):
    import p2p.cli

    monkeypatch.setattr(p2p.cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    out = tmp_path / "x.png"
    argv = ["edit", "--prompt", "a red circle", "--edit", "a red square", *flags, "-o", str(out)]
    assert p2p.cli.main(argv) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("steps, offset", [(50, 20), (50, 1000), (1000, 1)])
def test_steps_offset_past_the_schedule(steps, offset):
    from models.ddim import DDIM

    with pytest.raises(ValueError, match=r"steps_offset must be in \[0, \d+\] for \d+ steps"):
        DDIM.create(steps, offset)


# ------------------------------------------------------------------------------------ non-finite runs
@pytest.mark.parametrize("part, name, where", [
    ("text_encoder", "final_layer_norm.weight", "the text encoder's output"),
    ("unet", "out.2.bias", r"the latents after UNet step 0 \(t=751\)"),
    ("vae", "decoder.conv_out.bias", "the VAE decoder's output"),
])
def test_nan_weights_stop_the_run_where_they_show(part, name, where):
    from p2p import generate
    from p2p.pipeline import NonFiniteError

    sd = load_checkpoint(GOLDEN_CKPT)
    with torch.no_grad():
        dict(getattr(sd, part).named_parameters())[name].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=where + " holds nan or inf"):
        generate(sd, ["a cat"], num_steps=4, height=32, width=32, progress=False)


@pytest.mark.parametrize("kw, pattern", [(dict(guidance_scale=float("nan")), "'guidance_scale'"),
                                         (dict(seed=2 ** 70), "'seed'"), (dict(height=100000), "'height'")])
def test_the_api_refuses_absurd_settings_too(tiny_sd, kw, pattern):
    from p2p import edit, generate

    for run in (generate, lambda sd, p, **k: edit(sd, [p[0], p[0]], None, **k)):
        with pytest.raises(ValueError, match=pattern):
            run(tiny_sd, ["a cat"], progress=False, **kw)


# ------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("command", ["generate", "edit", "invert"])
@pytest.mark.parametrize("output, pattern", [("out.pgn", "cannot tell the image format"),
                                             ("out", "cannot tell the image format"),
                                             ("folder.png", "is a folder"), ("afile/out.png", "a file")])
def test_bad_output_paths_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, command, output, pattern):
    import p2p.cli

    monkeypatch.setattr(p2p.cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    out = str(tmp_path / output)
    argv = {"generate": ["generate", "--prompt", "a cat", "-o", out],
            "edit": ["edit", "--prompt", "a red circle", "--edit", "a red square", "-o", out],
            "invert": ["invert", "--ckpt", "miniature", "--image", str(photo), "--prompt", "a cat",
                       "--reconstruction", out, "-o", str(tmp_path / "x.inv")]}[command]
    assert p2p.cli.main(argv) == 2
    assert __import__("re").search(pattern, capsys.readouterr().err)


def test_an_unknown_text_activation_in_ldm_config_is_refused_at_once(tmp_path):
    path = with_ldm_config(tmp_path, lambda p: p["cond_stage_config"]["params"]["tiny_clip_text"].__setitem__(
        "hidden_act", "foo"))  # it ran as GELU
    refused_everywhere(path, r"ldm_config.*hidden_act 'foo' is not one this CLIP implements")
