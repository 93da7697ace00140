"""memoir_eval: metric functions on hand-computed cases, loaders on the real files, the protocol end to
end on a few records, and the lm-eval pack offline against `memoir eval` on the same snapshot."""
from __future__ import annotations

import json
import math

import pytest
import torch

from memoir_eval.calibrate import pick_tau, routing_memory
from memoir_eval.metrics import exact_match, locality, mean_stderr, normalize_answer, perplexity, token_accuracy
from memoir_eval.protocol import chunk_positions, summarize

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# -- pure functions ------------------------------------------------------------------------------


def test_token_metrics_hand_computed():
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert locality([5, 6], [5, 7]) == 0.5  # against the PRE-edit argmax, not the gold answer
    with pytest.raises(ValueError, match="equal, non-empty"):
        token_accuracy([1], [1, 2])
    assert perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)  # exp(mean NLL) = exp(log 4)
    m, se = mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_exact_match_normalised():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match(" the Paris Saint-Germain club\nmore", "Paris Saint-Germain") == 1.0
    assert exact_match(" Paris, France", "Paris France") == 1.0
    assert exact_match(" Lyon", "Paris") == 0.0
    assert exact_match("Paris", "Paris Saint") == 0.0  # too short


def test_chunks_and_summary():
    chunks, total = chunk_positions(1037, 100, None)
    assert total == 10 and chunks[0] == list(range(100)) and chunks[-1][-1] == 999
    chunks, total = chunk_positions(1037, 10, 2)
    assert (len(chunks), total) == (2, 100)
    assert chunk_positions(1037, 1000, None) == ([list(range(1000))], 1)
    assert chunk_positions(600, 600, None)[1] == 1
    s = summarize([[dict(rel=1.0), dict(rel=0.0)], [dict(rel=1.0)]])
    assert s["rel"]["mean"] == pytest.approx(0.75)  # mean of chunk means (0.5, 1.0)
    assert s["rel"]["n"] == 3 and s["rel"]["median"] == 1.0


def test_share_by_position_in_shard_over_full_shards():
    """Shards of 3 edits: the first edit of each full shard answers, the second half the time, the third never;
    the newest shard (2 edits, partial) is left out; blocks of consecutive edits, oldest first."""
    from memoir_eval.age import by_shard_position, full_shards, in_blocks

    ok = [1, 1, 0, 1, 0, 0, 1, 1]
    shards = [0, 0, 0, 1, 1, 1, 2, 2]
    got = by_shard_position(ok, shards)
    assert got == {"per_shard": 3, "full_shards": 2, "mean": 0.5, "by_position": [1.0, 0.5, 0.0]}
    assert in_blocks(ok, 3) == [2 / 3, 1 / 3, 1.0]
    assert full_shards(got) == "0.500 (2 x 3)"
    assert by_shard_position([], [])["mean"] is None


def test_answers_by_kind_asks_each_request_of_its_own_edit(tiny_model_dir):
    """Two edits of a random 2-block model: each edit prompt and the one paraphrase route to their own edit; a kind
    of request no fact has (statements here) is left out of the report."""
    from memoir_eval.greedy import answers_by_kind
    from memoir_vllm.session import Memoir

    m = Memoir.create(tiny_model_dir, n_iter=2)
    facts = [{"prompt": "The capital of Norway is", "target": "Bergen", "rephrase": "Norway's capital city is"},
             {"prompt": "Lionel Messi plays for", "target": "Ajax"}]
    for f in facts:
        m.edit(f["prompt"], f["target"])
    got = answers_by_kind(m, facts, block=1, max_new_tokens=3)
    assert "cloze" not in got and len(got["edited_by_age"]) == 2 and len(got["paraphrase_by_age"]) == 1
    assert got["edited_routed"] == got["paraphrase_routed"] == 1.0
    assert got["edited_by_shard_position"]["per_shard"] == 2 and 0.0 <= got["edited"] <= 1.0
    second = answers_by_kind(m, facts, block=1, max_new_tokens=3, only=[1])  # its one fact has no paraphrase
    assert "paraphrase" not in second and len(second["edited_by_age"]) == 1 and second["edited_routed"] == 1.0


