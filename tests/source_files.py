"""Small image files and Hugging Face rows for the tests that build data sets in their published layouts."""

import io

import datasets
from PIL import Image

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def encoded(colour: str, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    lossless = {"lossless": True} if fmt == "WEBP" else {}  # DiffusionDB Large's webp is lossless
    Image.new("RGB", (16, 16), COLOURS[colour]).save(buf, format=fmt, **lossless)
    return buf.getvalue()


def save_image(path, colour: str, fmt: str = "PNG") -> str:
    """A 16x16 image of one colour at `path` (lossless PNG whatever the suffix, so colours read back
    exactly; decoders go by the content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded(colour, fmt))
    return str(path)


def hf_rows(columns: dict, images: tuple[str, ...], dtypes: dict | None = None) -> datasets.Dataset:
    """A dataset whose `images` columns hold encoded images of the named colours; other columns are
    strings unless `dtypes` says otherwise ({"turn_index": "int32"})."""
    dtypes = dtypes or {}
    features = {
        k: datasets.Image() if k in images else datasets.Value(dtypes.get(k, "string")) for k in columns
    }
    data = {
        k: [{"bytes": encoded(c), "path": None} for c in v] if k in images else v for k, v in columns.items()
    }
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))
