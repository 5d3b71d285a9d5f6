"""Side-by-side benchmarks: Prompt-MII against a naive instruction, in-context learning,
and DSPy's own GEPA and MIPROv2 optimizers, over folders of classification tasks.

Run from the repository root::

    python -m benchmarks run --quick --out benchmarks/results/quick
    python -m benchmarks report benchmarks/results/quick

Modules, one job each: ``tasks`` (task folders and the one split every method shares),
``methods`` (how each method compiles a program), ``runner`` (the cell loop, metering
and evaluation), ``store`` (results.jsonl and manifest.json on disk), ``lms`` (the run's
LM endpoints), ``manifest`` (versions, models, machine), ``report`` (tables and
statistics), ``plot`` (the Pareto plot) and ``cli`` (the command line).
"""
