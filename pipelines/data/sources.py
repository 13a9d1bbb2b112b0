"""Where images come from: Fashion-MNIST idx files, or an ImageFolder tree on local disk or S3.

A :class:`Source` lists its items (a stable id, a split, a label, and either raw pixels or the
URI of an encoded file), the class names, and a content digest (sha256 over every input's bytes,
so the dataset version changes exactly when an input does).

Fashion-MNIST (``data.source: fashion-mnist``)
    The four idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-…``,
    plain or ``.gz``) are looked up in ``data.source_dir`` if set (a folder or a URI), otherwise
    in :data:`FASHION_MNIST_DIRS` (Debian's ``dataset-fashion-mnist`` package first); if none has
    them, torchvision's downloader is tried (needs the internet). The 60k training images give
    ``train`` and a stratified, seeded ``val`` carve-out (``data.val_fraction``); the 10k
    ``t10k`` images are ``test``.

ImageFolder (``data.source: <URI of a root>``)
    ``root/<class>/<image>`` with a seeded, stratified split into train/val/test
    (``data.val_fraction``, ``data.test_fraction``, ``data.split_seed``), or
    ``root/{train,val,test}/<class>/<image>`` with the split given by the folders (a missing
    ``val``/``test`` is carved out of ``train``). Files in nested folders belong to their
    top-level class folder (like torchvision's ImageFolder). Hidden files and folders
    (``.name``) are ignored. A class folder in ``val``/``test`` that ``train`` lacks is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import storage as st
from ..config import DataConfig, StorageConfig
from ..errors import DataError, StorageError

SPLITS = ("train", "val", "test")

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",  # Debian/Ubuntu: apt-get install dataset-fashion-mnist
    "~/.cache/vit-pipeline/fashion-mnist/FashionMNIST/raw",  # where the torchvision fallback downloads
    "./data/FashionMNIST/raw",  # torchvision's usual root=./data
)
TORCHVISION_CACHE = "~/.cache/vit-pipeline/fashion-mnist"


@dataclass(frozen=True)
class SourceItem:
    """One input image. Exactly one of ``pixels`` (raw idx data) and ``uri`` (a file) is set."""

    source_id: str  # stable and human readable: "train/00042" or "train/Coat/img_001.png"
    split: str
    label: int
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    uri: str | None = None
    size: int = 0


@dataclass
class Source:
    kind: str  # "fashion-mnist" | "imagefolder"
    uri: str  # where it was read from
    classes: list[str]
    items: list[SourceItem]  # ordered: by split, then source_id
    digest: str  # sha256 hex over every input's content + the split assignment
    content_sha256: dict[str, str]  # source_id -> sha256 of its bytes (duplicate detection)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not treated as images
    reader: Callable[[SourceItem], bytes] | None = field(default=None, repr=False)

    def read(self, item: SourceItem) -> bytes:
        """The encoded bytes of a file item (ImageFolder)."""
        assert self.reader is not None and item.uri is not None
        return self.reader(item)

    def split_items(self, split: str) -> list[SourceItem]:
        return [i for i in self.items if i.split == split]


def open_source(data: DataConfig, storage: StorageConfig | None = None) -> Source:
    """The configured source, listed, split and fingerprinted (reads every input once)."""
    if data.source == FASHION_MNIST:
        return fashion_mnist_source(data, storage)
    try:
        root = st.parse_uri(data.source)
    except StorageError as exc:
        raise DataError(f"data.source: {exc} (or use data.source=fashion-mnist)") from None
    return image_folder_source(str(root), data, storage)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def read_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format; gzip is detected and undone)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name} is a damaged gzip file ({exc}); re-download or reinstall it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{name} is not an unsigned-byte idx file (bad magic); point data.source_dir at the real files")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{name} holds {len(data)} bytes but its header promises {expected}; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_fashion_mnist(data: DataConfig, storage: StorageConfig | None = None) -> dict[str, str]:
    """URIs of the four idx files: ``{"train-images-idx3-ubyte": uri, ...}``."""
    wanted = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    candidates = [data.source_dir] if data.source_dir else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        found = _find_idx_files(folder, wanted, storage)
        if found is not None:
            return found
    if data.source_dir:
        raise DataError(
            f"data.source_dir={data.source_dir!r} does not hold the Fashion-MNIST idx files "
            f"({', '.join(wanted)}, optionally .gz); point it at the folder that does"
        )
    downloaded = _download_with_torchvision()
    if downloaded is not None:
        found = _find_idx_files(downloaded, wanted, storage)
        if found is not None:
            return found
    raise DataError(
        f"Fashion-MNIST idx files not found in {', '.join(FASHION_MNIST_DIRS)} and the torchvision download failed; "
        "run `apt-get install dataset-fashion-mnist` or set data.source_dir to a folder with the idx files"
    )


def _find_idx_files(folder: str, wanted: list[str], storage: StorageConfig | None) -> dict[str, str] | None:
    if "://" not in folder:
        folder = os.path.expanduser(folder)
    try:
        names = {e.relpath: e.uri for e in st.list_files(folder, storage, recursive=False)}
    except StorageError:
        if folder.startswith("s3://"):
            raise
        return None
    found = {}
    for base in wanted:
        uri = names.get(base) or names.get(base + ".gz")
        if uri is None:
            return None
        found[base] = uri
    return found


def _download_with_torchvision() -> str | None:
    """Try torchvision's Fashion-MNIST download; the folder with the raw files, or None offline."""
    root = os.path.expanduser(TORCHVISION_CACHE)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=True, download=True)
        FashionMNIST(root, train=False, download=True)
    except Exception:
        return None
    return os.path.join(root, "FashionMNIST", "raw")


