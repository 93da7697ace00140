"""The subject rule's second stage on 40 hand-written real-world questions (held out: not used to calibrate).

    .venv/bin/python scripts/second_stage_heldout.py --check-taus 0.55 0.6 0.65 0.7

Each item is an edit question about a real subject, a paraphrase of it and a question of another relation about
the same subject, written for this check (not from `memoir make-edits`, whose questions calibrate check_tau).
Every edit is stored in one memory under the subject rule (masks play no part: this is the candidate stage,
ResidualMemory.candidate_scores); reported per check_tau, with and without answer types: the share of
paraphrases that keep their edit as a candidate and the share of other-relation questions that do; with answer
types also per --untyped-taus (the cosine a pair needs when only one of its questions names a kind of answer).
Saves runs/second_stage_heldout.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from memoir_vllm.memory import ResidualMemory  # noqa: E402

# (subject, edit question, paraphrase, same subject with another relation)
QUESTIONS = [
    ("Norway", "What is the capital city of Norway?", "Which city is Norway's capital?", "What is the official language of Norway?"),
    ("The Starry Night", "Who painted The Starry Night?", "The Starry Night is a work by which artist?", "When was The Starry Night painted?"),
    ("Lionel Messi", "Which club does Lionel Messi play for?", "Lionel Messi is a player of which team?", "Where was Lionel Messi born?"),
    ("Mount Everest", "How tall is Mount Everest?", "What is the height of Mount Everest?", "Who first climbed Mount Everest?"),
    ("Harry Potter", "Who wrote the Harry Potter books?", "The Harry Potter series was written by whom?", "When was the first Harry Potter book published?"),
    ("the Eiffel Tower", "In which city is the Eiffel Tower?", "Where is the Eiffel Tower located?", "Who designed the Eiffel Tower?"),
    ("Apple", "Who founded Apple?", "Apple was founded by whom?", "Where is Apple headquartered?"),
    ("the Amazon River", "Which ocean does the Amazon River flow into?", "Into which ocean does the Amazon River empty?", "How long is the Amazon River?"),
    ("Marie Curie", "Where was Marie Curie born?", "In which city was Marie Curie born?", "What did Marie Curie win the Nobel Prize for?"),
    ("Japan", "What is the currency of Japan?", "Which currency is used in Japan?", "Who is the emperor of Japan?"),
    ("Beethoven", "When was Beethoven born?", "In what year was Beethoven born?", "Where did Beethoven die?"),
    ("the Mona Lisa", "Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?", "Where is the Mona Lisa displayed?"),
    ("Canada", "Who is the prime minister of Canada?", "Who leads the government of Canada?", "What is the population of Canada?"),
    ("Python", "Who created the Python programming language?", "Python was designed by which programmer?", "When was Python first released?"),
    ("the Titanic", "When did the Titanic sink?", "In which year did the Titanic go down?", "Who built the Titanic?"),
    ("Albert Einstein", "Where did Albert Einstein work in 1905?", "At which office was Albert Einstein employed in 1905?", "Who was Albert Einstein married to?"),
    ("Tesla", "Who is the CEO of Tesla?", "Who runs Tesla as chief executive?", "In which year was Tesla founded?"),
    ("the Great Wall of China", "How long is the Great Wall of China?", "What is the length of the Great Wall of China?", "Who built the Great Wall of China?"),
    ("Brazil", "What language do people speak in Brazil?", "What is the main language of Brazil?", "What is the capital of Brazil?"),
    ("Shakespeare", "Where was Shakespeare born?", "What is Shakespeare's birthplace?", "When did Shakespeare die?"),
    ("the Louvre", "In which city is the Louvre?", "The Louvre museum is located in which city?", "When did the Louvre open to the public?"),
    ("Google", "Who founded Google?", "Google was started by which people?", "Where is Google based?"),
    ("the Nile", "Which sea does the Nile flow into?", "The Nile empties into which sea?", "How long is the Nile?"),
    ("Frida Kahlo", "Which country was Frida Kahlo from?", "What was Frida Kahlo's nationality?", "Who was Frida Kahlo married to?"),
    ("the Beatles", "Which city are the Beatles from?", "Where did the Beatles form?", "When did the Beatles break up?"),
    ("Saturn", "How many moons does Saturn have?", "What is the number of moons of Saturn?", "Who discovered Saturn's rings?"),
    ("Wikipedia", "Who founded Wikipedia?", "Wikipedia was created by whom?", "When was Wikipedia launched?"),
    ("Kenya", "What is the capital of Kenya?", "Which city is the capital of Kenya?", "What currency does Kenya use?"),
    ("Toyota", "In which country is Toyota headquartered?", "Where does Toyota have its headquarters?", "Who founded Toyota?"),
    ("The Godfather", "Who directed The Godfather?", "The Godfather was directed by whom?", "When was The Godfather released?"),
    ("Pablo Picasso", "Where was Pablo Picasso born?", "What city was Pablo Picasso born in?", "When did Pablo Picasso die?"),
    ("the Sahara", "Which continent is the Sahara on?", "On what continent is the Sahara located?", "How big is the Sahara?"),
    ("Microsoft", "Who is the CEO of Microsoft?", "Who heads Microsoft as its chief executive?", "Who founded Microsoft?"),
    ("Mozart", "Where was Mozart born?", "In which city was Mozart born?", "How many symphonies did Mozart write?"),
    ("the Statue of Liberty", "Who designed the Statue of Liberty?", "The Statue of Liberty was designed by whom?", "Where is the Statue of Liberty?"),
    ("Australia", "What is the capital of Australia?", "Which city is Australia's capital?", "Who is the head of state of Australia?"),
    ("Netflix", "When was Netflix founded?", "In what year was Netflix started?", "Who founded Netflix?"),
    ("Leonardo da Vinci", "Where did Leonardo da Vinci die?", "In which place did Leonardo da Vinci die?", "What did Leonardo da Vinci paint?"),
    ("the Moon", "Who first walked on the Moon?", "Who was the first person on the Moon?", "How far away is the Moon?"),
    ("Spotify", "In which country was Spotify founded?", "Spotify was founded in what country?", "Who is the CEO of Spotify?"),
]

def kept(answer_type: bool, check_tau: float, untyped_tau: float = 0.0) -> dict[str, float]:
    """Share of paraphrases / other-relation questions whose own edit stays a candidate."""
    mem = ResidualMemory(8, 16, 4, rule="subject", subject_check="encoder", check_tau=check_tau,
                         answer_type=answer_type, untyped_tau=untyped_tau)
    for subject, edit, _, _ in QUESTIONS:
        mem.add_edit(torch.arange(4))  # a mask for the index; the candidate stage does not read it
        mem.subjects.add([subject], edit)
    out = {}
    for name, col in (("paraphrase", 2), ("other_relation", 3)):
        scored = mem.candidate_scores([q[col] for q in QUESTIONS])
        out[name] = round(sum(any(r == i for r, _ in s) for i, s in enumerate(scored)) / len(QUESTIONS), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-taus", type=float, nargs="+", default=[0.55, 0.6, 0.65, 0.7])
    p.add_argument("--untyped-taus", type=float, nargs="+", default=[0.0, 0.65, 0.7],
                   help="cosines needed when only one question names a kind of answer (with answer types; 0: off)")
    p.add_argument("--out", default="runs/second_stage_heldout.json")
    args = p.parse_args()
    settings = [(False, 0.0)] + [(True, u) for u in args.untyped_taus]
    rows = [dict(check_tau=c, answer_type=t, untyped_tau=u, **kept(t, c, u))
            for c in args.check_taus for t, u in settings]
    print("| check_tau | answer types | untyped_tau | paraphrases kept | other relation kept |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check_tau']} | {'yes' if r['answer_type'] else 'no'} | {r['untyped_tau'] or '-'} "
              f"| {r['paraphrase']:.3f} | {r['other_relation']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": len(QUESTIONS), "rows": rows}, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
