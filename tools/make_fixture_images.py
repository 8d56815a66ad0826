"""Writes the fixture images of tests/fixtures/images (deterministic; committed) and images.json,
which tools/reference.py reads. Sizes exercise: full windows (224x224), banker's rounding in
smart_resize (70x42 -> 56x56), partial windows (196x308), the max_pixels downscale (600x800 with a
per-request max_pixels), a tall aspect (588x84); and modes the engine must convert as PIL's
convert("RGB") does: grayscale, RGBA, CMYK JPEG, 16-bit grayscale PNG, palette GIF, BMP, TIFF.

    python3 tools/make_fixture_images.py tests/fixtures/images
"""
import json
import os
import sys

import numpy as np
from PIL import Image


def pattern(h, w, seed):
    """Smooth gradients plus noise and a few edges: every resize kernel tap matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(x / 7.0 + seed) * np.cos(y / 11.0)
    g = 255 * (x + y) / (h + w)
    b = 255 * ((x // 9 + y // 13) % 2)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main(out):
    os.makedirs(out, exist_ok=True)
    images = []

    def add(name, img, **extra):
        img.save(os.path.join(out, name), **extra.pop("save", {}))
        images.append({"file": name, **extra})

    add("grad_224x224.png", Image.fromarray(pattern(224, 224, 1)))
    add("round_70x42.png", Image.fromarray(pattern(70, 42, 2)))
    add("partial_196x308.jpg", Image.fromarray(pattern(196, 308, 3)), save={"quality": 92})
    add("big_600x800.webp", Image.fromarray(pattern(600, 800, 4)), max_pixels=100352, save={"quality": 90})
    add("tall_588x84.png", Image.fromarray(pattern(588, 84, 5)))
    # Conversion cases: preprocessed and compared, not embedded.
    add("gray_100x60.png", Image.fromarray(pattern(100, 60, 6)[..., 0], "L"), embed=False)
    rgba = np.concatenate([pattern(90, 90, 7), (np.arange(90 * 90).reshape(90, 90, 1) % 256).astype(np.uint8)], -1)
    add("rgba_90x90.png", Image.fromarray(rgba, "RGBA"), embed=False)
    add("cmyk_80x64.jpg", Image.fromarray(pattern(80, 64, 8)).convert("CMYK"), embed=False, save={"quality": 95})
    g16 = (pattern(64, 48, 9)[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    add("gray16_64x48.png", Image.fromarray(g16), embed=False)  # mode I;16
    add("palette_60x60.gif", Image.fromarray(pattern(60, 60, 10)).convert("P", palette=Image.ADAPTIVE), embed=False)
    add("plain_50x70.bmp", Image.fromarray(pattern(50, 70, 11)), embed=False)
    add("plain_64x64.tiff", Image.fromarray(pattern(64, 64, 12)), embed=False)
    with open(os.path.join(out, "images.json"), "w") as f:
        json.dump({"images": images}, f, indent=1)
    print(f"{len(images)} images in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
