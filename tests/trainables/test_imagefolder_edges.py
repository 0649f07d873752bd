"""Image folder edge cases: symlinks (loops, duplicates, shared files) and 16-bit images."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import check_data_spec, load_data
from trainables.data.transforms import to_rgb

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def _write_images(folder: Path, count: int, *, first: int = 0) -> list[Path]:
    """``count`` distinct 8x8 PNGs (grey level 5 * index), so every file is its own image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + count):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(np.full((8, 8, 3), 5 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _two_classes(root: Path, per_class: int = 4) -> Path:
    _write_images(root / "cat", per_class)
    _write_images(root / "dog", per_class, first=per_class)
    return root


def _symlink_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "through symlinks" in str(w.message)]


def _load(spec: dict) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(spec, seed=0)
    return splits, _symlink_warnings(caught)


def _all_images(splits) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for part in (splits.train, splits.val):
        for x, y in part.batches(batch_size=64, shuffle=False):
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG written byte by byte: grey ``[H, W]`` or RGB ``[H, W, 3]`` (PIL cannot)."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# Columns of 0, 32768 and 65535, two pixels wide: 8 bits each -> 0, 128, 255.
_GREY16 = np.repeat(np.array([[0, 32768, 65535]], dtype=np.uint16), 2, axis=1).repeat(6, axis=0)
_EXPECTED = np.array([0, 0, 128, 128, 255, 255], dtype=np.uint8)


def _write_grey16_png(path: Path) -> None:
    Image.fromarray(_GREY16).save(path.with_suffix(".png"))  # PIL writes mode I;16


def _write_grey16_big_endian_tiff(path: Path) -> None:
    Image.fromarray(_GREY16.astype(">u2")).save(path.with_suffix(".tif"))  # mode I;16B


def _write_rgb16_png(path: Path) -> None:
    path.with_suffix(".png").write_bytes(_png16(np.stack([_GREY16] * 3, axis=-1)))


# --------------------------------------------------------------------------- symlinks


_LIST_IN_CHILD = """
import json, sys, tracemalloc
from trainables.data.listing import list_folders
from trainables.data.spec import parse_spec
tracemalloc.start()
listing = list_folders(parse_spec({"source": "imagefolder", "path": sys.argv[1]}))
print(json.dumps({"files": len(listing.files), "peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_symlink_loops_end_quickly_in_bounded_memory(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "photos")
    _write_images(root / "cat" / "sub", 2, first=20)
    # Two links back to cat and one from its subfolder: os.walk(followlinks=True) walks 2^40
    # paths through these before the path is too long; the walk must enter cat once.
    (root / "cat" / "again").symlink_to(".")
    (root / "cat" / "more").symlink_to(".")
    (root / "cat" / "sub" / "back").symlink_to("..")

    try:
        done = subprocess.run(
            [sys.executable, "-c", _LIST_IN_CHILD, str(root)],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("listing a folder with symlink loops did not finish within 20 s")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["files"] == 4 + 2 + 4  # cat, cat/sub, dog: each once
    assert result["peak"] < 2 * 2**20, result  # bytes traced while listing ten files


def test_self_link_lists_each_image_once_with_one_counted_warning(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "photos", per_class=4)
    _write_images(root / "cat" / "sub", 2, first=20)
    (root / "cat" / "again").symlink_to(".")  # ln -s . photos/cat/again

    splits, messages = _load({"source": "imagefolder", "path": str(root), "val_fraction": 0.5})

    images, labels = _all_images(splits)
    assert torch.bincount(labels).tolist() == [6, 4]
    assert len(torch.unique(images[:, 0, 0, 0])) == 10  # ten distinct grey levels, no repeats
    # Every cat image (4 in cat, 2 in cat/sub) is also reached through cat/again.
    assert messages == [
        "data.path: 6 image file(s) reached more than once through symlinks were used once"
    ]


def test_files_reached_through_two_links_are_counted_once(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "photos", per_class=3)
    outside = _write_images(tmp_path / "outside", 1, first=30)[0]
    _write_images(tmp_path / "more_dogs", 2, first=31)
    (root / "cat" / "link_a.png").symlink_to(outside)
    (root / "cat" / "link_b.png").symlink_to(outside)
    (root / "dog" / "again.png").symlink_to(root / "dog" / "img_05.png")
    (root / "dog" / "extra").symlink_to(tmp_path / "more_dogs", target_is_directory=True)
    (root / "dog" / "extra_too").symlink_to(tmp_path / "more_dogs", target_is_directory=True)

    splits, messages = _load({"source": "imagefolder", "path": str(root), "val_fraction": 0.5})

    images, labels = _all_images(splits)
    assert torch.bincount(labels).tolist() == [3 + 1, 3 + 2]
    assert len(torch.unique(images[:, 0, 0, 0])) == 9
    # outside (cat), img_05 and the two more_dogs files (dog): one warning for the folder.
    assert messages == [
        "data.path: 4 image file(s) reached more than once through symlinks were used once"
    ]


def test_class_folder_linked_to_another_class_is_an_error(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "photos")
    (root / "kitten").symlink_to(root / "cat", target_is_directory=True)
    spec = {"source": "imagefolder", "path": str(root)}

    pattern = r"data\.path: class folders .*cat and .*kitten hold the same 4 image file"
    with pytest.raises(ValueError, match=pattern):
        check_data_spec(spec)
    with pytest.raises(ValueError, match=pattern):
        load_data(spec)


def test_image_in_both_train_and_val_path_is_an_error(tmp_path: Path) -> None:
    train = _two_classes(tmp_path / "train")
    val = tmp_path / "val"
    _write_images(val / "cat", 2, first=40)
    _write_images(val / "dog", 2, first=42)
    (val / "dog" / "leak.png").symlink_to(train / "dog" / "img_05.png")
    spec = {"source": "imagefolder", "path": str(train), "val_path": str(val)}

    with pytest.raises(ValueError, match=r"data\.val_path: 1 image file\(s\) in .*val/dog"):
        check_data_spec(spec)
    # The whole folder twice is the same leak, named the same way.
    with pytest.raises(ValueError, match=r"data\.val_path: 4 image file\(s\) .*also in data\.path"):
        check_data_spec({**spec, "val_path": str(train)})


# --------------------------------------------------------------------------- 16-bit images


@pytest.mark.parametrize(
    "writer", [_write_grey16_png, _write_grey16_big_endian_tiff, _write_rgb16_png]
)
@pytest.mark.parametrize("max_memory_mb", [2048, 0])  # decoded in memory, streamed
def test_16_bit_images_scale_to_8_bits(tmp_path: Path, writer, max_memory_mb: int) -> None:
    for name in ("dark", "light"):
        for i in range(2):
            (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
            writer(tmp_path / "photos" / name / f"img_{i}")
    spec = {
        "source": "imagefolder",
        "path": str(tmp_path / "photos"),
        "val_fraction": 0.5,
        "max_memory_mb": max_memory_mb,
        "num_workers": 0,
    }

    images, _ = _all_images(load_data(spec, seed=0))

    assert images.shape == (4, 3, 6, 6)  # native size: the header path read 6x6
    expected = torch.from_numpy(np.broadcast_to(_EXPECTED, (4, 3, 6, 6)).copy())
    assert torch.equal(images, expected)


def test_to_rgb_scales_32_bit_integer_by_its_declared_depth() -> None:
    samples = np.array([[0, 2**30, 2**31 - 1, -7]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "TIFF")  # BitsPerSample 32
    buffer.seek(0)

    with Image.open(buffer) as image:
        assert image.mode == "I"
        tiff = np.asarray(to_rgb(image))
    # No declared depth (as PNG in older Pillow): 16 bits, larger values saturate.
    undeclared = np.asarray(to_rgb(Image.fromarray(np.array([[256, 65535, 70000]], np.int32))))

    assert tiff[..., 0].tolist() == [[0, 64, 127, 0]]
    assert (tiff[..., 0] == tiff[..., 2]).all()
    assert undeclared[..., 1].tolist() == [[1, 255, 255]]


def test_to_rgb_leaves_8_bit_modes_to_pil() -> None:
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    palette = grey.convert("P")

    assert np.asarray(to_rgb(grey))[..., 0].tolist() == [[0, 77, 255]]
    assert np.asarray(to_rgb(palette)).tolist() == np.asarray(palette.convert("RGB")).tolist()
