import io

import numpy as np
import pytest
from helpers import write_image
from PIL import Image

from wingspan.data.images import open_rgb
from wingspan.errors import WingspanError


def test_open_rgb_applies_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write_image(tmp_path / "r.jpg", size=(60, 40), exif=exif)
    image = open_rgb(path)
    assert image.size == (40, 60) and image.mode == "RGB"


def test_open_rgb_composites_alpha_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    # A colour key (PNG's tRNS on an RGB or grey image, no alpha channel): the same.
    for mode, key in (("RGB", (0, 0, 0)), ("L", 0)):
        keyed = Image.new(mode, (10, 10), key)
        keyed.putpixel((5, 5), (200, 0, 0) if mode == "RGB" else 200)
        keyed.save(tmp_path / f"keyed-{mode}.png", transparency=key)
        opened = open_rgb(tmp_path / f"keyed-{mode}.png")
        assert opened.getpixel((0, 0)) == (255, 255, 255)
        assert opened.getpixel((5, 5)) == ((200, 0, 0) if mode == "RGB" else (200,) * 3)


def test_open_rgb_scales_16_bit(tmp_path):
    deep = (np.arange(100).reshape(10, 10) * 600).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pixels = np.asarray(open_rgb(tmp_path / "deep.png"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    # Stretched, not clipped: 100 values stay 100 grey levels, in the same order.
    assert len(np.unique(pixels)) == 100 and (np.diff(pixels.ravel().astype(int)) > 0).all()


def test_a_float_image_with_nan_or_inf_is_stretched_over_its_finite_values(tmp_path):
    """One NaN made the stretch's range NaN, and the whole image black (one inf, too)."""
    ramp = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    for bad, shade in ((np.nan, 0), (np.inf, 255), (-np.inf, 0)):
        values = ramp.copy()
        values[5, 5] = bad
        Image.fromarray(values).save(tmp_path / "f.tif")
        pixels = np.asarray(open_rgb(tmp_path / "f.tif"))[..., 0]
        assert pixels[5, 5] == shade
        assert pixels[0, 1] == 3 and pixels[-1, -1] == 255  # the rest as without it
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(tmp_path / "f.tif")
    assert (np.asarray(open_rgb(tmp_path / "f.tif")) == 0).all()
    flat = np.full((4, 4), 0.5, dtype=np.float32)  # one value, and an inf: all one grey
    flat[0, 0] = np.inf
    Image.fromarray(flat).save(tmp_path / "f.tif")
    assert (np.asarray(open_rgb(tmp_path / "f.tif")) == 0).all()


def test_open_rgb_draft_decodes_large_jpeg_smaller(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(1600, 1200), seed=0)
    assert open_rgb(path, draft=300).size == (400, 300)
    assert open_rgb(path).size == (1600, 1200)


def test_open_rgb_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(WingspanError, match="bad.jpg"):
        open_rgb(tmp_path / "bad.jpg")
    with pytest.raises(WingspanError, match="not found"):
        open_rgb(tmp_path / "missing.jpg")


def test_the_pixel_budget_reduces_a_big_jpeg_and_refuses_a_big_png(tmp_path, monkeypatch):
    from PIL import Image

    from wingspan.data.images import open_rgb
    from wingspan.errors import WingspanError

    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(tmp_path / "big.jpg")
    Image.new("RGBA", (1600, 1200), (0, 0, 0, 0)).save(tmp_path / "big.png")
    assert open_rgb(tmp_path / "big.jpg").size == (1600, 1200)  # under the default budget
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "500000")
    assert open_rgb(tmp_path / "big.jpg").size == (800, 600)  # decoded at 1/2 scale
    assert open_rgb(tmp_path / "big.jpg", draft=100).size == (200, 150)  # and the draft
    with pytest.raises(WingspanError, match=r"(?s)1600 x 1200 pixels \(1.92 MP\) is over "
                       r"the budget of 0.5 MP.*--max-pixels"):
        open_rgb(tmp_path / "big.png")
    Image.new("RGB", (1601, 1201), (200, 30, 30)).save(tmp_path / "odd.jpg")
    assert open_rgb(tmp_path / "odd.jpg").size == (801, 601)  # odd sides: still 1/2 scale
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", str(800 * 600))
    # libjpeg's half of 1601 x 1201 is 801 x 601, just over: a quarter, not a refusal
    assert open_rgb(tmp_path / "odd.jpg").size == (401, 301)
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "20000")
    with pytest.raises(WingspanError, match="even decoded at 1/8 scale") as e:
        open_rgb(tmp_path / "big.jpg")
    assert "(--max-pixels, max_pixels= in Python, or $WINGSPAN_MAX_PIXELS)" in e.value.hint


