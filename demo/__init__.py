"""The demo corpus: synthetic speech of WordNet example sentences (``demo.corpus``) and its builders. Not part
of the installed package; run from the repository root as ``python -m demo.make_demo_data``."""
