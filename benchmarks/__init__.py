"""The benchmark harness: ablation runner, report and plots, bench_* measurements, the Whisper reference and the
LLM top-changed study. Not part of the installed package; run from the repository root as
``python -m benchmarks.<module>``."""
