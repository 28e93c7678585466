"""The Triton host layer of the ops (mmrec_ops/triton/_common.py): which
launch path a Triton version takes, and that a launch runs on its tensors'
device. Without a GPU, the plan launches fake kernels with fake tensors; the
interpreter tests run the JITFunction.run path with real kernels; with two
GPUs, tests/ops/test_contract.py runs every op on the one that is not current."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmrec_ops.triton import _common

pytestmark = pytest.mark.triton


@pytest.mark.parametrize(
    "version, interpret, direct",
    [
        ((3, 5), False, False),
        ((3, 6), False, True),
        ((3, 9), False, True),
        ((3, 10), False, False),
        ((3, 6), True, False),
    ],
    ids=["triton3.5", "triton3.6", "triton3.9", "triton3.10", "interpreter"],
)
def test_direct_launch_is_version_gated(version, interpret, direct):
    assert _common.direct_launch_supported(version, interpret) is direct


def test_launch_path_names_the_path():
    path = _common.launch_path()
    if _common.INTERPRET:  # without a GPU (tests/conftest.py)
        assert path == "cached plans through JITFunction.run (the interpreter)"
    else:
        assert ("launched directly" in path) == _common.DIRECT_LAUNCH


class FakeTensor:
    """What a plan reads of a tensor: its device index and its address."""

    def __init__(self, device: int, address: int = 1024):
        self.device, self.address = device, address

    def get_device(self) -> int:
        return self.device

    def data_ptr(self) -> int:
        return self.address


class Devices:
    """The current CUDA device, and a stand-in for the guard of _common that records its use."""

    def __init__(self, current: int):
        self.current, self.guarded = current, []

    @contextlib.contextmanager
    def guard(self, index):
        self.guarded.append(index)
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous


class FakeKernel:
    """A JITFunction (kernel[grid](*args, num_warps=...)) that compiles to a
    kernel whose launcher records the device current at each launch."""

    def __init__(self, devices: Devices):
        self.devices, self.jit_calls, self.direct_calls = devices, [], []
        self.run, self.function, self.packed_metadata = self.direct, "function", "metadata"

    def __getitem__(self, grid):
        def jit_run(*args, num_warps):
            self.jit_calls.append((grid, args, num_warps, self.devices.current))
            return self

        return jit_run

    def direct(self, *args):
        self.direct_calls.append((args, self.devices.current))


@pytest.fixture
def devices(monkeypatch):
    devices = Devices(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: devices.current)
    monkeypatch.setattr(_common, "device_guard", devices.guard)
    return devices


def plan_of(kernel):
    return _common.Plan(kernel, (5,), ints=(7, 8), constexprs=(True,), num_warps=4)


@pytest.mark.parametrize("device", [0, 1], ids=["current_device", "other_device"])
def test_fallback_path_launches_through_jit_function_on_the_tensors_device(devices, device, monkeypatch):
    monkeypatch.setattr(_common, "DIRECT_LAUNCH", False)
    kernel = FakeKernel(devices)
    tensors = (FakeTensor(device), FakeTensor(device))
    for _ in range(2):
        plan_of(kernel).launch(*tensors)
    assert kernel.jit_calls == [((5, 1, 1), (*tensors, 7, 8, True), 4, device)] * 2
    assert devices.guarded == ([] if device == 0 else [1, 1]), "a guard only for another device than the current one"
    assert devices.current == 0


@pytest.mark.parametrize("device", [0, 1], ids=["current_device", "other_device"])
def test_direct_path_launches_on_the_tensors_device(devices, device, monkeypatch):
    """The first launch of a plan compiles through JITFunction.run, later ones
    call the compiled kernel's launcher with the stream of the tensors' device."""

    class Driver:
        @staticmethod
        def get_current_stream(index):
            return f"stream of {index}"

    class Hooks:
        launch_enter_hook = launch_exit_hook = None

    monkeypatch.setattr(_common, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(_common, "_driver", type("drivers", (), {"active": Driver}), raising=False)
    monkeypatch.setattr(_common, "_knobs", type("knobs", (), {"runtime": Hooks}), raising=False)
    kernel = FakeKernel(devices)
    plan = plan_of(kernel)
    tensors = (FakeTensor(device), FakeTensor(device, address=1028))
    for _ in range(3):
        plan.launch(*tensors)
    assert [call[3] for call in kernel.jit_calls] == [device]
    expected = (5, 1, 1, f"stream of {device}", "function", "metadata", None, None, None, *tensors, 7, 8, True)
    assert kernel.direct_calls == [(expected, device)] * 2
    assert devices.guarded == ([] if device == 0 else [1, 1, 1])
    # Another alignment of a pointer is another compiled kernel.
    plan.launch(FakeTensor(device, address=1032), FakeTensor(device, address=1028))
    assert len(kernel.jit_calls) == 2
