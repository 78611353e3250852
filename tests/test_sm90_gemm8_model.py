"""CPU checks of the persistent sm_90a 8-bit GEMM (csrc/cuda/gemm8_sm90.cu) that need no GPU.

1. The tile schedule: ``lowbit_engine._C.gemm8_sm90_schedule`` runs the very header the kernel and its
   launcher use (csrc/include/lowbit/sm90_gemm8_schedule.h). Every (token block, weight pair, K split) is
   one unit, the splits of a tile partition its K exactly, the persistent clusters (cluster c runs units
   c, c + clusters, ...) cover every unit exactly once, and the CTAs' weight rows cover N.
2. The pipeline protocol: a model of the mbarrier semantics (arrival counts, transaction bytes, phase
   parity waits) runs the kernel's producer and consumer sequences -- statement for statement, with the
   ring positions from ``_C.gemm8_pipe_states`` (the kernel's PipeState) -- for a 2-CTA cluster whose
   token-tile halves are multicast into both CTAs, under random interleavings and random TMA completion
   order. It checks that no run deadlocks, that a consumer only reads a slot once both token halves and its
   weights for that (unit, k block) have landed, and that no TMA write (own or the peer's multicast) lands
   in a slot a consumer warp of that CTA still reads. Two deliberately broken protocols (empty barriers that
   count only the CTA's own consumers; a producer waiting on the wrong parity) must be caught.
"""

from __future__ import annotations

import random

import pytest

_C = pytest.importorskip("lowbit_engine._C")

if not hasattr(_C, "gemm8_sm90_schedule"):
    pytest.skip("lowbit_engine._C was built without the gemm8 schedule bindings", allow_module_level=True)

SMS = 132
FLUX = (3072, 9216, 12288, 15360, 21504)


def _schedule(M, N, K, sms=SMS, group=8):
    return _C.gemm8_sm90_schedule(M, N, K, sms, group)


# ----------------------------------------------------------------------------------------------- schedule

SHAPES = [(m, n, k) for m in (1, 16, 17, 64, 65, 111, 4608) for n, k in ((3072, 3072), (12288, 3072),
                                                                       (3072, 12288), (21504, 3072),
                                                                       (3072, 15360))]
