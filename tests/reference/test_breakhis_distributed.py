"""Process-group setup: the order of device selection and group start (mocked CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from breakhis import distributed
from breakhis.distributed import init_distributed


class TestInitDistributed:
    def test_cuda_device_is_set_before_the_nccl_group_starts(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[tuple[str, object]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend: calls.append(("init_process_group", backend)))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        info = init_distributed("cuda")
        assert calls == [("set_device", 1), ("init_process_group", "nccl")]
        assert info.device == torch.device("cuda", 1) and info.rank == 1 and info.distributed

    @pytest.mark.parametrize("gpus", [1, 2])
    def test_more_processes_than_gpus_is_an_error_that_says_so(
        self, gpus: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """torch's "invalid device ordinal" came through, from set_device."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device was called"))
        monkeypatch.setattr(dist, "init_process_group", lambda backend: pytest.fail("a group was started"))
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("LOCAL_RANK", "2")
        visible = "1 GPU is" if gpus == 1 else "2 GPUs are"
        with pytest.raises(ValueError, match=rf"^expected a GPU for each process on this machine, but local "
                           rf"rank 2 has none: {visible} visible; start at most {gpus} \(torchrun "
                           rf"--nproc_per_node {gpus}\), or pass --device cpu$"):
            init_distributed("auto")

    def test_single_cpu_process_joins_no_group(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        info = init_distributed("cpu")
        assert info.device == torch.device("cpu") and not info.distributed and info.is_main
        assert not distributed.dist.is_initialized()

    def test_unknown_device(self) -> None:
        with pytest.raises(ValueError, match="must be 'auto', 'cpu' or 'cuda', but got 'tpu'"):
            init_distributed("tpu")
