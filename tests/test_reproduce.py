"""The reproduction protocol (refimpl.reproduce): statistics, verdicts, parts and merge, JSON schema, the CLI."""
import json
import math
import os

import numpy as np
import pytest

from refimpl import reproduce as R
from refimpl import reproduce_report as RR
from refimpl.experiments import reproduce_main, table_markdown

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "text_pairs")
TINY = R.Scale(planted_n_targets=400, planted_n_queries=300, planted_n_test=60, planted_n_features=16,
               text_max_test=0, text_n_features=2 ** 10, text_batch_size=16, text_dim=16, text_k=2, text_n_uniform=2,
               text_steps=10, steps=12, batch_size=16, dim=16, lr_warmup=2,
               k=2, n_uniform=2, n_landmarks=4, n_samples=16, reencode_every=3, snm_refresh_every=4,
               bf_refresh_every=3, eval_points=2)


def test_task_scale_gives_the_text_task_its_own_batch_dimension_and_negatives():
    s = R.dataclasses.replace(TINY, text_batch_size=8, text_dim=12, text_lr=0.5, text_k=3, text_n_uniform=5)
    t = R.task_scale(s, "text")
    assert (t.batch_size, t.dim, t.lr, t.k, t.n_uniform) == (8, 12, 0.5, 3, 5)
    assert R.task_scale(s, "planted") is s
    kw, _ = R._recipe(t, "text", 8)
    assert kw["batch_size"] == 8 and kw["dim"] == 12 and kw["n_uniform"] == 5
    assert kw["input_weights"] == s.text_input_weights and kw["init"] == s.text_init


