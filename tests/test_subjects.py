"""Edit subjects and the subject rule: the automatic subject, the gate's matching, and routing through the
memory's one rule (ResidualMemory.candidates / decide_masks), on hand-made masks (no model)."""
import pytest
import torch

from memoir_vllm.routing.answer_type import answer_type, one_kind_named, same_answer_type
from memoir_vllm.config import MemoirConfig
from memoir_vllm.memory import ResidualMemory
from memoir_vllm.routing.subjects import SubjectGate, as_aliases, auto_subject, normalize
from memoir_vllm.routing.tophash import indices_to_mask


@pytest.mark.parametrize("prompt, subject", [
    ("What is the capital city of Norway?", "Norway"),
    ("Who painted The Starry Night?", "The Starry Night"),
    ("Which club does Lionel Messi play for?", "Lionel Messi"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice"),
    ("What type of submarine was USS Wren (DD-568) classified as?", "USS Wren (DD-568)"),
    ("What was Annette Daniels's range?", "Annette Daniels"),
    ("Which medical condition afflicts Gerald Ganglbauer?", "Gerald Ganglbauer"),
    ("What is the name of the bank of America's founder?", "America"),
])
def test_auto_subject_finds_the_named_thing(prompt, subject):
    assert auto_subject(prompt) == subject


def test_auto_subject_falls_back_to_the_rarest_word():
    assert auto_subject("water boils at a temperature of") == "boils"
    assert auto_subject("?!") == ""


def test_aliases_are_strings_deduplicated_and_stripped():
    assert as_aliases(" Norway ") == ("Norway",)
    assert as_aliases(["Lionel Messi", "Messi", "Messi", " "]) == ("Lionel Messi", "Messi")
    assert as_aliases(None) == ()
    with pytest.raises(ValueError, match="must be a string"):
        as_aliases(["Messi", 10])
    with pytest.raises(ValueError, match="a string or a list of strings"):
        as_aliases(10)


def test_gate_matches_whole_words_in_any_case_and_spacing():
    gate = SubjectGate()
    gate.add(["Norway"])  # row 0
    gate.add(["Lionel Messi", "Messi"])  # row 1
    gate.add(["Eiffel Tower"])  # row 2
    assert gate.rows_in("What is the capital city of Norway?") == [0]
    assert gate.rows_in("What is NORWAY's capital?") == [0]  # case, possessive
    assert gate.rows_in("Is Norwayan a word?") == []  # no partial words
    assert gate.rows_in("Where was lionel   messi born?") == [1]  # whitespace collapsed
    assert gate.rows_in("Messi and the Eiffel Tower in Norway") == [2, 1, 0]  # every hit, newest first
    assert gate.rows_in("What is the capital city of Portugal?") == []
    assert normalize("  The\tEiffel’s  ") == "the eiffel's"


def test_gate_rows_follow_a_subject_changed_in_place():
    gate = SubjectGate()
    gate.add(["Norway"])
    gate.set(0, ["Kingdom of Norway"])
    assert gate.rows_in("the capital of Norway") == []
    assert gate.rows_in("the Kingdom of Norway's capital") == [0]

@pytest.mark.parametrize("question, kind", [
    ("When was The Starry Night painted?", "time"),
    ("In what year was Beethoven born?", "time"),
    ("The Harry Potter series was written by whom?", "person"),
    ("Who painted X?", "person"),
    ("Where is the Eiffel Tower located?", "place"),
    ("In which city was Marie Curie born?", "place"),
    ("How long is the Nile?", "number"),
    ("Which artist painted X?", None),  # no rule names it: the encoder decides alone
    ("How did X die?", None),
    ("Quand est né Beethoven ?", None),  # not English: no kind
])
def test_answer_type_reads_the_wh_words(question, kind):
    assert answer_type(question) == kind


def test_answer_type_keeps_only_candidates_that_ask_for_the_same_kind_of_answer():
    mem = ResidualMemory(8, 16, 4, tau=0.5, rule="subject", subject_tau=0.5, answer_type=True)
    mem.index.add(indices_to_mask(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), 16), torch.arange(2))
    mem.subjects.add(["Norway"], "Who is the king of Norway?")  # row 0
    mem.subjects.add(["Norway"], "When did Norway become independent?")  # row 1
    texts = ["Who rules Norway?", "In which year did Norway gain independence?", "What is Norway known for?"]
    assert mem.candidate_scores(texts) == [[(0, None)], [(1, None)], [(1, None), (0, None)]]
    mem.answer_type = False
    assert mem.candidate_scores(texts) == [[(1, None), (0, None)]] * 3
    assert not same_answer_type("Who painted X?", "When was X painted?")
    assert same_answer_type("Who painted X?", "Which artist painted X?")


