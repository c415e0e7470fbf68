"""Images in: presets, box bounds, layouts (NCHW / NHWC), fixed batch sizes, input checks,
reading every image mode, corrupt files, folders."""
import re
import struct
import zlib
from pathlib import PurePosixPath

import numpy as np
import pytest
from PIL import Image, ImageFile

import tiny_graphs as tg
from onnxlrp import PREPROCESSING, Explainer, OnnxLrpError
from onnxlrp.io.preprocessing import check_images, get_preprocessing, image_files, image_sources, load_image

PIXELS = np.random.RandomState(0).randint(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_normalize_roundtrip(name):
    prep = get_preprocessing(name)
    for layout in ("NCHW", "NHWC"):
        x = prep.normalize(PIXELS, layout)
        assert x.shape == ((2, 3, 8, 8) if layout == "NCHW" else (2, 8, 8, 3)) and x.dtype == np.float32
        np.testing.assert_array_equal(prep.denormalize(x, layout), PIXELS)


def test_caffe_is_bgr_minus_mean():
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    x = get_preprocessing("caffe").normalize(red, "NHWC")[0, 0, 0]
    # float32 of a subtraction against the decimal constants: a few units of float32 rounding (1.2e-7)
    np.testing.assert_allclose(x, [-103.939, -116.779, 255 - 123.68], rtol=1e-6)


def test_bounds_are_the_pixel_range_after_preprocessing():
    low, high = get_preprocessing("imagenet").bounds(3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    # float32 results against float64 constants: a few units of float32 rounding (1.2e-7 each)
    np.testing.assert_allclose(low, -mean / std, rtol=1e-6)
    np.testing.assert_allclose(high, (1 - mean) / std, rtol=1e-6)
    extreme = np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), 255)]).astype(np.uint8)
    x = get_preprocessing("imagenet").normalize(extreme)
    np.testing.assert_allclose(x[0, :, 0, 0], low, rtol=1e-6)
    np.testing.assert_allclose(x[1, :, 0, 0], high, rtol=1e-6)


def test_load_image_scales_and_crops_the_centre(tmp_path):
    picture = np.zeros((50, 100, 3), np.uint8)
    picture[:, 25:75] = 255  # a white band in the middle half
    Image.fromarray(picture).save(tmp_path / "wide.png")
    loaded = load_image(tmp_path / "wide.png", 32, 32)
    assert loaded.shape == (32, 32, 3)
    assert loaded[:, 2:-2].min() > 200  # the centre crop sees only the band
    gray = load_image(tmp_path / "wide.png", 32, 32, channels=1)
    assert gray.shape == (32, 32, 1)


def _nets(tmp_path):
    """The same network with an NCHW input, and with an NHWC input followed by a Transpose."""
    paths = []
    for layout in ("NCHW", "NHWC"):
        tg.RNG.seed(7)
        b = tg.Builder()
        x = b.op("Transpose", ["x"], perm=[0, 3, 1, 2]) if layout == "NHWC" else "x"
        x = b.op("Relu", [b.conv(x, 3, 6, bias=True, name="stem")])
        x = b.op("Relu", [b.op("Add", [x, b.conv(b.op("Relu", [b.conv(x, 6, 6)]), 6, 6)], name="merge")])
        shape = ("N", 12, 12, 3) if layout == "NHWC" else ("N", 3, 12, 12)
        paths.append(tg.save(b.model(b.head(x, 6), input_shape=shape), tmp_path / f"{layout}.onnx"))
    return paths


@pytest.mark.parametrize("preset", ["epsilon-gamma-box", "epsilon-plus-flat", "paper"])
def test_nhwc_model_explains_like_its_nchw_twin(preset, tmp_path):
    nchw, nhwc = _nets(tmp_path)
    x = np.random.RandomState(1).randn(2, 3, 12, 12).astype(np.float32)
    a = Explainer(nchw, preset=preset).explain(x)
    explainer = Explainer(nhwc, preset=preset)
    assert explainer.analysis.image.layout == "NHWC"
    b = explainer.explain(x.transpose(0, 2, 3, 1))
    assert b.relevance.shape == (2, 12, 12, 3)
    # the same network in the other layout: onnxruntime may sum in another order (~100 units of rounding)
    np.testing.assert_allclose(b.relevance.transpose(0, 3, 1, 2), a.relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.heatmap(), a.heatmap(), rtol=1e-5, atol=1e-6)


