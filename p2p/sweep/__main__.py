"""`python -m p2p.sweep CONFIG -o OUT`, also under `torchrun --nproc_per_node=N -m p2p.sweep ...`."""
import sys

from .command import main

sys.exit(main())
