"""The Bloom filter of labelled ids that decides which archive members are decoded."""

import math
import random

import pytest

from beam_pipelines.ingest import id_filter


def _ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(count)]


def test_no_false_negatives_and_the_false_positive_rate_of_the_formula():
    num_bits = 1 << 16
    added = _ids(num_bits // id_filter.BITS_PER_ID, seed=1)   # the sizing rule's load
    others = _ids(20_000, seed=2)
    bloom = id_filter.IdFilter.empty(num_bits)
    for image_id in added:
        bloom.add(image_id)
    assert all(bloom.might_contain(image_id) for image_id in added)
    rate = sum(bloom.might_contain(image_id) for image_id in others) / len(others)
    expected = (1 - math.exp(-id_filter.HASHES * len(added) / num_bits)) ** id_filter.HASHES
    # 20,000 Bernoulli trials at p ~ 0.008: standard deviation sqrt(p (1 - p) / n) ~ 0.0006;
    # five of them is a bound a correct filter misses with probability < 1e-6.
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / len(others))
    assert 0.004 < expected < 0.012


def test_union_equals_the_filter_of_both_sets_and_the_value_round_trips():
    first, second = _ids(300, seed=3), _ids(300, seed=4)
    left, right, both = (id_filter.IdFilter.empty(1 << 13) for _ in range(3))
    for image_id in first:
        left.add(image_id)
        both.add(image_id)
    for image_id in second:
        right.add(image_id)
        both.add(image_id)
    assert left.union(right).bits == both.bits
    again = id_filter.IdFilter.from_value(both.to_value())
    assert again.bits == both.bits and again.num_bits == both.num_bits
    assert all(again.might_contain(image_id) for image_id in first + second)
    assert not any(id_filter.IdFilter.empty(1 << 13).might_contain(i) for i in first)


def test_sizing_from_the_labels_file():
    assert id_filter.bits_for_labels_file(0) == id_filter.MIN_BITS
    # 100,000 ids of 17 bytes: 10 bits each, rounded up to a power of two.
    assert id_filter.bits_for_labels_file(100_000 * 17) == 1 << 20
    # GLDv2's train.csv (about 520 MB with its URLs) hits the 8 MB cap, where its 4,132,914
    # ids still give under 0.1 % false positives.
    bits = id_filter.bits_for_labels_file(520 << 20)
    assert bits == id_filter.MAX_BITS == 8 * (1 << 23)
    rate = (1 - math.exp(-id_filter.HASHES * 4_132_914 / bits)) ** id_filter.HASHES
    assert rate < 1e-3


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        id_filter.IdFilter.empty(1000)
    with pytest.raises(ValueError, match="filters of"):
        id_filter.IdFilter.empty(1 << 13).union(id_filter.IdFilter.empty(1 << 14))
    with pytest.raises(ValueError, match="bytes for a filter"):
        id_filter.IdFilter.from_value((1 << 13, b"\0" * 10))