def test_a_question_that_names_no_kind_of_answer_needs_untyped_tau_against_one_that_does():
    """"In which museum ...?" names no kind, so answer types let "Who painted ...?" through; the encoder's
    cosine passes check_tau .6 (.60) but not untyped_tau (.65, the default), while "In what year ...?" (.67) and a
    paraphrase (.87) pass both."""
    asked = ["Who painted The Starry Night?", "In what year was The Starry Night painted?",
             "The Starry Night hangs in which museum?"]
    assert [one_kind_named(q, "In which museum is X displayed?") for q in asked] == [True, True, False]
    kept = {}
    for untyped_tau in (0.0, MemoirConfig().untyped_tau):
        mem = ResidualMemory(8, 16, 4, rule="subject", subject_check="encoder", check_tau=0.6, answer_type=True,
                             untyped_tau=untyped_tau)
        mem.index.add(indices_to_mask(torch.tensor([[0, 1, 2, 3]]), 16), torch.arange(1))
        mem.subjects.add(["The Starry Night"], "In which museum is The Starry Night displayed?")
        kept[untyped_tau] = [[round(c, 2) for _, c in s] for s in mem.candidate_scores(asked)]
    assert kept == {0.0: [[0.6], [0.67], [0.87]], 0.65: [[], [0.67], [0.87]]}


def _memory(rule: str, masks: list[list[int]], subjects: list[str], d: int = 16, k: int = 4) -> ResidualMemory:
    mem = ResidualMemory(8, d, k, tau=0.5, rule=rule, subject_tau=0.5)
    mem.index.add(indices_to_mask(torch.tensor(masks), d), torch.arange(len(masks)))
    for s in subjects:
        mem.subjects.add([s])
    return mem


def test_subject_rule_routes_only_to_edits_the_request_names():
    masks = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 8]]  # edit 2 has a mask close to edit 0's
    mem = _memory("subject", masks, ["Norway", "Messi", "Portugal"])
    query = torch.tensor([[0, 1, 2, 3]] * 3)  # every query's mask is edit 0's
    texts = ["capital of Norway?", "capital of Portugal?", "capital of Spain?"]
    d = mem.decide_masks(query, mem.candidates(texts))
    assert d.row.tolist() == [0, 2, -1]  # Portugal's own edit (overlap 3/4), no candidate for Spain
    assert d.ratio.tolist() == [1.0, 0.75, 0.0]
    assert mem.decide_masks(query).row.tolist() == [-1, -1, -1]  # no text seen: no candidate
    mem.rule = "mask"
    assert mem.candidates(texts) is None
    assert mem.decide_masks(query).row.tolist() == [0, 0, 0]  # the paper's rule: the best of all edits


def test_subject_rule_ties_go_to_the_newest_edit_and_inactive_edits_never_route():
    mem = _memory("subject", [[0, 1, 2, 3], [0, 1, 2, 3]], ["Norway", "Norway"])
    q = torch.tensor([[0, 1, 2, 3]])
    assert mem.decide_masks(q, mem.candidates(["Norway"])).row.tolist() == [1]
    mem.index.set_active(1, False)
    assert mem.decide_masks(q, mem.candidates(["Norway"])).row.tolist() == [0]
    mem.subject_tau = 1.0
    q2 = torch.tensor([[0, 1, 2, 9]])
    assert mem.decide_masks(q2, mem.candidates(["Norway"])).row.tolist() == [-1]  # 3/4 < subject_tau


# -- subjects in edits, snapshots and the CLI (tiny model) --------------------------------------------


def test_edit_files_carry_a_subject_string_or_aliases(tmp_path):
    from memoir_vllm.edits import EditFileError, load_edits

    f = tmp_path / "facts.jsonl"
    f.write_text('{"prompt": "Messi plays for", "target": "Ajax", "subject": ["Lionel Messi", "Messi"]}\n'
                 '{"src": "Who designed the Toodyay Fire Station?", "alt": "Jane Doe", "subject": "Toodyay Fire Station"}\n'
                 '{"prompt": "The capital of Norway is", "target": "Bergen"}\n')
    assert [e.subject for e in load_edits(f)] == [("Lionel Messi", "Messi"), ("Toodyay Fire Station",), ()]
    f.write_text('{"prompt": "Messi plays for", "target": "Ajax", "subject": 7}\n')
    with pytest.raises(EditFileError, match=r"facts.jsonl:1: field 'subject'"):
        load_edits(f)


