"""The console scripts ``pip install`` puts on PATH (``[project.scripts]`` of pyproject.toml); each is
the module's own ``main`` (also ``python -m ibpo_lab.<module>``), wrapped here where that ``main``
returns something other than an exit status. Modules are imported only when their command runs.

==================  =====================================  =====================================
command             same as                                what
==================  =====================================  =====================================
``ibpo-train``      ``python -m ibpo_lab.train``           train one config (``--field value``)
``ibpo-reproduce``  ``python -m ibpo_lab.reproduce``       run the notebooks, write the report
``ibpo-gpu-check``  ``python -m ibpo_lab.gpu_check``       GPU checks (``--small``: CPU dry run)
``ibpo-warmup``     ``python -m ibpo_lab.warmup``          re-train the committed tiny policy
``ibpo-trl``        ``python -m ibpo_lab.integrations.trl``  IBPO inside TRL's GRPOTrainer
``ibpo-verl``       ``python -m ibpo_lab.integrations.verl``  verl dataset / patch
==================  =====================================  =====================================
"""

from __future__ import annotations

import sys

__all__ = ["train", "reproduce", "gpu_check", "warmup", "trl", "verl"]


def train() -> int:
    from ibpo_lab.train import main

    return main()


def reproduce() -> int:
    from ibpo_lab.reproduce import main

    return main()


def gpu_check() -> int:
    from ibpo_lab.gpu_check import main

    return main()


def warmup() -> int:
    from ibpo_lab.warmup import main

    main()
    return 0


def trl() -> int:
    from ibpo_lab.integrations.trl import main

    main(sys.argv[1:])
    return 0


def verl() -> int:
    from ibpo_lab.integrations.verl import main

    main(sys.argv[1:])
    return 0
