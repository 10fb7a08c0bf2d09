"""The lab: the evaluation harness behind BENCHMARKS.md and the investigation scripts. Not installed;
run from a checkout (``python -m lab.NAME``, or ``crispedit bench``)."""