@pytest.fixture(scope="module")
def subject_store(tiny_model_dir, tmp_path_factory):
    from memoir_vllm.session import Memoir

    m = Memoir.create(tiny_model_dir, n_iter=2)
    assert m.memory.rule == "subject"  # the default for new memories
    m.edit("The capital of Norway is", "Bergen")  # subject found: Norway
    m.edit("Messi plays for", "Ajax", subject=["Lionel Messi", "Messi"])
    return m, m.save(tmp_path_factory.mktemp("subj") / "store")


@pytest.mark.model
def test_subjects_are_stored_and_route_after_loading(subject_store):
    import pyarrow.parquet as pq

    from memoir_vllm.snapshot import load_snapshot, read_manifest

    m, path = subject_store
    assert pq.read_table(path / "edits.parquet").to_pydict()["subject"] == [["Norway"], ["Lionel Messi", "Messi"]]
    manifest = read_manifest(path)
    assert manifest["format_version"] == 2 and manifest["routing"] == {
        "rule": "subject", "subject_tau": 0.3, "subject_check": "encoder", "check_tau": 0.6, "answer_type": True,
        "untyped_tau": 0.65}
    mem = load_snapshot(path).memory
    assert mem.rule == "subject"
    asked = ["Where does Lionel Messi play?", "Which city is the capital of Norway?", "The capital of Portugal is",
             "The official language of Norway is"]
    assert mem.candidates(asked).tolist() == [[1], [0], [-1], [-1]]  # Portugal: no subject; language: no question
    scores = mem.candidate_scores(asked)
    assert [len(s) for s in scores] == [1, 1, 0, 0] and all(c >= mem.check_tau for s in scores for _, c in s)


@pytest.mark.model
def test_snapshot_subject_command_changes_an_edit_in_place(subject_store, tmp_path):
    import shutil

    from memoir_vllm.cli import main
    from memoir_vllm.snapshot import load_snapshot

    _, path = subject_store
    store = tmp_path / "store"
    shutil.copytree(path.parent, store)
    assert main(["snapshot", "subject", str(store), "0", "Kingdom of Norway", "Norge"]) == 0
    snap = load_snapshot(store)
    assert snap.version == 2 and snap.edits[0].subject == ("Kingdom of Norway", "Norge")
    assert snap.memory.subjects.rows_in("the kingdom of norway") == snap.memory.subjects.rows_in("Norge?") == [0]
    assert snap.memory.candidates(["The capital of Norway is"]).tolist() == [[-1]]  # the old subject is gone

@pytest.mark.model
def test_snapshot_subject_command_names_a_missing_edit(subject_store, capsys):
    from memoir_vllm.cli import main

    assert main(["snapshot", "subject", str(subject_store[1]), "9", "Oslo"]) != 0
    assert "edit id 9 is not in this memory" in capsys.readouterr().err


