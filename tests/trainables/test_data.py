from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_digits

from trainables.data import (
    DataSplits,
    ImageSet,
    InMemoryImageSet,
    StreamingImageSet,
    check_data_spec,
    load_data,
    preprocess,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PHOTOS = {"astronaut": skdata.astronaut, "cat": skdata.chelsea, "coffee": skdata.coffee}


# --------------------------------------------------------------------------- helpers


def _epoch(images: ImageSet, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(images.batches(**kwargs))
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def _crop(photo: np.ndarray, rng: np.random.Generator, *, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    top = rng.integers(0, photo.shape[0] - height)
    left = rng.integers(0, photo.shape[1] - width)
    return photo[top : top + height, left : left + width]


def _make_folder(
    root: Path,
    *,
    per_class: int = 8,
    seed: int = 0,
    fixed_size: tuple[int, int] | None = None,
) -> Path:
    """One folder per skimage photo holding real crops, alternating PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for name, load in PHOTOS.items():
        folder = root / name
        folder.mkdir(parents=True)
        photo = load()
        for i in range(per_class):
            size = fixed_size or (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(_crop(photo, rng, size=size)).save(folder / f"{name}_{i:02d}.{ext}")
    return root


def _write_truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()[:100, :120]).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _write_not_an_image(path: Path) -> None:
    path.write_text("this is not a JPEG, only named like one\n")


def _caught_data_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "unreadable image file" in str(w.message)]


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data({"source": "digits"}, seed=0)


# --------------------------------------------------------------------------- digits and splits


def test_digits_split_covers_every_image_stratified(digits: DataSplits) -> None:
    full = np.bincount(load_digits().target, minlength=10)
    train_counts = torch.bincount(digits.train.labels, minlength=10).numpy()
    val_counts = torch.bincount(digits.val.labels, minlength=10).numpy()

    assert len(digits.train) + len(digits.val) == 1797
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(train_counts + val_counts, full)
    np.testing.assert_allclose(val_counts / full, 0.2, atol=0.02)
    assert isinstance(digits.train, InMemoryImageSet)
    assert digits.train.images.dtype == torch.uint8
    assert digits.train.image_shape == (3, 8, 8)
    # Scaled from 0..16 to the full 0..255 range, grey so all channels agree.
    assert int(digits.train.images.max()) == 255
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])


def test_same_seed_same_split_other_seed_differs(digits: DataSplits) -> None:
    again = load_data({"source": "digits"}, seed=0)
    other = load_data({"source": "digits"}, seed=1)
    overridden = load_data({"source": "digits", "seed": 0}, seed=123)

    for same in (again, overridden):
        assert torch.equal(same.train.images, digits.train.images)
        assert torch.equal(same.val.labels, digits.val.labels)
    assert not torch.equal(other.val.images, digits.val.images)


def test_samples_per_class_subsamples_train_only(digits: DataSplits) -> None:
    small = load_data({"source": "digits", "samples_per_class": 20}, seed=0)

    assert len(small.train) == 200
    assert torch.bincount(small.train.labels).tolist() == [20] * 10
    assert torch.equal(small.val.images, digits.val.images)


def test_samples_per_class_beyond_class_size_names_field() -> None:
    with pytest.raises(ValueError, match=r"data\.samples_per_class=1000: class '0' has only"):
        load_data({"source": "digits", "samples_per_class": 1000})


def test_val_fraction_changes_split_size() -> None:
    splits = load_data({"source": "digits", "val_fraction": 0.5})

    assert abs(len(splits.val) - 1797 / 2) <= 1


# --------------------------------------------------------------------------- batches


def test_batches_visit_every_image_once_in_seeded_order() -> None:
    n = 103
    # Each image carries its own index in its pixels, so we can track it through batching.
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    items = InMemoryImageSet(images=images, labels=torch.arange(n))

    first_x, first_y = _epoch(items, batch_size=10, shuffle=True, seed=5)
    again_x, again_y = _epoch(items, batch_size=10, shuffle=True, seed=5)
    _, other_y = _epoch(items, batch_size=10, shuffle=True, seed=6)
    _, plain_y = _epoch(items, batch_size=10, shuffle=False)

    assert sorted(first_y.tolist()) == list(range(n))
    assert torch.equal(first_x[:, 0, 0, 0].long(), first_y)
    assert first_y.tolist() != list(range(n))
    assert torch.equal(first_y, again_y) and torch.equal(first_x, again_x)
    assert not torch.equal(first_y, other_y)
    assert plain_y.tolist() == list(range(n))
    sizes = [len(y) for _, y in items.batches(batch_size=10, shuffle=True, drop_last=True)]
    assert sizes == [10] * 10


def test_digits_batches_dtypes_and_device(digits: DataSplits) -> None:
    moved = digits.val.to("cpu")
    x, y = next(moved.batches(batch_size=32, shuffle=True, device="cpu"))

    assert x.shape == (32, 3, 8, 8) and x.dtype == torch.uint8
    assert y.shape == (32,) and y.dtype == torch.int64
    assert _epoch(moved, batch_size=64, shuffle=True)[1].shape == (len(digits.val),)
    with pytest.raises(ValueError, match="batch_size"):
        next(moved.batches(batch_size=0, shuffle=False))


# --------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("size", [8, 32, 100])
def test_preprocess_normalises_constant_grey(size: int) -> None:
    grey = torch.full((2, 3, size, size), 128, dtype=torch.uint8)
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)

    out = preprocess(grey, resolution=32, mean=MEAN, std=STD)
    augmented = preprocess(grey, resolution=32, mean=MEAN, std=STD, augment=True)

    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for result in (out, augmented):
        torch.testing.assert_close(result, expected.view(1, 3, 1, 1).expand_as(result))


def test_preprocess_augment_changes_pixels_reproducibly(digits: DataSplits) -> None:
    x, _ = next(digits.train.batches(batch_size=16, shuffle=False))

    def augmented(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return preprocess(x, resolution=24, mean=MEAN, std=STD, augment=True, generator=generator)

    plain = preprocess(x, resolution=24, mean=MEAN, std=STD)
    aug_a, aug_b, aug_other = augmented(1), augmented(1), augmented(2)

    assert aug_a.shape == plain.shape == (16, 3, 24, 24)
    assert (aug_a - plain).abs().mean() > 0.05
    assert torch.equal(aug_a, aug_b)
    assert not torch.equal(aug_a, aug_other)


def test_preprocess_augment_flips_about_half() -> None:
    half_white = torch.zeros(400, 3, 32, 32, dtype=torch.uint8)
    half_white[..., 16:] = 255
    generator = torch.Generator().manual_seed(0)

    out = preprocess(
        half_white, resolution=16, mean=(0, 0, 0), std=(1, 1, 1), augment=True, generator=generator
    )

    left_edge = out[:, 0, :, 0].mean(dim=1)  # 0 when the image kept its side, 1 when flipped
    assert 0.4 < (left_edge > 0.5).float().mean() < 0.6


def test_preprocess_downsamples_non_square_to_central_square() -> None:
    image = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    image[..., 20:60] = 255  # only the central 40x40 square is white

    out = preprocess(image, resolution=10, mean=(0, 0, 0), std=(1, 1, 1))

    torch.testing.assert_close(out, torch.ones(1, 3, 10, 10))


def test_preprocess_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[B, 3, H, W\]"):
        preprocess(torch.zeros(3, 8, 8, dtype=torch.uint8), resolution=8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 3, 8, 8), resolution=8, mean=MEAN, std=STD)


# --------------------------------------------------------------------------- image folders


def test_imagefolder_skips_bad_files_with_one_warning(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos")
    _write_truncated_jpeg(root / "cat" / "cut_short.jpg")
    _write_not_an_image(root / "coffee" / "notes.jpg")
    (root / "coffee" / "README.txt").write_text("ignored: not an image extension")
    spec = {"source": "imagefolder", "path": str(root), "image_size": 32, "val_fraction": 0.25}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(spec, seed=0)

    messages = _caught_data_warnings(caught)
    assert len(messages) == 1
    assert "skipped 2 unreadable" in messages[0]
    assert "cut_short.jpg" in messages[0] and "notes.jpg" in messages[0]
    assert splits.class_names == ["astronaut", "cat", "coffee"]
    assert len(splits.train) + len(splits.val) == 24
    assert torch.bincount(splits.val.labels).tolist() == [2, 2, 2]
    # Crops are 40-79 px: stored as the central square shrunk to image_size.
    assert splits.train.image_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("writer", "name"), [(_write_truncated_jpeg, "cut_short.jpg"), (_write_not_an_image, "x.jpg")]
)
def test_imagefolder_on_bad_file_error_names_file(tmp_path: Path, writer, name: str) -> None:
    root = _make_folder(tmp_path / "photos", per_class=3)
    writer(root / "cat" / name)
    spec = {"source": "imagefolder", "path": str(root), "on_bad_file": "error"}

    with pytest.raises(ValueError, match=rf"data\.on_bad_file=error: .*{name}"):
        load_data(spec)


def test_imagefolder_keeps_native_size_when_all_images_share_it(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos", per_class=4, fixed_size=(24, 20))

    splits = load_data({"source": "imagefolder", "path": str(root), "val_fraction": 0.25})

    assert splits.train.image_shape == (3, 24, 20)
    stored = splits.train.images[0].permute(1, 2, 0).numpy()
    assert stored.dtype == np.uint8 and stored.shape == (24, 20, 3)


def test_imagefolder_separate_val_path(tmp_path: Path) -> None:
    train_root = _make_folder(tmp_path / "train", per_class=6, seed=0)
    val_root = _make_folder(tmp_path / "val", per_class=3, seed=1)
    spec = {"source": "imagefolder", "path": str(train_root), "val_path": str(val_root)}

    splits = load_data({**spec, "image_size": 48})
    small = load_data({**spec, "image_size": 48, "samples_per_class": 2})

    assert len(splits.train) == 18 and len(splits.val) == 9
    assert torch.bincount(splits.val.labels).tolist() == [3, 3, 3]
    assert len(small.train) == 6 and torch.equal(small.val.images, splits.val.images)


def test_imagefolder_val_path_with_other_classes(tmp_path: Path) -> None:
    train_root = _make_folder(tmp_path / "train", per_class=2)
    val_root = _make_folder(tmp_path / "val", per_class=2)
    (val_root / "coffee").rename(val_root / "tea")

    with pytest.raises(ValueError, match=r"data\.val_path .*missing: \['coffee'\]"):
        check_data_spec({"source": "imagefolder", "path": train_root, "val_path": val_root})


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_matches_in_memory(tmp_path: Path, workers: int) -> None:
    root = _make_folder(tmp_path / "photos", per_class=6)
    spec = {"source": "imagefolder", "path": str(root), "image_size": 40, "val_fraction": 0.5}

    memory = load_data(spec, seed=3)
    streamed = load_data({**spec, "max_memory_mb": 0, "num_workers": workers}, seed=3)

    assert isinstance(memory.train, InMemoryImageSet)
    assert isinstance(streamed.train, StreamingImageSet)
    assert streamed.train.image_shape == memory.train.image_shape == (3, 40, 40)
    for mem_set, stream_set in ((memory.train, streamed.train), (memory.val, streamed.val)):
        assert torch.equal(stream_set.labels, mem_set.labels)
        mem_x, mem_y = _epoch(mem_set, batch_size=4, shuffle=True, seed=9)
        stream_x, stream_y = _epoch(stream_set, batch_size=4, shuffle=True, seed=9)
        assert torch.equal(stream_y, mem_y)
        assert stream_x.dtype == torch.uint8 and torch.equal(stream_x, mem_x)


def test_streaming_drops_truncated_file_from_its_batch(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos", per_class=4)
    _write_truncated_jpeg(root / "cat" / "cut_short.jpg")
    spec = {"source": "imagefolder", "path": str(root), "max_memory_mb": 0, "num_workers": 0}
    splits = load_data({**spec, "val_path": None, "val_fraction": 0.2}, seed=0)
    everything = [splits.train, splits.val]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = sum(len(_epoch(part, batch_size=5, shuffle=False)[1]) for part in everything)

    # The truncated file passes the cheap header check, so it is only found while streaming.
    assert len(splits.train) + len(splits.val) == 13
    assert seen == 12
    assert any("cut_short.jpg" in m for m in _caught_data_warnings(caught))


# --------------------------------------------------------------------------- other sources


def test_fake_source() -> None:
    spec = {"source": "fake", "fake_size": 100, "fake_classes": 5}

    splits = load_data(spec, seed=2)
    again = load_data(spec, seed=2)

    assert len(splits.train) + len(splits.val) == 100
    assert splits.num_classes == 5
    assert splits.train.image_shape == (3, 32, 32)
    assert splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images, again.train.images)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 + array.ndim  # 0x08: unsigned byte, then the number of dimensions
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path: Path) -> None:
    # Real digits blown up to MNIST's 28x28 and written in MNIST's own file format.
    digits = load_digits()
    images = np.kron(digits.images[:60] * 255 / 16, np.ones((3, 3))).astype(np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", images[:40])
    _write_idx(raw / "train-labels-idx1-ubyte", digits.target[:40])
    _write_idx(raw / "t10k-images-idx3-ubyte", images[40:])
    _write_idx(raw / "t10k-labels-idx1-ubyte", digits.target[40:60])

    splits = load_data({"source": "torchvision:MNIST", "root": str(tmp_path)})

    assert len(splits.train) == 40 and len(splits.val) == 20
    assert splits.num_classes == 10 and splits.class_names[0] == "0 - zero"
    assert splits.train.image_shape == (3, 28, 28)
    assert torch.equal(splits.val.labels, torch.from_numpy(digits.target[40:60]).long())
    assert torch.equal(splits.train.images[0, 0], torch.from_numpy(images[0]))


def test_torchvision_dataset_without_arrays_decodes_or_streams() -> None:
    # FakeData has no .data array or label list: exercises the per-item PIL path of any
    # torchvision dataset (Flowers102, Food101, ...), both held in memory and streamed.
    from torchvision.datasets import FakeData

    from trainables.data.spec import parse_spec as _parse_spec
    from trainables.data.tvdatasets import vision_pool as _vision_pool

    dataset = FakeData(size=12, image_size=(3, 40, 50), num_classes=3, random_offset=1)
    spec = {"source": "torchvision:FakeData", "image_size": 32}
    held = _vision_pool(dataset, _parse_spec(spec)).subset(np.arange(12), _parse_spec(spec))
    streamed_spec = _parse_spec({**spec, "max_memory_mb": 0, "num_workers": 0})
    streamed = _vision_pool(dataset, streamed_spec).subset(np.arange(12), streamed_spec)

    assert isinstance(held, InMemoryImageSet) and isinstance(streamed, StreamingImageSet)
    assert held.image_shape == streamed.image_shape == (3, 32, 32)
    assert held.labels.tolist() == [int(dataset[i][1]) for i in range(12)]
    held_x, held_y = _epoch(held, batch_size=5, shuffle=True, seed=0)
    streamed_x, streamed_y = _epoch(streamed, batch_size=5, shuffle=True, seed=0)
    assert torch.equal(held_y, streamed_y) and torch.equal(held_x, streamed_x)


def test_torchvision_missing_dataset_names_root_and_download(tmp_path: Path) -> None:
    spec = {"source": "torchvision:CIFAR10", "root": str(tmp_path), "download": False}

    check_data_spec(spec)  # the name is valid; only loading needs the files
    with pytest.raises(ValueError, match=r"data\.root=.*data\.download=false"):
        load_data(spec)


# --------------------------------------------------------------------------- spec errors


def test_valid_specs_pass_check_and_none_means_unset(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos", per_class=1)

    check_data_spec({"source": "digits", "path": None, "samples_per_class": None})
    check_data_spec({"source": "imagefolder", "path": root, "image_size": 64})
    check_data_spec({"source": "fake", "fake_size": 10})


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"source": "digits", "bogus": 1}, r"data\.bogus: unknown key; valid keys: .*val_fraction"),
        ({"source": "mnist"}, r"data\.source: unknown source 'mnist'.*digits, imagefolder, fake"),
        ({}, r"data\.source"),
        ({"source": "torchvision:Nope"}, r"data\.source: .*no dataset 'Nope'.*CIFAR10"),
        ({"source": "torchvision:cifar10"}, r"did you mean CIFAR10"),
        ({"source": "imagefolder"}, r"data\.path is required"),
        ({"source": "digits", "path": "/tmp"}, r"data\.path only applies to source imagefolder"),
        ({"source": "digits", "val_fraction": 1.5}, r"data\.val_fraction .*\(0, 1\)"),
        ({"source": "digits", "samples_per_class": 0}, r"data\.samples_per_class .*>= 1"),
        ({"source": "digits", "image_size": "big"}, r"data\.image_size must be an integer"),
        ({"source": "digits", "seed": -1}, r"data\.seed"),
        ({"source": "digits", "on_bad_file": "ignore"}, r"data\.on_bad_file .*warn, error"),
        ({"source": "digits", "max_memory_mb": -5}, r"data\.max_memory_mb"),
        ({"source": "torchvision:MNIST", "download": "yes"}, r"data\.download"),
        ({"source": "fake", "fake_classes": 1}, r"data\.fake_classes .*>= 2"),
    ],
)
def test_bad_spec_names_field(spec: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        check_data_spec(spec)
    with pytest.raises(ValueError, match=pattern):
        load_data(spec)


def test_folder_errors_name_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    single = _make_folder(tmp_path / "single", per_class=2)
    for name in ("cat", "coffee"):
        for file in (single / name).iterdir():
            file.unlink()
        (single / name).rmdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        tmp_path / "missing": r"data\.path: folder .*missing does not exist",
        a_file: r"data\.path: .*file\.txt is not a folder",
        empty: r"data\.path: .*empty has no class subfolders",
        single: r"data\.path: .*single has one class subfolder \('astronaut'\)",
    }
    for path, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            check_data_spec({"source": "imagefolder", "path": str(path)})


def test_class_folder_without_images_is_named(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos", per_class=2)
    for file in (root / "cat").iterdir():
        file.unlink()
    (root / "cat" / "notes.txt").write_text("no images here")

    with pytest.raises(ValueError, match=r"class folder .*cat has no image files"):
        check_data_spec({"source": "imagefolder", "path": str(root)})


def test_class_folder_with_only_bad_files_is_named(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "photos", per_class=2)
    for file in (root / "coffee").iterdir():
        file.unlink()
    _write_truncated_jpeg(root / "coffee" / "cut_short.jpg")
    _write_not_an_image(root / "coffee" / "notes.jpg")

    with (
        warnings.catch_warnings(),
        pytest.raises(ValueError, match=r"data\.path: class folder .*coffee has no readable"),
    ):
        warnings.simplefilter("ignore")
        load_data({"source": "imagefolder", "path": str(root)})
