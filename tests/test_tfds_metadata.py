"""The ingest folder is also a TensorFlow Datasets dataset (issue 5)."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from beam_pipelines.ingest import pipeline as ingest
from tfrecords_schema import label_map


def _photo(path, seed, size=(60, 40)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def test_builder_from_directory_reads_ingested_shards(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["id,url,landmark_id"]
    for index in range(10):
        _photo(images / f"{index}.jpg", index)
        rows.append(f"img{index},images/{index}.jpg,{(index % 2) * 40 + 7}")
    rows.append("broken,images/missing.jpg,7")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    output = tmp_path / "out"
    stats = ingest.run([
        "--manifest", str(tmp_path / "train.csv"), "--output_dir", str(output),
        "--dev_fraction", "0.2", "--num_shards", "2", "--runner=FnApiRunner",
    ])
    assert stats["written"] == 10 and stats["rejected"] == 1

    builder = tfds.builder_from_directory(str(output))
    assert builder.info.splits["train"].num_examples + builder.info.splits["dev"].num_examples == 10
    labels = label_map.LabelMap.from_csv_text((output / "label_map.csv").read_text())
    seen = {}
    for split in ("train", "dev"):
        for example in tfds.as_numpy(builder.as_dataset(split=split)):
            image = example["image"]
            seen[image["id"].decode()] = image
    assert sorted(seen) == [f"img{index}" for index in range(10)]
    for image_id, image in seen.items():
        index = int(image_id[3:])
        assert image["encoded"].dtype == np.uint8 and image["encoded"].shape == (40, 60, 3)
        assert (image["height"], image["width"]) == (40, 60)
        assert image["class"]["landmark_id"] == (index % 2) * 40 + 7
        assert image["class"]["label"] == labels.class_index(image["class"]["landmark_id"])
        # The decoded pixels are the stored JPEG's (compare with Pillow on the original file).
        original = np.asarray(Image.open(tmp_path / "images" / f"{index}.jpg").convert("RGB"))
        assert np.abs(image["encoded"].astype(int) - original.astype(int)).mean() < 12
