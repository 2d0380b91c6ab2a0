"""``python -m functions.multinode.rank``: one later rank of a split replica (started by a launcher).

Loads this stage's weights, joins the replica's process group, and serves its
stage until rank 0 says stop or is gone. Exits 0 on stop, 3 when the replica was lost.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta


def main() -> int:
    import torch.distributed as dist

    from functions.multinode.launcher import rank_from_environment
    from functions.multinode.stage_model import load_stage
    from functions.multinode.stage_server import StageServer
    from tpm_fed.protocol.model import ModelSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    rank = rank_from_environment(dict(os.environ))
    world_size = int(os.environ["WORLD_SIZE"])
    spec = ModelSpec.model_validate_json(os.environ["TPM_STAGE_SPEC"])
    model, plan = load_stage(spec, rank)  # before joining: a rank that cannot load never holds the others up
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    server = StageServer(model, plan, rank)
    server.serve()
    if not server.stopped:
        os._exit(3)  # the replica is lost: no teardown that could wait on a dead peer
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
