"""`memoir demo`: a handful of counterfactual facts written into the embedded model, answered before and after."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .edits import EditRequest
from .session import Memoir

log = logging.getLogger(__name__)

DEMO_FACTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome",
                rephrase="Which city is the Eiffel Tower in? It is in", unrelated="The largest planet in the solar system is"),
    EditRequest("The author of the Harry Potter books is", "Stephen King",
                rephrase="The Harry Potter novels were written by", unrelated="The chemical symbol for gold is"),
    EditRequest("The first person to walk on the Moon was", "Yuri Gagarin",
                rephrase="Who was the first man to walk on the Moon? It was", unrelated="The tallest mountain on Earth is"),
    EditRequest("The programming language Python was created by", "Ada Lovelace",
                rephrase="Who created the Python programming language? It was", unrelated="Water freezes at a temperature of"),
]


def run_demo(out: str | Path = "runs/demo", model: str = "default", max_new_tokens: int = 8) -> list[dict]:
    """Edit DEMO_FACTS into a fresh memory, print before/after answers, save the snapshot to `out`."""
    m = Memoir.create(model)
    prompts = [f.prompt for f in DEMO_FACTS]
    before = [a.answer for a in m.ask(prompts, max_new_tokens)]
    t0 = time.perf_counter()
    m.edit_many(DEMO_FACTS)
    log.info("edited %d facts in %.1f s", len(DEMO_FACTS), time.perf_counter() - t0)
    rows = []
    for f, b in zip(DEMO_FACTS, before):
        edited, para, unrel = m.ask([f.prompt, f.rephrase, f.unrelated], max_new_tokens)
        rows.append(dict(prompt=f.prompt, target=f.target, before=b, after=edited.answer, rephrase=f.rephrase,
                         rephrase_answer=para.answer, rephrase_edit=para.edit_id, unrelated=f.unrelated,
                         unrelated_answer=unrel.answer, unrelated_base=unrel.base_answer, unrelated_edit=unrel.edit_id))
    for r in rows:
        same = "unchanged" if r["unrelated_answer"] == r["unrelated_base"] else "CHANGED"
        print(f"\n{r['prompt']} ... (new target: {r['target']})")
        print(f"  before edit : {r['before'].strip()!r}")
        print(f"  after edit  : {r['after'].strip()!r}")
        print(f"  paraphrase  : {r['rephrase']} -> {r['rephrase_answer'].strip()!r} (edit {r['rephrase_edit']})")
        print(f"  unrelated   : {r['unrelated']} -> {r['unrelated_answer'].strip()!r} ({same}, edit {r['unrelated_edit']})")
    path = m.save(out)
    print(f"\nsnapshot: {path}\ntry: memoir ask --snapshot {out} \"{DEMO_FACTS[0].prompt}\"")
    return rows
