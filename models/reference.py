"""The reference preprocessing the classifier matches: Pillow's decode, the shorter side resized to
round(size / 0.875) with Pillow's bilinear filter (antialiased when shrinking), the longer side in
proportion (truncated, as torchvision's Resize does), the centre size×size cropped at the offsets
torchvision's CenterCrop takes, RGB, x = (pixel − 127) / 128, CHW float32.

As a module: `tensor(data, size)` (the Celery baseline uses it). As a script, the parity test's
reference: `reference.py SIZE OUT_DIR PHOTO...` writes OUT_DIR/<photo's file name>.f32, each the
CHW tensor as little-endian float32.
"""
import io
import os
import sys

import numpy as np
from PIL import Image

CROP_FRACTION = 0.875


def tensor(data: bytes, size: int) -> np.ndarray:
    """The model input for the image in `data`, shape (3, size, size)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    short = round(size / CROP_FRACTION)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


def main(size, out_dir, photos):
    os.makedirs(out_dir, exist_ok=True)
    for path in photos:
        with open(path, "rb") as f:
            t = tensor(f.read(), size)
        t.astype("<f4").tofile(os.path.join(out_dir, os.path.basename(path) + ".f32"))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
