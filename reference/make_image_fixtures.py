#!/usr/bin/env python3
"""Writes tests/fixtures/images/: image files and what Pillow makes of them.

The reference pipeline opens an image with Pillow, converts it to RGB, resizes it with
PIL.Image.resize((224, 224), Image.BICUBIC) and normalises it with torchvision. This script
produces, for every fixture image, Pillow's decoded RGB (as uint8 .npy), Pillow's bicubic
resizes for several target sizes, and torchvision's ToTensor + Normalize outputs, so that
tests/unit/test_image.cpp can compare our decoder, resize and normalisation to them.

Sources are the real photographs that ship inside the scikit-image package (no download):
rocket.jpg and retina.jpg are genuine camera JPEGs (4:4:4 and 4:2:0), astronaut/coffee/
chelsea/camera are PNGs that we re-encode into the other formats and modes. The YCCK JPEG is
written through libjpeg by a tiny C helper compiled here (needs cc and libjpeg-dev), because
neither Pillow nor any Python package writes YCCK.

Large decoded references (> REF_FULL_LIMIT pixels) are stored as one 64-bit hash per row
(bit-exactness over the whole image) plus a full-resolution crop (for a max-diff figure), to
keep the committed fixtures small.

Usage: python3 reference/make_image_fixtures.py  [--out tests/fixtures/images]
Requirements: Pillow (13), scikit-image, numpy, torch + torchvision, a C compiler and libjpeg.
"""

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import PIL
import skimage
import skimage.data
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)

# Whole-image references above this many pixels are stored as row hashes plus a crop.
REF_FULL_LIMIT = 300_000

manifest = {"decode": [], "resize": [], "resize_formula": [], "normalize": [],
            "preprocess": [], "bad": []}
OUT = None


def out_path(name):
    return os.path.join(OUT, name)


def save_npy(name, array):
    np.save(out_path(name), np.ascontiguousarray(array), allow_pickle=False)
    return name


def write_bytes(name, data):
    with open(out_path(name), "wb") as f:
        f.write(data)
    return name


def pil_rgb(name):
    with Image.open(out_path(name)) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Row hashes: h[y] = sum_i row_bytes[i] * splitmix64(i) (mod 2^64). test_image.cpp computes the
# same on our decode; a single differing byte changes the row's hash.