def fashion_mnist_source(data: DataConfig, storage: StorageConfig | None = None) -> Source:
    files = find_fashion_mnist(data, storage)
    arrays: dict[str, np.ndarray] = {}
    digest = hashlib.sha256(b"fashion-mnist\n")
    for base, uri in sorted(files.items()):
        arr = read_idx(st.read_bytes(uri, storage), uri)
        arrays[base] = arr
        digest.update(f"{base}\t{hashlib.sha256(arr.tobytes()).hexdigest()}\n".encode())
    items: list[SourceItem] = []
    content: dict[str, str] = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        images, labels = arrays[img_name], arrays[lbl_name]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{files[img_name]} and {files[lbl_name]} disagree ({images.shape} vs {labels.shape}); reinstall the files")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{files[lbl_name]} has label {int(labels.max())}; Fashion-MNIST labels are 0-9")
        for i in range(len(images)):
            sid = f"{split}/{i:05d}"
            items.append(SourceItem(sid, split, int(labels[i]), pixels=images[i]))
            content[sid] = hashlib.sha256(images[i].tobytes()).hexdigest()
    has = {"train": True, "val": False, "test": True}
    items = assign_splits(items, has, data.val_fraction, data.test_fraction, data.split_seed)
    folder = files["train-images-idx3-ubyte"].rsplit("/", 1)[0]
    return Source(FASHION_MNIST, folder, list(FASHION_MNIST_CLASSES), items, digest.hexdigest(), content)


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def image_folder_source(root: str, data: DataConfig, storage: StorageConfig | None = None) -> Source:
    root_uri = st.parse_uri(root)
    if root_uri.scheme == "file" and not os.path.isdir(root_uri.path):
        raise DataError(f"ImageFolder root {root_uri} is not a folder; set data.source to a folder of class folders or to fashion-mnist")
    entries = st.list_files(root_uri, storage)
    ignored: list[tuple[str, str]] = []
    visible = []
    for e in entries:
        parts = e.relpath.split("/")
        if any(p.startswith(".") for p in parts):
            continue  # hidden files/folders (.DS_Store, .git, our own temp files)
        if len(parts) == 1:
            ignored.append((e.relpath, "not inside a class folder"))
            continue
        visible.append((parts, e))
    if not visible:
        raise DataError(
            f"ImageFolder root {root_uri} holds no images in class folders; expected root/<class>/<image> "
            "or root/train/<class>/<image>"
        )

    top = {parts[0] for parts, _ in visible}
    split_mode = bool(top & set(SPLITS))
    if split_mode:
        stray = sorted(top - set(SPLITS))
        if stray:
            raise DataError(
                f"ImageFolder root {root_uri} mixes split folders with {stray[0]!r}/; use either "
                "root/{train,val,test}/<class>/ or root/<class>/, not both"
            )
        if "train" not in top:
            raise DataError(f"ImageFolder root {root_uri} has {'/'.join(sorted(top))}/ but no train/; add train/<class>/ folders")

    by_split: dict[str, list[tuple[str, str, st.FileEntry]]] = defaultdict(list)  # split -> (class, id, entry)
    for parts, e in visible:
        if split_mode:
            if len(parts) < 3:
                ignored.append((e.relpath, "not inside a class folder"))
                continue
            by_split[parts[0]].append((parts[1], e.relpath, e))
        else:
            by_split["train"].append((parts[0], e.relpath, e))

    classes = sorted({c for c, _, _ in by_split["train"]})
    for split in ("val", "test"):
        extra = sorted({c for c, _, _ in by_split.get(split, [])} - set(classes))
        if extra:
            raise DataError(
                f"class folder(s) {', '.join(repr(c) for c in extra)} in {root_uri}/{split}/ are not in train/; "
                "every class needs training images: add them to train/ or remove them"
            )
    index = {c: i for i, c in enumerate(classes)}
    items = [
        SourceItem(sid, split, index[cls], uri=e.uri, size=e.size)
        for split in SPLITS for cls, sid, e in sorted(by_split.get(split, []), key=lambda t: t[1])
    ]
    has = {s: bool(by_split.get(s)) for s in SPLITS}
    items = assign_splits(items, has, data.val_fraction, data.test_fraction, data.split_seed)

    fs = st.filesystem(root_uri, storage)
    cache = _ByteCache(budget=512 * 2**20)

    def reader(item: SourceItem) -> bytes:
        cached = cache.pop(item.source_id)
        return cached if cached is not None else st.read_bytes(item.uri, storage, fs=fs)

    content: dict[str, str] = {}
    digest = hashlib.sha256(b"imagefolder\n")
    for item, sha in zip(items, _hash_all(items, reader, cache, data.read_threads)):
        content[item.source_id] = sha
    for item in sorted(items, key=lambda i: i.source_id):  # digest independent of split order
        digest.update(f"{item.source_id}\t{content[item.source_id]}\n".encode())
    return Source("imagefolder", str(root_uri), classes, items, digest.hexdigest(), content, ignored, reader)


