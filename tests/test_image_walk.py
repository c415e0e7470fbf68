"""One walk over a folder for images, and one mask lookup, for explain, evaluate and audit."""
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from onnxlrp.evaluation.evaluate import load_dataset
from onnxlrp.io.preprocessing import find_mask, image_sources, walk_images


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(path, format="PNG")


def _tree(root: Path, names: list[str]) -> Path:
    for name in names:
        _png(root / name)
    return root


LAYOUT = ["cat/a.png", "cat/sub/b.png", "cat/._a.png", "cat/.hidden/c.png", ".thumbs/d.png", "dog/e.jpg",
          "masks/cat/a.png", "masks/dog/e.png", "masks/cat/sub/b.png"]


def test_the_walk_is_recursive_and_skips_hidden_names_and_the_masks_folder(tmp_path):
    root = _tree(tmp_path / "data", LAYOUT)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert walk_images(root) == [PurePosixPath(p) for p in ("cat/a.png", "cat/sub/b.png", "dog/e.jpg")]
    # explain's folder expansion is the same walk: no masks, no resource forks
    assert [str(rel) for _, rel in image_sources([root])] == ["cat/a.png", "cat/sub/b.png", "dog/e.jpg"]


def test_evaluate_reads_class_folders_with_the_same_walk(tmp_path):
    root = _tree(tmp_path / "data", LAYOUT)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    data = load_dataset(root)
    assert data.classes == ["cat", "dog"]  # .thumbs is no class
    assert [f.relative_to(root).as_posix() for f in data.files] == ["cat/a.png", "cat/sub/b.png", "dog/e.jpg"]
    assert data.labels.tolist() == [0, 0, 1]


def test_one_mask_lookup_for_every_command(tmp_path):
    """masks/<the image's relative path>, or the same with .png for an image of another format
    (a JPEG's mask is a PNG); in the data folder's masks/ or in another folder (--masks)."""
    root = _tree(tmp_path / "data", LAYOUT)
    data = load_dataset(root)
    assert data.masks == [root / "masks/cat/a.png", root / "masks/cat/sub/b.png", root / "masks/dog/e.png"]
    assert [find_mask(f, root) for f in data.files] == data.masks
    elsewhere = _tree(tmp_path / "other", ["cat/a.png", "dog/e.png"])
    assert [find_mask(f, root, elsewhere) for f in data.files] == [elsewhere / "cat/a.png", None,
                                                                   elsewhere / "dog/e.png"]
    assert find_mask(tmp_path / "outside.png", root) is None