SHAPES += [(4608, 8, 128), (17, 520, 256), (111, 3080, 1152), (300, 24, 384), (5000, 9216, 3072)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_unit_once_and_k_partitioned(M, N, K):
    d = _schedule(M, N, K)
    tok, splits, units = d["tok"], d["splits"], d["units"]
    assert tok == (32 if M <= 64 else 128)
    assert d["m_blocks"] == -(-M // tok) and d["k_blocks"] == K // 128
    assert d["n_pairs"] == -(-N // (2 * d["rows_per_cta"]))
    assert len(units) == d["m_blocks"] * d["n_pairs"] * splits
    keys = [(m, n, s) for m, n, s, _, _ in units]
    assert len(set(keys)) == len(keys)  # no unit twice
    assert set(keys) == {(m, n, s) for m in range(d["m_blocks"]) for n in range(d["n_pairs"]) for s in range(splits)}
    by_tile: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for m, n, s, b, e in units:
        assert 0 <= b < e <= d["k_blocks"]
        if splits > 1:
            assert e - b >= 2  # each split keeps at least two stages
        by_tile.setdefault((m, n), []).append((b, e))
    for ranges in by_tile.values():  # the splits of a tile tile its K exactly
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == d["k_blocks"]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if tok == 128:
        assert splits == 1  # the whole K stays in the wgmma accumulators


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_persistent_clusters_cover_units_and_rows(M, N, K):
    d = _schedule(M, N, K)
    units, clusters = d["units"], d["clusters"]
    assert 1 <= clusters <= min(len(units), SMS // 2)
    ran = [u for c in range(clusters) for u in range(c, len(units), clusters)]  # the kernel's loop
    assert sorted(ran) == list(range(len(units)))
    rows = d["rows_per_cta"]
    for m_block in range(d["m_blocks"]):  # both CTAs of a cluster: weight rows (2 pair + rank) * 256
        covered = sorted(r for (mb, n, s, _, _) in units if mb == m_block and s == 0
                         for rank in range(d["cluster"]) for r in range((2 * n + rank) * rows, (2 * n + rank + 1) * rows))
        assert covered == list(range(d["n_pairs"] * 2 * rows)) and covered[-1] >= N - 1


def test_grouped_rasterization_shares_weights_in_l2():
    # FLUX fc1 (N 12288): the first group*m_blocks units run `group` weight pairs over every token block.
    d = _schedule(4608, 12288, 3072)
    g, mb = d["group"], d["m_blocks"]
    assert g == 8
    first = d["units"][: g * mb]
    assert {n for _, n, _, _, _ in first} == set(range(g))
    assert {m for m, _, _, _, _ in first} == set(range(mb))
    # the clusters that run at the same time (one unit each) share a handful of token blocks
    wave = d["units"][: d["clusters"]]
    assert len({m for m, _, _, _, _ in wave}) <= -(-d["clusters"] // g) + 1


@pytest.mark.parametrize("N,K", [(3072, 3072), (18432, 3072), (3072, 12288), (3072, 15360)])
def test_small_m_splits_fill_the_clusters(N, K):
    d = _schedule(16, N, K)
    tiles = d["m_blocks"] * d["n_pairs"]
    rounds = -(-len(d["units"]) // d["clusters"])
    # the busiest cluster's share of K is within 10% of the ideal tiles / clusters (wave quantization)
    assert rounds / d["splits"] <= 1.1 * max(tiles / (SMS // 2), 1 / (d["k_blocks"] // 2))
    assert d["clusters"] == SMS // 2 or d["splits"] == d["k_blocks"] // 2


def test_pipe_states_are_the_ring():
    for stages in (3, 5, 8):
        got = _C.gemm8_pipe_states(stages, 40)
        assert got == [(i % stages, (i // stages) & 1) for i in range(40)]
    with pytest.raises(ValueError):
        _C.gemm8_pipe_states(4, 1)


# ----------------------------------------------------------------------------------------------- protocol

class MBarrier:
    """mbarrier semantics: a phase completes when its pending arrivals reach 0 and its transaction count
    is 0 (the count may go negative first: bytes can land before arrive.expect_tx); try_wait.parity(p) is
    true once the phase with parity p has completed."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending, self.tx = self.count, 0

    def arrive(self, expect_tx: int = 0):
        assert self.pending > 0, "arrive on a barrier with no pending arrivals"
        self.tx += expect_tx
        self.pending -= 1
        self._check()

    def complete_tx(self, nbytes: int):
        self.tx -= nbytes
        self._check()

    def try_wait(self, parity: int) -> bool:
        return (self.phase & 1) != parity


class ProtocolError(AssertionError):
    pass


def run_cluster(units_per_cluster, stages, *, seed, empty_count=16, producer_parity_flip=1, b_half=2, a_bytes=3,
                max_steps=200_000):
    """Run one cluster (2 CTAs x [producer, 8 consumer warps]) through its units; units_per_cluster is the
    list of (unit id, k blocks). Raises ProtocolError on a violation, returns the number of steps."""
    rng = random.Random(seed)
    ring = _C.gemm8_pipe_states(stages, sum(nk for _, nk in units_per_cluster) + 1)
    ctas = []
    for _ in range(2):
        ctas.append({
            "full": [MBarrier(1) for _ in range(stages)],
            "empty": [MBarrier(empty_count) for _ in range(stages)],
            "slot": [{"b0": None, "b1": None, "a": None} for _ in range(stages)],
            "held": [set() for _ in range(stages)],
        })
    transfers: list[tuple[int, int, str, tuple]] = []  # (cta, slot, part, tag) in flight

    def producer(rank):
        me = ctas[rank]
        i = 0
        for u, nk in units_per_cluster:
            for kb in range(nk):
                slot, phase = ring[i]
                while not me["empty"][slot].try_wait(phase ^ producer_parity_flip):
                    yield
                me["full"][slot].arrive(expect_tx=2 * b_half + a_bytes)  # arrive.expect_tx: whole stage
                for dst in (0, 1):  # this CTA's token half, multicast into both CTAs
                    transfers.append((dst, slot, f"b{rank}", (u, kb)))
                transfers.append((rank, slot, "a", (u, kb)))  # own weights
                i += 1
                yield

    def consumer_warp(rank, w):
        me = ctas[rank]
        i = 0
        for u, nk in units_per_cluster:
            prev = None
            for kb in range(nk):
                slot, phase = ring[i]
                while not me["full"][slot].try_wait(phase):
                    yield
                got = me["slot"][slot]
                if got != {"b0": (u, kb), "b1": (u, kb), "a": (u, kb)}:
                    raise ProtocolError(f"CTA {rank} warp {w} read slot {slot} = {got}, wanted {(u, kb)}")
                me["held"][slot].add(w)
                yield  # the stage's MMAs are in flight; then the previous slot is released
                if prev is not None:
                    release(rank, w, prev)
                prev = slot
                i += 1
                yield
            release(rank, w, prev)  # after wait_group 0 at the end of the unit
            yield

    def release(rank, w, slot):
        ctas[rank]["held"][slot].discard(w)
        for dst in (0, 1):  # lane r arrives on cluster rank r's empty barrier
            ctas[dst]["empty"][slot].arrive()

    def land(k):
        dst, slot, part, tag = transfers.pop(k)
        if ctas[dst]["held"][slot]:
            raise ProtocolError(f"TMA wrote CTA {dst} slot {slot} ({part}) while warps {ctas[dst]['held'][slot]} read it")
        ctas[dst]["slot"][slot][part] = tag
        ctas[dst]["full"][slot].complete_tx(b_half if part.startswith("b") else a_bytes)

    agents = [producer(0), producer(1)] + [consumer_warp(r, w) for r in (0, 1) for w in range(8)]
    live = list(range(len(agents)))
    steps = 0
    stalled = 0
    while live or transfers:
        steps += 1
        if steps > max_steps:
            raise ProtocolError("no progress: deadlock")
        if transfers and (not live or rng.random() < 0.3):
            land(rng.randrange(len(transfers)))
            stalled = 0
            continue
        k = rng.choice(live)
        try:
            next(agents[k])
        except StopIteration:
            live.remove(k)
        stalled += 1
        if stalled > 50_000 and not transfers:
            raise ProtocolError("no progress: deadlock")
    for cta in ctas:  # everything was consumed and released before the final cluster barrier
        assert all(not h for h in cta["held"])
    return steps


def _units(nks):
    return [(u, nk) for u, nk in enumerate(nks)]


@pytest.mark.parametrize("stages", [3, 5, 8])
@pytest.mark.parametrize("nks", [(1,), (2, 1, 3), (7, 7), (4, 1, 1, 9, 2)])
@pytest.mark.parametrize("seed", range(6))
def test_protocol_holds_under_random_interleavings(stages, nks, seed):
    run_cluster(_units(nks), stages, seed=seed)


def test_protocol_model_catches_own_cta_only_release():
    # Empty barriers that count only this CTA's 8 warps let a producer multicast into the peer's slot
    # while the peer still reads it (or read stale data): the model must see it on some interleaving.
    with pytest.raises(ProtocolError):
        for seed in range(200):
            run_cluster(_units((9, 9)), 3, seed=seed, empty_count=8)


def test_protocol_model_catches_wrong_parity():
    with pytest.raises(ProtocolError):
        run_cluster(_units((6,)), 3, seed=0, producer_parity_flip=0, max_steps=20_000)
