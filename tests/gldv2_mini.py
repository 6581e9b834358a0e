"""A miniature Google Landmarks v2 release in the exact layout of the real one (tests only).

``build_release(root)`` writes::

    train/images_000.tar   a/b/c/<id>.jpg members, a directory entry, a README.txt, a corrupt JPEG
    train/images_001.tar   the same layout written with a ./ prefix, one image without a label row,
                           and a second copy of an id of images_000.tar
    test/images_000.tar    intact
    test/images_001.tar    truncated in the middle of a member's data
    index/images_000.tar   intact
    index/images_001.tar   tampered after its MD5 was taken (one byte of a member changed)
    md5sum/{train,test,index}/md5.images_00N.txt   "<md5>  images_00N.tar"
    train.csv              id,url,landmark_id (with two ids that no archive holds)
    train_clean.csv        landmark_id,images
    test.csv, index.csv    id
    index_image_to_landmark.csv   id,landmark_id
    recognition_solution_v2.1.csv id,landmarks,Usage
    retrieval_solution_v2.1.csv   id,images,Usage ("None" for an ignored query)

and returns a :class:`Release` saying what every file holds, so tests can derive each count.
Images are tiny (72 x 72 JPEGs) and each has its own colours and layout, so that embeddings of
different images differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 72
LANDMARKS = (101, 202, 303)


def image_id(name: str) -> str:
    """A GLDv2-like 16-hex-digit id for a readable name."""
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def tiny_jpeg(seed: int, side: int = SIDE) -> bytes:
    """A distinct small JPEG: a random 6 x 6 grid of colour cells (corners that a local-feature
    extractor finds even at 64 px), with mild noise."""
    rng = np.random.default_rng(seed)
    field = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    image = Image.fromarray(field, "RGB").resize((side, side), Image.NEAREST)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 4, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut in half: the normaliser rejects it (``truncated``)."""
    full = tiny_jpeg(999, 200)
    return full[: len(full) // 2]


def member_name(identifier: str, dot_prefix: bool = False) -> str:
    name = f"{identifier[0]}/{identifier[1]}/{identifier[2]}/{identifier}.jpg"
    return f"./{name}" if dot_prefix else name


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_directory(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def write_tar(path: Path, members: list[tuple[str, bytes | None]]) -> bytes:
    """Writes a tar of ``(name, bytes)`` files (``None``: a directory entry); returns its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if data is None:
                _add_directory(tar, name)
            else:
                _add_file(tar, name, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def member_data_offset(tar_bytes: bytes, name: str) -> int:
    """Byte offset of member ``name``'s data inside the tar."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return tar.getmember(name).offset_data


def write_md5(root: Path, split: str, archive: str, data: bytes) -> None:
    folder = root / "md5sum" / split
    folder.mkdir(parents=True, exist_ok=True)
    stem = archive[: -len(".tar")]
    (folder / f"md5.{stem}.txt").write_text(f"{hashlib.md5(data).hexdigest()}  {archive}\n")


@dataclasses.dataclass
class Release:
    """What the miniature release holds (ids are 16-hex-digit strings)."""

    root: Path
    train_labels: dict[str, int]  # every train.csv row: id -> landmark id
    train_in_archives: list[str]  # labelled ids with a decodable image in a train archive
    train_corrupt: str  # labelled id whose member is a corrupt JPEG
    train_missing: list[str]  # labelled ids in no archive
    train_unlabelled: str  # image in a train archive without a label row
    train_duplicate: str  # id present in both train archives
    clean: dict[int, list[str]]  # train_clean.csv: landmark id -> ids
    test_kept: list[str]  # test ids read before the damage
    test_cut: str  # test id whose member the truncation cut
    test_lost: list[str]  # test ids after the cut (never read)
    test_missing: str  # test.csv id in no archive
    index_kept: list[str]  # index ids of the intact archive
    index_refused: list[str]  # index ids of the tampered archive
    test_duplicates_of_index: dict[str, str]  # test id -> the index id with the same image


def build_release(root: Path) -> Release:
    root.mkdir(parents=True, exist_ok=True)
    seed = iter(range(1, 10_000))

    # --- train -----------------------------------------------------------------------------
    train_a = [image_id(f"train{n}") for n in range(6)]
    train_b = [image_id(f"train{n}") for n in range(6, 11)]
    corrupt = image_id("corrupt")
    unlabelled = image_id("train-unlabelled")
    missing = [image_id("missing-1"), image_id("missing-2")]
    members_a = [("a", None)] + [(member_name(i), tiny_jpeg(next(seed))) for i in train_a]
    members_a += [("README.txt", b"GLDv2 miniature\n"), (member_name(corrupt), corrupt_jpeg())]
    members_b = [(member_name(i, True), tiny_jpeg(next(seed))) for i in train_b]
    members_b += [(member_name(unlabelled, True), tiny_jpeg(next(seed))),
                  (member_name(train_a[0], True), tiny_jpeg(next(seed)))]  # second copy
    for archive, members in (("images_000.tar", members_a), ("images_001.tar", members_b)):
        data = write_tar(root / "train" / archive, members)
        write_md5(root, "train", archive, data)
    in_archives = train_a + train_b
    labels = {identifier: LANDMARKS[position % 3]
              for position, identifier in enumerate(in_archives + [corrupt] + missing)}
    lines = ["id,url,landmark_id"] + [
        f"{i},https://example.invalid/{i}.jpg,{labels[i]}" for i in labels]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    clean = {101: [train_a[0], train_a[3], train_b[0]], 202: [train_a[1], train_b[1]],
             303: [train_a[2]]}
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "".join(
        f"{landmark},{' '.join(ids)}\n" for landmark, ids in clean.items()))

    # --- index: one intact archive, one tampered after its MD5 was taken -------------------
    index_kept = [image_id(f"index{n}") for n in range(5)]
    index_refused = [image_id(f"index{n}") for n in range(5, 8)]
    index_images = {i: tiny_jpeg(next(seed)) for i in index_kept + index_refused}
    data = write_tar(root / "index" / "images_000.tar",
                     [(member_name(i), index_images[i]) for i in index_kept])
    write_md5(root, "index", "images_000.tar", data)
    data = write_tar(root / "index" / "images_001.tar",
                     [(member_name(i), index_images[i]) for i in index_refused])
    write_md5(root, "index", "images_001.tar", data)
    tampered = bytearray(data)
    tampered[member_data_offset(data, member_name(index_refused[1])) + 40] ^= 0xFF
    (root / "index" / "images_001.tar").write_bytes(bytes(tampered))
    (root / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in index_kept + index_refused))
    index_landmarks = {i: LANDMARKS[n % 3] for n, i in enumerate(index_kept + index_refused)}
    (root / "index_image_to_landmark.csv").write_text("id,landmark_id\n" + "".join(
        f"{i},{landmark}\n" for i, landmark in index_landmarks.items()))

    # --- test: the first two images are copies of index images; the second archive is cut ---
    test_a = [image_id(f"test{n}") for n in range(4)]
    test_b = [image_id(f"test{n}") for n in range(4, 8)]
    duplicates = {test_a[0]: index_kept[0], test_a[1]: index_kept[3]}
    test_images = {i: index_images[duplicates[i]] if i in duplicates else tiny_jpeg(next(seed))
                   for i in test_a + test_b}
    data = write_tar(root / "test" / "images_000.tar",
                     [(member_name(i), test_images[i]) for i in test_a])
    write_md5(root, "test", "images_000.tar", data)
    full = write_tar(root / "test" / "images_001.tar",
                     [(member_name(i), test_images[i]) for i in test_b])
    write_md5(root, "test", "images_001.tar", full)
    cut_at = member_data_offset(full, member_name(test_b[2])) + 100
    (root / "test" / "images_001.tar").write_bytes(full[:cut_at])
    test_missing = image_id("test-missing")
    (root / "test.csv").write_text("id\n" + "".join(
        f"{i}\n" for i in test_a + test_b + [test_missing]))

    # --- solutions ---------------------------------------------------------------------------
    kept_test = test_a + test_b[:2]
    usage = {i: ("Public" if n % 2 == 0 else "Private") for n, i in enumerate(kept_test)}
    recognition = ["id,landmarks,Usage"]
    for n, i in enumerate(kept_test):
        recognition.append(f"{i},{LANDMARKS[n % 3] if n % 4 != 3 else ''},{usage[i]}")
    (root / "recognition_solution_v2.1.csv").write_text("\n".join(recognition) + "\n")
    retrieval = ["id,images,Usage"]
    for n, i in enumerate(kept_test):
        if n == len(kept_test) - 1:
            retrieval.append(f"{i},None,Ignored")
        elif i in duplicates:
            retrieval.append(f"{i},{duplicates[i]} {index_kept[4]},{usage[i]}")
        else:
            retrieval.append(f"{i},{index_kept[n % 5]},{usage[i]}")
    (root / "retrieval_solution_v2.1.csv").write_text("\n".join(retrieval) + "\n")

    return Release(
        root=root, train_labels=labels, train_in_archives=in_archives, train_corrupt=corrupt,
        train_missing=missing, train_unlabelled=unlabelled, train_duplicate=train_a[0],
        clean=clean, test_kept=test_a + test_b[:2], test_cut=test_b[2], test_lost=[test_b[3]],
        test_missing=test_missing, index_kept=index_kept, index_refused=index_refused,
        test_duplicates_of_index=duplicates)


def main(argv: list[str] | None = None) -> int:
    """``python tests/gldv2_mini.py FOLDER``: writes the miniature release into FOLDER (for the
    guide docs/GLDV2.md, to try its commands before downloading the real release)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="gldv2_mini.py", description="Writes a miniature GLDv2 release (tests only).")
    parser.add_argument("folder", help="where to write it, e.g. gldv2")
    folder = Path(parser.parse_args(argv).folder)
    if folder.exists() and any(folder.iterdir()):
        parser.error(f"{folder} is not empty")
    release = build_release(folder)
    print(f"miniature GLDv2 release in {folder}: {len(release.train_labels)} train.csv rows, "
          f"{len(release.test_kept) + len(release.test_lost) + 2} test.csv rows, "
          f"{len(release.index_kept) + len(release.index_refused)} index.csv rows")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
