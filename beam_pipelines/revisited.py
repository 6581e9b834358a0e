"""`landmarks-revisited`: mAP of a trained model's embeddings on ROxford5k or RParis6k.

    landmarks-revisited --model_dir models/m1 --data_root data/datasets --dataset roxford5k \\
        --output_dir eval/roxford5k [--image_size S] [--batch_size B]

The revisited Oxford and Paris retrieval benchmarks (Radenovic et al., CVPR 2018; the protocol is
:mod:`rescoring.revisited`): every database image and every query, cropped to its bounding box,
is embedded with the model's ``embedding.keras`` (``--model_dir``) or a given ``--embedding``;
the database is ranked per query by cosine similarity, and mean AP and mean precision at 1, 5
and 10 are computed for the Easy, Medium and Hard setups exactly as the official evaluation does.
Writes ``report.json`` to ``--output_dir`` and prints a small table (percent, as the papers).

Data: ``--data_root`` is the folder that holds ``<dataset>/gnd_<dataset>.pkl`` (or the older
``.mat``) and ``<dataset>/jpg/*.jpg``, i.e. the ``data/datasets`` folder of the official download
script. The ground truth is read without running anything in it: the ``.pkl`` through a
restricted unpickler that rebuilds only lists, dicts, strings, numbers and numpy arrays
(:class:`rescoring.revisited.RestrictedUnpickler`), the ``.mat`` with ``scipy.io.loadmat``.

Preprocessing is the training and prediction contract, :class:`trainer.preprocessing.
ImageContract`: the image (or the query crop) is decoded to RGB like the predict job does
(Pillow), resized to ``S x S`` (bilinear, antialiased) and scaled to [-1, 1]. **The aspect ratio
is not kept**: the image is squashed to the square, because that is how every image looked to
the model in training and in prediction (the recipe's "resize to 299 x 299"), and
``embedding.keras`` takes a fixed square input. The published figures on these benchmarks
usually come from fully convolutional networks fed aspect-kept images of up to 1024 px, so they
are a reference point, not a like-for-like comparison.

All paths may be local or ``gs://`` (the model through the predict job's loader, files through
Beam's FileSystems).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import sys
import time
from typing import Optional, Sequence

import numpy as np

from beam_pipelines import cli
from beam_pipelines import io_utils
from rescoring import revisited as protocol
from tfrecords_schema import InputError

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
EMBEDDING_FILENAME = "embedding.keras"
DEFAULT_BATCH_SIZE = 32
LOADER_THREADS = 4  # decode + resize run in threads (Pillow and TF release the GIL)
PROGRESS_FRACTION = 0.1  # a progress line every 10% of a set (and at its end)


@dataclasses.dataclass(frozen=True)
class RevisitedConfig:
    """One benchmark run."""

    data_root: str
    dataset: str
    output_dir: str
    model_dir: Optional[str] = None
    embedding: Optional[str] = None
    image_size: Optional[int] = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self):
        for name in ("data_root", "dataset", "output_dir"):
            if not getattr(self, name):
                raise InputError(f"--{name} is required")
        if (self.model_dir is None) == (self.embedding is None):
            raise InputError("give exactly one of --model_dir (uses its embedding.keras) and "
                             "--embedding")
        if self.dataset not in protocol.DATASETS:
            raise InputError(f"--dataset must be one of {', '.join(protocol.DATASETS)}, "
                             f"got {self.dataset!r}")
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None:
            from trainer.preprocessing import MIN_IMAGE_SIZE

            if self.image_size < MIN_IMAGE_SIZE:
                raise InputError(f"--image_size must be >= {MIN_IMAGE_SIZE}, "
                                 f"got {self.image_size}")

    @property
    def embedding_path(self) -> str:
        """``--embedding``, or ``embedding.keras`` in ``--model_dir``."""
        if self.embedding is not None:
            return self.embedding
        return io_utils.join(self.model_dir, EMBEDDING_FILENAME)

    @property
    def dataset_dir(self) -> str:
        return io_utils.join(self.data_root, self.dataset)


# ----------------------------------------------------------------------------- inputs

def read_ground_truth(config: RevisitedConfig) -> tuple[protocol.GroundTruth, str]:
    """The dataset's ground truth and its path: ``gnd_<dataset>.pkl``, else ``.mat``.

    Raises:
      InputError: neither file exists, or the file is refused or malformed.
    """
    paths = [io_utils.join(config.dataset_dir, name)
             for name in protocol.ground_truth_names(config.dataset)]
    for path in paths:
        if io_utils.exists(path):
            return protocol.parse_ground_truth(io_utils.read_bytes(path), path), path
    raise InputError(
        f"no ground truth {paths[0]} (nor .mat): --data_root must be the folder that holds "
        f"{config.dataset}/ with gnd_{config.dataset}.pkl and jpg/ (the official download's "
        f"data/datasets)")


def image_paths(config: RevisitedConfig, names: Sequence[str]) -> list[str]:
    """``<data_root>/<dataset>/jpg/<name>.jpg`` for each name."""
    folder = io_utils.join(config.dataset_dir, protocol.IMAGE_FOLDER)
    return [io_utils.join(folder, protocol.image_filename(name)) for name in names]


def check_images_exist(config: RevisitedConfig, gt: protocol.GroundTruth) -> None:
    """One listing of the image folder, compared with the ground truth's names.

    Raises:
      InputError: images are missing (count and the first few names).
    """
    folder = io_utils.join(config.dataset_dir, protocol.IMAGE_FOLDER)
    present = {path.replace("\\", "/").rsplit("/", 1)[-1]
               for path in io_utils.match(io_utils.join(folder, "*"))}
    wanted = dict.fromkeys(protocol.image_filename(name) for name in gt.imlist + gt.qimlist)
    missing = [name for name in wanted if name not in present]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise InputError(f"{len(missing)} of the {len(wanted)} images of {config.dataset} are "
                         f"missing from {folder}: {shown}")


def load_embedding_model(config: RevisitedConfig):
    """The Keras embedding model (local or ``gs://``), by the predict job's loader.

    Raises:
      InputError: nothing at the path, or not a loadable Keras model.
    """
    from beam_pipelines.predict.model_handler import load_keras_model

    path = config.embedding_path
    if not io_utils.exists(path):
        hint = (" (a model folder trained before embedding.keras was exported has none: "
                "re-export it or pass --embedding)" if config.model_dir is not None else "")
        raise InputError(f"embedding model not found: {path}{hint}")
    try:
        return load_keras_model(path)
    except ValueError as error:
        raise InputError(str(error)) from None


def resolve_image_size(model, requested: Optional[int]) -> int:
    """The input side S: the model's own (``[B, S, S, 3]``), or ``--image_size`` when the model
    takes any size.

    Raises:
      InputError: the model's input is not ``[B, S, S, 3]``, ``--image_size`` differs from a
        fixed S, the size is not fixed and ``--image_size`` is not given, or S < 32.
    """
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise InputError(f"the embedding model's input must be [batch, S, S, 3], got "
                         f"{list(shape)}")
    fixed = shape[1]
    if fixed is not None and requested is not None and requested != fixed:
        raise InputError(f"--image_size {requested} differs from the model's input size {fixed}")
    size = requested if requested is not None else fixed
    if size is None:
        raise InputError("the embedding model takes any input size: pass --image_size")
    from trainer.preprocessing import MIN_IMAGE_SIZE

    if size < MIN_IMAGE_SIZE:
        raise InputError(f"the embedding model's input size {size} is below the smallest "
                         f"supported, {MIN_IMAGE_SIZE}")
    return int(size)


def decode_image(path: str) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, 3]`` RGB, decoded as the predict job decodes.

    Raises:
      InputError: the file is not a readable image.
    """
    from beam_pipelines.predict.transforms import decode_rgb

    try:
        return decode_rgb(io_utils.read_bytes(path))
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


# ----------------------------------------------------------------------------- embedding

def embed_images(model, paths: Sequence[str], contract, batch_size: int, what: str,
                 boxes: Optional[Sequence[Sequence[float]]] = None) -> np.ndarray:
    """Embeddings ``[len(paths), D]`` float32 of the images (cropped to ``boxes`` if given).

    Each image: :func:`decode_image`, the crop, ``contract.resize`` to S x S, then per batch
    ``contract.scale`` and one forward pass. The next batch is decoded while the model runs.
    Logs progress every 10% with the rate.
    """
    def load(index: int) -> np.ndarray:
        image = decode_image(paths[index])
        if boxes is not None:
            try:
                image = protocol.crop_query(image, boxes[index])
            except InputError as error:
                raise InputError(f"{paths[index]}: {error}") from None
        return contract.resize(image)

    starts = list(range(0, len(paths), batch_size))
    step = max(1, int(len(paths) * PROGRESS_FRACTION))
    next_report, started, outputs = step, time.monotonic(), []
    with concurrent.futures.ThreadPoolExecutor(max_workers=LOADER_THREADS) as pool:
        def submit(start):
            return [pool.submit(load, i) for i in range(start, min(start + batch_size,
                                                                    len(paths)))]

        pending = submit(starts[0]) if starts else []
        for number, start in enumerate(starts):
            batch = np.stack([future.result() for future in pending])
            pending = submit(starts[number + 1]) if number + 1 < len(starts) else []
            outputs.append(np.asarray(model.predict_on_batch(contract.scale(batch)), np.float32))
            done = start + len(batch)
            if done >= next_report or done == len(paths):
                rate = done / max(time.monotonic() - started, 1e-9)
                logger.info("embedded %d/%d %s (%.1f images/s)", done, len(paths), what, rate)
                next_report = done + step
    if not outputs:
        return np.zeros((0, 0), np.float32)
    embeddings = np.concatenate(outputs, axis=0)
    if embeddings.ndim != 2:
        raise InputError(f"the embedding model must output [batch, D], got "
                         f"{list(embeddings.shape)}")
    return embeddings


# ----------------------------------------------------------------------------- report

def build_report(results: dict, gt: protocol.GroundTruth, config: RevisitedConfig,
                 image_size: int, embedding_dim: int) -> dict:
    """``report.json``: fractions in [0, 1] (the table prints percent); ``null`` for a setup in
    which no query has a positive."""
    kappas = next(iter(results.values())).kappas
    report = {
        "dataset": config.dataset,
        "map": {setup: result.mean_ap for setup, result in results.items()},
        "mp_at_k": {
            setup: (None if result.mean_precision is None else
                    {str(k): value for k, value in zip(kappas, result.mean_precision)})
            for setup, result in results.items()},
        "per_query": [
            {"query": name,
             "ap": {setup: _finite_or_none(result.aps[index])
                    for setup, result in results.items()}}
            for index, name in enumerate(gt.qimlist)],
        "counts": {
            "database_images": len(gt.imlist),
            "queries": len(gt.qimlist),
            "evaluated_queries": {setup: result.num_evaluated
                                  for setup, result in results.items()},
            "embedding_dim": embedding_dim,
        },
        "config": {**dataclasses.asdict(config), "embedding_path": config.embedding_path,
                   "image_size": image_size, "kappas": list(kappas)},
    }
    return report


def _finite_or_none(value) -> Optional[float]:
    value = float(value)
    return None if np.isnan(value) else value


def format_table(report: dict) -> str:
    """Setups as columns, mAP and mP@k as rows, in percent (2 decimals)."""
    setups = list(report["map"])
    kappas = report["config"]["kappas"]
    rows = [("mAP", [report["map"][s] for s in setups])]
    for k in kappas:
        rows.append((f"mP@{k}", [None if report["mp_at_k"][s] is None
                                 else report["mp_at_k"][s][str(k)] for s in setups]))
    rows.append(("queries", [report["counts"]["evaluated_queries"][s] for s in setups]))
    width = 10
    lines = [f"{report['dataset']}".ljust(width)
             + "".join(protocol.SETUP_LETTERS[s].rjust(width) for s in setups)]
    for name, values in rows:
        cells = []
        for value in values:
            if value is None:
                cells.append("-")
            elif isinstance(value, int):
                cells.append(str(value))
            else:
                cells.append(f"{protocol.percent(value):.2f}")
        lines.append(name.ljust(width) + "".join(cell.rjust(width) for cell in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-revisited`` argument parser."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-revisited", description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  landmarks-revisited --model_dir models/m1 --data_root data/datasets \\\n"
               "      --dataset roxford5k --output_dir eval/roxford5k\n"
               f"writes {REPORT_FILENAME}; all paths may be gs:// URLs.")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model_dir", default=None,
                       help=f"a landmarks-train model folder; its {EMBEDDING_FILENAME} is used "
                            f"(default: none; give --model_dir or --embedding)")
    model.add_argument("--embedding", default=None,
                       help="path of an embedding model (.keras): images [B, S, S, 3] in "
                            "[-1, 1] -> embeddings [B, D] (default: none; give --model_dir or "
                            "--embedding)")
    parser.add_argument("--data_root", required=True,
                        help="folder holding <dataset>/gnd_<dataset>.pkl (or .mat) and "
                             "<dataset>/jpg/ (required)")
    parser.add_argument("--dataset", required=True, choices=protocol.DATASETS,
                        help=f"benchmark: {' or '.join(protocol.DATASETS)} (required)")
    parser.add_argument("--output_dir", required=True,
                        help=f"folder for {REPORT_FILENAME} (required)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input side S in pixels; must equal a model's fixed input size "
                             "(default: the model's input size)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="images per forward pass (default: %(default)s)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> RevisitedConfig:
    """Command line -> :class:`RevisitedConfig` (``InputError`` for bad or unknown flags)."""
    return RevisitedConfig(**vars(build_parser().parse_args(argv)))


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Reads the data, embeds, evaluates, writes ``report.json``; returns the report.

    Inputs are checked (flags, ground truth, every image's presence, the model) before the
    minutes of embedding start.

    Raises:
      InputError: bad flags, a missing or refused ground truth, missing or unreadable images, a
        missing or unsuitable model (one-line message).
    """
    from trainer.preprocessing import ImageContract

    config = parse_args(argv)
    gt, gt_path = read_ground_truth(config)
    check_images_exist(config, gt)
    model = load_embedding_model(config)
    image_size = resolve_image_size(model, config.image_size)
    contract = ImageContract(image_size=image_size)
    logger.info("%s: %d database images, %d queries (%s); embedding at %d px",
                config.dataset, len(gt.imlist), len(gt.qimlist), gt_path, image_size)

    database = embed_images(model, image_paths(config, gt.imlist), contract, config.batch_size,
                            "database images")
    queries = embed_images(model, image_paths(config, gt.qimlist), contract, config.batch_size,
                           "query crops", boxes=[truth.bbx for truth in gt.gnd])
    if database.shape[1] != queries.shape[1]:
        raise InputError(f"embedding widths differ: {database.shape[1]} vs {queries.shape[1]}")
    ranks = protocol.rank_database(protocol.similarities(queries, database))
    results = protocol.evaluate(ranks, gt.gnd)
    report = build_report(results, gt, config, image_size, int(database.shape[1]))
    io_utils.write_json(io_utils.join(config.output_dir, REPORT_FILENAME), report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: prints the table; returns the exit code.

    0 done; 2 bad flags or input (one ``landmarks-revisited: error:`` line); 1 an internal error
    (a bug: traceback logged), see :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # progress of the embedding, which takes minutes
    return cli.run_command("landmarks-revisited", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    report = run(argv)
    print(format_table(report))
    print(f"report: {io_utils.join(report['config']['output_dir'], REPORT_FILENAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