def test_rel_by_age_blocks_oldest_first_and_conflicts_apart(tmp_path):
    from memoir_eval.age import age_markdown, by_age, conflict_split, edited_again, plot_by_age
    from memoir_eval.data import EvalRecord

    # 250 edits: the oldest 100 answer 1 in 4, the next 100 half, the newest 50 all
    rows = [dict(record=i, rel=float(i % 4 == 0) if i < 100 else float(i % 2 == 0) if i < 200 else 1.0)
            for i in range(250)]
    ages = by_age([rows])
    assert [(a["edits"], a["n"], a["rel"]) for a in ages] == [("0-99", 100, .25), ("100-199", 100, .5),
                                                              ("200-299", 50, 1.0)]
    assert by_age([rows[:150]]) == []  # fewer than two blocks: nothing to compare
    assert "| 0-99 | 100 | 0.250 |" in age_markdown(ages, 250)
    plot_by_age(ages, 250, "zsre", tmp_path / "age.png")
    assert (tmp_path / "age.png").stat().st_size > 0

    # record 0's question is edited again at 2 (another target) and 3 (the newest); 1 is edited once;
    # 4 repeats 1 with the SAME target: no conflict
    recs = [EvalRecord("Who built X?", "A"), EvalRecord("Where is Y?", "B"), EvalRecord("who  built x?", "C"),
            EvalRecord("Who built X?", "D"), EvalRecord("Where is Y?", "B")]
    assert edited_again(recs, [0, 1, 2, 3, 4]) == {0: 3, 2: 3}
    assert edited_again(recs, [0, 1]) == {}  # the later edits are in another chunk
    chunk = [dict(record=0, rel=0.0, rel_em=0.0, rel_text=" D."), dict(record=1, rel=1.0, rel_em=1.0),
             dict(record=2, rel=0.0, rel_em=0.0, rel_text=" D"), dict(record=3, rel=1.0, rel_em=1.0),
             dict(record=4, rel=1.0, rel_em=1.0)]
    split = conflict_split([chunk], recs, [[0, 1, 2, 3, 4]])
    assert split["edited_again"] == {"n": 2, "rel": 0.0, "rel_em": 0.0, "newest_em": 1.0}  # they answer the newest
    assert split["single"]["n"] == 3 and split["single"]["rel"] == 1.0


def test_perplexity_report_shows_the_median_and_plots_ppl(tmp_path):
    from memoir_eval.report import markdown_table, plot

    rows = [dict(rel=1.0, loc=1.0, rel_ppl=ppl, pre_rel_ppl=20.0, rel_overlap=1.0) for ppl in (1.1, 1.2, 900.0)]
    run = dict(chunks_run=1, chunks_total=200, edit_s=3.0, n_edits=3, metrics=summarize([rows]))
    results = dict(data="hallucination", model="default", config=dict(layer=25, k=439, tau=0.5, lr=10.0),
                   runs={"3": run})
    table = markdown_table(results)
    assert "| PPL | PPL median |" in table and "| 300.767 | 1.200 |" in table  # one forgotten edit drags the mean
    del run["metrics"]["rel_ppl"]["median"]  # a results.json written before medians existed
    assert "| 300.767 |  |" in markdown_table(results)
    files = plot(results, {"3": {"edit prompts": [1.0, 1.0, 1.0]}}, tmp_path)
    assert [f.name for f in files] == ["metrics_vs_T.png", "overlap_T3.png"] and all(f.stat().st_size for f in files)


def test_tau_choice_and_overlaps():
    memory = routing_memory(4, "mean_decentered", k=2, seed=0, background=torch.zeros(4))
    memory.index.add(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool), torch.arange(2))
    d = memory.decide_masks(torch.tensor([[0, 2], [0, 1]]))  # calibration routes by the memory's own rule
    assert d.ratio.tolist() == [0.5, 1.0] and d.best.tolist() == [0, 0]
    tau = pick_tau(torch.tensor([0.3, 0.4, 0.42]), k=100, max_false=0.0)
    assert tau == pytest.approx(0.43)


# -- data -----------------------------------------------------------------------------------------


def test_loaders_on_benchmark_files(zsre_path):
    from memoir_eval.data import load_records

    z = load_records("zsre", limit=2)
    assert z[0].prompt and z[0].target and z[0].rephrase and z[0].loc_prompt.startswith("nq question:")
    h = load_records("hallucination")
    assert len(h) == 600 and h[0].rephrase is None
    assert sum(not r.has_loc for r in h) == 7  # empty locality_ground_truth: no locality item
    t = load_records("temporal", limit=3)
    assert all(r.rephrase for r in t)  # ood_rephrase
    assert len(load_records("zsre", offset=1000)) == 37


# -- end to end on the embedded model --------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(default_model_dir, zsre_path):
    from memoir_eval.protocol import Evaluator

    return Evaluator("default", settings=dict(n_iter=3, exact_steps=0), batch_size=8)  # three steps: fast


