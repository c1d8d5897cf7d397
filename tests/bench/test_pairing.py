"""v1.3 against v1.0 is measured in pairs: each run's v1.3 right after that run's v1.0 on the same
server, and the ratio is the median of the pairs', not of two medians taken minutes apart."""
from __future__ import annotations

from bench.__main__ import Case, schedule
from bench.report import Report, Sample


def _case(workload: str, system: str) -> Case:
    return Case(workload, system, request=None, proc=None)


def test_v13_runs_right_after_v10_on_the_same_system():
    cases = [_case(w, s) for w in ("secret-read", "secret-read-v13", "sign-ec") for s in ("skm", "skm-pg", "openbao")
             if not (w == "secret-read-v13" and s == "openbao")]
    order = [(c.workload, c.system) for group in schedule(cases).values() for c in group]
    assert order == [("secret-read", "skm"), ("secret-read-v13", "skm"),
                     ("secret-read", "skm-pg"), ("secret-read-v13", "skm-pg"),
                     ("secret-read", "openbao"),
                     ("sign-ec", "skm"), ("sign-ec", "skm-pg"), ("sign-ec", "openbao")]
    # Without its partner, a paired workload still runs.
    alone = schedule([_case("secret-read-v13", "skm")])
    assert [(c.workload, c.system) for g in alone.values() for c in g] == [("secret-read-v13", "skm")]


def _sample(workload: str, run: int, rps: float, cpu: float) -> Sample:
    return Sample(workload, "skm", run, rps, 1.0, 2.0, 1000, 0, cpu)


def test_the_ratio_is_the_median_of_each_runs_pair():
    r = Report(settings={})
    # The machine drifts between runs (run 2 slow for both) and once within a pair (run 3's v1.3 ran
    # slowed): the pairs say 0.9, 0.9, 0.6, so 0.9; the two medians would say 780 / 1000.
    for run, v10, v13 in ((1, 1000.0, 900.0), (2, 700.0, 630.0), (3, 1300.0, 780.0)):
        r.samples += [_sample("secret-read", run, v10, 1e6 / v10), _sample("secret-read-v13", run, v13, 1e6 / v13)]
    row = next(x for x in r.rows() if x["workload"] == "secret-read-v13")
    assert abs(row["vs_v10"] - 0.9) < 1e-9
    assert abs(row["cpu_vs_v10"] - 1 / 0.9) < 1e-9
    r.samples = [s for s in r.samples if not (s.workload == "secret-read" and s.run == 1)]
    row = next(x for x in r.rows() if x["workload"] == "secret-read-v13")
    assert abs(row["vs_v10"] - 0.75) < 1e-9         # an unpaired run is left out, not guessed: (0.9 + 0.6) / 2
