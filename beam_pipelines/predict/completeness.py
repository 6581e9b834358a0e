"""Did ``landmarks-predict`` do its work: ``stats.json``'s counts from the finished jobs, and
the one-line problem of a job that ran but did not (exit code 4, see
:mod:`beam_pipelines.predict.pipeline`).

* After job A / A' (the reference caches): :func:`reference_problem`,
  :func:`embedding_problem`.
* After job B (prediction): :func:`failure_stats` (extraction failures over attempts, test and
  reference images together), :func:`retrieval_stats` (the kNN recognizers' counters), then
  :func:`completeness_problem`.
* Beam's metrics of a finished job: :func:`counter_value`, :func:`distribution_count` (None
  when the runner has no metrics).
* Extraction-error summaries (:class:`.transforms.ErrorSummaryFn`'s output):
  :func:`merge_error_summaries`, :func:`dominant_cause` (``landmarks-query`` counts its own
  failures with them too).
"""

from __future__ import annotations

from typing import Optional

from apache_beam.metrics.metric import MetricsFilter

from beam_pipelines.predict import knn, transforms

NO_ERRORS = {"count": 0, "causes": []}


def reference_problem(references: dict, config) -> Optional[str]:
    """Why the reference features leave nothing to rescore against (None if they do not)."""
    if references.get("num_images") == 0:
        out_of_range = references.get("label_out_of_range")
        extra = f"; {out_of_range} had a label beyond the label map" if out_of_range else ""
        return (f"no reference images: no record of --reference_data {config.reference_data} "
                f"has a label in [0, {config.num_classes}){extra}")
    if references.get("with_features") == 0:
        cause = dominant_cause(references.get("errors"))
        return (f"no reference image gave local features ({references['num_images']} "
                f"featurised with {config.local_features}, "
                f"{references.get('extraction_failures', 0)} failed"
                + (f"; most frequent cause: {cause}" if cause else "") + ")")
    return None


def embedding_problem(embeddings: dict, config) -> Optional[str]:
    """Why the reference embeddings leave nothing to retrieve (None if they do not)."""
    counts = embeddings.get("counts") or {}
    if not counts.get("landmark"):
        return (f"no reference embeddings: no record of --reference_data "
                f"{config.reference_data} with a label in [0, {config.num_classes}) was "
                f"embedded ({counts.get('rows', 0)} embedded in all)")
    if len(counts.get("dims", [])) != 1:
        return f"the reference embeddings have several lengths {counts.get('dims')}"
    return None


def failure_stats(result, stats: dict, references: dict, reference_errors: dict,
                  max_failed_fraction: float) -> dict:
    """The failure counters of ``stats.json`` from job B's result and job A's summary.

    ``failed_fraction`` = (test + reference extraction failures) / (test + reference images
    given to the extractor), counting job A only when it ran in this run; the references that
    job B featurised on demand (kNN recognizers) count as reference extractions.
    """
    test_errors = stats.pop("test_extraction_errors", None) or dict(NO_ERRORS)
    on_demand_errors = stats.pop("reference_extraction_errors", None) or dict(NO_ERRORS)
    on_demand_failed = counter_value(result, "reference_extraction_failed")
    if on_demand_failed is None:
        on_demand_failed = on_demand_errors["count"]
    on_demand_attempts = distribution_count(result, "reference_features_per_image")
    if on_demand_attempts is None:
        on_demand_attempts = counter_value(result, "knn_references_featurised_on_demand")
    on_demand_attempts = max(int(on_demand_attempts or 0), int(on_demand_failed))
    test_failed = counter_value(result, "test_extraction_failed")
    if test_failed is None:  # a runner without metrics: the tagged output's count is exact too
        test_failed = test_errors["count"]
    test_attempts = distribution_count(result, "test_features_per_image")
    if test_attempts is None:
        test_attempts = stats["features_per_image"]["images"]
    reference_failed = int(references.get("extraction_failures") or 0) + int(on_demand_failed)
    reference_attempts = (0 if references.get("reused") else int(references.get("num_images") or 0)
                          ) + on_demand_attempts
    attempts = test_attempts + reference_attempts
    failed = test_failed + reference_failed
    return {
        "test_extraction_failures": int(test_failed),
        "reference_extraction_failures": reference_failed,
        "undecodable_test_images": counter_value(result, "test_undecodable"),
        "undecodable_reference_images": references.get("undecodable"),
        "extraction_attempts": {"test": int(test_attempts), "reference": reference_attempts},
        "failed_fraction": round(failed / attempts, 6) if attempts else 0.0,
        "max_failed_fraction": max_failed_fraction,
        "extraction_errors": {"test": test_errors,
                              "reference": merge_error_summaries(reference_errors,
                                                                 on_demand_errors)},
    }


