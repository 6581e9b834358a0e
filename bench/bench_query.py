"""``landmarks-query``'s time per photo on one CPU core, after loading (target: < 1 s with
``--crops 1``), against the bare work the prediction job does for one image, in the same run.

* query: ``QuerySession.answer`` with ``--crops 1`` and ``--top 5`` (read and normalise the
  photo, one forward pass, local features, verification of the answer and of four more
  candidates, each against its K cached references, the matches kept for the picture) and with
  ``--top 1`` (the job's work only, plus the matches);
* baseline: the same photo through the job's bare steps, called directly: decode the stored
  JPEG, one view, one forward pass, local features, ``transforms.score_query`` against the
  predicted class's K references. The ratio query / baseline is what the query adds.

Photos, model and reference cache come from a demo run (``make demo`` writes ``runs/demo``).
``--image_size 299`` swaps the demo's 96 px model for an untrained Xception of the recipe's
299 px with the same classes (its answers are arbitrary; its time is the real model's).
The process is pinned to one core, with one TensorFlow and BLAS thread. Usage::

    .venv/bin/python bench/bench_query.py [--run_dir runs/demo] [--image_size 0|299]
        [--photos 12] [--rounds 3]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[_name] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _model_dir(run_dir: str, image_size: int, scratch: str) -> str:
    """The demo's model folder, or a copy of its label map beside an untrained model of
    ``image_size`` px with the same classes."""
    model_dir = os.path.join(run_dir, "model")
    if not image_size:
        return model_dir
    from tfrecords_schema.label_map import LabelMap
    from trainer import model as model_lib

    with open(os.path.join(model_dir, "label_map.csv")) as handle:
        classes = LabelMap.from_csv_text(handle.read()).num_classes
    target = os.path.join(scratch, f"model_{image_size}")
    os.makedirs(target)
    shutil.copy(os.path.join(model_dir, "label_map.csv"), target)
    model_lib.build_model(classes, image_size=image_size).save(
        os.path.join(target, "model.keras"))
    return target


def _baseline(session, photo: str) -> None:
    """The job's bare steps for one image (see the module docstring)."""
    from beam_pipelines.predict import transforms
    from beam_pipelines.predict.elements import TestQuery, Vote
    from rescoring import voting

    image = session.read_photo(photo, "baseline").image
    locations, descriptors = transforms.check_features(session.extractor.extract(image))
    class_index, confidence = voting.vote(session._forward(session.model, image))
    query = TestQuery("baseline", Vote(class_index, confidence), locations, descriptors)
    transforms.score_query(query, class_index, session.class_references(class_index),
                           session.verification)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", default="runs/demo")
    parser.add_argument("--image_size", type=int, default=0,
                        help="0: the demo's model; else an untrained model of this size")
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.run_dir, "reference_features", "_SUCCESS")):
        print(f"no demo run with a reference cache in {args.run_dir}: run `make demo` first",
              file=sys.stderr)
        return 2
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from beam_pipelines.query import session as session_lib

    photos = sorted(glob.glob(os.path.join(args.run_dir, "toy_data", "images", "test",
                                           "*.jpg")))[: args.photos]
    scratch = tempfile.mkdtemp(prefix="bench-query-")
    try:
        model_dir = _model_dir(args.run_dir, args.image_size, scratch)
        sessions = {}
        for top in (5, 1):
            start = time.perf_counter()
            sessions[top] = session_lib.QuerySession(session_lib.SessionSettings(
                model_dir=model_dir, references=os.path.join(args.run_dir, "reference_features"),
                output_dir=os.path.join(scratch, "out"), crops=1, top=top))
            load = time.perf_counter() - start
        for photo in photos[:2]:  # warm-up: first calls trace the model
            sessions[5].answer(photo, "warm")
            sessions[1].answer(photo, "warm")
            _baseline(sessions[1], photo)
        times = {"query top 5": [], "query top 1": [], "baseline (job's steps)": []}
        for _ in range(args.rounds):  # alternate, so machine load hits every side alike
            for photo in photos:
                for name, action in (
                        ("query top 5", lambda: sessions[5].answer(photo, "x")),
                        ("query top 1", lambda: sessions[1].answer(photo, "x")),
                        ("baseline (job's steps)", lambda: _baseline(sessions[1], photo))):
                    start = time.perf_counter()
                    action()
                    times[name].append(time.perf_counter() - start)
        size = sessions[1].image_size
        print(f"landmarks-query, --crops 1, one core, {size} px model, {len(photos)} photos x "
              f"{args.rounds} rounds; load {load:.1f} s; K = "
              f"{sessions[1].config.references_per_class} references per class")
        baseline = statistics.median(times["baseline (job's steps)"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<24} median {median * 1000:7.1f} ms  p90 "
                  f"{np.percentile(values, 90) * 1000:7.1f} ms  x{median / baseline:5.2f} of "
                  "baseline")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
