"""``hydra/sweeper=vpeft`` (the default, conf/config.yaml): Hydra's basic sweeper with vpeft.sweep.sweep.

Every job is checked before any starts (a bad value refuses its jobs, the others run), and SIGTERM or Ctrl-C stops
the whole sweep, its workers included, and ends it with the summary. Hydra instantiates sweepers only from the
``hydra_plugins`` package; the work is in ``vpeft.sweep``.
"""

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class VpeftSweeper(BasicSweeper):
    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from vpeft.sweep import SweepTask

        task = SweepTask(task_function, str(config.hydra.sweep.dir))  # what every job runs, wherever it runs
        super().setup(hydra_context=hydra_context, task_function=task, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from vpeft.sweep import sweep

        return sweep(self, arguments)