def retrieval_stats(result) -> dict:
    """The kNN recognizers' counters of job B (None where the runner has no metrics)."""
    names = ("index_rows", "index_shards", "index_duplicate_ids", "retrieval_pairs",
             "retrieval_queries", "knn_pairs_verified", "knn_pairs_unverified",
             "knn_references_featurised_on_demand", "knn_references_missing",
             "knn_references_undecodable")
    stats = {name: counter_value(result, name) for name in names}
    stats["knn_pairs_unverified_reasons"] = {
        reason: counter_value(result, f"knn_pairs_unverified_{reason}")
        for reason in knn.UNVERIFIED_REASONS}
    return stats


def completeness_problem(stats: dict, config) -> Optional[str]:
    """One line saying why a finished job B did not do its work, or None (exit code 4; the
    cases are in :mod:`beam_pipelines.predict.pipeline`'s docstring)."""
    if stats["test_images"] == 0:
        return (f"no test images: the files of --test_data {config.test_data} hold no record "
                f"with an image id ({stats['unparseable_test_records']} unparseable records)")
    if stats["predicted"] == 0:
        return (f"none of the {stats['test_images']} test images is readable "
                f"({stats.get('undecodable_test_images')} undecodable, the others of another "
                "schema or malformed; see stats.json)")
    attempts = stats["extraction_attempts"]
    failed = stats["test_extraction_failures"] + stats["reference_extraction_failures"]
    if stats["failed_fraction"] > config.max_failed_fraction:
        errors = stats["extraction_errors"]
        dominant = dominant_cause(errors.get("test"), errors.get("reference"))
        cause = (f"; most frequent cause ({dominant[1]} images): {dominant[0]}"
                 if dominant else "")
        return (f"local-feature extraction ({config.local_features}) failed on {failed} of "
                f"{attempts['test'] + attempts['reference']} images "
                f"({stats['failed_fraction']:.1%} > --max_failed_fraction "
                f"{config.max_failed_fraction:g}): test {stats['test_extraction_failures']} of "
                f"{attempts['test']}, reference {stats['reference_extraction_failures']} of "
                f"{attempts['reference']}{cause}")
    features = stats["features_per_image"]
    if (features["images"] and features.get("zero") == features["images"]
            and stats["test_extraction_failures"] < features["images"]):
        return (f"no readable test image gave local features ({features['images']} images, "
                f"--local_features {config.local_features}): nothing was rescored")
    return None


def merge_error_summaries(*summaries) -> dict:
    """:class:`transforms.ErrorSummaryFn` summaries -> one (counts added, causes merged by
    :func:`transforms.cause_key`)."""
    combine = transforms.ErrorSummaryFn()
    accumulators = []
    for summary in summaries:
        summary = summary or NO_ERRORS
        groups: dict = {}
        for example, times in summary.get("causes", []):
            combine._add(groups, transforms.cause_key(example), int(times), example)
        accumulators.append((int(summary.get("count", 0)), groups))
    return combine.extract_output(combine.merge_accumulators(accumulators))


def dominant_cause(*summaries) -> Optional[tuple[str, int]]:
    """``(example, images)`` of the most frequent cause over :class:`transforms.ErrorSummaryFn`
    summaries (causes grouped by :func:`transforms.cause_key`; ties: alphabetical), or None
    when none holds a cause."""
    merged: dict[str, tuple[int, str]] = {}  # cause_key -> (images, example)
    for summary in summaries:
        for cause, times in (summary or NO_ERRORS).get("causes", []):
            key = transforms.cause_key(cause)
            previous_times, previous_example = merged.get(key, (0, cause))
            merged[key] = (previous_times + int(times), min(previous_example, cause))
    if not merged:
        return None
    times, example = min(merged.values(), key=lambda item: (-item[0], item[1]))
    return example, times


def counter_value(result, name: str) -> Optional[int]:
    """Sum of a Beam counter (committed, else attempted), 0 if it was never incremented, or
    None if the runner has no metrics."""
    try:
        query = result.metrics().query(
            MetricsFilter().with_namespace(transforms.NAMESPACE).with_name(name)
        )
    except (NotImplementedError, AttributeError, ValueError):
        return None
    total = 0
    for item in query["counters"]:
        value = item.committed if item.committed is not None else item.attempted
        total += int(value or 0)
    return total


def distribution_count(result, name: str) -> Optional[int]:
    """Number of updates of a Beam distribution metric, or None if the runner has no metrics."""
    try:
        query = result.metrics().query(
            MetricsFilter().with_namespace(transforms.NAMESPACE).with_name(name)
        )
    except (NotImplementedError, AttributeError, ValueError):
        return None
    counts = [item.committed.count for item in query["distributions"] if item.committed]
    return int(sum(counts)) if counts else 0
