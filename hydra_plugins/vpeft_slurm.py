"""``hydra/launcher=slurm``: the SLURM launcher of hydra-submitit-launcher with vpeft.sweep.launch_slurm.

Hydra instantiates launchers only from the ``hydra_plugins`` package, which this folder joins when
the checkout is on the path (``python run.py``). The launcher travels to each job by value, so a job
needs vpeft and the plugin installed, not this folder.
"""

import sys

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _PluginSlurmLauncher


class SlurmLauncher(_PluginSlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        import cloudpickle

        from vpeft.sweep import launch_slurm

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs need not find this file
        return launch_slurm(self, job_overrides, initial_job_idx)