def splitmix64(count):
    with np.errstate(over="ignore"):
        z = (np.arange(count, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_hashes(rgb):
    h, w, _ = rgb.shape
    weights = splitmix64(w * 3)
    with np.errstate(over="ignore"):
        return (rgb.reshape(h, w * 3).astype(np.uint64) * weights[None, :]).sum(
            axis=1, dtype=np.uint64)


def add_decode_case(name, note, full=None):
    """Records Pillow's RGB decode of fixture `name`."""
    rgb = pil_rgb(name)
    h, w, _ = rgb.shape
    entry = {"file": name, "note": note, "width": w, "height": h}
    if full is None:
        full = w * h <= REF_FULL_LIMIT
    if full:
        entry["rgb"] = save_npy(name + ".rgb.npy", rgb)
    else:
        entry["row_hash"] = save_npy(name + ".rowhash.npy", row_hashes(rgb))
        cw, ch = min(w, 256), min(h, 256)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        entry["crop"] = save_npy(name + ".crop.npy", rgb[y0:y0 + ch, x0:x0 + cw])
        entry["crop_box"] = [x0, y0, cw, ch]
    manifest["decode"].append(entry)
    return rgb


def add_resize_case(name, rgb, width, height):
    """Pillow's bicubic resize of the RGB decode of fixture `name`."""
    resized = np.asarray(Image.fromarray(rgb, "RGB").resize((width, height), Image.BICUBIC))
    ref = save_npy(f"{name}.resize_{width}x{height}.npy", resized)
    manifest["resize"].append({"input": name, "width": width, "height": height, "expected": ref})


# ---------------------------------------------------------------------------------------------
# A minimal PNG writer: Pillow cannot write 16-bit RGB(A), 2/4-bit grey, gray+alpha 16,
# Adam7-interlaced or short-palette PNGs, which real files do contain.

def png_chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def pack_png_rows(samples, bit_depth):
    rows = []
    for row in samples:
        flat = row.reshape(-1)
        if bit_depth == 16:
            rows.append(flat.astype(">u2").tobytes())
        elif bit_depth == 8:
            rows.append(flat.astype(np.uint8).tobytes())
        else:
            per_byte = 8 // bit_depth
            padded = np.concatenate([flat, np.zeros((-len(flat)) % per_byte, flat.dtype)])
            packed = np.zeros(len(padded) // per_byte, np.int64)
            for j in range(per_byte):
                packed = (packed << bit_depth) | padded[j::per_byte].astype(np.int64)
            rows.append(packed.astype(np.uint8).tobytes())
    return rows


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]


def png_bytes(samples, color_type, bit_depth, palette=None, trns=None, interlace=False,
              ihdr_size=None, idat=None):
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples[:, :, None]
    h, w = samples.shape[:2]
    raw = bytearray()
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    for x0, y0, dx, dy in passes:
        sub = samples[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        for row in pack_png_rows(sub, bit_depth):
            raw += b"\x00" + row
    if ihdr_size is not None:
        w, h = ihdr_size
    data = b"\x89PNG\r\n\x1a\n"
    data += png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0,
                                           1 if interlace else 0))
    if palette is not None:
        data += png_chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    if trns is not None:
        data += png_chunk(b"tRNS", trns)
    data += png_chunk(b"IDAT", zlib.compress(bytes(raw), 9) if idat is None else idat)
    data += png_chunk(b"IEND", b"")
    return data


# ---------------------------------------------------------------------------------------------

YCCK_WRITER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>
/* usage: ycck_writer in.cmyk out.jpg width height quality */
int main(int argc, char** argv) {
  if (argc != 6) return 2;
  int w = atoi(argv[3]), h = atoi(argv[4]);
  unsigned char* pixels = malloc((size_t)w * h * 4);
  FILE* in = fopen(argv[1], "rb");
  if (!in || fread(pixels, 1, (size_t)w * h * 4, in) != (size_t)w * h * 4) return 1;
  fclose(in);
  struct jpeg_compress_struct c;
  struct jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  FILE* out = fopen(argv[2], "wb");
  jpeg_stdio_dest(&c, out);
  c.image_width = w;
  c.image_height = h;
  c.input_components = 4;
  c.in_color_space = JCS_CMYK;
  jpeg_set_defaults(&c);
  jpeg_set_colorspace(&c, JCS_YCCK); /* writes an Adobe marker with transform 2 */
  jpeg_set_quality(&c, atoi(argv[5]), TRUE);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = pixels + (size_t)c.next_scanline * w * 4;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  fclose(out);
  jpeg_destroy_compress(&c);
  return 0;
}
"""


def write_ycck_jpeg(name, cmyk, quality=90):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "ycck_writer.c")
        exe = os.path.join(tmp, "ycck_writer")
        raw = os.path.join(tmp, "in.cmyk")
        with open(src, "w") as f:
            f.write(YCCK_WRITER_C)
        subprocess.run(["cc", "-O2", "-o", exe, src, "-ljpeg"], check=True)
        cmyk = np.ascontiguousarray(cmyk, np.uint8)
        with open(raw, "wb") as f:
            f.write(cmyk.tobytes())
        h, w = cmyk.shape[:2]
        subprocess.run([exe, raw, out_path(name), str(w), str(h), str(quality)], check=True)


def strip_jpeg_marker(data, marker):
    """Removes every segment with this marker byte (before the scan data)."""
    out = bytearray(data[:2])
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        m = data[i + 1]
        if m == 0xDA:  # start of scan: copy the rest unchanged
            out += data[i:]
            break
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if m != marker:
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out)


def jpeg_bytes(image, **options):
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


def webp_bytes(image, **options):
    buf = io.BytesIO()
    image.save(buf, "WEBP", **options)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The big synthetic input used for the resize timing test: test_image.cpp computes the same
# pixels from the same formula, so the 36 MB input never has to be committed.

def formula_image(width, height):
    y, x = np.meshgrid(np.arange(height, dtype=np.uint32), np.arange(width, dtype=np.uint32),
                       indexing="ij")
    channels = []
    for c in range(3):
        v = ((x * x + 3 * y * y) >> 9) + (x ^ (y * 3)) + ((x * y) >> 11) + np.uint32(85 * c)
        channels.append((v & 255).astype(np.uint8))
    return np.stack(channels, axis=-1)


# ---------------------------------------------------------------------------------------------

def make_photos():
    # Genuine camera JPEGs, copied byte for byte.
    shutil.copyfile(os.path.join(SKIMAGE_DATA, "rocket.jpg"), out_path("photo_rocket.jpg"))
    rocket = add_decode_case("photo_rocket.jpg", "genuine baseline JPEG 4:4:4, 640x427")
    shutil.copyfile(os.path.join(SKIMAGE_DATA, "retina.jpg"), out_path("photo_retina.jpg"))
    retina = add_decode_case("photo_retina.jpg", "genuine baseline JPEG 4:2:0, 1411x1411")
    shutil.copyfile(os.path.join(SKIMAGE_DATA, "coffee.png"), out_path("photo_coffee.png"))
    coffee = add_decode_case("photo_coffee.png", "genuine PNG photo, 600x400", full=False)

    for w, h in [(224, 224), (100, 67), (150, 100)]:
        add_resize_case("photo_rocket.jpg", rocket, w, h)
    for w, h in [(224, 224), (160, 97)]:
        add_resize_case("photo_retina.jpg", retina, w, h)
    for w, h in [(224, 224), (150, 100), (97, 211)]:
        add_resize_case("photo_coffee.png", coffee, w, h)


def make_jpeg_variants():
    astronaut = Image.open(os.path.join(SKIMAGE_DATA, "astronaut.png")).convert("RGB")
    # 190x157: not a multiple of the 16x16 MCU, so the partial edge blocks are exercised.
    crop = astronaut.crop((150, 40, 340, 197))
    variants = {
        "jpeg_baseline_420.jpg": dict(quality=90, subsampling=2),
        "jpeg_baseline_422.jpg": dict(quality=85, subsampling=1),
        "jpeg_baseline_444.jpg": dict(quality=95, subsampling=0),
        "jpeg_progressive_420.jpg": dict(quality=90, subsampling=2, progressive=True),
        "jpeg_progressive_444.jpg": dict(quality=75, subsampling=0, progressive=True),
        "jpeg_optimized_q40.jpg": dict(quality=40, subsampling=2, optimize=True),
    }
    for name, options in variants.items():
        write_bytes(name, jpeg_bytes(crop, **options))
        add_decode_case(name, "Pillow-written JPEG " + json.dumps(options))
    rgb = pil_rgb("jpeg_baseline_420.jpg")
    add_resize_case("jpeg_baseline_420.jpg", rgb, 224, 224)  # upscale in both directions
    # No DHT segment: libjpeg-turbo falls back to the standard tables (Motion-JPEG style), and
    # Pillow decodes it, so it is a decode case, not a bad input.
    write_bytes("jpeg_no_dht.jpg", strip_jpeg_marker(open(out_path("jpeg_baseline_420.jpg"),
                                                          "rb").read(), 0xC4))
    add_decode_case("jpeg_no_dht.jpg", "JPEG without Huffman tables")

    camera = Image.open(os.path.join(SKIMAGE_DATA, "camera.png")).convert("L")
    write_bytes("jpeg_gray.jpg", jpeg_bytes(camera.crop((200, 60, 390, 217)), quality=90))
    add_decode_case("jpeg_gray.jpg", "greyscale JPEG")

    # Tiny and one-pixel-thin 4:2:0 images: edge cases of the fancy upsampler.
    chelsea = Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB")
    for name, box in [("jpeg_1x1_420.jpg", (200, 100, 201, 101)),
                      ("jpeg_1x37_420.jpg", (200, 100, 201, 137)),
                      ("jpeg_37x1_420.jpg", (200, 100, 237, 101)),
                      ("jpeg_17x9_420.jpg", (200, 100, 217, 109))]:
        write_bytes(name, jpeg_bytes(chelsea.crop(box), quality=90, subsampling=2))
        add_decode_case(name, "tiny 4:2:0 JPEG")

    # CMYK: Pillow reads every 4-channel JPEG as Adobe-inverted CMYK ("CMYK;I"), Adobe marker
    # or not, then converts to RGB. Pillow writes CMYK with an Adobe marker (transform 0).
    cmyk_crop = astronaut.crop((200, 200, 328, 296))
    cmyk = np.asarray(cmyk_crop.convert("CMYK")).copy()
    cmyk[..., 3] = np.asarray(cmyk_crop.convert("L")) // 3  # a non-trivial black channel
    cmyk_image = Image.fromarray(cmyk, "CMYK")
    data = jpeg_bytes(cmyk_image, quality=90)
    write_bytes("jpeg_cmyk_adobe.jpg", data)
    add_decode_case("jpeg_cmyk_adobe.jpg", "CMYK JPEG with Adobe marker")
    write_bytes("jpeg_cmyk_no_adobe.jpg", strip_jpeg_marker(data, 0xEE))
    add_decode_case("jpeg_cmyk_no_adobe.jpg", "CMYK JPEG without Adobe marker")
    write_ycck_jpeg("jpeg_ycck.jpg", cmyk)
    with Image.open(out_path("jpeg_ycck.jpg")) as im:
        assert im.mode == "CMYK", im.mode
    add_decode_case("jpeg_ycck.jpg", "YCCK JPEG (Adobe transform 2) written by libjpeg")


def make_png_modes():
    chelsea = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB"))
    camera = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "camera.png")).convert("L"))
    rng = np.random.default_rng(1234)
    rgb = chelsea[120:167, 190:251]  # 61x47
    gray = camera[100:147, 200:261]
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[:10, :10] = 0

    def add(name, data, note):
        write_bytes(name, data)
        add_decode_case(name, note)

    add("png_rgb8.png", png_bytes(rgb, 2, 8), "RGB 8-bit")
    add("png_rgba8.png", png_bytes(np.dstack([rgb, alpha]), 6, 8), "RGBA 8-bit (alpha dropped)")
    add("png_rgb8_trns.png", png_bytes(rgb, 2, 8, trns=struct.pack(">HHH", 10, 20, 30)),
        "RGB with tRNS")
    add("png_gray8.png", png_bytes(gray, 0, 8), "grey 8-bit")
    add("png_gray8_trns.png", png_bytes(gray, 0, 8, trns=struct.pack(">H", 50)), "grey + tRNS")
    add("png_graya8.png", png_bytes(np.dstack([gray, alpha]), 4, 8), "grey+alpha 8-bit")
    for bd in (1, 2, 4):
        add(f"png_gray{bd}.png", png_bytes(gray >> (8 - bd), 0, bd), f"grey {bd}-bit")
    # 16-bit: Pillow opens grey as I;16 and converts to RGB by clipping at 255 (not >> 8);
    # all other 16-bit modes keep the high byte. Values on both sides of 255 are covered.
    gray16 = gray.astype(np.uint16) * rng.integers(1, 258, gray.shape).astype(np.uint16)
    gray16[:, :20] = gray[:, :20]  # values below 256 as well
    add("png_gray16.png", png_bytes(gray16, 0, 16), "grey 16-bit (I;16, clipped)")
    add("png_gray16_trns.png", png_bytes(gray16, 0, 16, trns=struct.pack(">H", 300)),
        "grey 16-bit + tRNS")
    wide = lambda a: (a.astype(np.uint16) << 8) | rng.integers(0, 256, a.shape).astype(np.uint16)
    add("png_graya16.png", png_bytes(np.dstack([wide(gray), wide(alpha)]), 4, 16),
        "grey+alpha 16-bit")
    add("png_rgb16.png", png_bytes(wide(rgb), 2, 16), "RGB 16-bit")
    add("png_rgba16.png", png_bytes(wide(np.dstack([rgb, alpha])), 6, 16), "RGBA 16-bit")
    # Palettes from Pillow's quantiser, at each bit depth.
    for bd in (1, 2, 4, 8):
        q = Image.fromarray(rgb).quantize(colors=1 << bd)
        index = np.asarray(q)
        palette = np.asarray(q.getpalette()[:3 * (1 << bd)], np.uint8)
        add(f"png_palette{bd}.png", png_bytes(index, 3, bd, palette=palette), f"palette {bd}-bit")
        if bd == 8:
            add("png_palette8_trns.png",
                png_bytes(index, 3, 8, palette=palette, trns=bytes(range(0, 256, 7))),
                "palette + tRNS")
            # Indices past the end of a short palette: Pillow (and libpng) give black.
            add("png_palette_short.png", png_bytes(index, 3, 8, palette=palette[:3 * 100]),
                "palette with out-of-range indices")
        if bd == 4:
            add("png_palette4_interlaced.png",
                png_bytes(index, 3, 4, palette=palette, interlace=True), "palette, Adam7")
    add("png_rgb8_interlaced.png", png_bytes(rgb, 2, 8, interlace=True), "RGB, Adam7")
    add("png_gray2_interlaced.png", png_bytes(gray >> 6, 0, 2, interlace=True), "grey 2-bit, Adam7")
    add("png_rgba16_interlaced.png", png_bytes(wide(np.dstack([rgb, alpha])), 6, 16,
                                               interlace=True), "RGBA 16-bit, Adam7")
    # Pillow-written files, with Pillow's own filters and zlib settings.
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", optimize=True)
    add("png_pillow_rgb.png", buf.getvalue(), "Pillow-written RGB PNG")
    # Missing IEND and final CRC: Pillow decodes it, so do we.
    full = png_bytes(rgb, 2, 8)
    add("png_no_iend.png", full[:-16], "IEND and the IDAT CRC cut off")

    # Resize edge cases, inputs committed as small PNGs.
    small = chelsea[100:130, 200:240]  # 40x30
    add("resize_src_40x30.png", png_bytes(small, 2, 8), "resize input")
    # (26, 1) and (25, 1) straddle Pillow 13's choice of pass order (vertical first when
    # H - h > 2 (W - w)); (41, 29) is vertical first too.
    for w, h in [(224, 224), (41, 29), (7, 1), (1, 7), (1, 1), (40, 30), (13, 90), (26, 1),
                 (25, 1)]:
        add_resize_case("resize_src_40x30.png", small, w, h)
    one = chelsea[150:151, 220:221]
    add("resize_src_1x1.png", png_bytes(one, 2, 8), "1x1 resize input")
    for w, h in [(5, 3), (1, 1), (50, 50)]:
        add_resize_case("resize_src_1x1.png", one, w, h)
    long_x = rng.integers(0, 256, (3, 2000, 3), dtype=np.uint8)
    long_x[:, 500:900] = 255  # a flat bright band: overshoot must clip
    add("resize_src_2000x3.png", png_bytes(long_x, 2, 8), "extreme aspect resize input")
    for w, h in [(224, 224), (17, 3), (2000, 1)]:
        add_resize_case("resize_src_2000x3.png", long_x, w, h)
    long_y = np.ascontiguousarray(long_x.transpose(1, 0, 2))
    add("resize_src_3x2000.png", png_bytes(long_y, 2, 8), "extreme aspect resize input")
    for w, h in [(31, 224), (3, 17)]:
        add_resize_case("resize_src_3x2000.png", long_y, w, h)


def make_webp():
    chelsea = Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB")
    rgb = chelsea.crop((150, 50, 310, 170))  # 160x120
    a = np.asarray(rgb.convert("L")).copy()
    a[:30, :40] = 0  # fully transparent corner: its RGB is whatever the codec keeps
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), a]), "RGBA")
    cases = {
        "webp_lossy.webp": (rgb, dict(quality=80)),
        "webp_lossless.webp": (rgb, dict(lossless=True)),
        "webp_lossy_alpha.webp": (rgba, dict(quality=70)),
        "webp_lossless_alpha.webp": (rgba, dict(lossless=True)),
        "webp_lossless_alpha_exact.webp": (rgba, dict(lossless=True, exact=True)),
    }
    for name, (image, options) in cases.items():
        write_bytes(name, webp_bytes(image, **options))
        add_decode_case(name, "WebP " + json.dumps(options))
    # Animated: the first frame is what Pillow shows after open().
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rgb.rotate(180)]
    write_bytes("webp_animated.webp",
                webp_bytes(frames[0], save_all=True, append_images=frames[1:], duration=100,
                           quality=80))
    add_decode_case("webp_animated.webp", "animated lossy WebP, first frame")
    frames_a = [rgba, rgba.rotate(90), rgba.rotate(180)]
    write_bytes("webp_animated_alpha.webp",
                webp_bytes(frames_a[0], save_all=True, append_images=frames_a[1:], duration=100,
                           lossless=True))
    add_decode_case("webp_animated_alpha.webp", "animated lossless WebP with alpha, first frame")
    with Image.open(out_path("webp_animated.webp")) as im:
        assert getattr(im, "n_frames", 1) == 3


def make_formula_resize():
    # 4000x3000 is the timing case; 900x2400 (a tall photo) is resized vertical pass first.
    for (iw, ih), (w, h) in [((4000, 3000), (224, 224)), ((1600, 1200), (211, 157)),
                             ((900, 2400), (224, 224))]:
        src = formula_image(iw, ih)
        resized = np.asarray(Image.fromarray(src, "RGB").resize((w, h), Image.BICUBIC))
        ref = save_npy(f"formula_{iw}x{ih}.resize_{w}x{h}.npy", resized)
        manifest["resize_formula"].append({"input_width": iw, "input_height": ih, "width": w,
                                           "height": h, "expected": ref,
                                           "input_row_hash": save_npy(
                                               f"formula_{iw}x{ih}.rowhash.npy",
                                               row_hashes(src))})


def torchvision_normalise(rgb):
    """The reference's ToTensor + Normalize, returned channels-last ([1, H, W, 3])."""
    import torch
    import torchvision.transforms as T
    tensor = T.ToTensor()(Image.fromarray(rgb, "RGB"))  # [3, H, W] float32
    dino = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(tensor.clone())
    siglip = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(tensor.clone())
    chw_to_bhwc = lambda t: t.permute(1, 2, 0).unsqueeze(0).contiguous().numpy()

    # The same in numpy float32, subtract then divide: must agree exactly with torchvision.
    x = rgb.astype(np.float32)[None] / np.float32(255)
    for out, mean, std in [(dino, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           (siglip, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]:
        ours = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        assert np.array_equal(ours, chw_to_bhwc(out)), "numpy and torchvision disagree"
    assert np.array_equal(x, chw_to_bhwc(tensor))
    return chw_to_bhwc(tensor), chw_to_bhwc(dino), chw_to_bhwc(siglip)


def make_normalize():
    # Every 8-bit value in every channel, plus photo pixels.
    ramp = np.arange(256, dtype=np.uint8)
    values = np.stack([ramp, ramp[::-1], np.roll(ramp, 77)], axis=-1).reshape(16, 16, 3)
    chelsea = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).convert("RGB"))
    pixels = np.concatenate([values, chelsea[100:116, 200:216]], axis=1)  # [16, 32, 3]
    tensor, dino, siglip = torchvision_normalise(pixels)
    manifest["normalize"].append({
        "input": save_npy("normalize_input.npy", pixels),
        "to_tensor": save_npy("normalize_to_tensor.npy", tensor),
        "dino": save_npy("normalize_dino.npy", dino),
        "siglip": save_npy("normalize_siglip.npy", siglip)})

    # The whole preprocessing on a photo: decode, bicubic resize to size x size, normalise.
    size = 40
    resized = np.asarray(Image.open(out_path("photo_rocket.jpg")).convert("RGB").resize(
        (size, size), Image.BICUBIC))
    _, dino, siglip = torchvision_normalise(resized)
    manifest["preprocess"].append({
        "input": "photo_rocket.jpg", "size": size,
        "dino": save_npy(f"preprocess_rocket_{size}.dino.npy", dino),
        "siglip": save_npy(f"preprocess_rocket_{size}.siglip.npy", siglip)})


def make_bad_inputs():
    os.makedirs(out_path("bad"), exist_ok=True)

    def bad(name, data, expect):
        write_bytes("bad/" + name, data)
        # Pillow must refuse it as well (or, for the size bombs, declare the absurd size).
        manifest["bad"].append({"file": "bad/" + name, "expect": expect})

    good_png = png_bytes(np.zeros((4, 4, 3), np.uint8), 2, 8)
    good_jpeg = open(out_path("jpeg_baseline_420.jpg"), "rb").read()
    good_webp = open(out_path("webp_lossy.webp"), "rb").read()

    bad("empty.bin", b"", "empty")
    bad("text.txt", b"this is not an image\n", "format")
    bad("gif.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "format")
    bad("bmp.bmp", b"BM" + bytes(60), "format")
    bad("png_signature_only.png", good_png[:8], "")
    bad("png_truncated_ihdr.png", good_png[:20], "")
    bad("png_truncated_idat.png",
        open(out_path("png_rgb8.png"), "rb").read()[:400], "truncated")
    bad("png_zero_width.png", png_bytes(np.zeros((4, 4, 3), np.uint8), 2, 8, ihdr_size=(0, 4)),
        "")
    bad("png_bomb.png", png_bytes(np.zeros((1, 1, 3), np.uint8), 2, 8,
                                  ihdr_size=(100000, 100000)), "pixels")
    bad("png_bomb_gray1.png", png_bytes(np.zeros((1, 8), np.uint8), 0, 1,
                                        ihdr_size=(1000000, 1000000)), "pixels")
    bad("png_bad_color_type.png", good_png[:25] + b"\x05" + good_png[26:], "")
    broken_crc = bytearray(good_png)
    broken_crc[29] ^= 0xFF  # IHDR's CRC
    bad("png_bad_ihdr_crc.png", bytes(broken_crc), "")
    bad("png_bad_zlib.png", png_bytes(np.zeros((4, 4, 3), np.uint8), 2, 8,
                                      idat=b"\x78\x9c" + bytes(range(200))), "")
    bad("png_short_idat.png", png_bytes(np.zeros((64, 64, 3), np.uint8), 2, 8,
                                        idat=zlib.compress(bytes(100))), "")
    bad("png_palette_missing_plte.png", png_bytes(np.zeros((4, 4), np.uint8), 3, 8), "")

    bad("jpeg_soi_only.jpg", b"\xff\xd8", "")
    bad("jpeg_header_only.jpg", good_jpeg[:300], "")
    bad("jpeg_truncated.jpg", good_jpeg[:len(good_jpeg) // 2], "truncated")
    bad("jpeg_no_eoi.jpg", good_jpeg[:-2], "truncated")
    sof = good_jpeg.find(b"\xff\xc0")
    assert sof > 0

    def patch_sof(height, width, precision=8):
        d = bytearray(good_jpeg)
        d[sof + 4] = precision
        d[sof + 5:sof + 7] = struct.pack(">H", height)
        d[sof + 7:sof + 9] = struct.pack(">H", width)
        return bytes(d)

    bad("jpeg_bomb.jpg", patch_sof(65000, 65000), "pixels")
    bad("jpeg_zero_height.jpg", patch_sof(0, 190), "")
    bad("jpeg_12bit.jpg", patch_sof(157, 190, precision=12), "")
    progressive = open(out_path("jpeg_progressive_420.jpg"), "rb").read()
    psof = progressive.find(b"\xff\xc2")
    d = bytearray(progressive)
    d[psof + 5:psof + 9] = struct.pack(">HH", 60000, 60000)
    bad("jpeg_progressive_bomb.jpg", bytes(d), "pixels")

    bad("webp_riff_only.webp", good_webp[:12], "")
    bad("webp_truncated.webp", good_webp[:len(good_webp) // 2], "")
    # VP8L header declaring 16384x16384 (the format's maximum).
    vp8l = b"\x2f" + struct.pack("<I", (16383) | (16383 << 14)) + bytes(20)
    bad("webp_lossless_bomb.webp",
        b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8l)) + b"WEBPVP8L" + struct.pack("<I", len(vp8l))
        + vp8l, "pixels")
    # VP8X canvas of 2^24 x 256 with an animation flag and no frames.
    vp8x = bytes([0x02, 0, 0, 0]) + (2**24 - 1).to_bytes(3, "little") + (255).to_bytes(3, "little")
    bad("webp_vp8x_bomb.webp",
        b"RIFF" + struct.pack("<I", 4 + 8 + len(vp8x)) + b"WEBPVP8X" + struct.pack("<I", len(vp8x))
        + vp8x, "")
    vp8_start = good_webp.find(b"\x9d\x01\x2a")
    assert vp8_start > 0
    bad("webp_bad_start_code.webp",
        good_webp[:vp8_start] + b"\x00\x00\x00" + good_webp[vp8_start + 3:], "")

    # Pillow refuses all of these too, except a palette PNG without PLTE (invalid per the PNG
    # specification; libpng refuses it, Pillow substitutes a default palette).
    pillow_accepts = {"bad/png_palette_missing_plte.png"}
    for entry in manifest["bad"]:
        try:
            with Image.open(out_path(entry["file"])) as im:
                im.convert("RGB")
                pil = f"Pillow decoded it as {im.size}"
                assert entry["file"] in pillow_accepts, entry["file"] + ": " + pil
        except Exception as e:  # noqa: BLE001 - we only record what Pillow said
            if isinstance(e, AssertionError):
                raise
            pil = f"Pillow: {type(e).__name__}: {e}"
        entry["pillow"] = pil[:200].replace(OUT + "/", "")


def main():
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "images"))
    args = parser.parse_args()
    OUT = args.out
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    make_photos()
    make_jpeg_variants()
    make_png_modes()
    make_webp()
    make_formula_resize()
    make_normalize()
    make_bad_inputs()

    manifest["generator"] = {"pillow": PIL.__version__, "numpy": np.__version__,
                             "skimage": skimage.__version__,
                             "pillow_jpeg": PIL.features.version("jpg"),
                             "pillow_webp": PIL.features.version("webp")}
    with open(out_path("manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"{len(manifest['decode'])} decode, {len(manifest['resize'])} resize, "
          f"{len(manifest['bad'])} bad-input cases; {total / 1e6:.2f} MB in {OUT}")
    if total > 6_000_000:
        sys.exit("fixtures exceed 6 MB")


if __name__ == "__main__":
    main()
