"""`treelora compare`: the grid of runs, resuming without rerunning or overwriting, the mean +- sd summary against
hand-computed numbers, the selection rule, the plots, and one tiny comparison end to end."""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

import pytest
import torch

from treelora import cli
from treelora.cl import compare
from treelora.cl.compare import CompareError, Sweep

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fake_result(method: str, seed: int, acc: float, bwt: float | None, fwt: float | None = None, n: int = 3) -> dict:
    """A results.json entry: R's last row averages to ``acc`` (fractions), as a run's would."""
    R = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            R[i][j] = acc if i == n - 1 else 0.9
    return {
        "method": method,
        "task_names": [f"task{j}" for j in range(n)],
        "R": R,
        "metrics": {"acc": acc, "bwt": bwt, "fwt": fwt},
        "config": {"seed": seed},
        "method_options": {},
    }


def write_payload(path: Path, results: list[dict], options: dict | None = None, argv: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["treelora", "run", *(argv or [])])
    path.write_text(json.dumps({"command": command, "method_options": options or {}, "results": results}))
    return path


# --- summary -------------------------------------------------------------------------------------------------------


def test_summary_is_mean_and_sample_sd_over_seeds(tmp_path):
    accs, bwts = [0.5, 0.6, 0.7], [0.1, 0.2, 0.4]
    paths = [
        write_payload(
            tmp_path / f"s{seed}" / "results.json",
            [fake_result("seqlora", seed, accs[seed], bwts[seed], fwt=0.05), fake_result("treelora", seed, 0.3, 0.0)],
        )
        for seed in (2, 0, 1)
    ]
    groups = compare.collect(paths)
    rows = {r["method"]: r for r in compare.summary_rows(groups, None)}
    seq = rows["seqlora"]
    assert seq["seeds"] == [0, 1, 2]
    # By hand: ACC 50, 60, 70 -> mean 60, sd sqrt((100 + 0 + 100) / 2) = 10.
    assert seq["acc_mean"] == pytest.approx(60.0) and seq["acc_sd"] == pytest.approx(10.0)
    # BWT 10, 20, 40 -> mean 70/3 = 23.333, sd sqrt(((-13.333)^2 + (-3.333)^2 + 16.667^2) / 2) = sqrt(233.33).
    assert seq["bwt_mean"] == pytest.approx(23.3333, abs=1e-4) and seq["bwt_sd"] == pytest.approx(15.2753, abs=1e-4)
    assert seq["fwt_mean"] == pytest.approx(5.0) and seq["fwt_sd"] == pytest.approx(0.0, abs=1e-12)
    assert rows["treelora"]["fwt_mean"] is None and rows["treelora"]["acc_sd"] == pytest.approx(0.0, abs=1e-12)
    table = compare.format_summary(list(rows.values()))
    assert "| SeqLoRA " in table and "60.0 +- 10.0" in table and "23.3 +- 15.3" in table
    assert "FWT (%)" in table and "| TreeLoRA " in table and " - " in table
    # The per-task curves average the matrices over seeds: the last row holds each seed's ACC.
    seq_group = next(g for g in groups if g.method == "seqlora")
    assert [m[2, 0] for m in seq_group.matrices] == pytest.approx([50.0, 60.0, 70.0])


def test_a_seed_reported_twice_is_an_error(tmp_path):
    paths = [write_payload(tmp_path / n / "results.json", [fake_result("seqlora", 0, 0.5, 0.1)]) for n in "ab"]
    with pytest.raises(CompareError, match="seed 0 appears in two results files"):
        compare.collect(paths)


def test_selection_takes_the_best_mean_acc_among_values_run_on_every_seed(tmp_path):
    sweep = Sweep("treelora", "reg_lambda", (2, 20, 200))
    # Value 200 has the best mean but lacks seed 2; 20 beats 2 on the mean although 2 wins seed 0.
    runs = {2: [0.50, 0.40, 0.42], 20: [0.45, 0.48, 0.47], 200: [0.90, 0.90, None]}
    paths = []
    for value, accs in runs.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                path = tmp_path / f"v{value}-s{seed}" / "results.json"
                paths.append(write_payload(path, [fake_result("treelora", seed, acc, 0.1)], {"reg_lambda": value}))
    paths.append(write_payload(tmp_path / "base" / "results.json", [fake_result("seqlora", 0, 0.99, 0.2)]))
    groups = compare.collect(paths, sweep)
    assert [(g.method, g.value) for g in groups] == [
        ("treelora", 2),
        ("treelora", 20),
        ("treelora", 200),
        ("seqlora", None),
    ]
    chosen = compare.select(groups)
    assert set(chosen) == {"treelora"} and chosen["treelora"].value == 20


