"""Packaging for the landmark-recognition framework.

Also Dataflow's ``--setup_file``: the workers build this package and install it, so the four
packages reach them with the same dependencies as the launcher.
"""

import setuptools

INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<4",
    "tensorboard>=2.20",
    "apache-beam[gcp]>=2.77,<3",
    "tensorflow-hub>=0.16",
    "tensorflow-datasets>=4.9.10",
    "scikit-image>=0.26",
    "scipy>=1.11",  # ROxford/RParis .mat ground truth (scikit-image brings it too)
    "opencv-python-headless>=4.10",
    "pandas>=2.2",
    "numpy>=1.26",
    "Pillow>=11",
    "google-cloud-storage>=2.18",
    "google-crc32c>=1.5",  # TFRecord frame checksums (beam_pipelines/query/records.py)
    "matplotlib>=3.9",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.5",  # `make test` runs the suite in 2 worker processes
    "gcp-storage-emulator>=2024.8",
]

# Approximate nearest-neighbour search (rescoring.ann, the retrieval job's flag); exact search
# needs numpy only. `make test` / `make bench` install it.
ANN_REQUIRES = ["faiss-cpu>=1.9"]

# Benchmarks only: BLAS thread limits for per-core figures (bench/bench_knn_*.py); process-tree
# memory of the scale ladder (bench/bench_scale.py).
BENCH_REQUIRES = ["threadpoolctl>=3.5", "psutil>=5.9"]

setuptools.setup(
    name="landmarks",
    version="0.1.0",
    description=(
        "Landmark recognition at scale: Beam ingestion to TFRecords, Xception+GeM training on "
        "tf.distribute, crop voting and local-feature rescoring on Beam, GAP evaluation."
    ),
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["tfrecords_schema*", "beam_pipelines*", "trainer*", "rescoring*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES, "ann": ANN_REQUIRES, "bench": BENCH_REQUIRES},
    entry_points={
        "console_scripts": [
            "landmarks-toy-data=beam_pipelines.toy_data:main",
            "landmarks-ingest=beam_pipelines.ingest.pipeline:main",
            "landmarks-train=trainer.train:main",
            "landmarks-predict=beam_pipelines.predict.pipeline:main",
            "landmarks-evaluate=beam_pipelines.evaluate:main",
            "landmarks-revisited=beam_pipelines.revisited:main",
            "landmarks-demo=beam_pipelines.demo:main",
            "landmarks-benchmark=beam_pipelines.benchmark:main",
            "landmarks-query=beam_pipelines.query.main:main",
        ]
    },
)
