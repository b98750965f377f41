"""Argument validation is torch.optim.SGD's: optim_db's SGD error inputs raise (or warn) the same
exception types with the same messages, and nm_optim's own arguments fail clearly."""

from __future__ import annotations

import pytest
import torch
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (not installed here)")
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import nm_optim

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
ERROR_INPUTS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


def _params(error_input):
    params = error_input.optimizer_error_input.params
    return [torch.nn.Parameter(torch.randn(2, 3))] if params is None else params


def _outcome(optim_cls, error_input):
    """(exception type, message) raised by constructing optim_cls, or the warning's."""
    kwargs = error_input.optimizer_error_input.kwargs
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex) as record:
            optim_cls(_params(error_input), **kwargs)
        hits = [w for w in record if issubclass(w.category, error_input.error_type)]
        return error_input.error_type, str(hits[0].message)
    with pytest.raises(error_input.error_type, match=error_input.error_regex) as info:
        optim_cls(_params(error_input), **kwargs)
    return info.type, str(info.value)


@pytest.mark.parametrize(
    "error_input", ERROR_INPUTS, ids=[e.optimizer_error_input.desc.replace(" ", "_") for e in ERROR_INPUTS]
)
def test_optim_db_error_inputs_match_torch(error_input):
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    assert _outcome(nm_optim.SGD, error_input) == _outcome(torch.optim.SGD, error_input)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(momentum=-1.0),
        dict(weight_decay=-1e-4),
        dict(nesterov=True),
        dict(nesterov=True, momentum=0.9, dampening=0.1),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    ids=["lr", "momentum", "weight_decay", "nesterov_no_momentum", "nesterov_dampening", "tensor_lr_shape"],
)
def test_hyperparameter_errors_match_torch(kwargs):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(p, **kwargs)
    with pytest.raises(ValueError) as ours:
        nm_optim.SGD(p, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"Invalid backend: 'gpu'.*'auto'"):
        nm_optim.SGD([torch.nn.Parameter(torch.randn(3))], backend="gpu")
    opt = nm_optim.SGD([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match=r"Invalid backend: 'fast'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "backend": "fast"})


def test_cpu_backend_on_wrong_device_or_missing_cuda_is_clear():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    if not torch.cuda.is_available():
        opt = nm_optim.SGD([p], backend="cuda")
        with pytest.raises((ValueError, RuntimeError), match="backend='cuda'"):
            opt.step()


def test_triton_on_cpu_tensors_outside_the_interpreter_says_how(monkeypatch):
    from nm_optim.ops import registry

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    registry.require_backend.cache_clear()
    try:
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3)
        before = p.detach().clone()
        opt = nm_optim.SGD([p], backend="triton")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            opt.step()
        assert torch.equal(p.detach(), before)
        assert "triton" not in nm_optim.available_backends("cpu")
    finally:
        registry.require_backend.cache_clear()


def test_sparse_gradient_error_names_the_parameter():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    params = list(emb.named_parameters(prefix="emb")) + list(lin.named_parameters(prefix="lin"))
    opt = nm_optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for _, p in params]
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*'emb.weight'"):
        opt.step()
    for (_, p), b in zip(params, before):  # nothing was written
        assert torch.equal(p.detach(), b)


def test_complex_parameter_error_names_the_parameter():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    q = torch.nn.Parameter(torch.randn(3))
    q.grad = torch.randn(3)
    q0 = q.detach().clone()
    opt = nm_optim.SGD([q, p], lr=0.1)
    with pytest.raises(TypeError, match=r"#1 of its param group.*complex64"):
        opt.step()
    assert torch.equal(q.detach(), q0), "a failed step must not have written the other params"
