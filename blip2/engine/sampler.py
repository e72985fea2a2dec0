"""A seeded, resumable sampler that shards the data over processes (single process: world size 1)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Each epoch: a permutation seeded by (seed, epoch), padded to divide evenly, this rank's slice, minus the
    first ``skip`` samples already consumed (resume mid-epoch)."""

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        if dataset_size <= 0:
            raise ValueError("the data set is empty")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self.num_samples = math.ceil(dataset_size / num_replicas)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_size))
        total = self.num_samples * self.num_replicas
        indices += indices[: total - len(indices)]
        return iter(indices[self.rank : total : self.num_replicas][self.skip :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)
