"""``landmarks-ingest --archives``: a miniature GLDv2 release (``gldv2_mini``) read as it ships.

One release is built per module and each split is ingested once through the CLI (module-scoped
fixtures, shared with test_gldv2_tasks.py's end-to-end run through the ``ingested`` helpers):
train from ``train.csv`` (with a dev split) and from ``train_clean.csv``, test archives (one
truncated) and index archives (one tampered, refused by ``--md5_dir``) as unlabelled splits.
Every count is derived from what the release holds, independently of the job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

import gldv2_mini
from beam_pipelines import io_utils
from beam_pipelines.ingest import archives, gldv2, normalise, pipeline, split
from beam_pipelines.ingest.manifest import ManifestRow, Rejection
from tfrecords_schema import InputError
from tfrecords_schema.image_record import read_records
from tfrecords_schema.label_map import LabelMap

RUNNER = "--runner=FnApiRunner"
COMMON = ["--max_side", "64", "--no_tfds_metadata", RUNNER]


def ingest(output: Path, *flags: str) -> tuple[int, dict]:
    """Runs ``landmarks-ingest`` through its CLI entry point: (exit code, stats.json)."""
    code = pipeline.main([*flags, "--output_dir", str(output), *COMMON])
    stats_path = output / "stats.json"
    return code, json.loads(stats_path.read_text()) if stats_path.exists() else {}


def rejected_rows(folder: Path) -> list[dict]:
    with open(folder / "rejected.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def records(folder: Path, split_name: str) -> dict:
    return {record.image_id: record
            for record in read_records(str(folder / f"{split_name}-*.tfrecord"))}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> gldv2_mini.Release:
    return gldv2_mini.build_release(tmp_path_factory.mktemp("gldv2") / "release")


@pytest.fixture(scope="module")
def runs(release, tmp_path_factory):
    """The four ingests of the release: ``{name: (folder, exit code, stats)}``."""
    root, out = release.root, tmp_path_factory.mktemp("ingested")
    flags = {
        "train": ["--archives", str(root / "train" / "images_*.tar"),
                  "--labels_csv", str(root / "train.csv"), "--dev_fraction", "0.3",
                  "--num_shards", "2"],
        "clean": ["--archives", str(root / "train" / "images_*.tar"),
                  "--labels_csv", str(root / "train_clean.csv"), "--md5_dir",
                  str(root / "md5sum" / "train")],
        "test": ["--archives", str(root / "test" / "images_*.tar"),
                 "--labels_csv", str(root / "test.csv"), "--num_shards", "1"],
        "index": ["--archives", str(root / "index" / "images_*.tar"),
                  "--labels_csv", str(root / "index.csv"), "--md5_dir",
                  str(root / "md5sum" / "index"), "--split_name", "index",
                  "--num_shards", "1"],
    }
    # The same train and (damaged) test ingests with each archive cut into 3 units of work.
    flags["train_parts"] = [*flags["train"], "--archive_parts", "3"]
    flags["test_parts"] = [*flags["test"], "--archive_parts", "3"]
    results = {}
    for name, run_flags in flags.items():
        code, stats = ingest(out / name, *run_flags)
        results[name] = (out / name, code, stats)
    return results


def test_train_csv_writes_every_decodable_labelled_image(release, runs):
    folder, code, stats = runs["train"]
    assert code == 0 and (folder / "_SUCCESS").exists()
    labels = release.train_labels
    # Rows in = written + rejected: every train.csv row once.
    assert stats["rows_in"] == len(labels) == 14
    assert (stats["written"], stats["rejected"], stats["balanced"]) == (11, 3, True)
    assert stats["input"] == "archives" and stats["labels_csv"]["kind"] == "train.csv"

    # The label map: every landmark id of a valid row, before any image was read (as a
    # manifest's), so the missing ids' landmarks are in it too.
    label_map = LabelMap.from_csv_text((folder / "label_map.csv").read_text())
    assert label_map.landmark_ids == tuple(sorted(set(labels.values())))

    written = {**records(folder, "train"), **records(folder, "dev")}
    assert set(written) == set(release.train_in_archives)  # both archives, ./ prefix included
    for image_id, record in written.items():
        assert record.landmark_id == labels[image_id]
        assert record.label == label_map.class_index(labels[image_id])
        assert max(record.height, record.width) <= 64
    # The dev split: per class, by hash of the id, like a manifest's.
    expected_dev = set()
    for landmark in set(labels.values()):
        members = [i for i in release.train_in_archives + [release.train_corrupt]
                   + release.train_missing if labels[i] == landmark]
        expected_dev |= split.dev_ids(members, 0.3)
    assert set(records(folder, "dev")) == expected_dev & set(written)
    assert stats["written_per_split"] == {"dev": len(expected_dev & set(written)),
                                          "train": 11 - len(expected_dev & set(written))}

    rejected = {row["id"]: row for row in rejected_rows(folder)}
    assert set(rejected) == {release.train_corrupt, *release.train_missing}
    assert rejected[release.train_corrupt]["reason"] in normalise.REASONS
    assert rejected[release.train_corrupt]["url"].endswith(
        f"images_000.tar:{gldv2_mini.member_name(release.train_corrupt)}")
    for image_id in release.train_missing:
        assert rejected[image_id]["reason"] == "not_in_archives"
    lines = {image_id: position for position, image_id in enumerate(labels, start=2)}
    assert {i: int(row["line"]) for i, row in rejected.items()} == {i: lines[i] for i in rejected}
    assert stats["rejected_per_reason"] == {rejected[release.train_corrupt]["reason"]: 1,
                                            "not_in_archives": 2}

    # Members that no row asked for are counted by kind, not rejected.
    assert stats["archives"]["members"] == {
        "images": 14,  # 12 labelled + 1 without a row + 1 second copy
        "directories": 1, "non_image_files": 1, "unsafe_names": 0,
        "links_and_special_files": 0, "used": 12, "without_label_row": 1, "duplicate_ids": 1}
    assert stats["archives"]["members_balanced"] is True
    assert (stats["archives"]["archives"], stats["archives"]["read_whole"]) == (2, 2)
    assert stats["archives"]["damaged"] == stats["archives"]["checksum_mismatch"] == []


def test_train_clean_csv_writes_exactly_the_listed_images(release, runs):
    folder, code, stats = runs["clean"]
    assert code == 0 and stats["labels_csv"]["kind"] == "train_clean.csv"
    listed = {image_id: landmark for landmark, ids in release.clean.items() for image_id in ids}
    assert (stats["rows_in"], stats["written"], stats["rejected"]) == (len(listed), 6, 0)
    written = records(folder, "train")
    assert {i: r.landmark_id for i, r in written.items()} == listed
    assert LabelMap.from_csv_text((folder / "label_map.csv").read_text()).landmark_ids == (
        101, 202, 303)
    # 14 image members: 6 listed, the second copy of one of them, 7 without a row (--md5_dir
    # checked both archives: they match).
    members = stats["archives"]["members"]
    assert (members["used"], members["duplicate_ids"], members["without_label_row"]) == (6, 1, 7)
    assert stats["archives"]["checksum_mismatch"] == []
    # Only the members a label row asks for were decoded: the second copy of one of them was
    # not, nor were the 7 others (the filter of labelled ids left them out of the listing).
    assert stats["counters"]["archive_images_decoded"] == 6


def test_truncated_test_archive_keeps_what_was_read_and_rejects_the_rest(release, runs):
    folder, code, stats = runs["test"]
    assert code == 0 and stats["labelled"] is False
    written = records(folder, "test")
    assert set(written) == set(release.test_kept)
    assert {record.label for record in written.values()} == {-1}
    assert stats["written_per_split"] == {"test": len(release.test_kept)}
    rejected = {row["id"]: row for row in rejected_rows(folder)}
    # The member cut short, the one after it and the id of no archive: a tar has no index, so
    # an id not found while an archive is damaged may have been in its unread part.
    assert set(rejected) == {release.test_cut, *release.test_lost, release.test_missing}
    assert {row["reason"] for row in rejected.values()} == {"archive_damaged"}
    assert "cut short" in rejected[release.test_cut]["detail"]
    assert "could not be read to the end" in rejected[release.test_missing]["detail"]
    assert stats["rows_in"] == len(release.test_kept) + 3 == stats["written"] + stats["rejected"]
    (damaged,) = stats["archives"]["damaged"]
    assert damaged["archive"] == "images_001.tar" and damaged["members_read"] == 2


def test_tampered_index_archive_is_refused_and_the_other_ingested(release, runs):
    folder, code, stats = runs["index"]
    assert code == 0
    assert set(records(folder, "index")) == set(release.index_kept)
    rejected = {row["id"]: row["reason"] for row in rejected_rows(folder)}
    assert rejected == {image_id: "checksum_mismatch" for image_id in release.index_refused}
    (refused,) = stats["archives"]["checksum_mismatch"]
    assert refused["archive"] == "images_001.tar" and refused["image_names_listed"] == 3
    assert stats["archives"]["members"]["images"] == len(release.index_kept)  # refused: unread
    assert stats["shards_per_split"] == {"index": 1}


def test_md5_of_a_truncated_archive_refuses_it_in_the_listing_pass(release, tmp_path):
    """The MD5 is computed in the same stream that lists the members: the cut test archive
    does not match, so none of its members is used, and the ids whose names could still be
    listed (the cut one included) are checksum_mismatch; the intact archive is used."""
    root = release.root
    code, stats = ingest(tmp_path / "out", "--archives", str(root / "test" / "images_*.tar"),
                         "--labels_csv", str(root / "test.csv"), "--md5_dir",
                         str(root / "md5sum" / "test"), "--max_rejected_fraction", "0.9")
    assert code == 0
    written = set(records(tmp_path / "out", "test"))
    listed_in_cut = [i for i in release.test_kept if i not in written] + [release.test_cut]
    assert written == set(release.test_kept) - set(listed_in_cut) and len(listed_in_cut) == 3
    rejected = {row["id"]: row["reason"] for row in rejected_rows(tmp_path / "out")}
    assert rejected == {**{i: "checksum_mismatch" for i in listed_in_cut},
                        **{i: "archive_damaged" for i in
                           [*release.test_lost, release.test_missing]}}
    (refused,) = stats["archives"]["checksum_mismatch"]
    assert refused["archive"] == "images_001.tar" and refused["image_names_listed"] == 3
    (damaged,) = stats["archives"]["damaged"]
    assert damaged["archive"] == "images_001.tar" and damaged["members_read"] == 0
    assert stats["archives"]["members"]["images"] == len(written)  # refused: not counted
    assert stats["counters"]["archive_images_decoded"] == len(written)


def test_too_many_rejected_rows_fail_the_run(release, tmp_path, capsys):
    # Only the tampered index archive: every row rejected -> exit code 4, no _SUCCESS.
    root = release.root
    code, stats = ingest(tmp_path / "out", "--archives", str(root / "index" / "images_001.tar"),
                         "--labels_csv", str(root / "index.csv"), "--md5_dir",
                         str(root / "md5sum" / "index"))
    assert code == pipeline.EXIT_INCOMPLETE and stats["status"] == "failed"
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert "checksum_mismatch" in capsys.readouterr().err


def test_bad_archive_flags_are_one_line_errors(release, tmp_path, capsys):
    root = release.root
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("image,landmark\nx,1\n")
    cases = [
        (["--archives", str(root / "train" / "*.tar"), "--labels_csv", str(bad_labels)],
         "none of GLDv2's label files"),
        (["--archives", str(root / "train" / "*.tar")], "--archives needs --labels_csv"),
        (["--manifest", str(root / "train.csv"), "--labels_csv", str(root / "train.csv")],
         "--labels_csv goes with --archives"),
        (["--archives", str(tmp_path / "none*.tar"), "--labels_csv", str(root / "test.csv")],
         "no files match --archives"),
        (["--archives", str(root / "train" / "*.tar"), "--labels_csv", str(root / "train.csv"),
          "--md5_dir", str(root / "md5sum")], "lacks the MD5 file"),
        (["--archives", str(root / "test" / "*.tar"), "--labels_csv", str(root / "test.csv"),
          "--dev_fraction", "0.1"], "--dev_fraction needs labels"),
    ]
    for flags, message in cases:
        assert pipeline.main([*flags, "--output_dir", str(tmp_path / "o"), RUNNER]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("landmarks-ingest: error:") and "\n" not in error
        assert message in error, error
    assert not (tmp_path / "o").exists()


def test_gcs_archives_and_labels_on_the_emulator(release, gcs_emulator):
    root = release.root
    for name in ("images_000.tar", "images_001.tar"):
        gcs_emulator.upload(f"gldv2/train/{name}", (root / "train" / name).read_bytes())
        md5_name = f"md5.{name[:-4]}.txt"
        gcs_emulator.upload(f"gldv2/md5sum/train/{md5_name}",
                            (root / "md5sum" / "train" / md5_name).read_text())
    labels = gcs_emulator.upload("gldv2/train_clean.csv", (root / "train_clean.csv").read_text())
    # With --md5_dir the listing streams every byte (for the MD5); without, it seeks over the
    # data of the objects. Either way the members are then read back by offset.
    md5_flags = ["--md5_dir", gcs_emulator.path("gldv2/md5sum/train")]
    for name, extra in (("md5", md5_flags), ("seek", [])):
        out = gcs_emulator.path(f"runs/clean_{name}")
        stats = pipeline.run(["--archives", gcs_emulator.path("gldv2/train/images_*.tar"),
                              "--labels_csv", labels, *extra,
                              "--output_dir", out, "--num_shards", "1", *COMMON])
        assert (stats["rows_in"], stats["written"], stats["rejected"]) == (6, 6, 0), name
        assert stats["archives"]["read_whole"] == 2
        assert io_utils.has_success_marker(out)


# ---- the pure parts -------------------------------------------------------------------------


def test_label_headers_are_recognised_in_any_column_order():
    assert gldv2.parse_labels_header("id,url,landmark_id").kind == gldv2.KIND_TRAIN
    assert gldv2.parse_labels_header("images,landmark_id").kind == gldv2.KIND_CLEAN
    assert gldv2.parse_labels_header("\ufeffid,landmark_id").kind == gldv2.KIND_ID_TO_LANDMARK
    unlabelled = gldv2.parse_labels_header("id")
    assert unlabelled.kind == gldv2.KIND_IDS and not unlabelled.labelled
    for bad in ("id,landmark_id,extra", "id,id", "landmark_id", ""):
        with pytest.raises(InputError):
            gldv2.parse_labels_header(bad)


def test_label_lines_give_one_row_per_image():
    clean = gldv2.parse_labels_header("landmark_id,images")
    rows = gldv2.parse_labels_line("7,aa bb  cc", 3, clean)
    assert [(r.image_id, r.landmark_id, r.line) for r in rows] == [
        ("aa", 7, 3), ("bb", 7, 3), ("cc", 7, 3)]
    assert [(r.image_id, r.reason) for r in gldv2.parse_labels_line("x,aa bb", 4, clean)] == [
        ("aa", "bad_label"), ("bb", "bad_label")]
    assert [r.reason for r in gldv2.parse_labels_line("7,", 5, clean)] == ["empty_id"]
    train = gldv2.parse_labels_header("id,url,landmark_id")
    (row,) = gldv2.parse_labels_line("ab12,http://x/y.jpg,5", 2, train)
    assert isinstance(row, ManifestRow) and (row.image_id, row.landmark_id, row.url) == (
        "ab12", 5, "")
    assert gldv2.parse_labels_line("../x,u,5", 2, train)[0].reason == "unsafe_id"
    assert gldv2.parse_labels_line("ab,u,-1", 2, train)[0].reason == "bad_label"
    assert gldv2.parse_labels_line("ab,u", 2, train)[0].reason == "missing_column"
    (test_row,) = gldv2.parse_labels_line("ab12", 2, gldv2.parse_labels_header("id"))
    assert test_row.unlabelled and test_row.landmark_id == -1
    assert isinstance(gldv2.parse_labels_line('"ab', 2, train)[0], Rejection)


def test_member_names_md5_files_and_reasons():
    assert gldv2.member_kind_and_id("a/b/c/abc123.jpg") == (gldv2.MEMBER_IMAGE, "abc123")
    assert gldv2.member_kind_and_id("./a/b/c/abc123.JPG") == (gldv2.MEMBER_IMAGE, "abc123")
    assert gldv2.member_kind_and_id("abc123.jpg") == (gldv2.MEMBER_IMAGE, "abc123")
    assert gldv2.member_kind_and_id("a/README.txt")[0] == gldv2.MEMBER_NON_IMAGE
    assert gldv2.member_kind_and_id("a/b/c/._abc123.jpg")[0] == gldv2.MEMBER_UNSAFE_NAME
    assert gldv2.md5_file_name("gs://b/train/images_007.tar") == "md5.images_007.txt"
    digest = hashlib.md5(b"x").hexdigest()
    assert gldv2.parse_md5_file(f"{digest.upper()}  images_007.tar\n",
                                "/d/images_007.tar") == digest
    assert gldv2.parse_md5_file(f"{digest} *images_007.tar", "images_007.tar") == digest
    for text in (f"{digest}  images_008.tar", "nonsense", f"{digest}  a\n{digest}  b"):
        with pytest.raises(ValueError):
            gldv2.parse_md5_file(text, "images_007.tar")
    assert gldv2.unseen_reason([], [], [])[0] == "not_in_archives"
    assert gldv2.unseen_reason([], [], ["x.tar: cut"])[0] == "archive_damaged"
    assert gldv2.unseen_reason(["x.tar"], [], ["y.tar: cut"])[0] == "checksum_mismatch"


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read(data: bytes, seekable: bool = False, read_data: bool = True) -> tuple[list[str], str]:
    """The member names of a tar's bytes read by ``iter_members``, and its damage ('' if none);
    a member cut short is named ``cut:<name>`` after the others."""
    names = []
    every_member = (lambda _index, _image_id: True) if read_data else archives._read_none
    try:
        for member in archives.iter_members(io.BytesIO(data), every_member, 1 << 20,
                                            seekable=seekable):
            names.append(member.name)
    except archives.ArchiveDamaged as damage:
        if damage.cut is not None:
            names.append(f"cut:{damage.cut[1]}")
        return names, damage.detail
    return names, ""


@pytest.mark.parametrize("seekable,read_data", [(False, True), (False, False), (True, False)],
                         ids=["stream-with-data", "stream-headers-only", "seek-headers-only"])
def test_damage_is_detected_wherever_the_archive_breaks(seekable, read_data):
    """Pass 1 reads headers only (seeking over the data, or streaming it for an MD5); a member
    whose data the end of the file cut short is found by its offset, as when its data is read."""
    whole = _tar([("a/x1.jpg", b"1" * 700), ("a/x2.jpg", b"2" * 700), ("a/x3.jpg", b"3" * 10)])

    def read(data: bytes) -> tuple[list[str], str]:
        return _read(data, seekable=seekable, read_data=read_data)

    assert read(whole) == (["a/x1.jpg", "a/x2.jpg", "a/x3.jpg"], "")
    # Cut exactly after the second member: tarfile alone would end quietly; no end block.
    second_end = 512 + 1024 + 512 + 1024
    names, detail = read(whole[:second_end])
    assert names == ["a/x1.jpg", "a/x2.jpg"] and "end-of-archive" in detail
    # Cut inside the second member's data (and inside its padding: the data is whole).
    names, detail = read(whole[:512 + 1024 + 512 + 100])
    assert names == ["a/x1.jpg", "cut:a/x2.jpg"] and "cut short" in detail
    assert read(whole[:512 + 1024 + 512 + 800])[0] == ["a/x1.jpg", "a/x2.jpg"]
    # A corrupt third header.
    corrupt = bytearray(whole)
    corrupt[second_end + 100:second_end + 140] = b"\x07" * 40
    names, detail = read(bytes(corrupt))
    assert names == ["a/x1.jpg", "a/x2.jpg"] and detail
    assert read(b"not a tar at all" * 64)[1]


def test_listing_holds_one_header_at_a_time():
    """tarfile keeps every header it reads (``TarFile.members``): 8k per GLDv2 archive, and
    without bound for a larger tar. The listing drops each one once read, so its memory does
    not grow with the member count (tarfile alone: a 9.2 MB peak for these 20,000 headers)."""
    import tracemalloc

    data = _tar([(f"a/b/c/{n:016x}.jpg", b"") for n in range(20_000)])
    for seekable in (True, False):
        tracemalloc.start()
        count = sum(1 for _ in archives.iter_members(io.BytesIO(data), seekable=seekable))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == 20_000 and peak < 2_000_000, (seekable, peak)


def test_members_read_again_by_offset_are_the_archived_bytes(tmp_path):
    """Pass 2 reads a member with one seek and one read at the offset pass 1 listed; in a
    compressed archive (no offsets) by its index in one stream. Too large: no data; a file
    that shrank since the listing: that member and the later ones get the problem."""
    import gzip

    payloads = [(f"a/b/c/{n:016x}.jpg", bytes([n]) * (300 + 97 * n)) for n in range(6)]
    plain = tmp_path / "plain.tar"
    plain.write_bytes(_tar(payloads))
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(_tar(payloads)))
    members = list(archives.iter_members(io.BytesIO(plain.read_bytes()), seekable=True))
    assert [member.offset for member in members] == [
        member.offset for member in archives.iter_members(io.BytesIO(plain.read_bytes()))]
    wanted = [(m.offset, m.size, m.index) for m in members if m.index in (1, 3, 4)]
    got = list(archives.read_unit_members(str(plain), wanted, max_bytes=500))
    assert got == [(0, payloads[1][1], ""), (1, None, ""), (2, None, "")]  # 3, 4: > 500 bytes
    got = list(archives.read_unit_members(str(plain), wanted, max_bytes=1 << 20))
    assert [data for _, data, _ in got] == [payloads[i][1] for i in (1, 3, 4)]

    compressed = [m for m in archives.iter_members(io.BytesIO(packed.read_bytes()))]
    assert {member.offset for member in compressed} == {-1}
    wanted = [(-1, m.size, m.index) for m in compressed if m.index in (0, 5)]
    got = list(archives.read_unit_members(str(packed), wanted, max_bytes=1 << 20))
    assert [(position, data) for position, data, _ in got] == [
        (0, payloads[0][1]), (1, payloads[5][1])]

    wanted = [(m.offset, m.size, m.index) for m in members if m.index in (2, 5)]
    plain.write_bytes(plain.read_bytes()[:members[5].offset + 10])
    got = list(archives.read_unit_members(str(plain), wanted, max_bytes=1 << 20))
    assert got[0] == (0, payloads[2][1], "")
    assert got[1][:2] == (1, None) and "cut short when read again" in got[1][2]
    assert list(archives.read_unit_members(str(tmp_path / "gone.tar"), wanted, 1 << 20))[0][2]


# ---- both GLDv2 tasks, end to end -----------------------------------------------------------


def reference_gap(predictions: dict, solution: dict) -> float:
    """GAP written out again: predictions sorted by score (ties by id), precision at each
    correct one, summed over the images that show a landmark."""
    ranked = sorted(((score, image_id, label) for image_id, (label, score) in predictions.items()),
                    key=lambda row: (-row[0], row[1]))
    correct, total = 0, 0.0
    for rank, (_, image_id, label) in enumerate(ranked, start=1):
        if label in solution[image_id]:
            correct += 1
            total += correct / rank
    return total / sum(1 for labels in solution.values() if labels)


@pytest.mark.slow
def test_predict_writes_both_tasks_and_evaluate_scores_them(release, runs, demo_run, tmp_path):
    """The demo's trained model (fixture ``demo_run``) on the release's test archives, with the
    index archives as the retrieval index; then both scores of ``landmarks-evaluate``."""
    import shutil

    from beam_pipelines import evaluate
    from beam_pipelines.predict import pipeline as predict
    from rescoring import retrieval_metrics, submission
    from test_retrieval_metrics import reference_ap

    assert demo_run.exit_code == 0
    demo = Path(demo_run.run_dir)
    features = tmp_path / "reference_features"  # a copy: the shared cache stays untouched
    shutil.copytree(demo / "reference_features", features)
    out = tmp_path / "predict"
    test_folder, index_folder = runs["test"][0], runs["index"][0]
    code = predict.main([
        "--model", str(demo / "model" / "model.keras"),
        "--test_data", str(test_folder / "test-*.tfrecord"),
        "--reference_data", str(demo / "ingest_train" / "train-*.tfrecord"),
        "--reference_features", str(features), "--output_dir", str(out),
        "--recognizer", "knn", "--crops", "1",
        "--retrieval_index", str(index_folder / "index-*.tfrecord"), RUNNER])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    queries = len(release.test_kept)
    assert stats["retrieval_task"] == {"index_images": len(release.index_kept),
                                       "queries": queries, "rows": queries, "k": 100}

    # retrieval.csv: every test image, the whole index (5 < 100) nearest first; a test image
    # that is a copy of an index image finds that image first.
    retrieved = retrieval_metrics.parse_predictions((out / "retrieval.csv").read_text())
    assert set(retrieved) == set(release.test_kept)
    for test_id, ids in retrieved.items():
        assert sorted(ids) == sorted(release.index_kept), test_id
    for test_id, index_id in release.test_duplicates_of_index.items():
        assert retrieved[test_id][0] == index_id

    # A recognition solution where some predictions are right: even positions get the
    # predicted landmark as truth, odd ones another landmark, the last none.
    predictions = submission.parse_submission((out / "submission.csv").read_text())
    assert set(predictions) == set(release.test_kept)
    truth, usage = {}, {}
    for position, test_id in enumerate(release.test_kept):
        predicted = predictions[test_id][0] if predictions[test_id] else 1
        truth[test_id] = ([predicted] if position % 2 == 0 else [predicted + 1000]
                          ) if position < queries - 1 else []
        usage[test_id] = "Public" if position % 3 else "Private"
    solution_path = tmp_path / "recognition_solution_v2.1.csv"
    solution_path.write_text("id,landmarks,Usage\n" + "".join(
        f"{i},{' '.join(map(str, truth[i]))},{usage[i]}\n" for i in release.test_kept))

    root = release.root
    assert evaluate.main([
        "--submission", str(out / "submission.csv"), "--solution", str(solution_path),
        "--retrieval", str(out / "retrieval.csv"),
        "--retrieval_solution", str(root / "retrieval_solution_v2.1.csv"),
        "--output_dir", str(tmp_path / "evaluation")]) == 0
    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    scored = {i: p for i, p in predictions.items() if p is not None}
    assert report["gap"] == pytest.approx(reference_gap(scored, truth))
    for usage_name in ("Public", "Private"):
        subset = {i: t for i, t in truth.items() if usage[i] == usage_name}
        assert report["by_usage"][usage_name]["gap"] == pytest.approx(reference_gap(
            {i: p for i, p in scored.items() if i in subset}, subset))

    relevant, retrieval_usage = retrieval_metrics.parse_solution(
        (root / "retrieval_solution_v2.1.csv").read_text())
    assert report["retrieval"]["counts"]["ignored_queries"] == 1
    for usage_name, part in [("all", report["retrieval"]),
                             *report["retrieval"]["by_usage"].items()]:
        queries_of = [q for q in relevant if usage_name in ("all", retrieval_usage[q])]
        expected = sum(reference_ap(retrieved.get(q, []), relevant[q], 100)
                       for q in queries_of) / len(queries_of)
        assert part["map_at_100"] == pytest.approx(expected)
    assert set(report["retrieval"]["by_usage"]) == {"Public", "Private"}
    # The copies found first: those two queries score at least 1/2 each (relevant: 2 images).
    assert report["retrieval"]["map_at_100"] > 0


def test_retrieval_index_needs_a_knn_recognizer(tmp_path, capsys):
    from beam_pipelines.predict import pipeline as predict

    flags = ["--model", str(tmp_path / "m.keras"), "--test_data", "t-*", "--reference_data",
             "r-*", "--output_dir", str(tmp_path / "o"), "--retrieval_index", "i-*", RUNNER]
    assert predict.main(flags) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("landmarks-predict: error: --retrieval_index needs --recognizer knn or "
                     "knn+classifier (the index is searched with their --embedding)")
    assert predict.main([*flags, "--recognizer", "knn"]) == 2  # then: no test files match
    assert "no test files match" in capsys.readouterr().err


def _outcome(folder: Path, stats: dict) -> tuple:
    """What a run wrote and rejected, and its counts, without timings."""
    shards = {}
    for split_name in stats["written_per_split"]:
        shards[split_name] = {image_id: (record.label, record.jpeg_bytes)
                              for image_id, record in records(folder, split_name).items()}
    rejected = sorted((row["id"], row["reason"], row["detail"]) for row in rejected_rows(folder))
    counts = {key: stats[key] for key in ("rows_in", "written", "rejected", "rejected_per_reason",
                                          "written_per_split", "class_histogram", "archives")}
    return shards, rejected, counts, stats["counters"]["archive_images_decoded"]


@pytest.mark.parametrize("name", ["train", "test"])
def test_archives_cut_into_parts_give_the_same_records_rejections_and_counts(runs, name):
    one_part, three_parts = runs[name], runs[f"{name}_parts"]
    assert one_part[1] == three_parts[1] == 0
    whole = _outcome(one_part[0], one_part[2])
    assert whole[0] and whole[3] > 0  # something written and decoded
    assert _outcome(three_parts[0], three_parts[2]) == whole


def test_parts_units_and_the_runners_worker_count():
    assert [archives.parts_per_archive(a, 8) for a in (1, 3, 8, 500)] == [8, 3, 1, 1]
    assert archives.parts_per_archive(20, 0) == 1
    options = pipeline.PipelineOptions
    assert pipeline.runner_workers(options(["--direct_num_workers=3"])) == 3
    assert pipeline.runner_workers(options([])) == 1
    assert pipeline.runner_workers(options(["--runner=DataflowRunner",
                                            "--max_num_workers=40"])) == 40
    assert pipeline.runner_workers(options(["--runner=DataflowRunner"])) == 1

    def member(index: int, offset: int) -> archives.Member:
        return archives.Member(index, "x.jpg", gldv2.MEMBER_IMAGE, "x", 10, offset, None)

    # Contiguous byte ranges of the archive; a block of members bounds each unit.
    assert [archives.unit_of(member(i, offset), 3000, 3)[0]
            for i, offset in enumerate((512, 999, 1000, 2999, 3100))] == [0, 0, 1, 2, 2]
    per_unit = archives.MEMBERS_PER_UNIT
    assert archives.unit_of(member(per_unit, 512), 3000, 1) == (0, 1)
    assert archives.unit_of(member(per_unit * 2 + 5, -1), 3000, 3) == (0, 2)  # compressed


def test_match_ids_decides_each_id_from_its_row_members_and_the_archives_outcomes():
    outcomes = archives.archive_outcomes([
        archives.ArchiveEvent(archives.EVENT_READ, "d/a.tar"),
        archives.ArchiveEvent(archives.EVENT_REFUSED, "d/r.tar", "MD5 x != y",
                              (("image_names_listed", 4),)),
        archives.ArchiveEvent(archives.EVENT_DAMAGED, "d/c.tar", "cut at 3",
                              (("images", 2),))])
    assert outcomes.refused == {"d/r.tar": "r.tar"} and outcomes.incomplete == (
        "c.tar: cut at 3",)

    def row(image_id: str):
        return archives.LabelledRow(ManifestRow(image_id=image_id, url="", landmark_id=1,
                                                line=7), 0, "train")

    def member(archive: str, index: int):
        return ("members", (archive, index, f"x/{index}.jpg", 512 * index, 99, (0, 0)))

    def decide(image_id: str, values: list) -> list:
        outputs = archives.MatchIds().process((image_id, values), outcomes)
        return [(getattr(o, "tag", "main"), getattr(o, "value", o)) for o in outputs]

    # The first copy (smallest (archive, index)) gets the row; the other is a duplicate; a copy
    # in a refused archive is not used.
    (main, duplicate) = decide("A", [member("d/c.tar", 1), ("rows", row("A")),
                                     member("d/a.tar", 5), member("d/r.tar", 0)])
    assert main[0] == "main" and main[1][0] == ("d/a.tar", (0, 0))
    offset, size, index, labelled = main[1][1]
    assert (offset, size, index, labelled.row.url) == (2560, 99, 5, "d/a.tar:x/5.jpg")
    assert duplicate == (archives.TAG_KINDS, archives.KIND_DUPLICATE)
    # Only in a refused archive (listed or cut short there): checksum_mismatch.
    for values in ([member("d/r.tar", 2)], [("cut", ("d/r.tar", "r.tar: cut"))]):
        ((tag, rejection),) = decide("B", [("rows", row("B")), *values])
        assert (tag, rejection.reason, rejection.line) == ("rejected", "checksum_mismatch", 7)
    # Cut short in an archive not refused; in no archive while one is incomplete.
    ((_, rejection),) = decide("C", [("rows", row("C")), ("cut", ("d/c.tar", "c.tar: cut"))])
    assert rejection.reason == "archive_damaged" and "cut short" in rejection.detail
    ((_, rejection),) = decide("D", [("rows", row("D"))])
    assert rejection.reason == "archive_damaged" and "c.tar: cut at 3" in rejection.detail
    # A member without a row (a false positive of the filter of labelled ids): counted.
    assert decide("E", [member("d/a.tar", 9)]) == [
        (archives.TAG_KINDS, archives.KIND_WITHOUT_LABEL_ROW)]


def test_a_listed_member_that_cannot_be_read_again_is_a_rejected_row(tmp_path):
    """Pass 1 listed the member (so it has a decision) but the archive changed before pass 2
    read it: the row is rejected archive_damaged, not lost."""
    archive = tmp_path / "images_000.tar"
    archive.write_bytes(_tar([("0/1/2/0123456789abcdef.jpg", b"x" * 900)]))
    row = ManifestRow(image_id="0123456789abcdef", url=f"{archive}:0/1/2/0123456789abcdef.jpg",
                      landmark_id=7, line=2)
    decision = (512, 900, 0, archives.LabelledRow(row, 0, "train"))
    archive.write_bytes(archive.read_bytes()[:800])
    fn = archives.DecodeUnit(1 << 20, normalise.NormaliseParams())
    fn.setup()
    used, tagged = fn.process(((str(archive), (0, 0)), [decision]))
    assert (used.tag, used.value) == (archives.TAG_KINDS, (archives.KIND_USED, 1))
    assert tagged.tag == "rejected"
    rejection = tagged.value
    assert (rejection.image_id, rejection.reason) == (row.image_id, "archive_damaged")
    assert "cut short when read again" in rejection.detail
