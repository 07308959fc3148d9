"""loraedit: edit a whole video from an edited first frame (mask-aware LoRA on Wan I2V)."""

import os as _os
import sys as _sys

# OpenMP threads spin for a while after each parallel region by default. On a small machine where any
# other process wants the cores (a laptop, a 2-vCPU VM, pytest beside a browser) the spinning threads
# and the other process steal each other's time slices and every torch operation slows down 40-80x
# (the demo: 36 s idle, 100-302 s beside one busy process). PASSIVE makes waiting threads sleep; it has
# to be in the environment before torch loads its OpenMP runtime, which is why it lives here, the first
# code any `loraedit` command runs. A value the user set is kept.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
