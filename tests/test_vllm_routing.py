"""The serving layer's routing and memory op on flattened token batches, without vLLM (pure torch).

Checks memoir_vllm.vllm.routing.Router + layer.memory_term against ResidualMemory's reference
computation (masks_from_acts -> route -> delta) under continuous batching: prompt in one step
(exact), prompt in two chunks (decided from all prompt tokens, memory from the deciding chunk on),
decode steps reusing the decision, opt-out and unmatched requests bit-identical to the base.
"""
from __future__ import annotations

import numpy as np
import torch

from memoir_vllm.memory import ResidualMemory
from memoir_vllm.vllm import attachment
from memoir_vllm.vllm.layer import memory_term
from memoir_vllm.vllm.routing import Router

D, DM, K = 64, 16, 16


def make_memory(prompts: dict[str, torch.Tensor], feature: str = "mean_decentered", n_shards: int = 1) -> ResidualMemory:
    """A memory whose edits are the TopHash masks of the given prompts' activations (edit i on shard i % n_shards)."""
    torch.manual_seed(0)
    mem = ResidualMemory(DM, D, K, tau=0.7, seed=0, feature=feature, n_shards=n_shards)
    mem.background.copy_(torch.randn(D) * 0.1)
    for i, a in enumerate(prompts.values()):
        mem.add_edit(mem.masks_from_acts(a.unsqueeze(0), torch.ones(1, a.shape[0], dtype=torch.bool))[0],
                     shard=i % n_shards)
    with torch.no_grad():
        mem.weight.normal_(0, 0.5)
    return mem


