"""Rank 1 dies before a collective; rank 0 must fail (error or timeout), never hang."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from lct_fast.distributed import init_distributed  # noqa: E402

env = init_distributed(timeout_s=float(os.environ.get("LCT_TEST_TIMEOUT", "20")))
if env.rank == 1:
    os._exit(17)
time.sleep(1.0)
torch.distributed.all_reduce(torch.ones(4))  # peer is gone: gloo raises or the timeout fires
print("rank 0 completed a collective with a dead peer", flush=True)
sys.exit(0)
