"""benchmarks/: the registry, the harness (interleaving, steal screen, paired ratios, records), the generated
docs/benchmarks.md, and one tiny benchmark end to end through `python -m benchmarks`."""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from scipy import stats as sp_stats

sys.path.insert(0, REPO)
from benchmarks import harness, pool_speed, report
from benchmarks.harness import Comparison


def test_the_registry_holds_every_kept_benchmark_and_refuses_a_second_one_by_the_same_name():
    names = set(harness.load_all())
    assert names == {"step_speed", "quickstart_recipe", "cascade_speed", "pool_speed", "selection_speed"}
    for bench in harness.REGISTRY.values():
        assert bench.doc and all(a.help for a in bench.args), bench.name
    with pytest.raises(ValueError, match="registered twice"):
        harness.register("step_speed")(lambda args: None)


def test_interleave_times_the_sides_in_turn_and_replaces_a_stolen_round():
    """A, B, A, B, ...; a round in which the (stubbed) hypervisor clock advanced more than max_steal is kept but
    marked, and one more round runs in its place."""
    calls = []
    sides = {"A": lambda: calls.append("A") or 1.0, "B": lambda: calls.append("B") or {"s": 2.0, "acc": 0.5}}
    steal = iter([0.0, 0.0, 0.0, 9.0, 9.0, 9.5, 9.5, 9.5])  # round 2 loses 9 s
    rounds = harness.interleave(sides, 3, max_steal=5.0, clock=lambda: next(steal))
    assert calls == ["A", "B"] * 4
    assert [r["kept"] for r in rounds] == [True, False, True, True]
    assert [r["steal_s"] for r in rounds] == [0.0, 9.0, 0.5, 0.0]
    assert rounds[0]["s"] == {"A": 1.0, "B": 2.0} and rounds[0]["details"] == {"B": {"acc": 0.5}}
    assert all(r["kept"] for r in harness.interleave(sides, 2, max_steal=-1, clock=lambda: next(steal, 1e9)))


def test_a_shuffled_plan_records_a_new_order_every_round():
    calls = []
    sides = {k: (lambda k=k: calls.append(k) or 1.0) for k in "ABCD"}
    rounds = harness.interleave(sides, 4, clock=lambda: None, shuffle=True)
    orders = [r["order"] for r in rounds]
    assert calls == [k for o in orders for k in o] and all(sorted(o) == list("ABCD") for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and list(rounds[0]["s"]) == list("ABCD")


def rounds_of(**times):
    n = len(next(iter(times.values())))
    return [{"s": {k: v[i] for k, v in times.items()}, "kept": True} for i in range(n)]


def test_the_paired_ratio_is_the_t_interval_of_the_log_ratios():
    """Closed form: exp(mean(log r) +- t_{0.975, n-1} sd / sqrt(n)) over the rounds' ratios r; a summed
    denominator and a scale enter per round; a stolen round is left out."""
    a, b, c = [2.0, 2.2, 1.9, 2.5], [1.0, 1.0, 1.1, 1.2], [0.5, 0.4, 0.5, 0.6]
    rounds = rounds_of(a=a, b=b, c=c)
    rounds.append({"s": {"a": 100.0, "b": 1.0, "c": 1.0}, "kept": False})
    logs = np.log(np.array(a) / (np.array(b) + np.array(c)) * 0.5)
    half = sp_stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    (row,) = harness.summarise(rounds, [Comparison("a / (b + c) x 0.5", ("a",), ("b", "c"), 0.5)])
    want = np.exp([logs.mean(), logs.mean() - half, logs.mean() + half])
    assert (row["ratio"], row["low"], row["high"]) == pytest.approx(tuple(want), rel=1e-12) and row["n"] == 4


def test_a_comparison_on_a_field_reads_each_sides_details():
    rounds = rounds_of(x=[1.0, 1.0], y=[1.0, 1.0])
    for r, (u, v) in zip(rounds, [(4.0, 2.0), (6.0, 3.0)]):
        r["details"] = {"x": {"stage": {"s": u}}, "y": {"stage": {"s": v}}}
    (row,) = harness.summarise(rounds, [Comparison("x / y, stage", ("x",), ("y",), field="stage.s")])
    assert row["ratio"] == pytest.approx(2.0) and row["n"] == 2


@pytest.mark.parametrize(
    ("low", "high", "target", "better", "want"),
    [
        (1.1, 1.3, 1.0, "higher", "met"),
        (0.7, 0.9, 1.0, "higher", "not met"),
        (0.9, 1.1, 1.0, "higher", "unresolved"),
        (2.0, 2.9, 3.0, "lower", "met"),
        (3.1, 3.5, 3.0, "lower", "not met"),
        (2.9, 3.5, 3.0, "lower", "unresolved"),
        (1.1, 1.3, None, "higher", "above 1"),
        (0.5, 0.9, None, "higher", "below 1"),
    ],
)
def test_verdicts_need_the_whole_interval_on_one_side(low, high, target, better, want):
    ratio = harness.stats.TimeRatio(math.sqrt(low * high), low, high, 5, None)
    assert harness.verdict(ratio, Comparison("r", ("a",), ("b",), target=target, better=better)) == want


def toy_record(tmp_path):
    @harness.register("toy_for_tests", harness.Arg("size", 3, "rows", int))
    def toy(args):
        """A toy benchmark."""
        return harness.Plan({"a": lambda: 0.002, "b": lambda: 0.001}, [Comparison("a / b", ("a",), ("b",))])

    try:
        args = argparse.Namespace(size=3, repeats=2, max_steal=5.0, results_dir=str(tmp_path))
        plan = toy(args)
        rounds = harness.interleave(plan.sides, 2, clock=lambda: None)
        return harness.build_record("toy_for_tests", args, ["--repeats", "2"], plan, rounds, [0.0, 0.0], {})
    finally:
        del harness.REGISTRY["toy_for_tests"]


def test_a_record_round_trips_and_a_broken_one_names_its_file_and_field(tmp_path):
    record = toy_record(tmp_path)
    path = harness.write_record(record, str(tmp_path))
    assert path == str(tmp_path / "toy_for_tests" / f"{record['device']['slug']}.json")
    assert harness.read_record(path) == json.loads(json.dumps(record))
    assert record["arguments"] == {"size": 3, "repeats": 2, "max_steal": 5.0}
    assert record["command"] == "python -m benchmarks run toy_for_tests --repeats 2"
    assert record["summary"][0]["ratio"] == pytest.approx(2.0) and "\n" not in open(path).read().rstrip("\n")
    del record["rounds"]
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match=f"{path}: record has no field 'rounds'"):
        harness.read_record(path)


