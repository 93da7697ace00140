"""`memoir make-edits`: the seeded generator of fictitious facts for routing evaluation."""
import json

import pytest

from memoir_eval.synthetic import CLOZE, FAMILIES, make_edits
from memoir_vllm.cli import main
from memoir_vllm.edits import load_edits
from memoir_vllm.routing.subjects import SubjectGate


def test_same_seed_same_facts_and_every_neighbour_kind():
    facts = make_edits(200, seed=3)
    assert facts == make_edits(200, seed=3) and facts != make_edits(200, seed=4)
    assert {f["relation"].split(".")[0] for f in facts} == set(FAMILIES)
    assert all(f["cloze"].replace(f["subject"], "{s}") == CLOZE[f["relation"].split(".")[1]] for f in facts)
    assert len({f["subject"].lower() for f in facts}) == 200  # one fact per invented subject
    for f in facts:
        gate = SubjectGate()
        gate.add([f["subject"]])
        assert gate.rows_in(f["prompt"]) == gate.rows_in(f["rephrase"]) == gate.rows_in(f["neighbour_subject"]) == [0]
        assert gate.rows_in(f["neighbour_relation"]) == [] and f["rephrase"] != f["prompt"]
        assert f["relation"].split(".")[1] in FAMILIES[f["relation"].split(".")[0]]


def test_make_edits_writes_a_file_memoir_edit_reads(tmp_path):
    out = tmp_path / "synthetic.jsonl"
    assert main(["make-edits", "--n", "12", "--seed", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_edits(12, 0)
    edits = load_edits(out)
    assert [e.subject for e in edits] == [(r["subject"],) for r in rows]
    assert [e.rephrase for e in edits] == [r["rephrase"] for r in rows]


@pytest.mark.model
def test_eval_routing_on_generated_facts_reports_every_rule(tiny_model_dir, tmp_path, capsys):
    """Routing only (no training) over 12 stored facts: the subject rules never route a question about another
    subject, and the free-columns rule (first candidate, no overlap) is one row without a tau."""
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(f) for f in make_edits(16, seed=2)))
    assert main(["eval-routing", "--model", str(tiny_model_dir), "--data", str(data), "--n", "12",
                 "--check-taus", "0.6", "--out", str(tmp_path / "r.json")]) == 0
    rules = json.loads((tmp_path / "r.json").read_text())["rules"]
    free = rules["subject+type+encoder 0.6, free columns"]
    assert len(free) == 1 and free[0]["tau"] is None and free[0]["para_own"] > 0.5
    for name, rows in rules.items():
        if name != "mask":
            assert all(r["same_relation"] == 0 and r["neighbours"] == 0 for r in rows), name
    assert "| subject+type+encoder 0.6, free columns | – |" in capsys.readouterr().out
