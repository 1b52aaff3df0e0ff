"""Train and evaluate one (backbone, method, dataset, protocol, seed): `python run.py method=lora dataset=cifar100`."""

import sys
from pathlib import Path

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
        from vpeft.run import entered, unknown_key_hint

        # Hydra reports its own errors (an unknown key, an unknown method=) and exits 1 before any run
        # starts: that is bad input, which exits 2 like every other; an unknown key gets the closest valid one
        hint = unknown_key_hint(sys.argv[1:], str(Path(__file__).resolve().parent / "conf")) if e.code == 1 else None
        if hint:
            print(hint, file=sys.stderr)
        sys.exit(2 if e.code == 1 and (hint or not entered()) else e.code)
