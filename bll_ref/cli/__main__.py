"""``python -m bll_ref.cli`` (and ``python -m mpi4py -m bll_ref.cli`` under mpiexec) is ``bll-ref``."""
import sys

from . import main

sys.exit(main())