# ------------------------------------------------------------------------------------------------ statistics
def test_mean_se_known_values_and_edge_cases():
    m, se = RR.mean_se([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0 and math.isclose(se, np.std([1, 2, 3, 6], ddof=1) / 2.0)
    m, se = RR.mean_se([0.5])
    assert m == 0.5 and math.isnan(se)
    m, se = RR.mean_se([1.0, None, float("nan"), 3.0])  # missing values are left out, not propagated
    assert (m, se) == (2.0, 1.0)
    assert all(math.isnan(x) for x in RR.mean_se([]))


def test_verdict_holds_does_not_hold_cannot_tell():
    assert RR.verdict([1.0, 1.1, 0.9])["verdict"] == "holds"
    assert RR.verdict([-1.0, -1.1, -0.9])["verdict"] == "does not hold"
    v = RR.verdict([1.0, 2.0, 3.0])  # mean 2, se 1/sqrt(3), t(2, .975) = 4.303: interval [-0.48, 4.48]
    assert v["verdict"] == "cannot tell at 3 seeds"
    assert math.isclose(v["lo"], 2 - 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    assert RR.verdict([5.0])["verdict"] == "cannot tell at 1 seed"
    assert RR.verdict([0.0, 0.0, 0.0])["verdict"] == "cannot tell at 3 seeds"  # equality is not evidence
    # a wider level can only turn a verdict into "cannot tell"
    assert RR.verdict([1.0, 1.5, 0.6], level=0.999)["verdict"].startswith("cannot tell")


def _run(task, row, seed, r1, **extra):
    final = {"R@1": r1, "R@5": r1, "R@10": r1, "R@20": r1, "R@100": r1, "MRR@10": r1, "mem_percent": 1.0,
             "encoder_calls": 10, "wall_time": 1.0, "cpu_per_mining_step": extra.pop("tps", 0.01)}
    return {"task": task, "row": row, "seed": seed, "final": final, "evals": [{"step": 0, "R@1": 0.0},
                                                                           {"step": 10, "R@1": r1}], **extra}


def test_summary_gap_is_paired_by_seed_and_claims_use_paired_differences():
    runs = []
    for s, (bf, dy, snm) in enumerate([(0.50, 0.48, 0.40), (0.60, 0.59, 0.52), (0.40, 0.39, 0.30)]):
        runs += [_run("t", "brute-force", s, bf), _run("t", "dynnibal", s, dy, tps=0.02),
                 _run("t", "snm-3", s, snm, tps=0.01)]
    runs.append(_run("t", "snm-3", 7, 0.1))  # a seed without brute force: no gap, no paired claim value
    summ = RR.summarize(runs, "t")
    assert summ["dynnibal"]["seeds"] == [0, 1, 2]
    assert math.isclose(summ["dynnibal"]["gap_to_bf"][0], 100 * np.mean([0.02, 0.01, 0.01]))
    assert summ["snm-3"]["R@1"][0] == pytest.approx(np.mean([0.40, 0.52, 0.30, 0.1]))
    assert summ["snm-3"]["gap_to_bf"][0] == pytest.approx(100 * np.mean([0.10, 0.08, 0.10]))
    assert summ["dynnibal"]["MRR@10"] == summ["dynnibal"]["R@1"]  # the fixture sets MRR@10 = R@1
    cl = {c["id"]: c for c in RR.claims(runs, "t")}
    h = cl["gap-halved-vs-snm-3"]["values"]
    assert h == pytest.approx([10 / 2 - 2, 8 / 2 - 1, 10 / 2 - 1])
    assert cl["gap-halved-vs-snm-3"]["verdict"] == "holds"
    assert cl["steps-4x-snm"]["values"] == pytest.approx([0.02] * 3)
    assert "gap-halved-vs-in-batch" not in cl  # rows missing: claim left out


def test_table_formatter_renders_mean_and_standard_error():
    md = table_markdown([("a", {"R@1": (0.5, 0.01), "mem_percent": (3.0, 0.0), "gap_to_bf": (1.25, 0.5)})],
                        ks=(1,), probes=False, mrr=(1, 100))
    row = md.splitlines()[2]
    assert "0.500 ± 0.010" in row and "| 3 |" in row and "+1.2 ± 0.5" in row and row.count(" - ") >= 2


# ------------------------------------------------------------------------------------------------ parts
@pytest.fixture(scope="module")
def tiny_part():
    return R.run_part(["planted", "text"], ["in-batch", "uniform", "dynnibal", "brute-force", "snm-top-3"], [0, 1],
                      TINY, data_dir=FIXTURE)


def _steps(run):
    return TINY.steps if run["task"] == "planted" else TINY.text_steps  # each task its own step count


def test_part_json_schema(tiny_part, tmp_path):
    p = tiny_part
    assert p["schema"] == R.SCHEMA and set(p["tasks"]) == {"planted", "text:text_pairs"}
    assert p["commit"] is None or len(p["commit"]["sha"]) == 40
    assert {"platform", "cpu_count", "memory_bytes", "python", "numpy"} <= set(p["machine"])
    assert p["scale"] == TINY.as_dict()
    assert len(p["runs"]) == 2 * 5 * 2  # tasks x rows x seeds
    for r in p["runs"]:
        assert {"task", "row", "seed", "final", "evals", "config", "notes", "run_seconds"} <= set(r)
        assert r["config"]["in_batch"] and r["evals"][-1]["step"] == _steps(r)
    dyn = [r for r in p["runs"] if r["row"] == "dynnibal"]
    assert all(r["config"]["miner"]["sampler"] == "paper" and r["dynnibal"]["n_refreshes"] == 1 for r in dyn)
    assert all(r["config"]["miner"]["per_example"] for r in dyn)
    top = [r for r in p["runs"] if r["row"] == "snm-top-3"]
    assert len(top) == 4 and all(r["config"]["miner"]["select"] == "top" for r in top)
    bf = [r for r in p["runs"] if r["row"] == "brute-force"]
    assert all(r["config"]["miner"]["refresh_every"] == TINY.bf_refresh_every for r in bf)
    for r in p["runs"]:  # the CPU profile: every step counted once; MRR@1/10/100 from evaluate
        c = r["cpu"]
        assert c["warm_steps"] + c["mining_steps"] == _steps(r) and c["steps_total"] > 0
        assert r["final"]["train_cpu"] == c["steps_total"] and {"MRR@1", "MRR@10", "MRR@100"} <= set(r["final"])
    assert set(p["data_cpu_seconds"]) == set(p["tasks"])
    assert "tfidf" in p["tasks"]["text:text_pairs"]
    paths = RR.write_result(p, str(tmp_path), "part", table_markdown, with_figure=True)
    loaded = json.load(open(paths[0]))  # strict JSON: no NaN
    assert loaded["runs"][0]["final"]["R@1"] == p["runs"][0]["final"]["R@1"]
    md = open(paths[1]).read()
    assert "### Table 1" in md and "### Table 2" in md and "### Landmark ablation" in md and "±" in md
    assert os.path.getsize(paths[2]) > 1000


def test_same_seed_same_numbers(tiny_part):
    again = R.run_part(["planted"], ["uniform"], [1], TINY)
    a = next(r for r in tiny_part["runs"] if r["task"] == "planted" and r["row"] == "uniform" and r["seed"] == 1)
    assert again["runs"][0]["final"]["R@1"] == a["final"]["R@1"]
    assert again["runs"][0]["evals"] == a["evals"]


def _write_part(tmp_path, name, part):
    path = tmp_path / name
    path.write_text(json.dumps(RR.jsonable(part)))
    return str(path)


def test_merge_concatenates_parts_and_refuses_duplicates_and_mismatches(tiny_part, tmp_path):
    by_seed = [{**tiny_part, "runs": [r for r in tiny_part["runs"] if r["seed"] == s]} for s in (0, 1)]
    d = tmp_path / "parts"
    d.mkdir()
    f0 = _write_part(d, "a.json", by_seed[0])
    _write_part(d, "b.json", by_seed[1])
    (d / "notes.json").write_text("{}")  # other JSON beside the parts is ignored
    merged = RR.merge_parts(RR.load_parts([str(d)]))
    assert len(merged["runs"]) == len(tiny_part["runs"]) and len(merged["parts"]) == 2
    assert RR.summarize(merged["runs"], "planted")["uniform"]["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="seed 0 is in both"):
        RR.merge_parts(RR.load_parts([f0, f0]))
    other = {**by_seed[1], "scale": {**by_seed[1]["scale"], "steps": 99}}
    f2 = _write_part(tmp_path, "c.json", other)
    with pytest.raises(ValueError, match="different configuration"):
        RR.merge_parts(RR.load_parts([f0, f2]))
    with pytest.raises(ValueError, match="no part file"):
        RR.load_parts([str(tmp_path / "parts" / "notes.json")])


def test_run_part_refuses_bad_arguments():
    with pytest.raises(ValueError, match="text task"):
        R.run_part(["text"], ["uniform"], [0], TINY)
    with pytest.raises(ValueError, match="unknown"):
        R.run_part(["planted"], ["nope"], [0], TINY)
    with pytest.raises(ValueError, match="distinct"):
        R.run_part(["planted"], ["uniform"], [0, 0], TINY)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_part_then_merge_end_to_end(tmp_path, capsys):
    out1 = tmp_path / "p"
    rc = reproduce_main(["--quick", "--tasks", "planted,text", "--data", FIXTURE, "--rows",
                         "in-batch,uniform,dynnibal,brute-force", "--seeds", "0,1", "--steps", "12", "--n-targets",
                         "600", "--out-dir", str(out1), "--no-progress"])
    assert rc == 0
    files = sorted(os.listdir(out1))
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
    rc = reproduce_main(["--merge", str(out1), "--out-dir", str(tmp_path / "m"), "--no-figure"])
    assert rc == 0
    merged = json.load(open(tmp_path / "m" / "merged.json"))
    assert {"summary", "claims", "parts", "runs"} <= set(merged)
    assert merged["summary"]["planted"]["dynnibal"]["seeds"] == [0, 1]
    assert "gap-halved-vs-uniform" in {c["id"] for c in merged["claims"]["planted"]}
    assert "Table 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--rows", "uniform,bogus"], "--rows"),
    (["--seeds", "0,0"], "distinct"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "0,,1"], "--seeds"),
    (["--tasks", "text"], "--data"),
    (["--data", "/nonexistent/dir"], "--data"),
    (["--quick", "--steps", "5"], "--steps"),
    (["--merge", "/nonexistent/part.json"], "--merge"),
    (["--merge", ".", "--rows", "uniform"], "--merge"),
    (["--plan", "/nonexistent/dir"], "--plan"),
    (["--plan", ".", "--rows", "uniform"], "--plan"),
    (["--plan", ".", "--quick"], "--plan"),
    (["--plan", FIXTURE], "no part file"),
    (["--plan", ".", "--steps", "100", "--total-budget", "10"], "--total-budget"),
    (["--quick", "--total-budget", "10"], "--total-budget"),
])
def test_cli_validates_every_argument_before_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        reproduce_main(argv + ["--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(f.endswith(".json") for f in os.listdir(tmp_path))


def test_default_rows_and_part_names():
    assert "full-softmax" not in R.DEFAULT_ROWS["planted"] + R.DEFAULT_ROWS["text"]
    assert "brute-force" in R.DEFAULT_ROWS["planted"]
    assert set(R.TABLE2) | set(R.ABLATION) <= set(R.DEFAULT_ROWS["text"])
    assert R.part_stem(["planted"], None, [0]) == "part-planted-default-s0"
    assert R.part_stem(["text"], ["dynnibal", "snm-3"], [0, 1, 2]) == "part-text-dynnibal+snm-3-s0-1-2"
    many = list(R.ROWS)[:-1]
    assert R.part_stem(["text"], many, [0]) == R.part_stem(["text"], many, [0]) and len(R.part_stem(["text"], many,
                                                                                                     [0])) < 60


# ------------------------------------------------------------------------------------------------ plan
def _cal_run(task, row, miner, warm=0.1, steady=0.2, first=5.0, events=None, eval_each=3.0, warm_steps=5):
    return {"task": task, "row": row, "seed": 0, "config": {"miner": miner},
            "cpu": {"warm_steps": warm_steps, "warm_step": warm, "mining_steps": 15, "first_mining_step": first,
                    "steady_step": steady, "mining_step_mean": steady, "events": events or {},
                    "steps_total": 0.0, "eval_each": eval_each}}


def test_estimate_run_is_the_documented_sum():
    scale = R.dataclasses.replace(R.FULL, steps=400, warmup_fraction=0.25, eval_points=4, reencode_every=25,
                                  bf_refresh_every=10)
    W, M, n_eval = 100, 300, 5  # evaluations at steps 0, 100, 200, 300 and the final one
    assert R._n_evals(scale) == n_eval
    uni = _cal_run("planted", "uniform", {"name": "uniform"}, warm_steps=0)
    assert R.estimate_run(uni, scale) == pytest.approx(400 * 0.2 + 4.8 + n_eval * 3.0)
    bf = _cal_run("planted", "brute-force", {"name": "brute-force", "refresh_every": 10},
                  events={"refresh": [2.2, 2.2]})
    assert R.estimate_run(bf, scale) == pytest.approx(W * 0.1 + M * 0.2 + 4.8 + (299 // 10) * 2.0 + n_eval * 3.0)
    dyn = _cal_run("planted", "dynnibal", {"name": "dynnibal", "reencode_every": 25}, events={"refresh": [4.2]})
    # one exact refresh (seen: 4.0 extra); re-encodes not seen in the calibration: costed as the start (4.8 extra)
    assert R.estimate_run(dyn, scale) == pytest.approx(W * 0.1 + M * 0.2 + 4.8 + 4.0 + (299 // 25 - 1) * 4.8
                                                       + n_eval * 3.0)


def test_plan_packs_every_default_row_and_seed_into_parts_within_budget():
    scale = R.dataclasses.replace(R.FULL, steps=100)
    runs = [_cal_run("planted", r, {"name": "uniform"}, warm_steps=0, steady=1.0, first=1.0, eval_each=0.0)
            for r in R.DEFAULT_ROWS["planted"]]  # 100 s per run
    part = {"scale": R.dataclasses.replace(scale, steps=20).as_dict(), "tasks": {"planted": {}},
            "data_cpu_seconds": {"planted": 60.0}, "runs": runs}
    items = R.plan([part], scale, [0, 1, 2], budget_minutes=6)
    assert all(i["minutes"] <= 6 for i in items) and not any(i["over_budget"] for i in items)
    done = sorted((r, i["seed"]) for i in items for r in i["rows"])
    assert done == sorted((r, s) for r in R.DEFAULT_ROWS["planted"] for s in (0, 1, 2))
    for i in items:  # each part: 1 min of data + 100 s per row, packed greedily under 6 min
        assert i["minutes"] == pytest.approx(1 + len(i["rows"]) * 100 / 60)
        a = R.parser().parse_args(i["command"].split()[4:])
        assert a.rows == i["rows"] and a.seeds == [i["seed"]] and a.steps == 100 and a.tasks == ["planted"]
    bad = {**part, "scale": {**part["scale"], "k": 3}}
    with pytest.raises(ValueError, match="k = 3"):
        R.plan([bad], scale, [0])
    # a field the planted task does not read may differ; one it reads may not
    assert R.plan([{**part, "scale": {**part["scale"], "text_dim": 7}}], scale, [0]) == R.plan([part], scale, [0])
    with pytest.raises(ValueError, match="planted_n_features = 7"):
        R.plan([{**part, "scale": {**part["scale"], "planted_n_features": 7}}], scale, [0])
    with pytest.raises(ValueError, match="no calibration run"):
        R.plan([{**part, "runs": runs[:-1]}], scale, [0])


def test_largest_steps_is_the_last_step_count_within_the_total():
    scale = R.FULL
    runs = [_cal_run("planted", r, {"name": "uniform"}, warm_steps=0, steady=1.0, first=1.0, eval_each=0.0)
            for r in R.DEFAULT_ROWS["planted"]]  # 1 s per step per row
    part = {"scale": R.with_steps(scale, 20).as_dict(), "tasks": {"planted": {}}, "data_cpu_seconds": {"planted": 0.0},
            "runs": runs}
    n = len(R.DEFAULT_ROWS["planted"])
    # total CPU minutes = 2 seeds x n rows x steps / 60; the per-part budget (60 min) holds one row of <= 3600 steps
    steps, items = R.largest_steps([part], scale, [0, 1], total_minutes=2 * n * 425 / 60)["planted"]
    assert steps == 400 and sum(i["minutes"] for i in items) == pytest.approx(2 * n * 400 / 60)
    assert all(i["steps"] == 400 and "--steps 400" in i["command"] for i in items)
    assert R.largest_steps([part], scale, [0, 1], total_minutes=1)["planted"][0] is None
    # two tasks share the total equally; each gets its own step count (text here costs 2 s per step per row)
    text_runs = [_cal_run("text:t", r, {"name": "uniform"}, warm_steps=0, steady=2.0, first=2.0, eval_each=0.0)
                 for r in R.DEFAULT_ROWS["text"]]
    text = {"scale": part["scale"], "tasks": {"text:t": {"data_dir": "/d/t"}}, "data_cpu_seconds": {"text:t": 0.0},
            "runs": text_runs}
    m = len(R.DEFAULT_ROWS["text"])
    both = R.largest_steps([part, text], scale, [0, 1], total_minutes=2 * 2 * n * 425 / 60)
    assert both["planted"][0] == 400
    assert both["text:t"][0] == (2 * n * 425 // (2 * m * 2)) // 50 * 50
    assert all("--steps" in i["command"] and "--data /d/t" in i["command"] for i in both["text:t"][1])


def test_checkpoint_after_every_run_keeps_finished_runs(tmp_path):
    seen = []
    part = R.run_part(["planted"], ["uniform", "in-batch"], [0, 1], TINY,
                      checkpoint=lambda p: seen.append((len(p["runs"]), p["complete"])))
    assert seen == [(1, False), (2, False), (3, False), (4, False)] and part["complete"]
    path = RR.write_json({**part, "runs": part["runs"][:3], "complete": False}, str(tmp_path), "partial")
    merged = RR.merge_parts(RR.load_parts([path]))  # a killed part merges with its finished runs
    assert len(merged["runs"]) == 3 and merged["parts"][0]["complete"] is False
    assert "Incomplete parts" in RR.markdown_report(merged, table_markdown)
    assert not os.path.exists(path + ".tmp")