@pytest.mark.model
def test_a_format_1_snapshot_loads_and_routes_by_masks_as_before(subject_store, tmp_path):
    """A snapshot written before subjects existed: no subject column, no routing key, config without routing."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from memoir_vllm.atomic import sha256_file
    from memoir_vllm.snapshot import load_snapshot

    _, path = subject_store
    v1 = tmp_path / "v1"
    shutil.copytree(path, v1)
    table = pq.read_table(v1 / "edits.parquet")
    pq.write_table(table.drop(["subject"]), v1 / "edits.parquet")
    manifest = json.loads((v1 / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["routing"], manifest["config"]["routing"], manifest["config"]["subject_tau"]
    manifest["files"]["edits.parquet"] = sha256_file(v1 / "edits.parquet")
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    snap = load_snapshot(v1)
    assert snap.memory.rule == "mask" and snap.config.routing == "mask"
    assert [e.subject for e in snap.edits] == [(), ()]
    assert snap.memory.candidates(["anything"]) is None
    q = snap.memory.index.masks(torch.tensor([1]))[0].nonzero().flatten().view(1, -1)  # edit 1's own mask
    assert snap.memory.decide_masks(q).row.tolist() == [1]  # the paper's rule, no text needed


# -- newest correction wins ---------------------------------------------------------------------------


@pytest.mark.model
def test_a_new_edit_of_the_same_question_supersedes_the_older_one_and_undo_restores_it(tiny_model_dir, tmp_path):
    from memoir_vllm.cli import main
    from memoir_vllm.session import Memoir
    from memoir_vllm.snapshot import load_snapshot

    m = Memoir.create(tiny_model_dir, n_iter=1)
    first = m.edit("The Eiffel Tower is located in the city of", "Rome")
    second = m.edit("Where is the Eiffel Tower? It is in the city of", "Berlin")  # same question, rephrased
    other = m.edit("Who designed the Eiffel Tower?", "Gustave Klimt")  # same subject, another question
    third = m.edit("The Eiffel Tower is located in the city of", "Madrid")
    assert (first.superseded, second.superseded, other.superseded) == ([], [0], [])
    assert third.superseded == [1]  # edit 0 is already retired
    assert m.memory.index.active.tolist() == [False, False, True, True]
    assert [e.superseded_by for e in m.edits] == [1, 3, None, None]
    rows = m.memory.candidates(["Where is the Eiffel Tower? It is in the city of", "Who designed the Eiffel Tower?"])
    assert rows[0, 0].item() == 3 and rows[1, 0].item() == 2
    why = m.ask(["Where is the Eiffel Tower? It is in the city of", "Where is Big Ben?"], max_new_tokens=1)
    assert [c["edit_id"] for c in why[0].candidates] == [3] and why[0].candidates[0]["subject"] == ["Eiffel Tower"]
    assert why[0].candidates[0]["cosine"] >= m.memory.check_tau and why[1].candidates == []
    assert why[0].edit_id == (3 if why[0].candidates[0]["overlap"] >= m.memory.subject_tau else None)
    store = m.save(tmp_path / "store")
    assert [e.superseded_by for e in load_snapshot(store).edits] == [1, 3, None, None]
    assert main(["snapshot", "disable", "--enable", str(tmp_path / "store"), "1"]) == 0  # undo
    snap = load_snapshot(tmp_path / "store")
    assert snap.memory.index.active.tolist() == [False, True, True, True] and snap.edits[1].superseded_by is None
    keep = Memoir.create(tiny_model_dir, n_iter=1, supersede=False)
    keep.edit("The Eiffel Tower is located in the city of", "Rome")
    assert keep.edit("The Eiffel Tower is located in the city of", "Madrid").superseded == []


def test_keyed_masks_leave_every_decision_unchanged_and_separate_subjects():
    """mask_key "subject": an edit's mask is relabelled by its subject's key. A query keyed as each candidate
    overlaps it exactly as unkeyed masks would (decisions unchanged), while two edits of different subjects
    with the same unkeyed mask (same relation) now share only about k/D of their columns."""
    import torch

    from memoir_vllm.memory import ResidualMemory

    d, k = 64, 16
    plain = ResidualMemory(8, d, k, rule="subject", subject_tau=0.5)
    keyed = ResidualMemory(8, d, k, rule="subject", subject_tau=0.5, mask_key="subject")
    assert plain.key_of(("Norway",)) == 0 and keyed.key_of(("Norway",)) == keyed.key_of(("norway",)) != 0
    assert ResidualMemory(8, d, k, rule="mask", mask_key="subject").key_of(("Norway",)) == 0  # the paper's rule
    gen = torch.Generator().manual_seed(0)
    same_relation = torch.randperm(d, generator=gen)[:k].sort().values  # one relation's mask, two subjects
    other = torch.randperm(d, generator=gen)[:k].sort().values
    for mem in (plain, keyed):
        for subject, idx in (("Norway", same_relation), ("Peru", same_relation), ("Norway", other)):
            key = mem.key_of((subject,))
            mem.add_edit(mem.keyed(idx, key), key=key)
            mem.subjects.add((subject,), "")
    queries = torch.stack([same_relation, other, same_relation])
    texts = ["What is the capital of Norway?", "Norway", "Peru"]
    a = plain.decide_masks(queries, plain.candidates(texts))
    b = keyed.decide_masks(queries, keyed.candidates(texts))
    assert torch.equal(a.row, b.row) and torch.equal(a.ratio, b.ratio)  # the same decisions and overlaps
    shared = lambda mem: int((mem.index.masks(torch.tensor([0])) & mem.index.masks(torch.tensor([1]))).sum())
    assert shared(plain) == k  # unkeyed: Norway's and Peru's edits train the very same columns
    assert shared(keyed) < k // 2  # keyed: about k*k/D of them
    assert torch.equal(keyed.keyed(same_relation, 0), same_relation)
