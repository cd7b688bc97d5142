"""Runs `grpokit ARGS` (the real CLI) in one process of a torchrun job, or alone, and records what the checks need.

Usage: python -m torch.distributed.run --nproc_per_node 2 distributed_worker.py RECORD_DIR train CONFIG
       python distributed_worker.py RECORD_DIR train CONFIG            (one process)

Writes RECORD_DIR/rank-R.pt: the flattened parameters after every optimizer step, each generation as every
process holds it (completion ids, rewards), the advantages of the micro-batches this process trained on, and
which run-directory writers it called.
"""

import os
import sys
from pathlib import Path

import torch

from grpokit import cli
from grpokit.observe import runlog
from grpokit.train import checkpoint
from grpokit.train.trainer import Trainer

record = {"params": [], "completions": [], "rewards": [], "advantages": [], "writes": []}
step, micro_batches = Trainer.step, Trainer.micro_batches


def counted(module, name):
    """Record each call of module.name (what writes into the run directory)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        record["writes"].append(name)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


for module, name in ((runlog, "log_completions"), (checkpoint, "save"), (Trainer, "save_model")):
    counted(module, name)


def recording_step(self, metrics_log):
    out = step(self, metrics_log)
    record["params"].append(torch.cat([p.detach().flatten().cpu() for p in self.policy.parameters()]))
    return out


def recording_micro_batches(self, batch, advantages):
    out = micro_batches(self, batch, advantages)
    record["completions"].append(batch.completion_ids)
    record["rewards"].append(batch.rewards.clone())
    record["advantages"].append(torch.cat([mb.advantages.cpu() for mb in out]))
    return out


Trainer.step, Trainer.micro_batches = recording_step, recording_micro_batches
directory = Path(sys.argv[1])
try:
    code = cli.main(sys.argv[2:])
finally:
    torch.save(record, directory / f"rank-{os.environ.get('RANK', '0')}.pt")
sys.exit(code)
