"""Datasets for a trial: load, split, batch and preprocess images.

A trial gets the experiment's ``data:`` section as a plain dict and calls :func:`load_data`.
Every source ends up as uint8 images ``[N, 3, H, W]`` plus int64 labels:

* small sets (digits, fake, CIFAR-sized torchvision sets, image folders whose decoded size fits in
  ``max_memory_mb``) are decoded once into one tensor and batched by indexing, so an epoch costs
  no worker processes and the whole set can move to the GPU once;
* larger folders stream through a :class:`torch.utils.data.DataLoader` whose workers decode and
  resize to ``image_size`` and yield the same uint8 batches.

Resizing to the trial's resolution, augmentation and normalisation happen later, batched, on the
trial's device (:func:`preprocess`), so the stored set does not depend on the searched resolution.

Splits are stratified and seeded: the same ``seed`` gives the same train/validation split, and
``samples_per_class`` subsamples the training split only, so validation stays comparable across
data-size experiments.

Keys of the ``data:`` section (only ``source`` is required; None means "not set"):

* ``source``: ``digits`` (scikit-learn's 8x8 handwritten digits), ``imagefolder``, ``fake``
  (torchvision ``FakeData``) or ``torchvision:<Name>`` (any ``torchvision.datasets`` class).
* ``path``, ``val_path``: image folder root with one subfolder per class, and an optional separate
  validation folder with the same subfolders (otherwise ``val_fraction`` is split off).
* ``root`` (default ``~/.cache/ftsearch/datasets``), ``download`` (default false): passed to the
  torchvision class; its own ``train=True/False`` split is used where it has one.
* ``samples_per_class``: keep that many training images per class (seeded).
* ``val_fraction`` (0.2), ``seed`` (overrides the ``seed`` argument of :func:`load_data`).
* ``image_size`` (256): side of the central square images are stored at when they vary in size
  or are larger; images that all share one size no larger than this keep it (CIFAR, MNIST).
* ``fake_size`` (200), ``fake_classes`` (10): size of the ``fake`` source.
* ``on_bad_file`` (``warn``): skip unreadable image files with one warning, or ``error``.
* ``num_workers`` (2), ``max_memory_mb`` (2048): folders bigger than this once decoded stream
  through that many DataLoader workers.

Modules: :mod:`~trainables.data.spec` (the ``data:`` keys, no torch),
:mod:`~trainables.data.splits` (loading and splitting), :mod:`~trainables.data.imagesets`
(image sets and pools), :mod:`~trainables.data.imagefolder` and
:mod:`~trainables.data.tvdatasets` (the sources) and :mod:`~trainables.data.transforms`
(crops, resizes and :func:`preprocess`). The spec loads eagerly, the rest on first use.
"""

from trainables._lazy import lazy_exports
from trainables.data.spec import DATA_SOURCES, TORCHVISION_PREFIX, DataSpec, check_seed, parse_spec

__getattr__, __dir__ = lazy_exports(__name__, {
    "IMAGE_EXTENSIONS": "listing",
    "DataSplits": "splits",
    "ImageSet": "imagesets",
    "InMemoryImageSet": "imagesets",
    "StreamingImageSet": "imagesets",
    "check_data_spec": "splits",
    "load_data": "splits",
    "preprocess": "transforms",
    "to_rgb": "transforms",
})

__all__ = [
    "DATA_SOURCES",
    "IMAGE_EXTENSIONS",
    "TORCHVISION_PREFIX",
    "DataSpec",
    "DataSplits",
    "ImageSet",
    "InMemoryImageSet",
    "StreamingImageSet",
    "check_data_spec",
    "check_seed",
    "load_data",
    "parse_spec",
    "preprocess",
    "to_rgb",
]
