"""The program W&B sweep agents run: ``python -m dpq.train`` as a file (``program: sweeps/train.py``).

The sweep files use the command form ``${env} ${interpreter} ${program} ${args_no_hyphens}``,
so the program must be a file. ``src/dpq/train.py`` itself is not run as one: Python would
put ``src/dpq/`` first on ``sys.path``, so each of dpq's modules would also be a top-level module that
can shadow the standard library's (``dpq/selectors.py`` once did, before it moved to ``dpq/core/``), and
``dpq.train`` would be imported twice. ``runpy`` runs the module exactly as ``-m`` does (as ``__main__``, so
Hydra finds ``conf/`` next to it and Lightning's DDP launcher re-runs ``-m dpq.train``).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("dpq.train", run_name="__main__", alter_sys=True)