def test_sweep_parsing_checks_the_method_the_option_and_the_values():
    sweep = Sweep.parse("TreeLoRA:reg_lambda=2,20,2e3")
    assert sweep == Sweep("treelora", "reg_lambda", (2, 20, 2000.0))
    for text, message in [
        ("treelora=2", "METHOD:OPTION"),
        ("nosuch:reg_lambda=2", "nosuch"),
        ("treelora:no_such_option=1", "no_such_option"),
        ("treelora:reg_lambda=2,2", "twice"),
    ]:
        with pytest.raises(CompareError, match=message):
            Sweep.parse(text)


# --- the grid and resuming -----------------------------------------------------------------------------------------


def test_plan_runs_the_unswept_methods_once_per_seed_and_the_swept_one_per_value(tmp_path):
    sweep = Sweep("treelora", "reg_lambda", (2, 20))
    cells = compare.plan(["TreeLoRA", "SeqLoRA", "EWC"], [0, 1], tmp_path, ["--max-steps", "5"], sweep)
    assert len(cells) == 2 * (1 + 2)
    base = cells[0]
    assert base.methods == ("seqlora", "ewc") and base.folder == tmp_path / "runs" / "base" / "seed-0"
    assert list(base.argv) == ["--methods", "seqlora,ewc", "--seed", "0", "--out", str(base.folder), "--max-steps", "5"]
    swept = cells[2]
    assert swept.value == 20 and swept.folder == tmp_path / "runs" / "treelora-reg_lambda-20" / "seed-0"
    assert swept.argv[swept.argv.index("--method-option") + 1] == "reg_lambda=20"
    with pytest.raises(CompareError, match="--seed is set by the comparison"):
        compare.plan(["SeqLoRA"], [0], tmp_path, ["--seed", "3"])
    with pytest.raises(CompareError, match="reg_lambda is swept"):
        compare.plan(["TreeLoRA"], [0], tmp_path, ["--method-option", "reg_lambda=1"], sweep)
    with pytest.raises(CompareError, match="not in --methods"):
        compare.plan(["SeqLoRA"], [0], tmp_path, [], sweep)


def test_selection_needs_a_sweep_and_a_validation_split():
    sweep = Sweep("treelora", "reg_lambda", (2, 20))
    compare.check_selection("validation-acc", ["--validation", "0.2"], sweep)
    compare.check_selection("validation-acc", ["--validation=0.2"], sweep)
    with pytest.raises(CompareError, match="--validation FRACTION"):
        compare.check_selection("validation-acc", ["--max-steps", "2"], sweep)
    with pytest.raises(CompareError, match="needs --sweep"):
        compare.check_selection("validation-acc", ["--validation", "0.2"], None)


def fake_launcher(calls: list[list[str]]):
    """Records each call and writes the results.json the run would (ACC from the seed)."""

    def launch(argv):
        calls.append(list(argv))
        folder = Path(argv[argv.index("--out") + 1])
        seed = int(argv[argv.index("--seed") + 1])
        methods = argv[argv.index("--methods") + 1].split(",")
        options = {}
        if "--method-option" in argv:
            key, _, value = argv[argv.index("--method-option") + 1].partition("=")
            options[key] = json.loads(value)
        results = [fake_result(m, seed, 0.5 + 0.1 * seed, 0.1) for m in methods]
        write_payload(folder / "results.json", results, options, argv=[a for a in argv if a != "--resume"])
        return 0

    return launch


def test_finished_runs_are_kept_and_interrupted_ones_resumed(tmp_path):
    cells = compare.plan(["TreeLoRA", "SeqLoRA"], [0, 1, 2], tmp_path, ["--max-steps", "2"])
    # Seed 0 finished earlier (its file must stay byte for byte); seed 1 was interrupted (folder, no results.json).
    done = write_payload(cells[0].results_path, [fake_result("treelora", 0, 0.11, 0.0)], argv=list(cells[0].argv))
    before = done.read_bytes()
    (cells[1].folder / "checkpoints").mkdir(parents=True)
    calls: list[list[str]] = []
    ran = compare.run_grid(cells, fake_launcher(calls), log=lambda line: None)
    assert ran == cells[1:] and len(calls) == 2
    assert calls[0] == [*cells[1].argv, "--resume"] and calls[1] == list(cells[2].argv)
    assert done.read_bytes() == before
    # A second pass runs nothing.
    assert compare.run_grid(cells, fake_launcher(calls), log=lambda line: None) == [] and len(calls) == 2


def test_a_finished_run_with_other_arguments_is_not_taken_as_this_one(tmp_path):
    cells = compare.plan(["SeqLoRA"], [0], tmp_path, ["--max-steps", "2"])
    write_payload(cells[0].results_path, [fake_result("seqlora", 0, 0.5, 0.1)], argv=["--max-steps", "9"])
    calls: list[list[str]] = []
    with pytest.raises(CompareError, match="was run with other arguments"):
        compare.run_grid(cells, fake_launcher(calls), log=lambda line: None)
    assert calls == []


