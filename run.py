"""Train and evaluate one (backbone, method, dataset, protocol, seed): `python run.py method=lora dataset=cifar100`."""

import sys

import hydra
from omegaconf import DictConfig

import vpeft.config  # noqa: F401  (registers the resolvers the configs use)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from vpeft.run import main as run

    run(cfg)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        from vpeft.run import entered

        # Hydra reports its own errors (an unknown key, an unknown method=) and exits 1 before any run
        # starts: that is bad input, which exits 2 like every other
        sys.exit(2 if e.code == 1 and not entered() else e.code)