@pytest.mark.model
def test_protocol_end_to_end(evaluator, tmp_path):
    from memoir_eval.runner import run_eval

    res = run_eval("default", "zsre", [1, 2], tmp_path, limit=2, evaluator=evaluator, progress=False)
    assert res["runs"]["1"]["chunks_run"] == 2 and res["runs"]["2"]["chunks_total"] == 1
    for T in ("1", "2"):
        m = res["runs"][T]["metrics"]
        for key in ("rel", "gen", "loc", "rel_em", "gen_em", "loc_em", "pre_rel"):
            assert 0.0 <= m[key]["mean"] <= 1.0, key
        assert m["edit_routed_right"]["mean"] == 1.0  # an edit prompt routes to its own mask
        assert m["rel"]["mean"] > m["pre_rel"]["mean"]  # the edits were written
    # neighbour locality at T=1: record 1 (unedited in record 0's chunk) is record 0's neighbour, and back
    one = res["runs"]["1"]["metrics"]
    assert one["neigh_routed"]["n"] == 2 and one["neigh_routed"]["mean"] == 0.0 == one["neigh_changed"]["mean"]
    assert "neigh_routed" not in res["runs"]["2"]["metrics"]  # both records edited in the one chunk
    rows = [json.loads(x) for x in (tmp_path / "records_T2.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rows] == [0, 1]
    for name in ("results.json", "results.md", "metrics_vs_T.png", "overlap_T1.png", "overlap_T2.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert res["runs"]["2"]["by_age"] == [] and res["runs"]["2"]["conflicts"]["single"]["n"] == 2


@pytest.mark.model
def test_a_sampled_run_scores_only_the_trained_edits(evaluator, tmp_path):
    """--train 0,2 of T=3: edit 1 is written for routing alone and left out of the metrics."""
    from memoir_eval.runner import run_eval

    res = run_eval("default", "zsre", [3], tmp_path, limit=3, evaluator=evaluator, progress=False, train="0,2")
    assert res["train"] == "0,2" and res["runs"]["3"]["n_edits"] == 2
    rows = [json.loads(x) for x in (tmp_path / "records_T3.jsonl").read_text().splitlines()]
    assert [(r["record"], r["position"]) for r in rows] == [(0, 0), (2, 2)]
    assert res["runs"]["3"]["metrics"]["edit_routed_right"]["mean"] == 1.0
    with pytest.raises(ValueError, match="train"):  # a sampled run resumes only as one
        run_eval("default", "zsre", [3], tmp_path, limit=3, evaluator=evaluator, progress=False, resume=True)


@pytest.mark.model
def test_a_chat_format_memory_is_also_scored_as_chat_requests(default_model_dir, zsre_path, tmp_path):
    from memoir_eval.protocol import Evaluator
    from memoir_eval.runner import run_eval

    ev = Evaluator("default", settings=dict(n_iter=3, exact_steps=0, prompt_format="chat"), batch_size=8)
    res = run_eval("default", "zsre", [1], tmp_path, limit=1, evaluator=ev, progress=False)
    m = res["runs"]["1"]["metrics"]
    for key in ("chat_rel", "chat_gen", "chat_rel_answer", "chat_gen_answer", "chat_rel_repeats"):
        assert m[key]["n"] == 1 and 0.0 <= m[key]["mean"] <= 1.0, key
    assert "chat Rel" in (tmp_path / "results.md").read_text()


@pytest.mark.model
def test_interrupted_eval_resumes_to_the_same_results(evaluator, tmp_path, monkeypatch):
    from memoir_eval.data import load_records
    from memoir_eval.protocol import Evaluator
    from memoir_eval.runner import run_eval
    from memoir_vllm.snapshot import load_snapshot

    whole = run_eval("default", "zsre", [3], tmp_path / "whole", limit=3, evaluator=evaluator, progress=False)
    final = load_snapshot(tmp_path / "whole" / "state" / "T3-c0")  # each chunk's edited memory stays a snapshot
    assert [e.prompt for e in final.edits] == [r.prompt for r in load_records("zsre", limit=3)]

    real = Evaluator.evaluate

    def crash_at_the_end(self, m, records, positions, pre, ppl=False):
        if len(positions) == 3:
            raise KeyboardInterrupt  # the job is killed after its third edit
        return real(self, m, records, positions, pre, ppl)

    monkeypatch.setattr(Evaluator, "evaluate", crash_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        run_eval("default", "zsre", [1, 3], tmp_path / "run", limit=3, evaluator=evaluator, progress=False,
                 checkpoint_every=1)
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(partial["runs"]) == ["1"]  # T=1's first chunk was evaluated on the way, after the first edit
    with pytest.raises(ValueError, match="--resume"):
        run_eval("default", "zsre", [1, 3], tmp_path / "run", limit=3, evaluator=evaluator, progress=False)

    monkeypatch.setattr(Evaluator, "evaluate", real)
    resumed = run_eval("default", "zsre", [1, 3], tmp_path / "run", limit=3, evaluator=evaluator, progress=False,
                       resume=True)
    assert resumed["runs"]["3"]["metrics"] == whole["runs"]["3"]["metrics"]
    assert resumed["runs"]["1"]["chunks_run"] == 3


def test_resume_accepts_a_run_saved_before_a_setting_existed(tmp_path):
    from memoir_eval.runner import _resumed
    from memoir_vllm.config import MemoirConfig

    cfg = MemoirConfig(layer=25, k=439).to_dict()
    old = dict(data_file="z.json", n_records=3, generative=True, runs={},
               config={k: v for k, v in cfg.items() if k != "stop_rule"})  # written by an older memoir
    (tmp_path / "results.json").write_text(json.dumps(old))
    fresh = dict(old, config=cfg)
    results, done = _resumed(tmp_path, fresh, {3: ([[0, 1, 2]], 1)})
    assert done == {3: []} and results["runs"] == {}
    with pytest.raises(ValueError, match="config"):
        _resumed(tmp_path, dict(fresh, config=dict(cfg, lr=3.0)), {3: ([[0, 1, 2]], 1)})


@pytest.mark.model
def test_lm_eval_pack_agrees_with_memoir_eval(evaluator, tmp_path, monkeypatch):
    """The pack's rel/gen/loc equal `memoir eval`'s on the same snapshot and records (within 0.01),
    with tau 0 so that every prompt, unrelated ones too, is routed and locality is not trivially 1."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from memoir_eval.data import load_records
    from memoir_eval.lm_eval_entry import TASKS_DIR, register
    from memoir_eval.protocol import evaluate_snapshot

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from memoir_vllm.session import Memoir

    records = load_records("zsre", limit=2)
    # tau 0 routes every prompt only under the mask rule
    m = Memoir.create("default", n_iter=3, exact_steps=0, routing="mask")
    for r in records:
        m.edit(r.prompt, r.target)
    snap = m.save(tmp_path / "snap")
    _, native = evaluate_snapshot(str(snap), records, tau=0.0)
    register()
    tm = TaskManager(include_path=str(TASKS_DIR))
    out = lm_eval.simple_evaluate(model="memoir", model_args=f"snapshot={snap},tau=0.0", tasks=["memoir_zsre"],
                                  limit=2, task_manager=tm, batch_size=8)
    pack = out["results"]
    assert native["loc_routed"]["mean"] == 1.0
    for task, key in (("memoir_zsre_rel", "rel"), ("memoir_zsre_gen", "gen"), ("memoir_zsre_loc", "loc")):
        assert pack[task][f"{key},none"] == pytest.approx(native[key]["mean"], abs=0.01), task


def test_pack_validates_offline(monkeypatch):
    """What `lm-eval validate` checks in 0.4.13: every task and group of the pack resolves."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(REPO / "memoir_eval" / "tasks"))
    names = ["memoir_zsre", "memoir_hallucination", "memoir_temporal", "memoir_retention", "memoir_zsre_loc",
             "memoir_hallucination_ppl", "memoir_temporal_gen", "memoir_zsre_greedy", "memoir_zsre_rel_greedy"]
    assert set(tm.match_tasks(names)) == set(names)


def test_lm_eval_argv_defaults():
    from memoir_eval.lm_eval_entry import TASKS_DIR, lm_eval_argv

    argv = lm_eval_argv(["--model_args", "snapshot=S", "--tasks", "memoir_zsre"])
    assert argv[0] == "run" and argv[argv.index("--model") + 1] == "memoir"
    assert argv[argv.index("--include_path") + 1] == str(TASKS_DIR)
    argv = lm_eval_argv(["validate", "--tasks", "memoir_zsre", "--include_path", "x"])
    assert argv[-1] == f"x:{TASKS_DIR}" and "--model" not in argv


def test_retention_paired_delta():
    from memoir_eval.retention import _paired

    r = _paired([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert r["delta"] == 0.0 and r["within_stderr"] and r["n"] == 3
    r = _paired([2.0, 3.0], [1.0, 1.0])
    assert r["delta"] == pytest.approx(1.5) and r["delta_stderr"] == pytest.approx(0.5) and not r["within_stderr"]


def test_eval_subcommands_registered():
    from memoir_vllm.cli import build_parser

    p = build_parser()
    a = p.parse_args(["eval", "--data", "zsre", "--T", "1,10", "--chunks", "2", "--out", "x", "--tau", "0.6"])
    assert a.T == [1, 10] and a.chunks == 2 and a.tau == 0.6
    a = p.parse_args(["calibrate", "--sweep-layers", "20,25", "--max-per-source", "5"])
    assert a.sweep_layers == "20,25" and a.max_per_source == 5
    a = p.parse_args(["lm-eval", "--model_args", "snapshot=S", "--tasks", "memoir_zsre"])
    assert a.lm_eval_args == ["--model_args", "snapshot=S", "--tasks", "memoir_zsre"]
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--data", "zsre", "--T", "0", "--out", "x"])
