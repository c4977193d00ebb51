"""Predictor-screened evolution (in the spirit of BANANAS and NPENAS): every real evaluation goes to the
candidate the reward predictor rates best among many mutants of the best archs so far and some random
draws.

PPO learns a policy from the ~150 rewards of a whole search; a predictor fitted on the same rewards can
rate thousands of candidates per evaluation for free, and mutations keep them near what already scored
well. It starts from the space's known-good archs (``SearchSpace.seeds``: uniformly pruned networks and
their cascades with the static network, served from the archive, but counted against the budget like
any request) and random draws, until ``WARMUP`` rewards exist to fit on. A candidate's rating is the
trees' mean plus ``EXPLORE`` times their spread, so archs unlike anything evaluated get their chance.

Each step's candidates come from a generator seeded by (seed, evaluations so far, draws that found
nothing new), so a resumed search continues as the killed one would have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from s2d.errors import S2DError
from s2d.search.predictor import RewardPredictor, arch_from_key
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch

if TYPE_CHECKING:
    from s2d.search.session import SearchSession

WARMUP = 24  # rewards before the predictor rates candidates (the seeds, then random draws)
PARENTS = 8  # best archs so far whose mutants are candidates
MUTANTS = 24  # mutants per parent and step (a step's candidates cost about a second to draw and rate)
RANDOM_CANDIDATES = 128  # random draws among each step's candidates
EXPLORE = 0.5  # weight of the trees' spread in a candidate's rating
MAX_ATTEMPTS = 200  # steps in a row that find no new arch: the space is (nearly) exhausted


def mutate(space: SearchSpace, arch: MultiStageArch, rng: np.random.Generator, tries: int = 10) -> MultiStageArch:
    """``arch`` with one or two of the genes it uses redrawn (the stage count among them), decoded to the
    nearest valid arch: a neighbour in the space. Many redraws change nothing (a gene the canonical form
    fixes, or the option it had), so it redraws until the network differs, ``tries`` times at most."""
    genes, upper = space.encode(arch), space.gene_bounds()
    used = [0] + [i for i, slot in enumerate(space.genome_slots()) if slot[0] != "stages"
                  and slot[1] < min(arch.num_stages + 1, space.max_stages)]  # a new last stage can appear
    mutant = arch
    for _ in range(tries):
        g = genes.copy()
        for i in rng.choice(used, size=int(rng.integers(1, 3)), replace=False):
            g[i] = rng.integers(0, upper[i] + 1)
        mutant = space.decode(g)
        if mutant.key() != arch.key():
            break
    return mutant


def evolution_search(session: SearchSession, space: SearchSpace, seed: int) -> None:
    """Spend the session's budget one predictor-rated candidate at a time."""
    key = session.evaluator.archive_key
    warmup, parents, mutants, random_candidates, explore = WARMUP, PARENTS, MUTANTS, RANDOM_CANDIDATES, EXPLORE
    for arch in space.seeds():
        if session.done or len(session.log) >= warmup:
            break
        session.request(arch)
    attempt, evaluated = 0, -1
    while not session.done:
        attempt = attempt + 1 if len(session.log) == evaluated else 0  # a repeat drew a known arch: draw anew
        evaluated = len(session.log)
        if attempt > MAX_ATTEMPTS:
            raise S2DError(f"evolution found only {evaluated} distinct archs; lower --evaluations")
        rng = np.random.default_rng([seed, evaluated, attempt])
        if len(session.log) < warmup:
            session.request(space.sample(rng))
            continue
        log = session.log
        predictor = RewardPredictor(space, seed).fit([arch_from_key(r["key"]) for r in log],
                                                     [r["reward"] for r in log])
        best = sorted(log, key=lambda r: r["reward"], reverse=True)[:parents]
        pool = [mutate(space, arch_from_key(r["key"]), rng) for r in best for _ in range(mutants)]
        pool += [space.sample(rng) for _ in range(random_candidates)]
        fresh: dict[str, MultiStageArch] = {}
        for arch in pool:
            k = key(arch)
            if k not in session.seen:
                fresh.setdefault(k, arch)
        if not fresh:  # every candidate was evaluated already: a random arch keeps the search going
            session.request(space.sample(rng))
            continue
        candidates = list(fresh.values())
        mean, spread = predictor.predict_spread(candidates)
        session.request(candidates[int(np.argmax(mean + explore * spread))])
