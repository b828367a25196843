"""The benchmarks' interleaved timing: every round visits all variants, each round starting one later."""

from fxopt.bench.fused import interleaved_runs


def test_rounds_rotate_the_order_and_time_each_variant_once_per_round():
    visits = []

    def time_one(fn):
        visits.append(fn())
        return float(len(visits))

    runs = interleaved_runs({"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, 4, time_one)
    assert visits == list("abc" "bca" "cab" "abc")
    assert runs == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}