def test_a_failed_run_stops_the_grid_with_its_exit_code(tmp_path):
    cells = compare.plan(["SeqLoRA"], [0, 1], tmp_path, [])
    with pytest.raises(CompareError, match="exited with code 2 \\(2 runs not finished\\)"):
        compare.run_grid(cells, lambda argv: 2, log=lambda line: None)


def test_report_writes_the_table_files_and_both_plots(tmp_path):
    sweep = Sweep("treelora", "reg_lambda", (2, 20))
    cells = compare.plan(["TreeLoRA", "SeqLoRA"], [0, 1], tmp_path, ["--validation", "0.2"], sweep)
    compare.run_grid(cells, fake_launcher([]), log=lambda line: None)
    lines: list[str] = []
    written = compare.report(cells, tmp_path, sweep, "validation-acc", log=lines.append)
    names = sorted(p.name for p in written)
    assert names == ["comparison.csv", "comparison.json", "comparison.md", "task_curves.png", "tradeoff.png"]
    for name in ("tradeoff.png", "task_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    document = json.loads((tmp_path / "comparison.json").read_text())
    # Equal ACC at both values: the tie goes to the first value.
    assert document["selected"] == {"treelora": 2}
    assert any("(selected)" in line for line in lines)
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert csv_rows[0].startswith("method,option,value,seeds,acc_mean") and len(csv_rows) == 4


def test_joint_training_has_no_bwt_in_the_table_and_no_point_in_the_plane(tmp_path):
    """Joint training is one stage: its BWT is null; the table shows '-' and the ACC-BWT plot leaves it out."""
    paths = [
        write_payload(
            tmp_path / f"s{seed}" / "results.json",
            [fake_result("seqlora", seed, 0.5, 0.2), fake_result("joint", seed, 0.6 + 0.1 * seed, None)],
        )
        for seed in (0, 1)
    ]
    groups = compare.collect(paths)
    rows = {r["method"]: r for r in compare.summary_rows(groups, None)}
    assert rows["joint"]["bwt_mean"] is None and rows["joint"]["acc_mean"] == pytest.approx(65.0)
    assert rows["seqlora"]["bwt_mean"] == pytest.approx(20.0)
    table = compare.format_summary(list(rows.values()))
    joint_line = next(line for line in table.splitlines() if line.startswith("| Joint"))
    assert joint_line.split("|")[3].strip() == "-"
    compare.plot_tradeoff(groups, tmp_path / "t.png", None, {})
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


# --- the command ---------------------------------------------------------------------------------------------------

TINY = ["--model", "bert-tiny", "--train-per-class", "4", "--test-per-class", "3", "--epochs", "1", "--quiet"]


def test_compare_end_to_end_two_methods_two_seeds(tmp_path, capsys, monkeypatch):
    calls: list[list[str]] = []

    def in_process(argv):  # the same `treelora run` machinery, without a new interpreter per run
        calls.append(list(argv))
        return cli.main(["run", *argv])

    monkeypatch.setattr(cli, "_launch_run", in_process)
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "TreeLoRA,SeqLoRA", "--seeds", "0,1", "--out", str(out)]
    argv += ["--", *TINY, "--max-steps", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert len(calls) == 2
    runs = [json.loads((out / "runs" / "base" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    csv_rows = (out / "comparison.csv").read_text().splitlines()
    assert len(csv_rows) == 3
    for i, method in enumerate(("treelora", "seqlora")):
        accs = [100 * run["results"][i]["metrics"]["acc"] for run in runs]
        fields = csv_rows[1 + i].split(",")
        assert fields[0] == method and fields[3] == "0 1"
        assert float(fields[4]) == pytest.approx(statistics.mean(accs))
        assert float(fields[5]) == pytest.approx(statistics.stdev(accs))
    assert "| TreeLoRA" in printed and "| SeqLoRA" in printed
    for name in ("tradeoff.png", "task_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG
    # Rerunning the command reruns nothing and rewrites the summary from the same files.
    assert cli.main(argv) == 0 and len(calls) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "--seeds expects comma-separated integers"),
        (["--sweep", "treelora:reg_lambda=1", "--select-by", "validation-acc"], "--validation FRACTION"),
        (["--", "--out", "elsewhere"], "--out is set by the comparison"),
        (["--methods", "SeqLoRA", "--sweep", "treelora:reg_lambda=1"], "not in --methods"),
    ],
)
def test_bad_compare_input_is_one_line_exit_2_and_nothing_run(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli, "_launch_run", lambda argv: pytest.fail("nothing may run"))
    assert cli.main(["compare", "--out", str(tmp_path / "cmp"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("treelora compare: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_each_run_is_its_own_treelora_run_process(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, command, env):
            seen["command"] = command

        def wait(self):
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", FakePopen)
    assert cli._launch_run(["--seed", "1"]) == 0
    assert seen["command"][1:] == ["-m", "treelora", "run", "--seed", "1"]