class _ByteCache:
    """Keeps bytes read while fingerprinting so the decode pass need not read them again."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.data: dict[str, bytes] = {}

    def offer(self, key: str, value: bytes) -> None:
        if self.used + len(value) <= self.budget:
            self.data[key] = value
            self.used += len(value)

    def pop(self, key: str) -> bytes | None:
        value = self.data.pop(key, None)
        if value is not None:
            self.used -= len(value)
        return value


def _hash_all(items: list[SourceItem], reader: Callable[[SourceItem], bytes], cache: _ByteCache,
              threads: int) -> Iterator[str]:
    def one(item: SourceItem) -> tuple[SourceItem, bytes]:
        return item, reader(item)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for item, data in pool.map(one, items):
            cache.offer(item.source_id, data)
            yield hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def assign_splits(items: list[SourceItem], has: dict[str, bool], val_fraction: float, test_fraction: float,
                  seed: int) -> list[SourceItem]:
    """Carve the missing ``val``/``test`` splits out of ``train``: per class, seeded, exact counts.

    For each class the training items (sorted by id) are permuted with ``default_rng([seed,
    label])``; the first ``round(n * test_fraction)`` become test (if the source has no test
    split), the next ``round(n * val_fraction)`` val (if it has no val split). The result is
    ordered by split, then by source id.
    """
    for name, frac in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name}={frac} must be in [0, 1)")
    carve_test = 0.0 if has.get("test") else test_fraction
    carve_val = 0.0 if has.get("val") else val_fraction
    if carve_test + carve_val >= 1.0:
        raise DataError(f"data.val_fraction + data.test_fraction = {carve_test + carve_val} leaves no training data; lower them")
    out = [i for i in items if i.split != "train"]
    by_label: dict[int, list[SourceItem]] = defaultdict(list)
    for item in items:
        if item.split == "train":
            by_label[item.label].append(item)
    for label, group in sorted(by_label.items()):
        group = sorted(group, key=lambda i: i.source_id)
        order = np.random.default_rng([seed, label]).permutation(len(group))
        n_test = round(len(group) * carve_test)
        n_val = round(len(group) * carve_val)
        for rank, idx in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            item = group[idx]
            out.append(item if split == "train" else SourceItem(item.source_id, split, item.label, item.pixels, item.uri, item.size))
    split_rank = {s: i for i, s in enumerate(SPLITS)}
    return sorted(out, key=lambda i: (split_rank[i.split], i.source_id))