def test_box_bounds_reach_the_first_conv(tmp_path):
    """Per-channel z^B bounds differ per channel: a wrong channel order would change the map."""
    nchw, _ = _nets(tmp_path)
    x = np.random.RandomState(1).randn(1, 3, 12, 12).astype(np.float32)
    default = Explainer(nchw, preset="epsilon-gamma-box").explain(x).relevance
    reordered = Explainer(nchw, preset="epsilon-gamma-box", low=[-2.1, -2.0, -1.8], high=[2.2, 2.4, 2.6]).explain(x).relevance
    explicit = Explainer(nchw, preset="epsilon-gamma-box", low=[-2.1179, -2.0357, -1.8044], high=[2.2489, 2.4286, 2.64]).explain(x).relevance
    np.testing.assert_allclose(default, explicit, rtol=1e-3, atol=1e-6)  # imagenet bounds, 4 digits
    # bounds that differ by 0.02-0.2 move the map far more than rounding could (~1e-7 of its scale)
    assert np.abs(default - reordered).max() > 1e-4
    with pytest.raises(OnnxLrpError, match="low bound has 2 values; the model has 3 channels"):
        Explainer(nchw, preset="epsilon-gamma-box", low=[0, 1])


def test_fixed_batch_model_runs_in_chunks(tmp_path):
    b = tg.Builder()
    x = b.op("Relu", [b.conv("x", 3, 4, name="stem")])
    path = tg.save(b.model(b.head(x, 4), input_shape=(1, 3, 8, 8)), tmp_path / "fixed.onnx")
    explainer = Explainer(path)
    x = np.random.RandomState(2).randn(3, 3, 8, 8).astype(np.float32)
    together = explainer.explain(x)
    alone = [explainer.explain(x[i:i + 1]).relevance for i in range(3)]
    # a fixed batch of 1 either way: the same computation per image (~10 units of rounding for scheduling)
    np.testing.assert_allclose(together.relevance, np.concatenate(alone), rtol=1e-6)


