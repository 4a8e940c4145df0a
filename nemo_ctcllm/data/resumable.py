"""Mid-epoch resume for NeMo's training DataLoader: after a crash the run continues at the same batch.

Lightning saves and restores the state of any training loader that has ``state_dict``/``load_state_dict``
(its ``_Stateful`` protocol) inside its own checkpoint, but NeMo's loaders (map-style or Lhotse) have none, so
a run killed mid-epoch would replay the epoch from its first batch. :func:`make_resumable` turns the
``DataLoader`` NeMo built into a :class:`ResumableDataLoader` (same object, subclass swapped in, no copy):

* it counts the batches it has handed out in the current epoch and how many epochs it has started;
* on restore it skips that many batches *at the sampler*, before any audio is read: the sampler's indices
  (map-style) or cut batches (Lhotse samplers, which hold metadata only) are drawn and dropped;
* the order must be reproducible for this to be the same position: Lhotse samplers and DistributedSampler
  shuffle by (seed, epoch) already (Lightning calls their ``set_epoch``); a plain ``RandomSampler`` is given a
  generator seeded by (seed, epoch) here.

Limits (documented, not hidden): random augmentation drawn from the global RNG (dither, SpecAugment) is not
replayed, so the loss after resume matches an uninterrupted run only where the batch order decides it; with
worker processes the prefetched-but-unused batches are drawn again, which is what "same position" means.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler


class _SkipFirst:
    """An index sampler whose first ``skip`` items are drawn and dropped (then it is the sampler itself)."""

    def __init__(self, inner, skip: int):
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator:
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, StopIteration) is StopIteration:
                return
        # not `yield from it`: that calls iter() again, and a Lhotse sampler (its own iterator) would restart
        while (item := next(it, StopIteration)) is not StopIteration:
            yield item

    def __len__(self) -> int:
        return len(self.inner)


class ResumableDataLoader(DataLoader):
    """A DataLoader that remembers its position (see the module docstring). Defaults live on the class, so
    an instance Lightning re-creates (e.g. to insert a DistributedSampler) is resumable too."""

    _resume_seed: int = 0
    _epochs_started: int = 0
    _consumed: int = 0
    _skip_next: int = 0  # batches to skip in the next epoch (set by load_state_dict)
    _skipping: int = 0  # applied while the next iterator is created

    @property
    def _index_sampler(self):  # DataLoader's private hook: the iterator draws its indices from here
        inner = super()._index_sampler
        return _SkipFirst(inner, self._skipping) if self._skipping else inner

    def __iter__(self):
        epoch = self._epochs_started
        # Reproducible order, and no draw from the global RNG (which a resumed run restores): the loader's
        # own seed (worker seeds) and a RandomSampler's order come from generators seeded by (seed, epoch).
        seed = self._resume_seed * 100_003 + epoch
        self.generator = torch.Generator().manual_seed(seed)
        if isinstance(self.sampler, RandomSampler):
            self.sampler.generator = torch.Generator().manual_seed(seed + 1)
        self._skipping, self._skip_next = self._skip_next, 0
        self._consumed = self._skipping
        try:
            it = super().__iter__()
        finally:
            self._skipping = 0
        self._epochs_started = epoch + 1
        return self._count(it)

    def _count(self, it) -> Iterator:
        for batch in it:
            self._consumed += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        # an epoch that has begun is saved as "epoch e-1 done + e batches"; restoring replays epoch e
        return {"epochs_started": self._epochs_started, "consumed": self._consumed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        started = int(state.get("epochs_started", 0))
        consumed = int(state.get("consumed", 0))
        try:
            finished = consumed >= len(self)
        except TypeError:  # Lhotse samplers have no length
            finished = False
        if started > 0 and not finished:  # resume inside epoch started-1
            self._epochs_started, self._skip_next = started - 1, consumed
        else:
            self._epochs_started, self._skip_next = started, 0


def make_resumable(loader, seed: int):
    """Make NeMo's training ``loader`` resumable in place (returns it). Iterable datasets (tarred/Shar data,
    whose sampler runs inside the workers) and other iterables pass through unchanged."""
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    loader.__class__ = ResumableDataLoader
    object.__setattr__(loader, "_resume_seed", int(seed))
    if isinstance(getattr(loader.sampler, "seed", 0), str):
        from nemo.utils import logging

        logging.warning(
            f"model.train_ds.shard_seed={loader.sampler.seed!r} draws a new shuffling seed in every process, so a "
            "resumed run continues at the same batch count but in another order; set it to an integer"
        )
    return loader


def stop_loader_threads(*loaders) -> int:
    """Stop the background bucketing thread of every lhotse sampler behind ``loaders`` (returns how many ran).

    With ``concurrent_bucketing: true`` lhotse's ``DynamicBucketer`` fills its buckets from a non-daemon thread
    that sleeps while they are full and ends only when the data source is exhausted or the bucketer's iterator
    is finished. Training stopped mid-epoch (max_steps, max_time, an error) leaves that iterator suspended, and
    the interpreter then waits for the thread forever at exit. Closing the suspended iterator (the sampler's
    ``cuts_iter`` generator) runs lhotse's own clean-up, which tells the thread to stop and joins it. A later
    epoch re-creates the iterator, so this is safe to call at any point after training.
    """
    import inspect

    stopped = 0
    seen = set()
    todo = [getattr(dl, "sampler", None) for dl in loaders]
    while todo:
        sampler = todo.pop()
        if sampler is None or id(sampler) in seen:
            continue
        seen.add(id(sampler))
        todo += list(getattr(sampler, "samplers", None) or [])  # lhotse's zip / round-robin samplers
        todo.append(getattr(sampler, "inner", None))  # _SkipFirst
        cuts_iter = getattr(sampler, "cuts_iter", None)
        if inspect.isgenerator(cuts_iter) and inspect.getgeneratorstate(cuts_iter) != inspect.GEN_CLOSED:
            running = inspect.getgeneratorstate(cuts_iter) == inspect.GEN_SUSPENDED
            cuts_iter.close()  # GeneratorExit at its yield: lhotse's `finally` stops and joins the producer
            stopped += int(running)
    return stopped
