import pytest
import torch

from memzoo.kernels import IMPL_ENV_VAR, resolve_impl, triton_available


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl("auto", torch.zeros(1)) == "ref"
    assert resolve_impl("ref", torch.zeros(1)) == "ref"


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' needs"):
        resolve_impl("triton", torch.zeros(1))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_interpreter_runs_triton_on_cpu_only_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl("triton", torch.zeros(1)) == "triton"
    assert resolve_impl("auto", torch.zeros(1)) == "ref"


def test_environment_override_and_bad_names(monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "ref")
    assert resolve_impl("auto", torch.zeros(1)) == "ref"
    monkeypatch.setenv(IMPL_ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", torch.zeros(1)) == "triton"
    monkeypatch.setenv(IMPL_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MEMZOO_KERNEL_IMPL"):
        resolve_impl("auto", torch.zeros(1))
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", torch.zeros(1))


def test_check_chunk_options():
    from memzoo.kernels import check_chunk_options

    check_chunk_options(16, "auto")
    check_chunk_options(256, "ref", max_chunk=256)
    for bad, kw in ((8, {}), (48, {}), (512, {"max_chunk": 256})):
        with pytest.raises(ValueError, match="chunk_size must be a power of two"):
            check_chunk_options(bad, "auto", **kw)
    with pytest.raises(ValueError, match="impl must be one of"):
        check_chunk_options(64, "cuda")
