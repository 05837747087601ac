"""The scale simulation at a small size: every stage runs against S3 (moto, counted), and the requests of each
grow linearly with the number of shards (O(1) per shard): twice the shards cost at most ~2.2x the requests."""

from __future__ import annotations


def test_requests_per_shard_are_constant(scale_sim):
    small = {s["stage"]: s for s in scale_sim.simulate(20, emit=lambda line: None, polling_children=None)}
    large = {s["stage"]: s for s in scale_sim.simulate(40, emit=lambda line: None, polling_children=None)}
    assert list(small) == ["plan", "commit", "resume-skip-check", "inspect-running", "finalize", "inspect"]
    for stage in small:
        assert large[stage]["requests_total"] <= 2.2 * small[stage]["requests_total"], stage
    # the commit records were all read back: one bad sample in every 10th shard, all in the manifest
    assert small["finalize"]["bad_samples"] == 2 and large["finalize"]["bad_samples"] == 4
    # the manifest grows with the shards, well inside 20 MB at 10,000 shards (linear extrapolation)
    per_shard = large["finalize"]["manifest_bytes"] / 40
    assert per_shard * 10_000 < 20e6
    # a shard's skip check and generation checks are single GETs: no size request, no listing per shard
    assert large["commit"]["requests"].get("LIST", 0) <= 2
    # whole objects (chunks, records, staged rows) are one GET each: s3fs asked each one's size first (a HEAD)
    assert large["commit"]["requests"].get("HEAD", 0) == 0 and large["finalize"]["requests"].get("HEAD", 0) <= 2
    # finalize reads each commit record once, and counts valid rows from them, not from the valid chunks
    assert large["finalize"]["requests"]["GET"] <= 40 + 30
    assert large["finalize"]["requests_total"] <= 40 + 70
    # a finalized store's inspect reads the manifest, not every record
    assert large["inspect"]["requests_total"] == small["inspect"]["requests_total"]


def test_parent_polling_stays_under_one_request_per_second_for_600_children(scale_sim):
    line = scale_sim._polling(600)
    assert line["requests_per_poll"] == 3 and line["requests_per_second"] <= 1.0
