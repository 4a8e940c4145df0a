"""Issue 22's benchmark: a converged base, a target domain where language knowledge matters, arms that
fine-tune the base for the same steps, and paired statistics over seeds.

- :mod:`benchmarks.evidence.domain`: the target-domain builder (held-out sentences whose words the base has
  mostly not heard; labelled, unlabelled, dev and test splits in seen and unseen voices).
- :mod:`benchmarks.evidence.stats`: paired differences with Student-t intervals, the LLM gain captured and
  unseen-word recall.
"""
