"""`python -m p2p.bench pie | eval | report ...`, also under `torchrun --nproc_per_node=N -m p2p.bench pie ...`."""
import sys

from .command import main

sys.exit(main())
