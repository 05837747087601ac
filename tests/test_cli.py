"""The command line as a user sees it: the progress bar's numbers, summaries and `inspect`, messages."""

from __future__ import annotations

from rich.progress import Progress

from neuropredictor.cli.progress import ProgressListener


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_rate_is_images_over_wall_time_from_the_plan_on():
    clock = FakeClock()
    with Progress(disable=True) as progress:
        task = progress.add_task("extract", total=None, rate="-", shards="-")
        listen = ProgressListener(progress, task, clock=clock, window_s=30.0)
        rate = lambda: progress.tasks[0].fields["rate"]  # noqa: E731
        listen("planned", {"rows": 1000, "committed_rows": 200, "shards": 10, "committed_shards": 2})
        assert progress.tasks[0].completed == 200 and progress.tasks[0].total == 1000
        clock.now += 2.0  # the first batch took 2 s (model warm-up, first decode): 10 img/s, not millions
        listen("batch", {"images": 20})
        assert rate() == "10"
        for _ in range(4):  # then 20 images a second: the average since the plan, never twice too high
            clock.now += 1.0
            listen("batch", {"images": 20})
        assert rate() == f"{100 / 6:,.0f}"
        for _ in range(60):  # a sliding window: after a while, the recent rate
            clock.now += 1.0
            listen("batch", {"images": 20})
        assert rate() == "20"
        listen("shard", {"name": "s", "record": {}})
        assert progress.tasks[0].fields["shards"] == "3/10"
        assert progress.tasks[0].completed == 200 + 65 * 20