def test_the_committed_page_is_the_generated_one_and_an_edited_page_fails_the_check(tmp_path, capsys):
    """docs/benchmarks.md is what the committed records give; a changed figure on the page, or a changed
    record, makes `report --check` fail."""
    assert report.main(True, harness.RESULTS, report.PAGE) == 0
    page = tmp_path / "benchmarks.md"
    text = open(report.PAGE).read()
    page.write_text(text.replace("| 4 | ", "| 5 | ", 1))
    assert page.read_text() != text and report.main(True, harness.RESULTS, str(page)) == 1
    results = tmp_path / "results"
    shutil.copytree(harness.RESULTS, results)
    path = results / "step_speed" / "cpu-2core.json"
    record = json.loads(path.read_text())
    record["summary"][0]["ratio"] *= 1.01
    path.write_text(json.dumps(record))
    assert report.main(True, str(results), report.PAGE) == 1
    assert report.main(False, str(results), str(page)) == 0 and report.main(True, str(results), str(page)) == 0


def test_every_flag_has_help():
    from benchmarks import __main__ as cli

    p = cli.parser()
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [*subs[0].choices.values()]
    parsers += [*next(a for a in parsers[1]._actions if isinstance(a, argparse._SubParsersAction)).choices.values()]
    for sub in parsers:
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings}"


def test_pool_speed_counts_the_kernels_of_the_entry_computation_only():
    """pool_speed.entry_ops counts the top-level instructions of ENTRY by opcode (a fusion once, not the ops
    inside it), and compiled_summary leaves out the instructions that launch nothing."""
    hlo = """HloModule m, entry_computation_layout={(f32[2]{0})->(f32[2]{0}, f32[2]{0})}

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %a = f32[2]{0} add(f32[2]{0} %p, f32[2]{0} %p)
}

ENTRY %main (x: f32[2]) -> (f32[2], f32[2]) {
  %x = f32[2]{0} parameter(0)
  %f = f32[2]{0} fusion(f32[2]{0} %x), kind=kLoop, calls=%fused
  %c = (f32[2]{0}, s8[16]{0}) custom-call(f32[2]{0} %f), custom_call_target="__cublas$gemm"
  %g = f32[2]{0} get-tuple-element((f32[2]{0}, s8[16]{0}) %c), index=0
  ROOT %t = (f32[2]{0}, f32[2]{0}) tuple(f32[2]{0} %f, f32[2]{0} %g)
}
"""
    assert pool_speed.entry_ops(hlo) == {
        "parameter": 1,
        "fusion": 1,
        "custom-call": 1,
        "get-tuple-element": 1,
        "tuple": 1,
    }

    class Compiled:  # what compiled_summary reads of a jax Compiled
        def cost_analysis(self):
            return {"flops": 6.0, "bytes accessed": 24.0}

        def as_text(self):
            return hlo

    summary = pool_speed.compiled_summary(Compiled())
    assert summary == {"flops": 6.0, "bytes_accessed": 24.0, "kernels": 2, "ops": {"custom-call": 1, "fusion": 1}}


@pytest.mark.slow
def test_a_tiny_benchmark_runs_end_to_end_into_its_own_results_dir(tmp_path):
    """`python -m benchmarks run selection_speed --repeats 2` on tiny pools writes one record under
    --results_dir (never the committed ones) with two kept rounds, every side timed, and the growth ratios."""
    cmd = [sys.executable, "-m", "benchmarks", "run", "selection_speed", "--repeats", "2", "--max_steal", "-1"]
    cmd += ["--pools", "500,1000", "--b", "8", "--dim", "4", "--centres", "8", "--results_dir", str(tmp_path)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 3), p.stderr[-3000:]  # 3: a loaded machine's record ("not a result")
    (slug,) = [f[:-5] for f in os.listdir(tmp_path / "selection_speed")]
    record = harness.read_record(str(tmp_path / "selection_speed" / f"{slug}.json"))
    assert [r["kept"] for r in record["rounds"]] == [True, True]
    assert set(record["rounds"][0]["s"]) == {f"{s} @ {n:,}" for s in harness_strategies() for n in (500, 1000)}
    assert [r["comparison"] for r in record["summary"]][0] == "random: pool 1,000 / pool 500"
    assert (p.returncode == 3) == record["verdict"].startswith("not a result")


def harness_strategies():
    from benchmarks import selection_speed

    return selection_speed.STRATEGIES
