"""A model of the split consumer schedule of csrc/cuda/gemm_w4_sm90.cu, checked on the CPU.

The kernel's split path (LOWBIT_GEMM_W4_SM90_SCHEDULE=split) keeps its ring slot, barrier phase, fragment
set and scale index by increment instead of recomputing them per group. A wrong parity hangs the GPU (a
lost device call), a wrong slot or fragment set gives garbage. This test replays the same control flow
(transliterated statement by statement from the `step` / `last` lambdas and the loop around them) as a list
of events and checks them against what the hardware semantics require:

* wgmma commit groups complete in order; `wait_group n` leaves at most n pending;
* a half is promoted only after its MMA completed, with the scales and token-scale slot of its own group;
* a fragment set is rebuilt only when no pending MMA was issued with it;
* the full barrier of stage s is waited on in slot s % 6 with parity (s // 6) & 1 (mbarrier try_wait.parity
  semantics), and every stage is released (empty arrive) exactly once, after its last read.
"""

from __future__ import annotations

import pytest

K_STAGES = 6


def split_schedule_events(G: int) -> list[tuple]:
    """The consumer's events for G groups, in program order (mirror of the kernel's split path)."""
    ev: list[tuple] = []
    # Prologue shared with the group schedule: wait for stage 0 (phase 0), build group 0 into set "cur".
    ev.append(("wait_full", 0, 0))
    ev.append(("build", 0, 0, "cur"))
    scale_next = 1  # sw0 = sw_r0 + 1
    c = 0  # scales of the current group (s_next0 = sw_r0[0])
    state = {"slot": 0, "phase": 0, "c": c, "scale_next": scale_next}

    def issue_half(slot, h, half, frag):
        ev.append(("issue", slot, h, half, frag))

    def step(h, a, b):
        n = state["scale_next"]
        state["scale_next"] += 1
        nslot = state["slot"]
        if h == 1:
            nslot = 0 if state["slot"] + 1 == K_STAGES else state["slot"] + 1
            state["phase"] ^= 1 if nslot == 0 else 0
            ev.append(("wait_full", nslot, state["phase"]))
        ev.append(("build", nslot, 1 - h, b))
        ev.append(("wait", 1))
        ev.append(("promote", state["slot"], h, 0, state["c"]))
        issue_half(nslot, 1 - h, 0, b)
        ev.append(("wait", 1))
        ev.append(("fence", a))
        ev.append(("promote", state["slot"], h, 1, state["c"]))
        if h == 1:
            ev.append(("arrive_empty", state["slot"]))
        issue_half(nslot, 1 - h, 1, b)
        state["c"] = n
        state["slot"] = nslot

    def last(h, a):
        ev.append(("wait", 1))
        ev.append(("promote", state["slot"], h, 0, state["c"]))
        ev.append(("wait", 0))
        ev.append(("fence", a))
        ev.append(("promote", state["slot"], h, 1, state["c"]))
        ev.append(("arrive_empty", state["slot"]))

    issue_half(0, 0, 0, "cur")
    issue_half(0, 0, 1, "cur")
    grp = 0
    while grp + 2 < G:
        step(0, "cur", "nxt")
        step(1, "nxt", "cur")
        grp += 2
    if grp + 2 == G:
        step(0, "cur", "nxt")
        last(1, "nxt")
    else:
        last(0, "cur")
    return ev


def check(G: int, ev: list[tuple]) -> None:
    num_stages = (G + 1) // 2
    pending: list[tuple[int, int, str]] = []  # (group, half, fragment set) in issue order
    done: set[tuple[int, int]] = set()
    built: dict[str, int] = {}  # fragment set -> group whose fragments it holds
    issued_groups = 0
    group_of_issue: dict[tuple[int, int], int] = {}
    full_waits: list[tuple[int, int]] = []
    empties: list[int] = []
    reads_left = {s: 0 for s in range(num_stages)}  # MMA halves + promotions still to read each stage
    for g in range(G):
        reads_left[g // 2] += 4  # two MMA halves and two promotions (token scales) per group
    stage_of_slot: dict[int, int] = {}
    promoted: list[tuple[int, int]] = []
    for e in ev:
        kind = e[0]
        if kind == "wait_full":
            _, slot, parity = e
            s = len(full_waits)
            assert slot == s % K_STAGES, (s, slot)
            assert parity == (s // K_STAGES) & 1, (s, parity)
            stage_of_slot[slot] = s
            full_waits.append((slot, parity))
        elif kind == "build":
            _, slot, h, frag = e
            assert all(p[2] != frag for p in pending), f"set {frag} rebuilt while an MMA reads it"
            g = 2 * stage_of_slot[slot] + h
            assert g < G
            built[frag] = g
        elif kind == "issue":
            _, slot, h, half, frag = e
            g = 2 * stage_of_slot[slot] + h
            assert built[frag] == g, "MMA issued with another group's fragments"
            if half == 0:
                assert g == issued_groups, "groups issued out of order"
                issued_groups += 1
            pending.append((g, half, frag))
            reads_left[g // 2] -= 1
        elif kind == "wait":
            while len(pending) > e[1]:
                g, half, _ = pending.pop(0)
                done.add((g, half))
        elif kind == "fence":
            assert all(p[2] != e[1] for p in pending), "fragments released while an MMA may read them"
        elif kind == "promote":
            _, slot, h, half, scale_group = e
            g = 2 * stage_of_slot[slot] + h
            assert (g, half) in done, f"promoted group {g} half {half} before its MMA completed"
            assert scale_group == g, "promotion used another group's weight scales"
            promoted.append((g, half))
            reads_left[g // 2] -= 1
        elif kind == "arrive_empty":
            s = stage_of_slot[e[1]]
            assert reads_left[s] == 0, f"stage {s} released with {reads_left[s]} reads left"
            empties.append(s)
    assert not pending
    assert promoted == [(g, h) for g in range(G) for h in (0, 1)]
    assert empties == list(range(num_stages))
    assert len(full_waits) == num_stages


@pytest.mark.parametrize("G", list(range(1, 30)) + [48, 192, 240])
def test_split_schedule_protocol(G: int) -> None:
    check(G, split_schedule_events(G))


def test_model_catches_a_wrong_parity() -> None:
    ev = split_schedule_events(14)  # 7 stages: stage 6 reuses slot 0 with parity 1
    bad = [("wait_full", 0, 0) if e == ("wait_full", 0, 1) else e for e in ev]
    with pytest.raises(AssertionError):
        check(14, bad)


def test_model_catches_an_early_promotion() -> None:
    ev = split_schedule_events(4)
    i = ev.index(("wait", 1))
    with pytest.raises(AssertionError):
        check(4, ev[:i] + ev[i + 1:])
