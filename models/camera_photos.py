"""Survey-camera-sized versions of photos, for the large-photo test and benchmark: each photo
upscaled (Lanczos) to about MEGAPIXELS million pixels at its own aspect ratio and encoded as a
camera does (quality 92, 4:2:0 chroma, baseline, EXIF-free).

usage: camera_photos.py MEGAPIXELS OUT_DIR PHOTO...   (writes OUT_DIR/<stem>.jpg; skips those
that exist, so a cached folder is made once)
"""
import math
import os
import sys

from PIL import Image


def main(megapixels, out_dir, photos):
    os.makedirs(out_dir, exist_ok=True)
    for path in photos:
        out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".jpg")
        if os.path.exists(out):
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        k = math.sqrt(megapixels * 1e6 / (w * h))
        image = image.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
        image.save(out + ".part", "JPEG", quality=92, subsampling="4:2:0")
        os.replace(out + ".part", out)


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], sys.argv[3:])
