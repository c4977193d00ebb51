"""Parallel candidate evaluation on Ray (optional extra ``pip install -e '.[distributed]'``).

``--workers N`` starts N Ray actors (on this machine, or on the cluster ``--ray-address``
names); each builds the conversion's evaluator once, from the run directory and its
config: the data, the importance-ordered model, the trained supernet and the static
network with its probe heads. The searchers hand the driver batches of archs (a
generation of NSGA-II, the draws random search still owes); the actors score the archs
the archive does not hold, and the driver alone writes the archive, in request order. A
killed search therefore loses only the evaluations in flight, and the archive reads
exactly as after a serial search with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from s2d.errors import S2DError


def _ray():
    try:
        import ray
    except ImportError:
        raise S2DError("--workers needs Ray: pip install -e '.[distributed]'") from None
    return ray


EvaluatorFactory = Callable[[], Any]  # builds the conversion's search evaluator in a worker


class _Scorer:
    """One worker: the conversion's evaluator without the archive (the driver owns it)."""

    def __init__(self, build: EvaluatorFactory, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.evaluator = build()
        self.evaluator.archive = None

    def score(self, arch: dict[str, Any]) -> dict[str, Any]:
        from s2d.transform.arch import MultiStageArch

        return self.evaluator.scored(MultiStageArch.from_dict(arch)).to_record()


class RayScoringPool:
    """A :class:`s2d.search.evaluator.ScoringPool` of Ray actors."""

    def __init__(self, build: EvaluatorFactory, workers: int, *, address: str | None = None,
                 threads_per_worker: int = 1) -> None:
        """``build``: a picklable callable (a ``functools.partial`` of a module-level function) that each worker
        calls once to build its evaluator."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=workers * threads_per_worker, include_dashboard=False, log_to_driver=False)
            except Exception as e:
                raise S2DError(f"cannot start or reach Ray ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                               "check --ray-address, or drop --workers to search in this process") from None
        actor = ray.remote(num_cpus=threads_per_worker)(_Scorer)
        self.workers = workers
        self._actors = [actor.remote(build, threads_per_worker) for _ in range(workers)]
        self._pool = ray.util.ActorPool(self._actors)

    def score(self, archs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return self._pool.map(lambda a, arch: a.score.remote(arch), archs)

    def close(self) -> None:
        ray = _ray()
        for a in self._actors:
            ray.kill(a)
        self._actors = []