def reference(mem: ResidualMemory, prompt_acts: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Memory term for tokens acts [T, D] of a request whose prompt activations are prompt_acts [P, D]
    (the transformers path: one forward over the whole prompt)."""
    idx = mem.masks_from_acts(prompt_acts.unsqueeze(0), torch.ones(1, prompt_acts.shape[0], dtype=torch.bool))
    d = mem.decide_masks(idx)
    if d.row[0] < 0:
        return torch.zeros(acts.shape[0], DM)
    return mem.delta(acts.unsqueeze(0), d.mask, d.shard)[0]


def step(router: Router, name: str, reqs: list[tuple[str, int, int, int, bool]], acts: torch.Tensor, live: set[str],
         keys: list[bytes] | None = None):
    """One engine step: reqs = (id, num_computed, num_scheduled, prompt_len, opted_out); returns the memory term."""
    ids = [r[0] for r in reqs]
    router.prepare(ids, np.array([r[1] for r in reqs]), np.array([r[2] for r in reqs]), np.array([r[3] for r in reqs]),
                   [r[4] for r in reqs], keys or [r[0].encode() for r in reqs], live)
    out = torch.zeros(acts.shape[0], DM)
    memory_term(acts, out, name)
    return out


def test_router_matches_reference_under_continuous_batching():
    torch.manual_seed(1)
    p = {name: torch.randn(n, D) for name, n in (("A", 5), ("B", 6), ("C", 4), ("U", 3))}
    mem = make_memory({"A": p["A"], "B": p["B"], "C": p["C"]})  # U matches nothing
    router = Router(mem, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"))
    attachment.standalone("t", router)
    live = {"A", "B", "C", "U"}
    # step 1: A whole prompt, B first chunk (4 of 6), C opted out, U whole prompt
    x1 = torch.cat([p["A"], p["B"][:4], p["C"], p["U"]])
    o1 = step(router, "t", [("A", 0, 5, 5, False), ("B", 0, 4, 6, False), ("C", 0, 4, 4, True), ("U", 0, 3, 3, False)],
              x1, live)
    assert torch.allclose(o1[:5], reference(mem, p["A"], p["A"]), atol=1e-5)  # exact: prompt in one step
    assert o1[:5].abs().sum() > 0 and (o1[5:] == 0).all()  # A routed; B undecided yet; C opted out; U unmatched
    # step 2: decode A, B's last chunk (decides from all 6 prompt tokens), decode C and U
    a2, b2, c2, u2 = torch.randn(1, D), p["B"][4:], torch.randn(1, D), torch.randn(1, D)
    o2 = step(router, "t", [("A", 5, 1, 5, False), ("B", 4, 2, 6, False), ("C", 4, 1, 4, True), ("U", 3, 1, 3, False)],
              torch.cat([a2, b2, c2, u2]), live)
    assert torch.allclose(o2[:1], reference(mem, p["A"], a2), atol=1e-5)
    assert torch.allclose(o2[1:3], reference(mem, p["B"], b2), atol=1e-5) and o2[1:3].abs().sum() > 0
    assert (o2[3:] == 0).all()
    assert router.counts["chunked"] == 1 and router.counts["opted_out"] == 1
    # step 3: A finished (dropped), B decodes with its decision; a new request reuses A's freed slot
    live = {"B", "C", "U", "A2"}
    b3 = torch.randn(1, D)
    o3 = step(router, "t", [("B", 6, 1, 6, False), ("A2", 0, 5, 5, False)], torch.cat([b3, p["A"]]), live)
    assert torch.allclose(o3[:1], reference(mem, p["B"], b3), atol=1e-5)
    assert torch.allclose(o3[1:], reference(mem, p["A"], p["A"]), atol=1e-5)
    assert "A" not in router.states


def test_unrouted_tokens_are_bit_identical_and_warmup_is_a_no_op():
    torch.manual_seed(2)
    p = torch.randn(4, D)
    mem = make_memory({"A": p})
    router = Router(mem, max_reqs=2, max_tokens=16, dtype=torch.float32, device=torch.device("cpu"))
    attachment.standalone("u", router)
    base = torch.randn(4, DM) * 1e-8 - 0.0
    out = base.clone()
    memory_term(p, out, "u")  # not armed: a profiling forward
    assert torch.equal(out, base)
    router.prepare(["X"], np.array([0]), np.array([4]), np.array([4]), [True], [b"X"], {"X"})
    memory_term(p, out, "u")
    assert torch.equal(out, base)  # opted out: bit-identical, not base + 0


def test_prefix_hit_reuses_the_remembered_decision():
    torch.manual_seed(3)
    p = torch.randn(6, D)
    mem = make_memory({"A": p})
    router = Router(mem, max_reqs=2, max_tokens=16, dtype=torch.float32, device=torch.device("cpu"))
    attachment.standalone("p", router)
    step(router, "p", [("r1", 0, 6, 6, False)], p, {"r1"}, [b"P"])
    step(router, "p", [("r1", 6, 1, 6, False)], torch.randn(1, D), {"r1"}, [b"P"])  # read back r1's decision
    # same prompt (same key) again, first 4 tokens cached: only the last 2 run, the decision is reused
    out = step(router, "p", [("r2", 4, 2, 6, False)], p[4:], {"r2"}, [b"P"])
    assert router.counts["reused"] == 1
    assert torch.allclose(out, reference(mem, p, p[4:]), atol=1e-5) and out.abs().sum() > 0


def test_last_token_feature_and_shards_route_like_the_transformers_path():
    """feature="last" is decided from each request's last prompt token (also when the prompt comes in
    two chunks), and each routed token takes its own edit's shard of W_m."""
    torch.manual_seed(4)
    p = {name: torch.randn(n, D) for name, n in (("A", 5), ("B", 6), ("C", 4))}
    mem = make_memory(p, feature="last", n_shards=3)
    router = Router(mem, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"))
    attachment.standalone("last", router)
    live = {"A", "B", "C"}
    o1 = step(router, "last", [("A", 0, 5, 5, False), ("B", 0, 3, 6, False), ("C", 0, 4, 4, False)],
              torch.cat([p["A"], p["B"][:3], p["C"]]), live)
    assert torch.allclose(o1[:5], reference(mem, p["A"], p["A"]), atol=1e-5) and o1[:5].abs().sum() > 0
    assert torch.allclose(o1[8:], reference(mem, p["C"], p["C"]), atol=1e-5) and o1[8:].abs().sum() > 0
    o2 = step(router, "last", [("B", 3, 3, 6, False)], p["B"][3:], live)
    assert torch.allclose(o2, reference(mem, p["B"], p["B"][3:]), atol=1e-5) and o2.abs().sum() > 0
    # a prompt whose last token alone is another edit's last token routes to that edit
    hybrid = torch.cat([p["A"][:-1], p["C"][-1:]])
    o3 = step(router, "last", [("H", 0, 5, 5, False)], hybrid, {"H"})
    assert torch.allclose(o3, reference(mem, p["C"], hybrid), atol=1e-5) and o3.abs().sum() > 0
    attachment.remove("last")


def test_a_swapped_memory_serves_new_requests_while_requests_in_flight_keep_theirs():
    torch.manual_seed(3)
    p = {name: torch.randn(n, D) for name, n in (("A", 5), ("B", 6), ("N", 4))}
    old = make_memory({"A": p["A"]})
    new = make_memory({"A": p["A"], "N": p["N"]})  # the store's next version: A's row kept, N appended
    with torch.no_grad():
        new.weight.normal_(0, 0.5)  # the new edit's training moved W_m
    router = Router(old, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"))
    attachment.standalone("swap", router)
    live = {"A", "B"}
    # A routed under the old memory; B has read the first 4 of its 6 prompt tokens
    step(router, "swap", [("A", 0, 5, 5, False), ("B", 0, 4, 6, False)], torch.cat([p["A"], p["B"][:4]]), live)
    router.swap(new)
    assert router.old_memories and router.gen == 1
    # A decodes with the old W_m; B completes its prompt and decides with the new memory; N arrives new
    a2, n_acts = torch.randn(1, D), p["N"]
    live = {"A", "B", "N"}
    o = step(router, "swap", [("A", 5, 1, 5, False), ("B", 4, 2, 6, False), ("N", 0, 4, 4, False)],
             torch.cat([a2, p["B"][4:], n_acts]), live)
    assert torch.allclose(o[:1], reference(old, p["A"], a2), atol=1e-5)
    assert not torch.allclose(o[:1], reference(new, p["A"], a2), atol=1e-3)
    assert torch.allclose(o[1:3], reference(new, p["B"], p["B"][4:]), atol=1e-5)
    assert torch.allclose(o[3:], reference(new, p["N"], n_acts), atol=1e-5) and o[3:].abs().sum() > 0
    # once A finishes, the old memory is let go
    step(router, "swap", [("N", 4, 1, 4, False)], torch.randn(1, D), {"N"})
    assert router.old_memories == {}


def test_the_op_runs_only_the_shards_a_step_can_use():
    """Subject rule with 3 shards: a step computes the memory term with the shards of its requests' edits
    (decided) or candidates (deciding) only, and every token still gets exactly its own edit's term."""
    torch.manual_seed(5)
    p = {name: torch.randn(n, D) for name, n in (("A", 5), ("B", 6), ("C", 4))}
    mem = make_memory(p, n_shards=3)  # edit i on shard i
    mem.rule, mem.subject_tau = "subject", 0.7
    for name in p:
        mem.subjects.add([f"subject {name}"], f"about subject {name}")
    texts = {1: "about subject A", 2: "about subject B"}
    router = Router(mem, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"),
                    text_of=lambda ids: texts[ids[0]])
    attachment.standalone("present", router)
    router.admit([("A", [1] * 5), ("B", [2] * 6)])

    def ref(name, acts):
        idx = mem.masks_from_acts(p[name].unsqueeze(0), torch.ones(1, p[name].shape[0], dtype=torch.bool))
        d = mem.decide_masks(idx, mem.candidates([texts[1 if name == "A" else 2]]))
        return mem.delta(acts.unsqueeze(0), d.mask, d.shard)[0]

    live = {"A", "B"}
    o1 = step(router, "present", [("A", 0, 5, 5, False), ("B", 0, 6, 6, False)], torch.cat([p["A"], p["B"]]), live)
    assert router.plan.shards == (0, 1)  # the candidates' shards: C's shard 2 is not computed
    assert torch.allclose(o1[:5], ref("A", p["A"]), atol=1e-5) and o1[:5].abs().sum() > 0
    assert torch.allclose(o1[5:], ref("B", p["B"]), atol=1e-5) and o1[5:].abs().sum() > 0
    nxt = torch.randn(1, D)
    o2 = step(router, "present", [("A", 5, 1, 5, False)], nxt, {"A"})  # a decode step of A alone
    assert router.plan.shards == (0,)  # one matmul
    assert torch.allclose(o2, ref("A", nxt), atol=1e-5) and o2.abs().sum() > 0
    attachment.remove("present")


def test_a_request_naming_no_edited_subject_is_decided_at_admission():
    """Subject rule: a request with no candidate gets the base model without any work in the forward (no
    feature accumulated, no decision, no memory term), bit-identical to the base output."""
    torch.manual_seed(6)
    p = {"A": torch.randn(5, D)}
    mem = make_memory(p)
    mem.rule = "subject"
    mem.subjects.add(["subject A"], "about subject A")
    texts = {1: "about subject A", 3: "about something else"}
    router = Router(mem, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"),
                    text_of=lambda ids: texts[ids[0]])
    attachment.standalone("nocand", router)
    router.admit([("U", [3] * 4)])
    u = torch.randn(4, D)
    base = torch.randn(4, DM)
    out = base.clone()
    router.prepare(["U"], np.array([0]), np.array([4]), np.array([4]), [False], [b"U"], {"U"})
    assert not router.plan.need_acc and router.plan.n_decide == 0 and not router.plan.need_memory
    memory_term(u, out, "nocand")
    assert torch.equal(out, base) and router.counts["no_candidate"] == 1
    router.admit([("A", [1] * 5)])  # a request naming the subject still decides in the forward and routes
    o = step(router, "nocand", [("U", 4, 1, 4, False), ("A", 0, 5, 5, False)], torch.cat([torch.randn(1, D), p["A"]]),
             {"U", "A"})
    assert (o[:1] == 0).all() and o[1:].abs().sum() > 0
    attachment.remove("nocand")


def test_free_columns_each_token_reads_its_own_edits_columns_whatever_the_shards():
    """Free columns over 3 shards: the op computes no shard matmul (no shard plan); every token gets its own
    edit's term W_m[shard][:, cols] a[cols] from the weights kept at its decision, equal to the masked matmul of
    the transformers path, and a request routed before a swap keeps the weights it was routed with."""
    torch.manual_seed(7)
    p = {name: torch.randn(n, D) for name, n in (("A", 5), ("B", 6), ("C", 4))}
    mem = ResidualMemory(DM, D, K, rule="subject", subject_tau=0.0, columns="free", n_shards=3)
    for i, name in enumerate(p):  # edit i on shard i, at columns 16 i .. 16 i + 15
        mem.add_edit(torch.arange(K * i, K * (i + 1)), shard=i)
        mem.subjects.add([f"subject {name}"], f"about subject {name}")
    with torch.no_grad():
        mem.weight.normal_(0, 0.5)
    texts = {1: "about subject A", 2: "about subject B"}
    router = Router(mem, max_reqs=4, max_tokens=32, dtype=torch.float32, device=torch.device("cpu"),
                    text_of=lambda ids: texts[ids[0]])
    attachment.standalone("free", router)
    router.admit([("A", [1] * 5), ("B", [2] * 6)])

    def ref(memory, name, acts):  # the transformers path's term (ResidualMemory.delta: a masked matmul)
        d = memory.decide_masks(torch.zeros(1, K, dtype=torch.int64), memory.candidates([texts[1 if name == "A" else 2]]))
        assert d.row.item() == (0 if name == "A" else 1)
        return memory.delta(acts.unsqueeze(0), d.mask, d.shard)[0]

    o1 = step(router, "free", [("A", 0, 5, 5, False), ("B", 0, 6, 6, False)], torch.cat([p["A"], p["B"]]), {"A", "B"})
    assert router.plan.shards is None  # no shard plan: the term never loops over shards
    assert torch.allclose(o1[:5], ref(mem, "A", p["A"]), atol=1e-5) and o1[:5].abs().sum() > 0
    assert torch.allclose(o1[5:], ref(mem, "B", p["B"]), atol=1e-5) and o1[5:].abs().sum() > 0
    new = mem.empty_like()  # the store's next version: the same edits, retrained weights
    new.index, new.subjects = mem.index, mem.subjects
    with torch.no_grad():
        new.weight.normal_(0, 0.5)
    router.swap(new)
    assert router.old_memories == {}  # nothing to keep: the routed slots hold their own weights
    nxt = torch.randn(2, D)
    o2 = step(router, "free", [("A", 5, 1, 5, False), ("B", 6, 1, 6, False)], nxt, {"A", "B"})
    assert torch.allclose(o2[:1], ref(mem, "A", nxt[:1]), atol=1e-5)  # routed before the swap: the old weights
    assert torch.allclose(o2[1:], ref(mem, "B", nxt[1:]), atol=1e-5)
    attachment.remove("free")
