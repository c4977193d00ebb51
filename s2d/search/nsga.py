"""NSGA-II over the search space (EDANAS-style), with pymoo's ask-and-tell loop.

A genome is one integer gene per decision of the largest arch (``SearchSpace.genome_slots``);
``SearchSpace.decode`` reads it as the nearest valid arch, so crossover and mutation never
produce an invalid network. The two objectives are the evaluator's: validation accuracy at
the arch's thresholds (up) and average MACs over the static model's (down); with
``--search-thresholds`` the exit thresholds are genes too. Every distinct arch costs one real
evaluation of the shared budget; an offspring whose network was already requested is replaced by
a random genome (a "random immigrant"), since many genomes decode to one network and the
population would otherwise stall on repeats. Resuming replays the run from its seed: evaluations already
archived come back from the archive, so the replay reaches the killed generation without
re-scoring anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from s2d.errors import S2DError
from s2d.search.space import SearchSpace

if TYPE_CHECKING:
    from s2d.search.session import SearchSession

STALL_GENERATIONS = 25  # generations in a row without a new arch: the space is (nearly) exhausted
IMMIGRANT_TRIES = 20  # random genomes tried in place of one whose network was already requested


def population_size(budget: int) -> int:
    """About six generations over the budget, at least 8 and at most 40 archs each."""
    return int(np.clip(budget // 6, 8, 40))



def nsga2_search(session: SearchSession, space: SearchSpace, seed: int) -> None:
    """Evolve archs until the session's budget of distinct archs is spent."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling
    except ImportError:
        raise S2DError("--algo nsga2 needs pymoo: pip install -e '.[search]'") from None
    upper = space.gene_bounds()
    problem = Problem(n_var=len(upper), n_obj=2, xl=np.zeros(len(upper)), xu=upper, vtype=int)
    algorithm = NSGA2(pop_size=population_size(session.budget), sampling=IntegerRandomSampling(),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_eval", 10**12), seed=seed)
    immigrants = np.random.default_rng(seed + 1)
    requested: set[str] = set()  # this process's requests: a replay after a kill grows it exactly as the run did
    stalled = 0
    while not session.done:
        pop = algorithm.ask()
        before = len(session.log)
        genomes, archs = np.asarray(pop.get("X")).round().astype(np.int64), []
        for i in range(len(genomes)):
            arch = space.decode(genomes[i])
            key = session.evaluator.archive_key(arch)
            for _ in range(IMMIGRANT_TRIES):  # many genomes are one network: a repeat gives way to a random one
                if key not in requested:
                    break
                genomes[i] = immigrants.integers(0, upper + 1)
                arch = space.decode(genomes[i])
                key = session.evaluator.archive_key(arch)
            requested.add(key)
            archs.append(arch)
        evs = session.request_many(archs)  # the generation at once: a pool of workers scores it in parallel
        if len(evs) < len(archs) or session.done:
            return
        objectives = [(-ev.accuracy, ev.objective_ratio) for ev in evs]
        pop.set("X", genomes)
        pop.set("F", np.asarray(objectives, dtype=float))
        algorithm.tell(infills=pop)
        stalled = stalled + 1 if len(session.log) == before else 0
        if stalled >= STALL_GENERATIONS:
            raise S2DError(f"NSGA-II found only {len(session.log)} distinct archs (the population converged); "
                           "lower --evaluations")
