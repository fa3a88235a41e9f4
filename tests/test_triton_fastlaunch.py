"""The direct launch path of the Triton kernels (``_common.FastLaunch``), with stand-ins for Triton's
launcher and compiled kernel (no GPU needed): what the compiled handle receives, and when a call must go
through Triton's own path again (a new specialisation, a new autotune bucket, a failing handle)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fastxlstm.ops.triton import _common  # noqa: E402


def _kernel_fn(X, Y, S, scale, D: int, L: int, BK: int, FLAG: bool = True, TK: int = 0):  # noqa: N803
    """Stands in for a @triton.jit function's Python body (only its signature is used)."""


class FakeJIT:
    arg_names = ["X", "Y", "S", "scale", "D", "L", "BK", "FLAG", "TK"]
    fn = staticmethod(_kernel_fn)


class FakeCompiled:
    function, packed_metadata = "fn-handle", "packed"

    def __init__(self):
        self.calls = []
        self.fail = False

    def run(self, *args):
        if self.fail:
            raise TypeError("launcher signature changed")
        self.calls.append(args)


class FakeConfig:
    kwargs = {"BK": 64}


class FakeLauncher:
    """Triton's path: records each call and returns the (one) compiled kernel."""

    def __init__(self):
        self.calls = []
        self.kernel = FakeCompiled()

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel
        return call


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_common, "_stream", lambda dev: f"stream{dev}")
    monkeypatch.setattr(_common, "_launch_hooks", lambda: False)
    inner = FakeLauncher()
    fl = _common.FastLaunch(inner, FakeJIT(), lambda: FakeConfig())
    fl.enabled = True
    return fl, inner


def _grid(meta):
    return (3, meta["BK"] // 32)


def test_second_call_goes_to_the_compiled_handle(launch):
    fl, inner = launch
    x, y = torch.zeros(8), torch.zeros(8, dtype=torch.float64)
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    assert len(inner.calls) == 1 and not inner.kernel.calls
    fl[_grid](x, y, 48, 0.25, D=16, L=32, TK=7)  # same specialisation (48 % 16 == 0), new values
    assert len(inner.calls) == 1
    (args,) = inner.kernel.calls
    # grid from the config's meta, the stream, the handle, no launch metadata or hooks, then every
    # parameter in signature order: positional ones as passed, the rest from kwargs, config, defaults
    assert args[:9] == (3, 2, 1, "stream0", "fn-handle", "packed", None, None, None)
    assert args[9] is x and args[10] is y
    assert args[11:] == (48, 0.25, 16, 32, 64, True, 7)


def test_new_specialisation_or_bucket_goes_through_triton(launch):
    fl, inner = launch
    x, y = torch.zeros(8), torch.zeros(8)
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    fl[_grid](x, y, 33, 0.5, D=16, L=32, TK=7)  # 33 is not a multiple of 16: another compiled kernel
    fl[_grid](x, y, 1, 0.5, D=16, L=32, TK=7)  # == 1 is specialised too
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=8)  # another autotune bucket
    fl[_grid](x.to(torch.bfloat16), y, 32, 0.5, D=16, L=32, TK=7)  # another dtype
    fl[_grid](x[1:], y, 32, 0.5, D=16, L=32, TK=7)  # a pointer that is not 16-byte aligned
    fl[_grid](x, y, 1 << 40, 0.5, D=16, L=32, TK=7)  # a 64-bit int
    assert len(inner.calls) == 7 and not inner.kernel.calls
    fl[_grid](x, y, 33 + 16, 0.5, D=16, L=32, TK=7)  # now cached: 49 specialises like 33
    assert len(inner.calls) == 7 and len(inner.kernel.calls) == 1


def test_another_device_goes_through_triton(launch, monkeypatch):
    fl, inner = launch
    x, y = torch.zeros(8), torch.zeros(8)
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 1)
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)  # the handle cached on device 0 is not launched on device 1
    assert len(inner.calls) == 2 and not inner.kernel.calls
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    assert len(inner.calls) == 2 and inner.kernel.calls[0][3] == "stream1"  # on device 1's stream


def test_failing_handle_falls_back_for_good(launch):
    fl, inner = launch
    x, y = torch.zeros(8), torch.zeros(8)
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    inner.kernel.fail = True
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    assert len(inner.calls) == 2 and not fl.enabled and "signature" in fl.fallback_reason
    inner.kernel.fail = False
    fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    assert len(inner.calls) == 3 and not inner.kernel.calls


def test_launch_hooks_keep_triton_path(launch, monkeypatch):
    fl, inner = launch
    monkeypatch.setattr(_common, "_launch_hooks", lambda: True)
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        fl[_grid](x, y, 32, 0.5, D=16, L=32, TK=7)
    assert len(inner.calls) == 3 and not inner.kernel.calls


def test_hook_chain_detection():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not _common._hook_set(None)
    assert not _common._hook_set(Chain([]))  # Triton >= 3.5 keeps an empty chain: no hook
    assert _common._hook_set(Chain([print]))
    assert _common._hook_set(print)


@pytest.mark.gpu
def test_gpu_fast_launch_bit_identical_and_engaged():
    """On the GPU: forward+backward (gradient through h only, as in training) gives bit-identical results
    through the direct path and through Triton's own, and the direct path is taken (no fallback)."""
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.triton import _bwd, _fwd

    launchers = [getattr(_fwd, n) for n in ("fwd_gates", "fwd_states", "fwd_out")] + [
        getattr(_bwd, n) for n in ("bwd_prep", "bwd_dstates", "bwd_dq", "bwd_dk", "bwd_dv", "bwd_gates_a",
                                   "bwd_gates_b", "bwd_gates_c")]
    g = torch.Generator().manual_seed(1234)
    b, nh, s = 1, 8, 1000
    xs = [torch.randn(b, nh, s, d, generator=g).cuda().bfloat16() for d in (256, 256, 512)]
    xs += [(15 * torch.tanh((torch.randn(b, nh, s, generator=g) * 4 + off) / 15)).cuda() for off in (-3, 4)]
    dh = torch.randn(b, nh, s, 512, generator=g).cuda().bfloat16()
    results = []
    for fast in (False, True, True):  # Triton's path, then the direct path's first (caching) and second call
        for ln in launchers:
            ln.enabled = fast
        leaves = [t.clone().requires_grad_() for t in xs]
        h, (c, n, m) = T.mlstm_chunkwise(*leaves)
        h.backward(dh)
        results.append([h, c, n, m] + [t.grad for t in leaves])
    for ln in launchers:
        ln.enabled = _common.FAST_LAUNCH
    for a, b_, c in zip(*results):
        assert torch.equal(a, b_) and torch.equal(a, c)
    assert all(ln.fallback_reason is None for ln in launchers)
    if _common.FAST_LAUNCH and not _common._launch_hooks():
        assert all(ln._cache for ln in launchers), [ln._fn.fn.__name__ for ln in launchers if not ln._cache]