def test_a_calls_budget_goes_along_with_what_reads_images_elsewhere(tmp_path, monkeypatch):
    """A call's budget (the library's max_pixels=) holds in its own thread only; the
    datasets that data-loader workers read images in take it along when they are made:
    a spawned or forkserver worker gets them pickled, without the call's context."""
    import pickle

    from torchvision.transforms import v2

    from wingspan.data.images import call_budget, max_pixels
    from wingspan.inference import _Images
    from wingspan.training.decode_cache import DecodeCache

    monkeypatch.delenv("WINGSPAN_MAX_PIXELS", raising=False)
    path = str(tmp_path / "a.png")
    Image.new("RGB", (100, 100), (200, 30, 30)).save(path)
    with call_budget(5000):  # under 100 x 100
        assert max_pixels() == 5000
        made = (_Images([path], [v2.PILToTensor()], 100, 100), DecodeCache(None, 100))
    assert max_pixels() == 50_000_000
    images, cache = pickle.loads(pickle.dumps(made))  # as a worker process receives them
    assert "over the budget of 0.005 MP" in images[0][1] and "--max-pixels" in images[0][1]
    with pytest.raises(WingspanError, match="over the budget of 0.005 MP"):
        cache.decode(path)
    assert not _Images([path], [v2.PILToTensor()], 100, 100)[0][1]  # made outside: read
    assert DecodeCache(None, 100).decode(path).size == (100, 100)


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its frame header (SOF0) claiming another size; the data stays small."""
    import struct

    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def test_a_long_thin_image_is_refused_before_its_resize_outgrows_the_budget(tmp_path):
    """A 1 x 40000 PNG is a few hundred bytes, and 10 GB once its shorter side is 512 px:
    every path that opens images (predict, explain, evaluate, training) refuses it."""
    from wingspan.data.images import ImageTooLarge

    Image.new("RGB", (40000, 1), (200, 100, 50)).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000
    for draft in (None, 224):
        with pytest.raises(ImageTooLarge, match="40000 x 1 pixels is too long and thin"):
            open_rgb(tmp_path / "strip.png", draft=draft)
    Image.new("RGB", (4000, 400)).save(tmp_path / "panorama.png")  # 10:1 is fine
    assert open_rgb(tmp_path / "panorama.png", draft=224).size == (4000, 400)


def test_a_budget_below_a_models_view_says_so_not_long_and_thin(tmp_path, monkeypatch):
    """--max-pixels under the view's 512 x 512: a square image is not "too long and thin",
    the budget is too small, and the message says how far to raise it."""
    from wingspan.data.images import ImageTooLarge

    Image.new("RGB", (300, 300), (200, 100, 50)).save(tmp_path / "square.png")
    Image.new("RGB", (40000, 1), (200, 100, 50)).save(tmp_path / "strip.png")
    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "100000")
    with pytest.raises(ImageTooLarge, match=r"(?s)300 x 300 pixels for a model \(shorter side "
                       r"512 px\) makes 0.262 MP, over the pixel budget of 0.1 MP") as e:
        open_rgb(tmp_path / "square.png")
    assert "long and thin" not in e.value.message
    assert e.value.hint == ("Raise the budget to at least 262144 (the default is 50000000) "
                            "with --max-pixels, max_pixels= in Python, or $WINGSPAN_MAX_PIXELS.")
    assert open_rgb(tmp_path / "square.png", draft=256).size == (300, 300)  # 256 x 256 fits
    with pytest.raises(ImageTooLarge, match="40000 x 1 pixels is too long and thin"):
        open_rgb(tmp_path / "strip.png")  # too long and thin for any budget left as it is


def test_a_drawer_scan_over_pillows_own_limit_is_read_reduced_not_called_a_bomb(tmp_path):
    """Pillow refuses any image over 500 MP as a bomb from its header; wingspan's budget
    decides instead, and a JPEG that 1/8 scale brings under it is decoded reduced."""
    from PIL import Image

    from wingspan.data.images import image_facts, open_rgb

    # Pillow's own limit stays as it was for the user's code: wingspan lifts it only while
    # it reads a header.
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and 24000 * 24000 > 2 * limit
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    (tmp_path / "scan.jpg").write_bytes(_claiming(buffer.getvalue(), 24000, 24000))  # 576 MP
    assert open_rgb(tmp_path / "scan.jpg").size == (6000, 6000)  # at 1/4: 36 MP
    (tmp_path / "scan40k.jpg").write_bytes(_claiming(buffer.getvalue(), 40000, 40000))
    assert open_rgb(tmp_path / "scan40k.jpg").size == (5000, 5000)  # 1/8: 25 MP
    assert image_facts(str(tmp_path / "scan40k.jpg")).error is None  # inspect reads it too
    assert Image.MAX_IMAGE_PIXELS == limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "scan.jpg")
    # A PNG cannot be reduced: refused from its header, by the budget, never decoded.
    from test_bad_input import _bomb

    _bomb(tmp_path / "bomb.png")
    # Its size in plain figures, not "(1.6e+03 MP)"
    from wingspan.data.images import megapixels

    assert [megapixels(n) for n in (640_000, 49e6, 999.7e6, 1.6e9, 50)] == [
        "0.64", "49", "1,000", "1,600", "0.00005"]
    with pytest.raises(WingspanError, match=r"40000 x 40000 pixels \(1,600 MP\) is over"):
        open_rgb(tmp_path / "bomb.png")
    # `data inspect`'s reason names every way to raise the budget, as the loaders' hints do.
    assert image_facts(str(tmp_path / "bomb.png")).error.endswith(
        "over the pixel budget of 50 MP (raise it with --max-pixels, max_pixels= in Python, "
        "or $WINGSPAN_MAX_PIXELS)")


def test_formats_that_decode_more_than_their_header_says_are_not_opened(tmp_path, monkeypatch):
    """An ICO's directory says 16 x 16 and Pillow decodes the PNG inside, of any size: a
    bomb the header check cannot see, so only formats whose header states the decoded
    size are opened."""
    import struct

    from wingspan.data.images import image_facts

    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "1000000")
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, "PNG")  # 4 MP, over the 1 MP budget
    png = buffer.getvalue()
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32,
                                                     len(png), 22) + png
    (tmp_path / "icon.ico").write_bytes(ico)
    with pytest.raises(WingspanError, match="Cannot read image"):
        open_rgb(tmp_path / "icon.ico")
    assert image_facts(str(tmp_path / "icon.ico")).error
    # A camera's multi-picture JPEG (MPO) is a JPEG: decoded reduced to fit the budget.
    photo = Image.new("RGB", (1600, 1200), (200, 30, 30))
    photo.save(tmp_path / "camera.mpo", "MPO", save_all=True, append_images=[photo])
    assert open_rgb(tmp_path / "camera.mpo").size == (800, 600)


def test_resize_filters_are_named_as_timm_names_them():
    from wingspan.data.images import pil_filter

    assert pil_filter("bilinear") == Image.Resampling.BILINEAR
    assert pil_filter("bicubic") == Image.Resampling.BICUBIC
    with pytest.raises(WingspanError, match=r"(?s)Unknown resize filter 'nearest-exact'.*bicubic"):
        pil_filter("nearest-exact")


def test_a_damaged_exif_block_reads_upright_without_pillows_console_warning(tmp_path):
    """Pillow warns of it with its own source line and no file name; the picture reads."""
    import subprocess
    import sys

    good = write_image(tmp_path / "good.jpg", size=(30, 20), seed=1, fmt="JPEG").read_bytes()
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 20
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(good[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
                        + good[2:])
    script = ("from wingspan.data.images import open_rgb, image_facts; import sys; "
              "print(open_rgb(sys.argv[1]).size, image_facts(sys.argv[1]).error)")
    done = subprocess.run([sys.executable, "-W", "default", "-c", script, str(damaged)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["(30,", "20)", "None"]
    assert "EXIF" not in done.stderr, done.stderr


def _tiff(path, pixels: np.ndarray, planar: bool, sample_format: int = 1):
    """A baseline little-endian RGB TIFF of `pixels` (h, w, 3), in separate colour planes
    or interleaved: as scanners write them, which Pillow cannot save."""
    import struct

    h, w, _ = pixels.shape
    bits = pixels.dtype.itemsize * 8
    strips = ([np.ascontiguousarray(pixels[..., c]).tobytes() for c in range(3)] if planar
              else [pixels.tobytes()])
    data_at = 8
    offsets, at = [], data_at
    for s in strips:
        offsets.append(at)
        at += len(s)
    extra = at  # BitsPerSample, SampleFormat and the strips' offsets and sizes follow
    tags, blobs = [], b""

    def values(kind: str, items: list[int]) -> tuple[int, int, int]:
        nonlocal blobs
        code, size = {"H": (3, 2), "I": (4, 4)}[kind]
        if len(items) * size <= 4:
            return code, len(items), int.from_bytes(
                struct.pack(f"<{len(items)}{kind}", *items).ljust(4, b"\0"), "little")
        offset = extra + len(blobs)
        blobs += struct.pack(f"<{len(items)}{kind}", *items)
        return code, len(items), offset

    for tag, kind, items in ((256, "I", [w]), (257, "I", [h]), (258, "H", [bits] * 3),
                             (259, "H", [1]), (262, "H", [2]), (273, "I", offsets),
                             (277, "H", [3]), (278, "I", [h]),
                             (279, "I", [len(s) for s in strips]),
                             (284, "H", [2 if planar else 1]),
                             (339, "H", [sample_format] * 3)):
        tags.append((tag, *values(kind, items)))
    ifd_at = extra + len(blobs)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + b"".join(strips) + blobs + ifd
                     + b"\0\0\0\0")
    return path


# (Pillow's words on the TIFF cut short, which wingspan's import filters out; pytest
# resets the filters for each test)
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_tiffs_pillow_cannot_read_right_are_refused_as_what_they_are(tmp_path):
    """A 16-bit TIFF in separate colour planes decodes striped and shifted (Pillow 13), and
    a floating-point one not at all: each refused, and named a TIFF (not 'no image')."""
    pixels = np.random.default_rng(0).integers(0, 65535, (6, 8, 3)).astype("<u2")
    interleaved = open_rgb(_tiff(tmp_path / "contiguous.tif", pixels, planar=False))
    assert interleaved.size == (8, 6)  # the same pixels interleaved read as ever
    with pytest.raises(WingspanError, match="separate colour planes, which is decoded wrongly"):
        open_rgb(_tiff(tmp_path / "planar.tif", pixels, planar=True))
    with pytest.raises(WingspanError, match="a TIFF of a kind that cannot be read here") as e:
        open_rgb(_tiff(tmp_path / "float.tif", pixels.astype("<f4") / 65535, planar=False,
                       sample_format=3))
    assert "Convert it to JPEG or PNG" in e.value.hint
    heic = tmp_path / "IMG_0001.jpg"  # an iPhone photo renamed
    heic.write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))
    with pytest.raises(WingspanError, match="a HEIC photo, which cannot be read here"):
        open_rgb(heic)
    with pytest.raises(WingspanError, match="not a JPEG, PNG, TIFF"):
        open_rgb(io.BytesIO(b"just text, no picture"), name="notes.jpg")
    # A TIFF whose download stopped within its header is a damaged file, not one to
    # convert: its first directory lies past the end.
    whole = _tiff(tmp_path / "whole.tif", pixels, planar=False).read_bytes()
    for cut in (tmp_path / "cut.tif", io.BytesIO(whole[:40])):
        if not isinstance(cut, io.BytesIO):
            cut.write_bytes(whole[:40])
        with pytest.raises(WingspanError, match="a TIFF cut short or damaged within its "
                                                "header") as e:
            open_rgb(cut, name="cut.tif")
        assert "Replace or delete the file" in e.value.hint
    # A WebP cut short: said damaged, not in Pillow's words alone.
    webp = io.BytesIO()
    Image.fromarray((pixels // 256).astype(np.uint8)).save(webp, "WEBP")
    with pytest.raises(WingspanError, match="the file is cut short or damaged"):
        open_rgb(io.BytesIO(webp.getvalue()[:len(webp.getvalue()) // 2]), name="half.webp")


def test_a_budget_in_the_environment_that_is_no_number_is_said_in_the_library(monkeypatch):
    """The CLI refuses $WINGSPAN_MAX_PIXELS=200M; the library took the default without a
    word, so a notebook trained at 50 MP where it meant 200."""
    import warnings

    from wingspan.config import MAX_PIXELS
    from wingspan.data.images import max_pixels

    monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "200M")
    with pytest.warns(UserWarning, match=r"\$WINGSPAN_MAX_PIXELS is '200M', not a number"):
        assert max_pixels() == MAX_PIXELS
    with warnings.catch_warnings():  # once, not at every image
        warnings.simplefilter("error")
        assert max_pixels() == MAX_PIXELS
        monkeypatch.setenv("WINGSPAN_MAX_PIXELS", "  ")  # blank: unset, as before
        assert max_pixels() == MAX_PIXELS