def test_explain_checks_the_input_shape(demo_model):
    explainer = Explainer(demo_model)
    with pytest.raises(OnnxLrpError, match=r"input batch has shape \[1, 3, 32, 32\]; the model expects \[N, 3, 64, 64\]"):
        explainer.explain(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(OnnxLrpError, match="2 targets for 1 images"):
        explainer.explain(np.zeros((1, 3, 64, 64), np.float32), target=[1, 2])


# --- reading images: every mode to 8 bits, corrupt files, folders ---------------------------------

GRADIENT16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
GRADIENT8 = np.rint(GRADIENT16 * (255 / 65535)).astype(np.uint8)  # rounded, not the high byte


def _read(path, channels=3):
    """The whole image, unscaled (load_image at the image's own size)."""
    with Image.open(path) as img:
        width, height = img.size
    return load_image(path, height, width, channels)


def _png(path, array, color_type):
    """A 16-bit PNG written by hand: Pillow has no 16-bit RGB(A) mode to write one with."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = array.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(GRADIENT16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode == "I;16"
    np.testing.assert_array_equal(_read(tmp_path / "g16.png", 1)[..., 0], GRADIENT8)
    np.testing.assert_array_equal(_read(tmp_path / "g16.png"), np.repeat(GRADIENT8[..., None], 3, -1))
    Image.fromarray(GRADIENT16.astype(">u2")).save(tmp_path / "g16b.tif")  # big-endian 16-bit TIFF
    with Image.open(tmp_path / "g16b.tif") as img:
        assert img.mode == "I;16B"
    np.testing.assert_array_equal(_read(tmp_path / "g16b.tif", 1)[..., 0], GRADIENT8)


def test_32bit_integer_images_are_read_by_their_range(tmp_path):
    Image.fromarray(GRADIENT16.astype(np.int32)).save(tmp_path / "i16.tif")  # 16-bit data in mode I
    Image.fromarray(GRADIENT8.astype(np.int32)).save(tmp_path / "i8.tif")  # 8-bit data in mode I
    with Image.open(tmp_path / "i16.tif") as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(_read(tmp_path / "i16.tif", 1)[..., 0], GRADIENT8)
    np.testing.assert_array_equal(_read(tmp_path / "i8.tif", 1)[..., 0], GRADIENT8)


def test_16bit_rgb_png(tmp_path):
    """Pillow reads 16-bit RGB as 8-bit RGB itself (the high byte): within 1 of 255/65535 rounded."""
    rgb16 = np.stack([GRADIENT16, GRADIENT16[::-1], np.full_like(GRADIENT16, 32768)], -1)
    with Image.open(_png(tmp_path / "rgb16.png", rgb16, color_type=2)) as img:
        assert img.mode == "RGB"
    pixels = _read(tmp_path / "rgb16.png").astype(int)
    assert np.abs(pixels - np.rint(rgb16 * (255 / 65535))).max() <= 1
    assert (pixels[..., 2] == 128).all()


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0])
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "p_t.png", transparency=1)  # blue is transparent
    img.save(tmp_path / "p_a.png", transparency=bytes([255, 128, 0]))  # per-entry alpha
    img.save(tmp_path / "p_t.gif", transparency=1)
    np.testing.assert_array_equal(_read(tmp_path / "p.png")[0], [[255, 0, 0], [0, 0, 255], [0, 128, 0]])
    for name in ("p_t.png", "p_t.gif"):
        np.testing.assert_array_equal(_read(tmp_path / name)[0], [[255, 0, 0], [255, 255, 255], [0, 128, 0]])
    blend = round(255 * (1 - 128 / 255))  # 127: half of blue's 0 over white
    np.testing.assert_array_equal(_read(tmp_path / "p_a.png")[0], [[255, 0, 0], [blend, blend, 255], [255, 255, 255]])


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.array([[[200, 40, 0, 255], [200, 40, 0, 128], [200, 40, 0, 0], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = 128 / 255
    half = [round(200 * alpha + 255 * (1 - alpha)), round(40 * alpha + 255 * (1 - alpha)), round(255 * (1 - alpha))]
    assert half == [227, 147, 127]
    np.testing.assert_array_equal(_read(tmp_path / "rgba.png")[0], [[200, 40, 0], half, [255] * 3, [255] * 3])

    la = np.array([[[60, 255], [60, 128], [60, 0]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    grey = round(60 * alpha + 255 * (1 - alpha))  # 158
    np.testing.assert_array_equal(_read(tmp_path / "la.png", 1)[0, :, 0], [60, grey, 255])
    np.testing.assert_array_equal(_read(tmp_path / "la.png")[0], [[60] * 3, [grey] * 3, [255] * 3])

    Image.fromarray(rgba, "RGBA").convert("PA").save(tmp_path / "pa.tif")
    with Image.open(tmp_path / "pa.tif") as img:
        assert img.mode == "PA"
    np.testing.assert_array_equal(_read(tmp_path / "pa.tif")[0], [[200, 40, 0], half, [255] * 3, [255] * 3])


def test_cmyk_ycbcr_lab_and_1bit(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    np.testing.assert_array_equal(_read(tmp_path / "cmyk.tif")[0], [[255] * 3, [255, 0, 0], [0] * 3, [127] * 3])
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
    assert np.abs(_read(tmp_path / "cmyk.jpg")[0].astype(int) - [[255] * 3, [255, 0, 0], [0] * 3, [127] * 3]).max() < 25

    rgb = np.array([[[255, 255, 255], [255, 0, 0], [0, 128, 0], [30, 30, 30]]], np.uint8)
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycbcr.tif")
    with Image.open(tmp_path / "ycbcr.tif") as img:
        assert img.mode == "YCbCr"
    assert np.abs(_read(tmp_path / "ycbcr.tif").astype(int) - rgb).max() <= 2

    from PIL import ImageCms
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    ImageCms.applyTransform(Image.fromarray(rgb), to_lab).save(tmp_path / "lab.tif")
    with Image.open(tmp_path / "lab.tif") as img:
        assert img.mode == "LAB"
    assert np.abs(_read(tmp_path / "lab.tif").astype(int) - rgb).max() <= 6
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    assert np.abs(_read(tmp_path / "lab.tif", 1)[..., 0].astype(int) - grey).max() <= 6

    bits = np.array([[True, False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as img:
        assert img.mode == "1"
    np.testing.assert_array_equal(_read(tmp_path / "bits.png", 1)[0, :, 0], [255, 0, 255])
    np.testing.assert_array_equal(_read(tmp_path / "bits.png")[0], [[255] * 3, [0] * 3, [255] * 3])


def test_float_tiff_is_unit_range_or_0_to_255(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    with Image.open(tmp_path / "unit.tif") as img:
        assert img.mode == "F"
    np.testing.assert_array_equal(_read(tmp_path / "unit.tif", 1)[0, :, 0], [0, 64, 128, 255])
    wide = np.array([[-3.0, 2.0, 100.4, 300.0, np.nan]], np.float32)  # not all in [0, 1]: 0..255, clipped
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    np.testing.assert_array_equal(_read(tmp_path / "wide.tif", 1)[0, :, 0], [0, 2, 100, 255, 0])


def _corrupt_files(tmp_path):
    pixels = np.random.RandomState(3).randint(0, 256, size=(64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # the header is fine, the scan is cut
    Image.fromarray(pixels).save(tmp_path / "whole.png")
    data = bytearray((tmp_path / "whole.png").read_bytes())
    idat = data.index(b"IDAT") - 4
    crc = idat + 8 + int.from_bytes(data[idat:idat + 4], "big")
    data[crc] ^= 0xFF  # the IDAT checksum, not its data: the pixels still decompress
    (tmp_path / "bad_crc.png").write_bytes(bytes(data))
    return tmp_path / "truncated.jpg", tmp_path / "bad_crc.png"


@pytest.mark.parametrize("which", [0, 1], ids=["truncated-jpeg", "png-bad-crc"])
def test_corrupt_images_are_one_line_errors(which, tmp_path):
    bad = _corrupt_files(tmp_path)[which]
    good = [tmp_path / "whole.jpg", tmp_path / "whole.png"]
    check_images(good)
    pattern = rf"^{re.escape(str(bad))}: cannot read image \([^\n]+\)$"
    with pytest.raises(OnnxLrpError, match=pattern):
        check_images(good + [bad], threads=2)
    with pytest.raises(OnnxLrpError, match=pattern):
        load_image(bad, 32, 32)


def test_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > twice the limit: an error
    pattern = rf"^{re.escape(str(tmp_path / 'big.png'))}: cannot read image \([^\n]*decompression bomb[^\n]*\)$"
    with pytest.raises(OnnxLrpError, match=pattern):
        check_images([tmp_path / "big.png"])


def test_truncated_images_are_not_loaded_leniently():
    import onnxlrp.cli  # noqa: F401  everything that reads images is imported
    import onnxlrp.evaluation.evaluate  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_sources_walk_folders(tmp_path):
    photos = tmp_path / "photos"
    for rel in ("cats/a.png", "dogs/a.png", "b.jpg", "dogs/puppies/c.PNG", ".hidden.png", "cats/._a.png",
                ".thumbs/d.png", "cats/notes.txt"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("txt"):
            (photos / rel).write_text("not an image")
        else:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(photos / rel, format="PNG")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "single.png")
    sources = image_sources([photos, str(tmp_path / "single.png"), photos / "cats"])
    assert [(str(path), str(rel)) for path, rel in sources] == [
        (str(photos / "b.jpg"), "b.jpg"),
        (str(photos / "cats" / "a.png"), "cats/a.png"),
        (str(photos / "dogs" / "a.png"), "dogs/a.png"),
        (str(photos / "dogs" / "puppies" / "c.PNG"), "dogs/puppies/c.PNG"),
        (str(tmp_path / "single.png"), "single.png"),
        (str(photos / "cats" / "a.png"), "a.png"),
    ]
    assert all(isinstance(rel, PurePosixPath) for _, rel in sources)
    assert len({rel for _, rel in sources[:4]}) == 4  # same-named files in subfolders stay apart
    assert image_files([photos]) == [path for path, _ in sources[:4]]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden.png").write_bytes((photos / "b.jpg").read_bytes())
    with pytest.raises(OnnxLrpError, match=r"empty: folder holds no image files \("):
        image_files([tmp_path / "empty"])
    with pytest.raises(OnnxLrpError, match="nothing.png: no such file or folder"):
        image_sources([tmp_path / "nothing.png"])
