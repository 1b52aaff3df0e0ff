"""Benchmark suites: each measures one question end to end and writes its result through vpeft.bench.report.

- ``train_speed``: the training step, a whole final run, the usual recipe and peft (scripts/bench_train.py)
- ``serving``: mixed-task batches, swaps and resident deltas of vpeft.serve (scripts/bench_serve.py)
- ``gpu_check``: every CUDA path in one short GPU lease, steps run as subprocesses (scripts/gpu_check.py)

A suite is a module with its sections (functions that measure and return plain dicts and lists), a
``markdown(result)`` built with ``report.Report`` and a ``run(args, command)`` that hands its sections to
``report.run_sections``; its command line in scripts/ parses the arguments and calls ``run``. Modules are
imported one by one (each pulls in what it measures), not from here.
"""
